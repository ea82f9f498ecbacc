"""Conformance with the client's spec (shared/spec/ResourcePreallocatorDesign.md), one
test per interface: its names in Python naming, its events and metrics, string ids, the
predictor loop. (The asyncio face has its own module, test_aio.py.)"""
from __future__ import annotations

import dataclasses
import threading
import uuid
from typing import Any

import pytest

import prealloc
from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    EventEmitter,
    Grant,
    MetricsCollector,
    NullAllocationStrategy,
    Prediction,
    PredictionOutcome,
    PredictionType,
    Predictor,
    ResourceAvailability,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
    RequestMetadata,
)
from engine_util import rules, wait_until

CUSTOM = ResourceType.CUSTOM


def engine(**kw: Any) -> ResourcePreallocator:
    kw.setdefault("allocation_strategies", {CUSTOM: NullAllocationStrategy()})
    kw.setdefault("resource_monitors", {})
    return ResourcePreallocator(translator=kw.pop("translator", None), **kw)


def test_enums_and_types_carry_the_spec_names():
    assert [t.name for t in ResourceType] == ["MEMORY", "CPU", "GPU", "NETWORK_BANDWIDTH", "DISK_IO",
                                              "CACHE_SPACE", "CUSTOM"]
    assert [s.name for s in AllocationStatus] == ["PENDING", "ALLOCATED", "ACTIVE", "RELEASING", "RELEASED",
                                                  "FAILED", "EXPIRED"]
    fields = {f.name for f in dataclasses.fields(prealloc.ResourceRequest)}
    assert {"resource_type", "predicted_need", "confidence", "priority", "duration", "deadline", "metadata",
            "associated_prediction_id", "request_id"} <= fields
    fields = {f.name for f in dataclasses.fields(prealloc.ResourceAllocation)}
    assert {"allocation_id", "request_id", "resource_type", "requested_amount", "allocated_amount", "status",
            "allocated_at", "expires_at", "actual_usage", "feedback"} <= fields
    fields = {f.name for f in dataclasses.fields(prealloc.PreallocatorStatistics)}
    assert {"total_requests", "successful_allocations", "failed_allocations", "average_allocation_time",
            "resource_hit_rate", "resource_waste_rate", "allocations_by_type"} <= fields
    assert PredictionType.USER_ACTION == "user_action"
    p = Prediction("p", PredictionType.USER_ACTION, "open", 0.9).validate()
    assert p.type == "user_action"  # rules match on the string


def test_the_preallocator_interface():
    for name in ("id", "name", "description", "initialize", "handle_prediction", "request_preallocation",
                 "release_allocation", "adjust_allocation", "get_statistics", "reset"):
        assert hasattr(ResourcePreallocator, name) or name in ("id", "name", "description")
    with engine() as pre:
        assert pre.id and pre.name == "ResourcePreallocator" and pre.description


def test_string_request_ids_are_kept_as_given():
    request_id = str(uuid.uuid4())
    seen: list[Any] = []
    with engine() as pre:
        pre.on("resource:allocated", seen.append)
        pre.on("resource:released", seen.append)
        a = pre.request_preallocation(ResourceRequest(CUSTOM, 1, request_id=request_id))
        assert a.request_id == request_id and pre.get_allocation(a.allocation_id).request_id == request_id
        queued = pre.submit(ResourceRequest(CUSTOM, 1, request_id="queued-1"))
        assert pre.wait_ready(queued, timeout=30)
        assert pre.get_allocation(queued).request_id == "queued-1"
        assert pre.release_allocation(a.allocation_id)
        # duplicates are allowed: the allocation id is what the API takes
        b = pre.request_preallocation(ResourceRequest(CUSTOM, 1, request_id="queued-1"))
        assert b.allocation_id != queued and b.request_id == "queued-1"
        assert [s.request_id for s in seen][:2] == [request_id, "queued-1"]
        released = [s for s in seen if s.status is AllocationStatus.RELEASED]
        assert [s.request_id for s in released] == [request_id]
        with pytest.raises(ValueError, match="request_id"):
            pre.request_preallocation(ResourceRequest(CUSTOM, 1, request_id=""))
        with pytest.raises(ValueError, match="request_id"):
            pre.request_preallocation(ResourceRequest(CUSTOM, 1, request_id="x" * 1000))


def test_allocation_ids_refuse_strings_with_a_type_error():
    with engine() as pre:
        with pytest.raises(TypeError, match="allocation_id"):
            pre.release_allocation("x")


