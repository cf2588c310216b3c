"""One timer for many sleepers.

Every instance's health loop sleeps until its next probe.  With a deadline
each, a thousand instances make the event loop manage a thousand timers and
wake a thousand times a second.  Here sleepers share ticks (``quantum``
seconds apart): each tick is one Event, and one task sleeps until the
earliest tick and sets it.  Waking 50 tasks with one Event costs about what
waking one does.
"""

from __future__ import annotations

import heapq
import math

import trio


class Ticker:
    def __init__(self, quantum: float = 0.05) -> None:
        self.quantum = quantum
        self._ticks: dict[int, trio.Event] = {}
        self._heap: list[int] = []
        self._changed = trio.Event()

    async def sleep_until(self, deadline: float, quantum: float | None = None) -> None:
        """Sleep until the first tick at or after ``deadline`` (never more than a quantum late)."""
        q = min(self.quantum, quantum) if quantum else self.quantum
        k = math.ceil(deadline / q) if q == self.quantum else None
        if k is None:  # a finer period than the shared tick: sleep alone
            await trio.sleep_until(math.ceil(deadline / q) * q)
            return
        ev = self._ticks.get(k)
        if ev is None:
            ev = self._ticks[k] = trio.Event()
            heapq.heappush(self._heap, k)
            if self._heap[0] == k:
                self._changed.set()  # a new earliest tick: the runner must wake sooner
        await ev.wait()

    async def run(self) -> None:
        while True:
            self._changed = trio.Event()
            if not self._heap:
                await self._changed.wait()
                continue
            with trio.move_on_at(self._heap[0] * self.quantum):
                await self._changed.wait()
                continue
            now = trio.current_time()
            while self._heap and self._heap[0] * self.quantum <= now:
                self._ticks.pop(heapq.heappop(self._heap)).set()
