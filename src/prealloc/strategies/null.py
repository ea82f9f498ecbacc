"""A strategy that reserves nothing: it measures the engine's own overhead in the
benchmarks, and serves hosts that use the engine for bookkeeping of a resource they
manage themselves (CUSTOM)."""
from __future__ import annotations

from typing import Any

from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationStrategy, Grant


class NullAllocationStrategy(AllocationStrategy):
    def __init__(self, resource_type: ResourceType = ResourceType.CUSTOM) -> None:
        self.resource_type = resource_type

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        return Grant(amount, None)

    def release(self, handle: Any) -> None:
        pass

    def adjust(self, handle: Any, new_amount: float) -> float:
        return new_amount
