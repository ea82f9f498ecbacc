"""prealloc.cluster on a local Ray cluster: what a cluster preallocation costs and what it
saves inside the task, side by side with what a Ray user does without it, in one run.

Request to ready (driver side; Ray's start-up is outside every figure)
  placement group   ``placement_group([bundle])`` + ``ray.wait([pg.ready()])``: what Ray
                    alone gives (a reservation in Ray's books, nothing on the node)
  + real            ``ClusterPreallocator.request_preallocation`` until ALLOCATED: the
                    same group, then one node actor per bundle whose engine maps and
                    populates the memory (memfd) and reserves + pins a core

Need to usable (inside a task scheduled into the bundle; timed in the task, from its
first line to a buffer of ``--mib`` MiB whose every page is written once)
  own buffer        the task allocates its own: ``np.empty`` + a write per page (the
                    faults and zeroing happen now), the way a Ray task gets memory today
  prealloc          ``prealloc.cluster.claim("MEMORY")``: the node actor's populated
                    memfd, opened by /proc/<pid>/fd and mapped with MAP_POPULATE, then
                    the same write per page

Placement group rate: ``--groups`` one-bundle groups created back to back until all are
ready, then removed; groups per second each way (Ray's GCS schedules them; this is the
cluster-wide limit on requests per second before prealloc adds anything).

Variants are interleaved in every round (order shuffled per round, seeded); medians over
``--rounds``.

    python benchmarks/bench_cluster.py                # 7 rounds, 128 MiB, 50 groups
    python benchmarks/bench_cluster.py --quick        # 2 rounds, 16 MiB, 10 groups (CI smoke)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from prealloc import AllocationStatus, ResourceRequest, ResourceType
from prealloc.cluster import ClusterPreallocator, bundle_resources

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


@ray.remote(num_cpus=1)
def _own_buffer(nbytes: int) -> float:
    import time

    import numpy as np

    start = time.perf_counter()
    buffer = np.empty(nbytes, dtype=np.uint8)
    buffer[::PAGE] = 1
    elapsed = time.perf_counter() - start
    del buffer
    return elapsed


@ray.remote(num_cpus=1)
def _prealloc_buffer(nbytes: int) -> tuple[float, int]:
    import time

    import numpy as np

    from prealloc import cluster

    start = time.perf_counter()
    claim = cluster.claim("MEMORY")
    buffer = np.frombuffer(claim.resource, dtype=np.uint8)
    buffer[::PAGE] = 1
    elapsed = time.perf_counter() - start
    size = buffer.size
    del buffer
    claim.resource.release()
    claim.release()
    return elapsed, size


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def run(rounds: int, mib: int, groups: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    nbytes = mib * MiB
    shape = [ResourceRequest(ResourceType.MEMORY, mib), ResourceRequest(ResourceType.CPU, 100)]
    bundle = bundle_resources(shape)
    ready: dict[str, list[float]] = {"placement group": [], "+ real": []}
    # where "+ real" goes: the group inside it, the node actor's engine start, its reservations
    parts: dict[str, list[float]] = {"placement": [], "node engine start": [], "node reserve": []}
    usable: dict[str, list[float]] = {"own buffer": [], "prealloc": []}
    claimed_sizes = []
    with ClusterPreallocator(placement_timeout=60, ready_timeout=60) as cp:
        for _ in range(rounds):
            order = ["placement group", "+ real"]
            rng.shuffle(order)
            for variant in order:
                if variant == "placement group":
                    start = time.perf_counter()
                    pg = placement_group([bundle], strategy="PACK")
                    done, _ = ray.wait([pg.ready()], timeout=60)
                    ready[variant].append(time.perf_counter() - start)
                    assert done, "the placement group was not ready within 60 s"
                    remove_placement_group(pg)
                    continue
                start = time.perf_counter()
                request = cp.request_preallocation(shape)
                request.wait(120)
                ready[variant].append(time.perf_counter() - start)
                assert request.status is AllocationStatus.ALLOCATED, request.failure_reason
                details = request.allocations[0].details
                parts["placement"].append(request.placement_ready_at - request.created_at)
                parts["node engine start"].append(details["node_engine_start_s"])
                parts["node reserve"].append(details["node_reserve_s"])
                strategy = PlacementGroupSchedulingStrategy(request.placement_group)
                tasks = ["own buffer", "prealloc"]
                rng.shuffle(tasks)
                for task in tasks:
                    if task == "own buffer":
                        usable[task].append(ray.get(_own_buffer.options(scheduling_strategy=strategy)
                                                    .remote(nbytes), timeout=120))
                    else:
                        elapsed, size = ray.get(_prealloc_buffer.options(scheduling_strategy=strategy)
                                                .remote(nbytes), timeout=120)
                        usable[task].append(elapsed)
                        claimed_sizes.append(size)
                cp.release(request)
    tiny = {"CPU": 0.001}
    start = time.perf_counter()
    made = [placement_group([tiny], strategy="PACK") for _ in range(groups)]
    done, _ = ray.wait([pg.ready() for pg in made], num_returns=groups, timeout=120)
    create_s = time.perf_counter() - start
    start = time.perf_counter()
    for pg in made:
        remove_placement_group(pg)
    remove_s = time.perf_counter() - start
    ready_ms = {k: _median_ms(v) for k, v in ready.items()}
    usable_ms = {k: _median_ms(v) for k, v in usable.items()}
    return {
        "rounds": rounds, "mib": mib, "bundle": bundle,
        "request_to_ready_ms": ready_ms,
        "reservation_cost_ratio": ready_ms["+ real"] / ready_ms["placement group"],
        "real_parts_ms": {k: _median_ms(v) for k, v in parts.items()},
        "need_to_usable_ms": usable_ms,
        "need_to_usable_speedup": usable_ms["own buffer"] / usable_ms["prealloc"],
        "claimed_sizes": claimed_sizes,
        "placement_groups": {"count": groups, "ready": len(done), "created_per_s": groups / create_s,
                             "removed_per_s": groups / remove_s},
    }


def report(results: dict[str, Any]) -> str:
    r, u = results["request_to_ready_ms"], results["need_to_usable_ms"]
    pgs = results["placement_groups"]
    return "\n".join([
        f"bundle {results['bundle']}, {results['rounds']} rounds, medians",
        f"request to ready: placement group {r['placement group']:.1f} ms, + real reservations "
        f"{r['+ real']:.1f} ms ({results['reservation_cost_ratio']:.1f}x); of which "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in results["real_parts_ms"].items())
        + " (the rest: the node actor's worker process starting)",
        f"need to usable in the task ({results['mib']} MiB): own buffer {u['own buffer']:.2f} ms, "
        f"prealloc claim {u['prealloc']:.2f} ms ({results['need_to_usable_speedup']:.1f}x faster)",
        f"placement groups: {pgs['count']} created at {pgs['created_per_s']:.0f}/s, removed at "
        f"{pgs['removed_per_s']:.0f}/s",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 16 MiB, 10 groups")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.mib, args.groups = 2, 16, 10
    if __name__ != "__main__":  # imported (pytest): Ray's workers cannot import this file
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    temp = tempfile.mkdtemp(prefix="pa-rayb-")  # Ray's files of this run only
    # and its token in the environment, not written to ~/.ray
    ours = {"RAY_TMPDIR": temp, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # (RAY_AUTH_MODE stays unset: ray.init then turns token mode on itself, refreshing
    # the config it read at import, and restoring removes what it set)
    saved = {name: os.environ.get(name) for name in (*ours, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ.update(ours)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(temp, "ray"),
                 object_store_memory=80 << 20, log_to_driver=False)
        try:
            results = run(args.rounds, args.mib, args.groups)
        finally:
            ray.shutdown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
