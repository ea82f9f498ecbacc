"""Side-by-side reporting for the benchmarks.

Every benchmark records how many items one round handles (``extra_info["items"]``) and
whether it is a baseline (``extra_info["baseline"] = True``). At the end of the run
this prints, per group, the time per item of each benchmark and its speed relative to
the group's baseline measured in the same run: absolute times on shared machines are
noise, ratios are the result.
"""
from __future__ import annotations

import pytest


def per_item(benchmark, items: int, *, baseline: bool = False) -> None:
    benchmark.extra_info["items"] = items
    benchmark.extra_info["baseline"] = baseline


def _rows(session):
    groups: dict[str, list] = {}
    for bench in getattr(session, "benchmarks", []):
        if not getattr(bench, "stats", None) or not bench.stats.rounds:
            continue
        items = bench.extra_info.get("items", 1)
        extra = {k: v for k, v in bench.extra_info.items() if k not in ("items", "baseline")}
        groups.setdefault(bench.group or "-", []).append(
            (bench.name, bench.stats.median / items, bool(bench.extra_info.get("baseline")), items, extra))
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups = _rows(session)
    if not groups:
        return
    tr = terminalreporter
    tr.section("side by side: median time per item, speed relative to the baseline of the group")
    for group, rows in sorted(groups.items()):
        base = [r for r in rows if r[2]]
        base_time = base[0][1] if base else None
        tr.write_line(f"[{group}]")
        for name, t, is_base, _items, extra in sorted(rows, key=lambda r: r[1]):
            ratio = f"{base_time / t:8.2f}x" if base_time else "        "
            tag = "  (baseline)" if is_base else ""
            figures = "  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else ""
            tr.write_line(f"  {name:<58} {t * 1e9:12.1f} ns/item {ratio}{tag}{figures}")
