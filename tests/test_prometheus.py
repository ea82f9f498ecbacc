"""prealloc.prometheus: the text exposition, scraped with generate_latest and parsed
with prometheus_client's own parser; the held bytes are those of real reservations."""
from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from prealloc import (  # noqa: E402
    AllocationFeedback,
    MemoryAllocationStrategy,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from prealloc.prometheus import PreallocCollector  # noqa: E402
from engine_util import ExplodingStrategy  # noqa: E402
from osutil import vm_rss  # noqa: E402

MiB = 1 << 20
MEM, CUSTOM = ResourceType.MEMORY, ResourceType.CUSTOM


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name, **labels):
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert matches, f"{name}{labels} not exposed; have {sorted({n for n, _ in samples})}"
    return sum(matches)


@pytest.fixture
def allocator():
    pre = ResourcePreallocator(allocation_strategies={MEM: MemoryAllocationStrategy(),
                                                      CUSTOM: ExplodingStrategy(CUSTOM)}, headroom={})
    yield pre
    pre.close()


def test_counters_gauges_and_held_bytes_follow_real_allocations(allocator):
    registry = CollectorRegistry()
    PreallocCollector(allocator).register(registry)
    before = scrape(registry)
    assert value(before, "prealloc_held_bytes", type="MEMORY") == 0
    rss = vm_rss()
    a = allocator.request_preallocation(ResourceRequest(MEM, 8))
    b = allocator.request_preallocation(ResourceRequest(MEM, 4))
    assert vm_rss() - rss >= 10 * MiB  # the figures below are of memory that exists
    failed = allocator.request_preallocation(ResourceRequest(CUSTOM, 14))  # refused by the strategy
    assert failed.failure_reason
    now = scrape(registry)
    pid = allocator.id
    assert value(now, "prealloc_held_bytes", type="MEMORY", preallocator=pid) == 12 * MiB
    assert value(now, "prealloc_live_allocations", type="MEMORY", status="ALLOCATED") == 2
    assert value(now, "prealloc_allocations_total", type="MEMORY") == 2
    assert value(now, "prealloc_failures_total") == 1
    assert value(now, "prealloc_requests_total") == 3
    assert value(now, "prealloc_allocation_seconds_count") == 2
    assert value(now, "prealloc_allocation_seconds_sum") > 0
    assert value(now, "prealloc_metric_preallocation_failed_total", resource_type="CUSTOM") == 1
    # the counters the compiled core keeps (a MetricsCollector source) are exposed too
    assert value(now, "prealloc_metric_resource_allocated_total", resource_type="MEMORY") == 2

    with allocator.acquire(MEM, 8) as claim:
        assert claim.preallocated
        mid = scrape(registry)
        assert value(mid, "prealloc_live_allocations", type="MEMORY", status="ACTIVE") == 1
    allocator.release_allocation(b.allocation_id, AllocationFeedback(used_successfully=False))
    after = scrape(registry)
    assert value(after, "prealloc_held_bytes", type="MEMORY") == 0
    assert value(after, "prealloc_releases_total") == 2
    assert value(after, "prealloc_needs_total") == 1 and value(after, "prealloc_needs_preallocated_total") == 1
    assert value(after, "prealloc_need_hit_ratio") == 1.0
    assert value(after, "prealloc_hit_ratio") == 0.5  # one used, one released unused
    assert 0.0 <= value(after, "prealloc_waste_ratio", type="MEMORY") <= 1.0
    assert a.allocation_id != b.allocation_id


def test_the_text_is_valid_exposition_with_units_and_help(allocator):
    registry = CollectorRegistry()
    PreallocCollector(allocator).register(registry)
    text = generate_latest(registry).decode()
    assert "# TYPE prealloc_allocations_total counter" in text
    assert "# TYPE prealloc_held_bytes gauge" in text
    assert "# TYPE prealloc_allocation_seconds summary" in text
    assert "# HELP prealloc_hit_ratio" in text


def test_closed_allocators_are_skipped_and_bad_arguments_refused(allocator):
    other = ResourcePreallocator(allocation_strategies={CUSTOM: ExplodingStrategy(CUSTOM)})
    registry = CollectorRegistry()
    PreallocCollector(allocator, other).register(registry)
    ids = {dict(ls).get("preallocator") for (n, ls) in scrape(registry) if n == "prealloc_requests_total"}
    assert ids == {allocator.id, other.id}
    other.close()
    ids = {dict(ls).get("preallocator") for (n, ls) in scrape(registry) if n == "prealloc_requests_total"}
    assert ids == {allocator.id}
    with pytest.raises(ValueError):
        PreallocCollector()
    with pytest.raises(TypeError):
        PreallocCollector(object())
    with pytest.raises(ValueError):
        PreallocCollector(allocator, namespace="bad name")


def test_counters_with_different_labels_on_two_allocators_keep_their_labels(allocator):
    other = ResourcePreallocator(allocation_strategies={CUSTOM: ExplodingStrategy(CUSTOM)})
    try:
        allocator.metrics.record_metric("custom_thing", 2, kind="a")
        other.metrics.record_metric("custom_thing", 5, place="b")
        registry = CollectorRegistry()
        PreallocCollector(allocator, other).register(registry)
        samples = scrape(registry)
        assert value(samples, "prealloc_metric_custom_thing_total", preallocator=allocator.id, kind="a") == 2
        assert value(samples, "prealloc_metric_custom_thing_total", preallocator=other.id, place="b") == 5
    finally:
        other.close()
