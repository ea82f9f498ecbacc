"""prealloc.predict: the built-in Markov / frequency predictor, alone (a controlled
clock) and driving a real allocator end to end."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    MemoryAllocationStrategy,
    ResourcePreallocator,
    ResourceType,
)
from prealloc.predict import MarkovPredictor, prediction_type
from engine_util import wait_until
from osutil import vm_rss

MEM, CPU = ResourceType.MEMORY, ResourceType.CPU
MiB = 1 << 20


@dataclass
class Outcome:  # any object with these attributes will do (the engine's PredictionOutcome has them)
    prediction_id: str
    used: bool
    used_amount: float
    reason: str
    resource_type: ResourceType = MEM
    predicted_amount: float = 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def trained(rounds: int = 6, **kw) -> tuple[MarkovPredictor, Clock]:
    clock = Clock()
    model = MarkovPredictor(clock=clock, **kw)
    for _ in range(rounds):
        for app, rtype, amount in (("browser", MEM, 64), ("editor", MEM, 512), ("editor", CPU, 200)):
            model.observe(app, rtype, amount)
            clock.now += 0.5
    # training emitted predictions nobody allocated (no outcome will come): let them lapse
    clock.now += model.horizon + 1
    return model, clock


def test_it_learns_which_need_follows_which_across_applications():
    model, clock = trained()
    heard = []
    model.on("prediction:generated", heard.append)
    t0 = time.monotonic()
    emitted = model.observe("browser", MEM, 64)
    t1 = time.monotonic()
    assert emitted == heard and len(heard) == 1
    p = heard[0]
    assert p.target_application == "editor" and p.type == prediction_type(MEM) == "resource_usage:MEMORY"
    assert p.predicted_value == 512 and p.confidence > 0.7
    assert t0 + 0.5 <= p.expected_at <= t1 + 0.5  # the learned gap (0.5 s), on the monotonic clock
    p.validate()
    nxt = model.next_needs("editor", MEM, 512)
    assert nxt[0][:3] == ("editor", CPU, 200)


def test_a_single_observation_is_not_confident_and_unknown_states_predict_nothing():
    model = MarkovPredictor()
    model.observe("a", MEM, 10)
    model.observe("b", MEM, 20)
    assert model.next_needs("a", MEM, 10)[0][3] == pytest.approx(0.5)  # 1 / (1 + prior)
    assert model.observe("zzz", MEM, 1) == []


def test_unused_outcomes_lower_confidence_and_failures_teach_nothing():
    model, _ = trained()
    [p] = model.observe("browser", MEM, 64)
    failed_view = model.next_needs("browser", MEM, 64)[0][3]
    model.update_model(Outcome(p.id, used=False, used_amount=0.0, reason="failed"))
    assert model.next_needs("browser", MEM, 64)[0][3] == failed_view  # the machine said no, not the habit
    model.update_model(Outcome(p.id, used=False, used_amount=0.0, reason="expired"))  # ended already: ignored
    [p] = model.observe("browser", MEM, 64)
    before = model.next_needs("browser", MEM, 64)[0][3]
    model.update_model(Outcome(p.id, used=False, used_amount=0.0, reason="expired"))
    after_expiry = model.next_needs("browser", MEM, 64)[0][3]
    assert after_expiry == pytest.approx(before * 2 / 3)  # precision (0 + 2) / (0 + 1 + 2)
    [p] = model.observe("browser", MEM, 64)
    model.update_model(Outcome(p.id, used=True, used_amount=300.0, reason="released"))
    assert model.next_needs("browser", MEM, 64)[0][3] > after_expiry * 0.9
    assert model.outcomes == {"released": 1, "expired": 1, "failed": 1, "cancelled": 0}


def test_the_legacy_positional_call_and_bad_outcomes():
    model, _ = trained()
    [p] = model.observe("browser", MEM, 64)
    model.update_model(p.id, AllocationFeedback(used_successfully=True, actual_amount_used=256.0))
    assert model.outcomes["released"] == 1
    model.update_model("not-mine", AllocationFeedback(used_successfully=True))  # ignored
    with pytest.raises(TypeError):
        model.update_model(p.id, "feedback")
    with pytest.raises(TypeError):
        model.update_model(object())
    with pytest.raises(ValueError):
        model.update_model(Outcome("x", True, 1.0, reason="because"))


def test_an_outstanding_prediction_is_not_repeated_until_its_outcome_or_horizon():
    model, clock = trained(horizon=10.0)
    [p] = model.observe("browser", MEM, 64)
    model.observe("editor", MEM, 512)
    assert model.observe("browser", MEM, 64) == []  # its preallocation is still out there
    model.update_model(Outcome(p.id, used=True, used_amount=512.0, reason="released"))
    model.observe("editor", MEM, 512)
    [q] = model.observe("browser", MEM, 64)  # the outcome came: predicted again
    model.observe("editor", MEM, 512)
    assert model.observe("browser", MEM, 64) == []
    model.observe("editor", MEM, 512)
    clock.now += 11.0  # no outcome came: after the horizon it may be predicted again
    [r] = model.observe("browser", MEM, 64)
    assert len({p.id, q.id, r.id}) == 3 and r.target_application == "editor"


def test_listeners_on_off_and_bad_arguments():
    model, _ = trained()
    heard = []
    model.on("prediction:generated", heard.append)
    assert model.off("prediction:generated", heard.append) is True
    assert model.off("prediction:generated", heard.append) is False
    model.observe("browser", MEM, 64)
    assert heard == []
    with pytest.raises(ValueError):
        model.on("resource:allocated", heard.append)
    with pytest.raises(TypeError):
        model.on("prediction:generated", 3)
    with pytest.raises(ValueError):
        model.observe("a", "RAM", 1)
    with pytest.raises(ValueError):
        model.observe("a", MEM, -1)
    with pytest.raises(TypeError):
        model.observe(7, MEM, 1)
    with pytest.raises(ValueError):
        MarkovPredictor(decay=0)
    with pytest.raises(ValueError):
        MarkovPredictor(min_confidence=1.5)
    with pytest.raises(ValueError):
        MarkovPredictor(max_states=0)


def test_memory_is_bounded_by_max_states():
    model = MarkovPredictor(max_states=8)
    for i in range(100):
        model.observe(f"app{i}", MEM, 1 + i)
    assert len(model) == 8
    assert all(len(row.weights) <= 8 for row in model._rows.values())


def test_end_to_end_the_model_preallocates_the_next_need_and_learns_from_the_allocator():
    clock = Clock()
    model = MarkovPredictor(min_confidence=0.5, clock=clock)
    for _ in range(4):
        model.observe("browser", MEM, 4)
        model.observe("editor", MEM, 16)
    clock.now += model.horizon + 1  # what training predicted lapses
    with ResourcePreallocator(predictor=model, translator=model.translator(duration=60),
                              allocation_strategies={MEM: MemoryAllocationStrategy()}, headroom={}) as pre:
        rss = vm_rss()
        model.observe("browser", MEM, 4)  # the allocator hears the prediction of editor's 16 MiB
        queued = pre.allocations()
        assert len(queued) == 1 and queued[0].requested_amount == 16
        assert pre.wait_ready([queued[0].allocation_id], 10)
        assert vm_rss() - rss >= 14 * MiB  # really there before the need
        with pre.acquire(MEM, 16, target_application="editor") as claim:
            assert claim.preallocated
            model.observe("editor", MEM, 16)
        stats = pre.get_statistics()
        assert stats.needs_preallocated == 1 and stats.used == 1
        # the engine tells the model how its prediction's request ended (from its worker)
        wait_until(lambda: model.outcomes["released"] == 1)
        assert pre.get_allocation(queued[0].allocation_id) is None
        assert all(a.status is not AllocationStatus.ALLOCATED or a.requested_amount == 4
                   for a in pre.allocations())


from hypothesis import given, settings, strategies as st  # noqa: E402

_need = st.tuples(st.sampled_from(["a", "b", "c", None]), st.sampled_from([MEM, CPU]),
                  st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
_step = st.one_of(st.tuples(st.just("need"), _need),
                  st.tuples(st.just("outcome"), st.tuples(st.booleans(), st.sampled_from(
                      ["released", "expired", "failed", "cancelled"]))),
                  st.tuples(st.just("time"), st.floats(min_value=0.0, max_value=50.0)))


@settings(max_examples=60, deadline=None)
@given(st.lists(_step, max_size=80))
def test_any_sequence_keeps_the_model_bounded_and_its_predictions_valid(steps):
    clock = Clock()
    model = MarkovPredictor(clock=clock, max_states=6, max_outstanding=5, min_confidence=0.2, horizon=10.0)
    emitted = []
    for kind, arg in steps:
        if kind == "need":
            for p in model.observe(*arg):
                p.validate()
                assert 0.2 <= p.confidence <= 1.0 and p.predicted_value >= 0
                assert p.type in (prediction_type(MEM), prediction_type(CPU))
                emitted.append(p)
        elif kind == "outcome" and emitted:
            p = emitted.pop(0)
            model.update_model(Outcome(p.id, used=arg[0], used_amount=p.predicted_value, reason=arg[1]))
        elif kind == "time":
            clock.now += arg
        assert len(model) <= 6 and len(model._outstanding) <= 5
        assert len(model._pending_targets) <= len(model._outstanding)
        assert all(set(row.weights) <= set(model._rows) for row in model._rows.values())


def test_it_is_a_predictor_as_the_engine_defines_one():
    import prealloc.types

    protocol = getattr(prealloc.types, "Predictor", None)
    if protocol is None:
        pytest.skip("this engine defines no Predictor protocol yet")
    assert isinstance(MarkovPredictor(), protocol)
    outcome_type = getattr(prealloc.types, "PredictionOutcome", None)
    if outcome_type is not None:  # the engine's own outcome object is accepted as is
        model, _ = trained()
        [p] = model.observe("browser", MEM, 64)
        model.update_model(outcome_type(prediction_id=p.id, resource_type=MEM, predicted_amount=512.0,
                                        used_amount=512.0, used=True, reason="released", allocation_id=1))
        assert model.outcomes["released"] == 1
