"""The prediction-to-allocation pipeline, verified through the operating system."""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    CpuAllocationStrategy,
    MemoryAllocationStrategy,
    NullAllocationStrategy,
    Prediction,
    Quotas,
    ReactiveResourceAllocator,
    RequestMetadata,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from prealloc import core
from engine_util import ExplodingStrategy, GatedStrategy, can_lock, rules, wait_until
from osutil import cpus_allowed, thread_ids, vm_lck, vm_rss

MiB = 1 << 20
SLACK = 6 * MiB
MEM, CPU, CUSTOM = ResourceType.MEMORY, ResourceType.CPU, ResourceType.CUSTOM


def prediction(value: str = "go", confidence: float = 0.9, **kw) -> Prediction:
    return Prediction(id=f"p-{value}", type="t", predicted_value=value, confidence=confidence, **kw)


def memory_engine(**kw) -> ResourcePreallocator:
    kw.setdefault("allocation_strategies", {MEM: MemoryAllocationStrategy(lock=kw.pop("lock", False))})
    return ResourcePreallocator(**kw)


def test_status_numbers_are_the_native_table_ones():
    for status in AllocationStatus:
        assert core.status_name(int(status)) == status.name


def test_prediction_to_locked_memory_through_the_worker_and_back():
    base_rss, base_lck = vm_rss(), vm_lck()
    translator = rules({"resource_type": "MEMORY", "need": 48, "priority": 1})
    lockable = can_lock(48 * MiB)
    with memory_engine(translator=translator, lock=True) as pre:
        (rid,) = pre.handle_prediction(prediction(target_application="app"))
        assert pre.wait_ready(rid, timeout=30)
        allocation = pre.get_allocation(rid)
        assert allocation.allocated_amount == 48 and allocation.details["locked"] is lockable
        if lockable:
            assert vm_lck() - base_lck == 48 * MiB  # the kernel says it is locked
        else:  # RLIMIT_MEMLOCK said no: recorded, and nothing half-locked
            assert allocation.details["lock_error"] and vm_lck() == base_lck
        assert vm_rss() - base_rss >= 48 * MiB - SLACK  # and resident
        assert pre.release_allocation(rid, AllocationFeedback(used_successfully=False))
        assert pre.release_allocation(rid) is False  # only once
        assert vm_lck() == base_lck
        assert pre.get_allocation(rid) is None and len(pre) == 0
    assert vm_rss() - base_rss <= SLACK


def test_acquire_hands_over_a_ready_buffer_and_counts_a_hit():
    translator = rules({"resource_type": "MEMORY", "need": 16})
    with memory_engine(translator=translator) as pre:
        (rid,) = pre.handle_prediction(prediction(target_application="editor"))
        wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)
        with pre.acquire(MEM, 16, target_application="editor") as claim:
            assert claim.preallocated and claim.allocation_id == rid
            array = np.frombuffer(claim.resource, dtype=np.uint8)
            assert array.size == 16 * MiB and claim.resource.resident_bytes() == 16 * MiB
            array[:] = 1
            assert pre.get_allocation(rid).status is AllocationStatus.ACTIVE
            del array
        stats = pre.get_statistics()
        assert stats.claimed == 1 and stats.resource_hit_rate == 1.0 and stats.released == 1
        # nothing ready now: a miss allocates on the spot
        with pre.acquire(MEM, 4, target_application="editor") as claim:
            assert not claim.preallocated and claim.resource.size == 4 * MiB


def test_expiry_releases_through_the_ticker_and_counts_as_unused():
    base = vm_rss()
    translator = rules({"resource_type": "MEMORY", "need": 32, "duration": 0.05})
    expired = []
    with memory_engine(translator=translator) as pre:
        pre.on("expired", expired.append)
        (rid,) = pre.handle_prediction(prediction())
        wait_until(lambda: expired)
        assert expired[0].allocation_id == rid and expired[0].status is AllocationStatus.EXPIRED
        assert pre.get_allocation(rid) is None
        stats = pre.get_statistics()
        assert stats.expired == 1 and stats.resource_hit_rate == 0.0
        assert stats.resource_waste_rate == pytest.approx(1.0)
        assert vm_rss() - base <= SLACK


