"""9P as an operator meets it: a warning for an address other hosts reach, a cap per peer address,
and a blocked `wait` read answered EIO at shutdown (a real server, real sockets)."""

import errno
import signal
import socket
import time

from deployfs.serve.ninep import codec as c
from deployfs.serve.ninep.server import MAX_PER_PEER
from tests import mount as _mount

from .client import Client
from .test_server import SVC, deploy

PORT = 20210


def test_an_open_address_is_warned_about_and_one_peer_cannot_take_every_slot(tmp_path):
    m = _mount.start(str(tmp_path), "--9p", f"tcp!0.0.0.0!{PORT}")
    try:
        log = m.server_log()
        assert "is reachable from other hosts" in log and "use unix!PATH" in log
        assert "warning: 9P on tcp!0.0.0.0" in m.read("events")
        assert sum("serving" in line for line in log.splitlines()) == 1, log  # said once, with the mount
        held = [Client(("127.0.0.1", PORT)) for _ in range(MAX_PER_PEER)]
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as extra:
                try:
                    extra.sendall(c.encode(c.NOTAG, c.Tversion(8192, c.VERSION_L)))
                    assert extra.recv(100) == b""  # closed: this address has its share
                except ConnectionResetError:
                    pass
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:  # the slot comes back once the server has seen the close
                try:
                    with Client(("127.0.0.1", PORT), timeout=2) as cl:
                        assert "ctl" in cl.listdir("/")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the freed slot never came back"
                    time.sleep(0.05)
        finally:
            for cl in held:
                cl.close()
    finally:
        _mount.stop(m)


def test_a_blocked_wait_gets_eio_at_shutdown(tmp_path):
    flag = tmp_path / "healthy"
    m = _mount.start(str(tmp_path), "--9p", f"tcp!127.0.0.1!{PORT + 1}")
    try:
        deploy(m)
        m.write_manifest("web", SVC + f"health {flag}\nhealth_timeout 0.2\n")  # held in flight
        assert m.ctl("apply web").returncode == 0
        with Client(("127.0.0.1", PORT + 1), timeout=30) as cl:
            wait = cl.open("active/web/wait")
            cl.send(5, c.Tread(wait, 0, 4096))
            assert cl.cat("active/web/update_status") == b"rolling\n"  # tag 5 is blocked meanwhile
            m.proc.send_signal(signal.SIGTERM)
            assert cl.recv() == c.Frame(5, c.Rlerror(errno.EIO))  # not a connection cut mid-request
        assert m.proc.wait(timeout=60) == 0  # (a second SIGTERM while draining would kill it)
    finally:
        _mount.stop(m)
