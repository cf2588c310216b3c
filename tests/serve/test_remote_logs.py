"""logs/N of an instance on another node, through a real mount (docs/cluster.md, "Logs").

Two nodes on one store (tests/serve/two_nodes.py): n1 serves the mount; n2 runs its
instances with a state directory of its own, so their output is on n2's "disk", and serves it
from its log server, a process of its own on n2's address.  Real cat, stat and tail -f read it
through n1's mount; n2's log server killed is n2 gone: EIO."""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

from tests import mount as _mount

TWO_NODES = os.path.join(os.path.dirname(__file__), "two_nodes.py")
N1, N2, N2_LOG_PORT = "127.0.3.1", "127.0.3.2", 21101
TICKER = """\
import os, sys, time
for i in range(4000):  # ~200 KB: more than one read (128 KiB) of the mount, less than the log's bound
    sys.stdout.write(f"line {i:05d} " + "x" * 40 + "\\n")
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
i = 0
while True:
    print(f"tick {i}", flush=True)
    i += 1
    time.sleep(0.1)
"""
FIRST = sum(len(f"line {i:05d} " + "x" * 40 + "\n") for i in range(4000))


def listening(address: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {address}:{port}"
            time.sleep(0.02)


def instance(m, slot: int) -> tuple[str, int]:
    line = m.read(f"active/app/instances/{slot}")
    node, id = re.search(r"^node=(\S+) .* id=(\d+)", line).groups()  # type: ignore[union-attr]
    return node, int(id)


def test_another_nodes_log_reads_as_on_its_disk_follows_and_fails_with_eio_once_it_is_gone(tmp_path, monkeypatch):
    n2_state = str(tmp_path / "n2")
    os.makedirs(n2_state, mode=0o700)
    monkeypatch.setenv("DEPLOYFS_N2_STATE", n2_state)
    monkeypatch.setenv("DEPLOYFS_N2_ADDRESS", N2)
    monkeypatch.setenv("DEPLOYFS_N2_LOG_PORT", str(N2_LOG_PORT))
    ticker, go = tmp_path / "ticker.py", tmp_path / "go"
    ticker.write_text(TICKER)
    server = subprocess.Popen([sys.executable, TWO_NODES, "logserver", os.path.join(n2_state, "logs"), N2,
                               str(N2_LOG_PORT)], start_new_session=True)
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    tail = None
    try:
        listening(N2, N2_LOG_PORT)
        m = _mount.start(str(tmp_path), argv=[sys.executable, TWO_NODES, "serve", mnt, "--state", state,
                                              "--node", "n1", "--address", N1])
        try:
            m.write_manifest("app", f"image {sys.executable}\nargs -u {ticker} {go}\nreplicas 2\nhealth_interval 0.2\n")
            assert m.ctl("apply app").returncode == 0
            assert m.read("active/app/wait").startswith("done")
            where = {instance(m, slot)[0]: (slot, instance(m, slot)[1]) for slot in (0, 1)}
            assert sorted(where) == ["n1", "n2"], where  # one instance on each node
            slot, id = where["n2"]
            on_disk = os.path.join(n2_state, "logs", "app", f"{id}.log")
            m.until(lambda: os.path.exists(on_disk) and os.path.getsize(on_disk) == FIRST, what="n2's output")
            assert not os.path.exists(os.path.join(state, "logs", "app", f"{id}.log"))  # not on n1's disk

            # the same bytes as the file on n2's disk, and its true size
            with open(on_disk) as f:
                assert m.read(f"active/app/logs/{slot}") == f.read()
            assert m.sh(f"stat -c %s active/app/logs/{slot}", check=True).stdout == f"{FIRST}\n"
            listed = m.sh("ls -l active/app/logs", check=True).stdout
            assert re.search(rf" {FIRST} .* {slot}\n", listed), listed
            local_slot, local_id = where["n1"]
            with open(os.path.join(state, "logs", "app", f"{local_id}.log")) as f:
                assert m.read(f"active/app/logs/{local_slot}") == f.read()

            # tail -f through the mount sees the lines n2's instance writes from now on
            tail = subprocess.Popen(["tail", "-f", "-n", "1", m.p("active", "app", "logs", str(slot))],
                                    stdout=subprocess.PIPE, text=True)
            go.touch()
            seen, deadline = "", time.monotonic() + 10
            while "tick 2\n" not in seen:
                assert time.monotonic() < deadline, f"tail -f saw only {seen!r}"
                if select.select([tail.stdout], [], [], 0.2)[0]:
                    seen += os.read(tail.stdout.fileno(), 4096).decode()  # type: ignore[union-attr]
            assert seen.startswith("line 03999 "), seen

            # n2 gone (its log server killed): its instance's log is EIO; n1's still reads
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            r = m.sh(f"cat active/app/logs/{slot}")
            assert r.returncode == 1 and "Input/output error" in r.stderr, (r.returncode, r.stderr)
            assert m.read(f"active/app/logs/{local_slot}").startswith("line 00000 ")
            assert "does not answer for its instances' logs" in m.server_log()
        finally:
            if tail is not None:
                tail.kill()
                tail.wait()
            _mount.stop(m)
        assert _mount.reap(n2_state) == []  # n1's shutdown stopped n2's instance through its agent
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        _mount.reap(n2_state)
