"""The ctl grammar: one command per write.  Pure.

``active/<svc>/ctl`` takes ``<verb> [arg]``; the top ``ctl`` takes
``<verb> <service> [arg]``, and ``<verb> <node>`` for the node verbs
(``cordon``, ``uncordon``, ``drain``: then :attr:`Command.service` holds the
node's name).  Anything else is refused as invalid and a reason in words.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CommandError, Kind
from .manifest import valid_name
from .cluster import valid_node_name

MAX_CTL_BYTES = 4096
VERBS = {"apply": 0, "pause": 0, "resume": 0, "step": 0, "rollback": 0, "restart": 0, "stop": 0, "scale": 1,
         "delete": 0, "promote": 0, "abort": 0, "cordon": 0, "uncordon": 0, "drain": 0}
NODE_VERBS = {"cordon", "uncordon", "drain"}  # name a node, not a service
TOP_ONLY = {"delete"} | NODE_VERBS  # delete removes active/<svc> itself: not a verb of a file inside it
USAGE = ("apply | pause | resume | step | promote | abort | rollback | restart | stop | scale N "
         "(and on the top ctl: delete SERVICE, cordon | uncordon | drain NODE)")


@dataclass(frozen=True)
class Command:
    verb: str
    service: str
    arg: str | None


def parse_command(data: bytes, service: str | None) -> Command:
    def bad(reason: str) -> CommandError:
        return CommandError(Kind.INVALID, reason)

    if len(data) > MAX_CTL_BYTES:
        raise bad(f"command too long: {len(data)} bytes (at most {MAX_CTL_BYTES})")
    if b"\0" in data:
        raise bad("command contains a NUL byte")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("command is not valid UTF-8") from None
    lines = [l for l in text.splitlines() if l.strip()]
    if len(lines) != 1:
        raise bad("expected one command per write" if lines else f"empty command; expected: {USAGE}")
    if any(ord(c) < 32 and c != "\t" for c in lines[0]):
        raise bad("command contains a control character")
    words = lines[0].split()
    verb, rest = words[0], words[1:]
    if verb not in VERBS:
        raise bad(f"unknown verb {verb[:40]!r}; expected: {USAGE}")
    node = verb in NODE_VERBS
    if verb in TOP_ONLY and service is not None:
        what = "NODE" if node else service
        raise bad(f"{verb} works on the top ctl: echo '{verb} {what}' > ctl (in the mount's root)")
    if service is None:
        if not rest:
            if node:
                raise bad(f"{verb}: name the node: {verb} NODE (ls nodes/)")
            raise bad(f"{verb}: name the service: {verb} SERVICE" + (" N" if VERBS[verb] else ""))
        service, rest = rest[0], rest[1:]
        if node and not valid_node_name(service):
            raise bad(f"bad node name {service[:70]!r}")
        if not node and not valid_name(service):
            raise bad(f"bad service name {service[:70]!r}")
    want = VERBS[verb]
    if len(rest) != want:
        raise bad(f"{verb}: expected {want} argument{'s' if want != 1 else ''}, got {len(rest)}")
    return Command(verb, service, rest[0] if rest else None)
