"""The demo's markov mode (``prealloc demo --predictor markov``): the trace's habit, and
a short run whose preallocator hears its predictions from the built-in MarkovPredictor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prealloc.demo import APPS, MARKOV_HABIT, PREALLOCATED, generate_trace, run_demo


def successor_share(trace) -> float:
    names = [a.name for a in APPS]
    order = sorted(trace.needs, key=lambda e: e.need_at)
    follows = sum(names[(names.index(a.app) + 1) % len(names)] == b.app for a, b in zip(order, order[1:]))
    return follows / max(1, len(order) - 1)


def test_habit_zero_is_the_trace_of_before_and_a_habit_is_followed():
    plain = generate_trace(7, 2.0)
    assert generate_trace(7, 2.0, habit=0.0) == plain  # the default trace does not move
    habitual = generate_trace(7, 2.0, habit=MARKOV_HABIT)
    assert [(e.at, e.lead, e.arrives) for e in habitual.events] == [(e.at, e.lead, e.arrives) for e in plain.events]
    assert successor_share(habitual) > 0.6 > successor_share(plain)
    with pytest.raises(ValueError):
        generate_trace(7, 1.0, habit=1.5)


def test_a_markov_run_feeds_the_model_from_the_needs():
    report = run_demo(scale=0.5, rounds=1, predictor="markov")
    assert report.predictor == "markov"
    counts = report.predictor_counts
    pre = report.variants[PREALLOCATED]
    assert counts["observations"] == pre.needs_served  # every served need was observed
    assert sum(counts["outcomes"].values()) <= counts["predictions"]
    stats = pre.statistics
    # the preallocator queued only what the model predicted: no trace predictions
    assert stats.total_requests - (stats.needs - stats.needs_preallocated) <= 2 * counts["predictions"]
    with pytest.raises(ValueError):
        run_demo(scale=0.25, rounds=1, predictor="oracle")


def test_the_cli_flag():
    out = subprocess.run([sys.executable, "-m", "prealloc", "demo", "--predictor", "markov", "--scale", "0.25",
                          "--rounds", "1", "--json", "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["predictor"] == "markov" and data["trace"]["habit"] == MARKOV_HABIT
    assert data["conclusion"].startswith("Predictions came from the built-in MarkovPredictor")
    bad = subprocess.run([sys.executable, "-m", "prealloc", "demo", "--predictor", "oracle"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
