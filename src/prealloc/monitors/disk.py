"""DISK_IO availability and the facts about a disk that decide whether I/O priorities do
anything.

- Free space per filesystem: ``statvfs`` (f_bavail, what an unprivileged writer gets),
  through the native ``pa_disk_space``.
- Device utilisation and queue depth: ``/proc/diskstats`` (field 12, I/Os in flight;
  field 13, milliseconds the device was busy — the utilisation between two samples is
  the busy time over the wall time, as iostat's %util).
- I/O pressure: PSI ``/proc/pressure/io`` (some avg10), and its trigger as the kernel
  event source.
- The block device under a path (st_dev -> /sys/dev/block/MAJ:MIN, a partition's parent
  for its queue) and its scheduler (``/sys/block/DEV/queue/scheduler``): ``none`` and
  ``kyber`` ignore I/O priorities, ``mq-deadline`` honours the class (real-time before
  best-effort before idle), ``bfq`` the class and the level.
- The cgroup I/O weight files that exist for a process (v2 ``io.weight``, v1
  ``blkio.weight`` / ``blkio.bfq.weight``).

Availability for DISK_IO (MiB) is the free space of the monitored path's filesystem less
a headroom (``headroom_mib``, default 64 MiB, plus ``headroom_fraction`` of the
filesystem, default 2 %): space the preallocator must leave to everyone else.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _native
from ..types import ResourceAvailability, ResourceType
from .base import EventSource, ResourceMonitor, availability_from
from .pressure import PressureTrigger, read_pressure

MIB = 1024 * 1024

__all__ = ["BlockDevice", "DeviceStats", "DiskMonitor", "FilesystemSpace", "block_device_of",
           "cgroup_io_weight_files", "io_weight_effect", "read_diskstats", "read_io_weight", "write_io_weight"]


@dataclass(frozen=True, slots=True)
class FilesystemSpace:
    """statvfs of one path, in bytes."""

    path: str
    total: int
    free: int
    available: int
    block_size: int
    device: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FilesystemSpace:
        total, free, available, block_size, device = _native.disk_space(path)
        return cls(os.fspath(path), total, free, available, block_size, device)


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """One line of /proc/diskstats."""

    name: str
    reads_completed: int
    sectors_read: int
    writes_completed: int
    sectors_written: int
    in_flight: int  # the queue depth now
    io_ticks_ms: int  # time the device had I/O in flight


def read_diskstats(path: str | os.PathLike[str] = "/proc/diskstats") -> dict[str, DeviceStats]:
    stats = {}
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) < 14:
            continue
        stats[f[2]] = DeviceStats(f[2], int(f[3]), int(f[5]), int(f[7]), int(f[9]), int(f[11]), int(f[12]))
    return stats


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """The block device a path lives on, and its I/O scheduler."""

    name: str | None  # e.g. "vda", None for a filesystem on no block device (tmpfs, overlay)
    major: int
    minor: int
    scheduler: str | None  # the active one ("none", "mq-deadline", "bfq", ...), None if unknown
    schedulers: tuple[str, ...]

    @property
    def honours_priority_class(self) -> bool:
        return self.scheduler in ("mq-deadline", "bfq", "cfq")

    @property
    def honours_priority_level(self) -> bool:
        return self.scheduler in ("bfq", "cfq")

    def priority_effect(self) -> str:
        """Said plainly, for describe() and the benchmark."""
        if self.name is None:
            return (f"no effect: the filesystem (st_dev {self.major}:{self.minor}) is on no block device, "
                    "so no I/O scheduler sees the priority")
        if self.scheduler is None:
            return f"unknown: {self.name} reports no scheduler"
        if self.honours_priority_level:
            return f"effective: {self.name} uses {self.scheduler}, which honours the class and the level"
        if self.honours_priority_class:
            return (f"class only: {self.name} uses {self.scheduler}, which serves real-time before "
                    "best-effort before idle but ignores the level")
        return f"no effect: {self.name} uses {self.scheduler}, which ignores I/O priorities"


def _device_dir(major: int, minor: int) -> Path | None:
    link = Path(f"/sys/dev/block/{major}:{minor}")
    if not link.exists():
        return None
    real = link.resolve()
    if (real / "partition").exists():
        real = real.parent  # a partition's queue is its disk's
    return real


def block_device_of(path: str | os.PathLike[str]) -> BlockDevice:
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    directory = _device_dir(major, minor)
    if directory is None:
        return BlockDevice(None, major, minor, None, ())
    try:
        text = (directory / "queue" / "scheduler").read_text().split()
    except OSError:
        return BlockDevice(directory.name, major, minor, None, ())
    active = next((s.strip("[]") for s in text if s.startswith("[")), None)
    return BlockDevice(directory.name, major, minor, active, tuple(s.strip("[]") for s in text))


def _cgroup_mounts() -> dict[str, Path]:
    """'2' -> the cgroup2 mount, 'blkio' -> the v1 blkio mount, where mounted."""
    mounts: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        if rfields[0] == "cgroup2":
            mounts.setdefault("2", Path(fields[4]))
        elif rfields[0] == "cgroup" and "blkio" in rfields[2].split(","):
            mounts.setdefault("blkio", Path(fields[4]))
    return mounts


def cgroup_io_weight_files(pid: int) -> dict[str, str | None]:
    """For the cgroup of pid: the I/O weight file of each controller that is mounted
    ({"v2": path or None, "v1": path or None}); None where the controller is mounted but
    offers no weight here (v1 blkio.weight needs CFQ/BFQ; v2 io.weight needs the io
    controller enabled for the cgroup). Keys are absent where nothing is mounted."""
    found: dict[str, str | None] = {}
    mounts = _cgroup_mounts()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hierarchy, controllers, cgroup_path = line.split(":", 2)
        rel = cgroup_path.lstrip("/")
        if hierarchy == "0" and "2" in mounts:
            candidate = mounts["2"] / rel / "io.weight"
            found["v2"] = str(candidate) if candidate.exists() else None
        elif "blkio" in controllers.split(",") and "blkio" in mounts:
            found["v1"] = None
            for name in ("blkio.weight", "blkio.bfq.weight"):
                candidate = mounts["blkio"] / rel / name
                if candidate.exists():
                    found["v1"] = str(candidate)
                    break
    return found


def read_io_weight(path: str | os.PathLike[str]) -> int:
    """The default weight in a cgroup weight file: v2 io.weight reads "default N" (then
    per-device lines), v1 blkio.weight / blkio.bfq.weight a number (bfq: "default N" too
    on newer kernels)."""
    text = Path(path).read_text().split()
    if text and text[0] == "default":
        return int(text[1])
    return int(text[0])


def write_io_weight(path: str | os.PathLike[str], weight: int) -> None:
    with open(path, "w") as f:
        f.write(f"{int(weight)}\n")


def io_weight_effect(path: str, device: BlockDevice) -> str:
    """Whether a weight in `path` changes anything for I/O on device, said plainly."""
    name = os.path.basename(path)
    where = device.name or "no block device"
    if device.name is None:
        return f"no effect: the filesystem is on {where}"
    if name == "blkio.bfq.weight" or name == "io.bfq.weight":
        return (f"effective: {where} uses bfq" if device.scheduler == "bfq" else
                f"no effect: {name} is bfq's weight and {where} uses {device.scheduler}")
    if name == "io.weight":
        return (f"effective only with the io.cost controller or bfq: {where} uses {device.scheduler}"
                if device.scheduler != "bfq" else f"effective: {where} uses bfq")
    return f"no effect: {name} is CFQ's weight and {where} uses {device.scheduler}"


class DiskMonitor(ResourceMonitor):
    """DISK_IO: free space of one filesystem (the one holding `path`), less a headroom,
    with PSI I/O pressure; plus device statistics on demand."""

    def __init__(self, path: str | os.PathLike[str] = ".", *, headroom_mib: float = 64.0,
                 headroom_fraction: float = 0.02, pressure_stall_us: int = 150_000,
                 pressure_window_us: int = 2_000_000, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise ValueError(f"path {self.path!r} is not a directory")
        if isinstance(headroom_mib, bool) or not isinstance(headroom_mib, (int, float)) or not 0 <= headroom_mib:
            raise ValueError(f"headroom_mib must be a number >= 0, not {headroom_mib!r}")
        if isinstance(headroom_fraction, bool) or not isinstance(headroom_fraction, (int, float)) \
                or not 0 <= headroom_fraction < 1:
            raise ValueError(f"headroom_fraction must be in [0, 1), not {headroom_fraction!r}")
        self.headroom_mib = float(headroom_mib)
        self.headroom_fraction = float(headroom_fraction)
        self.pressure_stall_us = pressure_stall_us
        self.pressure_window_us = pressure_window_us
        self._last_diskstats: tuple[float, dict[str, DeviceStats]] | None = None

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({ResourceType.DISK_IO})

    def headroom_bytes(self, total_bytes: int) -> int:
        return int(self.headroom_mib * MIB + self.headroom_fraction * total_bytes)

    def availability_of(self, path: str | os.PathLike[str]) -> ResourceAvailability:
        """DISK_IO availability of the filesystem holding path (a request's directory)."""
        space = FilesystemSpace.of(path)
        usable = max(0, space.available - self.headroom_bytes(space.total))
        availability = availability_from(ResourceType.DISK_IO, space.total / MIB, usable / MIB,
                                         used=(space.total - space.free) / MIB)
        reading = read_pressure("io")
        if reading is not None:
            availability.pressure = reading.some.avg10
        return availability

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        return self.availability_of(self.path)

    def _event_source_name(self, resource_type: ResourceType) -> str | None:
        return "io"

    def _open_event_source(self, name: str) -> EventSource:
        return PressureTrigger(name, self.pressure_stall_us, self.pressure_window_us)

    def device(self, path: str | os.PathLike[str] | None = None) -> BlockDevice:
        return block_device_of(path if path is not None else self.path)

    def device_utilisation(self, device: str | None = None) -> tuple[float | None, int]:
        """(utilisation since the previous call, in [0, 1] — None on the first call —,
        I/Os in flight now) for device (default: the one under path)."""
        name = device or self.device().name
        if name is None:
            raise ValueError(f"{self.path} is on no block device")
        now, stats = time.monotonic(), read_diskstats()
        if name not in stats:
            raise ValueError(f"no device {name!r} in /proc/diskstats")
        previous, self._last_diskstats = self._last_diskstats, (now, stats)
        if previous is None or name not in previous[1] or now <= previous[0]:
            return None, stats[name].in_flight
        busy_ms = stats[name].io_ticks_ms - previous[1][name].io_ticks_ms
        return min(1.0, max(0.0, busy_ms / ((now - previous[0]) * 1000.0))), stats[name].in_flight
