"""Configuration paths of the engine: immediate processing, headroom through a monitor,
retries driven by a monitor's change callback, initialize(), the specialised
preallocators and plugin strategies."""
from __future__ import annotations

import pytest

from prealloc import (
    AllocationStatus,
    CpuSchedulerEnhancer,
    CustomResourceAllocator,
    MemoryPreallocator,
    NullAllocationStrategy,
    Prediction,
    ResourceAvailability,
    ResourceMonitor,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
    register_strategy,
    unregister_strategy,
)
from engine_util import rules, wait_until

CUSTOM = ResourceType.CUSTOM


class SettableMonitor(ResourceMonitor):
    """A CUSTOM monitor whose availability the test sets; notify_changed() calls the
    engine's subscription back, as a real monitor does when the machine changes."""

    def __init__(self, total: float, available: float) -> None:
        super().__init__(sample_interval=3600.0)
        self.total, self.available = total, available

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({CUSTOM})

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        return ResourceAvailability(CUSTOM, self.total, self.available, self.total - self.available)


def test_immediate_processing_allocates_on_the_callers_thread():
    with ResourcePreallocator(translator=rules({"resource_type": "CUSTOM", "need": 3}), immediate_processing=True,
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        (rid,) = pre.handle_prediction(Prediction("p", "t", "go", 0.9))
        # no waiting: by the time handle_prediction returns, it is allocated
        assert pre.get_allocation(rid).status is AllocationStatus.ALLOCATED


def test_headroom_refuses_what_would_eat_into_the_reserve():
    monitor = SettableMonitor(total=100, available=50)
    with ResourcePreallocator(translator=None, headroom={CUSTOM: 0.2}, resource_monitors={CUSTOM: monitor},
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        ok = pre.request_preallocation(ResourceRequest(CUSTOM, 30))  # leaves 20 = 20% of 100
        assert ok.status is AllocationStatus.ALLOCATED
        refused = pre.request_preallocation(ResourceRequest(CUSTOM, 31))
        assert refused.status is AllocationStatus.FAILED and "headroom" in refused.failure_reason


def test_a_waiting_request_is_retried_when_the_monitor_reports_a_change():
    monitor = SettableMonitor(total=100, available=10)
    with ResourcePreallocator(translator=None, headroom={CUSTOM: 0.1}, resource_monitors={CUSTOM: monitor},
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        rid = pre.submit(ResourceRequest(CUSTOM, 40))
        wait_until(lambda: pre.queue_size == 0 and pre._has_waiting())
        assert pre.get_allocation(rid).status is AllocationStatus.PENDING
        monitor.available = 80
        monitor.notify_changed(CUSTOM)  # what the watcher thread does on a real change
        wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)


def test_initialize_applies_live_options_and_refuses_fixed_ones():
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        with pytest.raises(ValueError, match="no translator"):
            pre.handle_prediction(Prediction("p", "t", "go", 0.9))
        pre.initialize(translator=rules({"resource_type": "CUSTOM", "need": 2}), min_confidence=0.5)
        assert pre.handle_prediction(Prediction("p", "t", "go", 0.4)) == []  # now below the bar
        (rid,) = pre.handle_prediction(Prediction("q", "t", "go", 0.9))
        wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)
        with pytest.raises(ValueError, match="fixed at construction"):
            pre.initialize(capacity=10)
        with pytest.raises(ValueError):
            pre.initialize(min_confidence=2.0)
        assert pre.config.min_confidence == 0.5 and pre.config.capacity == 1 << 20
        with pytest.raises(TypeError):
            pre.initialize(no_such_option=1)


def test_memory_preallocator_and_cpu_scheduler_enhancer_cover_one_type_each():
    with MemoryPreallocator(translator=None, memory_options={"lock": True}) as memory:
        a = memory.request_preallocation(ResourceRequest(ResourceType.MEMORY, 2))
        assert a.status is AllocationStatus.ALLOCATED and a.details["locked"]
        cpu = memory.request_preallocation(ResourceRequest(ResourceType.CPU, 100))
        assert cpu.status is AllocationStatus.FAILED and cpu.failure_reason == "no strategy for CPU"
    with CpuSchedulerEnhancer(translator=None) as enhancer:
        c = enhancer.request_preallocation(ResourceRequest(ResourceType.CPU, 100))
        assert c.status is AllocationStatus.ALLOCATED and len(c.details["cores"]) == 1


def test_custom_allocator_takes_registered_plugin_strategies():
    class Counting(NullAllocationStrategy):
        made = 0

        def __init__(self) -> None:
            super().__init__(CUSTOM)
            Counting.made += 1

    register_strategy("custom", Counting)
    try:
        with CustomResourceAllocator(translator=None) as allocator:
            assert isinstance(allocator.strategies[CUSTOM], Counting) and Counting.made == 1
            assert ResourceType.MEMORY in allocator.strategies  # the built-ins stay
            got = allocator.request_preallocation(ResourceRequest(CUSTOM, 5))
            assert got.status is AllocationStatus.ALLOCATED
    finally:
        assert unregister_strategy(CUSTOM)
    with pytest.raises(ValueError):
        register_strategy("FLOPS", Counting)
