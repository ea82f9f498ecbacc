"""DISK_IO: disk space that is really there at the moment of need (fallocate), and I/O
priority that the kernel really applies (ioprio_set).

A request says what it wants in ``metadata.custom_properties``:

- ``directory``: where the space is needed (default: the current directory). The space
  is reserved on that directory's filesystem.
- ``mode``: ``"file"`` (default) — the claim hands over an open descriptor and the path
  of a preallocated file in that directory (``name``, default ``prealloc-<request id>``),
  mode 0600, whose first N MiB of writes cannot hit ENOSPC; ``"ballast"`` — a hidden
  reserve file released at the moment of claim, so the consumer's own files get the
  space; ``"none"`` — no space, only the priority below.
- ``keep_size`` (file mode, default True): the file is empty and the reservation lies
  beyond its end (FALLOC_FL_KEEP_SIZE), for appends; False: its size is N MiB.
- ``io_priority``: ``"best-effort:0"`` .. ``"best-effort:7"``, ``"realtime:0"`` ..
  ``"realtime:7"`` (CAP_SYS_ADMIN), ``"idle"`` — for the target process
  (``metadata.target_process_id``, or the one the claim names), else for the claiming
  thread. Previous priorities are saved and restored on release.
- ``io_weight`` (1..1000): the second mechanism, a weight for the target's cgroup (v2
  ``io.weight``, v1 ``blkio.bfq.weight`` / ``blkio.weight``, whichever exists; the root
  cgroup has none). It applies to every process of that cgroup; the previous weight is
  restored on release and journaled (it outlives us). Where no weight file exists the
  allocation still succeeds and ``describe()["io_weight"]`` says why nothing was set.

The reserve file is an O_TMPFILE where the filesystem has it (unnamed: a crash frees its
space with no help), linked into the directory on claim; elsewhere a named file
``.prealloc-reserve-<pid>-<start>-<n>`` journaled before it is created
(prealloc.journal), which recovery removes after a crash. An I/O priority set on another
process is journaled the same way and put back after a crash; creating a DiskStrategy
runs that recovery.

Whether a priority does anything is the device's business, and ``describe`` says it
plainly (see monitors.disk.BlockDevice.priority_effect), with the cgroup weight files
and the cgroup weight's effect the same way (monitors.disk.io_weight_effect).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .. import _native
from ..journal import KIND_CGROUP_WEIGHT, KIND_IOPRIO, Entry, Journal, process_start_time, recover, thread_ids
from ..monitors.disk import (
    FilesystemSpace,
    block_device_of,
    cgroup_io_weight_files,
    io_weight_effect,
    read_io_weight,
    write_io_weight,
)
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MODES = ("file", "ballast", "none")
_CLASS_NAMES = {"realtime": _native.IOPRIO_CLASS_RT, "rt": _native.IOPRIO_CLASS_RT,
                "best-effort": _native.IOPRIO_CLASS_BE, "be": _native.IOPRIO_CLASS_BE,
                "idle": _native.IOPRIO_CLASS_IDLE}
_CLASS_LABELS = {_native.IOPRIO_CLASS_NONE: "none", _native.IOPRIO_CLASS_RT: "realtime",
                 _native.IOPRIO_CLASS_BE: "best-effort", _native.IOPRIO_CLASS_IDLE: "idle"}
_SHIFT = 13


def parse_io_priority(text: Any) -> int:
    """"best-effort:3" -> the kernel's ioprio value. ValueError naming io_priority."""
    if not isinstance(text, str):
        raise ValueError(f"io_priority must be a string like 'best-effort:0', not {text!r}")
    cls_name, _, level_text = text.strip().lower().partition(":")
    if cls_name not in _CLASS_NAMES:
        raise ValueError(f"io_priority {text!r}: the class must be one of realtime, best-effort, idle")
    cls = _CLASS_NAMES[cls_name]
    if cls == _native.IOPRIO_CLASS_IDLE:
        if level_text not in ("", "0", "7"):
            raise ValueError(f"io_priority {text!r}: idle has no level")
        return cls << _SHIFT
    try:
        level = int(level_text) if level_text else 0
    except ValueError:
        raise ValueError(f"io_priority {text!r}: the level must be 0..7") from None
    if not 0 <= level < _native.IOPRIO_LEVELS:
        raise ValueError(f"io_priority {text!r}: the level must be 0..7")
    return cls << _SHIFT | level


