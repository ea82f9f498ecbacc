"""The allocation lifecycle's defects, each reproduced (issue 7, items 1-12): every test
here failed against the engine before its lifecycle was written once in EngineCore."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from prealloc import (
    AllocationError,
    AllocationFeedback,
    AllocationStatus,
    Grant,
    MemoryPreallocator,
    NullAllocationStrategy,
    PreallocatorConfig,
    Prediction,
    Quotas,
    ReactiveResourceAllocator,
    RequestMetadata,
    ResourceAvailability,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from prealloc.monitors.base import ResourceMonitor
from engine_util import rules, wait_until

CUSTOM, MEM, CPU = ResourceType.CUSTOM, ResourceType.MEMORY, ResourceType.CPU
HANG = 60.0  # a bound that only a hang reaches; never a measurement


def null_engine(**kw: Any) -> ResourcePreallocator:
    kw.setdefault("allocation_strategies", {CUSTOM: NullAllocationStrategy()})
    kw.setdefault("resource_monitors", {})
    return ResourcePreallocator(translator=kw.pop("translator", None), **kw)


def run_bounded(fn: Any, *args: Any) -> Any:
    """Runs fn on a thread; fails the test (instead of hanging it) if it never returns."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), f"{fn} hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


class Adjustable(NullAllocationStrategy):
    """A CUSTOM strategy whose adjust and release the test steers."""

    def __init__(self) -> None:
        super().__init__()
        self.on_adjust: Any = None
        self.fail_release = 0
        self.releases = 0
        self.held: dict[int, float] = {}
        self._next = 0

    def allocate(self, request, amount, availability):
        self._next += 1
        self.held[self._next] = amount
        return Grant(amount, self._next)

    def adjust(self, handle, new_amount):
        if self.on_adjust is not None:
            self.on_adjust(handle, new_amount)
        self.held[handle] = new_amount
        return new_amount

    def release(self, handle):
        if self.fail_release:
            self.fail_release -= 1
            raise OSError("release refused on purpose")
        self.releases += 1
        self.held.pop(handle, None)


# ---------------------------------------------------------------- 1. no deadlock
def test_a_claim_collected_inside_an_adjust_does_not_deadlock():
    strategy = Adjustable()
    with null_engine(allocation_strategies={CUSTOM: strategy}) as pre:
        dropped = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        adjusted = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        claim = pre.claim(dropped)
        cycle: list[Any] = [claim]
        cycle.append(cycle)  # only the cyclic collector frees it: inside the adjust below
        del claim, cycle
        strategy.on_adjust = lambda handle, amount: gc.collect()
        gc.disable()
        try:
            assert run_bounded(pre.adjust_allocation, adjusted, 2.0) is True
        finally:
            gc.enable()
        wait_until(lambda: pre.get_allocation(dropped) is None)  # the worker released it
        assert pre.get_allocation(adjusted).allocated_amount == 2.0


def test_a_slow_adjust_holds_back_only_its_own_allocation():
    strategy = Adjustable()
    gate = threading.Event()
    with null_engine(allocation_strategies={CUSTOM: strategy}) as pre:
        slow = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        other = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        strategy.on_adjust = lambda handle, amount: gate.wait(HANG)
        adjusting = threading.Thread(target=pre.adjust_allocation, args=(slow, 2.0))
        adjusting.start()
        wait_until(lambda: strategy.on_adjust is not None and pre._busy_count() == 1)
        assert run_bounded(pre.release_allocation, other) is True  # not queued behind the adjust
        releasing = threading.Thread(target=pre.release_allocation, args=(slow,))
        releasing.start()
        releasing.join(0.05)
        assert releasing.is_alive()  # the release of the one being adjusted waits for it
        gate.set()
        adjusting.join(HANG)
        releasing.join(HANG)
        assert pre.get_allocation(slow) is None and strategy.held == {}


# ---------------------------------------------------------------- 2. the ledger
def ledger_matches(pre: ResourcePreallocator) -> None:
    """The quota ledger holds exactly the charges of the live allocations."""
    holdings = pre._holdings()
    for (rtype, app), amount in holdings.items():
        assert pre.quotas.held(rtype, app) == pytest.approx(amount)
    for rtype in ResourceType:
        expected = sum(a for (t, _), a in holdings.items() if t is rtype)
        assert pre.quotas.held(rtype) == pytest.approx(expected)


