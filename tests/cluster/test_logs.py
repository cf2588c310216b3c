"""`logs/N` from any node, on a real cluster (one etcd member, two `deployfs serve --cluster`
nodes on 127.0.1.1-2, each with its own state dir and log server): every node's mount reads
every instance's output as the file on its owner's disk, `tail -f` on one node follows an
instance on the other, and once that node dies its instance's log is EIO (docs/cluster.md, "Logs")."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

import pytest

from deployfs.cli.serve import main
from tests.cli.test_serve import serve
from tests.cluster.harness import instances, running_cluster
from tests.serve.test_remote_logs import FIRST, TICKER


def test_every_node_reads_every_instances_log_follows_it_and_gets_eio_once_its_node_dies(tmp_path):
    ticker, go = tmp_path / "ticker.py", tmp_path / "go"
    ticker.write_text(TICKER)
    with running_cluster(str(tmp_path / "c"), 2, etcd_members=1) as c:
        n1, n2 = c["n1"], c["n2"]
        n1.write_manifest("tick", f"image {sys.executable}\nargs -u {ticker} {go}\nreplicas 2\nhealth_interval 0.2\n")
        r = n1.ctl("apply tick")
        assert r.returncode == 0, r.stdout + r.stderr + c.logs()
        assert n2.sh("cat active/tick/wait", timeout=30).stdout.startswith("done"), c.logs()
        placed = {i["node"]: i for i in instances(n1, "tick")}
        assert sorted(placed) == ["n1", "n2"], placed
        for owner, i in placed.items():
            on_disk = os.path.join(c[owner].state, "logs", "tick", f"{i['id']}.log")
            c.until(lambda: os.path.exists(on_disk) and os.path.getsize(on_disk) == FIRST, 10, f"{owner}'s output")
            with open(on_disk) as f:
                mine = f.read()
            for reader in (n1, n2):  # the owner's view reads its disk, the other asks the owner
                assert reader.read(f"active/tick/logs/{i['slot']}") == mine, (reader.name, owner)
                assert reader.sh(f"stat -c %s active/tick/logs/{i['slot']}").stdout == f"{FIRST}\n"

        slot = placed["n2"]["slot"]
        tail = subprocess.Popen(["tail", "-f", "-n", "1", n1.mount.p("active", "tick", "logs", slot)],
                                stdout=subprocess.PIPE, text=True)
        try:
            go.touch()
            seen, deadline = "", time.monotonic() + 10
            while "tick 2\n" not in seen:
                assert time.monotonic() < deadline, f"tail -f on n1 saw only {seen!r}"
                if select.select([tail.stdout], [], [], 0.2)[0]:
                    seen += os.read(tail.stdout.fileno(), 4096).decode()  # type: ignore[union-attr]
            assert seen.startswith("line 03999 "), seen
        finally:
            tail.kill()
            tail.wait()

        n2.kill()  # the machine dies: within its TTL (2 s) its instance is still slot `slot`, on n2
        r = n1.sh(f"cat active/tick/logs/{slot}")
        assert r.returncode == 1 and "Input/output error" in r.stderr, (r.returncode, r.stdout[-200:], r.stderr)
        assert "node n2 (127.0.1.2:7390) does not answer for its instances' logs" in n1.mount.server_log()


@pytest.mark.parametrize("flags, says", [
    (["--log-port", "7390"], "--log-port only makes sense with --cluster"),
    (["--cluster", "http://h:2379", "--log-port", "x"], "wants a port, 0-65535"),
    (["--cluster", "http://h:2379", "--log-port", "65536"], "wants a port, 0-65535"),
])
def test_the_log_port_is_checked_first(tmp_path, capsys, flags, says):
    (tmp_path / "mnt").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path / "mnt"), "--state", str(tmp_path / "state"), *flags])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_a_log_port_in_use_is_refused_before_joining(tmp_path):
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.3.6", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve(str(tmp_path / "mnt"), "--state", str(tmp_path / "s"), "--cluster", "http://127.0.0.1:20399",
                  "--node", "n1", "--address", "127.0.3.6", "--log-port", str(port))
    assert r.returncode == 2 and f"--log-port {port} on 127.0.3.6: Address already in use" in r.stderr, r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
