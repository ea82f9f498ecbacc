"""The native core against what a Python user would take instead, in one run.

  table   insert + lookup + remove: AllocationTable per call and in batches over numpy
          arrays (GIL released) vs a dict guarded by a threading.Lock
  wheel   schedule + cancel: TimerWheel per call and in batches vs heapq with lazy
          cancellation, sched.scheduler, and asyncio's call_later / cancel
  expire  schedule N timers and advance past them all (every timer fires) vs heapq pops
  memory  reserve + populate 64 MiB: reserve_memory vs a plain mmap(MAP_POPULATE) made
          through libc (the limit) and vs Python's mmap module + touching every page
  touch   first write to every page of 64 MiB: a reserved region vs a cold mmap
  first pass  a full first pass of writes over 16 MiB, 256 MiB and 1 GiB, interleaved rounds: the
          MEMORY strategy's default reservation made ahead (a prealloc hit: only the pass
          is timed) vs np.empty + the pass and a plain mmap + the pass (what a user does
          instead), and vs the strategy on base pages (what the huge-page default buys)
  monitor MEMORY availability per call: a fresh sample vs cached_availability, with and
          without a subscription (the engine's headroom check at every need)
"""
from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import mmap
import sched
import threading
import time

import numpy as np
import pytest

from conftest import per_item
from prealloc import core
from prealloc.monitors import SystemResourceMonitor
from prealloc.strategies.memory import MemoryAllocationStrategy
from prealloc.types import ResourceRequest, ResourceType

N = 10_000
TICK = 1_000_000
MiB = 1 << 20

# ---------------------------------------------------------------- table


@pytest.mark.benchmark(group="table: insert+get+remove")
def test_table_native_per_call(benchmark):
    table = core.AllocationTable(1 << 16)
    insert, get, transition, remove = table.insert, table.status, table.transition, table.remove

    def run():
        for _ in range(N):
            rid = insert(0, 1.0)
            get(rid)
            transition(rid, core.PENDING, core.RELEASED)
            remove(rid)

    per_item(benchmark, N)
    benchmark(run)
    assert len(table) == 0


@pytest.mark.benchmark(group="table: insert+get+remove")
def test_table_native_batch(benchmark):
    table = core.AllocationTable(1 << 16)
    types, amounts = np.zeros(N, np.uint32), np.ones(N)

    def run():
        ids = table.insert_many(types, amounts)
        table.status_many(ids)
        table.transition_many(ids, core.PENDING, core.RELEASED)
        table.remove_many(ids)

    per_item(benchmark, N)
    benchmark(run)
    assert len(table) == 0


@pytest.mark.benchmark(group="table: insert+get+remove")
def test_table_baseline_dict_lock(benchmark):
    records: dict[int, list] = {}
    lock = threading.Lock()
    ids = itertools.count(1)

    def run():
        for _ in range(N):
            with lock:
                rid = next(ids)
                records[rid] = [0, 0, 1.0]
            with lock:
                records[rid][0]
            with lock:
                rec = records[rid]
                if rec[0] == 0:
                    rec[0] = 4
            with lock:
                del records[rid]

    per_item(benchmark, N, baseline=True)
    benchmark(run)
    assert not records


# ---------------------------------------------------------------- wheel


@pytest.mark.benchmark(group="wheel: schedule+cancel")
def test_wheel_native_per_call(benchmark):
    wheel = core.TimerWheel(tick_ns=TICK, start_ns=0, capacity=1 << 16)
    schedule, cancel = wheel.schedule_ns, wheel.cancel

    def run():
        for i in range(N):
            cancel(schedule(5_000 * TICK + i * 1000, i))

    per_item(benchmark, N)
    benchmark(run)
    assert len(wheel) == 0


@pytest.mark.benchmark(group="wheel: schedule+cancel")
def test_wheel_native_batch(benchmark):
    wheel = core.TimerWheel(tick_ns=TICK, start_ns=0, capacity=1 << 16)
    deadlines = 5_000 * TICK + np.arange(N, dtype=np.uint64) * 1000
    values = np.arange(N, dtype=np.uint64)

    def run():
        wheel.cancel_many(wheel.schedule_many_ns(deadlines, values))

    per_item(benchmark, N)
    benchmark(run)
    assert len(wheel) == 0


