"""CACHE_SPACE effectiveness (bench_cache.py) under pytest: the CI smoke runs one quick
round (an 8 MiB database, POSIX_FADV_DONTNEED between variants) and checks that the
prealloc variant really made its profile resident; PREALLOC_BENCH_CACHE=1 runs the full
table (7 rounds, 200 MB database, drop_caches as root) — see benchmarks/README.md."""
from __future__ import annotations

import math
import os

import bench_cache


def test_cache_warming_effectiveness(tmp_path, capsys):
    full = os.environ.get("PREALLOC_BENCH_CACHE") == "1"
    argv = [] if full else ["--quick", "--workdir", str(tmp_path)]
    results = bench_cache.main(argv)
    with capsys.disabled():
        print(capsys.readouterr().out)
    assert results["workloads"], "no workload could run"
    for name, row in results["workloads"].items():
        assert row["files"] > 0, f"{name}: the recording found no files"
        # the prealloc variant made what it warmed resident (through cachestat/mincore)
        assert row["resident_fraction"] is not None and row["resident_fraction"] > 0.99, (name, row)
        assert all(math.isfinite(row["need_to_done_ms"][v]) for v in ("cold", "prealloc", "warm")), row
