"""Metric counters: ``record_metric(name, **labels)`` counts, ``snapshot()`` reads.

The spec's MetricsCollector. Counters are keyed by the metric name and its labels;
amounts can be added to a counter (``value``). Thread-safe.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any


class MetricsCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: defaultdict[tuple[str, tuple[tuple[str, Any], ...]], float] = defaultdict(float)

    def record_metric(self, name: str, value: float = 1, **labels: Any) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value

    def get(self, name: str, **labels: Any) -> float:
        """The counter's value; with no labels, the sum over every label set of name."""
        with self._lock:
            if labels:
                return self._counters.get((name, tuple(sorted(labels.items()))), 0)
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def snapshot(self) -> dict[str, dict[tuple[tuple[str, Any], ...], float]]:
        out: dict[str, dict[tuple[tuple[str, Any], ...], float]] = {}
        with self._lock:
            for (name, labels), value in self._counters.items():
                out.setdefault(name, {})[labels] = value
        return out

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
