"""Resource monitors: how much of each resource this process can have, now and on change.

- :class:`ResourceMonitor` — the contract (the spec's IResourceMonitor) and the one
  watcher thread that delivers change callbacks.
- :class:`SystemResourceMonitor` — memory (cgroup-aware), CPU (affinity-aware), disk,
  network and page cache of this machine, through psutil, /proc and cgroup files.
- :mod:`.pressure` — Linux PSI readings and triggers, the kernel's change events.
"""
from .base import AvailabilityCallback, EventSource, ResourceMonitor
from .disk import BlockDevice, DiskMonitor, block_device_of
from .network import NetworkMonitor, NetworkSnapshot, NetworkUnavailable
from .nvml import GpuDeviceInfo, GpuUnavailable, NvmlMonitor, nvml_unavailable_reason
from .pagecache import PageCacheMonitor
from .pressure import (
    PressureLine,
    PressureReading,
    PressureTrigger,
    PressureTriggerUnavailable,
    parse_pressure,
    read_pressure,
)
from .system import CgroupCpu, CgroupMemory, SystemResourceMonitor

__all__ = [
    "AvailabilityCallback",
    "CgroupCpu",
    "CgroupMemory",
    "EventSource",
    "GpuDeviceInfo",
    "GpuUnavailable",
    "NvmlMonitor",
    "PageCacheMonitor",
    "PressureLine",
    "PressureReading",
    "PressureTrigger",
    "PressureTriggerUnavailable",
    "ResourceMonitor",
    "SystemResourceMonitor",
    "nvml_unavailable_reason",
    "parse_pressure",
    "read_pressure",
]
__all__ += ["BlockDevice", "DiskMonitor", "block_device_of"]
__all__ += ["NetworkMonitor", "NetworkSnapshot", "NetworkUnavailable"]
