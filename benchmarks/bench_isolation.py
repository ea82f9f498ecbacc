"""Wake-up lateness of a latency thread on a reserved core while 3 CPU hogs run, at each
isolation level of the CPU strategy, side by side with no reservation and with the
hand-made reference (the thread pinned and the hogs moved off the core by `taskset -p`).

The latency thread wakes every 1 ms (target_{i+1} = target_i + 1 ms), records how late
it woke (now - target_i), then does a fixed compute (a loop of about 0.1 ms); when it
has fallen a whole period behind, the next target is one period from now (so one long
preemption counts once rather than making every later wake-up late too). The hogs
are 3 processes spinning forever, started unpinned before each variant and killed after.

Variants (interleaved: each round runs every variant once, in a rotated order; >= 7 rounds):
  none       the thread unpinned, no reservation
  affinity   CpuAllocationStrategy isolation="affinity": the thread pinned by its claim
  registry   isolation="registry": the same pin plus the machine registry's lock
  cpuset     isolation="cpuset": every task this process may move (the hogs, and the
             machine's other tasks) moved off the core for the allocation
  priority   isolation="priority": the thread pinned and SCHED_FIFO 10 (nice -10 where
             real-time is refused)
  reference  the thread pinned with os.sched_setaffinity, the hogs `taskset -p`-ed off
             the core by hand
  reference_all  the same, but every task of the machine that may be moved (not kernel
             threads, not this process) is taken off the core by sched_setaffinity —
             what `taskset -pa` over `ps -e` does; masks put back after (where still ours)

Output: p50 / p99 / p99.9 lateness (µs) per variant over every round's samples, and each
variant's p99 relative to the reference's (the goal: cpuset within 10 %). Run as root for
the cpuset and priority levels; unprivileged runs report them as not effective (with the
reason) and measure what they got.

    python benchmarks/bench_isolation.py [--rounds 7] [--wakeups 1000] [--core N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from prealloc import core
from prealloc.strategies.cpu import CpuAllocationStrategy
from prealloc.types import ResourceRequest, ResourceType

VARIANTS = ("none", "affinity", "registry", "cpuset", "priority", "reference", "reference_all")
PERIOD_NS = 1_000_000
HOGS = 3


def _compute() -> int:
    total = 0
    for i in range(1500):  # about 0.1 ms of CPython
        total += i * i
    return total


def latency_loop(wakeups: int) -> list[int]:
    """The latency thread's body: lateness of each wake-up in ns."""
    lateness = []
    target = time.monotonic_ns() + PERIOD_NS
    for _ in range(wakeups):
        now = time.monotonic_ns()
        if target > now:
            time.sleep((target - now) / 1e9)
        woke = time.monotonic_ns()
        lateness.append(woke - target)
        _compute()
        target += PERIOD_NS
        now = time.monotonic_ns()
        if target <= now:  # a period missed: the next wake-up is one period from now, so one
            target = now + PERIOD_NS  # preemption is counted once, not again by every later wake-up
    return lateness


def start_hogs() -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOGS)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.send_signal(signal.SIGKILL)
    for hog in hogs:
        hog.wait()


def _user_tids() -> list[int]:
    me = os.getpid()
    tids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                if not int(stat[stat.rindex(")") + 2:].split()[6]) & 0x00200000:  # PF_KTHREAD
                    tids.append(int(tid))
        except OSError:
            continue
    return tids


def move_everyone_off(reserved_core: int) -> dict[int, tuple[set[int], set[int]]]:
    """tid -> (previous mask, mask set) for every task moved off the core by hand."""
    moved = {}
    for tid in _user_tids():
        try:
            previous = os.sched_getaffinity(tid)
            if reserved_core in previous and previous - {reserved_core}:
                os.sched_setaffinity(tid, previous - {reserved_core})
                moved[tid] = (previous, previous - {reserved_core})
        except OSError:
            continue
    return moved


def put_everyone_back(moved: dict[int, tuple[set[int], set[int]]]) -> None:
    for tid, (previous, applied) in moved.items():
        try:
            if os.sched_getaffinity(tid) == applied:
                os.sched_setaffinity(tid, previous)
        except OSError:
            continue