def test_events_by_the_spec_names_and_their_aliases():
    got: list[tuple[str, Any]] = []
    with engine(pending_timeout=0.01) as pre:
        for name in ("resource:allocated", "resource:released", "resource:expired", "resource:failed",
                     "preallocator:reset"):
            pre.on(name, lambda payload, name=name: got.append((name, payload)))
        pre.on("allocated", lambda payload: got.append(("alias", payload)))
        a = pre.request_preallocation(ResourceRequest(CUSTOM, 1))
        pre.release_allocation(a.allocation_id)
        pre.request_preallocation(ResourceRequest(CUSTOM, 1, duration=0.01))
        pre.request_preallocation(ResourceRequest(ResourceType.GPU, 1))  # no strategy: failed
        wait_until(lambda: any(n == "resource:expired" for n, _ in got))
        pre.reset()
        with pytest.raises(ValueError, match="unknown event"):
            pre.on("resource:exploded", print)
    names = [n for n, _ in got]
    assert names.count("resource:allocated") == 2 and names.count("alias") == 2
    assert names.count("resource:released") == 1 and names.count("resource:failed") == 1
    assert names.count("preallocator:reset") == 1  # once: close does not emit it again
    assert dict(got)["preallocator:reset"] == {"preallocator_id": pre.id}


def test_the_emitter_may_be_the_callers():
    class DuckEmitter:  # on / off / emit only: the Protocol
        def __init__(self) -> None:
            self.emitted: list[str] = []

        def on(self, event, listener):
            return listener

        def off(self, event, listener):
            return True

        def emit(self, event, *args):
            self.emitted.append(event)

    class Counting(EventEmitter):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def emit(self, event, *args):
            self.count += 1
            return super().emit(event, *args)

    duck, sub = DuckEmitter(), Counting()
    for emitter in (duck, sub):
        with engine(event_emitter=emitter) as pre:
            a = pre.request_preallocation(ResourceRequest(CUSTOM, 1))
            pre.release_allocation(a.allocation_id)
    assert duck.emitted == ["resource:allocated", "resource:released"]
    assert sub.count == 2  # a subclass overriding emit sees every event, listened or not
    with pytest.raises(TypeError, match="event_emitter"):
        engine(event_emitter=object())


def test_the_seven_metrics_with_type_and_predictor_labels():
    class Exploding(NullAllocationStrategy):
        def allocate(self, request, amount, availability):
            if amount == 13:
                raise RuntimeError("boom")
            return Grant(amount, "h" if amount == 7 else None)

        def release(self, handle):
            raise OSError("cannot")

    for metrics in (MetricsCollector(), _PlainCollector()):
        translator = rules({"resource_type": "CUSTOM", "need": 1})
        with engine(translator=translator, metrics=metrics,
                    allocation_strategies={CUSTOM: Exploding()}) as pre:
            (rid,) = pre.handle_prediction(Prediction("p", "t", "go", 0.9, source_predictor_id="markov"))
            assert pre.wait_ready(rid, timeout=30)
            pre.release_allocation(rid)
            pre.request_preallocation(ResourceRequest(CUSTOM, 13))  # the strategy raises: an error
            pre.request_preallocation(ResourceRequest(ResourceType.GPU, 1))  # refused: failed
            held = pre.request_preallocation(ResourceRequest(CUSTOM, 7))
            assert pre.release_allocation(held.allocation_id) is False  # the strategy raises: reverted
            get = metrics.get
            assert get("preallocation_request_generated", resource_type="CUSTOM", predictor="markov") == 1
            assert get("resource_allocated", resource_type="CUSTOM", predictor="markov") == 1
            assert get("resource_allocated", resource_type="CUSTOM") == 2
            assert get("resource_released", resource_type="CUSTOM", predictor="markov") == 1
            assert get("preallocation_error", resource_type="CUSTOM") == 1
            assert get("preallocation_failed") == 2  # the error's request ends FAILED too
            assert get("release_error", resource_type="CUSTOM") == 1


