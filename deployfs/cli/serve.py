"""``deployfs serve MOUNTPOINT --state DIR``: the server, in the foreground."""

from __future__ import annotations

import argparse
import errno
import grp
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__

if TYPE_CHECKING:
    from ..node.logserver import LogServer
    from ..node.membership import Membership
    from ..node.identity import UserPolicy

log = logging.getLogger("deployfs")

DEFAULT_NODE_TTL = 10
DEFAULT_LOG_PORT = 7390  # a node's log server (node/logserver.py): --log-port


class SetupError(Exception):
    """A problem a newcomer can fix; printed as one line."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="deployfs", description="A deployment server whose interface is a filesystem.")
    p.add_argument("--version", action="version", version=f"deployfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="mount the namespace and run the engine (foreground)")
    s.add_argument("mountpoint", nargs="?", help="where to mount the namespace (not with --no-mount)")
    s.add_argument("--state", required=True, help="state directory (SQLite database, instance logs)")
    s.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    s.add_argument("--group", help="members of this group may also write ctl files and manifests")
    s.add_argument("--keep-instances", action="store_true",
                   help="on SIGTERM/SIGINT leave instances running (the next start adopts them)")
    s.add_argument("--ports", type=_ports, default="24000-31999", metavar="LOW-HIGH",
                   help="range of private instance ports (default 24000-31999, below the kernel's ephemeral range)")
    s.add_argument("--router", choices=["builtin", "haproxy"], default="builtin",
                   help="the traffic path: the built-in router (default) or an haproxy that deployfs owns")
    s.add_argument("--bind", default=None, help="address the router listens on for service ports (default "
                   "127.0.0.1; with --cluster, --address: other machines reach the service there)")
    s.add_argument("--balance", choices=["roundrobin", "leastconn"], default="roundrobin",
                   help="how the router picks a healthy instance (default roundrobin)")
    s.add_argument("--max-conns", type=int, default=0, metavar="N",
                   help="client connections one service may hold at once in the router (default: a quarter of "
                        "the router's file descriptors); more are refused, so one flood cannot starve the others")
    s.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="close a routed connection with no traffic either way for this long (default 300; 0: never)")
    s.add_argument("--events-max-bytes", type=int, default=1024 * 1024,
                   help="rotate a service's events file into events.1 at this size (default 1 MiB)")
    s.add_argument("--metrics", type=_address, metavar="HOST:PORT",
                   help="also serve /deploy/metrics (Prometheus text) at http://HOST:PORT/metrics")
    s.add_argument("--cluster", type=_cluster_urls, metavar="URLS",
                   help="join a cluster: its etcd members' client URLs, comma-separated (http://H1:2379,...); "
                        "docs/cluster.md says what works yet")
    s.add_argument("--node", metavar="NAME",
                   help="this node's name (/deploy/nodes/NAME), unique in a cluster (default: the host name)")
    s.add_argument("--address", metavar="IP",
                   help="where this node's instances listen ($ADDRESS) and are reached (default: 127.0.0.1 on "
                        "one machine, the host name's address with --cluster)")
    s.add_argument("--log-port", type=_log_port, metavar="PORT",
                   help=f"with --cluster: serve this node's instances' output to the other nodes (logs/N) on "
                        f"--address and this port (default {DEFAULT_LOG_PORT}; 0: not at all); cluster members "
                        "only: firewall it like etcd's ports (docs/cluster.md)")
    s.add_argument("--routing", choices=["every", "leader"], default=None,
                   help="with --cluster: which routers the controller feeds: every node's, each following the "
                        "routing table it publishes in the records (default), or only its own node's "
                        "(docs/cluster.md, \"Routing\")")
    s.add_argument("--node-ttl", type=_node_ttl, metavar="SECONDS",
                   help="how long a silent node keeps its name and lease (whole seconds, >= 2; default 10)")
    s.add_argument("--default-user", metavar="NAME",
                   help="run instances whose manifest names no user as this user (default: as deployfs itself, "
                        "which only root may then deploy)")
    s.add_argument("--allow-users", metavar="A,B", default="",
                   help="users a deployer who is not root may name in `user` (besides itself); never root")
    s.add_argument("--9p", dest="ninep", metavar="tcp!HOST!PORT|unix!PATH",
                   help="also serve the namespace over 9P2000.L there (docs/ninep.md)")
    s.add_argument("--no-mount", action="store_true", help="serve over 9P only: no FUSE mount (needs --9p)")
    s.add_argument("--debug", action="store_true", help="log one line per FUSE (and 9P) operation")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="deployfs: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):  # one line per health probe otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if a.max_conns < 0 or not a.idle_timeout >= 0:
            raise SetupError("--max-conns and --idle-timeout want a number >= 0")
        ports = a.ports
        group = None if a.group is None else _group(a.group)
        check_cluster(a)
        a.users = user_policy(a.default_user, a.allow_users)
        if a.ninep is not None:
            from ..serve.ninep.server import Address, AddressError
            try:
                a.ninep = Address.parse(a.ninep)
            except AddressError as e:
                raise SetupError(str(e)) from None
        if a.no_mount:
            if a.ninep is None:
                raise SetupError("--no-mount serves nothing without --9p tcp!HOST!PORT or --9p unix!PATH")
            if a.mountpoint is not None:
                raise SetupError("--no-mount takes no mountpoint")
        elif a.mountpoint is None:
            raise SetupError("a mountpoint is needed (or --no-mount with --9p)")
        else:
            check_mountpoint(a.mountpoint)
        a.state = check_state(a.state)  # resolved: never walk a link in its path again
        a.state_lock = lock_state(a.state)  # before the database, the router or the cluster is touched
        if a.cluster:
            from ..state.statedir import CLUSTER_NAME, open_file
            with open_file(os.path.join(a.state, CLUSTER_NAME), "wb") as f:
                f.write(f"{','.join(a.cluster)}\n".encode())
        if group is not None and not a.allow_other and not a.no_mount:
            # The kernel refuses every other uid at the mount itself, before deployfs sees the group.
            log.warning("--group %s without --allow-other: the kernel lets no user but deployfs's own into the "
                        "mount, so members of %s get Permission denied on all of it (add --allow-other)",
                        a.group, a.group)
        from ..node.runtime import ephemeral_overlap
        if overlap := ephemeral_overlap(ports):
            log.warning("--ports %d-%d overlaps the kernel's ephemeral ports (%d-%d): an outgoing connection may "
                        "take an instance's port before it binds", *ports, *overlap)
        trio.run(serve, a, ports, group)
    except SetupError as e:
        print(f"deployfs: {e}", file=sys.stderr)
        sys.exit(2)


def _ports(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        ports = (int(lo), int(hi))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants LOW-HIGH, got {text!r}") from None
    if not 1 <= ports[0] <= ports[1] <= 65535:
        raise argparse.ArgumentTypeError(f"wants LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got {text!r}")
    return ports


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [::1]:9464
        host = host[1:-1]
    elif ":" in host:  # ::1:9464 or 127.0.0.1:9464:1: which colon ends the host is a guess
        raise argparse.ArgumentTypeError(f"wants HOST:PORT, an IPv6 HOST in brackets ([::1]:9464), got {text!r}")
    if sep and not host and port.isdigit():  # Prometheus's own ":9090"; all interfaces is never implied
        raise argparse.ArgumentTypeError(f"wants a HOST too: 127.0.0.1{text} (this host only) or "
                                         f"0.0.0.0{text} (every interface), got {text!r}")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"wants HOST:PORT (e.g. 127.0.0.1:9464), got {text!r}")
    return host, int(port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _cluster_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("wants the etcd members' client URLs, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379")
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{url!r}: {e}") from None
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username:
            raise argparse.ArgumentTypeError(
                f"{url!r} is not an etcd client URL of the form http://HOST:PORT (TLS is not supported yet)")
    return urls


def _log_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"wants a port, 0-65535 (0: serve no logs), got {text!r}")
    return int(text)


def _node_ttl(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants whole seconds, got {text!r}") from None
    if ttl < 2:
        raise argparse.ArgumentTypeError(f"wants at least 2 seconds (etcd's shortest lease), got {ttl}")
    return ttl


def check_cluster(a: argparse.Namespace) -> None:
    """Validate --node, --address, --cluster and --node-ttl, filling in their defaults."""
    from ..model.cluster import valid_node_name
    if not a.cluster and a.node_ttl is not None:
        raise SetupError("--node-ttl only makes sense with --cluster (the etcd members' URLs)")
    if not a.cluster and a.log_port is not None:
        raise SetupError("--log-port only makes sense with --cluster (one machine reads its logs from its own disk)")
    if a.log_port is None:
        a.log_port = DEFAULT_LOG_PORT if a.cluster else 0
    if not a.cluster and a.routing is not None:
        raise SetupError("--routing only makes sense with --cluster (one machine has one router, fed directly)")
    if a.routing is None:
        a.routing = "every" if a.cluster else "leader"
    if a.node is None:
        a.node = socket.gethostname().split(".")[0]
        if not a.cluster and not valid_node_name(a.node):
            a.node = "local"  # one machine: a host name no node may have must not stop the server
    if not valid_node_name(a.node):
        raise SetupError(f"--node {a.node!r}: a node name is 1-63 letters, digits, '.', '_' or '-', "
                         "starting and ending with a letter or digit")
    if a.address is None and not a.cluster:
        a.address = "127.0.0.1"  # one machine: instances listen on loopback, as they always did
    if a.address is None:
        try:
            a.address = socket.gethostbyname(socket.gethostname())
        except OSError as e:
            raise SetupError(f"cannot find this host's address ({socket.gethostname()}: {e}): give --address IP") from None
    try:
        ipaddress.ip_address(a.address)
    except ValueError:
        raise SetupError(f"--address {a.address!r} is not an IP address (where this node's instances are reached)") from None
    if a.bind is None:
        a.bind = a.address if a.cluster else "127.0.0.1"
    if a.cluster and ipaddress.ip_address(a.address).is_loopback:
        log.warning("--address %s is a loopback address: other machines cannot reach this node's instances or "
                    "router; give --address the address they reach this machine at (one machine: fine)", a.address)
    if a.node_ttl is None:
        a.node_ttl = DEFAULT_NODE_TTL


def _group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SetupError(f"no group named {name!r}") from None


def user_policy(default_user: str | None, allow_users: str) -> "UserPolicy":
    """--default-user and --allow-users, checked now: a typo must not surface at the first deploy."""
    from ..node.identity import IdentityError, UserPolicy, resolve
    allowed = frozenset(u for u in allow_users.split(",") if u)
    try:
        for name in ([default_user] if default_user else []) + sorted(allowed):
            ident = resolve(name)
            if name in allowed and ident.uid == 0:
                raise SetupError(f"--allow-users: {name} is root; only root may deploy instances that run as root")
            if name == default_user and ident.uid == 0:
                # It would refuse every non-root deployer's manifest without a user ("would run as root"),
                # and run root's as root, which is what no --default-user already does.
                raise SetupError(f"--default-user: {name} is root (uid 0); name an unprivileged user, or leave it "
                                 "out (then instances without a user run as deployfs itself, and only root may "
                                 "deploy them)")
            if os.geteuid() != 0 and ident.uid != os.geteuid():
                raise SetupError(f"{name}: deployfs is not running as root, so it can run instances only as itself")
    except IdentityError as e:
        raise SetupError(f"--default-user/--allow-users: {e.reason}") from None
    return UserPolicy(default_user, allowed)


def check_mountpoint(mnt: str) -> None:
    if not os.path.exists("/dev/fuse"):
        raise SetupError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    if _dead_mount(mnt):
        log.info("cleaning up the dead mount left at %s", mnt)
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
    if not os.path.lexists(mnt):
        raise SetupError(f"mountpoint {mnt} does not exist: create it with  mkdir -p {mnt}")
    if not os.path.isdir(mnt):
        raise SetupError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt):
        raise SetupError(f"{mnt} is already mounted (another deployfs?): unmount it with  fusermount3 -u {mnt}")
    if os.listdir(mnt):
        raise SetupError(f"mountpoint {mnt} is not empty: use an empty directory")


def check_state(state: str) -> str:
    """Trust the state directory only if nobody else could have written it; its resolved path."""
    from ..state.statedir import StateDirError, prepare
    try:
        return prepare(state)
    except StateDirError as e:
        raise SetupError(str(e)) from None
    except OSError as e:
        raise SetupError(f"--state {state}: {e.strerror or e}") from None


def lock_state(state: str) -> int:
    from ..state.statedir import StateDirError, lock
    try:
        return lock(state)
    except StateDirError as e:
        raise SetupError(str(e)) from None
    except OSError as e:
        raise SetupError(f"--state {state}: cannot lock {e.filename}: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _dead_mount(mnt: str) -> bool:
    """A deployfs mount whose server died: it answers ENOTCONN (stat may still be served from
    cache: list it).  Another file system's dead mount is not ours to unmount."""
    try:
        os.listdir(mnt)
    except OSError as e:
        return e.errno == errno.ENOTCONN and _mount_type(mnt) == "fuse.deployfs"
    return False