def format_io_priority(value: int) -> str:
    cls, level = value >> _SHIFT, value & ((1 << _SHIFT) - 1)
    label = _CLASS_LABELS.get(cls, str(cls))
    return label if cls in (_native.IOPRIO_CLASS_NONE, _native.IOPRIO_CLASS_IDLE) else f"{label}:{level}"


def _thread_start(pid: int, tid: int) -> int | None:
    try:
        text = open(f"/proc/{pid}/task/{tid}/stat").read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])


@dataclass(slots=True)
class PriorityChange:
    """An I/O priority applied to the threads of one process (or one of our threads):
    each thread's previous value, restored on release where it still holds ours."""

    pid: int  # the process (ours for the claiming thread)
    start: int | None  # its start time: a reused pid is never touched
    value: int
    previous: dict[int, int]  # tid -> value before
    thread_starts: dict[int, int | None]  # tid -> its start time (a tid may be reused too)
    journal_entry: Entry | None = None

    def restore(self) -> list[int]:
        """Puts back every thread still at our value; returns the tids restored."""
        restored: list[int] = []
        if self.start is not None and process_start_time(self.pid) != self.start:
            self.previous.clear()
            return restored  # the process is gone; its pid may be someone else's
        default = self.previous.get(self.pid, next(iter(self.previous.values()), 0))
        whole = self.pid != os.getpid()
        tids = thread_ids(self.pid) if whole else list(self.previous)
        for tid in tids:
            if tid in self.thread_starts and _thread_start(self.pid, tid) != self.thread_starts[tid]:
                continue  # the tid now belongs to another thread
            try:
                if _native.ioprio_get(tid) != self.value:
                    continue  # changed by someone else since
                _native.ioprio_set(tid, self.previous.get(tid, default))
                restored.append(tid)
            except ProcessLookupError:
                continue
        self.previous.clear()
        if self.journal_entry is not None:
            self.journal_entry.forget()
            self.journal_entry = None
        return restored


@dataclass(slots=True)
class WeightChange:
    """A weight written to a cgroup weight file, restored on release where it still
    holds ours."""

    path: str
    previous: int
    applied: int
    journal_entry: Entry | None = None

    def restore(self) -> bool:
        try:
            restored = read_io_weight(self.path) == self.applied
            if restored:
                write_io_weight(self.path, self.previous)
        except FileNotFoundError:
            restored = False  # the cgroup is gone
        if self.journal_entry is not None:
            self.journal_entry.forget()
            self.journal_entry = None
        return restored


@dataclass(slots=True)
class DiskClaim:
    """What a consumer gets: for file mode the descriptor (now the consumer's to close)
    and the path of its preallocated file; for ballast the space it may now use."""

    mode: str
    directory: str
    reserved_bytes: int
    fd: int | None = None
    path: str | None = None
    io_priority: str | None = None


