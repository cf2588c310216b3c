"""Service manifests: parse, validate, render, hash.  Pure: no I/O.

A manifest is a flat list of ``directive value`` lines.  Values are split the
way a shell splits words (quotes work, ``#`` at the start of a word begins a
comment) but never run through a shell.  Every directive is validated here so
that the engine only ever sees a well-formed :class:`Manifest`.

The *version* of a manifest is a hash of what defines an instance (the
"instance template"): changing only ``replicas`` or an ``update_*`` knob
scales or re-tunes a rollout, it does not make a new version.  The hash is
taken over a canonical JSON form, so comments, spacing and directive order
never change it.

The parser is total: any bytes yield a Manifest or a ManifestError, never
another exception (a property test holds us to that).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Mapping

from .cluster import valid_node_name

MAX_MANIFEST_BYTES = 64 * 1024
MAX_LINE_BYTES = 4 * 1024
MAX_REPLICAS = 1000
MAX_SECONDS = 7 * 24 * 3600
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHOLE_RE = re.compile(r"[0-9]{1,12}")
_SECONDS_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_EXPAND_RE = re.compile(r"\$(?:\{(PORT|INSTANCE|SERVICE|VERSION|ADDRESS)\}|(PORT|INSTANCE|SERVICE|VERSION|ADDRESS)\b)")
LOOPBACK = "127.0.0.1"  # $ADDRESS on one machine without --address


class ManifestError(ValueError):
    """A manifest that cannot be used; ``str()`` names the file, line and reason."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source, self.line, self.reason = source, line, reason
        where = f"{source} line {line}" if line else source
        super().__init__(f"{where}: {reason}")


# The router's own processes carry the marker ``<state>:router:0``: a service of that
# name would have its instance 0 killed or kept as if it were the router.
RESERVED_NAMES = frozenset({"router"})


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and name not in RESERVED_NAMES


@dataclass(frozen=True)
class HealthCheck:
    """One of: ``http`` (url), ``tcp`` (host:port), ``exec`` (argv), ``file`` (path)."""

    kind: str
    target: tuple[str, ...]

    def render(self) -> str:
        if self.kind in ("http", "file"):
            return _join(self.target)
        return _join((self.kind, *self.target))