def _mount_type(mnt: str) -> str | None:
    path = os.path.realpath(mnt)  # realpath keeps the last component when it cannot be stat'ed
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):  # the topmost mount on a path is listed last
        fields = line.split(" ")
        if len(fields) > 2 and _unescape(fields[1]) == path:
            return fields[2]
    return None


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in a path as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


async def serve(a: argparse.Namespace, ports: tuple[int, int], group: int | None) -> None:
    if not a.cluster:
        await _serve(a, ports, group, None)
        return
    from ..node.membership import Membership, NameTaken
    from ..state.etcdkv import Unavailable, open_etcd
    from ..state.kv import StoreError

    logs = None
    if a.log_port:  # bound before joining: a refused port leaves nothing behind
        from ..node.logserver import LogServer
        logs = LogServer(os.path.join(a.state, "logs"), a.address, a.log_port)
        try:
            await logs.listen()
        except OSError as e:
            raise SetupError(f"--log-port {a.log_port} on {a.address}: {e.strerror or e}") from None
    async with open_etcd(a.cluster) as kv:
        member = Membership(kv, a.node, a.address, a.node_ttl, log_port=a.log_port,
                            lease_file=os.path.join(a.state, "cluster-lease"))
        try:
            await member.join()
        except NameTaken as e:
            raise SetupError(e.message) from None
        except Unavailable as e:
            raise SetupError(f"--cluster {','.join(a.cluster)}: {e}") from None
        log.info("node %s (%s) %s the cluster at %s (lease TTL %d s)", a.node, a.address,
                 "is back in" if member.adopted else "joined", ",".join(a.cluster), a.node_ttl)
        try:
            await _serve(a, ports, group, member, kv, logs)
        finally:
            if not a.keep_instances:  # kept instances still run here: keep the name (a restart takes it back)
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    try:
                        await member.leave()
                    except StoreError as e:
                        log.warning("node %s: could not leave the cluster (its lease runs out by itself): %s",
                                    a.node, e)


