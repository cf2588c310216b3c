"""The deploy command against a real mount."""

import os
import subprocess
import sys

from tests.mount import SERVICE

DEPLOY = [sys.executable, "-c", "from deployfs.cli.deploy import main; main()"]


def deploy(mnt, *args, timeout=60, env=None):
    env = dict(os.environ, DEPLOYFS_MOUNT=mnt.path, **(env or {}))
    return subprocess.run([*DEPLOY, *args], capture_output=True, text=True, timeout=timeout, env=env)


def manifest(extra=""):
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT {extra}\nreplicas 2\nport 18095\n"
            "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\nhealth_retries 2\nupdate_deadline 3\n")


def test_apply_follows_and_reports(mnt):
    mnt.write_manifest("web", manifest())
    r = deploy(mnt, "apply", "web")
    v1 = mnt.read("active/web/version").strip()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"done {v1}"
    assert "web: rolling" in r.stdout  # plain progress lines when not a terminal
    r = deploy(mnt, "apply", "web")
    assert r.returncode == 0 and r.stdout == f"ok unchanged {v1}\n"
    # a bad release: exits 1, the old version keeps serving
    mnt.write_manifest("web", manifest("--exit-at-start 3"))
    r = deploy(mnt, "apply", "web")
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("failed: instance 2")
    assert mnt.read("active/web/health") == "healthy\n"
    r = deploy(mnt, "rollback", "web")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == f"done {v1}"


def test_errors_print_the_reason(mnt):
    mnt.write_manifest("web", "image /bin/true\nreplicas three\n")
    r = deploy(mnt, "apply", "web")
    assert r.returncode == 1
    assert r.stderr == 'deploy: manifests/web line 2: replicas: expected a whole number, got "three"\n'
    r = deploy(mnt, "pause", "nosuch")
    assert r.returncode == 1 and "no service 'nosuch' is deployed" in r.stderr
    r = deploy(mnt, "status", "nosuch")
    assert r.returncode == 1 and "no service 'nosuch' is deployed" in r.stderr


def test_status_scale_events_logs(mnt):
    mnt.write_manifest("web", manifest())
    assert deploy(mnt, "apply", "web").returncode == 0
    r = deploy(mnt, "status")
    header, row = r.stdout.splitlines()
    assert header.split() == ["SERVICE", "VERSION", "UPDATE", "PROGRESS", "HEALTH", "REPLICAS"]
    assert row.split()[0] == "web" and row.split()[2:] == ["none", "2/2", "healthy", "2"]
    assert "update_status none" in deploy(mnt, "status", "web").stdout
    r = deploy(mnt, "scale", "web", "3")
    assert r.returncode == 0 and r.stdout == "ok\n"
    assert mnt.read("active/web/replicas") == "3\n"
    assert "scaled to 3 by uid=" in deploy(mnt, "events", "web").stdout
    mnt.until(lambda: len(os.listdir(mnt.p("active/web/logs"))) == 3)
    out = deploy(mnt, "logs", "web").stdout
    assert "[web/0] service" in out and "[web/2] service" in out
    assert deploy(mnt, "logs", "web/1").stdout.startswith("service ")