@dataclass(slots=True)
class DiskGrant:
    """The handle of one DISK_IO allocation."""

    mode: str
    directory: str
    name: str
    requested_bytes: int
    reservation: Any = None  # _native.DiskReservation while we hold the space
    journal_entry: Entry | None = None
    io_priority: int | None = None
    priorities: list[PriorityChange] = field(default_factory=list)
    io_weight: int | None = None
    weight: WeightChange | None = None
    weight_report: dict[str, Any] = field(default_factory=dict)
    claimed: DiskClaim | None = None
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class DiskStrategy(AllocationStrategy):
    """Reserves disk space (fallocate) and I/O priority; see the module.

    headroom_mib: space left to everyone else on the filesystem (an allocation that would
    leave less is InsufficientResources). prefer_tmpfile: use O_TMPFILE where the
    filesystem has it. journal: the side-effect journal (True: the default directory;
    None/False: none — then a crash leaves named reserve files and others' priorities).
    """

    resource_type = ResourceType.DISK_IO

    def __init__(self, *, headroom_mib: float = 64.0, prefer_tmpfile: bool = True,
                 journal: Journal | None | bool = True) -> None:
        if isinstance(headroom_mib, bool) or not isinstance(headroom_mib, (int, float)) \
                or not 0 <= headroom_mib < math.inf:
            raise ValueError(f"headroom_mib must be a finite number >= 0, not {headroom_mib!r}")
        self.headroom_mib = float(headroom_mib)
        self.prefer_tmpfile = bool(prefer_tmpfile)
        self.journal: Journal | None = Journal() if journal is True else (journal or None)
        if self.journal is not None:
            try:
                recover(self.journal.directory)
            except OSError as exc:  # an unreadable directory must not stop the host
                log.warning("prealloc: side-effect journal recovery failed: %s", exc)
        self._names = 0
        self._names_lock = threading.Lock()

    # -- request properties -----------------------------------------------------------

    @staticmethod
    def _options(request: ResourceRequest) -> tuple[str, str, bool, str | None, int | None]:
        props = request.metadata.custom_properties or {}
        directory = props.get("directory", os.getcwd())
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"custom_properties['directory'] must be a path, not {directory!r}")
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise ValueError(f"custom_properties['directory'] {directory!r} is not a directory")
        mode = props.get("mode", "file")
        if mode not in MODES:
            raise ValueError(f"custom_properties['mode'] must be one of {list(MODES)}, not {mode!r}")
        keep_size = props.get("keep_size", True)
        if not isinstance(keep_size, bool):
            raise ValueError(f"custom_properties['keep_size'] must be a bool, not {keep_size!r}")
        name = props.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
            raise ValueError(f"custom_properties['name'] must be a file name without '/', not {name!r}")
        priority = props.get("io_priority")
        weight = props.get("io_weight")
        if weight is not None and (type(weight) is not int or not 1 <= weight <= 1000):
            raise ValueError(f"custom_properties['io_weight'] must be an int in 1..1000, not {weight!r}")
        return directory, mode, keep_size, name, None if priority is None else parse_io_priority(priority)

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        try:
            directory, mode, *_ = self._options(request)
        except ValueError:
            return amount  # allocate reports it
        if mode == "none":
            return 0.0
        block = FilesystemSpace.of(directory).block_size or 4096
        return math.ceil(amount * MIB / block) * block / MIB

    # -- lifecycle --------------------------------------------------------------------

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        try:
            directory, mode, keep_size, name, priority = self._options(request)
        except ValueError as exc:
            raise AllocationError(f"disk: {exc}") from exc
        handle = DiskGrant(mode, directory, name or f"prealloc-{request.request_id}",
                           0 if mode == "none" else max(1, math.ceil(amount * MIB)), io_priority=priority,
                           io_weight=(request.metadata.custom_properties or {}).get("io_weight"))
        if mode != "none":
            self._reserve(handle, keep_size=keep_size or mode == "ballast")
        pid = request.metadata.target_process_id
        if priority is not None and pid:
            try:
                handle.priorities.append(self._set_priority(pid, priority))
            except (OSError, AllocationError) as exc:
                self._release_space(handle)
                raise AllocationError(f"disk: cannot set the I/O priority of process {pid}: {exc}") from exc
        if handle.io_weight is not None and pid:
            try:
                self._set_weight(handle, pid)
            except OSError as exc:
                self.release(handle)
                raise AllocationError(f"disk: cannot set the I/O weight of process {pid}'s cgroup: {exc}") from exc
        held = handle.reservation.size / MIB if handle.reservation is not None else 0.0
        return Grant(held, handle)

    def _reserve(self, handle: DiskGrant, *, keep_size: bool) -> None:
        space = FilesystemSpace.of(handle.directory)
        size = math.ceil(handle.requested_bytes / space.block_size) * space.block_size
        if space.available - size < self.headroom_mib * MIB:
            raise InsufficientResources(
                f"disk: {size / MIB:.1f} MiB on {handle.directory} would leave less than the "
                f"{self.headroom_mib:g} MiB headroom ({space.available / MIB:.1f} MiB free)")
        flags = _native.DISK_KEEP_SIZE if keep_size else 0
        try:
            if self.prefer_tmpfile:
                try:
                    handle.reservation = _native._reserve_disk(handle.directory, None, size,
                                                               flags | _native.DISK_TMPFILE)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: no O_TMPFILE here, a name is needed
                        raise
            hidden = self.journal.unique_name(".prealloc-reserve") if self.journal else self._local_name()
            entry = self.journal.record_reserve_file(os.path.join(handle.directory, hidden)) if self.journal else None
            try:
                handle.reservation = _native._reserve_disk(handle.directory, hidden, size, flags)
            except BaseException:
                if entry is not None:
                    entry.forget()
                raise
            if entry is not None:
                st = os.fstat(handle.reservation.fd)
                entry.update(dev=st.st_dev, ino=st.st_ino)
            handle.journal_entry = entry
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientResources(f"disk: no space for {size / MIB:.1f} MiB on {handle.directory}") from exc
            if exc.errno == errno.EOPNOTSUPP:
                raise AllocationError(f"disk: fallocate is not supported on this filesystem ({handle.directory}); "
                                      "space cannot be reserved without writing it") from exc
            raise AllocationError(f"disk: cannot reserve space in {handle.directory}: {exc}") from exc

    def _local_name(self) -> str:
        with self._names_lock:
            self._names += 1
            return f".prealloc-reserve-{os.getpid()}-{self._names}"

    def _set_priority(self, pid: int, value: int) -> PriorityChange:
        """Sets value on every thread of pid (0: the calling thread only), journaled first
        when pid is another process."""
        if pid == 0:
            tid = threading.get_native_id()
            change = PriorityChange(os.getpid(), process_start_time(os.getpid()), value,
                                    {tid: _native.ioprio_get(tid)}, {tid: _thread_start(os.getpid(), tid)})
            _native.ioprio_set(tid, value)
            return change
        start = process_start_time(pid)
        if start is None:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
        entry = None
        if self.journal is not None and pid != os.getpid():
            entry = self.journal.record_threads(KIND_IOPRIO, pid, value, _native.ioprio_get)
        change = PriorityChange(pid, start, value, {}, {}, entry)
        try:
            seen: set[int] = set()
            for _ in range(8):  # threads started meanwhile show up in the next listing
                new = [t for t in thread_ids(pid) if t not in seen]
                if not new:
                    break
                for tid in new:
                    seen.add(tid)
                    try:
                        change.previous[tid] = _native.ioprio_get(tid)
                        change.thread_starts[tid] = _thread_start(pid, tid)
                        _native.ioprio_set(tid, value)
                    except ProcessLookupError:
                        change.previous.pop(tid, None)
        except BaseException:
            change.restore()
            raise
        return change

    def _set_weight(self, handle: DiskGrant, pid: int) -> None:
        """Writes handle.io_weight to pid's cgroup weight file, journaled first; where
        there is none, records why in handle.weight_report."""
        assert handle.io_weight is not None
        files = cgroup_io_weight_files(pid)
        path = files.get("v2") or files.get("v1")
        report: dict[str, Any] = {"requested": handle.io_weight, "process": pid}
        if path is None:
            report["applied"] = False
            report["reason"] = ("no cgroup I/O controller is mounted" if not files else
                                "the process's cgroup has no I/O weight file (the root cgroup has none; "
                                "v1 needs CFQ/BFQ, v2 the io controller enabled)")
            handle.weight_report = report
            return
        previous = read_io_weight(path)
        entry = (self.journal.record(KIND_CGROUP_WEIGHT, path=path, previous=previous, applied=handle.io_weight)
                 if self.journal is not None else None)
        try:
            write_io_weight(path, handle.io_weight)
        except BaseException:
            if entry is not None:
                entry.forget()
            raise
        handle.weight = WeightChange(path, previous, handle.io_weight, entry)
        report.update(applied=True, file=path, previous=previous,
                      effect=io_weight_effect(path, block_device_of(handle.directory)))
        handle.weight_report = report

    def claim(self, handle: DiskGrant, target_process_id: int | None = None) -> DiskClaim:
        with handle.lock:
            if handle.released:
                raise AllocationError("disk: the allocation is released")
            if handle.claimed is not None:
                return handle.claimed
            if handle.io_priority is not None and not handle.priorities:
                try:
                    handle.priorities.append(self._set_priority(target_process_id or 0, handle.io_priority))
                except OSError as exc:
                    raise AllocationError(f"disk: cannot set the I/O priority: {exc}") from exc
            if handle.io_weight is not None and not handle.weight_report:
                try:
                    self._set_weight(handle, target_process_id or os.getpid())
                except OSError as exc:
                    raise AllocationError(f"disk: cannot set the I/O weight: {exc}") from exc
            reserved = handle.reservation.size if handle.reservation is not None else 0
            claim = DiskClaim(handle.mode, handle.directory, reserved,
                              io_priority=None if handle.io_priority is None else format_io_priority(handle.io_priority))
            if handle.mode == "file":
                claim.path, claim.fd = self._hand_over(handle)
            elif handle.mode == "ballast":
                self._release_space(handle)  # the consumer's own writes get it now
            handle.claimed = claim
            return claim

    def _hand_over(self, handle: DiskGrant) -> tuple[str, int]:
        reservation = handle.reservation
        path = os.path.join(handle.directory, handle.name)
        try:
            if reservation.unnamed:
                reservation.link(path)
            else:
                os.link(reservation.path, path)  # no-replace, unlike rename
                os.unlink(reservation.path)
        except FileExistsError as exc:
            raise AllocationError(f"disk: {path} exists; the reservation stays unclaimed") from exc
        fd = reservation.detach()
        handle.reservation = None
        if handle.journal_entry is not None:
            handle.journal_entry.forget()  # the consumer's file now
            handle.journal_entry = None
        return path, fd

    def _release_space(self, handle: DiskGrant) -> None:
        if handle.reservation is not None:
            handle.reservation.release()
            handle.reservation = None
        if handle.journal_entry is not None:
            handle.journal_entry.forget()
            handle.journal_entry = None

    def release(self, handle: DiskGrant) -> None:
        with handle.lock:
            if handle.released:
                return None
            handle.released = True
            try:
                self._release_space(handle)  # unclaimed: the expiry or release removes the file
            finally:
                for change in handle.priorities:
                    try:
                        change.restore()
                    except OSError as exc:
                        log.warning("prealloc: cannot restore the I/O priority of process %d: %s", change.pid, exc)
                handle.priorities.clear()
                if handle.weight is not None:
                    try:
                        handle.weight.restore()
                    except OSError as exc:
                        log.warning("prealloc: cannot restore the I/O weight in %s: %s", handle.weight.path, exc)
                    handle.weight = None
        return None

    def adjust(self, handle: DiskGrant, new_amount: float) -> float:
        with handle.lock:
            if handle.reservation is None:
                raise AllocationError("disk: the space was handed over (or there is none): nothing to resize")
            space = FilesystemSpace.of(handle.directory)
            size = max(1, math.ceil(new_amount * MIB / space.block_size)) * space.block_size
            growth = size - handle.reservation.size
            if growth > 0 and space.available - growth < self.headroom_mib * MIB:
                raise InsufficientResources(f"disk: growing by {growth / MIB:.1f} MiB would leave less than the "
                                            f"{self.headroom_mib:g} MiB headroom")
            try:
                handle.reservation.resize(size)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise InsufficientResources(f"disk: no space to grow to {size / MIB:.1f} MiB") from exc
                raise AllocationError(f"disk: cannot resize: {exc}") from exc
            handle.requested_bytes = size
            return size / MIB

    def describe(self, handle: DiskGrant) -> dict[str, Any]:
        facts: dict[str, Any] = {"mode": handle.mode, "directory": handle.directory}
        reservation = handle.reservation
        if reservation is not None and not reservation.released:
            facts.update(reserved_bytes=reservation.size, allocated_bytes=reservation.allocated_bytes(),
                         unnamed=reservation.unnamed, keep_size=reservation.keep_size,
                         reserve_path=reservation.path)
        if handle.claimed is not None:
            facts.update(claimed=True, path=handle.claimed.path)
        if handle.io_priority is not None:
            facts["io_priority"] = format_io_priority(handle.io_priority)
            facts["io_priority_targets"] = [c.pid for c in handle.priorities]
            facts["io_priority_effect"] = io_priority_effect(handle.directory)
        if handle.weight_report:
            facts["io_weight"] = dict(handle.weight_report)
        return facts


def io_priority_effect(path: str | os.PathLike[str]) -> str:
    """Whether an I/O priority changes anything for I/O under path, said plainly."""
    try:
        return block_device_of(path).priority_effect()
    except OSError as exc:
        return f"unknown: {exc}"
