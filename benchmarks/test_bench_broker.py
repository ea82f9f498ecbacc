"""Smoke run of benchmarks/bench_broker.py (not timed): a few clients through the broker
and the in-process engine, and the load benchmark's own checks — nothing leaked, every
client's holdings exact, the drain exits 0."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_broker  # noqa: E402


def test_broker_load_smoke():
    result = bench_broker.run(clients=4, cycles=5, processes=2)
    assert bench_broker.check(result) == []
    assert [row["op"] for row in result["rows"]] == list(bench_broker.OPS)
    assert all(row["calls"] == 20 for row in result["rows"])
    assert result["broker_claimed"] >= 20 and result["broker_released"] >= 20
    assert "ratio p50" in bench_broker.format_table(result)
