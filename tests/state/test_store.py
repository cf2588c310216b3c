import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deployfs.state.store import SCHEMA_VERSION, InstanceRecord, ServiceRecord, SqliteStore, StoreError, StoreFull
from tests.disk import fill, free, small_disk


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
    from deployfs.state.store import ServiceRecord, SqliteStore
    s = SqliteStore(sys.argv[1])
    i = 0
    while True:
        with s.transaction():
            s.append_event("web", 0, float(i), f"event {i} " + "x" * (i % 50))
            s.put_service(ServiceRecord("web", replicas=i))
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
    s._db.execute("INSERT INTO kv VALUES ('services/web', ?, 2, 2, 0)", (b'{"name": "web", "replicas": 2, "outcome": "done x"}',))
    assert s.get_service("web") == ServiceRecord("web", replicas=2)
    assert [r.name for r in s.list_services()] == ["web"]


# -- a full state disk, on a real 2 MiB tmpfs --------------------------------

@pytest.fixture
def disk(tmp_path):
    with small_disk(str(tmp_path / "disk")) as d:
        yield d


def full_store(disk: str) -> SqliteStore:
    s = SqliteStore(os.path.join(disk, "state"))
    s.put_file("web", b"image /bin/true\n")
    s.put_service(ServiceRecord("web", replicas=2))
    s.put_instance(InstanceRecord("web", 1, slot=0, version="v1", pid=100))
    s.append_event("web", 0, 1.0, "committed before the disk filled")
    fill(disk)
    return s


def test_a_full_disk_refuses_requested_writes_and_keeps_records_until_there_is_room(disk):
    s = full_store(disk)
    with pytest.raises(StoreFull, match="the state disk is full"):
        s.put_file("web", b"image /bin/false\n")
    assert s.full is not None and s.get_file("web").data == b"image /bin/true\n"
    # what the engine records about what happened cannot be refused: it waits, and reads see it
    s.put_instance(InstanceRecord("web", 1, slot=0, version="v1", pid=200))
    s.put_instance(InstanceRecord("web", 2, slot=1, version="v1", pid=201))
    s.delete_instance("web", 2)
    s.append_event("web", 0, 2.0, "instance 0 exited")
    s.append_event("web", 0, 3.0, "instance 0 started")
    with s.transaction():  # the engine's own transactions wait too
        s.put_service(ServiceRecord("web", replicas=2, update_status="rolling"))
    assert [(i.id, i.pid) for i in s.list_instances("web")] == [(1, 200)]
    assert s.get_service("web").update_status == "rolling"
    assert [e.text for e in s.events("web", 0)][-2:] == ["instance 0 exited", "instance 0 started"]
    assert not s.flush()  # still full
    free(disk)
    assert s.flush() and s.full is None
    s.close()
    s = SqliteStore(os.path.join(disk, "state"))  # all of it is in SQLite now, in order
    assert [(i.id, i.pid) for i in s.list_instances("web")] == [(1, 200)]
    assert s.get_service("web").update_status == "rolling"
    assert [e.text for e in s.events("web", 0)] == [
        "committed before the disk filled", "instance 0 exited", "instance 0 started"]
    s.put_file("web", b"image /bin/false\n")  # and requests are taken again


def test_a_refusing_transaction_on_a_full_disk_changes_nothing(disk):
    s = full_store(disk)
    shown = []
    for _ in range(2):  # when the disk is found full, and once it is known to be
        with pytest.raises(StoreFull):
            with s.transaction(refuse_when_full=True):
                s.put_service(ServiceRecord("web", replicas=5))
                s.append_event("web", 0, 2.0, "scaled to 5")
                s.after_commit(lambda: shown.append(1))
    assert shown == [] and s.get_service("web").replicas == 2
    assert [e.text for e in s.events("web", 0)] == ["committed before the disk filled"]


