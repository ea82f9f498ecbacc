"""Page-cache availability for CACHE_SPACE: how much file data can be cached now
without pressure, and how much of a file set is resident.

:class:`PageCacheMonitor` reports CACHE_SPACE only. ``total`` and ``available`` are the
system monitor's (MemAvailable, free + buffers + cached, the memory cgroup's limits —
page cache is charged to the cgroup of the process that reads it), with one policy on
top: while PSI memory ``some avg10`` exceeds ``yield_pressure`` (%), ``available`` is
reported as 0. Warmed pages are a soft reservation; under memory pressure they would
only push out pages someone is using and be evicted before the need, so warming waits
(the engine retries a waiting request when this monitor reports a change — the PSI
trigger of the system monitor wakes it).

:func:`resident_bytes` counts, through the kernel (cachestat, else mincore), how much of
a set of files is in the page cache.
"""
from __future__ import annotations

import os
from typing import Iterable

from .. import _native
from ..types import ResourceAvailability, ResourceType
from .system import SystemResourceMonitor

__all__ = ["PageCacheMonitor", "resident_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(paths: Iterable[str | os.PathLike[str]]) -> tuple[int, int]:
    """(resident, total) bytes of the regular files in paths, through the kernel. Missing
    files count 0 in both; files whose page-cache state the kernel does not reveal to this
    process (not its owner, not writable, no CAP_SYS_ADMIN) count 0 resident."""
    with _native.PageCacheFiles([os.fspath(p) for p in paths]) as files:
        pages, _, restricted = files.counts()
        lengths = files.lengths
        resident = sum(min(int(pages[i, 0]) * _PAGE, lengths[i]) for i in range(len(lengths)) if not restricted[i])
        return resident, sum(lengths)


class PageCacheMonitor(SystemResourceMonitor):
    """CACHE_SPACE availability that yields to memory pressure (module docstring)."""

    def __init__(self, *, yield_pressure: float = 10.0, sample_interval: float = 1.0,
                 change_threshold: float = 0.01, pressure_triggers: bool = True) -> None:
        if isinstance(yield_pressure, bool) or not isinstance(yield_pressure, (int, float)) \
                or not 0 <= yield_pressure <= 100:
            raise ValueError(f"yield_pressure must be a percentage in [0, 100], not {yield_pressure!r}")
        super().__init__(sample_interval=sample_interval, change_threshold=change_threshold,
                         pressure_triggers=pressure_triggers)
        self.yield_pressure = float(yield_pressure)

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({ResourceType.CACHE_SPACE})

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        availability = super()._sample(resource_type)
        if availability.pressure is not None and availability.pressure > self.yield_pressure:
            availability.available = 0.0
        return availability
