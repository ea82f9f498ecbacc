"""No order of view creation, release, resize and garbage collection may crash the
process or leave memory mapped: a hypothesis state machine drives one reservation and
writes through every live view after each step.

Each example freezes what the process held before it (``gc.freeze``), so the ``collect``
rule's full collection walks only what the example made (its views, and the reference
cycles it drops with a view inside) rather than the whole interpreter: hypothesis keeps
hundreds of thousands of objects, and a full walk of them took ~0.1 s per call, 97 % of
this test's time (about 1 900 calls)."""
from __future__ import annotations

import gc
import weakref

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prealloc import core
from osutil import vm_rss

PAGE = core.page_size()


class _Cycle:
    """A holder that refers to itself: only the cyclic collector frees it (and its view)."""

    def __init__(self, view: object) -> None:
        self.view = view
        self.itself = self


class ReservationLifetime(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        gc.freeze()  # undone in teardown; what this example makes stays collectable
        self.baseline = vm_rss()
        self.region = core.reserve_memory(16 * PAGE)
        self.views: list[tuple[object, int]] = []  # (view, length it was made with)
        self.release_asked = False
        # dropped views kept alive only by reference cycles: each holds the mapping
        # until the cyclic collector runs (automatically, or the collect rule)
        self.cycles: list[weakref.ref[_Cycle]] = []

    @property
    def cycle_garbage(self) -> bool:
        return any(ref() is not None for ref in self.cycles)

    @precondition(lambda self: not self.region.released)
    @rule(kind=st.sampled_from(["memoryview", "numpy", "slice"]))
    def take_view(self, kind: str) -> None:
        if kind == "memoryview":
            view: object = memoryview(self.region)
        elif kind == "numpy":
            view = np.frombuffer(self.region, dtype=np.uint8)
        elif self.region.size > PAGE:
            view = memoryview(self.region)[PAGE:]
        else:
            view = memoryview(self.region)[:PAGE]
        self.views.append((view, len(view)))  # type: ignore[arg-type]

    @precondition(lambda self: self.views)
    @rule(index=st.integers(min_value=0))
    def drop_view(self, index: int) -> None:
        view, _ = self.views.pop(index % len(self.views))
        if isinstance(view, memoryview):
            view.release()
        del view

    @precondition(lambda self: not self.region.released)
    @rule(kind=st.sampled_from(["memoryview", "numpy"]))
    def drop_view_in_a_cycle(self, kind: str) -> None:
        view: object = memoryview(self.region) if kind == "memoryview" else np.frombuffer(self.region, np.uint8)
        self.cycles.append(weakref.ref(_Cycle(view)))
        del view

    @rule()
    def release(self) -> None:
        self.region.release()
        self.release_asked = True
        assert self.region.released

    @rule(pages=st.integers(min_value=1, max_value=64), may_move=st.sampled_from([None, True, False]))
    def resize(self, pages: int, may_move: bool | None) -> None:
        old = self.region.size
        try:
            self.region.resize(pages * PAGE, may_move=may_move)
        except BufferError:
            assert self.views or self.cycle_garbage, "BufferError without a live view"
            assert self.region.size == old
        except ValueError:
            assert self.region.released
        except OSError:
            assert self.region.size == old  # refused in place: unchanged

    @rule()
    def collect(self) -> None:
        gc.collect()
        assert not self.cycle_garbage
        self.cycles.clear()

    @invariant()
    def every_live_view_is_still_mapped(self) -> None:
        for view, length in self.views:
            assert len(view) == length  # type: ignore[arg-type]
            view[length - 1] = 0x5A  # type: ignore[index]
            assert view[length - 1] == 0x5A  # type: ignore[index]

    @invariant()
    def released_means_unmapped_once_views_are_gone(self) -> None:
        if self.release_asked and not self.views and not self.cycle_garbage:
            assert self.region.size == 0 and self.region.exports == 0

    def teardown(self) -> None:
        try:
            self.views.clear()
            self.region.release()
            gc.collect()
            assert self.region.size == 0
        finally:
            gc.unfreeze()


ReservationLifetime.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestReservationLifetime = ReservationLifetime.TestCase
