"""Allocation strategies, one per resource type."""
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources
from .cpu import CpuAllocationStrategy
from .memory import MemoryAllocationStrategy
from .null import NullAllocationStrategy

__all__ = ["AllocationError", "AllocationStrategy", "CpuAllocationStrategy", "Grant", "InsufficientResources",
           "MemoryAllocationStrategy", "NullAllocationStrategy"]
