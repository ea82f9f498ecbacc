"""The low-level public face of the native core.

Everything here is the C core, reached through the thin binding ``prealloc._native``;
this module adds the policy a caller expects at the edge: argument checks with clear
messages (sizes against the machine, CPUs against the online set, pids that exist) that
fail before anything is changed.

    >>> from prealloc import core
    >>> with core.reserve_memory(64 << 20, lock=True) as region:
    ...     view = memoryview(region)          # zero-copy, writable
    >>> core.set_affinity(pid, {0, 1})           # every thread of pid
"""
from __future__ import annotations

import errno
import operator
import os
import sys
from typing import Iterable

from . import _native
from ._native import (
    ACTIVE,
    ALLOCATED,
    EXPIRED,
    FAILED,
    FINAL_MASK,
    HUGE_PAGE_SIZE,
    LIVE_MASK,
    PENDING,
    RELEASED,
    RELEASING,
    STATUS_COUNT,
    AffinityChange,
    AllocationTable,
    EngineCore,
    CoreReservation,
    CoreReservations,
    ExpiryTicker,
    MemoryReservation,
    PriorityQueue,
    Record,
    TimerWheel,
    WAIT,
    monotonic_ns,
    online_cpus,
    page_size,
    physical_memory,
    status_mask,
    status_name,
    transition_legal,
)

__all__ = [
    "PENDING", "ALLOCATED", "ACTIVE", "RELEASING", "RELEASED", "FAILED", "EXPIRED",
    "STATUS_COUNT", "FINAL_MASK", "LIVE_MASK", "HUGE_PAGE_SIZE",
    "AffinityChange", "AllocationTable", "CoreReservation", "CoreReservations",
    "ExpiryTicker", "MemoryReservation", "PriorityQueue", "Record", "TimerWheel",
    "get_affinity", "set_affinity", "get_thread_affinity", "set_thread_affinity",
    "lock_refusal_message", "memlock_status",
    "monotonic_ns", "online_cpus", "page_size", "physical_memory", "reserve_memory",
    "status_mask", "status_name", "transition_legal",
    # the allocators' compiled half and its "must wait" answer (prealloc.engine uses them)
    "EngineCore", "WAIT",
]


def reserve_memory(
    nbytes: int,
    *,
    populate: bool = True,
    lock: bool = False,
    huge_pages: bool = False,
    shareable: bool = False,
    require_lock: bool = False,
) -> MemoryReservation:
    """Maps nbytes now, faults every page in (populate), and locks it (lock) where the
    machine allows; huge_pages advises transparent huge pages on a 2 MiB-aligned mapping;
    shareable backs it by a memfd (``.fd``) that another process can map.

    The reservation reports what it got: ``.locked`` is False with ``.lock_error`` set to
    the errno when RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK refused the lock — unless
    require_lock is set, then the refusal raises (PermissionError / OSError, its message
    naming mlock, RLIMIT_MEMLOCK and CAP_IPC_LOCK) and nothing stays mapped.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, not {nbytes}")
    machine = physical_memory()
    if machine and nbytes > machine:
        raise ValueError(f"cannot reserve {nbytes} bytes: the machine has {machine} bytes of RAM")
    if nbytes > sys.maxsize:  # beyond what one mapping can span (mmap takes up to PTRDIFF_MAX)
        raise ValueError(f"cannot reserve {nbytes} bytes: more than the address space")
    flags = 0
    if populate:
        flags |= _native.MEM_POPULATE
    if lock or require_lock:
        flags |= _native.MEM_LOCK
    if require_lock:
        flags |= _native.MEM_LOCK_REQUIRED
    if huge_pages:
        flags |= _native.MEM_HUGE_PAGES
    if shareable:
        flags |= _native.MEM_SHAREABLE
    try:
        return _native._reserve_memory(nbytes, flags)
    except OSError as exc:
        if require_lock:
            mapped = -(-nbytes // page_size()) * page_size()
            if huge_pages:
                mapped = -(-mapped // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
            refusal = lock_refusal_message(exc.errno or 0, mapped)
            if refusal is not None:
                raise type(exc)(exc.errno, refusal) from exc
        raise


_CAP_IPC_LOCK = 14


def _proc_self_status(field: str) -> str | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def memlock_status() -> str:
    """This process's room to lock memory, in words: RLIMIT_MEMLOCK, CAP_IPC_LOCK, VmLck."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes ({soft / (1 << 20):g} MiB)"
    capabilities = _proc_self_status("CapEff")
    has_cap = capabilities is not None and bool(int(capabilities, 16) >> _CAP_IPC_LOCK & 1)
    locked = _proc_self_status("VmLck")
    return (f"RLIMIT_MEMLOCK is {limit}, CAP_IPC_LOCK {'held' if has_cap else 'not held'}, "
            f"{int(locked) * 1024 if locked else 0} bytes locked already")


