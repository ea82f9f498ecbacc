"""CPU: cores reserved in the native core registry and enforced by affinity masks."""
from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from .. import core
from ..journal import AffinityJournal, JournalEntry, recover
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

log = logging.getLogger(__name__)


def cores_for(percent: float) -> int:
    """Percent of one core -> whole cores: 250 -> 3."""
    return max(1, math.ceil(percent / 100.0 - 1e-9))


def _checked_percent(percent: Any, what: str) -> float:
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real):
        raise TypeError(f"cpu: {what} must be a percent of one core, not {type(percent).__name__}")
    value = float(percent)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"cpu: {what} must be a finite percent of one core > 0, not {percent!r}")
    return value


def check_target_process_id(pid: Any) -> int:
    """A target process id as given at acquire: a positive int naming a live process."""
    if isinstance(pid, bool) or not isinstance(pid, numbers.Integral):
        raise TypeError(f"target_process_id must be an int, not {type(pid).__name__}")
    pid = int(pid)
    if pid <= 0:
        raise ValueError(f"target_process_id must be a positive process id, not {pid}")
    if pid >= 1 << 31 or not os.path.isdir(f"/proc/{pid}"):
        raise ValueError(f"target_process_id {pid}: no such process")
    return pid


@dataclass(slots=True)
class CoreGrant:
    """The handle of one CPU allocation: its reservation, the process it pinned at
    allocation (None: the claim pins the claiming thread, or the claim's target) and
    the journal entries of the other processes it pinned."""

    reservation: core.CoreReservation
    pinned_process: int | None
    journal_entry: JournalEntry | None = None  # of pinned_process
    claimed_processes: dict[int, JournalEntry | None] = field(default_factory=dict)


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

    def max_cores(self) -> int:
        """The most cores one allocation can ever hold: the registry's allowed set."""
        return len(self.registry.allowed())

    def _count_for(self, percent: Any, what: str = "amount") -> int:
        count = cores_for(_checked_percent(percent, what))
        allowed = self.registry.allowed()
        if count > len(allowed):
            raise ValueError(f"cpu: {what} {percent!r} % needs {count} whole cores; this process may "
                             f"use {len(allowed)} (cpus {sorted(allowed)})")
        return count

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        """100 x the whole cores allocate would reserve (250 % -> 300). ValueError when
        that is more cores than this process may use."""
        return 100.0 * self._count_for(amount)

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        try:
            count = self._count_for(amount)
        except (TypeError, ValueError) as exc:
            raise AllocationError(str(exc)) from exc
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
                entry = self._pin_process(reservation, pid)
            except OSError as exc:
                reservation.release()
                raise AllocationError(f"cpu: cannot pin process {pid}: {exc}") from exc
        return Grant(100.0 * count, CoreGrant(reservation, pid or None, entry))

    def _pin_process(self, reservation: core.CoreReservation, pid: int) -> JournalEntry | None:
        """Pins every thread of pid, journaled first when pid is another process."""
        entry = None
        if self.journal is not None and pid != os.getpid():
            entry = self.journal.record(pid, reservation.cores)
        try:
            reservation.apply(pid, whole_process=True)
        except BaseException:
            if entry is not None:
                entry.forget()
            raise
        return entry

    def claim(self, handle: CoreGrant, target_process_id: int | None = None) -> frozenset[int]:
        """Pins the consumer to the allocation's cores and returns them: every thread of
        target_process_id when given (unless the allocation pinned it already), else
        the calling thread when the allocation pinned no process. TypeError/ValueError
        for a target that is not a positive int naming a live process; AllocationError
        when the pin fails."""
        if target_process_id is not None:
            pid = check_target_process_id(target_process_id)
            if pid != handle.pinned_process and pid not in handle.claimed_processes:
                try:
                    handle.claimed_processes[pid] = self._pin_process(handle.reservation, pid)
                except (OSError, ValueError) as exc:
                    raise AllocationError(f"cpu: cannot pin process {pid}: {exc}") from exc
        elif handle.pinned_process is None:
            try:
                handle.reservation.apply(0, whole_process=False)  # the consumer's own thread
            except (OSError, ValueError) as exc:
                raise AllocationError(f"cpu: cannot pin the calling thread: {exc}") from exc
        return handle.reservation.cores

    def release(self, handle: CoreGrant) -> None:
        handle.reservation.release()  # restores every pinned thread's previous mask
        if handle.journal_entry is not None:
            handle.journal_entry.forget()
            handle.journal_entry = None
        for pid, entry in list(handle.claimed_processes.items()):
            if entry is not None:
                entry.forget()
            del handle.claimed_processes[pid]

    def adjust(self, handle: CoreGrant, new_amount: float) -> float:
        """Grows or shrinks to whole cores; returns 100 x the cores now held. Beyond the
        cores this process may use: AllocationError (nothing changes); TypeError /
        ValueError for an amount that is no positive finite percent."""
        _checked_percent(new_amount, "new amount")
        try:
            count = self._count_for(new_amount, "new amount")
        except ValueError as exc:
            raise AllocationError(str(exc)) from exc
        try:
            handle.reservation.resize(count)
        except BlockingIOError as exc:
            raise InsufficientResources(f"cpu: {exc.strerror}") from exc
        except (OSError, ValueError) as exc:
            raise AllocationError(f"cpu: cannot resize to {count} cores: {exc}") from exc
        # (a crash between the resize and this write leaves threads on a mask the entry
        # does not know yet: recovery then leaves them alone)
        for entry in (handle.journal_entry, *handle.claimed_processes.values()):
            if entry is not None:
                entry.add_applied(handle.reservation.cores)
        return 100.0 * count

    def describe(self, handle: CoreGrant) -> dict[str, Any]:
        return {"cores": sorted(handle.reservation.cores), "exclusive": handle.reservation.exclusive,
                "pinned_process": handle.pinned_process,
                "claimed_processes": sorted(handle.claimed_processes)}

    def available_cores(self) -> int:
        return len(self.registry.available())
