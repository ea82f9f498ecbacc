"""The allocation strategy interface: how one resource type is reserved, handed over,
resized and given back.

The engine owns the bookkeeping (the native table, quotas, statistics, expiry); a
strategy only touches the machine. A strategy returns a *handle* from ``allocate`` —
whatever it needs to give the resource back (a MemoryReservation, a CoreReservation) —
and the engine passes that handle to ``claim``, ``adjust`` and ``release``.
"""
from __future__ import annotations

import abc
from typing import Any

# What a strategy reserved: Grant(amount, handle). Compiled (one is made per allocation).
from .._native import Grant
from ..types import ResourceAvailability, ResourceRequest, ResourceType


__all__ = ["AllocationError", "AllocationStrategy", "Grant", "InsufficientResources"]


class AllocationError(Exception):
    """The strategy could not allocate; the request ends FAILED with this reason."""


class InsufficientResources(AllocationError):
    """Not enough of the resource now; a queued request waits and is retried when
    availability changes (until its deadline)."""


class AllocationStrategy(abc.ABC):
    """The spec's IAllocationStrategy. Implementations must be thread-safe: the engine
    calls them from the worker and from callers' threads."""

    resource_type: ResourceType

    @abc.abstractmethod
    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        """Reserves `amount` (already sized, quota-checked and within headroom).
        Raises InsufficientResources or AllocationError."""

    @abc.abstractmethod
    def release(self, handle: Any) -> None:
        """Gives the resource back. Must not raise for a handle already released."""

    def claim(self, handle: Any) -> Any:
        """Hands the resource to the consumer (called on the consumer's thread); returns
        what the consumer uses. Default: the handle itself."""
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
