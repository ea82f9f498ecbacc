"""Metric counters: ``record_metric(name, **labels)`` counts, ``snapshot()`` reads.

The spec's MetricsCollector. Counters are keyed by the metric name and its labels;
amounts can be added to a counter (``value``). Thread-safe.

The allocators record the spec's seven metrics, labelled ``resource_type`` and
``predictor`` (the request's ``metadata.source_predictor_id``):

    preallocation_request_generated  a request queued from a prediction
    resource_allocated               an allocation became ALLOCATED
    preallocation_failed             a request was refused (quota, headroom, machine, no strategy)
    preallocation_error              a strategy or monitor raised while allocating
    resource_released                an allocation ended (released, or expired: the spec's
                                     expiry is a release with feedback "Expired")
    release_failed                   a strategy refused a release (AllocationError): reverted
    release_error                    a strategy raised while releasing: reverted

The two that happen on every allocation (resource_allocated, resource_released) are
counted by the allocator's compiled core, without a lock or a Python call, and read from
there through a *source* (``add_source``); every other metric is recorded here. Readers
see one set of counters either way.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Callable, Iterable

LabelSet = tuple[tuple[str, Any], ...]
Source = Callable[[], Iterable[tuple[str, LabelSet, float]]]

SPEC_METRICS = ("preallocation_request_generated", "resource_allocated", "preallocation_failed",
                "preallocation_error", "resource_released", "release_failed", "release_error")


class MetricsCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: defaultdict[tuple[str, LabelSet], float] = defaultdict(float)
        self._sources: list[Source] = []

    def record_metric(self, name: str, value: float = 1, **labels: Any) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value

    def add_source(self, source: Source) -> None:
        """Counters kept elsewhere (an allocator's core): source() yields (name, labels,
        value) and is read at every get/snapshot."""
        with self._lock:
            self._sources.append(source)

    def remove_source(self, source: Source) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def _all(self) -> dict[tuple[str, LabelSet], float]:
        with self._lock:
            counters = dict(self._counters)
            sources = list(self._sources)
        for source in sources:
            for name, labels, value in source():
                key = (name, tuple(sorted(labels)))
                counters[key] = counters.get(key, 0) + value
        return counters

    def get(self, name: str, **labels: Any) -> float:
        """The counter's value; with no labels, the sum over every label set of name;
        with some labels, the sum over the label sets that have those."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self._all().items() if n == name and wanted <= set(ls))

    def snapshot(self) -> dict[str, dict[LabelSet, float]]:
        out: dict[str, dict[LabelSet, float]] = {}
        for (name, labels), value in self._all().items():
            out.setdefault(name, {})[labels] = value
        return out

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
