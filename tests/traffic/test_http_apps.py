"""Issue 19: apps nobody here wrote, unmodified, lose no request to keep-alive clients.

Each app only closes its server on SIGTERM (or dies at once: http.server).
With ``protocol http`` (the default for an http:// health check) the router
holds the clients' connections, so wrk (keep-alive) through a rolling update,
a restart and a rollback sees 0 failures, on both traffic paths.
"""

import os
import shutil
import sys
import time

import pytest

from tests import mount as _mount
from tests.load import Load, probe

PORT = 20600
APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
BIN = os.path.dirname(sys.executable)

# name -> (image, args): each listens on $PORT and answers GET / and /healthz with 200
APP = {
    "node": (shutil.which("node") or "node", f"{APPS}/server.js"),
    "gunicorn": (f"{BIN}/gunicorn", f"--bind 127.0.0.1:$PORT --workers 2 --chdir {APPS} wsgi_app:app"),
    "uvicorn": (f"{BIN}/uvicorn", f"--host 127.0.0.1 --port $PORT --app-dir {APPS} --no-access-log asgi_app:app"),
    "http.server": (sys.executable, f"-m http.server --protocol HTTP/1.1 --bind 127.0.0.1 --directory {APPS}/static $PORT"),
}


def manifest(app: str, version: str) -> str:
    image, args = APP[app]
    return (f"image {image}\nargs {args}\nenv V={version}\nreplicas 2\nport {PORT}\n"
            "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\nhealth_timeout 1\nhealth_retries 2\n"
            "update_deadline 10\ndrain_timeout 2\nstop_timeout 5\n" + os.environ.get("XTRA", ""))


@pytest.mark.parametrize("router", ["builtin", "haproxy"])
@pytest.mark.parametrize("app", list(APP))
def test_update_restart_rollback_under_keepalive_load_lose_nothing(tmp_path, app, router):
    if app == "node" and not shutil.which("node"):
        pytest.skip("node is not installed (apt-get install nodejs)")
    extra = ("--router", "haproxy") if router == "haproxy" else ()
    with _mount.running(str(tmp_path), *extra) as m:
        m.write_manifest("web", manifest(app, "1"))
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: probe(f"http://127.0.0.1:{PORT}/"), timeout=10, what="the port to serve")
        load = Load(f"http://127.0.0.1:{PORT}/", connections=16)
        time.sleep(0.3)
        m.write_manifest("web", manifest(app, "2"))
        assert m.ctl("apply web").returncode == 0
        outcomes = [m.sh("cat active/web/wait", timeout=60).stdout]
        assert m.ctl("restart", "web").returncode == 0
        outcomes.append(m.sh("cat active/web/wait", timeout=60).stdout)
        assert m.ctl("rollback", "web").returncode == 0
        outcomes.append(m.sh("cat active/web/wait", timeout=60).stdout)
        time.sleep(0.3)
        result = load.stop()
        print(f"\n{app} via {router}: {result}")
        assert all(o.startswith("done") for o in outcomes), outcomes
        assert result.requests > 500
        assert result.failed == 0, result.output