async def _serve(a: argparse.Namespace, ports: tuple[int, int], group: int | None, member: Membership | None,
                 kv: Any = None, logs: LogServer | None = None) -> None:
    import pyfuse3

    from ..state.events import CLUSTER, EventLog
    from ..serve.cluster import ClusterNode
    from ..serve.local import LocalNode, local_source
    from ..serve.fuse import Access, DeployFS
    from ..view.namespace import Namespace
    from ..traffic.haproxy import HAProxyRouter
    from ..node.health import Probes
    from ..traffic.other_mode import stop_other_router
    from ..traffic.router_client import RouterClient, RouterError
    from ..state.events import CLUSTER
    from ..node.runtime import LocalRuntime
    from ..state.logclient import RemoteLogs
    from ..state.store import SqliteStore, StoreError

    store: SqliteStore | None = None
    if member is None:
        try:
            store = SqliteStore(a.state)
        except StoreError as e:
            raise SetupError(str(e)) from None
        if store.full:
            log.warning("starting in degraded mode: %s. Supervision runs; commands and manifest changes are "
                        "refused (ENOSPC) until there is room, and every service's events say so", store.full)
    probes = Probes()
    router_class = HAProxyRouter if a.router == "haproxy" else RouterClient
    said: list[EventLog] = []
    router = router_class(a.state, bind=a.bind, balance=a.balance, max_conns=a.max_conns, idle_timeout=a.idle_timeout,
                          on_error=lambda service, msg: said[0].emit(service, f"router: {msg}"))
    runtime = LocalRuntime(a.state, ports=ports)
    log.info("cgroups: %s", runtime.cgroups.layout.describe())
    here: LocalNode | ClusterNode
    remote_logs: RemoteLogs | None = None  # one machine has no other node
    if store is not None:
        events = EventLog(store, segment_bytes=a.events_max_bytes)
        # The controller and this node's agent: one process runs both, meeting only in the store.
        here = LocalNode(store, runtime, probes, state_dir=a.state, users=a.users, events=events, router=router,
                         node=a.node, address=a.address)
        metrics = here.metrics()
        source, cache = local_source(here, metrics)  # the records, through a cache fed by the store's watch
    else:
        assert member is not None
        # Every node its agent, view and router; the one holding the lead runs the controller too.
        here = ClusterNode(kv, member, runtime, probes, router=router, state_dir=a.state, users=a.users,
                           segment_bytes=a.events_max_bytes, published=a.routing == "every")
        events = here.events
        metrics = here.metrics()
        # Other nodes' instances' output is read from them (their log servers: node/logserver.py).
        remote_logs = RemoteLogs()
        source, cache = here.source(metrics, logs=runtime.log_parts, remote_logs=remote_logs), here.cache
    said.append(events)
    view = Namespace(source, Access(group=group))  # one view, whichever front ends serve it
    ops = DeployFS(view, debug=a.debug)
    ninep = None
    if a.ninep is not None:  # bound before anything starts: a refused address leaves nothing running
        from ..serve.ninep.server import AddressError, NinepServer
        ninep = NinepServer(view, a.ninep, debug=a.debug)
        try:
            await ninep.listen()
        except AddressError as e:
            raise SetupError(str(e)) from None
        if a.ninep.kind == "tcp" and not _loopback(a.ninep.host):
            warning = (f"9P on {ninep.bound} is reachable from other hosts, and over TCP a client is whoever "
                       "its attach says (root included): use unix!PATH, or a firewall (docs/ninep.md)")
            log.warning(warning)
            events.emit(CLUSTER, f"warning: {warning}")
    stop_metrics = None  # before the router starts: a refused address must leave nothing running
    if a.metrics:
        try:
            stop_metrics = metrics.serve(*a.metrics)
        except OSError as e:
            raise SetupError(f"--metrics {a.metrics[0]}:{a.metrics[1]}: {e.strerror or e}") from None
        log.info("metrics at http://%s:%d/metrics", _url_host(a.metrics[0]), a.metrics[1])
    # Before the router starts: the other mode's router, left by a killed server, holds the ports.
    if note := await stop_other_router(a.state, a.router):
        events.emit(CLUSTER, f"router: {note}")
        log.warning("router: %s", note)
    try:
        await router.start()
    except RouterError as e:
        raise SetupError(str(e)) from None
    # Not a path (a bare "deployfs" showed as cwd/deployfs in mount listings): which state it serves.
    fsname = f"deployfs:{a.state}" if "," not in a.state and "\\" not in a.state else "deployfs:"
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=deployfs"}
    if a.allow_other:
        options.add("allow_other")
    if not a.no_mount:
        try:
            pyfuse3.init(ops, a.mountpoint, options)
        except RuntimeError as e:
            raise SetupError(f"cannot mount {a.mountpoint}: {e} (are you allowed to use FUSE? try as root, "
                             "or add user_allow_other to /etc/fuse.conf for --allow-other)") from None
        ops.mounted = True
    where = ([] if a.no_mount else [a.mountpoint]) + ([] if ninep is None else [f"9P on {ninep.bound}"])
    log.info("deployfs %s serving %s (state in %s)", __version__, " and ".join(where), a.state)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(router.run)
            if store is not None:
                await nursery.start(cache.run)
            await nursery.start(here.run)
            if member is not None:
                nursery.start_soon(member.run)  # keeps the lease alive
            if logs is not None:
                await nursery.start(logs.run)
            if ninep is not None:
                await nursery.start(ninep.run)

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for sig in signals:
                        break
                # The receiver gives the default action back when it closes: a second Ctrl-C or
                # SIGTERM while draining would kill the server mid-shutdown and leave a dead mount.
                # Stopping is already under way; SIGKILL remains the way to cut it short.
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_IGN)
                log.info("%s: %s", signal.Signals(sig).name,
                         "leaving instances running" if a.keep_instances else "draining and stopping instances")
                ops.closing = True  # wake blocked `wait` readers
                if ninep is not None:
                    await ninep.close()  # and answer those over 9P (EIO), before connections close
                await here.shutdown(keep_instances=a.keep_instances)
                if not a.keep_instances:
                    await router.quit()  # kept instances stay routed
                if a.no_mount:
                    nursery.cancel_scope.cancel()
                else:
                    pyfuse3.terminate()

            nursery.start_soon(on_signal)
            if not a.no_mount:
                await pyfuse3.main(min_tasks=1, max_tasks=1000)
                nursery.cancel_scope.cancel()
    finally:
        if stop_metrics is not None:
            stop_metrics()
        if ops.mounted:
            ops.mounted = False
            pyfuse3.close(unmount=True)
        await probes.aclose()
        if remote_logs is not None:
            await remote_logs.aclose()
        if store is not None:
            store.close()
        log.info("stopped" if a.no_mount else f"unmounted {a.mountpoint}")
