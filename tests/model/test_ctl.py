"""The ctl grammar, as a table: what each write becomes, or the reason it is refused (EINVAL)."""


import pytest

from deployfs.model.ctl import MAX_CTL_BYTES, Command, parse_command
from deployfs.model.errors import CommandError, Kind

ACCEPTED = [
    # (bytes written, the file's service (None: the top ctl), the command)
    (b"apply\n", "web", Command("apply", "web", None)),
    (b"apply", "web", Command("apply", "web", None)),
    (b"  pause \t\n", "web", Command("pause", "web", None)),
    (b"scale 3\n", "web", Command("scale", "web", "3")),
    (b"scale lots\n", "web", Command("scale", "web", "lots")),  # the engine judges the number
    (b"\nrestart\n\n", "web", Command("restart", "web", None)),  # blank lines around one command
    (b"apply web\n", None, Command("apply", "web", None)),
    (b"scale web 5\n", None, Command("scale", "web", "5")),
    (b"delete web\n", None, Command("delete", "web", None)),
    (b"rollback api.v2\n", None, Command("rollback", "api.v2", None)),
    # the node verbs name a node (in `service`): its name may have capitals, unlike a service's
    (b"cordon n1\n", None, Command("cordon", "n1", None)),
    (b"uncordon Web-01.dc1\n", None, Command("uncordon", "Web-01.dc1", None)),
    (b"drain n2", None, Command("drain", "n2", None)),
]

REFUSED = [
    # (bytes written, the file's service, words the reason must contain)
    (b"", "web", "empty command"),
    (b"\n\n", "web", "empty command"),
    (b"apply\nstop\n", "web", "one command per write"),
    (b"launch\n", "web", "unknown verb 'launch'"),
    (b"APPLY\n", "web", "unknown verb"),
    (b"scale\n", "web", "scale: expected 1 argument, got 0"),
    (b"scale 3 4\n", "web", "expected 1 argument, got 2"),
    (b"apply now\n", "web", "apply: expected 0 arguments, got 1"),
    (b"delete\n", "web", "delete works on the top ctl"),
    (b"apply\n", None, "name the service"),
    (b"scale\n", None, "scale SERVICE N"),
    (b"apply ../etc\n", None, "bad service name"),
    (b"apply router\n", None, "bad service name"),  # reserved: the router's own marker
    (b"cordon\n", None, "cordon: name the node: cordon NODE"),
    (b"drain n1 now\n", None, "drain: expected 0 arguments, got 1"),
    (b"drain -n1\n", None, "bad node name '-n1'"),
    (b"uncordon a/b\n", None, "bad node name"),
    (b"cordon n1\n", "web", "cordon works on the top ctl: echo 'cordon NODE' > ctl"),
    (b"apply Web\n", None, "bad service name"),  # a node's name is no service's
    (b"apply w\x00eb\n", "web", "NUL byte"),
    (b"apply \x1b[2J\n", "web", "control character"),
    (b"apply \xff\n", "web", "not valid UTF-8"),
    (b"a" * (MAX_CTL_BYTES + 1), "web", "command too long"),
]


@pytest.mark.parametrize("data, service, expected", ACCEPTED)
def test_accepted(data, service, expected):
    assert parse_command(data, service) == expected


@pytest.mark.parametrize("data, service, reason", REFUSED)
def test_refused_with_einval_and_a_reason(data, service, reason):
    with pytest.raises(CommandError) as e:
        parse_command(data, service)
    assert e.value.kind == Kind.INVALID and reason in e.value.message