def test_starting_on_a_full_disk_after_a_clean_stop(disk):
    s = full_store(disk)
    free(disk)
    s.close()  # a clean close removes -wal and -shm: the next open must create them
    fill(disk)
    s = SqliteStore(os.path.join(disk, "state"))
    assert s.full is not None
    assert s.get_service("web").replicas == 2 and s.get_file("web") is not None
    s.append_event("web", 0, 2.0, "adopted")  # recovery's events wait
    with pytest.raises(StoreFull):
        s.put_file("other", b"x")
    free(disk)
    assert s.flush()
    assert [e.text for e in s.events("web", 0)] == ["committed before the disk filled", "adopted"]


def test_database_files_are_owner_only(tmp_path):
    s = SqliteStore(str(tmp_path / "state"))
    s.append_event("web", 0, 1.0, "x")
    names = sorted(os.listdir(tmp_path / "state"))
    assert names == ["deployfs.db", "deployfs.db-shm", "deployfs.db-wal"]
    assert {oct(os.stat(tmp_path / "state" / n).st_mode & 0o777) for n in names} == {"0o600"}
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700


def test_a_service_deleted_on_a_full_disk_is_gone_once_there_is_room(disk):
    s = full_store(disk)
    s.append_event("web", 0, 2.0, "instance 0 stopped")  # waits, then goes with the service
    s.delete_service("web")
    assert s.get_service("web") is None and s.list_services() == []
    free(disk)
    assert s.flush()
    assert s.get_service("web") is None and s.list_instances("web") == [] and s.events("web", 0) == []


def test_haproxy_cfg_on_a_full_disk_is_a_router_error_not_a_crash(disk, caplog):
    # HAProxy mode rewrites haproxy.cfg on every routing change; an OSError there killed the feeder
    from deployfs.traffic.haproxy import HAProxyRouter
    from deployfs.traffic.router_client import RouterError
    state = os.path.join(disk, "state")
    os.mkdir(state)
    r = HAProxyRouter(state)
    r.live = {f"svc{i}": (18000 + i, {}) for i in range(200)}  # a config bigger than what is left
    fill(disk)
    with pytest.raises(RouterError, match="cannot write .*haproxy.cfg: No space left on device"):
        r._write()
    r._write(applied=True)  # haproxy already runs it (admin socket): logged, caught up by the next write
    assert "cannot save" in caplog.text
    free(disk)
    r._write()
    assert "svc199" in open(os.path.join(state, "haproxy.cfg")).read()


def test_a_new_database_on_a_full_disk_is_a_clear_refusal(disk):
    fill(disk)
    with pytest.raises(StoreFull, match="the state disk is full"):
        SqliteStore(os.path.join(disk, "state"))


def test_a_database_of_the_previous_version_is_moved_into_the_records_once(tmp_path):
    from dataclasses import asdict
    import json

    from deployfs.state.store import _MIGRATIONS
    db = sqlite3.connect(tmp_path / "deployfs.db")  # what schema 1 (the previous deployfs) left
    db.executescript(_MIGRATIONS[0])
    db.execute("INSERT INTO manifest_files VALUES ('web', ?, 12.5)", (b"image /bin/true\n\xff",))
    db.execute("INSERT INTO versions VALUES ('web', 'abc', 'image /bin/true\n', 1.0)")
    db.execute("INSERT INTO services VALUES ('web', ?)",
               (json.dumps(asdict(ServiceRecord("web", version="abc", replicas=2))),))
    for id in (7, 41):
        db.execute("INSERT INTO instances VALUES ('web', ?, ?)",
                   (id, json.dumps(asdict(InstanceRecord("web", id, slot=id % 2, version="abc", pid=100 + id)))))
    for seq, segment, text in ((1, 0, "deployed"), (5, 1, "later"), (9, 1, "last"), (10, 0, "other")):
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (seq, "" if text == "other" else "web", segment, 2.0, text))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    s = SqliteStore(str(tmp_path))
    assert s.get_file("web").data == b"image /bin/true\n\xff" and s.get_file("web").mtime == 12.5
    assert s.get_version("web", "abc") == "image /bin/true\n"
    assert s.get_service("web") == ServiceRecord("web", version="abc", replicas=2)
    assert [(i.id, i.pid) for i in s.list_instances("web")] == [(7, 107), (41, 141)]
    assert [e.text for e in s.events("web", 1)] == ["later", "last"] and s.last_event("web").text == "last"
    assert [e.text for e in s.events("", 0)] == ["other"]
    assert s.next_instance_id() == 42  # never an id the old database used
    s.put_instance(InstanceRecord("web", 42, slot=0, version="abc"))
    tables = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not tables & {"manifest_files", "versions", "services", "instances", "events"}
    s.close()
    s = SqliteStore(str(tmp_path))  # once: a second open changes nothing
    assert [i.id for i in s.list_instances("web")] == [7, 41, 42] and s.next_instance_id() == 43


