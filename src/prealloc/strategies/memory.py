"""MEMORY: native reservations — mapped, faulted in, optionally locked and on huge pages.

What a reservation holds. The core maps the request rounded up to a page; on huge pages
it maps (and populates, and locks) the request rounded up to a whole 2 MiB block, because
a transparent huge page is all or nothing per block. ``planned_amount`` says so before
anything is mapped, so the engine charges quotas with what will be resident: 0.01 MiB on
huge pages is 2 MiB.

Huge pages by default. numpy asks for transparent huge pages on large arrays, and a first
pass of writes over a 2 MiB-page buffer is faster than over 4 KiB pages (fewer TLB
misses). So ``huge_pages=None`` (the default) uses them for reservations of at least
``HUGE_PAGES_AUTO_BLOCKS`` huge pages, where the kernel's THP mode
(/sys/kernel/mm/transparent_hugepage/enabled, shmem_enabled for shareable memory)
honours an madvise and hpage_pmd_size is the core's huge page size. Smaller reservations
stay on base pages: rounding them up to a block would cost more than it saves.

Release while viewed. The memory is never unmapped under a consumer's live view; then
``release`` returns a DeferredRelease whose ``done()`` runs when the last view goes (from
the core's on-unmap hook: inside a buffer release, possibly a GC pass, with no lock).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import math
import numbers
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native, core
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, DeferredRelease, Grant, InsufficientResources

log = logging.getLogger(__name__)

MiB = 1 << 20
HUGE_PAGES_AUTO_BLOCKS = 4  # "a few huge pages": 8 MiB with 2 MiB pages
_THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")


def thp_mode(*, shmem: bool = False) -> str | None:
    """The selected THP mode ("always", "madvise", "never"; for shmem also "advise",
    "within_size", "deny", "force"), or None where the kernel has no THP."""
    try:
        text = (_THP_DIR / ("shmem_enabled" if shmem else "enabled")).read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def thp_pmd_size() -> int | None:
    """The kernel's transparent huge page size in bytes (hpage_pmd_size), or None."""
    try:
        return int((_THP_DIR / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return None


def thp_honours_madvise(*, shmem: bool = False) -> bool:
    """Whether an madvise(MADV_HUGEPAGE) on an aligned mapping gets huge pages of the
    core's size here."""
    mode = thp_mode(shmem=shmem)
    wanted = ("always", "within_size", "advise", "force") if shmem else ("always", "madvise")
    return mode in wanted and thp_pmd_size() == core.HUGE_PAGE_SIZE


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def mapped_bytes(region: core.MemoryReservation) -> int:
    """The bytes the core mapped, populated and locked for region: its size, rounded up
    to a whole huge page when huge pages were asked for (the core rounds the mapping on
    the request, whatever the kernel then grants). 0 once unmapped."""
    if region.size == 0:
        return 0
    if region.requested_flags & _native.MEM_HUGE_PAGES:
        return _round_up(region.size, core.HUGE_PAGE_SIZE)
    return region.size


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.mincore.restype = ctypes.c_int


def resident_bytes(region: core.MemoryReservation) -> int:
    """Bytes of region's whole mapping (``mapped_bytes``) resident in RAM now (mincore);
    ``region.resident_bytes()`` counts only its usable size."""
    length = mapped_bytes(region)
    if length == 0:
        return 0
    page = core.page_size()
    pages = length // page
    vector = ctypes.create_string_buffer(pages)
    if _libc.mincore(region.address, length, vector) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return int(np.count_nonzero(np.frombuffer(vector.raw, dtype=np.uint8) & 1)) * page


class MemoryAllocationStrategy(AllocationStrategy):
    """Reserves amount MiB with ``core.reserve_memory``.

    lock asks for mlock and is best effort (the allocation records locked=False and the
    errno where RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK refuses; the first refusal logs
    one warning per strategy); require_lock makes that refusal a failure whose message
    names mlock and the limit. huge_pages: True, False, or None (the default) for huge
    pages on reservations of at least ``huge_pages_min_bytes`` (HUGE_PAGES_AUTO_BLOCKS
    huge pages) where the kernel honours an madvise. The consumer's claim gets the
    MemoryReservation itself: a writable zero-copy buffer. Adjust resizes with mremap —
    in place while the consumer holds views, anywhere otherwise.
    """

    resource_type = ResourceType.MEMORY

    def __init__(self, *, populate: bool = True, lock: bool = False, require_lock: bool = False,
                 huge_pages: bool | None = None, shareable: bool = False,
                 huge_pages_min_bytes: int | None = None) -> None:
        for name, value in (("populate", populate), ("lock", lock), ("require_lock", require_lock),
                            ("shareable", shareable)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
        if huge_pages is not None and not isinstance(huge_pages, bool):
            raise TypeError(f"huge_pages must be a bool or None (automatic), not {type(huge_pages).__name__}")
        if huge_pages_min_bytes is None:
            huge_pages_min_bytes = HUGE_PAGES_AUTO_BLOCKS * core.HUGE_PAGE_SIZE
        elif isinstance(huge_pages_min_bytes, bool) or not isinstance(huge_pages_min_bytes, int) \
                or huge_pages_min_bytes < 0:
            raise ValueError(f"huge_pages_min_bytes must be an int >= 0, not {huge_pages_min_bytes!r}")
        self.populate = populate
        self.lock = lock
        self.require_lock = require_lock
        self.huge_pages = huge_pages
        self.shareable = shareable
        self.huge_pages_min_bytes = huge_pages_min_bytes
        # read once: the THP mode is a boot-time or admin setting, and reading sysfs at
        # every allocation would cost more than the allocation's bookkeeping
        self.thp_mode = thp_mode(shmem=shareable)
        self._auto_huge = huge_pages is None and thp_honours_madvise(shmem=shareable)
        self._page = core.page_size()
        self._machine = core.physical_memory()
        self._warn_lock = threading.Lock()
        self._lock_warned = False
        self._pending: dict[int, DeferredRelease] = {}  # id(handle) -> its deferred release

    # -- sizing --------------------------------------------------------------------------

    def _bytes_for(self, amount: float, what: str = "amount") -> int:
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
            raise TypeError(f"memory: {what} must be a number of MiB, not {type(amount).__name__}")
        nbytes_f = float(amount) * MiB
        if not math.isfinite(nbytes_f) or nbytes_f <= 0:
            raise ValueError(f"memory: {what} must be a finite number of MiB > 0, not {amount!r}")
        nbytes = max(1, math.ceil(nbytes_f))
        if self._machine and nbytes > self._machine:
            raise ValueError(f"memory: {what} {amount!r} MiB is more than this machine's "
                             f"{self._machine / MiB:.0f} MiB of RAM")
        return nbytes

    def uses_huge_pages(self, nbytes: int) -> bool:
        """Whether a reservation of nbytes asks for huge pages."""
        if self.huge_pages is not None:
            return self.huge_pages
        return self._auto_huge and _round_up(nbytes, self._page) >= self.huge_pages_min_bytes

    def _mapped_for(self, nbytes: int, huge: bool) -> int:
        rounded = _round_up(nbytes, self._page)
        return _round_up(rounded, core.HUGE_PAGE_SIZE) if huge else rounded

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        """MiB that allocate(request, amount) maps: page-rounded, a whole huge-page block
        on huge pages. ValueError for an amount this machine's RAM can never hold."""
        nbytes = self._bytes_for(amount)
        return self._mapped_for(nbytes, self.uses_huge_pages(nbytes)) / MiB

    def planned_resize(self, handle: core.MemoryReservation, new_amount: float) -> float:
        """MiB that adjust(handle, new_amount) would leave mapped (the handle keeps the
        huge-page choice it was made with)."""
        nbytes = self._bytes_for(new_amount, "new amount")
        huge = bool(handle.requested_flags & _native.MEM_HUGE_PAGES)
        return self._mapped_for(nbytes, huge) / MiB

    # -- the strategy --------------------------------------------------------------------

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        try:
            nbytes = self._bytes_for(amount)
        except (TypeError, ValueError) as exc:
            raise AllocationError(str(exc)) from exc
        huge = self.uses_huge_pages(nbytes)
        try:
            region = core.reserve_memory(nbytes, populate=self.populate, lock=self.lock,
                                         require_lock=self.require_lock, huge_pages=huge,
                                         shareable=self.shareable)
        except ValueError as exc:
            raise AllocationError(f"memory: {exc}") from exc
        except OSError as exc:
            raise self._reserve_error(exc, self._mapped_for(nbytes, huge)) from exc
        if self.lock and not self.require_lock and not region.locked:
            self._warn_lock_once(region)
        return Grant(mapped_bytes(region) / MiB, region)

    def _reserve_error(self, exc: OSError, mapped: int) -> AllocationError:
        if self.require_lock and exc.strerror and "RLIMIT_MEMLOCK" in exc.strerror:
            return AllocationError(f"memory: {exc.strerror}")  # the core's lock refusal
        if exc.errno in (errno.ENOMEM, errno.EAGAIN):
            return InsufficientResources(f"memory: {exc.strerror}")
        return AllocationError(f"memory: {exc}")

    @staticmethod
    def _lock_limit_refuses(nbytes: int) -> bool:
        """Whether locking nbytes more would exceed what this process may lock."""
        return core.lock_refusal_message(errno.ENOMEM, nbytes) is not None

    def _warn_lock_once(self, region: core.MemoryReservation) -> None:
        with self._warn_lock:
            if self._lock_warned:
                return
            self._lock_warned = True
        log.warning("prealloc: memory: lock=True but mlock of %d bytes was refused (%s); %s. "
                    "Memory is reserved unlocked (this warning is not repeated for this strategy; "
                    "each allocation's details say locked=False)",
                    mapped_bytes(region), os.strerror(region.lock_error or 0), core.memlock_status())

    def release(self, handle: core.MemoryReservation) -> DeferredRelease | None:
        """Unmaps now (None), or — while a consumer's view is alive — returns the
        DeferredRelease that is done at the unmap. Releasing again returns the same
        DeferredRelease while it is pending, None once the memory is gone."""
        key = id(handle)  # the handle lives while pending: its views hold it
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        if handle.released:
            return None  # unmapped already
        deferred = DeferredRelease()
        # the hook first: a view released on another thread between the two calls still
        # finds it, and a release that unmaps at once runs it here
        handle.on_unmap(deferred.done)
        try:
            handle.release()
        except BufferError as exc:  # a resize is running on another thread
            raise AllocationError(f"memory: cannot release now: {exc}") from exc
        if deferred.is_done:
            return None
        self._pending[key] = deferred
        pending_releases = self._pending

        def forget() -> None:
            # no lock: this may run in a buffer release inside a GC pass (dict.pop is atomic)
            pending_releases.pop(key, None)

        deferred.add_done_callback(forget)
        return deferred

    def adjust(self, handle: core.MemoryReservation, new_amount: float) -> float:
        """Resizes to new_amount MiB; returns the MiB now mapped. ValueError for an amount
        the machine's RAM can never hold (nothing changes)."""
        nbytes = self._bytes_for(new_amount, "new amount")
        try:
            handle.resize(nbytes)
        except BufferError as exc:
            raise AllocationError(f"memory: {exc}") from exc
        except ValueError as exc:  # released
            raise AllocationError(f"memory: {exc}") from exc
        except OSError as exc:
            raise InsufficientResources(f"memory: cannot resize: {exc.strerror}") from exc
        return mapped_bytes(handle) / MiB

    def describe(self, handle: core.MemoryReservation) -> dict[str, Any]:
        try:
            resident: int | None = resident_bytes(handle)
        except OSError:
            resident = None
        return {
            "bytes": handle.size,
            "mapped_bytes": mapped_bytes(handle),
            "resident_bytes": resident,
            "populated": handle.populated,
            "populate_method": handle.populate_method,
            "lock_requested": self.lock or self.require_lock,
            "locked": handle.locked,
            "lock_error": os.strerror(handle.lock_error) if handle.lock_error else None,
            "huge_pages_requested": bool(handle.requested_flags & _native.MEM_HUGE_PAGES),
            "huge_pages_policy": "auto" if self.huge_pages is None else ("on" if self.huge_pages else "off"),
            "huge_pages": handle.huge_pages,
            "huge_pages_error": os.strerror(handle.huge_pages_error) if handle.huge_pages_error else None,
            "thp_mode": self.thp_mode,
            "shareable": handle.shareable,
            "fd": handle.fd,
        }
