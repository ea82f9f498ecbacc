"""The engine against the pure-Python preallocator a user would write instead
(pure_python_engine.py), in one run.

  pair      request_preallocation + release_allocation through the public API with a
            no-op strategy (the engine's own overhead), each allocation carrying an
            expiry: prealloc vs the pure-Python engine with heapq, sched and
            threading.Timer expiry
  latency   prediction to ALLOCATED through the worker (the 'allocated' event), no-op
            strategy: p50 / p99 recorded in extra_info; the same through the pure-Python
            engine's worker
  footprint bytes of RSS per tracked allocation with 1,000,000 live allocations
"""
from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

from conftest import per_item
from prealloc import (
    NullAllocationStrategy,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from pure_python_engine import PurePythonPreallocator

CUSTOM = ResourceType.CUSTOM
PAIRS = 20_000


def _ours() -> ResourcePreallocator:
    return ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: NullAllocationStrategy()},
                                resource_monitors={})


def _pairs(allocator, n: int) -> None:
    request = ResourceRequest(CUSTOM, 1.0, duration=60.0)
    request_preallocation, release = allocator.request_preallocation, allocator.release_allocation
    for _ in range(n):
        release(request_preallocation(request).allocation_id)


@pytest.mark.benchmark(group="engine: request+release pair, no-op strategy")
def test_pair_prealloc(benchmark):
    with _ours() as engine:
        per_item(benchmark, PAIRS)
        benchmark.pedantic(_pairs, args=(engine, PAIRS), rounds=7, warmup_rounds=1)
        assert len(engine) == 0


@pytest.mark.parametrize("timers", ["heapq", "sched", "timer"])
@pytest.mark.benchmark(group="engine: request+release pair, no-op strategy")
def test_pair_pure_python(benchmark, timers):
    engine = PurePythonPreallocator({CUSTOM: NullAllocationStrategy()}, timers=timers)
    n = PAIRS if timers != "timer" else PAIRS // 10  # a thread per timer: keep the round short
    try:
        per_item(benchmark, n, baseline=timers == "heapq")
        benchmark.pedantic(_pairs, args=(engine, n), rounds=7, warmup_rounds=1)
        assert not engine.allocations
    finally:
        engine.close()


