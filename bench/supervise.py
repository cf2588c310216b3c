"""Supervision cost: 200 services x 5 instances of a cheap process, health checks at 1 s.

Reports the server's steady-state CPU share (of one core) and RSS, in total and
per instance, then the same while --metrics is scraped every SCRAPE seconds
(default 5; Prometheus' own default is 15), and the server CPU one scrape
costs.  Target: 1,000 instances under 5% of a core and 200 MB, scraped or not.
"""

import os
import tempfile
import time
import urllib.request

from common import machine, mount, wait_for

SERVICES, REPLICAS, SECONDS = int(os.environ.get("SERVICES", 200)), 5, float(os.environ.get("SECONDS", 30))
SCRAPE = float(os.environ.get("SCRAPE", 5))
METRICS = "127.0.0.1:20590"
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench-sup-")
    ready = os.path.join(tmp, "ready")
    with open(ready, "w") as f:
        f.write("ok\n")
    m = mount.start(tmp, "--metrics", METRICS)
    try:
        t0 = time.monotonic()
        for i in range(SERVICES):
            m.write_manifest(f"s{i}", f"image sleep\nargs 3600\nreplicas {REPLICAS}\nhealth {ready}\n"
                                      "health_interval 1\nhealth_timeout 0.5\n")
        m.sh("for i in $(seq 0 %d); do echo \"apply s$i\" > ctl; done" % (SERVICES - 1), timeout=300, check=True)

        def all_up() -> bool:
            out = m.sh("cat active/*/update_status", timeout=60).stdout.split()
            return len(out) == SERVICES and set(out) == {"none"}
        wait_for(all_up, timeout=600, what="all instances healthy")
        started = time.monotonic() - t0
        time.sleep(5)  # settle
        pid = m.proc.pid
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(SECONDS)
        c1, w1 = cpu_seconds(pid), time.monotonic()
        share = (c1 - c0) / (w1 - w0)
        rss = rss_mb(pid)
        n = SERVICES * REPLICAS
        # The same, scraped: each scrape costs formatting, and at most every 5 s a pass over /proc.
        scrapes, took, size = 0, 0.0, 0
        c0, w0 = cpu_seconds(pid), time.monotonic()
        while time.monotonic() - w0 < SECONDS:
            t = time.monotonic()
            with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10) as r:
                size = len(r.read())
            took += time.monotonic() - t
            scrapes += 1
            time.sleep(max(0.0, t + SCRAPE - time.monotonic()))
        c1, w1 = cpu_seconds(pid), time.monotonic()
        scraped = (c1 - c0) / (w1 - w0)
        rss_scraped = rss_mb(pid)
    finally:
        t = time.monotonic()
        mount.stop(m, timeout=300)
        stopped = time.monotonic() - t
    print(f"bench/supervise.py on {machine()}")
    print(f"{n} instances ({SERVICES} services x {REPLICAS}), file health check every 1 s")
    print(f"deployed and healthy in {started:.1f} s; stopped in {stopped:.1f} s")
    print(f"server CPU at steady state: {share * 100:.2f}% of one core ({share / n * 1e6:.1f} µs/s per instance)")
    print(f"server RSS: {rss:.0f} MB ({rss * 1024 / n:.0f} KB per instance)")
    per_scrape = max(0.0, scraped - share) * SECONDS / scrapes
    print(f"scraped every {SCRAPE:g} s ({scrapes} scrapes of {size / 1024:.0f} KiB, {took / scrapes * 1000:.0f} ms "
          f"each): {scraped * 100:.2f}% of one core, RSS {rss_scraped:.0f} MB; "
          f"~{per_scrape * 1000:.0f} ms of server CPU per scrape")
    worst = max(share, scraped)
    print(f"targets: < 5% of a core: {'met' if worst < 0.05 else 'MISSED'}; "
          f"< 200 MB: {'met' if max(rss, rss_scraped) < 200 else 'MISSED'}")


if __name__ == "__main__":
    main()
