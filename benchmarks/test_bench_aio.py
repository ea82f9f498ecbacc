"""The event loop's worst stall while 64 MiB MEMORY reservations (mapped and populated)
are made from asyncio: through prealloc.aio's AsyncPreallocator (the request is queued
for the allocator's worker and awaited on the readiness eventfd through
loop.add_reader) against what a user would write instead, ``await
loop.run_in_executor(None, pre.request_preallocation, request)``.

A lag monitor on the loop sleeps 1 ms at a time and records how late each wake-up is;
the worst lateness during a batch is the loop's worst stall. The two ways alternate
batch by batch in one run (interleaved), each batch making RESERVATIONS reservations
one after another and releasing each (off the loop, the same way for both). Figures go
to extra_info: worst stall, p99 of the lag, and the batch time, per way, and their
ratios; a batch of the sync call made on the loop itself (what both avoid) shows the
stall the monitor sees when the loop is blocked, and an idle batch (no reservations, the same monitor) gives the machine's own lag.
The benchmark's own timing is of one interleaved round.

    python -m pytest benchmarks/test_bench_aio.py -s
"""
from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from conftest import per_item
from prealloc import MemoryAllocationStrategy, ResourcePreallocator, ResourceRequest, ResourceType
from prealloc.aio import AsyncPreallocator

MEM = ResourceType.MEMORY
RESERVATION_MIB = 64
RESERVATIONS = 8
PAIRS = 10


async def _lag_monitor(samples: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        samples.append(max(0.0, loop.time() - before - 0.001))


async def _batch(reserve) -> tuple[float, float, float]:
    samples: list[float] = []
    stop = asyncio.Event()
    monitor = asyncio.ensure_future(_lag_monitor(samples, stop))
    await asyncio.sleep(0.005)  # the monitor is running
    start = time.perf_counter()
    for _ in range(RESERVATIONS):
        await reserve()
        await asyncio.sleep(0)  # the loop may run between reservations (the blocking way's only chance)
    elapsed = time.perf_counter() - start
    stop.set()
    await monitor
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))] if samples else 0.0
    return (samples[-1] if samples else 0.0), p99, elapsed


async def _run_pairs(pairs: int) -> dict[str, list[tuple[float, float, float]]]:
    pre = ResourcePreallocator(allocation_strategies={MEM: MemoryAllocationStrategy(populate=True)}, headroom={})
    results: dict[str, list[tuple[float, float, float]]] = {"aio": [], "executor": [], "blocking": [], "idle": []}
    loop = asyncio.get_running_loop()
    async with AsyncPreallocator(pre) as face:
        async def through_face() -> None:
            snap = await face.request_preallocation(ResourceRequest(MEM, RESERVATION_MIB))
            assert snap.allocated_amount == RESERVATION_MIB
            await face.release_allocation(snap.allocation_id)

        async def through_executor() -> None:
            snap = await loop.run_in_executor(None, pre.request_preallocation, ResourceRequest(MEM, RESERVATION_MIB))
            assert snap.allocated_amount == RESERVATION_MIB
            await loop.run_in_executor(None, pre.release_allocation, snap.allocation_id)

        async def blocking() -> None:  # the sync call on the loop: what both ways avoid
            snap = pre.request_preallocation(ResourceRequest(MEM, RESERVATION_MIB))
            assert snap.allocated_amount == RESERVATION_MIB
            pre.release_allocation(snap.allocation_id)

        async def idle() -> None:  # the loop's lag on this machine with nothing to reserve
            await asyncio.sleep(0.01)

        await _batch(through_face)  # warm both paths (threads, first mmap)
        await _batch(through_executor)
        for i in range(pairs):
            order = [("aio", through_face), ("executor", through_executor), ("blocking", blocking),
                     ("idle", idle)]
            for name, way in order if i % 2 == 0 else reversed(order):
                results[name].append(await _batch(way))
    return results


def _summary(results: dict[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rows in results.items():
        out[f"{name}_worst_stall_ms"] = max(r[0] for r in rows) * 1e3
        out[f"{name}_median_worst_stall_ms"] = statistics.median(r[0] for r in rows) * 1e3
        out[f"{name}_p99_lag_ms"] = statistics.median(r[1] for r in rows) * 1e3
        out[f"{name}_batch_ms"] = statistics.median(r[2] for r in rows) * 1e3
    out["stall_ratio_executor_over_aio"] = out["executor_median_worst_stall_ms"] / max(
        out["aio_median_worst_stall_ms"], 1e-6)
    out["time_ratio_executor_over_aio"] = out["executor_batch_ms"] / max(out["aio_batch_ms"], 1e-6)
    return out


@pytest.mark.benchmark(group="aio-64MiB")
def test_loop_stall_aio_face_vs_run_in_executor(benchmark):
    collected: dict[str, list[tuple[float, float, float]]] = {"aio": [], "executor": [], "blocking": [], "idle": []}

    def one_pair() -> None:
        for name, rows in asyncio.run(_run_pairs(1)).items():
            collected[name].extend(rows)

    benchmark.pedantic(one_pair, rounds=PAIRS, iterations=1)
    per_item(benchmark, 2 * RESERVATIONS)
    summary = _summary(collected)
    benchmark.extra_info.update({k: round(v, 3) for k, v in summary.items()})
    print()
    for key, value in summary.items():
        print(f"  {key:36s} {value:9.3f}")


if __name__ == "__main__":
    for key, value in _summary(asyncio.run(_run_pairs(PAIRS))).items():
        print(f"{key:36s} {value:9.3f}")
