"""``routes/<svc>`` through the engine's Store facade: a record like any other (every Store has it)."""

from deployfs.state.records import RouteRecord, decode, route_key
from deployfs.state.store import SqliteStore


def test_put_list_delete_route(tmp_path):
    store = SqliteStore(str(tmp_path / "state"))
    try:
        rec = RouteRecord("web", 8080, "http", [["127.0.1.1", 20001, "n1"]], None)
        store.put_route(rec)
        store.put_route(RouteRecord("api", 9090))
        assert store.list_routes() == [RouteRecord("api", 9090), rec]  # sorted by key
        assert decode(RouteRecord, store._get(route_key("web"))) == rec
        store.delete_route("api")
        assert [r.service for r in store.list_routes()] == ["web"]
    finally:
        store.close()
