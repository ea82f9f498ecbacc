"""The machine broker under load: many concurrent clients each running submit / wait /
claim / release cycles through ``prealloc serve``, side by side with the same cycles on
the in-process engine (one ``ResourcePreallocator`` of the broker's own kind, MEMORY on
memfds, shared by as many threads), in one run.

Per call (submit, wait_ready, claim, release_allocation) it reports
p50 / p99 of both and the ratio broker / in-process. The broker's clients are
``--processes`` processes of ``--clients / --processes`` threads, each thread its own
connection (a peer). Checked at the end, and the run fails otherwise: nothing leaked
(the broker's fd count and VmLck back to where they were, no allocation left in the
broker), and every client's holdings exact (halfway through, each client holds exactly
the one claim it made — ``allocations()`` lists it and nothing else — and none at the
end).

    python benchmarks/bench_broker.py                       # 64 clients x 100 cycles
    python benchmarks/bench_broker.py --clients 64 --cycles 10000   # the issue's load
    python benchmarks/bench_broker.py --quick               # the CI smoke (4 x 5)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

OPS = ("submit", "wait_ready", "claim", "release_allocation")
MEMORY_MIB = 1


def _cycles(client: Any, cycles: int, check_at: int, samples: dict[str, list[int]]) -> str | None:
    """Runs the cycles on client (a Client or the in-process engine); the first
    problem with its holdings, or None."""
    from prealloc import ResourceRequest, ResourceType

    clock = time.perf_counter_ns
    problem = None
    for cycle in range(cycles):
        t0 = clock()
        aid = client.submit(ResourceRequest(ResourceType.MEMORY, MEMORY_MIB))
        t1 = clock()
        if not client.wait_ready([aid], timeout=60):
            return f"allocation {aid} not ready"
        t2 = clock()
        claim = client.claim(aid)
        t3 = clock()
        with memoryview(claim.resource) as view:
            view[0] = 1  # the buffer is there and writable
        if cycle == check_at and hasattr(client, "server"):
            held = [a.allocation_id for a in client.allocations()]
            if held != [aid]:
                problem = f"holds {held}, expected exactly [{aid}]"
        t4 = clock()
        claim.release()
        t5 = clock()
        samples["submit"].append(t1 - t0)
        samples["wait_ready"].append(t2 - t1)
        samples["claim"].append(t3 - t2)
        samples["release_allocation"].append(t5 - t4)
    if hasattr(client, "server") and client.allocations():
        problem = problem or f"still holds {client.allocations()}"
    return problem


def _run_threads(make_client: Any, threads: int, cycles: int) -> tuple[dict[str, list[int]], list[str]]:
    samples: dict[str, list[int]] = {op: [] for op in OPS}
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def one() -> None:
        own: dict[str, list[int]] = {op: [] for op in OPS}
        client = make_client()
        try:
            start.wait()
            problem = _cycles(client, cycles, cycles // 2, own)
        except Exception as exc:  # reported, not swallowed: the run fails
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            if hasattr(client, "server"):
                client.close()
        with lock:
            for op in OPS:
                samples[op].extend(own[op])
            if problem:
                problems.append(problem)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return samples, problems


def _worker(socket_path: str, threads: int, cycles: int) -> None:
    """A client process: threads connections, each its cycles; the samples as JSON."""
    from prealloc.client import Client

    samples, problems = _run_threads(lambda: Client(socket_path), threads, cycles)
    json.dump({"samples": samples, "problems": problems}, sys.stdout)


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0 if ordered else float("nan")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _connectable(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _in_process(clients: int, cycles: int) -> dict[str, list[int]]:
    from prealloc.engine import PreallocatorConfig
    from prealloc.server import _BrokerPreallocator

    with _BrokerPreallocator(PreallocatorConfig(), lock_memory=True) as engine:
        samples, problems = _run_threads(lambda: engine, clients, cycles)
        if problems:
            raise AssertionError(f"in-process: {problems[:3]}")
        if engine.allocations():
            raise AssertionError(f"in-process engine still holds {len(engine.allocations())}")
    return samples


def run(clients: int = 64, cycles: int = 100, processes: int = 8) -> dict[str, Any]:
    """Both sides, and the leak checks; the figures."""
    from prealloc.client import Client

    processes = max(1, min(processes, clients))
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        path = os.path.join(tmp, "broker.sock")
        config = os.path.join(tmp, "broker.toml")
        Path(config).write_text(f"rate_limit = 1e9\nrate_burst = 1e9\nmax_connections = {clients + 8}\n")
        log = open(os.path.join(tmp, "broker.log"), "wb")
        broker = subprocess.Popen([sys.executable, "-m", "prealloc", "serve", "--socket", path, "--config", config],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not _connectable(path):
                if broker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the broker did not start: {Path(log.name).read_text()}")
                time.sleep(0.02)
            with Client(path) as probe:  # warm the engine, then take the baseline
                probe.acquire("memory", MEMORY_MIB).release()
                fds_before = len(os.listdir(f"/proc/{broker.pid}/fd"))
                lck_before = _status_kib(broker.pid, "VmLck")
            started = time.perf_counter()
            workers = [subprocess.Popen([sys.executable, __file__, "--worker", path, str(n), str(cycles)],
                                        stdout=subprocess.PIPE) for n in per_process]
            results = [json.loads(w.communicate()[0]) for w in workers]
            broker_seconds = time.perf_counter() - started
            with Client(path) as probe:
                deadline = time.monotonic() + 60
                while probe.status()["connections"] > 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                left = probe.status()["reservations"] if os.geteuid() == 0 else probe.allocations()
                fds_after = len(os.listdir(f"/proc/{broker.pid}/fd"))
                lck_after = _status_kib(broker.pid, "VmLck")
                stats = probe.get_statistics()
            broker.send_signal(signal.SIGTERM)
            code = broker.wait(60)
        finally:
            if broker.poll() is None:
                broker.kill()
                broker.wait()
            log.close()
    samples: dict[str, list[int]] = {op: [] for op in OPS}
    problems: list[str] = []
    for result in results:
        for op in OPS:
            samples[op].extend(result["samples"][op])
        problems.extend(result["problems"])
    started = time.perf_counter()
    local = _in_process(clients, cycles)
    local_seconds = time.perf_counter() - started
    rows = []
    for op in OPS:
        b50, b99 = _quantile(samples[op], 0.5), _quantile(samples[op], 0.99)
        l50, l99 = _quantile(local[op], 0.5), _quantile(local[op], 0.99)
        rows.append({"op": op, "in_process_p50_us": l50, "in_process_p99_us": l99, "broker_p50_us": b50,
                     "broker_p99_us": b99, "ratio_p50": b50 / l50 if l50 else float("nan"),
                     "ratio_p99": b99 / l99 if l99 else float("nan"), "calls": len(samples[op])})
    return {"clients": clients, "processes": processes, "cycles": cycles, "rows": rows,
            "broker_cycles_per_s": clients * cycles / broker_seconds,
            "in_process_cycles_per_s": clients * cycles / local_seconds,
            "problems": problems, "left": left, "fds_before": fds_before, "fds_after": fds_after,
            "vmlck_before_kib": lck_before, "vmlck_after_kib": lck_after, "broker_exit": code,
            "broker_claimed": stats.claimed, "broker_released": stats.released}


def check(result: dict[str, Any]) -> list[str]:
    """What went wrong: leaks, wrong holdings, a failed drain."""
    wrong = list(result["problems"][:5])
    if result["left"]:
        wrong.append(f"{len(result['left'])} allocations left in the broker")
    if result["fds_after"] != result["fds_before"]:
        wrong.append(f"broker fds {result['fds_before']} -> {result['fds_after']}")
    if result["vmlck_after_kib"] != result["vmlck_before_kib"]:
        wrong.append(f"broker VmLck {result['vmlck_before_kib']} -> {result['vmlck_after_kib']} KiB")
    if result["broker_exit"] != 0:
        wrong.append(f"the broker exited {result['broker_exit']} at SIGTERM")
    expected = result["clients"] * result["cycles"]
    if result["rows"][2]["calls"] != expected:
        wrong.append(f"{result['rows'][2]['calls']} claims measured, {expected} expected")
    return wrong


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['clients']} clients ({result['processes']} processes) x {result['cycles']} cycles; "
             f"cycles/s: broker {result['broker_cycles_per_s']:.0f}, in-process "
             f"{result['in_process_cycles_per_s']:.0f}",
             "| call | in-process p50 / p99 (us) | broker p50 / p99 (us) | ratio p50 / p99 |",
             "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['op']} | {row['in_process_p50_us']:.0f} / {row['in_process_p99_us']:.0f} | "
                     f"{row['broker_p50_us']:.0f} / {row['broker_p99_us']:.0f} | "
                     f"{row['ratio_p50']:.1f}x / {row['ratio_p99']:.1f}x |")
    lines.append(f"leaks: broker fds {result['fds_before']} -> {result['fds_after']}, VmLck "
                 f"{result['vmlck_before_kib']} -> {result['vmlck_after_kib']} KiB, allocations left "
                 f"{len(result['left'])}; holdings exact: {not result['problems']}; drain exit {result['broker_exit']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1], int(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 clients x 5 cycles")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.cycles, args.processes = 4, 5, 2
    result = run(args.clients, args.cycles, args.processes)
    print(json.dumps(result, indent=1, default=str) if args.json else format_table(result))
    wrong = check(result)
    for line in wrong:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
