"""The timer wheel against a sorted-list model; the expiry ticker on its native thread."""
from __future__ import annotations

import asyncio
import selectors
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prealloc import core

TICK = 1_000_000  # 1 ms
START = 1_000 * TICK  # a tick multiple, so tick boundaries are the same from 0 or from start

# Delays that land in every level of the wheel (64 ms, 4 s, 4 min, 4.7 h, 12 days, 2 years)
# and beyond its span.
delays = st.one_of(
    st.integers(0, 64 * TICK),
    st.integers(0, 64**2 * TICK),
    st.integers(0, 64**4 * TICK),
    st.integers(0, 64**6 * TICK * 2),
)


def rounded(deadline: int) -> int:
    return -(-deadline // TICK) * TICK


class WheelModel(RuleBasedStateMachine):
    """A timer fires exactly when an advance reaches its deadline rounded up to a tick:
    never early, never twice, never missed."""

    def __init__(self) -> None:
        super().__init__()
        self.wheel = core.TimerWheel(tick_ns=TICK, start_ns=START, capacity=64)
        self.now = START
        self.pending: dict[int, tuple[int, int]] = {}  # timer id -> (deadline, value)
        self.overdue: set[int] = set()  # scheduled at or after their deadline: fire next advance
        self.done: list[int] = []
        self.next_value = 0

    @rule(delay=delays, past=st.booleans())
    def schedule(self, delay, past):
        deadline = max(0, self.now - delay) if past else self.now + delay
        if len(self.pending) == 64:
            with pytest.raises(OSError):
                self.wheel.schedule_ns(deadline, 0)
            return
        self.next_value += 1
        tid = self.wheel.schedule_ns(deadline, self.next_value)
        assert tid not in self.pending and tid not in self.done[-64:]
        self.pending[tid] = (deadline, self.next_value)
        if deadline <= self.now:
            self.overdue.add(tid)

    @rule(data=st.data())
    def cancel(self, data):
        if self.pending and data.draw(st.booleans()):
            tid = data.draw(st.sampled_from(sorted(self.pending)))
            assert self.wheel.cancel(tid) is True
            del self.pending[tid]
            self.overdue.discard(tid)
            self.done.append(tid)
        elif self.done:
            tid = data.draw(st.sampled_from(self.done))
            assert self.wheel.cancel(tid) is False  # fired or cancelled already

    @rule(step=delays)
    def advance(self, step):
        self.now += step
        values, deadlines = self.wheel.advance_ns(self.now)
        due = {tid: dv for tid, dv in self.pending.items()
               if tid in self.overdue or rounded(dv[0]) <= self.now}
        assert sorted(values.tolist()) == sorted(v for _, v in due.values())
        assert all(d <= self.now for d in deadlines.tolist()), "fired early"
        # in deadline-tick order; timers overdue when scheduled come first
        overdue_values = {self.pending[tid][1] for tid in self.overdue if tid in self.pending}
        order = [0 if v in overdue_values else rounded(d) for v, d in zip(values.tolist(), deadlines.tolist())]
        assert order == sorted(order), "not fired in deadline order"
        for tid in due:
            del self.pending[tid]
            self.overdue.discard(tid)
            self.done.append(tid)

    @invariant()
    def agrees(self):
        assert len(self.wheel) == len(self.pending)
        wakeup = self.wheel.next_wakeup_ns()
        if not self.pending:
            assert wakeup is None
        else:
            earliest = min(rounded(d) for d, _ in self.pending.values())
            assert wakeup is not None and wakeup <= max(earliest, self.now)


WheelModel.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestWheelModel = WheelModel.TestCase


def test_batch_schedule_and_cancel():
    wheel = core.TimerWheel(tick_ns=TICK, start_ns=START)
    deadlines = START + np.arange(1, 10_001, dtype=np.uint64) * TICK
    ids = wheel.schedule_many_ns(deadlines, np.arange(10_000, dtype=np.uint64))
    assert len(wheel) == 10_000
    assert wheel.cancel_many(ids[::2]) == 5_000
    assert wheel.cancel_many(ids[::2]) == 0
    values, _ = wheel.advance_ns(START + 10_000 * TICK)
    assert sorted(values.tolist()) == list(range(1, 10_000, 2))
    assert len(wheel) == 0


def _records(table, n, status=core.ALLOCATED):
    return table.insert_many(np.zeros(n, np.uint32), np.ones(n), status=status)


def test_ticker_expires_records_by_cas_and_wakes_a_selector():
    table = core.AllocationTable(1024)
    with core.ExpiryTicker(table) as ticker:
        ids = _records(table, 100)
        deadline = core.monotonic_ns() + 30 * TICK
        for rid in ids.tolist():
            ticker.schedule_ns(rid, deadline)
        # half of them are released first: those must not expire
        released = ids[:50]
        assert table.transition_many(released, [core.ALLOCATED], core.RELEASING).all()
        sel = selectors.DefaultSelector()
        sel.register(ticker.fileno(), selectors.EVENT_READ)
        got: list[int] = []
        end = time.monotonic() + 120  # a hang guard: a loaded machine fires late, never early
        while len(got) < 50 and time.monotonic() < end:
            if sel.select(timeout=1):
                got.extend(ticker.drain().tolist())
        sel.close()
        assert sorted(got) == sorted(ids[50:].tolist())
        now = core.monotonic_ns()
        for rid in ids[50:].tolist():
            rec = table.get(rid)
            assert rec.status == core.EXPIRED
            assert rec.expires_ns == deadline and rec.updated_ns >= deadline, "expired early"
            assert rec.updated_ns <= now
        assert (table.status_many(released) == core.RELEASING).all()
        assert ticker.pending == 0 and ticker.queued == 0


def test_ticker_wait_releases_the_gil_and_returns_ids():
    table = core.AllocationTable(64)
    with core.ExpiryTicker(table) as ticker:
        rid = _records(table, 1)[0]
        ticker.schedule(int(rid), time.monotonic() + 0.02)
        ids = ticker.wait(timeout=120)  # returns at the expiry; the bound only guards a hang
        assert ids.tolist() == [rid]
        assert ticker.wait(timeout=0.01).size == 0  # nothing more: times out empty


def test_ticker_plugs_into_asyncio():
    table = core.AllocationTable(64)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[int]] = loop.create_future()
        with core.ExpiryTicker(table) as ticker:
            loop.add_reader(ticker.fileno(), lambda: done.set_result(ticker.drain().tolist())
                            if not done.done() else None)
            rid = int(_records(table, 1)[0])
            ticker.schedule(rid, time.monotonic() + 0.01)
            try:
                return [rid] + await asyncio.wait_for(done, 5)
            finally:
                loop.remove_reader(ticker.fileno())

    rid, *expired = asyncio.run(main())
    assert expired == [rid]