def test_no_mount_is_explained(tmp_path):
    r = subprocess.run([*DEPLOY, "--mount", str(tmp_path), "status"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and r.stderr.startswith(f"deploy: no deployfs mounted at {tmp_path}")


def test_help_is_complete():
    r = subprocess.run([*DEPLOY, "--help"], capture_output=True, text=True, timeout=10)
    for verb in ("apply", "status", "pause", "resume", "step", "rollback", "restart", "stop", "scale", "events", "logs",
                 "edit", "delete", "nodes", "cordon", "uncordon", "drain"):
        assert verb in r.stdout


def test_delete_waits_until_the_service_is_gone(mnt):
    mnt.write_manifest("web", manifest())
    assert deploy(mnt, "apply", "web").returncode == 0
    r = deploy(mnt, "delete", "web")
    assert r.returncode == 0 and r.stdout == "ok deleting\ndeleted web\n", r.stderr
    assert os.listdir(mnt.p("active")) == [] and os.path.exists(mnt.p("manifests/web"))
    assert "deleted web: port 18095 released" in mnt.read("events")
    assert "deleted web: port 18095 released" in deploy(mnt, "events").stdout  # the cluster-wide history
    r = deploy(mnt, "delete", "web")
    assert r.returncode == 1 and "no service 'web' is deployed" in r.stderr


def test_logs_of_a_missing_slot_blame_the_slot(mnt):
    mnt.write_manifest("web", manifest())
    assert deploy(mnt, "apply", "web").returncode == 0
    r = deploy(mnt, "logs", "web/9")
    assert r.returncode == 1 and r.stderr == "deploy: service 'web' has no instance '9' (logs: 0 1)\n"
    r = deploy(mnt, "logs", "nosuch/0")
    assert r.returncode == 1 and "no service 'nosuch' is deployed" in r.stderr


def test_edit_says_saved_only_when_something_was_saved(mnt):
    env = {"EDITOR": "true"}
    r = deploy(mnt, "edit", "nosuch", env=env)
    assert r.returncode == 1 and "nothing saved" in r.stderr and "saved " not in r.stdout
    mnt.write_manifest("web", manifest())
    r = deploy(mnt, "edit", "web", env=env)
    assert r.returncode == 0 and r.stdout.startswith("no change to ")
    r = deploy(mnt, "edit", "web", env={"EDITOR": "sed -i s/0.2$/0.25/"})
    assert r.returncode == 0 and r.stdout.startswith("saved ") and "interval 0.25" in mnt.read("manifests/web")


def test_step_prints_the_progress_after_the_step(mnt):
    text = manifest().replace("replicas 2", "replicas 3") + "update_pause 1\n"
    mnt.write_manifest("web", text)
    assert deploy(mnt, "apply", "web").returncode == 0
    mnt.write_manifest("web", text.replace("--port $PORT", "--port $PORT --version v2"))
    assert deploy(mnt, "apply", "web", "--detach").returncode == 0
    assert deploy(mnt, "pause", "web").returncode == 0
    assert mnt.read("active/web/wait") == "paused\n"
    before = mnt.read("active/web/update_progress").strip()
    r = deploy(mnt, "step", "web")
    after = mnt.read("active/web/update_progress").strip()
    assert r.returncode == 3 and after != before, r.stdout
    assert r.stdout.splitlines()[-2:] == [f"web: paused {after} health=healthy", "paused"]


def test_a_deployfs_mount_at_deploy_in_the_current_directory_is_found(tmp_path):
    from tests import mount as _mount
    m = _mount.start(str(tmp_path), mnt=str(tmp_path / "deploy"))
    try:
        env = {k: v for k, v in os.environ.items() if k != "DEPLOYFS_MOUNT"}
        r = subprocess.run([*DEPLOY, "status"], capture_output=True, text=True, timeout=10, env=env, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("SERVICE"), r.stderr
    finally:
        _mount.stop(m)
    # A plain directory named deploy is not a mount: /deploy is next, and the error says where it looked.
    r = subprocess.run([*DEPLOY, "status"], capture_output=True, text=True, timeout=10, env=env, cwd=tmp_path)
    if not os.path.exists("/deploy/ctl"):
        assert r.returncode == 1 and "no deployfs mounted at /deploy (nor at ./deploy)" in r.stderr


def test_nodes_cordon_uncordon_drain(mnt):
    """One machine, one node: the table, a cordon and back, a drain refused with the reason (nowhere to move)."""
    node = os.listdir(mnt.p("nodes"))[0]
    mnt.write_manifest("web", manifest())
    assert deploy(mnt, "apply", "web").returncode == 0
    r = deploy(mnt, "nodes")
    header, row = r.stdout.splitlines()
    assert header.split() == ["NODE", "ADDRESS", "STATE", "INSTANCES", "LEADS", "SEEN"]
    assert row.split()[:5] == [node, "127.0.0.1", "ready", "2", "web"]
    r = deploy(mnt, "cordon", node)
    assert r.returncode == 0 and r.stdout == "ok cordoned\n"
    assert deploy(mnt, "nodes").stdout.splitlines()[1].split()[2] == "cordoned"
    assert deploy(mnt, "uncordon", node).stdout == "ok uncordoned\n"
    r = deploy(mnt, "drain", node)
    assert r.returncode == 1 and r.stderr.startswith(f"deploy: drain {node}: its instances have nowhere to move")
    r = deploy(mnt, "cordon", "nosuch")
    assert r.returncode == 1 and r.stderr == f"deploy: no node 'nosuch' (known: {node})\n"
