import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deployfs.store import SCHEMA_VERSION, InstanceRecord, ServiceRecord, SqliteStore, StoreError


def test_round_trips(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.put_file("web", b"image /bin/true\n")
    s.put_version("web", "abc", "image /bin/true\n")
    s.put_service(ServiceRecord("web", version="abc", replicas=3, update_status="rolling"))
    s.put_instance(InstanceRecord("web", 7, slot=0, version="abc", pid=42, start_time=99, port=41001))
    ev = s.append_event("web", 0, 1.5, "hello")
    s.close()
    s = SqliteStore(str(tmp_path))
    assert s.get_file("web").data == b"image /bin/true\n"
    assert s.list_files() == ["web"]
    assert s.get_version("web", "abc") == "image /bin/true\n"
    assert s.get_service("web") == ServiceRecord("web", version="abc", replicas=3, update_status="rolling")
    [inst] = s.list_instances("web")
    assert (inst.id, inst.pid, inst.start_time, inst.port) == (7, 42, 99, 41001)
    assert s.events("web", 0) == [ev]
    s.delete_instance("web", 7)
    s.delete_file("web")
    assert s.list_instances("web") == [] and s.get_file("web") is None


def test_transaction_is_atomic(tmp_path):
    s = SqliteStore(str(tmp_path))
    with pytest.raises(ZeroDivisionError):
        with s.transaction():
            s.put_service(ServiceRecord("web"))
            with s.transaction():  # nested joins the outer one
                s.append_event("web", 0, 0.0, "x")
            1 / 0
    assert s.get_service("web") is None and s.events("web", 0) == []


def test_newer_schema_refused(tmp_path):
    SqliteStore(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "deployfs.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer deployfs"):
        SqliteStore(str(tmp_path))


def test_migrates_an_empty_database(tmp_path):
    sqlite3.connect(tmp_path / "deployfs.db").close()
    s = SqliteStore(str(tmp_path))
    assert s._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = textwrap.dedent("""
    import sys
    from deployfs.store import SqliteStore
    s = SqliteStore(sys.argv[1])
    i = 0
    while True:
        with s.transaction():
            s.append_event("web", 0, float(i), f"event {i} " + "x" * (i % 50))
            s.put_service(__import__("deployfs.store").store.ServiceRecord("web", replicas=i))
        print(i, flush=True)
        i += 1
""")


def test_events_survive_kill_9_of_the_writer(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.monotonic() + 30
    while acked < 500 and time.monotonic() < deadline:
        acked = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s = SqliteStore(str(tmp_path))
    evs = s.events("web", 0)
    # every acknowledged event is there, in order, whole; the service record matches the last event
    assert len(evs) >= acked + 1
    assert [e.text.split()[1] for e in evs] == [str(i) for i in range(len(evs))]
    assert all(e.text == f"event {i} " + "x" * (i % 50) for i, e in enumerate(evs))
    assert s.get_service("web").replicas == len(evs) - 1
    assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_concurrent_readers_while_a_writer_appends(tmp_path):
    w = SqliteStore(str(tmp_path))
    stop = threading.Event()
    errors, counts = [], []

    def reader():
        r = SqliteStore(str(tmp_path))
        last = 0
        while not stop.is_set():
            try:
                n = len(r.events("web", 0))
            except Exception as e:  # pragma: no cover - the assertion below reports it
                errors.append(e)
                return
            if n < last:
                errors.append(f"went backwards {last} -> {n}")
            last = n
        counts.append(last)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(2000):
        w.append_event("web", 0, float(i), f"e{i}")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(counts) == 3 and all(c > 0 for c in counts)


def test_records_with_unknown_keys_still_load(tmp_path):
    # a field dropped by this version, or added by a newer writer, must not break a read
    s = SqliteStore(str(tmp_path))
    s._db.execute("INSERT INTO services VALUES ('web', ?)", ('{"name": "web", "replicas": 2, "outcome": "done x"}',))
    assert s.get_service("web") == ServiceRecord("web", replicas=2)
    assert [r.name for r in s.list_services()] == ["web"]
