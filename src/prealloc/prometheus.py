"""Prometheus exposition of allocators' figures (the optional extra
``prealloc[prometheus]``, the ``prometheus_client`` package).

    from prometheus_client import start_http_server
    from prealloc.prometheus import PreallocCollector

    PreallocCollector(pre).register()        # the default registry
    start_http_server(9464)

The collector reads, at every scrape, what the allocator already keeps — nothing is
counted twice and nothing is added to the hot path: ``get_statistics()`` (the tally),
the live allocations (``allocations()``) and the ``MetricsCollector`` (``metrics``,
the spec's seven metrics and the rest). Names follow the Prometheus conventions (base
units, ``_total`` for counters, ``_ratio`` for 0..1)::

    prealloc_requests_total                     requests admitted
    prealloc_allocations_total{type}            successful allocations, by resource type
    prealloc_failures_total                     requests refused (FAILED)
    prealloc_releases_total / _expired_total / _cancelled_total / _claims_total
    prealloc_needs_total, prealloc_needs_preallocated_total   acquire() calls, and hits
    prealloc_skipped_low_confidence_total
    prealloc_live_allocations{type,status}      ALLOCATED and ACTIVE allocations now
    prealloc_queued_requests, prealloc_in_flight_requests
    prealloc_held_bytes{type}                   MEMORY, GPU, DISK_IO, CACHE_SPACE (MiB x 2**20)
    prealloc_held_cpu_cores                     CPU (percent of a core / 100)
    prealloc_held_bits_per_second               NETWORK_BANDWIDTH (Mbit/s x 10**6)
    prealloc_held_units{type}                   CUSTOM (the strategy's unit)
    prealloc_hit_ratio                          finished preallocations that were used
    prealloc_need_hit_ratio                     needs served by a preallocation
    prealloc_waste_ratio{type}                  unused amount x time / held amount x time
    prealloc_allocation_seconds (summary)       request to ALLOCATED: _count and _sum
    prealloc_metric_<name>_total{...}           each MetricsCollector counter, its labels
                                                as they were recorded (resource_type, predictor)

Every series carries ``preallocator`` (the allocator's id): one collector can serve
several allocators. A closed allocator is skipped.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import REGISTRY, CollectorRegistry

from .types import AllocationStatus, ResourceType

MiB = 1 << 20
# the held amount of each type in its base unit: (metric suffix, factor from the type's unit)
_HELD_UNITS: dict[ResourceType, tuple[str, float]] = {
    ResourceType.MEMORY: ("bytes", MiB),
    ResourceType.GPU: ("bytes", MiB),
    ResourceType.DISK_IO: ("bytes", MiB),
    ResourceType.CACHE_SPACE: ("bytes", MiB),
    ResourceType.CPU: ("cpu_cores", 0.01),
    ResourceType.NETWORK_BANDWIDTH: ("bits_per_second", 1e6),
    ResourceType.CUSTOM: ("units", 1.0),
}
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(name: str) -> str:
    cleaned = _NAME_BAD.sub("_", str(name)).strip("_").lower() or "unnamed"
    return cleaned[:-6] if cleaned.endswith("_total") else cleaned


def _type_name(value: Any) -> str:
    return value.name if isinstance(value, ResourceType) else str(value)


class PreallocCollector:
    """A prometheus_client collector over one or more allocators (see the module
    docstring for the names). ``register()`` adds it to a registry."""

    def __init__(self, *allocators: Any, namespace: str = "prealloc") -> None:
        if not allocators:
            raise ValueError("give at least one allocator")
        for allocator in allocators:
            if not callable(getattr(allocator, "get_statistics", None)) or not hasattr(allocator, "metrics"):
                raise TypeError(f"allocators must have get_statistics() and metrics, not {type(allocator).__name__}")
        if not isinstance(namespace, str) or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", namespace):
            raise ValueError(f"namespace must be a Prometheus name ([a-zA-Z_][a-zA-Z0-9_]*), not {namespace!r}")
        self._allocators = tuple(allocators)
        self._ns = namespace

    def register(self, registry: CollectorRegistry | None = None) -> PreallocCollector:
        (registry if registry is not None else REGISTRY).register(self)
        return self

    def describe(self) -> list[Any]:
        # Empty: the series depend on what the allocators hold at scrape time, and an
        # empty describe() lets several collectors share a registry.
        return []

    def collect(self) -> Iterator[Any]:
        ns = self._ns
        families: dict[str, Any] = {}

        def family(kind: type, name: str, doc: str, labels: Iterable[str], **kw: Any) -> Any:
            full = f"{ns}_{name}"
            if full not in families:
                families[full] = kind(full, doc, labels=list(labels), **kw)
            return families[full]

        open_allocators = [a for a in self._allocators if not getattr(a, "closed", False)]
        # the MetricsCollector counters' label names, per metric, over every allocator: a
        # family has one set of label names
        snapshots = {id(a): a.metrics.snapshot() for a in open_allocators}
        label_names: dict[str, list[str]] = {}
        for snapshot in snapshots.values():
            for name, series in snapshot.items():
                names = set(label_names.get(name, ()))
                names.update(str(k) for labels in series for k, _ in labels)
                label_names[name] = sorted(names)
        for allocator in open_allocators:
            pid = str(allocator.id)
            stats = allocator.get_statistics()
            counters = (
                ("requests", "Requests admitted", stats.total_requests),
                ("failures", "Requests refused (FAILED)", stats.failed_allocations),
                ("releases", "Allocations released", stats.released),
                ("expired", "Allocations and requests expired", stats.expired),
                ("cancelled", "Requests withdrawn before allocation", stats.cancelled),
                ("claims", "Allocations claimed by a consumer", stats.claimed),
                ("needs", "Needs (acquire calls)", stats.needs),
                ("needs_preallocated", "Needs served by an allocation ready before the need",
                 stats.needs_preallocated),
                ("skipped_low_confidence", "Predictions skipped below min_confidence",
                 stats.skipped_low_confidence),
            )
            for name, doc, value in counters:
                family(CounterMetricFamily, name, doc, ["preallocator"]).add_metric([pid], float(value))
            by_type = family(CounterMetricFamily, "allocations", "Successful allocations by resource type",
                             ["preallocator", "type"])
            for rtype, count in stats.allocations_by_type.items():
                by_type.add_metric([pid, _type_name(rtype)], float(count))
            family(GaugeMetricFamily, "queued_requests", "Requests queued", ["preallocator"]) \
                .add_metric([pid], float(stats.queued_requests))
            family(GaugeMetricFamily, "in_flight_requests", "Requests being allocated now", ["preallocator"]) \
                .add_metric([pid], float(stats.in_flight))
            family(GaugeMetricFamily, "hit_ratio", "Finished preallocations that were used", ["preallocator"]) \
                .add_metric([pid], float(stats.resource_hit_rate))
            family(GaugeMetricFamily, "need_hit_ratio", "Needs served by a preallocation", ["preallocator"]) \
                .add_metric([pid], float(stats.need_hit_rate))
            waste = family(GaugeMetricFamily, "waste_ratio", "Unused amount x time over held amount x time",
                           ["preallocator", "type"])
            for rtype, ratio in stats.waste_rate_by_type.items():
                waste.add_metric([pid, _type_name(rtype)], float(ratio))
            family(SummaryMetricFamily, "allocation_seconds", "Time from request to ALLOCATED",
                   ["preallocator"]).add_metric(
                [pid], count_value=float(stats.successful_allocations),
                sum_value=float(stats.average_allocation_time * stats.successful_allocations))
            self._collect_live(allocator, pid, family)
            self._collect_metrics(snapshots[id(allocator)], label_names, pid, family)
        yield from families.values()

    def _collect_live(self, allocator: Any, pid: str, family: Any) -> None:
        live: dict[tuple[str, str], int] = {}
        held: dict[ResourceType, float] = {t: 0.0 for t in ResourceType}
        for snapshot in allocator.allocations(AllocationStatus.ALLOCATED, AllocationStatus.ACTIVE):
            key = (snapshot.resource_type.name, snapshot.status.name)
            live[key] = live.get(key, 0) + 1
            held[snapshot.resource_type] += snapshot.allocated_amount
        gauge = family(GaugeMetricFamily, "live_allocations", "ALLOCATED and ACTIVE allocations",
                       ["preallocator", "type", "status"])
        for rtype in allocator.strategies:
            for status in (AllocationStatus.ALLOCATED, AllocationStatus.ACTIVE):
                gauge.add_metric([pid, rtype.name, status.name], float(live.get((rtype.name, status.name), 0)))
        for rtype in allocator.strategies:
            suffix, factor = _HELD_UNITS[rtype]
            with_type = suffix in ("bytes", "units")
            metric = family(GaugeMetricFamily, f"held_{suffix}", f"Amount held by live allocations, in {suffix}",
                            ["preallocator", "type"] if with_type else ["preallocator"])
            metric.add_metric([pid, rtype.name] if with_type else [pid], held[rtype] * factor)

    def _collect_metrics(self, snapshot: dict[str, Any], label_names: dict[str, list[str]], pid: str,
                         family: Any) -> None:
        for name, series in sorted(snapshot.items()):
            names = label_names[name]
            clean = [_NAME_BAD.sub("_", n) for n in names]
            clean = [c if c != "preallocator" else "preallocator_label" for c in clean]
            metric = family(CounterMetricFamily, f"metric_{_metric_name(name)}",
                            f"MetricsCollector counter {name!r}", ["preallocator", *clean])
            for labels, value in series.items():
                given = {str(k): "" if v is None else str(v) for k, v in labels}
                metric.add_metric([pid, *(given.get(n, "") for n in names)], float(value))


def register(*allocators: Any, registry: CollectorRegistry | None = None) -> PreallocCollector:
    """A PreallocCollector over allocators, registered (the default registry unless given)."""
    return PreallocCollector(*allocators).register(registry)


__all__ = ["PreallocCollector", "register"]
