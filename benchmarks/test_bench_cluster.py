"""prealloc.cluster's benchmark (bench_cluster.py) under pytest: the CI smoke runs the quick
variant (2 rounds, 16 MiB, 10 placement groups) on a local Ray and checks that every
figure was measured and each prealloc claim mapped the whole node buffer;
PREALLOC_BENCH_CLUSTER=1 runs the full table (see benchmarks/README.md)."""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'prealloc[ray]')")

import bench_cluster  # noqa: E402


def test_cluster_request_and_need_latency(capsys):
    full = os.environ.get("PREALLOC_BENCH_CLUSTER") == "1"
    results = bench_cluster.main([] if full else ["--quick"])
    with capsys.disabled():
        print(capsys.readouterr().out)
    mib = results["mib"]
    assert results["claimed_sizes"] == [mib << 20] * results["rounds"]
    for figure in (*results["request_to_ready_ms"].values(), *results["need_to_usable_ms"].values()):
        assert math.isfinite(figure) and figure > 0
    groups = results["placement_groups"]
    assert groups["ready"] == groups["count"] and groups["created_per_s"] > 0
