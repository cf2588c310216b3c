"""``deploy``: a thin client.  It only reads and writes files under the mount.

Every action is ``echo VERB > active/SERVICE/ctl`` done properly: the ctl file
is opened read-write so that, when the write fails, the reason can be read
back from the same descriptor and printed.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time

EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED = 1, 2, 3
VERBS = ("apply", "pause", "resume", "step", "promote", "abort", "rollback", "restart", "stop")
FOLLOWED = ("apply", "rollback", "restart", "resume", "step", "promote", "abort")  # verbs that start or move a rollout


class DeployError(Exception):
    pass


def is_deployfs(path: str) -> bool:
    """A live deployfs mount at exactly ``path`` (not a plain directory of that name)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        mounts = []
    real = os.path.realpath(path)
    return any(m[0] == real and m[1].endswith("deployfs") for m in mounts) and os.path.isfile(os.path.join(path, "ctl"))


def find_mount(given: str | None) -> str:
    """--mount, then $DEPLOYFS_MOUNT, then ./deploy if it is a deployfs mount (`make run`), then /deploy."""
    if given or os.environ.get("DEPLOYFS_MOUNT"):
        return given or os.environ["DEPLOYFS_MOUNT"]
    return "deploy" if is_deployfs("deploy") else "/deploy"


class Client:
    def __init__(self, mount: str) -> None:
        self.mount = mount
        if not os.path.isfile(os.path.join(mount, "ctl")):
            looked = "" if mount != "/deploy" else " (nor at ./deploy)"
            raise DeployError(f"no deployfs mounted at {mount}{looked}: start one (make run), or pass --mount DIR / "
                       "set DEPLOYFS_MOUNT")

    def path(self, *parts: str) -> str:
        return os.path.join(self.mount, *parts)

    def read(self, *parts: str) -> str:
        try:
            with open(self.path(*parts)) as f:
                return f.read()
        except FileNotFoundError:
            raise DeployError(self._no_such(parts)) from None

    def _no_such(self, parts: tuple[str, ...]) -> str:
        if len(parts) >= 2 and parts[0] == "active":
            if len(parts) == 4 and parts[2] == "logs" and os.path.isdir(self.path(*parts[:3])):
                have = " ".join(log_names(self, parts[1])) or "none"
                return f"service {parts[1]!r} has no instance {parts[3]!r} (logs: {have})"
            return f"no service {parts[1]!r} is deployed"
        return f"no such file: {'/'.join(parts)}"

    def ctl(self, service: str, command: str, *, top: bool = False) -> str:
        try:
            if top:
                raise FileNotFoundError
            fd = os.open(self.path("active", service, "ctl"), os.O_RDWR)
        except FileNotFoundError:
            fd = os.open(self.path("ctl"), os.O_RDWR)  # not deployed yet (or `delete`): the top ctl names it
            verb, _, rest = command.partition(" ")
            command = f"{verb} {service} {rest}".rstrip()
        try:
            try:
                os.write(fd, (command + "\n").encode())
            except OSError as e:
                reply = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                raise DeployError(reply.removeprefix("error: ") or os.strerror(e.errno or errno.EIO)) from None
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)


# -- verbs -------------------------------------------------------------------------------

def follow(c: Client, service: str, *, out=sys.stdout) -> int:
    """Show a rollout's progress until it ends; exit status says how it ended."""
    tty = out.isatty()
    last = ""

    def show() -> None:
        nonlocal last
        status = c.read("active", service, "update_status").strip()
        progress = c.read("active", service, "update_progress").strip()
        health = c.read("active", service, "health").strip()
        line = f"{service}: {status} {progress} health={health}"
        if line != last:
            out.write(("\r\x1b[K" + line) if tty else line + "\n")
            out.flush()
            last = line

    while c.read("active", service, "update_status").strip() == "rolling":
        show()
        time.sleep(0.2)
    if c.read("active", service, "update_status").strip() == "canary":
        show()  # the canaries are starting: `wait` answers once they are up (or failed)
    # `wait` blocks until the batch in hand is done: a `step` (or a pause) still
    # moves while update_status already reads "paused", so show where it ended.
    outcome = c.read("active", service, "wait").strip()
    show()
    if tty:
        out.write("\n")
    print(outcome, file=out)
    if outcome == "canary":
        print(canary_hint(c, service), file=out)
    if outcome.startswith("failed"):
        return EXIT_FAILED
    return EXIT_PAUSED if outcome == "paused" else 0


