"""Allocation strategies, one per resource type."""
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources
from .cache import CacheSpaceStrategy
from .cpu import CpuAllocationStrategy
from .disk import DiskClaim, DiskStrategy
from .gpu import GpuBuffer, GpuMemoryStrategy
from .memory import MemoryAllocationStrategy
from .network import NetworkBandwidthStrategy, NetworkClaim
from .null import NullAllocationStrategy

__all__ = ["AllocationError", "AllocationStrategy", "CacheSpaceStrategy", "CpuAllocationStrategy", "Grant", "InsufficientResources",
           "MemoryAllocationStrategy", "NullAllocationStrategy"]
__all__ += ["DiskClaim", "DiskStrategy"]
__all__ += ["GpuBuffer", "GpuMemoryStrategy"]
__all__ += ["NetworkBandwidthStrategy", "NetworkClaim"]
