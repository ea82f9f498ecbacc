"""The built-in predictor end to end: MarkovPredictor driving a ResourcePreallocator
against the ReactiveResourceAllocator baseline, on one generated workload, with the
real MEMORY strategy (mapped and populated), interleaved round by round.

The workload: five needs of three applications (browser, editor, compiler), each a
MEMORY amount; the next need follows the current one by a fixed successor with
probability P_HABIT, else any other need at random (seeded). Needs arrive GAP seconds
apart. At each need the host acquires the amount for the application, writes one byte
per page (the resource is usable after that first pass: the need-to-usable latency),
holds it HOLD seconds, releases it with feedback (used, the amount) and tells the model
(``observe``), which predicts the next need; the preallocator queues and populates it
on its worker during the gap. The model starts empty each round: it learns online, so
the first needs of a round are misses.

Reported per way: need-to-usable latency (p50, p90, p99, mean), need hit rate (needs
served by an allocation ready before the need), resource hit rate (preallocations used),
MEMORY waste rate (unused MiB x s over held MiB x s), preallocations made.

    python benchmarks/bench_predict.py [--needs N] [--rounds R] [--seed S] [--habit P]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from prealloc import (
    AllocationFeedback,
    MemoryAllocationStrategy,
    ReactiveResourceAllocator,
    ResourcePreallocator,
    ResourceType,
)
from prealloc.predict import MarkovPredictor

MEM = ResourceType.MEMORY
PAGE = 4096
NEEDS = [("browser", 24.0), ("editor", 96.0), ("compiler", 64.0), ("editor", 48.0), ("browser", 32.0)]
SUCCESSOR = [1, 2, 3, 4, 0]
P_HABIT = 0.8
GAP = 0.04
HOLD = 0.005


def workload(n: int, seed: int, habit: float = P_HABIT) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    state, out = 0, []
    for _ in range(n):
        out.append(NEEDS[state])
        if rng.random() < habit:
            state = SUCCESSOR[state]
        else:
            state = rng.choice([i for i in range(len(NEEDS)) if i != SUCCESSOR[state]])
    return out


def replay(allocator, model: MarkovPredictor | None, needs: list[tuple[str, float]]) -> dict[str, float]:
    latencies = []
    for application, amount in needs:
        start = time.perf_counter()
        claim = allocator.acquire(MEM, amount, target_application=application)
        view = memoryview(claim.resource)
        for offset in range(0, len(view), PAGE):  # the first pass: the resource is usable
            view[offset] = 1
        latencies.append(time.perf_counter() - start)
        view.release()
        if model is not None:
            model.observe(application, MEM, amount)
        time.sleep(HOLD)
        claim.release(AllocationFeedback(used_successfully=True, actual_amount_used=amount))
        time.sleep(GAP - HOLD)
    stats = allocator.get_statistics()
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3

    return {"p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "mean_ms": statistics.mean(latencies) * 1e3,
            "need_hit_rate": stats.need_hit_rate, "resource_hit_rate": stats.resource_hit_rate,
            "waste_rate_memory": stats.waste_rate_by_type.get(MEM, 0.0),
            "preallocations": stats.total_requests - stats.needs + stats.needs_preallocated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--needs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--habit", type=float, default=P_HABIT, help="probability of the usual successor")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"markov": [], "reactive": []}
    for round_index in range(args.rounds):
        needs = workload(args.needs, args.seed + round_index, args.habit)
        ways = ["markov", "reactive"] if round_index % 2 == 0 else ["reactive", "markov"]
        for way in ways:
            strategy = MemoryAllocationStrategy(populate=True)
            if way == "markov":
                model = MarkovPredictor(min_confidence=0.3, max_predictions=1)
                allocator = ResourcePreallocator(predictor=model, translator=model.translator(duration=2.0),
                                                 allocation_strategies={MEM: strategy}, headroom={})
                with allocator:
                    results[way].append(replay(allocator, model, needs))
            else:
                with ReactiveResourceAllocator(allocation_strategies={MEM: strategy}, headroom={}) as allocator:
                    results[way].append(replay(allocator, None, needs))
    keys = list(results["markov"][0])
    print(f"{'':22s} {'markov':>10s} {'reactive':>10s}   (median over {args.rounds} rounds of {args.needs} needs, habit {args.habit})")
    for key in keys:
        m = statistics.median(r[key] for r in results["markov"])
        r = statistics.median(r[key] for r in results["reactive"])
        print(f"{key:22s} {m:10.3f} {r:10.3f}")
    m50 = statistics.median(r["p50_ms"] for r in results["markov"])
    r50 = statistics.median(r["p50_ms"] for r in results["reactive"])
    print(f"{'p50 ratio reactive/markov':22s} {r50 / max(m50, 1e-9):10.2f}")


if __name__ == "__main__":
    main()