def test_a_claimed_buffer_outlives_expiry_and_reset():
    translator = rules({"resource_type": "MEMORY", "need": 8, "duration": 0.02})
    pre = memory_engine(translator=translator)
    (rid,) = pre.handle_prediction(prediction())
    wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)
    claim = pre.claim(rid)
    view = np.frombuffer(claim.resource, dtype=np.uint8)
    threading.Event().wait(0.1)  # well past the duration: claimed allocations do not expire
    assert pre.get_allocation(rid).status is AllocationStatus.ACTIVE
    base = vm_rss()
    pre.reset()
    assert pre.get_allocation(rid) is None
    view[:] = 7  # still mapped: reset never pulls memory from under a live buffer
    assert view[-1] == 7
    pre.close()
    del view
    gc.collect()
    assert vm_rss() <= base - 8 * MiB + SLACK
    assert claim.release() is False  # already given back by the reset


def test_dropping_a_claim_without_release_gives_the_resource_back():
    with memory_engine(translator=rules({"resource_type": "MEMORY", "need": 8})) as pre:
        (rid,) = pre.handle_prediction(prediction())
        wait_until(lambda: pre.get_allocation(rid) and pre.get_allocation(rid).status.name == "ALLOCATED")
        pre.claim(rid)  # dropped at once: its finalizer hands the id to the worker
        gc.collect()
        wait_until(lambda: pre.get_allocation(rid) is None)
        assert pre.get_statistics().released == 1


def test_cpu_prediction_pins_the_target_process_and_release_restores(child):
    original = {tid: cpus_allowed(child.pid, tid) for tid in thread_ids(child.pid)}
    translator = rules({"resource_type": "CPU", "need": 50})
    with ResourcePreallocator(translator=translator, allocation_strategies={CPU: CpuAllocationStrategy()}) as pre:
        (rid,) = pre.handle_prediction(prediction(target_process_id=child.pid))
        wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)
        cores = set(pre.get_allocation(rid).details["cores"])
        assert len(cores) == 1 and pre.get_allocation(rid).allocated_amount == 100.0
        for tid in thread_ids(child.pid):
            assert cpus_allowed(child.pid, tid) == cores  # pinned ahead of the need
        pre.release_allocation(rid)
        for tid, mask in original.items():
            assert cpus_allowed(child.pid, tid) == mask


def test_reset_leaves_the_machine_as_it_began(child):
    base_rss, base_lck = vm_rss(), vm_lck()
    original = cpus_allowed(child.pid)
    translator = rules({"resource_type": "MEMORY", "need": 24}, {"resource_type": "CPU", "need": 100})
    strategies = {MEM: MemoryAllocationStrategy(lock=True), CPU: CpuAllocationStrategy()}
    with ResourcePreallocator(translator=translator, allocation_strategies=strategies) as pre:
        ids = pre.handle_prediction(prediction(target_process_id=child.pid))
        assert pre.wait_ready(ids, timeout=30)
        assert all(pre.get_allocation(i).status is AllocationStatus.ALLOCATED for i in ids)
        locked = 24 * MiB if pre.get_allocation(ids[0]).details["locked"] else 0
        assert vm_lck() - base_lck == locked and len(cpus_allowed(child.pid)) == 1
        resets = []
        pre.on("reset", resets.append)
        pre.reset()
        assert resets == [{"preallocator_id": pre.id}] and len(pre) == 0
        assert vm_lck() == base_lck and cpus_allowed(child.pid) == original
    assert vm_rss() - base_rss <= SLACK