def canary_hint(c: Client, service: str) -> str:
    """What a held canary is, and the two ways on from it."""
    version = c.read("active", service, "version").strip()
    weight = ""
    for line in c.read("active", service, "manifest").splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["canary_weight"] and len(words) == 2:
            weight = f", getting {words[1]}% of requests"
    new = 0
    for slot in os.listdir(c.path("active", service, "instances")):
        try:
            new += f"version={version} " in c.read("active", service, "instances", slot)
        except DeployError:
            pass  # gone between the listing and the read
    lines = [f"canary: {new} instance{'s' if new != 1 else ''} of {version} beside the old set{weight}.",
             "Look at it (deploy logs, deploy events), then either:",
             f"  deploy promote {service}     roll out the rest the rolling way",
             f"  deploy rollback {service}    stop the canaries; the old set stays exactly as it is"]
    return "\n".join(lines)


def status_table(c: Client) -> str:
    rows = [("SERVICE", "VERSION", "UPDATE", "PROGRESS", "HEALTH", "REPLICAS")]
    for name in sorted(os.listdir(c.path("active"))):
        try:
            text = c.read("active", name, "status")
        except DeployError:
            continue  # deleted since the listing
        s = {k: v for k, _, v in (l.partition(" ") for l in text.splitlines())}
        rows.append((name, s.get("version", ""), s.get("update_status", ""), s.get("update_progress", ""),
                     s.get("health", ""), s.get("replicas", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def nodes_table(c: Client) -> str:
    """nodes/<name> as a table: `address=… state=… instances=N leads=a,b seen=T` per node."""
    rows = [("NODE", "ADDRESS", "STATE", "INSTANCES", "LEADS", "SEEN")]
    for name in sorted(os.listdir(c.path("nodes"))):
        try:
            text = c.read("nodes", name)
        except DeployError:
            continue  # gone since the listing
        n = dict(w.partition("=")[::2] for w in text.split())
        rows.append((name, n.get("address", ""), n.get("state", ""), n.get("instances", ""),
                     n.get("leads", "") or "-", n.get("seen", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def node_state(c: Client, node: str) -> str:
    for word in c.read("nodes", node).split():
        if word.startswith("state="):
            return word[len("state="):]
    return ""


def fresh_text(seen: str, now: str) -> str:
    """What a growing (possibly rotated or trimmed) text shows that was not seen yet."""
    if now.startswith(seen):
        return now[len(seen):]
    # rotated or trimmed: the lines after the last one we showed
    tail = seen.splitlines(keepends=True)[-1:] or [""]
    idx = now.rfind(tail[0]) if tail[0] else -1
    return now[idx + len(tail[0]):] if idx >= 0 else now


def log_names(c: Client, service: str) -> list[str]:
    """logs/: the slots in order, then the kept ones (failed-3, stopped-0)."""
    try:
        names = os.listdir(c.path("active", service, "logs"))
    except FileNotFoundError:
        raise DeployError(f"no service {service!r} is deployed") from None
    return sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))


def logs(c: Client, target: str) -> str:
    service, _, slot = target.partition("/")
    if slot:
        return c.read("active", service, "logs", slot)
    return "".join(f"[{service}/{s}] {line}\n" for s in log_names(c, service)
                   for line in c.read("active", service, "logs", s).splitlines())


def follow_logs(c: Client, target: str, interval: float = 0.5, out=sys.stdout) -> None:
    """Like tail -f over every instance's log, following each instance, not its slot.

    A log's inode number belongs to the instance (slots renumber after a
    rollout), so what was printed under `web/3` is not printed again as `web/0`.
    """
    service, _, slot = target.partition("/")
    seen: dict[int, str] = {}  # inode -> the text shown so far
    while True:
        current: dict[int, str] = {}
        for name in [slot] if slot else log_names(c, service):
            path = c.path("active", service, "logs", name)
            try:
                with open(path, errors="replace") as f:
                    ino, now = os.fstat(f.fileno()).st_ino, f.read()
                now = now[: now.rfind("\n") + 1]  # whole lines only: the rest comes next time
            except FileNotFoundError:
                if slot:
                    raise DeployError(f"no log {service}/{slot}") from None
                continue  # gone between the listing and the open
            fresh = fresh_text(seen.get(ino, ""), now)
            prefix = "" if slot else f"[{service}/{name}] "
            out.write("".join(f"{prefix}{line}\n" for line in fresh.splitlines()))
            current[ino] = now
        out.flush()
        seen = current
        time.sleep(interval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deploy", description="Drive deployfs through its files. Finds the mount from --mount, "
        "then $DEPLOYFS_MOUNT, then ./deploy if that is a deployfs mount (make run), then /deploy.",
        epilog="exit status: 0 ok, 1 failed (the reason is printed), 2 usage, 3 rollout paused")
    p.add_argument("--mount", help="the deployfs mount point")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    a = sub.add_parser("apply", help="apply manifests/SERVICE: deploy, scale, or roll out a new version, and follow it")
    a.add_argument("service")
    a.add_argument("--detach", action="store_true", help="return at once instead of following the rollout")
    for verb, text in [("pause", "hold a rollout at the next batch boundary"), ("resume", "continue a paused rollout"),
                       ("step", "while paused: advance one batch, then pause again"),
                       ("promote", "during a canary: roll out the rest the rolling way"),
                       ("abort", "stop a rollout in flight (a canary, say) and return to the last good version"),
                       ("rollback", "roll out the previous manifest (version and previous_version swap)"),
                       ("restart", "replace every instance with a fresh one of the same version, rolling"),
                       ("stop", "drain and stop every instance; the service stays listed")]:
        v = sub.add_parser(verb, help=text)
        v.add_argument("service")
        if verb in FOLLOWED:
            v.add_argument("--detach", action="store_true", help="return at once instead of following")
    s = sub.add_parser("status", help="one service's status, or a table of all")
    s.add_argument("service", nargs="?")
    sc = sub.add_parser("scale", help="set the desired instance count (also rewrites the manifest's replicas line)")
    sc.add_argument("service")
    sc.add_argument("n")
    e = sub.add_parser("events", help="a service's event history, or without SERVICE the cluster-wide one "
                       "(deletions, router trouble)")
    e.add_argument("service", nargs="?")
    e.add_argument("-f", "--follow", action="store_true", help="keep following new events (tail -F)")
    lg = sub.add_parser("logs", help="instance output: SERVICE (all instances) or SERVICE/SLOT")
    lg.add_argument("target", metavar="SERVICE[/SLOT]")
    lg.add_argument("-f", "--follow", action="store_true", help="keep following new output")
    d = sub.add_parser("delete", help="drain and stop every instance, release the port, remove active/SERVICE "
                       "(manifests/SERVICE stays)")
    d.add_argument("service")
    d.add_argument("--detach", action="store_true", help="return at once instead of waiting until it is gone")
    sub.add_parser("nodes", help="the nodes: address, state (ready, cordoned, draining, down), instances, leads")
    for verb, text in [("cordon", "place no new instances on NODE (those there keep running)"),
                       ("uncordon", "let NODE take new instances again (and stop a drain)"),
                       ("drain", "cordon NODE, then move its instances elsewhere the way a rollout does")]:
        v = sub.add_parser(verb, help=text)
        v.add_argument("node")
        if verb == "drain":
            v.add_argument("--detach", action="store_true", help="return at once instead of waiting until it is drained")
    ed = sub.add_parser("edit", help="open manifests/SERVICE in $EDITOR")
    ed.add_argument("service")
    return p


def run(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    c = Client(find_mount(a.mount))
    verb = a.verb
    if verb in VERBS:
        reply = c.ctl(a.service, verb)
        if verb in FOLLOWED and not a.detach:
            if reply.startswith("ok unchanged"):
                print(reply)
                return 0
            return follow(c, a.service)
        print(reply)
    elif verb == "scale":
        print(c.ctl(a.service, f"scale {a.n}"))
    elif verb == "delete":
        print(c.ctl(a.service, "delete", top=True))
        if not a.detach:
            while os.path.exists(c.path("active", a.service)):  # drains first: as long as drain_timeout
                time.sleep(0.1)
            print(f"deleted {a.service}")
    elif verb == "nodes":
        sys.stdout.write(nodes_table(c))
    elif verb in ("cordon", "uncordon", "drain"):
        print(c.ctl(a.node, verb, top=True))
        if verb == "drain" and not a.detach:
            while node_state(c, a.node) == "draining":  # each service moves batch by batch: see its events
                time.sleep(0.2)
            print(f"node {a.node}: {node_state(c, a.node)}")
    elif verb == "status":
        sys.stdout.write(c.read("active", a.service, "status") if a.service else status_table(c))
    elif verb == "events":
        parts = ("active", a.service, "events") if a.service else ("events",)
        if not os.path.exists(c.path(*parts)):
            raise DeployError(f"no service {a.service!r} is deployed")
        if a.follow:
            os.execvp("tail", ["tail", "-n", "+1", "-F", c.path(*parts)])
        sys.stdout.write(c.read(*parts))
    elif verb == "logs":
        if a.follow:
            follow_logs(c, a.target)
        sys.stdout.write(logs(c, a.target))
    elif verb == "edit":
        path = c.path("manifests", a.service)
        before = _contents(path)
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        rc = subprocess.call([*editor.split(), path])
        if rc != 0:
            return rc
        after = _contents(path)
        if after is None:
            raise DeployError(f"nothing saved: there is no {path} (the editor wrote no file)")
        if after == before:
            print(f"no change to {path}")
        else:
            print(f"saved {path}; roll it out with: deploy apply {a.service}")
    return 0


def _contents(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(argv))
    except DeployError as e:
        print(f"deploy: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
