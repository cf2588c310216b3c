"""Fuzz ctl files and manifests through a live mount (run as a child with a timeout).

Every input is refused with EINVAL/ENOENT/EFBIG, the reply says why, and the
service's state files do not change.  Prints how many inputs were tried.
"""

import errno
import os
import sys

from hypothesis import HealthCheck, given, settings, strategies as st

from deployfs.model.ctl import parse_command
from deployfs.model.errors import CommandError
from deployfs.model.manifest import ManifestError, parse

MNT, N = sys.argv[1], int(sys.argv[2])
SVC = os.path.join(MNT, "active", "web")
STATE = ("version", "previous_version", "update_status", "replicas", "manifest", "health")
ALLOWED = {errno.EINVAL, errno.ENOENT, errno.EFBIG}
counts = {"ctl": 0, "manifest": 0}


def snapshot():
    out = {}
    for f in STATE:
        with open(os.path.join(SVC, f), "rb") as fh:
            out[f] = fh.read()
    return out


BEFORE = snapshot()

verbs = st.sampled_from(["apply", "pause", "resume", "step", "rollback", "restart", "stop", "scale",
                         "APPLY", "scal", "", "rm", "apply;", "..", "\x00"])
args = st.one_of(
    st.sampled_from(["..", "../etc", "/", ".hidden", "a" * 300, "web\x01", "-1", "99999999999999999999", "3.5",
                     "1e9", "0x10", "web web", "²", "٣", "nosuch", "WEB", "web/..", "\udcff"]),
    st.text(max_size=20))
structured = st.builds(lambda v, a, b, n: f"{v} {a} {b}" + "\n" * n, verbs, args, args, st.integers(0, 2))
inputs = st.one_of(st.binary(max_size=300), structured.map(lambda s: s.encode("utf-8", "surrogateescape")),
                   st.binary(min_size=4097, max_size=6000))


def would_accept(data, service):
    try:
        parse_command(data, service)
    except CommandError:
        return False
    return True


def ctl_write(path, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, data)
        err = None
    except OSError as e:
        err = e.errno
    reply = os.pread(fd, 4096, 0)
    os.close(fd)
    return err, reply


@settings(max_examples=N, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=inputs, top=st.booleans())
def test_ctl(data, top):
    if not data or would_accept(data, None if top else "web"):
        return  # a valid command would rightly change state: not this test's business
    err, reply = ctl_write(os.path.join(MNT, "ctl") if top else os.path.join(SVC, "ctl"), data)
    counts["ctl"] += 1
    assert err in ALLOWED, (data, err, reply)
    assert reply.startswith(b"error: "), reply


@settings(max_examples=N // 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=400),
                      st.lists(st.sampled_from([b"image /bin/true", b"replicas three", b"port 99999", b"health ftp://x",
                                                b"env =x", b"args 'open", b"\xff\xfe", b"update sideways",
                                                b"name other", b"replicas 1"]), max_size=6).map(b"\n".join)))
def test_manifest(data):
    try:
        parse(data, name="web")
        return  # valid: an apply would rightly roll it out
    except ManifestError:
        pass
    with open(os.path.join(MNT, "manifests", "web"), "wb") as f:
        f.write(data)
    err, reply = ctl_write(os.path.join(SVC, "ctl"), b"apply\n")
    counts["manifest"] += 1
    assert err == errno.EINVAL, (data, err, reply)
    assert reply.startswith(b"error: manifests/web"), reply


test_ctl()
test_manifest()
assert snapshot() == BEFORE, "state changed"
print(f"fuzzed {counts['ctl']} ctl writes and {counts['manifest']} manifests; state untouched")