def test_adjust_grows_memory_in_place_and_cores_are_added_and_given_back():
    with ResourcePreallocator(translator=None, allocation_strategies={
            MEM: MemoryAllocationStrategy(lock=True), CPU: CpuAllocationStrategy()}) as pre:
        base = vm_lck()
        a = pre.request_preallocation(ResourceRequest(MEM, 8))
        per_mib = MiB if a.details["locked"] else 0  # locked where RLIMIT_MEMLOCK lets it
        assert pre.adjust_allocation(a.allocation_id, 4)  # shrink, then grow into the hole
        assert vm_lck() - base == 4 * per_mib
        assert pre.adjust_allocation(a.allocation_id, 8)
        assert vm_lck() - base == 8 * per_mib
        assert pre.get_allocation(a.allocation_id).allocated_amount == 8
        if len(os.sched_getaffinity(0)) >= 2:
            c = pre.request_preallocation(ResourceRequest(CPU, 100))
            assert pre.adjust_allocation(c.allocation_id, 200)
            assert len(pre.get_allocation(c.allocation_id).details["cores"]) == 2
            assert pre.adjust_allocation(c.allocation_id, 100)
            assert len(pre.get_allocation(c.allocation_id).details["cores"]) == 1
        assert pre.adjust_allocation(12345, 10) is False
        with pytest.raises(ValueError):
            pre.adjust_allocation(a.allocation_id, float("nan"))


