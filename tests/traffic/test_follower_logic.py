"""The follower's decisions (traffic/follower.py), as pure functions: what a node's router gets
of a route record, and which removed backends it drains."""

from deployfs.state.records import RouteAck, RouteRecord, decode, encode
from deployfs.traffic.follower import ack_value, decode_route, effective, nodes_of, to_drain

REC = RouteRecord("web", 8080, "http", [["10.0.0.1", 5000, "n1"], ["10.0.0.2", 5001, "n2"], ["10.0.0.3", 5002, ""]],
                  [10, 45, 45])


def test_a_dead_nodes_backends_are_left_out_with_their_weights():
    assert effective(REC, lambda n: True) == (8080, [("10.0.0.1", 5000), ("10.0.0.2", 5001), ("10.0.0.3", 5002)],
                                              [10, 45, 45], "http")
    # n2 down: its backend goes at once; a backend of no known node ("") stays.
    assert effective(REC, lambda n: n != "n2") == (8080, [("10.0.0.1", 5000), ("10.0.0.3", 5002)], [10, 45], "http")
    assert effective(REC, lambda n: False) == (8080, [("10.0.0.3", 5002)], [45], "http")


def test_liveness_alone_never_empties_a_table():
    rec = RouteRecord("web", 80, "tcp", [["a", 1, "n1"], ["b", 2, "n2"]], None)
    assert effective(rec, lambda n: False) == (80, [("a", 1), ("b", 2)], None, "tcp")


def test_only_zero_weights_left_become_an_even_share():
    rec = RouteRecord("web", 80, "tcp", [["a", 1, "n1"], ["b", 2, "n2"]], [0, 100])
    assert effective(rec, lambda n: n == "n1") == (80, [("a", 1)], None, "tcp")


def test_no_record_or_no_port_closes_the_port():
    assert effective(None, lambda n: True) == (None, [], None, "tcp")
    assert effective(RouteRecord("web", None), lambda n: True)[0] is None


def test_weights_that_do_not_match_the_backends_are_ignored():
    rec = RouteRecord("web", 80, "tcp", [["a", 1, "n1"], ["b", 2, "n1"]], [5])
    assert effective(rec, lambda n: True)[2] is None


def test_removed_backends_are_drained_unless_their_node_is_down_or_the_port_moved():
    before = (80, [("a", 1), ("b", 2), ("c", 3)], None, "tcp")
    after = (80, [("a", 1)], None, "tcp")
    assert to_drain(before, after) == [("b", 2), ("c", 3)]
    assert to_drain(before, after, down=[("c", 3)]) == [("b", 2)]
    assert to_drain(before, (81, [("a", 1)], None, "tcp")) == []  # another port: the old listener is gone
    assert to_drain(before, (None, [], None, "tcp")) == []
    assert to_drain(None, after) == []
    assert to_drain(after, before) == []  # only added


def test_nodes_of_and_acks_round_trip():
    assert nodes_of(REC)[("10.0.0.2", 5001)] == "n2" and nodes_of(None) == {}
    ack = ack_value("n1", 42, {("b", 2), ("a", 1)}, None)
    assert ack == RouteAck("n1", 42, [["a", 1], ["b", 2]], "")
    assert decode(RouteAck, encode(ack)) == ack
    assert decode_route("web", encode(REC)) == REC
    assert decode_route("web", b"not json") is None


class FakeRouter:
    """The follower's view of a router, in memory: what it was given."""

    def __init__(self) -> None:
        self.given: dict[str, tuple] = {}

    def set_backends(self, service, port, backends, weights=None, *, protocol="tcp") -> None:
        self.given[service] = (port, list(backends))

    def routed(self) -> bool:
        return True

    async def wait_routed(self) -> None:
        pass

    async def drain(self, service, backend, timeout):
        return 0

    def failure(self, service):
        return None


async def test_an_answer_lost_with_its_lease_is_written_again_under_the_next(tmp_path):
    import trio

    from deployfs.state.records import routed_key
    from deployfs.state.store import SqliteStore
    from deployfs.traffic.follower import Follower

    store = SqliteStore(str(tmp_path / "state"))
    try:
        cache, router = store.cache(), FakeRouter()
        lease = [(await store.records.grant(60)).id]
        follower = Follower(cache, store.records, router, "n1", lease=lambda: lease[0])

        async def answer() -> RouteAck:
            """Our answer, once the cache shows it under the lease the node holds now."""
            with trio.fail_after(5):
                while (kv := cache.get(routed_key("web", "n1"))) is None or kv.lease != lease[0]:
                    await trio.sleep(0.01)
            return decode(RouteAck, kv.value)

        async with trio.open_nursery() as n:
            await n.start(cache.run)
            await n.start(follower.run)
            store.put_route(REC)
            first = await answer()
            assert router.given["web"][0] == 8080 and first.revision > 0
            old, lease[0] = lease[0], (await store.records.grant(60)).id  # the node rejoined under a new lease ...
            await store.records.revoke(old)
            again = await answer()  # ... and its answer is back, under that lease
            assert again.revision == first.revision
            store.delete_route("web")  # the service is gone: so are its router's table and our answer
            with trio.fail_after(5):
                while cache.get(routed_key("web", "n1")) is not None:
                    await trio.sleep(0.01)
            assert router.given["web"] == (None, [])
            n.cancel_scope.cancel()
    finally:
        store.close()

