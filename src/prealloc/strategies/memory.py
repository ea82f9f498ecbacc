"""MEMORY: native reservations — mapped, faulted in, optionally locked and on huge pages."""
from __future__ import annotations

import errno
import math
import os
from typing import Any

from .. import core
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

MiB = 1 << 20


class MemoryAllocationStrategy(AllocationStrategy):
    """Reserves amount MiB with ``core.reserve_memory``.

    lock asks for mlock and is best effort (the allocation records locked=False and the
    errno where RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK refuses); require_lock makes
    that refusal a failure. The consumer's claim gets the MemoryReservation itself: a
    writable zero-copy buffer. Adjust resizes with mremap — in place while the consumer
    holds views, anywhere otherwise.
    """

    resource_type = ResourceType.MEMORY

    def __init__(self, *, populate: bool = True, lock: bool = False, require_lock: bool = False,
                 huge_pages: bool = False, shareable: bool = False) -> None:
        self.populate = populate
        self.lock = lock
        self.require_lock = require_lock
        self.huge_pages = huge_pages
        self.shareable = shareable

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        nbytes = max(1, math.ceil(amount * MiB))
        try:
            region = core.reserve_memory(nbytes, populate=self.populate, lock=self.lock,
                                         require_lock=self.require_lock, huge_pages=self.huge_pages,
                                         shareable=self.shareable)
        except ValueError as exc:
            raise AllocationError(str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and not self.require_lock:
                raise InsufficientResources(f"memory: {exc.strerror}") from exc
            raise AllocationError(f"memory: {exc}") from exc
        return Grant(region.size / MiB, region)

    def release(self, handle: Any) -> None:
        handle.release()  # defers the unmap while a consumer's view is alive

    def adjust(self, handle: Any, new_amount: float) -> float:
        try:
            handle.resize(max(1, math.ceil(new_amount * MiB)))
        except BufferError as exc:
            raise AllocationError(f"memory: {exc}") from exc
        except OSError as exc:
            raise InsufficientResources(f"memory: cannot resize: {exc.strerror}") from exc
        return handle.size / MiB

    def describe(self, handle: Any) -> dict[str, Any]:
        return {
            "bytes": handle.size,
            "populated": handle.populated,
            "populate_method": handle.populate_method,
            "lock_requested": self.lock or self.require_lock,
            "locked": handle.locked,
            "lock_error": os.strerror(handle.lock_error) if handle.lock_error else None,
            "huge_pages_requested": self.huge_pages,
            "huge_pages": handle.huge_pages,
            "huge_pages_error": os.strerror(handle.huge_pages_error) if handle.huge_pages_error else None,
            "shareable": handle.shareable,
            "fd": handle.fd,
        }