def test_quotas_fail_requests_with_a_reason():
    quotas = Quotas(per_request={CUSTOM: 10}, per_type={CUSTOM: 15}, per_application={"a": {CUSTOM: 5}})
    failures = []
    with ResourcePreallocator(translator=None, quotas=quotas,
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        pre.on("failed", failures.append)
        big = pre.request_preallocation(ResourceRequest(CUSTOM, 11))
        assert big.status is AllocationStatus.FAILED and "at most 10" in big.failure_reason
        ok = pre.request_preallocation(ResourceRequest(CUSTOM, 8))
        assert ok.status is AllocationStatus.ALLOCATED
        over_type = pre.request_preallocation(ResourceRequest(CUSTOM, 8))
        assert over_type.status is AllocationStatus.FAILED and "together" in over_type.failure_reason
        app = pre.request_preallocation(ResourceRequest(CUSTOM, 6, metadata=RequestMetadata(target_application="a")))
        assert app.status is AllocationStatus.FAILED and "'a'" in app.failure_reason
        pre.release_allocation(ok.allocation_id)
        assert pre.request_preallocation(ResourceRequest(CUSTOM, 8)).status is AllocationStatus.ALLOCATED
        assert len(failures) == 3
        assert pre.get_statistics().failed_allocations == 3


def test_unsupported_type_fails_clearly_without_a_crash():
    with ResourcePreallocator(translator=rules({"resource_type": "GPU", "need": 100}),
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        failures = []
        pre.on("failed", failures.append)
        (rid,) = pre.handle_prediction(prediction())
        wait_until(lambda: failures)
        assert failures[0].failure_reason.startswith("no strategy for GPU")
        assert pre.get_allocation(rid) is None


@pytest.mark.parametrize("bad", [
    dict(predicted_need=float("nan")), dict(predicted_need=-1), dict(predicted_need=float("inf")),
    dict(confidence=1.5), dict(confidence=-0.1), dict(resource_type="FLOPS"), dict(priority=float("nan")),
])
def test_bad_requests_raise_value_error_and_change_nothing(bad):
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        args = dict(resource_type=CUSTOM, predicted_need=1.0)
        args.update(bad)
        with pytest.raises(ValueError):
            pre.request_preallocation(ResourceRequest(**args))
        with pytest.raises(ValueError):
            pre.submit(ResourceRequest(**args))
        assert len(pre) == 0 and pre.get_statistics().total_requests == 0


@pytest.mark.parametrize("bad", [dict(confidence=float("nan")), dict(confidence=2.0), dict(id=""),
                                 dict(expected_at=-5.0), dict(target_process_id=-3)])
def test_bad_predictions_raise_and_queue_nothing(bad):
    with ResourcePreallocator(translator=rules({"resource_type": "CUSTOM", "need": 1}),
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        args = dict(id="p", type="t", predicted_value="go", confidence=0.5)
        args.update(bad)
        with pytest.raises(ValueError):
            pre.handle_prediction(Prediction(**args))
        assert len(pre) == 0 and pre.queue_size == 0


def test_low_confidence_predictions_are_counted_and_skipped():
    with ResourcePreallocator(translator=rules({"resource_type": "CUSTOM", "need": 1}), min_confidence=0.5,
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        assert pre.handle_prediction(prediction(confidence=0.2)) == []
        assert pre.get_statistics().skipped_low_confidence == 1 and len(pre) == 0


def test_a_strategy_that_raises_never_stops_the_worker():
    translator = rules({"resource_type": "CUSTOM", "need_from_value": True}, value="*")
    with ResourcePreallocator(translator=translator, allocation_strategies={CUSTOM: ExplodingStrategy()}) as pre:
        failures = []
        pre.on("failed", failures.append)
        pre.handle_prediction(Prediction("a", "t", 13, 0.9))
        pre.handle_prediction(Prediction("b", "t", 14, 0.9))
        (ok,) = pre.handle_prediction(Prediction("c", "t", 2, 0.9))
        wait_until(lambda: pre.get_allocation(ok) and pre.get_allocation(ok).status.name == "ALLOCATED")
        wait_until(lambda: len(failures) == 2)
        assert {f.failure_reason for f in failures} == {"boom", "refused on purpose"}


def test_a_waiting_request_is_retried_when_resources_come_back_and_dropped_at_its_deadline():
    gate = GatedStrategy(capacity=10)
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: gate}) as pre:
        holder = pre.request_preallocation(ResourceRequest(CUSTOM, 8))
        waiting = pre.submit(ResourceRequest(CUSTOM, 5, deadline=core.monotonic_ns() * 1e-9 + 30))
        failures = []
        pre.on("failed", failures.append)
        doomed = pre.submit(ResourceRequest(CUSTOM, 50, deadline=core.monotonic_ns() * 1e-9 + 0.1))
        wait_until(lambda: failures)  # never fits: dropped when its deadline passes
        assert failures[0].allocation_id == doomed and "deadline" in failures[0].failure_reason
        assert pre.get_allocation(doomed) is None
        assert pre.get_allocation(waiting).status is AllocationStatus.PENDING
        pre.release_allocation(holder.allocation_id)  # availability changes: retried at once
        wait_until(lambda: pre.get_allocation(waiting).status is AllocationStatus.ALLOCATED)
        assert gate.held == 5


def test_queue_order_follows_priority_then_confidence():
    order = []
    gate = threading.Event()

    class Recording(NullAllocationStrategy):
        def allocate(self, request, amount, availability):
            if amount == 99:
                gate.wait(10)  # holds the worker while the others are queued
            order.append(request.predicted_need)
            return super().allocate(request, amount, availability)

    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: Recording()}) as pre:
        pre.submit(ResourceRequest(CUSTOM, 99, priority=100))
        wait_until(lambda: pre.queue_size == 0)  # the worker took it and is blocked
        for need, priority, confidence in [(1, 0, 0.5), (2, 5, 0.1), (3, 5, 0.9), (4, 1, 1.0)]:
            pre.submit(ResourceRequest(CUSTOM, need, priority=priority, confidence=confidence))
        gate.set()
        wait_until(lambda: len(order) == 5)
        assert order == [99, 3, 2, 4, 1]


def test_cancel_request_withdraws_a_queued_one():
    gate = GatedStrategy(capacity=0)
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: gate}) as pre:
        rid = pre.submit(ResourceRequest(CUSTOM, 1))
        wait_until(lambda: pre.queue_size == 0)
        assert pre.cancel_request(rid) is True
        assert pre.cancel_request(rid) is False and pre.get_allocation(rid) is None


