"""DISK_IO benchmarks, each side by side with what a user would do instead, in one run.

Part 1 — reserving space: DiskStrategy.allocate + claim of N MiB (fallocate, a file
handed over) against writing N MiB of zeros and fsync (what "make sure the space is
there" means without fallocate: posix_fallocate's emulation, or dd).

Part 2 — I/O priority: two direct-I/O (O_DIRECT, 4 KiB random reads, no page cache)
readers of the same device, each in its own process: reader A (1 thread, queue depth 1,
the latency-sensitive one) and reader B (4 threads, the noisy neighbour). Run without a
reservation (both at the default priority) and with one (A's thread claims a DiskStrategy
allocation with io_priority, B stays default, or B idle). Reports each reader's
throughput and A's latency p50/p99. Whether anything changes is the device scheduler's
business (monitors.disk.BlockDevice.priority_effect); the script prints it.

    python benchmarks/bench_disk.py [--dir DIR] [--seconds S] [--mib N]
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import threading
import time

from prealloc.monitors.disk import block_device_of
from prealloc.strategies.disk import DiskStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

MIB = 1024 * 1024
BLOCK = 4096


def reserve_with_strategy(directory: str, mib: int) -> float:
    strategy = DiskStrategy(headroom_mib=0, journal=None)
    t0 = time.perf_counter()
    grant = strategy.allocate(ResourceRequest(ResourceType.DISK_IO, mib, metadata=RequestMetadata(
        custom_properties={"directory": directory, "keep_size": False, "name": "bench-reserved"})), mib, None)
    claim = strategy.claim(grant.handle)
    elapsed = time.perf_counter() - t0
    assert os.fstat(claim.fd).st_blocks * 512 >= mib * MIB
    os.close(claim.fd)
    os.unlink(claim.path)
    strategy.release(grant.handle)
    return elapsed


def reserve_by_writing(directory: str, mib: int) -> float:
    path = os.path.join(directory, "bench-written")
    chunk = bytes(MIB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    for _ in range(mib):
        os.write(fd, chunk)
    os.fsync(fd)
    elapsed = time.perf_counter() - t0
    os.close(fd)
    os.unlink(path)
    return elapsed


def make_data_file(directory: str, mib: int) -> str:
    path = os.path.join(directory, "bench-data")
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


def _reader(path: str, threads: int, seconds: float, priority: str | None, out: mp.Queue) -> None:
    """One reader process: `threads` threads of O_DIRECT 4 KiB random reads."""
    size = os.path.getsize(path)
    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(threads)]
    strategy = DiskStrategy(headroom_mib=0, journal=None)

    def run(i: int) -> None:
        grant = None
        if priority is not None:  # this thread claims the reservation: ioprio_set on itself
            grant = strategy.allocate(ResourceRequest(ResourceType.DISK_IO, 1, metadata=RequestMetadata(
                custom_properties={"mode": "none", "io_priority": priority, "directory": os.path.dirname(path)})),
                1, None)
            strategy.claim(grant.handle)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        rng = random.Random(i)
        blocks = size // BLOCK
        mine = latencies[i]
        while time.monotonic() < stop:
            offset = rng.randrange(blocks) * BLOCK
            t0 = time.perf_counter()
            os.preadv(fd, [buf], offset)
            mine.append(time.perf_counter() - t0)
        os.close(fd)
        if grant is not None:
            strategy.release(grant.handle)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put([x for per in latencies for x in per])


def contend(path: str, seconds: float, a_priority: str | None, b_priority: str | None) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    qa, qb = ctx.Queue(), ctx.Queue()
    a = ctx.Process(target=_reader, args=(path, 1, seconds, a_priority, qa))
    b = ctx.Process(target=_reader, args=(path, 4, seconds, b_priority, qb))
    a.start()
    b.start()
    la, lb = qa.get(), qb.get()
    a.join()
    b.join()
    la.sort()
    return {"a_iops": len(la) / seconds, "b_iops": len(lb) / seconds,
            "a_p50_us": la[len(la) // 2] * 1e6, "a_p99_us": la[int(len(la) * 0.99)] * 1e6,
            "b_p99_us": sorted(lb)[int(len(lb) * 0.99)] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="a directory on the device to measure (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        device = block_device_of(directory)
        print(f"device: {device.name or 'none'} scheduler: {device.scheduler}; {device.priority_effect()}")

        print(f"\n## reserving {args.mib} MiB (median of 3)")
        fast = statistics.median(reserve_with_strategy(directory, args.mib) for _ in range(3))
        slow = statistics.median(reserve_by_writing(directory, args.mib) for _ in range(3))
        print("| method | ms | ratio |\n|---|---:|---:|")
        print(f"| DiskStrategy allocate+claim (fallocate) | {fast * 1e3:.2f} | 1.0 |")
        print(f"| write zeros + fsync | {slow * 1e3:.2f} | {slow / fast:.0f}x slower |")

        print(f"\n## two O_DIRECT readers, {args.seconds:g} s each run, {args.mib} MiB file")
        path = make_data_file(directory, args.mib)
        root = os.geteuid() == 0
        runs = [("no reservation (both default)", None, None),
                ("A best-effort:0, B default", "best-effort:0", None),
                ("A best-effort:0, B idle", "best-effort:0", "idle")]
        if root:
            runs.insert(1, ("A realtime:0, B default", "realtime:0", None))
        print("| run | A IOPS | A p50 us | A p99 us | B IOPS (4 threads) | B p99 us |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, pa, pb in runs:
            r = contend(path, args.seconds, pa, pb)
            print(f"| {label} | {r['a_iops']:.0f} | {r['a_p50_us']:.0f} | {r['a_p99_us']:.0f} | "
                  f"{r['b_iops']:.0f} | {r['b_p99_us']:.0f} |")


if __name__ == "__main__":
    main()
