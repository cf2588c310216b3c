"""Nodes on one machine through a real mount (docs/cluster.md): nodes/<name>, cluster,
active/<svc>/leader, address= and $ADDRESS, and the top ctl's cordon, uncordon and drain,
with real cat and echo, real instances and real requests through the router."""

import re
import sys
import urllib.request

import pytest

from tests import mount as _mount
from tests.mount import SERVICE

PORT = 20901
ADDRESS = "127.0.1.7"  # all of 127/8 is loopback: instances that listen on 127.0.0.1 would not answer here
WEB = f"""image {sys.executable}
args {SERVICE} --port $PORT --bind $ADDRESS
replicas 2
port {PORT}
health http://$ADDRESS:$PORT/healthz
health_interval 0.2
"""
NODE = re.compile(r"address=(\S+) state=(\S+) instances=(\d+) leads=(\S*) seen=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n")


@pytest.fixture
def m(tmp_path):
    with _mount.running(str(tmp_path), "--node", "n1", "--address", ADDRESS) as mnt:
        yield mnt


def node(m, name="n1"):
    match = NODE.fullmatch(m.read(f"nodes/{name}"))
    assert match, m.read(f"nodes/{name}")
    return match.groups()


def get(path="/"):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as r:
        return r.read().decode()


def ctl(m, command):
    """The command on the top ctl, and its reply read back from the same descriptor."""
    return m.sh(f"exec 3<>ctl; echo {command!r} >&3; status=$?; cat <&3; exit $status")


def test_one_machine_is_one_node_and_its_files_say_so(m):
    assert m.sh("ls nodes", check=True).stdout == "n1\n"
    assert node(m) == (ADDRESS, "ready", "0", "")
    assert m.read("cluster") == "store=ok\nnodes=1\nready=1\nleader=n1\n"
    m.write_manifest("web", WEB)
    assert m.ctl("apply web").returncode == 0
    assert m.read("active/web/wait").startswith("done")
    assert m.read("active/web/leader") == "n1\n"
    assert node(m) == (ADDRESS, "ready", "2", "web")
    for slot in ("0", "1"):
        line = m.read(f"active/web/instances/{slot}")
        assert line.startswith(f"node=n1 address={ADDRESS} slot={slot} "), line
    assert sorted(e.split(":")[0] for e in m.read("active/web/endpoints").split()) == [ADDRESS, ADDRESS]
    # the router reaches them at the node's address: $ADDRESS in args and health
    assert get().split()[0] == m.read("active/web/version").strip()


def test_cordon_uncordon_and_drain_of_the_only_node(m):
    m.write_manifest("web", WEB)
    assert m.ctl("apply web").returncode == 0
    assert m.read("active/web/wait").startswith("done")

    r = ctl(m, "cordon nope")  # unknown: ENOENT, the reason, nothing changed
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    assert r.stdout == "error: no node 'nope' (known: n1)\n"
    r = ctl(m, "drain n1")  # the only node: nowhere to move its instances, so refused whole (EBUSY)
    assert r.returncode != 0 and "busy" in r.stderr.lower()
    assert "error: drain n1: its instances have nowhere to move (web: no ready node in the cluster " \
           "(n1 cordoned)); nothing changed" in r.stdout
    assert node(m)[1] == "ready"
    r = m.sh("echo 'cordon n1' > active/web/ctl")  # a node verb on a service's ctl: EINVAL
    assert r.returncode != 0 and "Invalid argument" in r.stderr

    r = ctl(m, "cordon n1")
    assert r.returncode == 0 and r.stdout == "ok cordoned\n"
    assert node(m)[1] == "cordoned"
    assert m.read("cluster") == "store=ok\nnodes=1\nready=0\nleader=n1\n"
    assert m.ctl("scale 3", "web").returncode == 0  # accepted; the third instance waits for a node
    m.until(lambda: "cannot start instance 2: no ready node in the cluster (n1 cordoned)" in m.read("active/web/events"),
            what="the event saying why the start waits")
    assert len(m.sh("ls active/web/instances", check=True).stdout.split()) == 2
    assert get().split()[0] == m.read("active/web/version").strip()  # what runs keeps serving

    r = ctl(m, "uncordon n1")
    assert r.returncode == 0 and r.stdout == "ok uncordoned\n"
    m.until(lambda: node(m)[1:3] == ("ready", "3") and m.read("active/web/health") == "healthy\n",
            what="the third instance, once the node takes instances again")
    events = m.read("events")
    assert "node n1 cordoned by uid=0: no new instances there" in events and "node n1 uncordoned by uid=0" in events
    assert "command refused (uid=0): no node 'nope' (known: n1)" in events
