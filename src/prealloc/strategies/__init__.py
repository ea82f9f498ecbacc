"""Allocation strategies, one per resource type."""
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources
from .cpu import CpuStrategy
from .memory import MemoryStrategy
from .null import NullStrategy

__all__ = ["AllocationError", "AllocationStrategy", "CpuStrategy", "Grant", "InsufficientResources",
           "MemoryStrategy", "NullStrategy"]
