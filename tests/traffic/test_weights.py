"""The built-in router's weighted choice (canary_weight), as pure logic: no sockets."""

from collections import Counter

from deployfs.traffic.router import Route, smooth_weighted

A, B, C, D = ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3), ("127.0.0.1", 4)


def test_every_hundred_picks_hold_each_weight_exactly():
    backends, weights, credit = [A, B, C, D], {A: 30, B: 30, C: 30, D: 10}, {}
    picks = [smooth_weighted(backends, weights, credit) for _ in range(300)]
    for start in (0, 100, 200):
        assert Counter(picks[start:start + 100]) == {A: 30, B: 30, C: 30, D: 10}
    # spread out, not in bursts: the canary never gets two in a row
    assert all(not (x == D and y == D) for x, y in zip(picks, picks[1:]))


def test_route_candidates_weighted_first_then_the_rest_for_failover():
    r = Route("web", 8080, backends=[A, B, C], weights={A: 0, B: 90, C: 10})
    seen = Counter()
    for _ in range(100):
        order = r.candidates("roundrobin")
        assert sorted(order) == [A, B, C] and order[-1] == A  # weight 0: only when every other one refused
        seen[order[0]] += 1
    assert seen == {B: 90, C: 10}
    r.active = {B: 9, C: 0}
    assert r.candidates("leastconn")[0] == C  # fewest connections per unit of weight
    assert Route("web", 8080, backends=[A, B]).candidates("roundrobin") in ([A, B], [B, A])  # no weights: as before


async def test_haproxy_learns_the_weights_in_force_when_it_adopts_haproxy(tmp_path):
    # Adopted mid-canary, the weights haproxy runs with come from its configuration: a table
    # without weights later must know to put them back to 1.
    from deployfs.traffic.haproxy import HAProxyRouter

    before = HAProxyRouter(str(tmp_path))
    before.live = {"web": (8080, {"s127_0_0_1_1": (A, False), "s127_0_0_1_2": (B, False)})}
    before.weights = {"web": {"s127_0_0_1_1": 90, "s127_0_0_1_2": 10}}
    before._write()
    after = HAProxyRouter(str(tmp_path))

    async def cmd(line: str, **kw: object) -> str:
        return "1\n# be_id be_name srv_id srv_name ...\n"  # no server state rows: the config is what counts here
    after.cmd = cmd  # type: ignore[method-assign]
    await after._read_live()
    assert after.weights == {"web": {"s127_0_0_1_1": 90, "s127_0_0_1_2": 10}}
    assert set(after.live) == {"web"}
