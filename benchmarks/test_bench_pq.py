"""The native priority queue against heapq guarded by a threading.Lock, in one run.

  per call   push + pop of N items one call at a time: PriorityQueue vs heapq + Lock
             (the same key: priority desc, confidence desc, deadline asc, arrival)
  batch      push_many + pop_many over numpy arrays (the GIL released inside) vs the
             same heapq + Lock per item
  threads    2 producers + 2 consumers moving N items: batch calls vs heapq + Lock
  interleaved  the batch and threads shapes again, ours and the baseline taking turns
             round by round (load on a shared machine hits both alike): the median of the
             per-round ratios is the figure to read (extra_info)
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
import time

import numpy as np
import pytest

from conftest import per_item
from prealloc import core

N = 20_000
rng = np.random.default_rng(3)
IDS = np.arange(1, N + 1, dtype=np.uint64)
PRIORITIES = rng.integers(0, 8, N).astype(np.float64)
CONFIDENCES = rng.random(N)
DEADLINES = np.where(rng.random(N) < 0.5, np.nan, rng.random(N) * 100)
ITEMS = list(zip(IDS.tolist(), PRIORITIES.tolist(), CONFIDENCES.tolist(),
                 [None if math.isnan(d) else d for d in DEADLINES.tolist()]))

# the batch group also runs at 2e5 items (issue [pq-speed]: 2e4 and 2e5)
N_LARGE = 200_000
_rng_large = np.random.default_rng(5)
LARGE = (np.arange(1, N_LARGE + 1, dtype=np.uint64), _rng_large.integers(0, 8, N_LARGE).astype(np.float64),
         _rng_large.random(N_LARGE),
         np.where(_rng_large.random(N_LARGE) < 0.5, np.nan, _rng_large.random(N_LARGE) * 100))


def _batch_arrays(n):
    return (IDS, PRIORITIES, CONFIDENCES, DEADLINES) if n == N else LARGE


def _items(n):
    if n == N:
        return ITEMS
    ids, p, c, d = LARGE
    return list(zip(ids.tolist(), p.tolist(), c.tolist(), [None if math.isnan(x) else x for x in d.tolist()]))


class LockedHeap:
    """What a Python user writes: heapq + threading.Lock with the same order."""

    def __init__(self) -> None:
        self.heap: list = []
        self.lock = threading.Lock()
        self.arrival = itertools.count()

    def push(self, rid, priority, confidence, deadline) -> None:
        key = (-priority, -confidence, math.inf if deadline is None else deadline, next(self.arrival), rid)
        with self.lock:
            heapq.heappush(self.heap, key)

    def pop(self):
        with self.lock:
            return heapq.heappop(self.heap)[-1] if self.heap else None


@pytest.mark.benchmark(group="pq: push+pop per call")
@pytest.mark.parametrize("indexed", [False, True])
def test_pq_native_per_call(benchmark, indexed):
    q = core.PriorityQueue(indexed=indexed)

    def run():
        push, pop = q.push, q.pop
        for rid, p, c, d in ITEMS:
            push(rid, p, c, d)
        for _ in range(N):
            pop()

    per_item(benchmark, N)
    benchmark(run)
    assert len(q) == 0


@pytest.mark.benchmark(group="pq: push+pop per call")
def test_pq_baseline_heapq_lock(benchmark):
    h = LockedHeap()

    def run():
        push, pop = h.push, h.pop
        for rid, p, c, d in ITEMS:
            push(rid, p, c, d)
        for _ in range(N):
            pop()

    per_item(benchmark, N, baseline=True)
    benchmark(run)


@pytest.mark.parametrize("n", [N, N_LARGE], ids=["2e4", "2e5"])
@pytest.mark.parametrize("indexed", [False, True])
def test_pq_native_batch(benchmark, indexed, n):
    benchmark.group = f"pq: push+pop batch, {n} items"
    q = core.PriorityQueue(indexed=indexed)
    ids, p, c, d = _batch_arrays(n)

    def run():
        q.push_many(ids, p, c, d)
        assert q.pop_many(n).size == n

    per_item(benchmark, n)
    benchmark(run)


@pytest.mark.parametrize("n", [N, N_LARGE], ids=["2e4", "2e5"])
def test_pq_batch_baseline_heapq_lock(benchmark, n):
    benchmark.group = f"pq: push+pop batch, {n} items"
    h = LockedHeap()
    items = _items(n)

    def run():
        for rid, p, c, d in items:
            h.push(rid, p, c, d)
        for _ in range(n):
            h.pop()

    per_item(benchmark, n, baseline=True)
    benchmark.pedantic(run, rounds=3 if n == N_LARGE else 10)


def _threaded(push_chunk, pop_chunk) -> None:
    chunks = np.array_split(np.arange(N), 2)
    popped = [0]
    lock = threading.Lock()
    done = threading.Event()

    def produce(idx):
        for part in np.array_split(idx, 20):
            push_chunk(part)

    def consume():
        got = 0
        while True:
            n = pop_chunk()
            got += n
            if n == 0 and done.is_set():
                n = pop_chunk()
                got += n
                if n == 0:
                    break
        with lock:
            popped[0] += got

    producers = [threading.Thread(target=produce, args=(c,)) for c in chunks]
    consumers = [threading.Thread(target=consume) for _ in range(2)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    for t in consumers:
        t.join()
    assert popped[0] == N


@pytest.mark.benchmark(group="pq: 2 producers + 2 consumers")
def test_pq_threads_native_batch(benchmark):
    q = core.PriorityQueue(indexed=False)

    def push_chunk(idx):
        q.push_many(IDS[idx], PRIORITIES[idx], CONFIDENCES[idx], DEADLINES[idx])

    def pop_chunk():
        return q.pop_many(256).size

    per_item(benchmark, N)
    benchmark.pedantic(_threaded, args=(push_chunk, pop_chunk), rounds=5)


@pytest.mark.benchmark(group="pq: 2 producers + 2 consumers")
def test_pq_threads_baseline_heapq_lock(benchmark):
    h = LockedHeap()

    def push_chunk(idx):
        for i in idx.tolist():
            h.push(*ITEMS[i])

    def pop_chunk():
        n = 0
        while n < 256 and h.pop() is not None:
            n += 1
        return n

    per_item(benchmark, N, baseline=True)
    benchmark.pedantic(_threaded, args=(push_chunk, pop_chunk), rounds=5)


def _median(xs: list[float]) -> float:
    return float(np.median(np.array(xs)))


def _interleave(benchmark, items: int, rounds: int, kinds: dict) -> None:
    """Each round times every kind once, in a rotating order; extra_info gets, for each kind
    but the baseline ("heapq"), the median of the per-round ratios heapq time / its time."""
    names = list(kinds)
    times: dict[str, list[float]] = {k: [] for k in names}

    def run() -> None:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                start = time.perf_counter()
                kinds[k]()
                times[k].append(time.perf_counter() - start)

    for k in names:  # warm every kind once (node caches, heapq's list)
        kinds[k]()
    per_item(benchmark, items * rounds * len(names))
    benchmark.pedantic(run, rounds=1)
    for k in names:
        if k == "heapq":
            continue
        ratios = [b / a for a, b in zip(times[k], times["heapq"])]
        benchmark.extra_info[f"{k}_vs_heapq_median"] = round(_median(ratios), 2)
        benchmark.extra_info[f"{k}_ratio_min_max"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
        benchmark.extra_info[f"{k}_ns_per_item"] = round(_median(times[k]) / items * 1e9)
    benchmark.extra_info["heapq_ns_per_item"] = round(_median(times["heapq"]) / items * 1e9)


@pytest.mark.parametrize("n", [N, N_LARGE], ids=["2e4", "2e5"])
def test_pq_batch_interleaved_ratio(benchmark, n):
    """push_many + pop_many of n items (unindexed and indexed queues) against heapq + Lock
    per item, taking turns round by round."""
    benchmark.group = f"pq: push+pop batch, {n} items, interleaved rounds"
    ids, p, c, d = _batch_arrays(n)
    items = _items(n)
    queues = {False: core.PriorityQueue(indexed=False), True: core.PriorityQueue(indexed=True)}
    h = LockedHeap()

    def native(indexed):
        q = queues[indexed]

        def run():
            q.push_many(ids, p, c, d)
            assert q.pop_many(n).size == n
        return run

    def heap():
        for item in items:
            h.push(*item)
        for _ in range(n):
            h.pop()

    _interleave(benchmark, n, 5 if n == N_LARGE else 11,
                {"unindexed": native(False), "indexed": native(True), "heapq": heap})


def test_pq_threads_interleaved_ratio(benchmark):
    """The 2 producers + 2 consumers shape, ours (batch calls) and heapq + Lock taking turns."""
    benchmark.group = "pq: 2 producers + 2 consumers, interleaved rounds"
    q = core.PriorityQueue(indexed=False)
    h = LockedHeap()

    def ours_push(idx):
        q.push_many(IDS[idx], PRIORITIES[idx], CONFIDENCES[idx], DEADLINES[idx])

    def heap_push(idx):
        for i in idx.tolist():
            h.push(*ITEMS[i])

    def heap_pop():
        got = 0
        while got < 256 and h.pop() is not None:
            got += 1
        return got

    _interleave(benchmark, N, 7, {"batch": lambda: _threaded(ours_push, lambda: q.pop_many(256).size),
                                  "heapq": lambda: _threaded(heap_push, heap_pop)})
