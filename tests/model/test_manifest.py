import pytest
from hypothesis import given, settings, strategies as st

from deployfs.model.manifest import (
    DIRECTIVES, Manifest, ManifestError, parse, set_replicas_line,
)

WEB = b"""\
name web                       # optional; must equal the file's name
image /opt/web/v2/server       # the program to run
args --port $PORT --workers 2
env DB_ADDR=10.0.0.5
env "GREETING=hello world"
dir /opt/web
replicas 3
port 8080
restart always
max_restarts 5
drain_timeout 10
stop_signal TERM
stop_timeout 10
log_lines 1000
health http://127.0.0.1:$PORT/healthz
health_interval 5
health_timeout 3
health_retries 3
min_healthy 0
update rolling
update_batch 1
update_pause 10
update_deadline 60
"""


def test_every_design_directive_parses():
    m = parse(WEB, name="web").manifest
    assert m.image == "/opt/web/v2/server"
    assert m.args == ("--port", "$PORT", "--workers", "2")
    assert dict(m.env) == {"DB_ADDR": "10.0.0.5", "GREETING": "hello world"}
    assert (m.replicas, m.port, m.health_interval, m.update_pause) == (3, 8080, 5.0, 10.0)
    assert m.health.kind == "http"
    assert len(m.version) == 12 and int(m.version, 16) >= 0


@pytest.mark.parametrize("lines, protocol", [
    (b"health http://127.0.0.1:$PORT/healthz\n", "http"),  # the default for an http:// check (docs/traffic.md)
    (b"health tcp 127.0.0.1:$PORT\n", "tcp"),
    (b"", "tcp"),
    (b"health http://127.0.0.1:$PORT/\nprotocol tcp\n", "tcp"),
    (b"health tcp 127.0.0.1:$PORT\nprotocol http\n", "http"),
])
def test_protocol_defaults_to_http_with_an_http_health_check(lines, protocol):
    m = parse(b"image /bin/true\nport 8080\n" + lines, name="web").manifest
    assert m.traffic_protocol == protocol
    assert parse(m.render(), name="web").manifest == m  # round-trips; the default is not written out


def test_protocol_is_not_part_of_the_version():
    # how the router forwards does not change what an instance is: no rollout for it
    base = b"image /bin/true\nport 8080\n"
    assert parse(base, name="web").manifest.version == parse(base + b"protocol http\n", name="web").manifest.version


def test_error_names_file_line_and_reason():
    with pytest.raises(ManifestError) as e:
        parse(b"image /bin/true\n\n\nreplicas three\n", name="web")
    assert str(e.value) == 'manifests/web line 4: replicas: expected a whole number, got "three"'


@pytest.mark.parametrize("text, reason", [
    (b"replicas 2\n", "missing required directive 'image'"),
    (b"image /bin/true\nimage /bin/false\n", r"given twice \(first on line 1\)"),
    (b"image /bin/true\nname other\n", "does not match the file name"),
    (b"image /bin/true\nport 70000\n", "out of range"),
    (b"image /bin/true\nreplicas 99999999999999999999\n", "expected a whole number"),
    (b"image /bin/true\nhealth_interval -1\n", "expected seconds"),
    (b"image /bin/true\nstop_signal STOP\n", "SIGSTOP pauses a process instead of ending it"),
    (b"image /bin/true\nstop_signal 19\n", "SIGSTOP pauses a process instead of ending it"),
    (b"image /bin/true\nstop_signal NOPE\n", "no signal named 'NOPE'"),
    (b"image /bin/true\nstop_signal 99\n", "no signal number 99"),
    (b"image ''\n", "line 1: image: expected a program .*got an empty value"),
    (b"image /bin/true\nhealth ftp://x\n", "expected http://"),
    (b"image /bin/true\nprotocol udp\n", "protocol: expected one of http | tcp, got \"udp\""),
    (b"image /bin/true\nenv NOEQUALS\n", "env: expected KEY=VALUE"),
    (b"image /bin/true\nenv A=1\nenv A=2\n", "A is set twice"),
    (b"image /bin/true\nargs 'unterminated\n", "cannot split value"),
    (b"image relative/path\n", "absolute path"),
    (b"image /bin/true\x00\n", "NUL"),
    (b"image /bin/\xff\n", "UTF-8"),
    (b"image /bin/true\n" + b"# " + b"x" * 5000 + b"\n", "line too long"),
    (b"image /bin/true\n" + b"#\n" * 40000, "too large"),
    (b"image /bin/true\nnodes\n", "line 2: nodes: expected one or more node names"),
    (b"image /bin/true\n\nnodes n1 n1\n", "line 3: nodes: a node is named twice: n1 n1"),
    (b"image /bin/true\nnodes n1 -n2\n", "line 2: nodes: bad node name '-n2'"),
    (b"image /bin/true\nnodes a/b\n", "line 2: nodes: bad node name 'a/b'"),
])
def test_refusals(text, reason):
    with pytest.raises(ManifestError, match=reason):
        parse(text, name="web")


