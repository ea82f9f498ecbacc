"""CPU: cores reserved in the native core registry and enforced by affinity masks, and
as far as the machine allows, kept for the allocation alone (isolation levels).

Isolation levels (``metadata.custom_properties["isolation"]``: one name, a "+"-joined
string or a list; the strategy's ``isolation`` is the default), each reported in
``details["isolation"]`` as requested and effective, with the reason for each one not
achieved:

- ``affinity``: the consumer is pinned to the reserved cores (always, as before);
- ``registry`` (default for exclusive cores): no other registry user gets the cores — in
  this process (one registry per process, see :func:`process_core_registry`) and across
  processes (prealloc.machine_registry: a flock per core; across uids only with a shared
  directory);
- ``cpuset``: every other task in scope is moved off the cores for the allocation's
  lifetime (prealloc.cpuset; needs the right to make cpuset cgroups, journaled);
- ``isolated``: the cores are in /sys/devices/system/cpu/isolated (isolcpus/nohz_full at
  boot; detected, never set);
- ``priority``: the consumer (the claiming thread, or every thread of the target) runs
  SCHED_FIFO/SCHED_RR (``custom_properties["priority"]``: ``{"policy": "fifo"|"rr",
  "rt_priority": 1..99, "nice": -20..19}``), or at a lower nice value where real-time is
  refused (RLIMIT_RTPRIO, CAP_SYS_NICE) or the kernel's RT throttling is off
  (``sched_rt_runtime_us`` -1, then a runaway thread could take the core for good);
  restored on release; another process's threads are journaled (kind ``sched``).

Levels above ``affinity`` include ``registry`` for exclusive cores.
"""
from __future__ import annotations

import errno
import logging
import math
import numbers
import os
import resource
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .. import core
from .. import cpuset as cpuset_mod
from ..journal import KIND_SCHED, AffinityJournal, Journal, JournalEntry, recover
from ..machine_registry import CoreLock, MachineCoreRegistry, registry_directory_for, shared_directory
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


LEVELS = ("affinity", "registry", "cpuset", "isolated", "priority")
_ABOVE_AFFINITY = frozenset(LEVELS[1:])

# One core registry per process: every strategy made without a registry of its own shares
# it, so two of them never hand out one exclusive core. A child of fork() gets a new one
# when it first asks (the inherited one answers EOWNERDEAD and its holdings are the
# parent's).
_process_registry: core.CoreReservations | None = None
_process_registry_lock = threading.Lock()


def process_core_registry() -> core.CoreReservations:
    """This process's core registry (made on first use, over the process's affinity then)."""
    global _process_registry
    with _process_registry_lock:
        if _process_registry is None:
            _process_registry = core.CoreReservations()
        return _process_registry


def _forget_process_registry() -> None:
    global _process_registry, _process_registry_lock
    _process_registry = None
    _process_registry_lock = threading.Lock()  # a thread of the parent may have held it


os.register_at_fork(after_in_child=_forget_process_registry)


def parse_isolation(value: Any, what: str = "isolation") -> tuple[str, ...]:
    """An isolation request as level names in LEVELS order: "cpuset", "cpuset+priority" or
    ["cpuset", "priority"]. TypeError/ValueError naming `what`."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split("+")]
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = list(value)
    else:
        raise TypeError(f"cpu: {what} must be a level name or a list of them, not {type(value).__name__}")
    for name in names:
        if name not in LEVELS:
            raise ValueError(f"cpu: {what} {name!r} is not one of {', '.join(LEVELS)}")
    if not names:
        raise ValueError(f"cpu: {what} is empty; levels are {', '.join(LEVELS)}")
    return tuple(level for level in LEVELS if level in names)


_POLICIES = {"fifo": os.SCHED_FIFO, "rr": os.SCHED_RR}
_POLICY_NAMES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR",
                 getattr(os, "SCHED_BATCH", 3): "SCHED_BATCH", getattr(os, "SCHED_IDLE", 5): "SCHED_IDLE"}
_CAP_SYS_NICE = 23


def check_priority(value: Any, what: str = "priority") -> dict[str, Any]:
    """A priority request: {"policy": "fifo"|"rr", "rt_priority": 1..99, "nice": -20..19},
    missing keys from the defaults (fifo, 10, -10)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"cpu: {what} must be a dict of policy / rt_priority / nice, not {type(value).__name__}")
    unknown = set(value) - {"policy", "rt_priority", "nice"}
    if unknown:
        raise ValueError(f"cpu: {what} has unknown keys {sorted(unknown)}; use policy, rt_priority, nice")
    spec = {"policy": "fifo", "rt_priority": 10, "nice": -10, **value}
    if spec["policy"] not in _POLICIES:
        raise ValueError(f"cpu: {what} policy must be 'fifo' or 'rr', not {spec['policy']!r}")
    for key, lo, hi in (("rt_priority", 1, 99), ("nice", -20, 19)):
        v = spec[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"cpu: {what} {key} must be an int in {lo}..{hi}, not {v!r}")
    return spec


