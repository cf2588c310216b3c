import trio

from deployfs.node.ticker import Ticker


async def test_sleepers_wake_on_the_first_tick_after_their_deadline(nursery, autojump_clock):
    t = Ticker(quantum=0.05)
    nursery.start_soon(t.run)
    woke = {}

    async def sleeper(name, deadline):
        await t.sleep_until(deadline)
        woke[name] = trio.current_time()

    for name, d in [("a", 1.0), ("b", 1.01), ("c", 0.3), ("d", 1.049)]:
        nursery.start_soon(sleeper, name, d)
    await trio.sleep(2)
    assert all(d <= woke[n] < d + 0.05 + 1e-9 for n, d in [("a", 1.0), ("b", 1.01), ("c", 0.3), ("d", 1.049)])
    assert woke["b"] == woke["d"]  # one tick woke both


async def test_a_cancelled_sleeper_does_not_disturb_the_others(nursery, autojump_clock):
    t = Ticker(quantum=0.05)
    nursery.start_soon(t.run)
    done = []
    with trio.move_on_after(0.1):
        await t.sleep_until(5)
    nursery.start_soon(lambda: _sleep_and_mark(t, 0.5, done))
    await trio.sleep(1)
    assert done == [True]


async def _sleep_and_mark(t, d, done):
    await t.sleep_until(d)
    done.append(True)


async def test_finer_periods_sleep_alone(autojump_clock):
    t = Ticker(quantum=0.05)
    t0 = trio.current_time()
    await t.sleep_until(t0 + 0.013, quantum=0.005)  # no runner needed
    assert t0 + 0.013 <= trio.current_time() < t0 + 0.02