def test_feedback_teaches_the_sizer_and_reaches_the_predictor():
    from prealloc import AdaptiveSizer, RuleTranslator

    class Predictor:
        id = "pred"

        def __init__(self):
            self.listeners, self.updates = {}, []

        def on(self, event, fn):
            self.listeners[event] = fn

        def update_model(self, outcome):  # a PredictionOutcome, on the worker
            self.updates.append((outcome.prediction_id, outcome.used_amount, outcome.reason))

    sizer = AdaptiveSizer(min_samples=1)
    translator = RuleTranslator.from_dict({"rule": [{"name": "r", "match": {"type": "t"},
                                                     "request": [{"resource_type": "CUSTOM", "need": 100}]}]},
                                          sizer=sizer)
    predictor = Predictor()
    with ResourcePreallocator(translator=translator, predictor=predictor,
                              allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        for i in range(6):
            (rid,) = predictor.listeners["prediction:generated"](Prediction(f"p{i}", "t", "x", 0.9))
            wait_until(lambda: pre.get_allocation(rid).status is AllocationStatus.ALLOCATED)
            pre.release_allocation(rid, AllocationFeedback(True, actual_amount_used=20))
        wait_until(lambda: len(predictor.updates) == 6)
        assert predictor.updates[0] == ("p0", 20, "released")
        (rid,) = pre.handle_prediction(Prediction("last", "t", "x", 0.9))
        # the sizer has learned ~20 (+10% margin); each step moved at most x1.5
        assert pre.get_allocation(rid).requested_amount < 40


def test_reactive_allocator_runs_the_same_workload():
    with ReactiveResourceAllocator(allocation_strategies={MEM: MemoryAllocationStrategy()}) as reactive:
        assert reactive.handle_prediction(prediction()) == []
        with reactive.acquire(MEM, 4) as claim:
            assert not claim.preallocated and claim.resource.resident_bytes() == 4 * MiB
        stats = reactive.get_statistics()
        # an allocation made at the need is no preallocation: neither rate counts it a hit
        assert stats.successful_allocations == 1 and stats.preallocations_finished == 0
        assert stats.resource_hit_rate == 0.0 and stats.needs == 1 and stats.need_hit_rate == 0.0


def test_statistics_from_what_happened():
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        used = pre.request_preallocation(ResourceRequest(CUSTOM, 10))
        unused = pre.request_preallocation(ResourceRequest(CUSTOM, 10))
        claim = pre.claim(used.allocation_id)
        threading.Event().wait(0.05)
        claim.release(AllocationFeedback(True, actual_amount_used=5))  # half used
        pre.release_allocation(unused.allocation_id, AllocationFeedback(False))
        stats = pre.get_statistics()
        assert stats.total_requests == 2 and stats.successful_allocations == 2
        assert stats.resource_hit_rate == 0.5
        # unused: all of its amount x time; used: half of it after the claim
        assert 0.6 < stats.resource_waste_rate < 0.8
        assert stats.allocations_by_type == {CUSTOM: 2}
        assert stats.average_allocation_time >= 0


def test_engine_is_thread_safe_under_concurrent_requests_and_releases():
    with ResourcePreallocator(translator=None, allocation_strategies={CUSTOM: NullAllocationStrategy()}) as pre:
        errors = []

        def work():
            try:
                for _ in range(500):
                    a = pre.request_preallocation(ResourceRequest(CUSTOM, 1, duration=0.001))
                    pre.release_allocation(a.allocation_id)  # races the 1 ms expiry
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        wait_until(lambda: len(pre) == 0)
        stats = pre.get_statistics()
        assert stats.successful_allocations == 2000
        assert stats.released + stats.expired == 2000  # each one ended exactly once


def test_snapshots_are_the_dataclass_field_for_field_and_hold_their_references():
    """The engine builds ResourceAllocation snapshots without the dataclass's __init__
    (see _engine_core.pxi); they must be indistinguishable from constructed ones, and
    must own (not borrow or leak) a reference to each field."""
    import dataclasses
    import sys

    from prealloc import ResourceAllocation
    from prealloc import _native

    assert _native._snapshots_direct()
    details: dict = {}
    feedback = AllocationFeedback(True, actual_amount_used=0.5)
    refs_before = sys.getrefcount(feedback)
    with ResourcePreallocator(allocation_strategies={CUSTOM: NullAllocationStrategy()},
                              resource_monitors={}) as pre:
        released = []
        pre.events.on("released", released.append)
        a = pre.request_preallocation(ResourceRequest(CUSTOM, 2.0, duration=30.0))
        rebuilt = ResourceAllocation(*[getattr(a, f.name) for f in dataclasses.fields(a)])
        assert type(a) is ResourceAllocation
        assert a == rebuilt and repr(a) == repr(rebuilt)
        assert dataclasses.asdict(a) == dataclasses.asdict(rebuilt)
        assert a.status is AllocationStatus.ALLOCATED and a.allocated_amount == 2.0
        assert a.expires_at == pytest.approx(a.allocated_at + 30.0)
        assert a.details == details and a.failure_reason is None
        assert pre.release_allocation(a.allocation_id, AllocationFeedback(True, actual_amount_used=0.5))
        for _ in range(1000):
            b = pre.request_preallocation(ResourceRequest(CUSTOM, 1.0))
            pre.release_allocation(b.allocation_id, feedback)
        assert released[-1].feedback is feedback and len(released) == 1001
        released.clear()  # (the emitter holds the list through its append)
        del b
    gc.collect()
    assert sys.getrefcount(feedback) == refs_before  # every snapshot let go of it
    a.failure_reason = "writable like any dataclass"
    assert a.failure_reason == "writable like any dataclass"


class _SlowStrategy(NullAllocationStrategy):
    """Allocations of 99 block until the test opens the gate (a slow populate)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def allocate(self, request, amount, availability):
        if amount == 99:
            self.entered.set()
            assert self.gate.wait(30)
        return super().allocate(request, amount, availability)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slow_allocation_holds_back_others_only_with_one_worker(workers):
    slow = _SlowStrategy()
    with ResourcePreallocator(allocation_strategies={CUSTOM: slow}, resource_monitors={},
                              allocation_workers=workers) as pre:
        big = pre.submit(ResourceRequest(CUSTOM, 99.0, priority=9.0))
        assert slow.entered.wait(10)
        small = pre.submit(ResourceRequest(CUSTOM, 1.0))
        try:
            if workers == 1:
                # the only worker is inside the slow allocation: the small one waits
                assert pre.get_allocation(small).status is AllocationStatus.PENDING
            else:
                wait_until(lambda: pre.get_allocation(small).status is AllocationStatus.ALLOCATED)
                assert pre.get_allocation(big).status is AllocationStatus.PENDING
        finally:
            slow.gate.set()
        wait_until(lambda: all(pre.get_allocation(a).status is AllocationStatus.ALLOCATED for a in (big, small)))
        assert pre.get_statistics().successful_allocations == 2
    assert not [t for t in threading.enumerate() if t.name.startswith(f"prealloc-worker-{pre.id[:8]}")]


def test_many_workers_allocate_each_request_once():
    with ResourcePreallocator(allocation_strategies={CUSTOM: NullAllocationStrategy()}, resource_monitors={},
                              allocation_workers=4) as pre:
        ids = [pre.submit(ResourceRequest(CUSTOM, 1.0 + i % 7, priority=float(i % 3)), wake=False)
               for i in range(2000)]
        pre._wake()
        wait_until(lambda: pre.queue_size == 0 and pre.get_statistics().successful_allocations == 2000)
        assert all(pre.get_allocation(i).status is AllocationStatus.ALLOCATED for i in ids)
        assert pre.get_statistics().total_requests == 2000


@pytest.mark.parametrize("bad", [0, 65, 1.5, True, "2"])
def test_allocation_workers_must_be_a_small_int(bad):
    with pytest.raises(ValueError, match="allocation_workers"):
        ResourcePreallocator(allocation_strategies={}, resource_monitors={}, allocation_workers=bad)
