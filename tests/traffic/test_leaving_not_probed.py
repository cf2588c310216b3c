"""An instance being stopped is not health-checked: after its stop signal a probe can only
fail, and "unhealthy: ... (2 checks failed)" for an instance on its way out is noise."""

import sys

from tests import mount as _mount

PORT = 20643

# Like many real servers: on SIGTERM it closes its listener at once, then takes a while to exit.
APP = """
import http.server, signal, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", int(__import__("os").environ["PORT"])), H)
s.timeout = 0.05
while not stop:
    s.handle_request()
s.server_close()
time.sleep(2)
"""


def test_a_stopping_instance_is_not_reported_unhealthy(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    with _mount.running(str(tmp_path)) as m:
        m.write_manifest("web", f"image {sys.executable}\nargs {app}\nreplicas 1\nport {PORT}\n"
                         "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\nhealth_timeout 0.5\n"
                         "health_retries 2\ndrain_timeout 1\nstop_timeout 5\n")
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        assert m.ctl("stop web").returncode == 0
        m.until(lambda: "instance 0 stopped" in m.read("active/web/events"), timeout=15, what="the stop")
        events = m.read("active/web/events")
        assert "unhealthy" not in events, events