def test_cancelled_expiry_never_fires_and_stale_records_are_refused():
    table = core.AllocationTable(64)
    ticker = core.ExpiryTicker(table, start=False)
    rid = int(_records(table, 1)[0])
    timer = ticker.schedule_ns(rid, START)
    assert table.get(rid).timer == timer
    assert ticker.cancel(timer) is True
    assert ticker.cancel(timer) is False
    assert ticker.advance_ns(core.monotonic_ns() + 10 * TICK) == 0
    assert table.status(rid) == core.ALLOCATED
    table.transition(rid, [core.ALLOCATED], core.FAILED)
    with pytest.raises(KeyError):
        ticker.schedule_ns(rid, START)  # final: no expiry to schedule
    table.remove(rid)
    with pytest.raises(KeyError):
        ticker.schedule_ns(rid, START)  # stale
    ticker.close()
    assert ticker.closed
    with pytest.raises(ValueError):
        ticker.fileno()


def test_expire_from_limits_which_statuses_expire():
    table = core.AllocationTable(64)
    ticker = core.ExpiryTicker(table, expire_from=[core.ALLOCATED], start=False)
    allocated, active = (int(x) for x in _records(table, 2))
    table.transition(active, [core.ALLOCATED], core.ACTIVE)
    for rid in (allocated, active):
        ticker.schedule_ns(rid, core.monotonic_ns())
    assert ticker.advance_ns(core.monotonic_ns() + 2 * TICK) == 1
    assert ticker.drain().tolist() == [allocated]
    assert table.status(active) == core.ACTIVE
    ticker.close()