def test_adjust_racing_its_own_expiry_leaves_no_phantom_charge():
    strategy = Adjustable()
    quotas = Quotas(per_type={CUSTOM: 100})
    with null_engine(allocation_strategies={CUSTOM: strategy}, quotas=quotas) as pre:
        rid = pre.request_preallocation(ResourceRequest(CUSTOM, 10, duration=0.01)).allocation_id

        def until_expired(handle, amount):  # the ticker expires it while the strategy resizes
            wait_until(lambda: pre._table.status(rid) == AllocationStatus.EXPIRED)

        strategy.on_adjust = until_expired
        result = run_bounded(pre.adjust_allocation, rid, 60.0)
        assert result in (True, False)
        wait_until(lambda: pre.get_allocation(rid) is None)
        assert pre.quotas.held(CUSTOM) == 0.0 and strategy.held == {}
        assert pre.get_statistics().expired == 1


class RaisingMonitor(ResourceMonitor):
    def __init__(self) -> None:
        super().__init__(sample_interval=3600.0)

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({CUSTOM})

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        raise OSError("the monitor broke")


def test_a_monitor_that_raises_after_the_charge_leaks_nothing():
    quotas = Quotas(per_type={CUSTOM: 100})
    with null_engine(quotas=quotas, headroom={CUSTOM: 0.1}, resource_monitors={CUSTOM: RaisingMonitor()}) as pre:
        allocation = pre.request_preallocation(ResourceRequest(CUSTOM, 10))
        assert allocation.status is AllocationStatus.FAILED and "monitor broke" in allocation.failure_reason
        assert len(pre) == 0 and pre.quotas.held(CUSTOM) == 0.0  # no PENDING record, no charge
        rid = pre.submit(ResourceRequest(CUSTOM, 10))
        wait_until(lambda: pre.get_allocation(rid) is None)
        assert pre.quotas.held(CUSTOM) == 0.0 and pre.get_statistics().failed_allocations == 2


class FlakyAdjust(Adjustable):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def adjust(self, handle, new_amount):
        raise self.error


@pytest.mark.parametrize("error", [OSError(12, "Cannot allocate memory"), OverflowError("too big")])
def test_adjust_the_machine_refuses_returns_false_with_nothing_charged(error):
    quotas = Quotas(per_type={CUSTOM: 1000})
    with null_engine(allocation_strategies={CUSTOM: FlakyAdjust(error)}, quotas=quotas) as pre:
        rid = pre.request_preallocation(ResourceRequest(CUSTOM, 10)).allocation_id
        assert pre.adjust_allocation(rid, 500) is False
        assert pre.quotas.held(CUSTOM) == 10.0 and pre.get_allocation(rid).allocated_amount == 10.0


def test_cpu_adjust_beyond_the_machine_is_refused_and_charges_nothing():
    from prealloc import CpuAllocationStrategy

    cores = len(os.sched_getaffinity(0))
    quotas = Quotas(per_type={CPU: 100_000})
    with ResourcePreallocator(translator=None, quotas=quotas, resource_monitors={},
                              allocation_strategies={CPU: CpuAllocationStrategy(exclusive=False, journal=None)}) as pre:
        rid = pre.request_preallocation(ResourceRequest(CPU, 50)).allocation_id
        held = pre.quotas.held(CPU)
        try:
            assert pre.adjust_allocation(rid, 100.0 * (cores + 1)) is False
        except ValueError as exc:  # absurd for this machine: a clear refusal is also right
            assert "core" in str(exc)
        assert pre.quotas.held(CPU) == held and pre.get_allocation(rid).allocated_amount == 100.0
        ledger_matches(pre)


def test_per_request_quota_applies_to_adjust():
    with null_engine(allocation_strategies={CUSTOM: Adjustable()}, quotas=Quotas(per_request={CUSTOM: 16})) as pre:
        rid = pre.request_preallocation(ResourceRequest(CUSTOM, 8)).allocation_id
        assert pre.adjust_allocation(rid, 32) is False
        assert pre.adjust_allocation(rid, 16) is True
        assert pre.quotas.held(CUSTOM) == 16.0