@dataclass(frozen=True)
class Manifest:
    name: str
    image: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # sorted by key; keys are unique
    dir: str | None = None
    replicas: int = 1
    port: int | None = None
    protocol: str | None = None  # http | tcp; None: http when the health check is an http:// URL (docs/traffic.md)
    restart: str = "always"
    max_restarts: int = 5
    drain_timeout: float = 10.0
    stop_signal: str = "TERM"
    stop_timeout: float = 10.0
    log_lines: int = 1000
    health: HealthCheck | None = None
    health_interval: float = 10.0
    health_timeout: float = 5.0
    health_retries: int = 3
    min_healthy: float = 0.0
    update: str = "rolling"
    update_batch: int = 1
    update_pause: float = 0.0
    update_deadline: float = 60.0
    canary: int = 1  # with `update canary`: new instances started beside the old set first
    canary_weight: int | None = None  # percent of requests the canaries get (None: their share of instances)
    auto_promote: float | None = None  # seconds of healthy canaries before promoting by itself (None: never)
    auto_rollback: bool = False  # a failed rollout rolls back by itself
    # Who the instance runs as and what it may use (None: deployfs's default user; no limit).
    user: str | None = None
    group: str | None = None
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None
    nofile: int | None = None
    # Placement, not the instance: the nodes new instances may go to (empty: any). Never hashed.
    nodes: tuple[str, ...] = ()
    # Unknown directives, kept verbatim (forward compatibility); never hashed.
    extra: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=True)

    # The fields that define an instance; everything else tunes scale or rollout.
    TEMPLATE_FIELDS = (
        "image", "args", "env", "dir", "port", "health", "health_interval",
        "health_timeout", "health_retries", "stop_signal", "stop_timeout",
    )
    # Also the template, but hashed only when set: a manifest that names none of
    # them keeps the version it had before they existed (no rollout on upgrade).
    TENANT_FIELDS = ("user", "group", "memory", "cpus", "pids", "nofile")

    @property
    def version(self) -> str:
        template = {k: _jsonable(getattr(self, k)) for k in self.TEMPLATE_FIELDS}
        template.update({k: getattr(self, k) for k in self.TENANT_FIELDS if getattr(self, k) is not None})
        blob = json.dumps(template, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def traffic_protocol(self) -> str:
        """How the router forwards this service's connections: ``http`` (per request) or ``tcp`` (bytes)."""
        if self.protocol is not None:
            return self.protocol
        return "http" if self.health is not None and self.health.kind == "http" else "tcp"

    @property
    def stop_signum(self) -> int:
        return int(getattr(signal, "SIG" + self.stop_signal))

    def with_replicas(self, n: int) -> "Manifest":
        return replace(self, replicas=n)

    def render(self) -> str:
        """The canonical text: every directive that differs from its default."""
        lines = [f"name {self.name}", f"image {_join((self.image,))}"]
        if self.args:
            lines.append("args " + _join(self.args))
        lines += [f"env {_join((f'{k}={v}',))}" for k, v in self.env]
        for f in fields(self):
            if f.name in ("name", "image", "args", "env", "extra"):
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            lines.append(f"{f.name} {_render_value(f.name, value)}")
        lines += [f"{d} {_join(v)}".rstrip() for d, v in self.extra]
        return "\n".join(lines) + "\n"

    # -- per-instance expansion ------------------------------------------------

    def expand(self, text: str, *, port: int | None, instance: int, version: str, address: str = LOOPBACK) -> str:
        values = {
            "PORT": "" if port is None else str(port),
            "INSTANCE": str(instance),
            "SERVICE": self.name,
            "VERSION": version,
            "ADDRESS": address,  # the node's that runs the instance: where it listens and is probed
        }
        return _EXPAND_RE.sub(lambda m: values[m.group(1) or m.group(2)], text)

    def instance_env(self, *, port: int | None, instance: int, version: str,
                     address: str = LOOPBACK) -> dict[str, str]:
        env = {k: self.expand(v, port=port, instance=instance, version=version, address=address) for k, v in self.env}
        env.update(INSTANCE=str(instance), SERVICE=self.name, VERSION=version)
        if port is not None:
            env["PORT"] = str(port)
        return env

    def instance_argv(self, *, port: int | None, instance: int, version: str, address: str = LOOPBACK) -> list[str]:
        ex = lambda s: self.expand(s, port=port, instance=instance, version=version, address=address)  # noqa: E731
        return [self.image, *map(ex, self.args)]

    def instance_health(self, *, port: int | None, instance: int, version: str,
                        address: str = LOOPBACK) -> HealthCheck | None:
        if self.health is None:
            return None
        ex = lambda s: self.expand(s, port=port, instance=instance, version=version, address=address)  # noqa: E731
        return HealthCheck(self.health.kind, tuple(map(ex, self.health.target)))


@dataclass(frozen=True)
class Parsed:
    manifest: Manifest
    warnings: tuple[str, ...]
    lines: Mapping[str, int] = field(default_factory=dict)  # directive -> its line, for checks made later (user)


# -- parsing ---------------------------------------------------------------------

def parse(data: bytes | str, *, name: str, source: str | None = None) -> Parsed:
    """Parse and validate one manifest for service ``name``.

    Raises ManifestError (only) for anything unusable.
    """
    source = source or f"manifests/{name}"
    if name in RESERVED_NAMES:
        raise ManifestError(source, None, f"service name {name!r} is reserved: deployfs's own router uses it")
    if not valid_name(name):
        raise ManifestError(source, None, f"bad service name {name!r}: use 1-63 of a-z 0-9 . _ -, starting with a letter or digit")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, None, f"too large: {len(data)} bytes (at most {MAX_MANIFEST_BYTES})")
    values: dict[str, object] = {}
    seen_at: dict[str, int] = {}
    env: dict[str, str] = {}
    env_lines: dict[str, int] = {}
    extra: list[tuple[str, tuple[str, ...]]] = []
    warnings: list[str] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise ManifestError(source, lineno, f"line too long: {len(raw)} bytes (at most {MAX_LINE_BYTES})")
        if b"\0" in raw:
            raise ManifestError(source, lineno, "contains a NUL byte")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(source, lineno, f"not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if any(ord(c) < 32 and c not in "\t\r" for c in line):
            raise ManifestError(source, lineno, "contains a control character")
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ManifestError(source, lineno, f"cannot split value: {e}") from None
        if not words:
            continue
        directive, args = words[0], words[1:]
        if directive == "env":
            if not args:
                raise ManifestError(source, lineno, "env: expected KEY=VALUE")
            for word in args:
                key, eq, value = word.partition("=")
                if not eq or not ENV_KEY_RE.fullmatch(key):
                    raise ManifestError(source, lineno, f"env: expected KEY=VALUE, got {word!r}")
                if key in env:
                    raise ManifestError(source, lineno, f"env: {key} is set twice")
                env[key], env_lines[key] = value, lineno
            continue
        spec = _DIRECTIVES.get(directive)
        if spec is None:
            warnings.append(f"{source} line {lineno}: unknown directive {directive!r} (kept, ignored)")
            extra.append((directive, tuple(args)))
            continue
        if directive in seen_at:
            raise ManifestError(source, lineno, f"{directive}: given twice (first on line {seen_at[directive]})")
        seen_at[directive] = lineno
        try:
            values[directive] = spec(args)
        except _Bad as e:
            raise ManifestError(source, lineno, f"{directive}: {e}") from None
    if "image" not in values:
        raise ManifestError(source, None, "missing required directive 'image'")
    if "name" in values and values["name"] != name:
        raise ManifestError(source, seen_at["name"], f"name: {values['name']!r} does not match the file name {name!r}")
    values["name"] = name
    warnings += _reserved_env_warnings(source, env, env_lines, port="port" in values)
    m = Manifest(env=tuple(sorted(env.items())), extra=tuple(extra), **values)  # type: ignore[arg-type]
    warnings += _canary_warnings(source, m, seen_at)
    return Parsed(m, tuple(warnings), seen_at)


def _canary_warnings(source: str, m: Manifest, seen_at: dict[str, int]) -> list[str]:
    """Canary settings that cannot do what they say: kept (an apply must not fail on them), but said."""
    if m.update != "canary":
        return [f"{source} line {seen_at[d]}: {d} has no effect with update {m.update} (ignored)"
                for d in ("canary", "canary_weight", "auto_promote") if d in seen_at]
    if m.canary > m.replicas and "canary" in seen_at:
        return [f"{source} line {seen_at['canary']}: canary {m.canary} is more than replicas {m.replicas}: "
                f"{m.replicas} canaries run"]
    return []


# Set by deployfs for every instance (PORT only when the service has a port);
# DEPLOYFS_INSTANCE is the marker that lets deployfs find its processes again.
RESERVED_ENV = ("INSTANCE", "SERVICE", "VERSION", "DEPLOYFS_INSTANCE")


def _reserved_env_warnings(source: str, env: dict[str, str], lines: dict[str, int], *, port: bool) -> list[str]:
    """A manifest's value for a variable deployfs sets itself would be silently lost: say so."""
    reserved = RESERVED_ENV + (("PORT",) if port else ())
    return [f"{source} line {lines[k]}: env {k} is set by deployfs for every instance; this value is ignored"
            for k in sorted(env, key=lines.__getitem__) if k in reserved]


class _Bad(Exception):
    pass


def _one(args: list[str]) -> str:
    if len(args) != 1:
        raise _Bad(f"expected one value, got {len(args)}")
    return args[0]


def _whole(lo: int, hi: int) -> Callable[[list[str]], int]:
    def conv(args: list[str]) -> int:
        v = _one(args)
        if not _WHOLE_RE.fullmatch(v):
            raise _Bad(f'expected a whole number, got "{v}"')
        n = int(v)
        if not lo <= n <= hi:
            raise _Bad(f"{n} is out of range ({lo} to {hi})")
        return n
    return conv


def _seconds(lo: float = 0.0, hi: float = MAX_SECONDS) -> Callable[[list[str]], float]:
    def conv(args: list[str]) -> float:
        v = _one(args)
        if not _SECONDS_RE.fullmatch(v):
            raise _Bad(f'expected seconds (e.g. 10 or 0.5), got "{v}"')
        x = float(v)
        if not lo <= x <= hi:
            raise _Bad(f"{v} is out of range ({lo:g} to {hi:g} seconds)")
        return x
    return conv


def _choice(*options: str) -> Callable[[list[str]], str]:
    def conv(args: list[str]) -> str:
        v = _one(args)
        if v not in options:
            raise _Bad(f'expected one of {" | ".join(options)}, got "{v}"')
        return v
    return conv


def _name(args: list[str]) -> str:
    v = _one(args)
    if not valid_name(v):
        raise _Bad(f"bad service name {v!r}")
    return v


def _image(args: list[str]) -> str:
    v = _one(args)
    if not v:
        raise _Bad("expected a program (an absolute path or a name on PATH), got an empty value")
    if not (v.startswith("/") or "/" not in v):
        raise _Bad(f"expected an absolute path or a program name on PATH, got {v!r}")
    return v


def _dir(args: list[str]) -> str:
    v = _one(args)
    if not v.startswith("/"):
        raise _Bad(f"expected an absolute path, got {v!r}")
    return v


def _args(args: list[str]) -> tuple[str, ...]:
    return tuple(args)


def _nodes(args: list[str]) -> tuple[str, ...]:
    if not args:
        raise _Bad("expected one or more node names")
    for v in args:
        if not valid_node_name(v):
            raise _Bad(f"bad node name {v[:70]!r}: 1-63 letters, digits, '.', '_' or '-', "
                       "starting and ending with a letter or digit")
    if len(set(args)) != len(args):
        raise _Bad(f"a node is named twice: {' '.join(args)}")
    return tuple(sorted(args))


def _signal(args: list[str]) -> str:
    v = _one(args).upper().removeprefix("SIG")
    if v.isdigit():
        try:
            v = signal.Signals(int(v)).name.removeprefix("SIG")
        except ValueError:
            raise _Bad(f"no signal number {v} (use a name such as TERM, INT, QUIT, HUP, or its number)") from None
    if not isinstance(getattr(signal, "SIG" + v, None), signal.Signals):
        raise _Bad(f"no signal named {args[0]!r} (use a name such as TERM, INT, QUIT, HUP, or its number)")
    if v in _PAUSING_SIGNALS:
        raise _Bad(f"SIG{v} pauses a process instead of ending it: the instance would sit stopped until "
                   "SIGKILL at stop_timeout (use TERM, or KILL to end it at once)")
    return v


# Their default action stops (pauses) a process; STOP cannot even be handled.
_PAUSING_SIGNALS = frozenset({"STOP", "TSTP", "TTIN", "TTOU"})


def _health(args: list[str]) -> HealthCheck:
    if not args:
        raise _Bad("expected http://..., tcp HOST:PORT, exec CMD ARGS, or /a/file/path")
    head = args[0]
    if head.startswith(("http://", "https://")):
        _one(args)
        return HealthCheck("http", (head,))
    if head == "tcp":
        addr = _one(args[1:])
        host, colon, port = addr.rpartition(":")
        if not colon or not host or not (port.isdigit() or port.startswith("$")):
            raise _Bad(f"tcp: expected HOST:PORT, got {addr!r}")
        return HealthCheck("tcp", (addr,))
    if head == "exec":
        if len(args) < 2:
            raise _Bad("exec: expected a command")
        return HealthCheck("exec", tuple(args[1:]))
    if head.startswith("/"):
        _one(args)
        return HealthCheck("file", (head,))
    raise _Bad(f"expected http://..., tcp HOST:PORT, exec CMD ARGS, or /a/file/path, got {head!r}")


def _yes_no(args: list[str]) -> bool:
    v = _one(args)
    if v not in ("yes", "no"):
        raise _Bad(f'expected yes or no, got "{v}"')
    return v == "yes"


_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?|[0-9]{1,10}", re.I)
_SIZE_RE = re.compile(r"([0-9]{1,15})([KMGT]?)(i?B?)?", re.I)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY = 1 << 20  # below this a program cannot even start: say so instead of OOM-looping
MAX_CPUS = 4096


def _account(what: str) -> Callable[[list[str]], str]:
    """A user or group: a name as useradd allows it, or a number.  Whether it exists
    on this host is checked where the instance runs (node/identity.py), not here."""
    def conv(args: list[str]) -> str:
        v = _one(args)
        if not _USER_RE.fullmatch(v):
            raise _Bad(f"expected a {what} name or number, got {v!r}")
        return v
    return conv


def _size(args: list[str]) -> int:
    v = _one(args)
    m = _SIZE_RE.fullmatch(v)
    if m is None:
        raise _Bad(f'expected a size such as 256M, 1G or 65536 (bytes), got "{v}"')
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if not MIN_MEMORY <= n <= 1 << 50:
        raise _Bad(f"{v} is out of range (1M to 1024T)")
    return n


def _cpus(args: list[str]) -> float:
    v = _one(args)
    if not _SECONDS_RE.fullmatch(v):
        raise _Bad(f'expected a number of cores such as 0.5 or 2, got "{v}"')
    x = float(v)
    if not 0.01 <= x <= MAX_CPUS:
        raise _Bad(f"{v} is out of range (0.01 to {MAX_CPUS} cores)")
    return x


def format_size(n: int) -> str:
    """Bytes as the manifest would say them: 64M, 1G, or a plain number."""
    for unit in "TGMK":
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


_DIRECTIVES: dict[str, Callable[[list[str]], object]] = {
    "name": _name,
    "image": _image,
    "args": _args,
    "dir": _dir,
    "replicas": _whole(0, MAX_REPLICAS),
    "port": _whole(1, 65535),
    "protocol": _choice("http", "tcp"),
    "restart": _choice("always", "on-failure", "never"),
    "max_restarts": _whole(0, 10_000),
    "drain_timeout": _seconds(),
    "stop_signal": _signal,
    "stop_timeout": _seconds(),
    "log_lines": _whole(1, 1_000_000),
    "health": _health,
    "health_interval": _seconds(0.01),
    "health_timeout": _seconds(0.01),
    "health_retries": _whole(1, 1000),
    "min_healthy": _seconds(),
    "update": _choice("rolling", "replace", "canary"),
    "update_batch": _whole(1, MAX_REPLICAS),
    "update_pause": _seconds(),
    "update_deadline": _seconds(0.01),
    "canary": _whole(1, MAX_REPLICAS),
    "canary_weight": _whole(0, 100),
    "auto_promote": _seconds(),
    "auto_rollback": _yes_no,
    "user": _account("user"),
    "group": _account("group"),
    "memory": _size,
    "cpus": _cpus,
    "pids": _whole(1, 4_194_304),  # the kernel's pid_max ceiling
    "nofile": _whole(16, 1 << 30),  # fewer than 16 cannot even hold stdio and a socket
    "nodes": _nodes,
}
DIRECTIVES = frozenset(_DIRECTIVES) | {"env"}


# -- rendering helpers -------------------------------------------------------------

def _join(words: tuple[str, ...] | list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def format_seconds(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _render_value(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, HealthCheck):
        return value.render()
    if isinstance(value, float):
        return format_seconds(value)
    if name == "memory" and isinstance(value, int):
        return format_size(value)
    if isinstance(value, str):
        return _join((value,))
    if isinstance(value, tuple):  # nodes
        return _join(value)
    return str(value)


def _jsonable(value: object) -> object:
    if isinstance(value, HealthCheck):
        return [value.kind, *value.target]
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def add_user_line(text: str, user: str, why: str) -> str:
    """``text`` with a ``user`` line added (it must have none), commented with ``why``."""
    body = text if text.endswith("\n") or not text else text + "\n"
    return body + f"user {user}  # {why}\n"


def set_replicas_line(text: bytes, n: int) -> bytes:
    """Rewrite (or add) the ``replicas`` line of a manifest's text, keeping the rest as written."""
    lines = text.split(b"\n")
    for i, raw in enumerate(lines):
        if re.match(rb"\s*replicas(\s|$)", raw):
            comment = re.search(rb"\s+#.*$", raw)
            lines[i] = b"replicas %d" % n + (comment.group(0) if comment else b"")
            return b"\n".join(lines)
    body = text if text.endswith(b"\n") or not text else text + b"\n"
    return body + b"replicas %d\n" % n
