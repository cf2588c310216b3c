"""`make demo`: deploy, roll out under load, catch a bad release, roll back.

Mounts deployfs on a temporary directory, runs the example service x3 behind
port 18080 while a client keeps requesting, and narrates each step with the
same `cat` / `echo` an operator would type.  Leaves nothing running or mounted,
even when interrupted.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import mount  # noqa: E402  (the same start/stop helpers the tests use)

PORT = 18080
EXAMPLE = os.path.join(ROOT, "examples", "web.py")


def manifest(args: str) -> str:
    return (f"image {sys.executable}\nargs {EXAMPLE} --port $PORT {args}\nreplicas 3\nport {PORT}\n"
            "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.5\nhealth_retries 2\n"
            "update_deadline 10\ndrain_timeout 1\n")


class Counter(threading.Thread):
    """A client that never stops asking; counts answers by version, and failures."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ok: dict[str, int] = {}
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode()
                if r.status != 200:
                    self.failed += 1
                else:
                    v = body.split()[0]
                    self.ok[v] = self.ok.get(v, 0) + 1
                if r.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                self.failed += 1
                conn.close()
                time.sleep(0.01)

    def line(self) -> str:
        served = ", ".join(f"{v}: {n}" for v, n in sorted(self.ok.items()))
        return f"requests so far — {served or 'none'}; failed: {self.failed}"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(m: mount.Mount, cmd: str, timeout: float = 60) -> str:
    print(f"$ {cmd}", flush=True)
    r = m.sh(cmd, timeout=timeout)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return r.stdout


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="deployfs-demo-")
    m = None
    counter = Counter()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        say(f"Mounting deployfs on {tmp}/mnt")
        m = mount.start(tmp)
        run(m, "ls")
        say("Deploying the example web service, version v1, three replicas behind port 18080")
        m.write_manifest("web", manifest("--version v1"))
        run(m, "cat manifests/web")
        run(m, "echo 'apply web' > ctl")
        run(m, "cat active/web/wait")
        run(m, "cat active/web/update_progress active/web/health")
        counter.start()
        time.sleep(1)
        print(counter.line())

        say("Rolling out v2 while the client keeps asking")
        m.write_manifest("web", manifest("--version v2"))
        run(m, "echo apply > active/web/ctl")
        run(m, "cat active/web/wait")
        run(m, "grep -E 'started|healthy|draining|stopped|complete' active/web/events | tail -n 13")
        print(counter.line())

        say("Pushing a broken v3: it exits at start")
        m.write_manifest("web", manifest("--version v3 --exit-at-start 1"))
        run(m, "echo apply > active/web/ctl")
        run(m, "cat active/web/wait")
        run(m, "cat active/web/update_status active/web/health")
        time.sleep(1)
        print(counter.line())

        say("Rolling back")
        run(m, "echo rollback > active/web/ctl")
        run(m, "cat active/web/wait")
        run(m, "cat active/web/version active/web/previous_version")
        time.sleep(1)
        counter.stop.set()
        counter.join(timeout=10)
        say("Done")
        total = sum(counter.ok.values())
        print(f"{total + counter.failed} requests during the demo: {total} answered, {counter.failed} failed")
        return 0 if counter.failed == 0 else 1
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        return 130
    finally:
        counter.stop.set()
        signal.signal(signal.SIGTERM, previous)
        if m is not None:
            say("Unmounting (SIGTERM: drain and stop every instance)")
            mount.stop(m)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
