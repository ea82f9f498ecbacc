"""The native priority queue against heapq, exactly, and under Python threads."""
from __future__ import annotations

import heapq
import itertools
import math
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prealloc import core

# Few distinct values, so ties on priority, confidence and deadline are common.
priorities = st.sampled_from([-1.0, 0.0, 1.0, 2.5, 1e9])
confidences = st.sampled_from([0.0, 0.25, 0.5, 1.0])
deadlines = st.one_of(st.none(), st.sampled_from([0.0, 1.5, 100.0, float("inf")]))


class HeapModel:
    """The order the queue promises, written as a heapq key."""

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self.arrival = itertools.count()
        self.cancelled: set[int] = set()
        self.queued: set[int] = set()

    def push(self, rid: int, priority: float, confidence: float, deadline: float | None) -> None:
        d = math.inf if deadline is None else deadline
        heapq.heappush(self.heap, (-priority, -confidence, d, next(self.arrival), rid))
        self.queued.add(rid)

    def pop(self) -> int | None:
        while self.heap:
            *_, arrival, rid = heapq.heappop(self.heap)
            if (rid, arrival) in self.cancelled:
                continue
            self.queued.discard(rid)
            return rid
        return None

    def cancel(self, rid: int) -> bool:
        for *_, arrival, r in self.heap:
            if r == rid and (r, arrival) not in self.cancelled:
                self.cancelled.add((r, arrival))
                self.queued.discard(rid)
                return True
        return False


class QueueVersusHeapq(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue = core.PriorityQueue()
        self.model = HeapModel()
        self.ids = itertools.count(1)

    @rule(p=priorities, c=confidences, d=deadlines, reuse=st.booleans())
    def push(self, p, c, d, reuse):
        if reuse and self.model.queued:
            rid = min(self.model.queued)
            with pytest.raises(ValueError, match="already queued"):
                self.queue.push(rid, p, c, d)
            return
        rid = next(self.ids)
        self.queue.push(rid, p, c, d)
        self.model.push(rid, p, c, d)

    @rule()
    def pop(self):
        assert self.queue.pop() == self.model.pop()

    @rule(n=st.integers(0, 5))
    def pop_many(self, n):
        expected = [x for x in (self.model.pop() for _ in range(n)) if x is not None]
        assert self.queue.pop_many(n).tolist() == expected

    @precondition(lambda self: self.model.queued)
    @rule(data=st.data())
    def cancel_queued(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model.queued)))
        assert self.queue.cancel(rid) is True
        assert self.model.cancel(rid) is True

    @rule()
    def cancel_unknown(self):
        assert self.queue.cancel(10**12) is False

    @invariant()
    def agrees(self):
        assert len(self.queue) == len(self.model.queued)
        if self.model.queued:
            top = self.queue.peek()
            assert top in self.model.queued
            ordered = sorted(e for e in self.model.heap if (e[-1], e[-2]) not in self.model.cancelled)
            assert top == ordered[0][-1]
        else:
            assert self.queue.peek() is None


QueueVersusHeapq.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestQueueVersusHeapq = QueueVersusHeapq.TestCase


def test_pop_item_reports_the_key():
    q = core.PriorityQueue()
    q.push(5, 2.0, 0.5, None)
    q.push(6, 2.0, 0.5, 3.0)
    assert q.pop_item()[:4] == (6, 2.0, 0.5, 3.0)  # a deadline beats none
    assert q.pop_item()[:4] == (5, 2.0, 0.5, None)
    assert q.pop_item() is None


@pytest.mark.parametrize("args", [(1, math.nan, 0.5, None), (1, 1.0, math.nan, None), (1, 1.0, 0.5, -math.inf)])
def test_bad_keys_raise_and_push_nothing(args):
    q = core.PriorityQueue()
    with pytest.raises(ValueError):
        q.push(*args)
    assert len(q) == 0


def test_push_many_validates_before_pushing_anything():
    q = core.PriorityQueue()
    ids = np.arange(1, 6, dtype=np.uint64)
    bad = np.array([1, 2, math.nan, 4, 5], dtype=np.float64)
    with pytest.raises(ValueError, match="element 2"):
        q.push_many(ids, bad, np.zeros(5), np.full(5, math.nan))
    assert len(q) == 0
    q.push(3, 0.0)
    with pytest.raises(ValueError, match="already queued"):
        q.push_many(ids, np.ones(5), np.zeros(5), np.full(5, math.nan))
    assert len(q) == 1 and q.pop() == 3  # the two pushed before the duplicate were withdrawn


@pytest.mark.parametrize("n", [10, 70_000])  # one group, and more than one (65 536 per group)
def test_indexed_push_many_is_all_or_nothing(n):
    q = core.PriorityQueue()
    rng = np.random.default_rng(5)
    ids = np.arange(1, n + 1, dtype=np.uint64)
    prio = rng.integers(0, 50, n).astype(np.float64)
    ids[-1] = ids[0]  # given twice: the call fails and leaves nothing queued
    with pytest.raises(ValueError, match="already queued"):
        q.push_many(ids, prio, np.zeros(n), np.full(n, math.nan))
    assert len(q) == 0 and q.pop() is None
    assert q.cancel(int(ids[1])) is False  # its ids are not in the index either
    ids[-1] = n + 1
    q.push_many(ids, prio, np.zeros(n), np.full(n, math.nan))
    assert len(q) == n
    out = q.pop_many(n)
    # priority descending, equal priorities in input order
    assert sorted(out.tolist(), key=lambda i: (-prio[np.searchsorted(ids, i)], i)) == out.tolist()


