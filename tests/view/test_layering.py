"""Imports point down only, and nothing below serve/ knows FUSE or an errno (docs/architecture.md)."""

import ast
import pathlib

import deployfs

PKG = pathlib.Path(deployfs.__file__).parent
BELOW_SERVE = ("model", "state", "control", "node", "traffic", "view")


def imports(layer: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in sorted((PKG / layer).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        out[f"{layer}/{f.name}"] = names
    return out


def test_nothing_below_serve_knows_fuse():
    for layer in BELOW_SERVE:
        for f, names in imports(layer).items():
            assert not {n for n in names if "pyfuse3" in n or n.endswith("serve") or ".serve." in n}, f


def test_the_view_reads_through_its_source_only():
    for f, names in imports("view").items():
        assert not {n for n in names if "control" in n or "node" in n or "traffic" in n}, (f, names)
        assert "errno" not in names, f  # kinds only: the front end maps them


def test_errors_carry_kinds_not_errnos():
    for layer in ("model", "control", "view"):  # (state and node read OSError.errno, never carry one up)
        for f, names in imports(layer).items():
            assert "errno" not in names, f


def test_the_view_reads_records_and_the_front_ends_read_the_view():
    # The source the view reads is the records (model + state), never the engine's objects ...
    cached = imports("view")["view/cached.py"]
    assert {n.lstrip(".").split(".")[0] for n in cached if n.startswith("..")} <= {"model", "state"}, cached
    # ... nothing in control builds what the view shows any more (the facade over engine internals is gone) ...
    for f in sorted((PKG / "control").glob("*.py")):
        built = {a.name for node in ast.walk(ast.parse(f.read_text())) if isinstance(node, ast.ImportFrom)
                 for a in node.names}
        assert not built & {"ServiceStatus", "InstanceStatus", "Derived"}, f
    # ... and the front ends know the engine only where serve wires it to the view (serve/local.py,
    # and serve/cluster.py for a cluster's node).
    fronts = {**imports("serve"), **imports("serve/ninep")}
    for f, names in fronts.items():
        if f not in ("serve/local.py", "serve/cluster.py"):
            assert not {n for n in names if "control" in n}, (f, names)


# The controller's only imports of node/, each for a reason in docs/architecture.md
# ("Controller and node agent"): the user policy checked at apply, and the metrics' pass over /proc.
CONTROL_FROM_NODE = {("control/engine.py", "..node.identity"), ("control/metrics.py", "..node.usage")}


def test_the_controller_and_the_node_agent_import_nothing_of_each_other():
    """They meet only in the store's records (issue 12 item 3): serve/local.py builds both."""
    from_node = {(f, n) for f, names in imports("control").items() for n in names
                 if n.lstrip(".").split(".")[0] == "node" or n.startswith("deployfs.node")}
    assert from_node == CONTROL_FROM_NODE
    for f, names in imports("node").items():
        assert not {n for n in names if n.lstrip(".").split(".")[0] == "control" or "deployfs.control" in n}, (f, names)
