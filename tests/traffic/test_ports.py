"""A service's public port: refused when taken, released when the service is deleted (real mount)."""

import errno
import os
import socket
import subprocess
import sys
import urllib.request

from tests.serve.conftest import mnt  # noqa: F401  (the real-mount fixture)
from tests.mount import SERVICE

PORT = 18320

CTL = (  # write one command on a read-write ctl descriptor; print the errno and the reply
    "import os,sys\n"
    "fd=os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n  os.write(fd, sys.argv[2].encode())\nexcept OSError as e:\n  print('errno', e.errno)\n"
    "print(os.pread(fd, 4096, 0).decode(), end='')\n")


def manifest(version, port=PORT):
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version}\nreplicas 1\nport {port}\n"
            "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\nupdate_deadline 5\n")


def ctl(mnt, command, path="ctl"):
    r = subprocess.run([sys.executable, "-c", CTL, mnt.p(path), command + "\n"], capture_output=True, text=True,
                       timeout=10)
    return r.stdout


def get(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read().decode()


def deployed(mnt, name, version, port=PORT):
    mnt.write_manifest(name, manifest(version, port))
    assert ctl(mnt, f"apply {name}").startswith("ok deployed")
    assert mnt.sh(f"cat active/{name}/wait", timeout=30).stdout.startswith("done")


def test_a_port_another_service_serves_is_refused(mnt):
    deployed(mnt, "first", "A")
    mnt.write_manifest("second", manifest("B"))
    out = ctl(mnt, "apply second")
    assert out == (f"errno {errno.EADDRINUSE}\n"
                   f"error: port {PORT} is already the port of service 'first'\n")
    assert not os.path.exists(mnt.p("active/second"))
    assert f"command refused (uid=0): port {PORT} is already the port of service 'first'" in mnt.read("events")
    assert get(PORT).startswith("A ")  # the first service untouched
    # A new version of a running service may not move onto another's port either.
    deployed(mnt, "third", "C", PORT + 1)
    mnt.write_manifest("third", manifest("C2"))
    assert ctl(mnt, "apply", "active/third/ctl").startswith(f"errno {errno.EADDRINUSE}\n")
    assert f"command refused (uid=0): port {PORT} is already the port of service 'first'" in \
        mnt.read("active/third/events")
    assert get(PORT + 1).startswith("C ") and get(PORT).startswith("A ")


def test_a_port_another_program_holds_is_refused(mnt):
    holder = socket.create_server(("127.0.0.1", PORT + 2))
    try:
        mnt.write_manifest("web", manifest("A", PORT + 2))
        out = ctl(mnt, "apply web")
        assert out.startswith(f"errno {errno.EADDRINUSE}\nerror: port {PORT + 2}: cannot listen on 127.0.0.1:"
                              f"{PORT + 2}: Address already in use")
        assert not os.path.exists(mnt.p("active/web"))
    finally:
        holder.close()
    deployed(mnt, "web", "A", PORT + 2)  # once the port is free, the same apply works
    assert get(PORT + 2).startswith("A ")


def test_delete_stops_frees_the_port_and_logs_it_in_the_cluster_events(mnt):
    import threading
    seen: list[str] = []
    tail = subprocess.Popen(["tail", "-n", "+1", "-f", "-s", "0.1", mnt.p("events")], stdout=subprocess.PIPE,
                            text=True)
    threading.Thread(target=lambda: seen.extend(tail.stdout), daemon=True).start()
    try:
        deployed(mnt, "web", "A")
        pid = int(mnt.read("active/web/instances/0").split("pid=")[1].split()[0])
        assert ctl(mnt, "delete", "active/web/ctl").startswith(f"errno {errno.EINVAL}\nerror: delete works on the top ctl")
        assert ctl(mnt, "delete web") == "ok deleting\n"
        mnt.until(lambda: not os.path.exists(mnt.p("active/web")), what="active/web to go")
        assert "web" not in os.listdir(mnt.p("active"))
        assert os.path.exists(mnt.p("manifests/web"))  # the manifest stays until you rm it
        assert not os.path.exists(f"/proc/{pid}")  # stopped (and reaped)
        socket.create_server(("127.0.0.1", PORT)).close()  # the port is free
        mnt.until(lambda: any(f"deleted web: port {PORT} released" in line for line in seen), timeout=5,
                  what="tail -f of /deploy/events to show the deletion")
        assert any("deleting web by uid=0" in line for line in seen)
        assert ctl(mnt, "delete web").startswith(f"errno {errno.ENOENT}\n")
    finally:
        tail.kill()
        tail.wait()
    # A deleted service can be applied again: a fresh one, with a fresh history.
    deployed(mnt, "web", "B")
    assert get(PORT).startswith("B ")
    assert "deleting" not in mnt.read("active/web/events")
