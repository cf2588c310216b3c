"""deployfs against PM2 (the process manager Node users pick for zero-downtime reloads), same run.

The app: tests/traffic/apps/server.js, a plain Node HTTP server whose SIGTERM
(and SIGINT, what PM2 sends) handler is `server.close()`; 4 instances;
`wrk -t2 -c16` with keep-alive through a v1 -> v2 update.  Rows: PM2 `reload`
(cluster mode), deployfs with the built-in router and in HAProxy mode
(protocol http, the default for an http:// health check), and the same with
an app that answers 503 for its first 1.5 s.

PM2 comes from the npm registry, installed once under ~/.cache/deployfs-bench;
without node or npm the PM2 rows are skipped with a message.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, mount

sys.path.insert(0, ROOT)
from tests.load import Load, Result, probe  # noqa: E402

APP = os.path.join(ROOT, "tests", "traffic", "apps", "server.js")
PM2_PORT, PORT = 20660, 20661
INSTANCES, WARMUP = 4, 1.5
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "deployfs-bench", "pm2")


def under_load(port: int, action) -> Result:  # type: ignore[no-untyped-def]
    load = Load(f"http://127.0.0.1:{port}/", connections=16)
    time.sleep(1)
    action()
    time.sleep(1)
    return load.stop()


def wait_serving(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not probe(f"http://127.0.0.1:{port}/"):
        if time.monotonic() > deadline:
            raise SystemExit(f"port {port} never served")
        time.sleep(0.1)


def pm2_binary() -> str | None:
    if not shutil.which("node") or not shutil.which("npm"):
        print("PM2 rows skipped: node and npm are needed (apt-get install nodejs npm)")
        return None
    pm2 = os.path.join(CACHE, "node_modules", ".bin", "pm2")
    if not os.path.exists(pm2):
        os.makedirs(CACHE, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", CACHE, "pm2@7"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            print(f"PM2 rows skipped: npm install pm2 failed:\n{r.stderr[-2000:]}")
            return None
    return pm2


def pm2_run(pm2: str, warmup: float) -> Result:
    home = tempfile.mkdtemp(prefix="bench-pm2-")
    env = dict(os.environ, PM2_HOME=home, PORT=str(PM2_PORT), VERSION="v1", WARMUP=str(warmup))

    def pm2_do(*args: str, **extra: str) -> None:
        subprocess.run([pm2, *args], env=dict(env, **extra), check=True, capture_output=True, timeout=120)
    try:
        pm2_do("start", APP, "-i", str(INSTANCES), "--name", "app")
        wait_serving(PM2_PORT)
        time.sleep(warmup)
        return under_load(PM2_PORT, lambda: pm2_do("reload", "app", "--update-env", VERSION="v2"))
    finally:
        subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=60)  # the daemon and its workers
        shutil.rmtree(home, ignore_errors=True)


def manifest(version: str, warmup: float) -> str:
    return (f"image {shutil.which('node')}\nargs {APP}\nenv V={version} WARMUP={warmup}\n"
            f"replicas {INSTANCES}\nport {PORT}\nhealth http://127.0.0.1:$PORT/healthz\n"
            "health_interval 0.2\nhealth_timeout 1\nhealth_retries 2\nupdate_deadline 30\n"
            "drain_timeout 5\nstop_timeout 5\n")


def deployfs_run(router: str, warmup: float) -> Result:
    tmp = tempfile.mkdtemp(prefix="bench-peers-")
    extra = ("--router", "haproxy") if router == "haproxy" else ()
    with mount.running(tmp, *extra) as m:
        m.write_manifest("web", manifest("v1", warmup))
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
        wait_serving(PORT)

        def update() -> None:
            m.write_manifest("web", manifest("v2", warmup))
            assert m.ctl("apply web").returncode == 0
            out = m.sh("cat active/web/wait", timeout=120).stdout
            assert out.startswith("done"), out
        result = under_load(PORT, update)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    if not shutil.which("node"):
        print("bench/peers.py skipped: node is not installed (apt-get install nodejs)")
        return
    pm2 = pm2_binary()
    rows: list[tuple[str, Result | None]] = []
    for warmup, label in ((0.0, "app ready when it listens"), (WARMUP, f"app that needs {WARMUP:g} s to warm up")):
        rows.append((f"PM2 `reload`, {label}", pm2_run(pm2, warmup) if pm2 else None))
        rows.append((f"deployfs, built-in router, {label}", deployfs_run("builtin", warmup)))
        rows.append((f"deployfs, HAProxy mode, {label}", deployfs_run("haproxy", warmup)))
    print(f"bench/peers.py on {machine()}: Node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{INSTANCES} instances, wrk -t2 -c16 keep-alive through a v1 -> v2 update")
    print("| | requests | failed |\n| --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | " + (f"{r.requests:,} | {r.failed:,} |" if r else "skipped | |"))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
