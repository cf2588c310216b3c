"""With no healthy instance, an http service answers 503, counts it refused and says so in its events,
as a tcp service resets, counts and says so (a real mount, real instances, a real client)."""

import sys
import urllib.error
import urllib.request

import pytest

from tests import mount as _mount
from tests.mount import SERVICE
from tests.serve.test_metrics import series

PORT = 20520


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_no_healthy_instance_is_counted_and_told(tmp_path, protocol):
    port = PORT + (protocol == "tcp")
    with _mount.running(str(tmp_path)) as m:
        m.write_manifest("web", f"image {sys.executable}\nargs {SERVICE} --port $PORT --fail-health-after 1\n"
                                f"port {port}\nprotocol {protocol}\nhealth http://127.0.0.1:$PORT/healthz\n"
                                "health_interval 0.2\nmin_healthy 0\n")
        assert m.ctl("apply web").returncode == 0
        m.until(lambda: "no healthy instance" in m.read("active/web/events"), what="the event")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)
            raise AssertionError("answered without an instance")
        except urllib.error.HTTPError as e:
            assert protocol == "http" and e.code == 503
        except OSError:
            assert protocol == "tcp"  # reset

        def refused() -> float:
            return sum(v for l, v in series(m.read("metrics"), "deployfs_router_connections_refused_total")
                       if l["service"] == "web")
        m.until(lambda: refused() >= 1, timeout=5, what="the refusal counted")
