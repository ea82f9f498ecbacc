"""The native allocation table against a plain-Python model, and under threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from prealloc import core

STATUSES = list(range(core.STATUS_COUNT))
FINAL = {core.RELEASED, core.FAILED, core.EXPIRED}


def test_transition_legality_matches_the_documented_machine():
    edges = {
        core.PENDING: {core.ALLOCATED, core.FAILED, core.EXPIRED, core.RELEASED},
        core.ALLOCATED: {core.ACTIVE, core.RELEASING, core.EXPIRED, core.FAILED},
        core.ACTIVE: {core.RELEASING, core.EXPIRED},
        core.RELEASING: {core.RELEASED, core.FAILED, core.ALLOCATED, core.ACTIVE},
    }
    for a in STATUSES:
        for b in STATUSES:
            assert core.transition_legal(a, b) == (b in edges.get(a, set())), (a, b)


def test_record_fields_round_trip():
    table = core.AllocationTable(16)
    rid = table.insert(3, 12.5, allocated=10.0, status=core.ALLOCATED, request_id=77, owner=5,
                       user_data=9)
    rec = table.get(rid)
    assert (rec.id, rec.status, rec.resource_type, rec.requested, rec.allocated) == (
        rid, core.ALLOCATED, 3, 12.5, 10.0)
    assert (rec.request_id, rec.owner, rec.user_data, rec.expires_ns, rec.timer) == (77, 5, 9, 0, 0)
    assert rec.created_ns <= core.monotonic_ns()
    table.set_allocated(rid, 11.0)
    assert table.get(rid).allocated == 11.0


@pytest.mark.parametrize("kwargs", [
    dict(requested=float("nan")), dict(requested=-1.0), dict(requested=float("inf")),
    dict(status=core.ACTIVE), dict(status=core.RELEASED),
])
def test_bad_records_raise_and_insert_nothing(kwargs):
    table = core.AllocationTable(16)
    args = dict(resource_type=0, requested=1.0)
    args.update(kwargs)
    status = args.pop("status", core.PENDING)
    with pytest.raises(ValueError):
        table.insert(args["resource_type"], args["requested"], status=status)
    assert len(table) == 0


def test_capacity_is_enforced_and_slots_are_reused_with_new_ids():
    table = core.AllocationTable(4)
    ids = [table.insert(0, 1.0) for _ in range(table.capacity)]
    with pytest.raises(OSError):
        table.insert(0, 1.0)
    table.transition(ids[0], [core.PENDING], core.FAILED)
    table.remove(ids[0])
    new = table.insert(0, 1.0)
    assert new not in ids
    with pytest.raises(KeyError):
        table.status(ids[0])  # the stale id never names the new record


def test_insert_many_is_all_or_nothing():
    table = core.AllocationTable(8)
    with pytest.raises(ValueError):
        table.insert_many(np.zeros(5, np.uint32), np.array([1, 2, -3, 4, 5], dtype=np.float64))
    assert len(table) == 0
    with pytest.raises(OSError):
        table.insert_many(np.zeros(20, np.uint32), np.ones(20))
    assert len(table) == 0
    ids = table.insert_many(np.zeros(8, np.uint32), np.ones(8))
    assert len(set(ids.tolist())) == 8 and len(table) == 8


class TableModel(RuleBasedStateMachine):
    """Every call's result is predicted by a dict of id -> status."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.table = core.AllocationTable(8)  # small, so slots are reused often
        self.model: dict[int, int] = {}
        self.issued: set[int] = set()
        self.stale: list[int] = []

    @rule(target=live, status=st.sampled_from([core.PENDING, core.ALLOCATED]),
          amount=st.floats(0, 1e9))
    def insert(self, status, amount):
        if len(self.model) == self.table.capacity:
            with pytest.raises(OSError):
                self.table.insert(0, amount, status=status)
            return multiple()  # nothing new for the bundle
        rid = self.table.insert(1, amount, status=status)
        assert rid not in self.issued, "an id was handed out twice"
        self.issued.add(rid)
        self.model[rid] = status
        return rid

    @rule(rid=live, frm=st.sets(st.sampled_from(STATUSES), min_size=1), to=st.sampled_from(STATUSES))
    def transition(self, rid, frm, to):
        if rid not in self.model:
            with pytest.raises(KeyError):
                self.table.transition(rid, frm, to)
            return
        current = self.model[rid]
        if current not in frm:
            assert self.table.transition(rid, frm, to) is False
        elif not core.transition_legal(current, to):
            with pytest.raises(ValueError):
                self.table.transition(rid, frm, to)
        else:
            assert self.table.transition(rid, frm, to) is True
            self.model[rid] = to

    @rule(rid=consumes(live))
    def remove(self, rid):
        if rid not in self.model:
            with pytest.raises(KeyError):
                self.table.remove(rid)
        elif self.model[rid] in FINAL:
            self.table.remove(rid)
            del self.model[rid]
            self.stale.append(rid)
        else:
            with pytest.raises(ValueError):
                self.table.remove(rid)
            self.table.transition(rid, self.model[rid], core.FAILED if core.transition_legal(
                self.model[rid], core.FAILED) else core.EXPIRED)
            self.table.remove(rid)
            del self.model[rid]
            self.stale.append(rid)

    @invariant()
    def agrees_with_the_model(self):
        assert len(self.table) == len(self.model)
        for rid, status in self.model.items():
            assert self.table.status(rid) == status
            assert self.table.get(rid).id == rid
        for rid in self.stale[-8:]:
            assert rid not in self.table
        counts = self.table.counts()
        for s in STATUSES:
            assert counts[s] == sum(1 for v in self.model.values() if v == s)
        assert sorted(self.table.collect().tolist()) == sorted(self.model)


TableModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestTableModel = TableModel.TestCase


def test_release_racing_expiry_from_python_threads_has_one_winner_per_record():
    """Batch calls drop the GIL, so these threads really race in the core."""
    table = core.AllocationTable(1 << 16)
    n = 40_000
    ids = table.insert_many(np.zeros(n, np.uint32), np.ones(n), status=core.ALLOCATED)
    wins: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(3)

    def racer(name: str, to: int) -> None:
        barrier.wait()
        wins[name] = table.transition_many(ids, [core.ALLOCATED, core.ACTIVE], to)

    threads = [threading.Thread(target=racer, args=(name, to)) for name, to in
               [("release", core.RELEASING), ("expire", core.EXPIRED), ("fail", core.FAILED)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = wins["release"].astype(int) + wins["expire"] + wins["fail"]
    assert (total == 1).all(), "a record was won by zero or several racers"
    statuses = table.status_many(ids)
    assert (statuses[wins["release"]] == core.RELEASING).all()
    assert (statuses[wins["expire"]] == core.EXPIRED).all()
    assert (statuses[wins["fail"]] == core.FAILED).all()
    table.transition_many(ids, [core.RELEASING], core.RELEASED)
    assert table.remove_many(ids) == n and len(table) == 0
    assert (table.status_many(ids) == -1).all()
