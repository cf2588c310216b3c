"""The README's walkthrough, run verbatim against a real mount, so it cannot rot.

Commands are the `$ ` lines of the ```console blocks (a heredoc runs to its
EOF); the lines after a command are its expected output, compared after
normalising what differs from run to run (hashes, times, pids, ports).
"""

import os
import re
import subprocess
import sys

from tests import mount as _mount

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = "18790"


def blocks(text):
    return re.findall(r"```console\n(.*?)```", text, re.S)


def steps(block):
    out, lines = [], block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"expected a command, got {line!r}"
        cmd = [line[2:]]
        i += 1
        if "<<EOF" in line:
            while lines[i] != "EOF":
                cmd.append(lines[i])
                i += 1
            cmd.append("EOF")
            i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        out.append(("\n".join(cmd), expected))
    return out


def norm(line):
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "T", line)
    line = re.sub(r"\b[0-9a-f]{12}\b", "H", line)
    line = re.sub(r"(pid|port|rss)=\d+", r"\1=N", line)
    line = re.sub(r"cpu=\d+\.\d+", "cpu=N", line)
    line = re.sub(r"\d+\.\d+s\b", "Xs", line)
    line = re.sub(r"node=\S+", "node=N", line)
    line = re.sub(r"\S*/examples/web.py", "examples/web.py", line)
    line = re.sub(r"^bash: line \d+: ", "bash: ", line)
    return " ".join(line.split())


def test_readme_walkthrough_runs_verbatim(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().replace("8080", PORT)
    assert walk(readme, tmp_path) >= 20


def test_tutorial_console_blocks_run_verbatim(tmp_path):
    """docs/tutorial.md's ```console blocks (the canary walkthrough), on a port of their own."""
    with open(os.path.join(ROOT, "docs", "tutorial.md")) as f:
        tutorial = f.read().replace("8081", "20790")
    assert walk(tutorial, tmp_path) >= 10


def walk(readme: str, tmp_path) -> int:
    """Run every ```console block of ``readme`` against a fresh mount; return how many commands ran."""
    os.symlink(os.path.join(ROOT, "examples"), tmp_path / "examples")
    os.makedirs(tmp_path / ".venv" / "bin")
    os.symlink(os.path.join(os.path.dirname(sys.executable), "deploy"), tmp_path / ".venv" / "bin" / "deploy")
    m = _mount.start(str(tmp_path), mnt=str(tmp_path / "deploy"), state=str(tmp_path / ".deployfs"))
    env = dict(os.environ)
    ran = 0
    try:
        for block in blocks(readme):
            for cmd, expected in steps(block):
                if cmd.startswith("export "):
                    key, _, value = cmd[len("export "):].partition("=")
                    env[key] = value.replace("$PWD", str(tmp_path))
                    continue
                r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=60)
                actual = [norm(l) for l in (r.stdout + r.stderr).splitlines()]
                want = [norm(l) for l in expected]
                if cmd.startswith("ls "):  # a listing is shown whole: a name missing from it must fail
                    assert actual == want, f"{cmd!r}\nexpected: {want}\ngot: {actual}"
                it = iter(actual)
                missing = [w for w in want if not any(w == a for a in it)]
                assert not missing, f"{cmd!r}\nexpected (in order): {want}\ngot: {actual}"
                ran += 1
    finally:
        _mount.stop(m)
    return ran
