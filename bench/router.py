"""Traffic path: requests/s and p99 with wrk (keep-alive, fixed duration), in one run:
direct to one backend, through the built-in router and through haproxy, each in
``protocol tcp`` (bytes) and ``protocol http`` (per request; issue 19), configured
as HAProxy mode runs them.  Target: built-in router >= 0.5x direct in either protocol.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, wait_for

DURATION, CONNS = int(os.environ.get("DURATION", 8)), 32
BACKEND, LISTEN, HAPROXY = 19101, 19100, 19102
LISTEN_HTTP, HAPROXY_HTTP = 20690, 20691
HAPROXY_CFG = """global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{listen}
    default_backend be
backend be
    balance roundrobin
    server s1 127.0.0.1:{backend}
frontend fe_http
    bind 127.0.0.1:{listen_http}
    mode http
    option forwardfor
    default_backend be_http
backend be_http
    mode http
    balance roundrobin
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    server s1 127.0.0.1:{backend} pool-max-conn -1 pool-purge-delay 5s
"""


def wrk(port: int) -> tuple[float, str]:
    out = subprocess.run(["wrk", "-t2", f"-c{CONNS}", f"-d{DURATION}s", "--latency", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=DURATION + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+(\S+)", out).group(1)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        raise SystemExit(f"errors during the benchmark: {errors.group(1)}")
    return rps, p99


def control(state: str, req: dict) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(state, "router.sock"))
    s.sendall(json.dumps(req).encode() + b"\n")
    reply = s.makefile().readline()
    s.close()
    return json.loads(reply)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main() -> None:
    state = tempfile.mkdtemp(prefix="bench-router-")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "backend.py"), str(BACKEND)])]
    procs.append(subprocess.Popen([sys.executable, "-m", "deployfs.traffic.router", "--state", state], cwd=ROOT))
    try:
        wait_for(lambda: os.path.exists(os.path.join(state, "router.sock")), what="router")
        for service, port, protocol in (("b", LISTEN, "tcp"), ("h", LISTEN_HTTP, "http")):
            assert control(state, {"op": "set", "service": service, "port": port, "protocol": protocol,
                                   "backends": [["127.0.0.1", BACKEND]]}).get("ok")
        time.sleep(0.5)
        rows = [("direct to the backend",) + wrk(BACKEND), ("built-in router, tcp",) + wrk(LISTEN),
                ("built-in router, http",) + wrk(LISTEN_HTTP)]
        cfg = os.path.join(state, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(listen=HAPROXY, backend=BACKEND, listen_http=HAPROXY_HTTP))
        if shutil.which("haproxy"):
            procs.append(subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            wait_for(lambda: _listening(HAPROXY), what="haproxy")
            rows.append(("haproxy, mode tcp",) + wrk(HAPROXY))
            rows.append(("haproxy, mode http",) + wrk(HAPROXY_HTTP))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
    direct = rows[0][1]
    print(f"bench/router.py on {machine()}: wrk -t2 -c{CONNS} -d{DURATION}s, keep-alive, trio backend")
    print(f"{'path':<24}{'req/s':>10}{'p99':>10}{'ratio':>8}")
    for name, rps, p99 in rows:
        print(f"{name:<24}{rps:>10.0f}{p99:>10}{rps / direct:>7.2f}x")
    if len(rows) > 3:
        print(f"built-in / haproxy: tcp {rows[1][1] / rows[3][1]:.2f}x, http {rows[2][1] / rows[4][1]:.2f}x")


if __name__ == "__main__":
    main()
