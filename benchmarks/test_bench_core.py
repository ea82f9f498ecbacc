"""The native core against what a Python user would take instead, in one run.

  table   insert + lookup + remove: AllocationTable per call and in batches over numpy
          arrays (GIL released) vs a dict guarded by a threading.Lock
  wheel   schedule + cancel: TimerWheel per call and in batches vs heapq with lazy
          cancellation, sched.scheduler, and asyncio's call_later / cancel
  expire  schedule N timers and advance past them all (every timer fires) vs heapq pops
  memory  reserve + populate 64 MiB: reserve_memory vs a plain mmap(MAP_POPULATE) made
          through libc (the limit) and vs Python's mmap module + touching every page
  touch   first write to every page of 64 MiB: a reserved region vs a cold mmap
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