class _PlainCollector:
    """A collector of the caller's: record_metric and get only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, frozenset], float] = {}

    def record_metric(self, name: str, value: float = 1, **labels: Any) -> None:
        with self.lock:
            key = (name, frozenset(labels.items()))
            self.counts[key] = self.counts.get(key, 0) + value

    def get(self, name: str, **labels: Any) -> float:
        return sum(v for (n, ls), v in self.counts.items() if n == name and set(labels.items()) <= ls)


class RecordingPredictor:
    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}
        self.outcomes: list[PredictionOutcome] = []
        self.threads: set[str] = set()

    def on(self, event: str, listener: Any) -> None:
        self.listeners[event] = listener

    def off(self, event: str, listener: Any) -> None:
        self.listeners.pop(event, None)

    def update_model(self, outcome: PredictionOutcome) -> None:
        self.threads.add(threading.current_thread().name)
        self.outcomes.append(outcome)


def test_the_predictor_hears_every_terminal_state_once_in_order_on_the_worker():
    predictor = RecordingPredictor()
    assert isinstance(predictor, Predictor)
    from prealloc import RuleTranslator

    translator = RuleTranslator.from_dict({"rule": [
        {"name": "keep", "match": {"type": "t", "value": "keep"}, "request": [{"resource_type": "CUSTOM", "need": 2}]},
        {"name": "expire", "match": {"type": "t", "value": "expire"},
         "request": [{"resource_type": "CUSTOM", "need": 3, "duration": 0.01}]},
        {"name": "fail", "match": {"type": "t", "value": "fail"}, "request": [{"resource_type": "GPU", "need": 1}]},
    ]})
    with engine(translator=translator, predictor=predictor) as pre:
        emit = predictor.listeners["prediction:generated"]  # subscribed as the spec does
        (kept,) = emit(Prediction("p-keep", "t", "keep", 0.9))
        assert pre.wait_ready(kept, timeout=30)
        with pre.claim(kept):
            pass
        (expiring,) = emit(Prediction("p-expire", "t", "expire", 0.9))
        wait_until(lambda: len(predictor.outcomes) >= 1)
        wait_until(lambda: pre.get_allocation(expiring) is None)
        emit(Prediction("p-fail", "t", "fail", 0.9))
        wait_until(lambda: len(predictor.outcomes) == 3)
        queued = pre.submit(ResourceRequest(CUSTOM, 1, associated_prediction_id="p-cancel", deadline=1e9),
                            wake=False)
        assert pre.cancel_request(queued)
        wait_until(lambda: len(predictor.outcomes) == 4)
    by_id = {o.prediction_id: o for o in predictor.outcomes}
    assert [o.prediction_id for o in predictor.outcomes] == ["p-keep", "p-expire", "p-fail", "p-cancel"]
    assert (by_id["p-keep"].reason, by_id["p-keep"].used, by_id["p-keep"].used_amount) == ("released", True, 2.0)
    assert (by_id["p-expire"].reason, by_id["p-expire"].used) == ("expired", False)
    assert by_id["p-expire"].feedback.reason_for_release == "Expired"
    assert by_id["p-fail"].reason == "failed" and by_id["p-cancel"].reason == "cancelled"
    assert all(o.predicted_amount > 0 for o in predictor.outcomes)
    assert all(name.startswith("prealloc-worker") for name in predictor.threads)


def test_expiry_is_a_release_with_the_spec_feedback():
    seen: list[Any] = []
    with engine() as pre:
        pre.on("resource:expired", seen.append)
        pre.request_preallocation(ResourceRequest(CUSTOM, 1, duration=0.01))
        wait_until(lambda: seen)
    assert seen[0].feedback.used_successfully is False and seen[0].feedback.reason_for_release == "Expired"


def test_strategies_are_told_the_availability_they_were_allocated_under():
    from test_engine_config import SettableMonitor

    seen: list[Any] = []

    class Seeing(NullAllocationStrategy):
        def allocate(self, request, amount, availability):
            seen.append(availability)
            return Grant(amount)

    monitor = SettableMonitor(total=100, available=80)
    with engine(allocation_strategies={CUSTOM: Seeing()}, resource_monitors={CUSTOM: monitor},
                headroom={CUSTOM: 0.1}) as pre:
        pre.request_preallocation(ResourceRequest(CUSTOM, 1))
    assert isinstance(seen[0], ResourceAvailability) and seen[0].available == 80


def test_metadata_and_feedback_follow_the_spec():
    meta = RequestMetadata(source_predictor_id="x", triggering_pattern_id="pat", target_application="app",
                           user_id="u", custom_properties={"k": 1})
    assert meta.created_at > 0
    feedback = AllocationFeedback(used_successfully=True, actual_duration=1.0, actual_amount_used=2.0,
                                  reason_for_release="done").validate()
    assert feedback.actual_amount_used == 2.0