def run_variant(variant: str, reserved_core: int, wakeups: int) -> tuple[list[int], dict[str, Any]]:
    """One run of one variant; returns the samples and what the allocation reported."""
    hogs = start_hogs()
    time.sleep(0.05)  # let the hogs spread over the cores
    result: dict[str, Any] = {}
    strategy = grant = None
    moved: dict[int, tuple[set[int], set[int]]] = {}
    try:
        if variant in ("affinity", "registry", "cpuset", "priority"):
            strategy = CpuAllocationStrategy(core.CoreReservations({reserved_core}), isolation=variant)
            grant = strategy.allocate(ResourceRequest(ResourceType.CPU, 100), 100, None)
        elif variant == "reference":
            others = sorted(set(os.sched_getaffinity(0)) - {reserved_core})
            for hog in hogs:
                subprocess.run(["taskset", "-p", "-c", ",".join(map(str, others)), str(hog.pid)],
                               check=True, stdout=subprocess.DEVNULL)
        elif variant == "reference_all":
            moved = move_everyone_off(reserved_core)

        def thread_body() -> None:
            if strategy is not None and grant is not None:
                strategy.claim(grant.handle)
            elif variant in ("reference", "reference_all"):
                os.sched_setaffinity(0, {reserved_core})
            result["samples"] = latency_loop(wakeups)

        t = threading.Thread(target=thread_body)
        t.start()
        t.join()
        if strategy is not None and grant is not None:
            result["isolation"] = strategy.describe(grant.handle)["isolation"]
    finally:
        if strategy is not None and grant is not None:
            strategy.release(grant.handle)
        put_everyone_back(moved)
        stop_hogs(hogs)
    return result.get("samples", []), result.get("isolation", {})


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))
    return sorted_values[index] / 1000.0


def run(rounds: int, wakeups: int, reserved_core: int, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    samples: dict[str, list[int]] = {v: [] for v in variants}
    per_round_p99: dict[str, list[float]] = {v: [] for v in variants}
    isolation: dict[str, Any] = {}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            got, iso = run_variant(variant, reserved_core, wakeups)
            samples[variant].extend(got)
            per_round_p99[variant].append(percentile(sorted(got), 0.99))
            if iso:
                isolation[variant] = {"effective": iso.get("effective"), "reasons": iso.get("reasons")}
    table = {}
    for variant in variants:
        values = sorted(samples[variant])
        table[variant] = {"p50_us": percentile(values, 0.50), "p99_us": percentile(values, 0.99),
                          "p999_us": percentile(values, 0.999), "samples": len(values),
                          "per_round_p99_us": per_round_p99[variant]}
    reference = table.get("reference", {}).get("p99_us")
    reference_all = table.get("reference_all", {}).get("p99_us")
    for variant in variants:
        table[variant]["p99_vs_reference"] = (table[variant]["p99_us"] / reference) if reference else None
        table[variant]["p99_vs_reference_all"] = (table[variant]["p99_us"] / reference_all) if reference_all \
            else None
    return {"rounds": rounds, "wakeups": wakeups, "core": reserved_core, "euid": os.geteuid(),
            "load": os.getloadavg(), "table": table, "isolation": isolation}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| variant | p50 µs | p99 µs | p99.9 µs | p99 / reference | p99 / reference_all | effective levels |",
             "|---|---|---|---|---|---|---|"]

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    for variant, row in report["table"].items():
        iso = report["isolation"].get(variant, {})
        effective = "+".join(iso.get("effective") or []) or "-"
        if iso.get("reasons"):
            effective += " (not: " + "; ".join(f"{k}: {v}" for k, v in iso["reasons"].items()) + ")"
        lines.append(f"| {variant} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | {row['p999_us']:.0f} | "
                     f"{ratio(row['p99_vs_reference'])} | {ratio(row.get('p99_vs_reference_all'))} | {effective} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--wakeups", type=int, default=1000, help="wake-ups per variant per round (1 ms apart)")
    parser.add_argument("--core", type=int, default=None, help="the reserved core (default: the highest allowed)")
    parser.add_argument("--quick", action="store_true", help="1 round of 50 wake-ups (a smoke test)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("the benchmark needs two cores: one reserved, one for everything else")
    reserved_core = args.core if args.core is not None else allowed[-1]
    if args.quick:
        args.rounds, args.wakeups = 1, 50
    if args.rounds < 1 or args.wakeups < 10:
        parser.error("--rounds must be >= 1 and --wakeups >= 10")
    report = run(args.rounds, args.wakeups, reserved_core)
    print(json.dumps(report) if args.json else format_table(report))
    print(f"\n{args.rounds} rounds x {args.wakeups} wake-ups per variant, core {reserved_core}, "
          f"{HOGS} hogs, euid {os.geteuid()}, load average {report['load'][0]:.2f}")
    return report


if __name__ == "__main__":
    main()
