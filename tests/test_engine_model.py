"""A hypothesis state machine drives the preallocator through random request, claim,
adjust, release, expiry and reset sequences against a plain model, checking every answer
and status, and ends by checking through /proc that the machine is as it began."""
from __future__ import annotations

import gc

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    MemoryAllocationStrategy,
    NullAllocationStrategy,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from engine_util import wait_until
from osutil import vm_lck, vm_rss

MiB = 1 << 20
MEM, CUSTOM = ResourceType.MEMORY, ResourceType.CUSTOM


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        gc.collect()
        # a collection then walks only what this example makes, not hypothesis's own
        # objects (that walk was most of the test's time)
        gc.freeze()
        self.base_rss, self.base_lck = vm_rss(), vm_lck()
        self.pre = ResourcePreallocator(translator=None, allocation_strategies={
            MEM: MemoryAllocationStrategy(lock=True), CUSTOM: NullAllocationStrategy()})
        self.live: dict[int, dict] = {}  # allocation id -> {"status", "amount", "type"}
        self.claims: dict[int, object] = {}
        self.views: list[np.ndarray] = []
        self.gone: list[int] = []
        self.released = 0
        self.expired = 0

    @rule(mib=st.sampled_from([1, 2, 4]), memory=st.booleans())
    def request(self, mib, memory):
        rtype = MEM if memory else CUSTOM
        a = self.pre.request_preallocation(ResourceRequest(rtype, mib))
        assert a.status is AllocationStatus.ALLOCATED and a.allocated_amount == mib
        assert a.allocation_id not in self.live and a.allocation_id not in self.gone
        if memory:  # locked, or (over an ordinary user's RLIMIT_MEMLOCK) the refusal recorded
            assert a.details["populated"] and (a.details["locked"] or a.details["lock_error"])
        self.live[a.allocation_id] = {"status": AllocationStatus.ALLOCATED, "amount": mib, "type": rtype}

    @precondition(lambda self: self.live or self.gone)
    @rule(data=st.data(), keep_view=st.booleans())
    def claim(self, data, keep_view):
        rid = data.draw(st.sampled_from(sorted(self.live) + self.gone[-3:]))
        entry = self.live.get(rid)
        if entry is None:
            try:
                self.pre.claim(rid)
            except KeyError:
                return
            raise AssertionError("claimed an allocation that is gone")
        if entry["status"] is not AllocationStatus.ALLOCATED:
            try:
                self.pre.claim(rid)
            except ValueError:
                return
            raise AssertionError("claimed an allocation twice")
        claim = self.pre.claim(rid)
        entry["status"] = AllocationStatus.ACTIVE
        self.claims[rid] = claim
        if keep_view and entry["type"] is MEM:
            view = np.frombuffer(claim.resource, dtype=np.uint8)
            view[::4096] = 1
            self.views.append(view)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), mib=st.sampled_from([1, 2, 3, 6]))
    def adjust(self, data, mib):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        entry = self.live[rid]
        ok = self.pre.adjust_allocation(rid, mib)
        if ok:
            entry["amount"] = mib
        assert self.pre.get_allocation(rid).allocated_amount == entry["amount"]

    @precondition(lambda self: self.live or self.gone)
    @rule(data=st.data(), used=st.booleans())
    def release(self, data, used):
        rid = data.draw(st.sampled_from(sorted(self.live) + self.gone[-3:]))
        expected = rid in self.live
        assert self.pre.release_allocation(rid, AllocationFeedback(used)) is expected
        if expected:
            del self.live[rid]
            self.claims.pop(rid, None)
            self.gone.append(rid)
            self.released += 1

    @rule(memory=st.booleans())
    def expire(self, memory):
        a = self.pre.request_preallocation(ResourceRequest(MEM if memory else CUSTOM, 1, duration=0.002))
        wait_until(lambda: self.pre.get_allocation(a.allocation_id) is None)
        self.gone.append(a.allocation_id)
        self.expired += 1

    @rule()
    def reset(self):
        self.pre.reset()
        self.released += len(self.live)
        self.gone.extend(self.live)
        self.live.clear()
        self.claims.clear()
        for view in self.views:  # claimed buffers stay usable after the reset
            view[::4096] = 2

    @invariant()
    def agrees(self):
        assert len(self.pre) == len(self.live)
        for rid, entry in self.live.items():
            snap = self.pre.get_allocation(rid)
            assert snap.status is entry["status"] and snap.allocated_amount == entry["amount"]
        stats = self.pre.get_statistics()
        assert stats.released == self.released and stats.expired == self.expired
        assert stats.claimed >= sum(1 for e in self.live.values() if e["status"] is AllocationStatus.ACTIVE)

    def teardown(self):
        gc.unfreeze()
        self.pre.close()
        self.views.clear()
        self.claims.clear()
        gc.collect()
        assert vm_lck() == self.base_lck, "locked memory left behind"
        assert vm_rss() - self.base_rss < 8 * MiB, "resident memory left behind"


EngineModel.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestEngineModel = EngineModel.TestCase
