"""Smoke run of benchmarks/bench_isolation.py (its --quick mode: 1 round of 50 wake-ups
per variant): every variant runs next to the reference, reports its percentiles, and
the levels that are refused here (cpuset and priority when unprivileged) say why. The
figures themselves come from the full run recorded in benchmarks/README.md."""
from __future__ import annotations

import math
import os

import pytest

import bench_isolation


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the benchmark needs two cores")
def test_quick_run_reports_every_variant(capsys):
    report = bench_isolation.main(["--quick"])
    out = capsys.readouterr().out
    for variant in bench_isolation.VARIANTS:
        row = report["table"][variant]
        assert row["samples"] == 50
        assert math.isfinite(row["p99_us"]) and row["p99_us"] >= row["p50_us"] >= 0
        assert f"| {variant} |" in out
    for level in ("affinity", "registry", "cpuset", "priority"):
        iso = report["isolation"][level]
        assert level in iso["effective"] or level in iso["reasons"]  # achieved, or the reason why not