def lock_refusal_message(error: int, nbytes: int) -> str | None:
    """What to say when locking nbytes failed with errno error — naming mlock and
    RLIMIT_MEMLOCK — or None when error means something else (ENOMEM from the populate
    with room to lock left: a lack of memory, not a refused lock)."""
    if error == errno.ENOMEM:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        capabilities = _proc_self_status("CapEff")
        if capabilities is not None and int(capabilities, 16) >> _CAP_IPC_LOCK & 1:
            return None
        locked = int(_proc_self_status("VmLck") or 0) * 1024
        if soft == resource.RLIM_INFINITY or locked + nbytes <= soft:
            return None
    elif error not in (errno.EPERM, errno.EAGAIN):
        return None
    return f"require_lock: mlock of {nbytes} bytes was refused ({os.strerror(error)}); {memlock_status()}"


_PID_MAX = (1 << 31) - 1  # pid_t


def _valid_cores(cores: Iterable[int]) -> set[int]:
    """The cpu ids of cores, each an int naming an online cpu; TypeError / ValueError
    naming the argument (and listing the valid cpus) before anything changes."""
    if isinstance(cores, (str, bytes, bytearray, memoryview)):
        # "01" is not {0, 1}: a string of digits is not a set of cpu ids
        raise TypeError(f"cores must be an iterable of int cpu ids, not {type(cores).__name__}")
    try:
        items = list(cores)
    except TypeError:
        raise TypeError(f"cores must be an iterable of int cpu ids, not {type(cores).__name__}") from None
    wanted: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"cores must hold int cpu ids, not bool ({item!r})")
        try:
            wanted.add(operator.index(item))  # ints and numpy integers, never a float
        except TypeError:
            raise TypeError(f"cores must hold int cpu ids, not {type(item).__name__} ({item!r})") from None
    online = online_cpus()
    if not wanted:
        raise ValueError(f"cores is empty; valid cpus are {sorted(online)}")
    bad = sorted(wanted - online)
    if bad:
        shown = [c if abs(c) < 1 << 20 else f"{c:#x}" for c in bad]
        raise ValueError(f"cores {shown} are not online cpus; valid cpus are {sorted(online)}")
    return wanted


def _check_pid(pid: int, name: str = "pid") -> int:
    if isinstance(pid, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        pid = operator.index(pid)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(pid).__name__}") from None
    if pid < 0:
        raise ValueError(f"{name} must be >= 0, not {pid}")
    if pid > _PID_MAX:
        raise ValueError(f"{name} {pid} is beyond the largest process id ({_PID_MAX})")
    if pid and not os.path.isdir(f"/proc/{pid}"):
        raise ProcessLookupError(errno.ESRCH, f"no process {pid} ({name})")
    return pid


def get_affinity(pid: int = 0) -> set[int]:
    """The cpus process pid (0 = this process) may run on: its main thread's mask."""
    pid = _check_pid(pid)
    return _native.thread_affinity(pid or os.getpid())


def set_affinity(pid: int, cores: Iterable[int]) -> AffinityChange:
    """Pins every thread of process pid (0 = this process) to cores. Returns the
    AffinityChange whose restore() puts each thread back (also usable as a context
    manager). ValueError lists the valid cpus; a dead pid raises ProcessLookupError."""
    pid = _check_pid(pid)
    return _native.set_process_affinity(pid, _valid_cores(cores))


def get_thread_affinity(tid: int = 0) -> set[int]:
    """The mask of one thread (0 = the calling thread)."""
    return _native.thread_affinity(_check_pid(tid, "tid"))


def set_thread_affinity(tid: int, cores: Iterable[int]) -> None:
    """Pins one thread (0 = the calling thread)."""
    _native.set_thread_affinity(_check_pid(tid, "tid"), _valid_cores(cores))
