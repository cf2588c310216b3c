import os

import trio

from deployfs.node.health import Probes
from deployfs.model.manifest import HealthCheck


async def serve_http(status, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        await stream.receive_some(4096)
        await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await stream.aclose()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_http_probe_wants_2xx_or_3xx(nursery):
    probes = Probes()
    for status, ok in [(200, True), (302, True), (503, False), (404, False)]:
        port = await nursery.start(serve_http, status)
        v = await probes.probe(HealthCheck("http", (f"http://127.0.0.1:{port}/healthz",)), 2)
        assert v.ok is ok and f"http {status} from 127.0.0.1:{port}/healthz" == v.detail
    await probes.aclose()


async def test_http_probe_refused_and_timeout(nursery):
    probes = Probes()
    v = await probes.probe(HealthCheck("http", ("http://127.0.0.1:1/",)), 2)
    assert not v.ok and "ConnectError" in v.detail
    # a server that accepts and never answers: the timeout really fires
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, lambda s: trio.sleep_forever(), listeners)
    t0 = trio.current_time()
    v = await probes.probe(HealthCheck("http", (f"http://127.0.0.1:{port}/",)), 0.3)
    assert not v.ok and 0.25 < trio.current_time() - t0 < 2
    await probes.aclose()


async def test_tcp_probe(nursery):
    probes = Probes()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    assert (await probes.probe(HealthCheck("tcp", (f"127.0.0.1:{port}",)), 1)).ok
    await listeners[0].aclose()
    v = await probes.probe(HealthCheck("tcp", (f"127.0.0.1:{port}",)), 1)
    assert not v.ok and "refused" in v.detail.lower()


async def test_exec_probe_status_and_kill_at_timeout(tmp_path):
    probes = Probes()
    assert (await probes.probe(HealthCheck("exec", ("true",)), 2)).ok
    v = await probes.probe(HealthCheck("exec", ("false",)), 2)
    assert not v.ok and v.detail == "exec false exited 1"
    marker = tmp_path / "pid"
    t0 = trio.current_time()
    v = await probes.probe(HealthCheck("exec", ("sh", "-c", f"echo $$ > {marker}; exec sleep 30")), 0.3)
    assert not v.ok and "timed out" in v.detail and trio.current_time() - t0 < 2
    await trio.sleep(0.1)
    assert not os.path.exists(f"/proc/{marker.read_text().strip()}")


async def test_file_probe(tmp_path):
    probes = Probes()
    f = tmp_path / "ready"
    assert not (await probes.probe(HealthCheck("file", (str(f),)), 1)).ok
    f.write_text("")
    v = await probes.probe(HealthCheck("file", (str(f),)), 1)
    assert not v.ok and "empty" in v.detail
    f.write_text("ok")
    assert (await probes.probe(HealthCheck("file", (str(f),)), 1)).ok
