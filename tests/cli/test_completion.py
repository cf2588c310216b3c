"""contrib/deploy.bash-completion, run by a real bash over a directory shaped like a mount."""

import os
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "deploy.bash-completion")


@pytest.fixture
def fake_mount(tmp_path):
    for d in ("manifests", "active/web/logs", "active/api/logs", "nodes"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("ctl", "manifests/web", "manifests/api", "manifests/new", "active/web/logs/0", "active/web/logs/1",
              "active/web/logs/failed-3", "active/api/logs/0", "nodes/n1", "nodes/n2"):
        (tmp_path / f).write_text("")
    return str(tmp_path)


def complete(line: str, cwd: str | None = None, mount: str | None = None) -> list[str]:
    """COMPREPLY for the command line typed so far (the cursor at its end)."""
    words = line.split(" ")
    script = (f"source {SCRIPT}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\nCOMP_CWORD={len(words) - 1}\n"
              "_deploy\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYFS_MOUNT"}
    if mount:
        env["DEPLOYFS_MOUNT"] = mount
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return sorted(filter(None, r.stdout.splitlines()))


def test_services_then_nothing_more_to_name(fake_mount):
    assert complete("deploy scale ", mount=fake_mount) == ["api", "web"]
    assert complete("deploy scale web ", mount=fake_mount) == []  # a number, not a service again
    assert complete("deploy events web ", mount=fake_mount) == ["-f"]
    assert complete("deploy apply ", mount=fake_mount) == ["api", "new", "web"]  # apply: from manifests/
    assert complete("deploy de", mount=fake_mount) == ["delete"]


def test_node_verbs_complete_node_names(fake_mount):
    assert complete("deploy cordon ", mount=fake_mount) == ["n1", "n2"]
    assert complete("deploy drain n", mount=fake_mount) == ["n1", "n2"]
    assert complete("deploy drain n1 --", mount=fake_mount) == ["--detach", "--help"]
    assert complete("deploy nodes ", mount=fake_mount) == []
    assert complete("deploy un", mount=fake_mount) == ["uncordon"]


def test_slots_after_logs_service_slash(fake_mount):
    assert complete("deploy logs web/", mount=fake_mount) == ["web/0", "web/1", "web/failed-3"]
    assert complete("deploy logs web/f", mount=fake_mount) == ["web/failed-3"]


def test_options_and_mount_directories(fake_mount, tmp_path):
    assert complete("deploy apply web --", mount=fake_mount) == ["--detach", "--help"]
    assert complete("deploy logs -", mount=fake_mount) == ["--help", "-f"]
    (tmp_path / "mnt-here").mkdir()
    assert complete("deploy --mount mnt-", cwd=str(tmp_path)) == ["mnt-here"]
    assert complete(f"deploy --mount {fake_mount} status ") == ["api", "web"]


def test_a_deploy_directory_in_the_current_one_is_used(fake_mount, tmp_path):
    os.symlink(fake_mount, tmp_path / "deploy")
    assert complete("deploy stop ", cwd=str(tmp_path)) == ["api", "web"]