@pytest.mark.benchmark(group="wheel: schedule+cancel")
def test_wheel_baseline_heapq_lazy_cancel(benchmark):
    heap: list = []
    cancelled: set[int] = set()
    seq = itertools.count()

    def run():
        for i in range(N):
            entry = (5.0 + i * 1e-6, next(seq), i)
            heapq.heappush(heap, entry)
            cancelled.add(entry[1])
        while heap:  # lazy cancellation: each cancelled entry is popped and skipped later
            _, key, _ = heapq.heappop(heap)
            cancelled.discard(key)

    per_item(benchmark, N, baseline=True)
    benchmark(run)


@pytest.mark.benchmark(group="wheel: schedule+cancel")
def test_wheel_baseline_sched(benchmark):
    scheduler = sched.scheduler(time.monotonic)

    def run():
        for i in range(N):
            scheduler.cancel(scheduler.enterabs(5.0 + i * 1e-6, 0, print))

    per_item(benchmark, N)
    benchmark(run)


@pytest.mark.benchmark(group="wheel: schedule+cancel")
def test_wheel_baseline_asyncio(benchmark):
    loop = asyncio.new_event_loop()

    def run():
        for i in range(N):
            loop.call_later(5.0 + i * 1e-6, print).cancel()

    per_item(benchmark, N)
    try:
        benchmark(run)
    finally:
        loop.close()


@pytest.mark.benchmark(group="wheel: schedule+fire")
def test_expire_native(benchmark):
    wheel = core.TimerWheel(tick_ns=TICK, start_ns=0, capacity=1 << 16)
    offsets = np.arange(N, dtype=np.uint64) * 100_000
    values = np.arange(N, dtype=np.uint64)
    clock = itertools.count(1)

    def run():
        base = next(clock) * 10_000 * TICK
        wheel.schedule_many_ns(base + offsets, values)
        fired, _ = wheel.advance_ns(base + N * 100_000 + TICK)
        assert fired.size == N

    per_item(benchmark, N)
    benchmark(run)


@pytest.mark.benchmark(group="wheel: schedule+fire")
def test_expire_baseline_heapq(benchmark):
    heap: list = []

    def run():
        for i in range(N):
            heapq.heappush(heap, (i * 1e-4, i))
        fired = []
        while heap and heap[0][0] <= N * 1e-4:
            fired.append(heapq.heappop(heap)[1])
        assert len(fired) == N

    per_item(benchmark, N, baseline=True)
    benchmark(run)


# ---------------------------------------------------------------- memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_POPULATE = 0x8000
SIZE = 64 * MiB
PAGE = mmap.PAGESIZE


@pytest.mark.benchmark(group="memory: reserve+populate 64 MiB")
def test_reserve_native(benchmark):
    def run():
        core.reserve_memory(SIZE).release()

    per_item(benchmark, 1)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)


@pytest.mark.benchmark(group="memory: reserve+populate 64 MiB")
def test_reserve_baseline_c_mmap_populate(benchmark):
    def run():
        address = _libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        _libc.munmap(address, SIZE)

    per_item(benchmark, 1, baseline=True)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)


@pytest.mark.benchmark(group="memory: reserve+populate 64 MiB")
def test_reserve_baseline_python_mmap_touch(benchmark):
    def run():
        m = mmap.mmap(-1, SIZE)
        np.frombuffer(m, dtype=np.uint8)[::PAGE] = 1  # fault every page in
        m.close()

    per_item(benchmark, 1)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)