@pytest.mark.parametrize("ids, error", [
    (np.arange(-2, 3), ValueError),                     # int64 with negatives: a cast would wrap them
    ([1, -1, 2], ValueError),
    ([1, 2**64, 3], ValueError),                        # beyond uint64
    (np.array([1.0, 2.5, 3.0]), TypeError),             # a cast would truncate 2.5
    (np.array([True, False, True]), TypeError),
    (["1", "2", "3"], TypeError),
], ids=["negative-int64", "negative-list", "too-large", "float", "bool", "str"])
def test_push_many_refuses_ids_a_cast_would_change_and_pushes_nothing(ids, error):
    q = core.PriorityQueue()
    with pytest.raises(error, match="request ids"):
        q.push_many(ids, np.zeros(3), np.zeros(3), np.full(3, math.nan))
    assert len(q) == 0


def test_push_many_takes_ids_of_any_integer_dtype_in_range():
    q = core.PriorityQueue()
    q.push_many(np.arange(1, 4, dtype=np.int64), np.zeros(3), np.zeros(3), np.full(3, math.nan))
    q.push_many([4, 2**64 - 1], np.ones(2), np.zeros(2), np.full(2, math.nan))
    assert sorted(q.pop_many(10).tolist()) == [1, 2, 3, 4, 2**64 - 1]


def test_pop_many_of_more_than_the_queue_holds_allocates_for_what_it_holds():
    q = core.PriorityQueue(indexed=False)
    q.push_many(np.arange(1, 11, dtype=np.uint64), np.arange(10.0), np.zeros(10), np.full(10, math.nan))
    out = q.pop_many(2**40)  # an 8 TiB array if sized by n
    assert out.tolist() == list(range(10, 0, -1)) and len(q) == 0
    assert q.pop_many(2**40).size == 0


def test_table_refuses_negative_ids():
    table = core.AllocationTable(16)
    with pytest.raises(ValueError, match="0.."):
        table.status_many(np.array([-1, 2]))


def test_unindexed_queue_allows_duplicates_but_not_cancel():
    q = core.PriorityQueue(indexed=False)
    q.push(1, 1.0)
    q.push(1, 1.0)
    assert len(q) == 2
    with pytest.raises(TypeError):
        q.cancel(1)


@pytest.mark.parametrize("indexed", [True, False])
def test_threads_with_batch_calls_conserve_every_item(indexed):
    q = core.PriorityQueue(indexed=indexed)
    producers, per_producer, consumers = 3, 20_000, 3
    popped: list[np.ndarray] = []
    lock = threading.Lock()
    done = threading.Event()

    def produce(k: int) -> None:
        rng = np.random.default_rng(k)  # a Generator per thread: they are not thread safe
        ids = np.arange(k * per_producer + 1, (k + 1) * per_producer + 1, dtype=np.uint64)
        for chunk in np.array_split(ids, 40):
            n = len(chunk)
            q.push_many(chunk, rng.integers(0, 4, n).astype(np.float64), np.zeros(n),
                        np.full(n, math.nan))

    def consume() -> None:
        mine = []
        while True:
            got = q.pop_many(512)
            if got.size:
                mine.append(got)
            elif done.is_set() and len(q) == 0:
                break
        with lock:
            popped.extend(mine)

    cs = [threading.Thread(target=consume) for _ in range(consumers)]
    ps = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in cs + ps:
        t.start()
    for t in ps:
        t.join()
    done.set()
    for t in cs:
        t.join()
    everything = np.concatenate(popped)
    assert everything.size == producers * per_producer
    assert np.array_equal(np.sort(everything), np.arange(1, producers * per_producer + 1, dtype=np.uint64))


def _vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_forked_child_reclaims_while_a_parent_thread_was_inside_a_call():
    """fork() while another thread is inside a batch call (so inside a reclamation
    critical section): the child must still free what it retires (src/native/epoch.c,
    "fork"). Before the fix the child's copy of that thread stayed "active" forever and the
    child's queue churn kept every node: ~100 B per pushed item, 20+ MiB here."""
    import os

    stop = threading.Event()
    inside = threading.Event()
    n = 1_000_000
    ids = np.arange(n, dtype=np.uint64)
    prio = np.zeros(n)

    def churn():
        q = core.PriorityQueue(indexed=False)
        while not stop.is_set():
            inside.set()
            q.push_many(ids, prio, prio, prio)  # ~all of it inside sections, GIL released
            q.pop_many(n)

    t = threading.Thread(target=churn)
    t.start()
    try:
        assert inside.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: churn a fresh queue, measure its own RSS growth
            code = 1
            try:
                q = core.PriorityQueue(indexed=False)
                m = 20_000
                small = np.arange(m, dtype=np.uint64)
                z = np.zeros(m)
                q.push_many(small, z, z, z)
                q.pop_many(m)
                before = _vm_rss_kib()
                for _ in range(12):
                    q.push_many(small, z, z, z)
                    assert q.pop_many(m).size == m
                grown = _vm_rss_kib() - before
                code = 0 if grown < 12 * 1024 else 3  # stuck reclamation: ~240k nodes, > 20 MiB
                if code:
                    os.write(2, f"child RSS grew {grown} KiB\n".encode())
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        t.join()
