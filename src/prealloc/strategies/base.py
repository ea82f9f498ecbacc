"""The allocation strategy interface: how one resource type is reserved, handed over,
resized and given back.

The engine owns the bookkeeping (the native table, quotas, statistics, expiry); a
strategy only touches the machine. A strategy returns a *handle* from ``allocate`` —
whatever it needs to give the resource back (a MemoryReservation, a CoreReservation) —
and the engine passes that handle to ``claim``, ``adjust`` and ``release``.
"""
from __future__ import annotations

import abc
import logging
from typing import Any, Callable

# What a strategy reserved: Grant(amount, handle). Compiled (one is made per allocation).
from .._native import Grant
from ..types import ResourceAvailability, ResourceRequest, ResourceType


__all__ = ["AllocationError", "AllocationStrategy", "DeferredRelease", "Grant", "InsufficientResources"]


class AllocationError(Exception):
    """The strategy could not allocate; the request ends FAILED with this reason."""


class InsufficientResources(AllocationError):
    """Not enough of the resource now; a queued request waits and is retried when
    availability changes (until its deadline)."""


class DeferredRelease:
    """What ``release`` returns when the resource outlives the release: memory that a
    consumer's live view keeps mapped, say. The engine keeps the allocation charged to
    its quotas until the strategy calls ``done()``, once, when the resource is really
    gone.

    ``done()`` may run on any thread, inside a garbage-collector finalizer included, so
    neither it nor the callbacks it runs take a lock: the engine's callback only queues
    the allocation id for its worker. Without a lock the two sides still agree under the
    GIL: ``list.append`` and ``list.pop`` are atomic, the flag is set before the drain and
    a late ``add_done_callback`` drains after its append, so every callback runs exactly
    once, whichever side comes second."""

    __slots__ = ("_callbacks", "_done")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._done = False

    @property
    def is_done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        if self._done:
            self._run_callbacks()

    def done(self) -> None:
        self._done = True
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        while True:
            try:
                callback = self._callbacks.pop()
            except IndexError:
                return
            try:
                callback()
            except Exception:  # a finalizer's caller cannot handle it either
                logging.getLogger(__name__).exception("DeferredRelease callback failed")


class AllocationStrategy(abc.ABC):
    """The spec's IAllocationStrategy. Implementations must be thread-safe: the engine
    calls them from the worker and from callers' threads."""

    resource_type: ResourceType

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        """What ``allocate(request, amount)`` would hold, in the type's unit, known
        before allocating: the engine checks and charges quotas with it, so a quota
        counts what is really mapped (memory rounded up to pages or huge pages, CPU
        rounded up to whole cores). ValueError for an amount the machine can never
        hold (more cores than exist). Default: amount itself."""
        return amount

    def planned_resize(self, handle: Any, new_amount: float) -> float:
        """What ``adjust(handle, new_amount)`` would leave held, known before resizing
        (the engine charges the growth with it). Default: planned_amount(None, new_amount)."""
        return self.planned_amount(None, new_amount)  # type: ignore[arg-type]

    @abc.abstractmethod
    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        """Reserves `amount` (already sized, quota-checked and within headroom).
        ``availability`` is the monitor's view the engine checked the headroom with
        (None when the type has no monitor). Grant.amount is what is really held.
        Raises InsufficientResources or AllocationError."""

    @abc.abstractmethod
    def release(self, handle: Any) -> DeferredRelease | None:
        """Gives the resource back. Must not raise for a handle already released.
        Returns a DeferredRelease when the resource stays held after this call (a
        consumer still views it) and is given back later; None when it is gone now."""

    def claim(self, handle: Any, target_process_id: int | None = None) -> Any:
        """Hands the resource to the consumer (called on the consumer's thread); returns
        what the consumer uses. target_process_id: the process the consumer named at
        acquire (a CPU claim pins it instead of the calling thread); None for the
        caller itself. Default: the handle itself."""
        return handle

    def adjust(self, handle: Any, new_amount: float) -> float:
        """Grows or shrinks in place; returns the new effective amount. Raises
        InsufficientResources when growth is impossible (nothing changes)."""
        raise AllocationError(f"{type(self).__name__} cannot adjust an allocation")

    def describe(self, handle: Any) -> dict[str, Any]:
        """Requested-vs-effective facts about one allocation, for ResourceAllocation.details."""
        return {}

    def close(self) -> None:
        """Frees what the strategy itself holds (not the allocations)."""
