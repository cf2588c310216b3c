"""The run-as and limit directives: parse, refuse, render, version."""

import pytest

from deployfs.model.manifest import ManifestError, format_size, parse

BASE = b"image /bin/x\nargs -a 1\nport 8080\nhealth http://127.0.0.1:$PORT/\n"


def test_directives_parse_and_render_back():
    text = b"user www-data\ngroup 33\nmemory 256M\ncpus 0.5\npids 256\nnofile 4096\n"
    m = parse(BASE + text, name="s").manifest
    assert (m.user, m.group, m.memory, m.cpus, m.pids, m.nofile) == ("www-data", "33", 256 << 20, 0.5, 256, 4096)
    assert m.render().endswith("user www-data\ngroup 33\nmemory 256M\ncpus 0.5\npids 256\nnofile 4096\n")
    assert parse(m.render(), name="s").manifest == m


@pytest.mark.parametrize("size, n", [("65536K", 64 << 20), ("1G", 1 << 30), ("1048576", 1 << 20), ("2gib", 2 << 30),
                                     ("512MB", 512 << 20)])
def test_memory_sizes(size, n):
    assert parse(BASE + f"memory {size}\n".encode(), name="s").manifest.memory == n


@pytest.mark.parametrize("line, reason", [
    ("memory lots", 'memory: expected a size such as 256M, 1G or 65536 (bytes), got "lots"'),
    ("memory 100K", "memory: 100K is out of range (1M to 1024T)"),
    ("cpus 0", "cpus: 0 is out of range (0.01 to 4096 cores)"),
    ("cpus half", 'cpus: expected a number of cores such as 0.5 or 2, got "half"'),
    ("pids 0", "pids: 0 is out of range (1 to 4194304)"),
    ("nofile 2", "nofile: 2 is out of range (16 to 1073741824)"),
    ("user a:b", "user: expected a user name or number, got 'a:b'"),
    ("user a b", "user: expected one value, got 2"),
    ("group ../x", "group: expected a group name or number, got '../x'"),
])
def test_bad_values_are_refused_with_their_line(line, reason):
    with pytest.raises(ManifestError) as e:
        parse(BASE + line.encode() + b"\n", name="s")
    assert str(e.value) == f"manifests/s line 5: {reason}"


def test_a_manifest_naming_none_keeps_the_version_it_had_before_these_existed():
    assert parse(BASE, name="s").manifest.version == "fcf47075fca4"  # as computed before the run-as and limit directives existed


@pytest.mark.parametrize("change", [b"user nobody\n", b"group nogroup\n", b"memory 64M\n", b"cpus 1\n", b"pids 9\n",
                                    b"nofile 99\n"])
def test_limits_and_user_change_the_version(change):
    a = parse(BASE, name="s").manifest.version
    b = parse(BASE + change, name="s").manifest.version
    c = parse(BASE + change.replace(b"9", b"8").replace(b"64M", b"65M").replace(b"1\n", b"2\n")
              .replace(b"nobody", b"root").replace(b"nogroup", b"root"), name="s").manifest.version
    assert len({a, b, c}) == 3


def test_the_lines_are_kept_for_later_checks():
    assert parse(BASE + b"\nuser x\n", name="s").lines["user"] == 6


def test_format_size():
    assert [format_size(n) for n in (64 << 20, 1 << 30, 1536 << 10, 1000)] == ["64M", "1G", "1536K", "1000"]