def read_thread_sched(tid: int) -> list[int]:
    """[policy, rt_priority, nice] of one thread (what kind ``sched`` journals); policy
    includes SCHED_RESET_ON_FORK when set."""
    return [os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
            os.getpriority(os.PRIO_PROCESS, tid)]


def write_thread_sched(tid: int, value: Any) -> None:
    policy, rt_priority, nice = (int(v) for v in value)
    os.sched_setscheduler(tid, policy, os.sched_param(rt_priority))
    if policy & ~os.SCHED_RESET_ON_FORK not in (os.SCHED_FIFO, os.SCHED_RR):
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def rt_runtime_us() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
    except (OSError, ValueError):
        return None


def _has_cap(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def _rlimit_words(limit: int) -> str:
    soft, _hard = resource.getrlimit(limit)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


@dataclass
class PriorityChange:
    """Scheduling changed on some threads for an allocation: what was asked, what each
    thread got, and how to put them back."""

    requested: str
    effective: str | None
    reason: str | None
    previous: dict[int, list[int]]  # tid -> [policy, rt_priority, nice]
    applied: list[int] | None
    journal_entry: JournalEntry | None = None

    def restore(self) -> None:
        for tid, value in self.previous.items():
            try:
                if self.applied is not None and read_thread_sched(tid) != self.applied:
                    continue  # someone changed it since
                write_thread_sched(tid, value)
            except (ProcessLookupError, OSError):
                continue
        self.previous.clear()
        if self.journal_entry is not None:
            self.journal_entry.forget()
            self.journal_entry = None

    def describe(self) -> dict[str, Any]:
        return {"requested": self.requested, "effective": self.effective, "reason": self.reason,
                "threads": sorted(self.previous)}


def apply_priority(tids: Iterable[int], spec: dict[str, Any], *, journal: Journal | None = None,
                   target_pid: int | None = None) -> PriorityChange:
    """Gives tids the real-time policy of spec, or its nice value where real-time is
    refused, or nothing (with the reason); never raises for a refusal."""
    tids = [t for t in tids]
    policy = _POLICIES[spec["policy"]]
    requested = f"{_POLICY_NAMES[policy]} {spec['rt_priority']}"
    reasons: list[str] = []
    candidates: list[tuple[str, list[int]]] = []
    runtime = rt_runtime_us()
    if runtime == -1:
        reasons.append("real-time throttling is off (sched_rt_runtime_us is -1): a runaway real-time thread "
                       "could take the core for good, so no real-time policy")
    else:
        rt_priority = spec["rt_priority"]
        soft, _hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
        if not _has_cap(_CAP_SYS_NICE) and soft != resource.RLIM_INFINITY and 0 < soft < rt_priority:
            reasons.append(f"rt_priority {rt_priority} lowered to RLIMIT_RTPRIO {soft} (no CAP_SYS_NICE)")
            rt_priority = soft
        # reset on fork: a child the thread forks does not keep a real-time policy that
        # nobody will ever take back
        candidates.append((f"{_POLICY_NAMES[policy]} {rt_priority}",
                           [policy | os.SCHED_RESET_ON_FORK, rt_priority, 0]))
    candidates.append((f"nice {spec['nice']}", [os.SCHED_OTHER, 0, spec["nice"]]))
    change = PriorityChange(requested, None, None, {}, None)
    for words, value in candidates:
        previous: dict[int, list[int]] = {}
        for tid in tids:
            try:
                previous[tid] = read_thread_sched(tid)
            except ProcessLookupError:
                continue
        entry = None
        if journal is not None and target_pid is not None and target_pid != os.getpid():
            entry = journal.record_threads(KIND_SCHED, target_pid, value, read_thread_sched)
        done: list[int] = []
        try:
            for tid in previous:
                write_thread_sched(tid, value)
                done.append(tid)
        except PermissionError as exc:
            for tid in done:
                try:
                    write_thread_sched(tid, previous[tid])
                except OSError:
                    pass
            if entry is not None:
                entry.forget()
            if value[0] == os.SCHED_OTHER:
                reasons.append(f"{words} refused ({errno.errorcode.get(exc.errno or 0, exc.errno)}): RLIMIT_NICE "
                               f"is {_rlimit_words(resource.RLIMIT_NICE)}, CAP_SYS_NICE "
                               f"{'held' if _has_cap(_CAP_SYS_NICE) else 'not held'}")
            else:
                reasons.append(f"{words} refused ({errno.errorcode.get(exc.errno or 0, exc.errno)}): RLIMIT_RTPRIO "
                               f"is {_rlimit_words(resource.RLIMIT_RTPRIO)}, CAP_SYS_NICE "
                               f"{'held' if _has_cap(_CAP_SYS_NICE) else 'not held'}")
            continue
        except ProcessLookupError:
            pass
        change.effective, change.previous, change.applied, change.journal_entry = words, previous, value, entry
        break
    change.reason = "; ".join(reasons) or None
    return change


def isolated_cpus() -> set[int]:
    """/sys/devices/system/cpu/isolated: cores the kernel keeps the scheduler off (isolcpus)."""
    try:
        return cpuset_mod.parse_cpus(Path("/sys/devices/system/cpu/isolated").read_text())
    except (OSError, ValueError):
        return set()


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
    allocation (None: the claim pins the claiming thread, or the claim's target), the
    journal entries of the other processes it pinned, and what each isolation level got."""

    reservation: core.CoreReservation
    pinned_process: int | None
    journal_entry: JournalEntry | None = None  # of pinned_process
    claimed_processes: dict[int, JournalEntry | None] = field(default_factory=dict)
    requested: tuple[str, ...] = ("affinity",)
    reasons: dict[str, str] = field(default_factory=dict)  # level -> why it is not effective
    core_locks: list[CoreLock] = field(default_factory=list)  # machine registry
    cpuset: cpuset_mod.CpusetIsolation | None = None
    priority_spec: dict[str, Any] | None = None
    priorities: list[PriorityChange] = field(default_factory=list)
    priority_pending: bool = False  # requested, to be applied to the claiming thread


class CpuAllocationStrategy(AllocationStrategy):
    """Reserves ceil(need / 100) cores; the allocated amount is 100 x cores.

    With a target process (metadata.target_process_id) every thread of it is pinned at
    allocation time, ahead of the need; otherwise the claim pins the claiming thread.
    Each target's previous masks are restored on release. Exclusive cores are never
    given to two allocations of this process's registry (one per process unless a
    registry is passed) nor, at the ``registry`` level and above, to two processes using
    the same machine registry (see the module for every isolation level).

    A pin of another process is journaled first (prealloc.journal), so that if this
    process dies without releasing it, the next strategy created on the machine (or
    `prealloc recover`) puts the target back; creating a strategy runs that recovery.
    journal=None turns both off (and with it the ``cpuset`` level and the priority of
    other processes, which are never made without a journal).

    isolation: the default level(s) (see parse_isolation); None = ``registry`` for
    exclusive cores, ``affinity`` for shared ones. registry_directory: the machine
    registry's directory (None: $PREALLOC_REGISTRY_DIR, else ``cores/`` under the
    journal directory). cpuset_scope: the tasks the ``cpuset`` level moves ("all",
    "uid" or a set of pids). priority: the default priority request (check_priority).
    """

    resource_type = ResourceType.CPU

    def __init__(self, registry: core.CoreReservations | None = None, *, exclusive: bool = True,
                 pin_target_on_allocate: bool = True,
                 journal: AffinityJournal | None | bool = True,
                 isolation: Any = None, registry_directory: str | os.PathLike[str] | None = None,
                 cpuset_scope: Any = "all", priority: dict[str, Any] | None = None) -> None:
        self.isolation = parse_isolation(isolation if isolation is not None
                                         else ("registry" if exclusive else "affinity"))
        self.cpuset_scope = cpuset_mod._check_scope(cpuset_scope)
        self.priority = check_priority(priority)
        self.registry = registry if registry is not None else process_core_registry()
        self.exclusive = exclusive
        self.pin_target_on_allocate = pin_target_on_allocate
        self.journal = AffinityJournal() if journal is True else (journal or None)
        self._effects = Journal(self.journal.directory) if self.journal is not None else None
        if registry_directory is None and self.journal is not None:
            # the registry goes with the journal's directory, unless a shared one is named
            registry_directory = shared_directory() or registry_directory_for(self.journal.directory)
        self.machine_registry = MachineCoreRegistry(registry_directory)
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

    def _requested_levels(self, request: ResourceRequest) -> tuple[tuple[str, ...], dict[str, Any] | None]:
        props = request.metadata.custom_properties
        levels = parse_isolation(props["isolation"]) if "isolation" in props else self.isolation
        if self.exclusive and set(levels) & _ABOVE_AFFINITY and "registry" not in levels:
            levels = parse_isolation(("registry", *levels))
        levels = parse_isolation(("affinity", *levels))
        spec = None
        if "priority" in levels:
            spec = check_priority(props["priority"], "custom_properties priority") if "priority" in props \
                else dict(self.priority)
        return levels, spec

    def _reserve(self, count: int, allocation_id: Any, level: str) -> tuple[core.CoreReservation, list[CoreLock]]:
        """count exclusive cores free in this process's registry and in the machine's."""
        for _attempt in range(16):
            locks: list[CoreLock] = []
            for candidate in sorted(self.registry.available()):
                if len(locks) == count:
                    break
                lock = self.machine_registry.try_acquire(candidate, level=level, allocation_id=allocation_id)
                if lock is not None:
                    locks.append(lock)
            if len(locks) < count:
                for lock in locks:
                    lock.release()
                elsewhere = sorted(self.machine_registry.held_cores() & self.registry.available())
                raise InsufficientResources(
                    f"cpu: {count} exclusive cores are not free: free in this process "
                    f"{sorted(self.registry.available())}, held by other processes {elsewhere} "
                    f"({self.machine_registry.describe()})")
            try:
                return self.registry.reserve_cores({lock.core for lock in locks}, exclusive=True), locks
            except BlockingIOError:  # another thread of ours took one meanwhile: look again
                for lock in locks:
                    lock.release()
        raise InsufficientResources(f"cpu: {count} exclusive cores kept being taken while reserving")

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        try:
            count = self._count_for(amount)
            levels, spec = self._requested_levels(request)
        except (TypeError, ValueError) as exc:
            raise AllocationError(str(exc)) from exc
        reasons: dict[str, str] = {}
        locks: list[CoreLock] = []
        if not self.exclusive:
            for level in set(levels) & {"registry", "cpuset"}:
                reasons[level] = "shared (non-exclusive) cores are not kept for one allocation"
        use_registry = self.exclusive and "registry" in levels
        top = next(level for level in reversed(levels) if level != "priority")
        try:
            if use_registry:
                try:
                    reservation, locks = self._reserve(count, request.request_id, top)
                except OSError as exc:  # an untrusted or unwritable registry directory
                    log.warning("prealloc: machine core registry unusable: %s", exc)
                    reasons["registry"] = f"machine registry {self.machine_registry.directory} unusable: {exc}"
                    use_registry = False
            if not use_registry:
                reservation = self.registry.reserve(count, exclusive=self.exclusive)
        except BlockingIOError as exc:
            raise InsufficientResources(f"cpu: {exc.strerror}") from exc
        except ValueError as exc:
            raise AllocationError(f"cpu: {exc}") from exc
        handle = CoreGrant(reservation, None, requested=levels, reasons=reasons, core_locks=locks,
                           priority_spec=spec)
        pid = request.metadata.target_process_id if self.pin_target_on_allocate else None
        try:
            if pid:
                try:
                    handle.journal_entry = self._pin_process(reservation, pid)
                except OSError as exc:
                    raise AllocationError(f"cpu: cannot pin process {pid}: {exc}") from exc
                handle.pinned_process = pid
            self._isolate(handle, levels, keep=(pid,) if pid else ())
            if spec is not None:
                if pid:
                    self._prioritise_process(handle, pid)
                else:
                    handle.priority_pending = True
        except BaseException:
            self.release(handle)
            raise
        return Grant(100.0 * count, handle)

    def _isolate(self, handle: CoreGrant, levels: tuple[str, ...], keep: Iterable[int]) -> None:
        cores = handle.reservation.cores
        if "isolated" in levels:
            isolated = isolated_cpus()
            if not cores <= isolated:
                handle.reasons["isolated"] = (f"cores {sorted(cores - isolated)} are not in "
                                              f"/sys/devices/system/cpu/isolated ({sorted(isolated) or 'empty'}: "
                                              f"the kernel was booted without isolcpus/nohz_full for them)")
        if "cpuset" in levels and self.exclusive:
            if "registry" in handle.reasons:
                handle.reasons["cpuset"] = "not without the machine registry (another process could be moved " \
                                           "off cores it holds)"
            elif self._effects is None:
                handle.reasons["cpuset"] = "not without a journal (a crash would leave tasks moved)"
            else:
                keep_pids = {*keep, *handle.claimed_processes}
                try:
                    handle.cpuset = cpuset_mod.isolate(cores, keep_pids=keep_pids, scope=self.cpuset_scope,
                                                       journal=self._effects)
                except (cpuset_mod.CpusetUnavailable, PermissionError) as exc:
                    handle.reasons["cpuset"] = str(exc.strerror or exc)
                except OSError as exc:
                    handle.reasons["cpuset"] = f"moving tasks failed and was undone: {exc}"

    def _prioritise_process(self, handle: CoreGrant, pid: int) -> None:
        assert handle.priority_spec is not None
        if self._effects is None and pid != os.getpid():
            handle.reasons["priority"] = "not for another process without a journal"
            return
        change = apply_priority(core_thread_ids(pid), handle.priority_spec, journal=self._effects, target_pid=pid)
        handle.priorities.append(change)
        self._note_priority(handle)

    def _note_priority(self, handle: CoreGrant) -> None:
        if any(c.effective is None for c in handle.priorities):
            handle.reasons["priority"] = next(c.reason for c in handle.priorities if c.effective is None) or "refused"
        elif any(c.reason for c in handle.priorities):
            handle.reasons["priority"] = "lower than requested: " + "; ".join(
                c.reason for c in handle.priorities if c.reason)
        else:
            handle.reasons.pop("priority", None)

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
        when the pin fails. With the ``priority`` level the consumer also gets its
        scheduling policy here (once)."""
        if target_process_id is not None:
            pid = check_target_process_id(target_process_id)
            if pid != handle.pinned_process and pid not in handle.claimed_processes:
                if handle.cpuset is not None:  # the consumer must not be one of the tasks moved off
                    handle.cpuset.readmit(pid)
                try:
                    handle.claimed_processes[pid] = self._pin_process(handle.reservation, pid)
                except (OSError, ValueError) as exc:
                    raise AllocationError(f"cpu: cannot pin process {pid}: {exc}") from exc
                if handle.priority_pending:
                    handle.priority_pending = False
                    self._prioritise_process(handle, pid)
        elif handle.pinned_process is None:
            try:
                handle.reservation.apply(0, whole_process=False)  # the consumer's own thread
            except (OSError, ValueError) as exc:
                raise AllocationError(f"cpu: cannot pin the calling thread: {exc}") from exc
            if handle.priority_pending and handle.priority_spec is not None:
                handle.priority_pending = False
                handle.priorities.append(apply_priority([threading.get_native_id()], handle.priority_spec))
                self._note_priority(handle)
        return handle.reservation.cores

    def release(self, handle: CoreGrant) -> None:
        errors: list[BaseException] = []
        for change in handle.priorities:  # first: a real-time thread should not outlive its cores
            change.restore()
        handle.priorities.clear()
        handle.priority_pending = False
        if handle.cpuset is not None:
            try:
                handle.cpuset.release()
            except OSError as exc:  # the journal entry stays: recovery retries it after we are gone
                log.error("prealloc: restoring the cpusets of cores %s failed: %s",
                          sorted(handle.cpuset.reserved), exc)
                errors.append(exc)
            handle.cpuset = None
        handle.reservation.release()  # restores every pinned thread's previous mask
        if handle.journal_entry is not None:
            handle.journal_entry.forget()
            handle.journal_entry = None
        for pid, entry in list(handle.claimed_processes.items()):
            if entry is not None:
                entry.forget()
            del handle.claimed_processes[pid]
        for lock in handle.core_locks:  # last: nobody else takes the cores before we let go
            lock.release()
        handle.core_locks.clear()

    def adjust(self, handle: CoreGrant, new_amount: float) -> float:
        """Grows or shrinks to whole cores; returns 100 x the cores now held. Beyond the
        cores this process may use: AllocationError (nothing changes); TypeError /
        ValueError for an amount that is no positive finite percent. With the machine
        registry, growth takes the lowest cores free in this process; when another
        process holds one of them, InsufficientResources (nothing changes). A cpuset
        isolation is redone for the new cores (other tasks may run on them for the
        moment in between)."""
        _checked_percent(new_amount, "new amount")
        try:
            count = self._count_for(new_amount, "new amount")
        except ValueError as exc:
            raise AllocationError(str(exc)) from exc
        before = handle.reservation.cores
        new_locks: list[CoreLock] = []
        if handle.core_locks and count > len(before):
            wanted = sorted(self.registry.available())[:count - len(before)]
            new_locks = self.machine_registry.acquire_cores(wanted, level="registry") or []
            if len(new_locks) != len(wanted):
                raise InsufficientResources(f"cpu: cannot grow to {count} cores: cores {wanted} are held by "
                                            f"another process ({self.machine_registry.describe()})")
        try:
            handle.reservation.resize(count)
        except BlockingIOError as exc:
            for lock in new_locks:
                lock.release()
            raise InsufficientResources(f"cpu: {exc.strerror}") from exc
        except (OSError, ValueError) as exc:
            for lock in new_locks:
                lock.release()
            raise AllocationError(f"cpu: cannot resize to {count} cores: {exc}") from exc
        after = handle.reservation.cores
        if handle.core_locks:
            locks = handle.core_locks + new_locks
            for lock in [lk for lk in locks if lk.core not in after]:
                lock.release()
            handle.core_locks = [lk for lk in locks if lk.core in after]
            missing = after - {lk.core for lk in handle.core_locks}
            if missing:  # another thread of ours changed the free set under us: put it back
                handle.reservation.resize(len(before))
                for lock in [lk for lk in handle.core_locks if lk.core not in handle.reservation.cores]:
                    lock.release()
                handle.core_locks = [lk for lk in handle.core_locks if lk.core in handle.reservation.cores]
                raise InsufficientResources(f"cpu: cores {sorted(missing)} were taken while growing")
        # (a crash between the resize and this write leaves threads on a mask the entry
        # does not know yet: recovery then leaves them alone)
        for entry in (handle.journal_entry, *handle.claimed_processes.values()):
            if entry is not None:
                entry.add_applied(handle.reservation.cores)
        if handle.cpuset is not None and after != before:
            handle.cpuset.release()
            handle.cpuset = None
            keep = {p for p in (handle.pinned_process,) if p}
            self._isolate(handle, ("cpuset",), keep=keep)
        return 100.0 * count

    def describe(self, handle: CoreGrant) -> dict[str, Any]:
        effective = [level for level in handle.requested if level not in handle.reasons or
                     (level == "priority" and handle.priorities and
                      all(c.effective for c in handle.priorities))]
        if handle.priority_pending:
            effective = [level for level in effective if level != "priority"]
        isolation: dict[str, Any] = {"requested": list(handle.requested), "effective": effective,
                                     "reasons": dict(handle.reasons)}
        if handle.priority_pending:
            isolation["reasons"].setdefault("priority", "applied to the consumer at claim")
        if handle.core_locks:
            isolation["registry"] = self.machine_registry.describe()
        if handle.cpuset is not None:
            isolation["cpuset"] = handle.cpuset.describe()
        if handle.priorities:
            isolation["priority"] = [c.describe() for c in handle.priorities]
        return {"cores": sorted(handle.reservation.cores), "exclusive": handle.reservation.exclusive,
                "pinned_process": handle.pinned_process,
                "claimed_processes": sorted(handle.claimed_processes),
                "isolation": isolation}

    def available_cores(self) -> int:
        return len(self.registry.available())


def core_thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