def test_the_routers_name_is_reserved():
    # the router's processes carry the marker <state>:router:0: a service "router" would share it
    with pytest.raises(ManifestError, match="reserved"):
        parse(b"image /bin/true\n", name="router")


def test_hostile_service_names_refused():
    for bad in ["..", ".hidden", "a/b", "", "A", "x" * 64, "a\nb"]:
        with pytest.raises(ManifestError, match="bad service name"):
            parse(b"image /bin/true\n", name=bad)


def test_unknown_directive_kept_as_warning():
    p = parse(b"image /bin/true\nfrobnicate yes please\n", name="web")
    assert p.warnings == ("manifests/web line 2: unknown directive 'frobnicate' (kept, ignored)",)
    assert ("frobnicate", ("yes", "please")) in p.manifest.extra
    assert "frobnicate yes please" in p.manifest.render()


def test_version_ignores_layout_replicas_and_update_knobs():
    a = parse(b"image /bin/x\nargs -a 1\nenv B=2\nenv A=1\nreplicas 1\n", name="s").manifest
    b = parse(b"# comment\n\n  replicas   7\nenv A=1\nupdate_batch 3\nupdate replace\n"
              b"args -a   1   # trailing\nimage /bin/x\nenv B=2\nupdate_pause 4\n", name="s").manifest
    assert a.version == b.version


@pytest.mark.parametrize("change", [
    b"image /bin/y\n", b"args -a 2\n", b"env C=3\n", b"dir /tmp\n", b"port 9000\n",
    b"health tcp 127.0.0.1:$PORT\n", b"health_interval 2\n", b"health_timeout 2\n",
    b"health_retries 9\n", b"stop_signal INT\n", b"stop_timeout 3\n",
])
def test_version_changes_with_the_instance_template(change):
    base = b"image /bin/x\nargs -a 1\n"
    directive = change.split()[0]
    varied = b"\n".join(l for l in base.split(b"\n") if not l.startswith(directive)) + b"\n" + change
    assert parse(base, name="s").manifest.version != parse(varied, name="s").manifest.version


def test_expansion():
    m = parse(b"image /bin/x\nargs --port $PORT --id ${INSTANCE} $SERVICE@$VERSION $HOME\n"
              b"env URL=http://h:$PORT/\nhealth http://127.0.0.1:$PORT/healthz\n", name="web").manifest
    argv = m.instance_argv(port=41001, instance=2, version="abc")
    assert argv == ["/bin/x", "--port", "41001", "--id", "2", "web@abc", "$HOME"]
    env = m.instance_env(port=41001, instance=2, version="abc")
    assert env["URL"] == "http://h:41001/" and env["PORT"] == "41001" and env["SERVICE"] == "web"
    assert m.instance_health(port=41001, instance=2, version="abc").target == ("http://127.0.0.1:41001/healthz",)


def test_address_expands_to_the_node_address_loopback_by_default():
    m = parse(b"image /bin/x\nargs --bind $ADDRESS:$PORT ${ADDRESS}\nenv URL=http://$ADDRESS:$PORT/\n"
              b"health http://$ADDRESS:$PORT/healthz\n", name="web").manifest
    at = dict(port=41001, instance=2, version="abc", address="127.0.1.2")
    assert m.instance_argv(**at) == ["/bin/x", "--bind", "127.0.1.2:41001", "127.0.1.2"]
    assert m.instance_env(**at)["URL"] == "http://127.0.1.2:41001/"
    assert m.instance_health(**at).target == ("http://127.0.1.2:41001/healthz",)
    assert m.instance_argv(port=41001, instance=2, version="abc")[2] == "127.0.0.1:41001"