class WholeUnits(Adjustable):
    """Holds whole units of 100, like CPU cores: planned_amount says so up front."""

    def planned_amount(self, request, amount):
        return 100.0 * max(1, -(-amount // 100))

    def allocate(self, request, amount, availability):
        grant = super().allocate(request, amount, availability)
        return Grant(self.planned_amount(request, amount), grant.handle)


def test_quotas_check_and_charge_what_the_strategy_will_hold():
    with null_engine(allocation_strategies={CUSTOM: WholeUnits()}, quotas=Quotas(per_type={CUSTOM: 100})) as pre:
        first = pre.request_preallocation(ResourceRequest(CUSTOM, 50))
        assert first.status is AllocationStatus.ALLOCATED and first.allocated_amount == 100.0
        second = pre.request_preallocation(ResourceRequest(CUSTOM, 50))  # 50 % asked, a whole unit held
        assert second.status is AllocationStatus.FAILED and "quota" in second.failure_reason
        assert pre.quotas.held(CUSTOM) == 100.0
        ledger_matches(pre)


def test_memory_quota_counts_what_is_mapped():
    from prealloc import MemoryAllocationStrategy

    with MemoryPreallocator(translator=None, quotas=Quotas(per_type={MEM: 4}), resource_monitors={},
                            memory_options={"huge_pages": True}) as pre:
        results = [pre.request_preallocation(ResourceRequest(MEM, 0.01)) for _ in range(32)]
        live = [r for r in results if r.status is AllocationStatus.ALLOCATED]
        mapped = sum(r.allocated_amount for r in live)
        assert mapped <= 4.0 + 1e-9 and pre.quotas.held(MEM) == pytest.approx(mapped)
        for r in live:  # the amount booked is what the region really is
            assert r.allocated_amount * (1 << 20) == r.details["mapped_bytes"]
        ledger_matches(pre)
    assert isinstance(MemoryAllocationStrategy(), MemoryAllocationStrategy)


def test_memory_stays_charged_while_a_consumer_view_keeps_it_mapped():
    np = pytest.importorskip("numpy")
    with MemoryPreallocator(translator=None, quotas=Quotas(per_type={MEM: 64}), resource_monitors={}) as pre:
        rid = pre.request_preallocation(ResourceRequest(MEM, 8)).allocation_id
        claim = pre.claim(rid)
        view = np.frombuffer(claim.resource, dtype=np.uint8)
        view[:] = 1
        assert claim.release()
        assert pre.get_allocation(rid) is None
        assert pre.quotas.held(MEM) == 8.0  # still mapped: still charged
        del view, claim
        gc.collect()
        wait_until(lambda: pre.quotas.held(MEM) == 0.0)


# ---------------------------------------------------------------- 3. close
def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_close_is_idempotent_under_races_and_closes_its_fds_once():
    before = open_fds()
    pre = null_engine()
    pre.request_preallocation(ResourceRequest(CUSTOM, 1))
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def closer() -> None:
        barrier.wait()
        try:
            pre.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=closer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert not errors and pre.closed
    assert open_fds() <= before  # the eventfds are gone, and nothing else was closed twice


def test_close_leaves_monitors_and_strategies_the_caller_passed_open():
    class Closable(NullAllocationStrategy):
        closed = False

        def close(self) -> None:
            self.closed = True

    strategy = Closable()
    pre = null_engine(allocation_strategies={CUSTOM: strategy})
    pre.close()
    assert not strategy.closed


def test_every_method_raises_the_same_error_after_close_and_reset_emits_nothing():
    pre = null_engine()
    seen: list[Any] = []
    pre.on("reset", seen.append)
    pre.close()
    calls = [lambda: pre.request_preallocation(ResourceRequest(CUSTOM, 1)),
             lambda: pre.submit(ResourceRequest(CUSTOM, 1)), lambda: pre.release_allocation(1),
             lambda: pre.claim(1), lambda: pre.adjust_allocation(1, 2.0), lambda: pre.get_allocation(1),
             lambda: pre.get_statistics(), pre.reset, lambda: pre.acquire(CUSTOM, 1),
             lambda: pre.handle_prediction(Prediction("p", "t", "v", 0.9)), lambda: pre.cancel_request(1),
             lambda: pre.wait_ready([1]), lambda: pre.on("reset", print), lambda: pre.initialize(name="x")]
    messages = set()
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        messages.add(str(info.value))
    assert len(messages) == 1 and seen == []


# ---------------------------------------------------------------- 4. reset racing
def test_reset_racing_submit_and_request_preallocation():
    with null_engine() as pre:
        stop = threading.Event()
        problems: list[Any] = []

        def resetter() -> None:
            while not stop.is_set():
                pre.reset()

        def requester() -> None:
            for _ in range(3000):
                try:
                    allocation = pre.request_preallocation(ResourceRequest(CUSTOM, 1))
                    if allocation is None or allocation.status not in (
                            AllocationStatus.ALLOCATED, AllocationStatus.RELEASED):
                        problems.append(allocation)
                    rid = pre.submit(ResourceRequest(CUSTOM, 1))
                    if type(rid) is not int:
                        problems.append(rid)
                except Exception as exc:
                    problems.append(exc)

        threads = [threading.Thread(target=resetter)] + [threading.Thread(target=requester) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(HANG)
        stop.set()
        threads[0].join(HANG)
        assert problems == []
        pre.reset()
        wait_until(lambda: len(pre) == 0)
        assert_statistics_add_up(pre)


# ---------------------------------------------------------------- 5. time
@pytest.mark.parametrize("field,value", [("deadline", 1.8e10), ("duration", 2e10), ("deadline", 1e300),
                                         ("duration", float(10**300))])
def test_times_beyond_the_horizon_are_refused_before_admission(field, value):
    with null_engine() as pre:
        with pytest.raises(ValueError, match=field):
            pre.submit(ResourceRequest(CUSTOM, 1, **{field: value}))
        with pytest.raises(ValueError, match=field):
            pre.request_preallocation(ResourceRequest(CUSTOM, 1, **{field: value}))
        assert len(pre) == 0 and pre.get_statistics().total_requests == 0


def test_expected_at_and_pending_timeout_beyond_the_horizon_are_refused():
    with pytest.raises(ValueError, match="pending_timeout"):
        null_engine(pending_timeout=1.8e10)
    with null_engine(translator=rules({"resource_type": "CUSTOM", "need": 1})) as pre:
        with pytest.raises(ValueError, match="expected_at"):
            pre.handle_prediction(Prediction("p", "t", "go", 0.9, expected_at=1.8e10))
        assert len(pre) == 0


# ---------------------------------------------------------------- 6. a reverted release
def test_a_release_that_fails_keeps_the_expiry():
    strategy = Adjustable()
    with null_engine(allocation_strategies={CUSTOM: strategy}) as pre:
        rid = pre.request_preallocation(ResourceRequest(CUSTOM, 1, duration=0.2)).allocation_id
        strategy.fail_release = 1
        assert pre.release_allocation(rid) is False
        assert pre.get_allocation(rid).status is AllocationStatus.ALLOCATED  # reverted
        wait_until(lambda: pre.get_allocation(rid) is None)  # and it still expires
        assert pre.get_statistics().expired == 1 and strategy.held == {}


# ---------------------------------------------------------------- 7. acquire's target
def test_acquire_rejects_a_bad_target_process_id():
    with null_engine() as pre:
        for bad in (-1, 0, True, 1.5, "1"):
            with pytest.raises(ValueError, match="target_process_id"):
                pre.acquire(CUSTOM, 1, target_process_id=bad)


def test_acquire_hands_a_ready_allocation_to_the_named_process():
    seen: list[Any] = []

    class Recording(NullAllocationStrategy):
        def allocate(self, request, amount, availability):
            return Grant(amount, "handle")

        def claim(self, handle, target_process_id=None):
            seen.append(target_process_id)
            return handle

    with null_engine(allocation_strategies={CUSTOM: Recording()}) as pre:
        pre.request_preallocation(ResourceRequest(CUSTOM, 1))
        with pre.acquire(CUSTOM, 1, target_process_id=os.getppid()) as claim:
            assert claim.preallocated
        with pre.acquire(CUSTOM, 1) as claim:  # a miss: the same hand-over
            assert not claim.preallocated
    assert seen == [os.getppid(), None]


# ---------------------------------------------------------------- 8. owners
def test_owners_are_dropped_with_their_last_allocation():
    with null_engine() as pre:
        for i in range(5000):
            a = pre.request_preallocation(ResourceRequest(CUSTOM, 1, metadata=RequestMetadata(
                target_application=f"app-{i}")))
            pre.release_allocation(a.allocation_id)
        assert pre._owner_count() == 0
        keep = pre.request_preallocation(ResourceRequest(CUSTOM, 1, metadata=RequestMetadata(
            target_application="kept")))
        assert pre._owner_count() == 1
        with pre.acquire(CUSTOM, 1, target_application="kept") as claim:
            assert claim.allocation_id == keep.allocation_id
        assert pre._owner_count() == 0


# ---------------------------------------------------------------- 9. statistics add up
def assert_statistics_add_up(pre: ResourcePreallocator) -> None:
    s = pre.get_statistics()
    assert s.total_requests == (s.successful_allocations + s.failed_allocations + s.cancelled
                                + s.queued_requests + s.in_flight)
    assert s.successful_allocations == s.finished + s.active_allocations
    assert s.finished == s.released + s.expired


def test_statistics_add_up_with_cancels_failures_and_waits():
    strategy = Adjustable()
    with null_engine(allocation_strategies={CUSTOM: strategy}, pending_timeout=0.05) as pre:
        pre.request_preallocation(ResourceRequest(CUSTOM, 1))
        failed = pre.request_preallocation(ResourceRequest(MEM, 1))  # no MEMORY strategy here
        assert failed.status is AllocationStatus.FAILED
        queued = pre.submit(ResourceRequest(CUSTOM, 1, deadline=1e9), wake=False)
        assert pre.cancel_request(queued)
        released = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        pre.release_allocation(released)
        assert_statistics_add_up(pre)
        s = pre.get_statistics()
        assert (s.total_requests, s.successful_allocations, s.failed_allocations, s.cancelled) == (4, 2, 1, 1)


# ---------------------------------------------------------------- 10. hit rate
class Slow(NullAllocationStrategy):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def allocate(self, request, amount, availability):
        if request.metadata.source_predictor_id == "ahead":
            self.gate.wait(HANG)
        return super().allocate(request, amount, availability)


def test_a_need_that_came_before_the_preallocation_is_a_miss_in_both_rates():
    gate = threading.Event()
    translator = rules({"resource_type": "CUSTOM", "need": 1, "duration": 0.05})
    with null_engine(allocation_strategies={CUSTOM: Slow(gate)}, translator=translator) as pre:
        (rid,) = pre.handle_prediction(Prediction("p", "t", "go", 0.9, source_predictor_id="ahead"))
        with pre.acquire(CUSTOM, 1) as claim:  # the need comes first: served at need
            assert not claim.preallocated
        gate.set()
        assert pre.wait_ready([rid], timeout=HANG)
        wait_until(lambda: pre.get_allocation(rid) is None)  # never used: it expires
        s = pre.get_statistics()
        assert s.resource_hit_rate == 0.0 and s.need_hit_rate == 0.0 and s.preallocations_finished == 1
        (rid2,) = pre.handle_prediction(Prediction("p2", "t", "go", 0.9))
        assert pre.wait_ready(rid2, timeout=HANG)
        with pre.acquire(CUSTOM, 1) as claim:
            assert claim.preallocated
        s = pre.get_statistics()
        assert s.need_hit_rate == 0.5 and s.resource_hit_rate == 0.5


def test_wait_ready_times_out_on_a_request_that_cannot_be_allocated_yet():
    gate = threading.Event()
    with null_engine(allocation_strategies={CUSTOM: Slow(gate)}) as pre:
        rid = pre.submit(ResourceRequest(CUSTOM, 1, metadata=RequestMetadata(source_predictor_id="ahead")))
        assert pre.wait_ready([rid], timeout=0.01) is False
        gate.set()
        assert pre.wait_ready([rid], timeout=HANG) is True
        assert pre.get_allocation(rid).status is AllocationStatus.ALLOCATED


# ---------------------------------------------------------------- 11. bad input
def test_bad_ids_get_a_type_error_and_unknown_ones_false_or_key_error():
    with null_engine() as pre:
        for bad in (True, "x", 4294967296.0, None, b"1"):
            with pytest.raises(TypeError, match="allocation_id"):
                pre.release_allocation(bad)
            with pytest.raises(TypeError, match="allocation_id"):
                pre.claim(bad)
            with pytest.raises(TypeError, match="allocation_id"):
                pre.adjust_allocation(bad, 1.0)
            with pytest.raises(TypeError, match="allocation_id"):
                pre.get_allocation(bad)
        for unknown in (2**64, 2**70, -1, 0, 12345):
            assert pre.release_allocation(unknown) is False
            assert pre.get_allocation(unknown) is None
            assert pre.adjust_allocation(unknown, 1.0) is False
            with pytest.raises(KeyError):
                pre.claim(unknown)


def test_bad_requests_are_refused_with_a_clear_error_and_change_nothing():
    with null_engine() as pre:
        with pytest.raises(TypeError, match="request"):
            pre.request_preallocation(None)
        with pytest.raises(TypeError, match="request"):
            pre.submit(None)
        with pytest.raises(TypeError, match="metadata"):
            pre.request_preallocation(ResourceRequest(CUSTOM, 1, metadata=None))
        with pytest.raises(ValueError, match="predicted_need"):
            pre.request_preallocation(ResourceRequest(CUSTOM, 10**400))
        with pytest.raises(ValueError, match="predicted_need"):
            pre.request_preallocation(ResourceRequest(CUSTOM, True))
        with pytest.raises(ValueError, match="amount"):
            pre.acquire(CUSTOM, 10**400)
        with pytest.raises(ValueError, match="new_amount"):
            pre.adjust_allocation(1, 10**400)
        with pytest.raises(TypeError, match="feedback"):
            pre.release_allocation(1, "nice")
        with pytest.raises(TypeError, match="target_application"):
            pre.acquire(CUSTOM, 1, target_application=42)
        assert len(pre) == 0 and pre.get_statistics().total_requests == 0


# ---------------------------------------------------------------- 12. config
def test_the_callers_config_is_never_written_and_its_name_is_kept():
    config = PreallocatorConfig(name="mine", resource_monitors={}, allocation_strategies={})
    with MemoryPreallocator(config, min_confidence=0.5) as pre:
        assert pre.name == "mine" and pre.config.min_confidence == 0.5
        pre.initialize(min_confidence=0.7)
    assert config.min_confidence == 0.0 and config.name == "mine"
    with MemoryPreallocator(PreallocatorConfig(resource_monitors={})) as pre:
        assert pre.name == "MemoryPreallocator"
    with ReactiveResourceAllocator(PreallocatorConfig(resource_monitors={}, allocation_strategies={})) as r:
        assert r.name == "ReactiveResourceAllocator"


def test_strategies_are_one_read_only_set():
    with null_engine() as pre:
        with pytest.raises(TypeError):
            pre.strategies[CUSTOM] = NullAllocationStrategy()  # type: ignore[index]
        assert pre.translator is pre.config.translator


# ---------------------------------------------------------------- fork
def test_a_forked_child_neither_hangs_nor_touches_the_parents_allocations(tmp_path):
    script = tmp_path / "fork_child.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from prealloc import NullAllocationStrategy, ResourcePreallocator, ResourceRequest, ResourceType
        pre = ResourcePreallocator(translator=None, resource_monitors={},
                                   allocation_strategies={ResourceType.CUSTOM: NullAllocationStrategy()})
        rid = pre.request_preallocation(ResourceRequest(ResourceType.CUSTOM, 1, duration=600)).allocation_id
        pid = os.fork()
        if pid == 0:
            try:
                pre.release_allocation(rid)
                print("child released", flush=True)
            except RuntimeError as exc:
                print("child refused:", "fork" in str(exc), flush=True)
            sys.exit(0)  # a normal exit: the atexit close must not hang
        _, status = os.waitpid(pid, 0)
        print("child status", status, flush=True)
        print("parent still has it:", pre.get_allocation(rid) is not None, flush=True)
        print("parent released:", pre.release_allocation(rid), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "child refused: True" in lines and "child status 0" in lines
    assert "parent still has it: True" in lines and "parent released: True" in lines


def test_acquire_of_an_unknown_type_fails_cleanly():
    with null_engine() as pre:
        with pytest.raises(AllocationError, match="no strategy"):
            pre.acquire(MEM, 1)
        assert len(pre) == 0
        assert_statistics_add_up(pre)


def test_release_feedback_is_validated():
    with null_engine() as pre:
        rid = pre.request_preallocation(ResourceRequest(CUSTOM, 1)).allocation_id
        with pytest.raises(TypeError, match="used_successfully"):
            pre.release_allocation(rid, AllocationFeedback(used_successfully="yes"))  # type: ignore[arg-type]
        assert pre.get_allocation(rid) is not None
        assert pre.release_allocation(rid, AllocationFeedback(True))
