"""`deployfs serve --cluster URLS --node NAME --address IP --node-ttl S`, for real: a server
joins a real etcd under a lease and keeps it alive; a second server is refused the name
while that lease lives; SIGTERM gives the name up at once; a crashed server's restart on
the same state dir takes its name back.  Flags are checked before anything starts."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from deployfs.cli.serve import main
from tests import mount as _mount
from tests.cli.test_serve import serve
from tests.etcd import Cluster, cluster, etcd1  # noqa: F401  (fixture)

NS = "/deployfs/"


@pytest.mark.parametrize("flags, says", [
    (["--node-ttl", "5", "--address", "127.0.1.1"], "--node-ttl only makes sense with --cluster"),
    (["--node=-x"], "a node name is 1-63 letters"),  # one machine names its node too
    (["--address", "localhost"], "is not an IP address"),
    (["--cluster", "127.0.0.1:2379"], "is not an etcd client URL of the form http://HOST:PORT"),
    (["--cluster", "https://h:2379"], "TLS is not supported yet"),
    (["--cluster", "http://h:2379/v3"], "is not an etcd client URL"),
    (["--cluster", ","], "wants the etcd members' client URLs"),
    (["--cluster", "http://h:2379", "--node=-x"], "a node name is 1-63 letters"),
    (["--cluster", "http://h:2379", "--node", "a/b"], "a node name is 1-63 letters"),
    (["--cluster", "http://h:2379", "--address", "h1.example"], "is not an IP address"),
    (["--cluster", "http://h:2379", "--node-ttl", "1"], "at least 2 seconds"),
    (["--cluster", "http://h:2379", "--node-ttl", "2.5"], "wants whole seconds"),
    (["--routing", "every"], "--routing only makes sense with --cluster"),
])
def test_cluster_flags_are_checked_first(tmp_path, capsys, flags, says):
    (tmp_path / "mnt").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path / "mnt"), "--state", str(tmp_path / "state"), *flags])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_an_unreachable_cluster_is_refused(tmp_path):
    (tmp_path / "mnt").mkdir()
    r = serve(str(tmp_path / "mnt"), "--state", str(tmp_path / "s"), "--cluster", "http://127.0.0.1:20399",
              "--node", "n1", "--address", "127.0.1.1")
    assert r.returncode == 2 and "--cluster http://127.0.0.1:20399: cluster store unreachable" in r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def alive(etcd: Cluster, name: str) -> dict | None:
    return etcd.members[0].get(NS + "alive/" + name)


def test_a_node_joins_holds_its_name_and_leaves(etcd1: Cluster, tmp_path):  # noqa: F811
    flags = ("--cluster", etcd1.endpoints, "--node", "n1", "--node-ttl", "2")
    first = _mount.start(str(tmp_path / "a"), *flags, "--address", "127.0.1.1")
    try:
        held = alive(etcd1, "n1")
        assert held is not None and held["lease"] != 0
        assert json.loads(held["value"])["pid"] == first.proc.pid
        record = json.loads(etcd1.members[0].get(NS + "nodes/n1")["value"])
        assert record["address"] == "127.0.1.1" and record["cordoned"] is False
        assert "node n1 (127.0.1.1) joined the cluster" in first.server_log()

        time.sleep(3)  # longer than the TTL: only the server's keepalives hold the name
        assert alive(etcd1, "n1") == held

        (tmp_path / "b" / "mnt").mkdir(parents=True)
        r = serve(str(tmp_path / "b" / "mnt"), "--state", str(tmp_path / "b" / "state"), *flags, "--address", "127.0.1.2")
        assert r.returncode == 2 and "node name 'n1' is taken" in r.stderr and "address=127.0.1.1" in r.stderr
        assert not os.path.ismount(tmp_path / "b" / "mnt") and alive(etcd1, "n1") == held
    finally:
        _mount.stop(first)
    assert alive(etcd1, "n1") is None  # SIGTERM gives the name up at once

    second = _mount.start(str(tmp_path / "b"), *flags, "--address", "127.0.1.2")
    try:
        lease = alive(etcd1, "n1")["lease"]
        assert json.loads(etcd1.members[0].get(NS + "nodes/n1")["value"])["address"] == "127.0.1.2"
        _mount.kill9(second)  # a crash: the name stays held until the lease runs out ...
        assert alive(etcd1, "n1")["lease"] == lease
        # ... but this node's own restart (same state dir) takes it back under that lease.
        second = _mount.start(str(tmp_path / "b"), *flags, "--address", "127.0.1.2", mnt=second.path, state=second.state)
        assert "node n1 (127.0.1.2) is back in the cluster" in second.server_log()
        assert alive(etcd1, "n1")["lease"] == lease
        assert json.loads(alive(etcd1, "n1")["value"])["pid"] == second.proc.pid
        # --keep-instances: its instances still run here, so the node keeps its name for the next start.
        _mount.stop(second)
        second = _mount.start(str(tmp_path / "b"), *flags, "--address", "127.0.1.2", "--keep-instances",
                              mnt=second.path, state=second.state)
        lease = alive(etcd1, "n1")["lease"]
        _mount.stop(second, signal.SIGINT)  # the same shutdown; the router it leaves running is reaped
        assert alive(etcd1, "n1")["lease"] == lease
        second = _mount.start(str(tmp_path / "b"), *flags, "--address", "127.0.1.2", mnt=second.path, state=second.state)
        assert "is back in the cluster" in second.server_log() and alive(etcd1, "n1")["lease"] == lease
    finally:
        _mount.stop(second, signal.SIGTERM)
    assert alive(etcd1, "n1") is None


def test_a_node_outlives_an_etcd_pause_longer_than_its_ttl(tmp_path):
    """etcd frozen past the node's TTL expires the lease on resume: the server
    keeps serving meanwhile, then claims its name again under a new lease."""
    with cluster(1) as etcd:
        m = _mount.start(str(tmp_path), "--cluster", etcd.endpoints, "--node", "n1", "--address", "127.0.1.1",
                         "--node-ttl", "2")
        try:
            lease = alive(etcd, "n1")["lease"]
            etcd.members[0].signal(signal.SIGSTOP)
            try:
                time.sleep(3.5)
                assert "ctl" in m.sh("ls", check=True).stdout and m.proc.poll() is None  # the mount goes on
            finally:
                etcd.members[0].signal(signal.SIGCONT)
            m.until(lambda: "joined again under a new lease" in m.server_log(), timeout=10, what="the node to rejoin")
            held = alive(etcd, "n1")
            assert held is not None and held["lease"] != lease
            assert json.loads(held["value"])["pid"] == m.proc.pid
        finally:
            _mount.stop(m)
        assert alive(etcd, "n1") is None
