#!/usr/bin/env python3
"""An example web service for the walkthrough, the demo and the tests (stdlib only).

GET / answers "<version> <instance>"; GET /healthz answers 200 (or 503 once
--fail-health-after has passed).  Switches make it misbehave on purpose.
"""

import argparse
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0") or 0))
    p.add_argument("--bind", default="127.0.0.1", help="the address to listen on ($ADDRESS: the node's)")
    p.add_argument("--version", default=os.environ.get("VERSION", "v?"))
    p.add_argument("--fail-health-after", type=float, default=None)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--exit-at-start", type=int, default=None, metavar="STATUS")
    p.add_argument("--slow-start", type=float, default=0.0)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--touch", default=None, help="write this file once up (for file health checks)")
    p.add_argument("--spawn-child", action="store_true", help="leave a grandchild running in our group")
    a = p.parse_args()
    print(f"service {a.version} starting pid={os.getpid()} port={a.port}", flush=True)
    if a.exit_at_start is not None:
        sys.exit(a.exit_at_start)
    draining = threading.Event()
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        # Graceful: stop accepting, answer what is in flight with
        # "Connection: close", exit once connections are done (or after 5 s).
        # SIGTERM is blocked here, before any thread exists (threads inherit
        # the mask), and taken with sigwait below.  A Python handler would run
        # only in the main thread, and only once that thread wakes: when the
        # kernel hands the signal to a busy handler thread instead, a main
        # thread asleep in Event.wait() never learns of it, and the service
        # runs on until it is killed, cutting requests (CPython gh-85300).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if a.spawn_child:
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
    time.sleep(a.slow_start)
    started = time.monotonic()
    body = f"{a.version} {os.environ.get('INSTANCE', '?')}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 65536  # one write per response (flushed by the base class) ...
        disable_nagle_algorithm = True  # ... and no Nagle/delayed-ACK stall

        def do_GET(self) -> None:
            failing = a.fail_health_after is not None and time.monotonic() - started > a.fail_health_after
            status, out = (503, b"failing\n") if self.path == "/healthz" and failing else (200, body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(out)))
            if draining.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    if a.exit_after is not None:
        threading.Timer(a.exit_after, lambda: os._exit(3)).start()
    server = ThreadingHTTPServer((a.bind, a.port), Handler)
    server.daemon_threads = True
    if a.touch:
        with open(a.touch, "w") as f:
            f.write("ok\n")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if a.ignore_term:
        threading.Event().wait()
    signal.sigwait({signal.SIGTERM})
    draining.set()
    server.shutdown()
    server.socket.close()  # refuse late connections (a proxy retries them elsewhere) instead of resetting them at exit
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and threading.active_count() > 1:
        time.sleep(0.02)
    os._exit(0)


if __name__ == "__main__":
    main()