@pytest.mark.benchmark(group="engine: request+release pair, interleaved with the heapq engine")
def test_pair_interleaved_ratio(benchmark):
    """Ours and the heapq engine in alternating rounds of the same work, so that the load
    of this shared machine hits both alike; extra_info gets the median of the per-round
    ratios (heapq time / our time). The per-item time covers both engines' rounds."""
    ours = _ours()
    theirs = PurePythonPreallocator({CUSTOM: NullAllocationStrategy()}, timers="heapq")
    n, rounds = 5_000, 15
    ratios: list[float] = []
    ours_s: list[float] = []

    def timed(engine) -> float:
        start = time.perf_counter()
        _pairs(engine, n)
        return time.perf_counter() - start

    def run() -> None:
        for r in range(rounds):
            if r % 2:
                a, b = timed(ours), timed(theirs)
            else:
                b, a = timed(theirs), timed(ours)
            ours_s.append(a)
            ratios.append(b / a)

    try:
        _pairs(ours, n)
        _pairs(theirs, n)  # warm both
        per_item(benchmark, n * rounds)
        benchmark.pedantic(run, rounds=1)
        benchmark.extra_info["ratio_vs_heapq_median"] = round(float(np.median(ratios)), 2)
        benchmark.extra_info["ratio_min_max"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
        benchmark.extra_info["ours_ns_per_pair_median"] = round(float(np.median(ours_s)) / n * 1e9)
    finally:
        ours.close()
        theirs.close()


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    a = np.array(samples_ns, dtype=np.float64) / 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


LATENCY_SAMPLES = 2_000


@pytest.mark.benchmark(group="engine: prediction to ALLOCATED through the worker")
def test_latency_prealloc(benchmark):
    """One request at a time, so each sample is the worker's wake-up + allocation, not
    queueing behind other requests."""
    with _ours() as engine:
        done = threading.Event()
        stamp: list[int] = [0]
        engine.on("allocated", lambda allocation: (stamp.__setitem__(0, time.perf_counter_ns()), done.set()))
        samples: list[int] = []

        def run() -> None:
            for _ in range(LATENCY_SAMPLES):
                done.clear()
                start = time.perf_counter_ns()
                rid = engine.submit(ResourceRequest(CUSTOM, 1.0))
                done.wait(5)
                samples.append(stamp[0] - start)
                engine.release_allocation(rid)

        per_item(benchmark, LATENCY_SAMPLES)
        benchmark.pedantic(run, rounds=1)
        p50, p99 = _percentiles(samples)
        benchmark.extra_info.update(p50_ms=round(p50, 4), p99_ms=round(p99, 4))


@pytest.mark.benchmark(group="engine: prediction to ALLOCATED through the worker")
def test_latency_pure_python(benchmark):
    engine = PurePythonPreallocator({CUSTOM: NullAllocationStrategy()})
    done = threading.Event()
    stamp: list[int] = [0]
    ids: list[int] = []
    engine.events.on("allocated", lambda allocation: (ids.append(allocation.allocation_id),
                                                      stamp.__setitem__(0, time.perf_counter_ns()), done.set()))
    samples: list[int] = []

    def run() -> None:
        for _ in range(LATENCY_SAMPLES):
            done.clear()
            start = time.perf_counter_ns()
            engine.submit(ResourceRequest(CUSTOM, 1.0))
            done.wait(5)
            samples.append(stamp[0] - start)
            engine.release_allocation(ids[-1])

    try:
        per_item(benchmark, LATENCY_SAMPLES, baseline=True)
        benchmark.pedantic(run, rounds=1)
        p50, p99 = _percentiles(samples)
        benchmark.extra_info.update(p50_ms=round(p50, 4), p99_ms=round(p99, 4))
    finally:
        engine.close()


FOOTPRINT = int(os.environ.get("PREALLOC_FOOTPRINT_ALLOCATIONS", 1_000_000))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.benchmark(group="engine: RSS bytes per tracked allocation")
def test_footprint_prealloc(benchmark):
    request = ResourceRequest(CUSTOM, 1.0)

    def run() -> None:
        gc.collect()
        with ResourcePreallocator(translator=None, capacity=FOOTPRINT, resource_monitors={},
                                  allocation_strategies={CUSTOM: NullAllocationStrategy()}) as engine:
            before = _rss()
            for _ in range(FOOTPRINT):
                engine.request_preallocation(request)
            gc.collect()
            benchmark.extra_info["bytes_per_allocation"] = round((_rss() - before) / FOOTPRINT, 1)
            assert len(engine) == FOOTPRINT

    per_item(benchmark, FOOTPRINT)
    benchmark.pedantic(run, rounds=1)


@pytest.mark.benchmark(group="engine: RSS bytes per tracked allocation")
def test_footprint_pure_python(benchmark):
    request = ResourceRequest(CUSTOM, 1.0)

    def run() -> None:
        gc.collect()
        engine = PurePythonPreallocator({CUSTOM: NullAllocationStrategy()})
        try:
            before = _rss()
            for _ in range(FOOTPRINT):
                engine.request_preallocation(request)
            gc.collect()
            benchmark.extra_info["bytes_per_allocation"] = round((_rss() - before) / FOOTPRINT, 1)
        finally:
            engine.close()
            engine.allocations.clear()

    per_item(benchmark, FOOTPRINT, baseline=True)
    benchmark.pedantic(run, rounds=1)


# ---- small requests behind large ones: one allocation worker vs two ----------------

MIXED_ROUNDS = 12
BIG_MIB = 128


@pytest.mark.benchmark(group="engine: small request behind a 128 MiB populate, submit to ALLOCATED")
@pytest.mark.parametrize("workers", [1, 2])
def test_small_behind_large(benchmark, workers):
    """Each round queues a 128 MiB MEMORY request (the real strategy: mmap + populate,
    milliseconds) and right behind it a no-op CUSTOM one; the time is the small one's
    submit -> ALLOCATED. With one worker it waits for the populate; with two it does not.
    p50/p99 go to extra_info; the per-item time is the round's median."""
    from prealloc import MemoryAllocationStrategy

    memory = MemoryAllocationStrategy(lock=False)
    with ResourcePreallocator(translator=None, resource_monitors={}, allocation_workers=workers,
                              allocation_strategies={CUSTOM: NullAllocationStrategy(),
                                                     ResourceType.MEMORY: memory}) as engine:
        allocated: dict[int, int] = {}
        both = threading.Semaphore(0)
        engine.on("allocated", lambda a: (allocated.__setitem__(a.allocation_id, time.perf_counter_ns()),
                                          both.release()))
        samples: list[int] = []

        def run() -> None:
            for _ in range(MIXED_ROUNDS):
                big = engine.submit(ResourceRequest(ResourceType.MEMORY, float(BIG_MIB), priority=1.0))
                start = time.perf_counter_ns()
                small = engine.submit(ResourceRequest(CUSTOM, 1.0))
                assert both.acquire(timeout=30) and both.acquire(timeout=30)
                samples.append(allocated[small] - start)
                engine.release_allocation(big)
                engine.release_allocation(small)

        per_item(benchmark, MIXED_ROUNDS, baseline=workers == 1)
        benchmark.pedantic(run, rounds=1)
        p50, p99 = _percentiles(samples)
        benchmark.extra_info.update(p50_ms=round(p50, 3), p99_ms=round(p99, 3))
