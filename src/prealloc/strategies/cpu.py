"""CPU: cores reserved in the native core registry and enforced by affinity masks."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from .. import core
from ..journal import AffinityJournal, JournalEntry, recover
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

log = logging.getLogger(__name__)


def cores_for(percent: float) -> int:
    """Percent of one core -> whole cores: 250 -> 3."""
    return max(1, math.ceil(percent / 100.0 - 1e-9))


@dataclass(slots=True)
class CoreGrant:
    """The handle of one CPU allocation: its reservation and the process it pinned at
    allocation (None: the claim pins the claiming thread)."""

    reservation: core.CoreReservation
    pinned_process: int | None
    journal_entry: JournalEntry | None = None


class CpuAllocationStrategy(AllocationStrategy):
    """Reserves ceil(need / 100) cores; the allocated amount is 100 x cores.

    With a target process (metadata.target_process_id) every thread of it is pinned at
    allocation time, ahead of the need; otherwise the claim pins the claiming thread.
    Each target's previous masks are restored on release. exclusive cores are never
    given to two allocations of this registry.

    A pin of another process is journaled first (prealloc.journal), so that if this
    process dies without releasing it, the next strategy created on the machine (or
    `prealloc recover`) puts the target back; creating a strategy runs that recovery.
    journal=None turns both off.
    """

    resource_type = ResourceType.CPU

    def __init__(self, registry: core.CoreReservations | None = None, *, exclusive: bool = True,
                 pin_target_on_allocate: bool = True,
                 journal: AffinityJournal | None | bool = True) -> None:
        self.registry = registry if registry is not None else core.CoreReservations()
        self.exclusive = exclusive
        self.pin_target_on_allocate = pin_target_on_allocate
        self.journal = AffinityJournal() if journal is True else (journal or None)
        if self.journal is not None:
            try:
                recover(self.journal.directory)
            except OSError as exc:  # an unreadable directory must not stop the host
                log.warning("prealloc: affinity journal recovery failed: %s", exc)

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        count = cores_for(amount)
        try:
            reservation = self.registry.reserve(count, exclusive=self.exclusive)
        except BlockingIOError as exc:
            raise InsufficientResources(f"cpu: {exc.strerror}") from exc
        except ValueError as exc:
            raise AllocationError(f"cpu: {exc}") from exc
        pid = request.metadata.target_process_id if self.pin_target_on_allocate else None
        entry = None
        if pid:
            try:
                if self.journal is not None and pid != os.getpid():
                    entry = self.journal.record(pid, reservation.cores)
                reservation.apply(pid, whole_process=True)
            except OSError as exc:
                reservation.release()
                if entry is not None:
                    entry.forget()
                raise AllocationError(f"cpu: cannot pin process {pid}: {exc}") from exc
        return Grant(100.0 * count, CoreGrant(reservation, pid or None, entry))

    def claim(self, handle: CoreGrant) -> frozenset[int]:
        if handle.pinned_process is None:
            handle.reservation.apply(0, whole_process=False)  # the consumer's own thread
        return handle.reservation.cores

    def release(self, handle: CoreGrant) -> None:
        handle.reservation.release()  # restores every pinned thread's previous mask
        if handle.journal_entry is not None:
            handle.journal_entry.forget()
            handle.journal_entry = None

    def adjust(self, handle: CoreGrant, new_amount: float) -> float:
        count = cores_for(new_amount)
        try:
            handle.reservation.resize(count)
        except BlockingIOError as exc:
            raise InsufficientResources(f"cpu: {exc.strerror}") from exc
        if handle.journal_entry is not None:
            # (a crash between the resize and this write leaves threads on a mask the
            # entry does not know yet: recovery then leaves them alone)
            handle.journal_entry.add_applied(handle.reservation.cores)
        return 100.0 * count

    def describe(self, handle: CoreGrant) -> dict[str, Any]:
        return {"cores": sorted(handle.reservation.cores), "exclusive": handle.reservation.exclusive,
                "pinned_process": handle.pinned_process}

    def available_cores(self) -> int:
        return len(self.registry.available())