@pytest.mark.benchmark(group="touch: first write to every page of 64 MiB")
def test_first_touch_reserved(benchmark):
    def setup():
        region = core.reserve_memory(SIZE)
        return (region,), {}

    def run(region):
        np.frombuffer(region, dtype=np.uint8)[::PAGE] = 1
        region.release()

    per_item(benchmark, SIZE // PAGE)
    benchmark.pedantic(run, setup=setup, rounds=15)


@pytest.mark.benchmark(group="touch: first write to every page of 64 MiB")
def test_first_touch_baseline_cold_mmap(benchmark):
    def setup():
        return (mmap.mmap(-1, SIZE),), {}

    def run(m):
        np.frombuffer(m, dtype=np.uint8)[::PAGE] = 1
        m.close()

    per_item(benchmark, SIZE // PAGE, baseline=True)
    benchmark.pedantic(run, setup=setup, rounds=15)


# ---------------------------------------------------------------- first pass of writes

def _first_pass_prealloc(strategy: MemoryAllocationStrategy, nbytes: int) -> tuple[float, float]:
    """(seconds to reserve ahead of need, seconds of the first pass at the hit)."""
    mib = nbytes / MiB
    start = time.perf_counter()
    grant = strategy.allocate(ResourceRequest(ResourceType.MEMORY, mib), mib, None)
    reserved = time.perf_counter()
    try:
        np.frombuffer(grant.handle, dtype=np.uint8).fill(1)
        return reserved - start, time.perf_counter() - reserved
    finally:
        strategy.release(grant.handle)


def _first_pass_np_empty(nbytes: int) -> tuple[float, float]:
    start = time.perf_counter()
    array = np.empty(nbytes, dtype=np.uint8)
    array.fill(1)
    elapsed = time.perf_counter() - start
    del array
    return 0.0, elapsed


def _first_pass_mmap(nbytes: int) -> tuple[float, float]:
    start = time.perf_counter()
    # MAP_PRIVATE: Python's default for an anonymous mmap is MAP_SHARED (shmem, slower faults)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(m, dtype=np.uint8).fill(1)
    elapsed = time.perf_counter() - start
    m.close()
    return 0.0, elapsed


# 16 MiB: under glibc's dynamic mmap threshold (up to 32 MiB), where a freed block is
# reused warm by the next np.empty; 256 MiB and 1 GiB: always fresh mappings
@pytest.mark.parametrize("size_mib, rounds", [(16, 31), (256, 9), (1024, 5)])
@pytest.mark.benchmark(group="first pass of writes, interleaved rounds")
def test_first_pass_interleaved_ratio(benchmark, size_mib, rounds):
    """Each round runs every variant once, in an order that rotates from round to round,
    so the load of this shared machine hits them alike. extra_info: each variant's
    median pass time (for np.empty and mmap the allocation is in it: that is what the
    user waits for), the prealloc variants' median time to reserve ahead of need, and
    the median of the per-round ratios (variant pass / prealloc pass; > 1: the prealloc
    hit is faster). The per-item time is one variant's round, setup included."""
    nbytes = size_mib * MiB
    default = MemoryAllocationStrategy()  # the engine's default MEMORY strategy
    base_pages = MemoryAllocationStrategy(huge_pages=False)
    variants = {
        "prealloc": lambda: _first_pass_prealloc(default, nbytes),
        "prealloc_base_pages": lambda: _first_pass_prealloc(base_pages, nbytes),
        "np_empty": lambda: _first_pass_np_empty(nbytes),
        "mmap": lambda: _first_pass_mmap(nbytes),
    }
    names = list(variants)
    reserve: dict[str, list[float]] = {name: [] for name in names}
    passes: dict[str, list[float]] = {name: [] for name in names}

    def run() -> None:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                ahead, at_need = variants[name]()
                reserve[name].append(ahead)
                passes[name].append(at_need)

    for name in names:  # warm: page tables, numpy's and glibc's first-call costs
        variants[name]()
    per_item(benchmark, rounds * len(names))
    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info["huge_pages_default"] = default.uses_huge_pages(nbytes)
    for name in names:
        benchmark.extra_info[f"{name}_pass_ms"] = round(float(np.median(passes[name])) * 1e3, 2)
    for name in ("prealloc", "prealloc_base_pages"):
        benchmark.extra_info[f"{name}_reserve_ms"] = round(float(np.median(reserve[name])) * 1e3, 2)
    for name in names[1:]:
        ratios = [t / p for t, p in zip(passes[name], passes["prealloc"])]
        benchmark.extra_info[f"{name}_over_prealloc"] = round(float(np.median(ratios)), 2)


# ---------------------------------------------------------------- monitor availability

AVAILABILITY_CALLS = 2_000


@pytest.mark.benchmark(group="monitor: MEMORY availability per call")
def test_availability_baseline_fresh_sample(benchmark):
    with SystemResourceMonitor() as monitor:
        def run():
            for _ in range(AVAILABILITY_CALLS // 10):
                monitor.get_resource_availability(ResourceType.MEMORY)

        per_item(benchmark, AVAILABILITY_CALLS // 10, baseline=True)
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="monitor: MEMORY availability per call")
def test_availability_cached_unsubscribed(benchmark):
    with SystemResourceMonitor() as monitor:
        def run():
            for _ in range(AVAILABILITY_CALLS):
                monitor.cached_availability(ResourceType.MEMORY)

        per_item(benchmark, AVAILABILITY_CALLS)
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="monitor: MEMORY availability per call")
def test_availability_cached_subscribed(benchmark):
    with SystemResourceMonitor() as monitor:
        monitor.subscribe_to_resource_changes(ResourceType.MEMORY, lambda availability: None)
        monitor.cached_availability(ResourceType.MEMORY)

        def run():
            for _ in range(AVAILABILITY_CALLS):
                monitor.cached_availability(ResourceType.MEMORY)

        per_item(benchmark, AVAILABILITY_CALLS)
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