def test_instance_ids_are_never_reused(tmp_path):
    s = SqliteStore(str(tmp_path))
    a, b = s.next_instance_id(), s.next_instance_id()
    assert a < b
    s.put_instance(InstanceRecord("web", b, slot=0, version="v"))
    s.delete_instance("web", b)
    s.delete_service("web")
    s.close()
    s = SqliteStore(str(tmp_path))  # the record is gone, the counter stays past it
    assert s.next_instance_id() == b + 1


async def test_a_cache_sees_what_the_store_commits_and_nothing_else(tmp_path):
    from deployfs.state.cache import Cache
    from deployfs.state.records import ServiceRecord as Rec, decode
    import trio

    s = SqliteStore(str(tmp_path))
    s.put_service(Rec("web", replicas=1))
    cache = Cache(s.kv, "services/")
    seen = []
    async with trio.open_nursery() as n:
        await n.start(cache.run)
        cache.subscribe(lambda changes: seen.append([c.kv.key for c in changes]))
        assert decode(Rec, cache.get("services/web").value).replicas == 1
        with s.transaction():  # one transaction, one revision, told once it is committed
            s.put_service(Rec("web", replicas=2))
            s.put_service(Rec("api"))
            s.append_event("web", 0, 1.0, "not under services/")
            await trio.sleep(0.05)
            assert decode(Rec, cache.get("services/web").value).replicas == 1
        await cache.wait_for(s.kv.revision)
        assert seen == [["services/web", "services/api"]]
        assert decode(Rec, cache.get("services/web").value).replicas == 2
        with pytest.raises(ZeroDivisionError):  # rolled back: nobody hears of it
            with s.transaction():
                s.put_service(Rec("web", replicas=3))
                1 / 0
        s.delete_service("api")
        await cache.wait_for(s.kv.revision)
        assert seen[1:] == [["services/api"]] and cache.get("services/api") is None
        assert decode(Rec, cache.get("services/web").value).replicas == 2
        n.cancel_scope.cancel()


def test_old_events_are_trimmed_past_the_kept_number(tmp_path):
    from deployfs.state.store import EVENTS_TRIM_EVERY
    s = SqliteStore(str(tmp_path), events_kept=5)
    with s.transaction():
        for i in range(EVENTS_TRIM_EVERY - 1):
            s.append_event("web", i // 500, float(i), f"e{i}")
    s.append_event("api", 0, 0.0, "another service's")
    assert len(s.events("web", 0)) + len(s.events("web", 1)) == EVENTS_TRIM_EVERY - 1
    s.append_event("web", 1, 0.0, "the thousandth")
    kept = s.events("web", 0) + s.events("web", 1)
    assert [e.text for e in kept] == [f"e{i}" for i in range(EVENTS_TRIM_EVERY - 6, EVENTS_TRIM_EVERY - 1)] + ["the thousandth"]
    assert s.last_event("web").text == "the thousandth" and [e.text for e in s.events("api", 0)] == ["another service's"]


def test_a_fresh_database_says_nothing_about_moving_records(tmp_path, caplog):
    """"0 records of the previous version moved" on every first start told a newcomer nothing."""
    import logging
    with caplog.at_level(logging.INFO):
        SqliteStore(str(tmp_path)).close()
    assert "moved into the key-value store" not in caplog.text