def test_nodes_is_placement_not_the_version():
    plain = parse(b"image /bin/x\n", name="web").manifest
    m = parse(b"image /bin/x\nnodes n2 n1\n", name="web").manifest
    assert m.nodes == ("n1", "n2") and m.version == plain.version
    assert "nodes n1 n2\n" in m.render() and parse(m.render(), name="web").manifest == m


def test_set_replicas_line_keeps_the_rest():
    text = b"image /bin/x   # the program\nreplicas 3   # three\nport 1\n"
    assert set_replicas_line(text, 5) == b"image /bin/x   # the program\nreplicas 5   # three\nport 1\n"
    assert set_replicas_line(b"image /bin/x", 2) == b"image /bin/x\nreplicas 2\n"


# -- properties ------------------------------------------------------------------

@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_parser_is_total_on_bytes(data):
    try:
        parse(data, name="web")
    except ManifestError:
        pass


words = st.sampled_from(sorted(DIRECTIVES) + ["image", "bogus", "#", "'", '"', "$PORT", "1", "0.5", "-1",
                                              "/bin/x", "http://h:1/", "tcp", "exec", "a=b", "TERM", "rolling"])


@settings(max_examples=500)
@given(st.lists(st.lists(words, max_size=4).map(" ".join), max_size=12).map("\n".join))
def test_parser_is_total_on_directive_soup(text):
    try:
        parse(text, name="web")
    except ManifestError:
        pass


values = {
    "args": st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=8), max_size=4),
    "replicas": st.integers(0, 1000),
    "port": st.one_of(st.none(), st.integers(1, 65535)),
    "health_interval": st.floats(0.01, 1000).map(lambda x: round(x, 3)),
    "update_batch": st.integers(1, 50),
    "restart": st.sampled_from(["always", "on-failure", "never"]),
    "nodes": st.lists(st.sampled_from(["n1", "n2", "Node-3.dc"]), unique=True).map(sorted),
}


@settings(max_examples=300)
@given(st.fixed_dictionaries({}, optional=values))
def test_parse_render_parse_is_stable(kw):
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    m = Manifest(name="web", image="/bin/x", **kw)
    text = m.render()
    again = parse(text, name="web").manifest
    assert again == m
    assert again.render() == text
    assert again.version == m.version


@pytest.mark.parametrize("value", ["KILL", "9", "SIGKILL", "kill"])
def test_stop_signal_kill_is_accepted_by_name_or_number(value):
    m = parse(f"image /bin/true\nstop_signal {value}\n", name="web").manifest
    assert m.stop_signal == "KILL" and m.stop_signum == 9


def test_stop_signal_number_and_name_are_the_same_version():
    a = parse(b"image /bin/true\nstop_signal 15\n", name="web").manifest
    b = parse(b"image /bin/true\nstop_signal TERM\n", name="web").manifest
    assert a.stop_signal == "TERM" and a.version == b.version


def test_reserved_env_is_warned_about_with_its_line():
    text = b"image /bin/true\nport 8080\nenv PORT=1 A=2\nenv INSTANCE=x\nenv DEPLOYFS_INSTANCE=y\n"
    p = parse(text, name="web")
    assert p.warnings == (
        "manifests/web line 3: env PORT is set by deployfs for every instance; this value is ignored",
        "manifests/web line 4: env INSTANCE is set by deployfs for every instance; this value is ignored",
        "manifests/web line 5: env DEPLOYFS_INSTANCE is set by deployfs for every instance; this value is ignored",
    )


def test_env_port_without_a_port_directive_is_the_instances_own():
    p = parse(b"image /bin/true\nenv PORT=9000\n", name="web")
    assert p.warnings == () and dict(p.manifest.env) == {"PORT": "9000"}


def test_canary_settings_that_cannot_apply_are_warned_about():
    from deployfs.model.manifest import parse
    base = "image /bin/true\nreplicas 3\n"
    p = parse(base + "update canary\ncanary 4\n", name="web")
    assert p.warnings == ("manifests/web line 4: canary 4 is more than replicas 3: 3 canaries run",)
    p = parse(base + "canary 1\nauto_promote 5\n", name="web")
    assert p.warnings == ("manifests/web line 3: canary has no effect with update rolling (ignored)",
                          "manifests/web line 4: auto_promote has no effect with update rolling (ignored)")
    assert parse(base + "update canary\ncanary 3\n", name="web").warnings == ()
