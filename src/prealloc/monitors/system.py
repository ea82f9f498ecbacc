"""The machine's own resources, read from psutil, /proc and the cgroup files.

:class:`SystemResourceMonitor` reports, in the units of :mod:`prealloc.types`:

MEMORY (MiB)
    total = min(physical RAM, the tightest cgroup memory limit of this process).
    available = min(psutil ``available`` (MemAvailable), the smallest headroom
    ``limit - working set`` over the cgroup and its limited ancestors).
    used = total - available. The working set is the cgroup's usage minus its
    inactive file cache (``memory.current`` - ``inactive_file`` on cgroup v2,
    ``memory.usage_in_bytes`` - ``total_inactive_file`` on v1) — the figure the
    kubelet and ``docker stats`` use, because inactive cache is reclaimed before the
    cgroup's OOM killer fires and does not stand between us and the limit.
    Limits are found through ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` (so
    hybrid hosts with v1 memory and v2 elsewhere work), walking up to the mount root;
    they are looked up once, at construction.

CPU (percent of one core)
    total = 100 x the CPUs in this process's affinity (``sched_getaffinity`` of the
    main thread, read at every sample because the CPU strategy may change it), or less
    where a cgroup CPU bandwidth limit is tighter: 100 x quota / period (``cpu.max`` on
    v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on v1), the tightest over the
    cgroup and its ancestors, read at every sample. Under such a limit used is capped at
    total (the busy share below is machine-wide, so it errs towards less available).
    used = the sum over those CPUs of their busy share (``/proc/stat``: everything but
    idle and iowait, as psutil counts it) over the last ``rate_window`` seconds or
    more. available = total - used. ``/proc/stat`` is read rather than psutil's
    per-CPU list because that list skips offline CPUs, so its index is not the CPU id
    that the affinity mask names. The first sample measures from a priming snapshot
    taken at construction; if not even one clock tick has passed since, it falls back
    to the 1-minute load average (runnable tasks, scaled to the affinity's share of
    the machine and capped at its size).

DISK_IO (MiB)
    ``psutil.disk_usage(disk_path)``: total = the file system's size, available =
    the space an unprivileged writer can still use (``f_bavail``), used = the
    blocks in use. used + available can fall short of total: the rest is reserved
    (for root, or by the file system).

NETWORK_BANDWIDTH (Mbit/s)
    total = the sum of the link speeds of the interfaces that are up and not loopback,
    skipping those whose speed is unknown (0, common on virtual NICs), or
    ``network_capacity_mbit`` where given. If no speed is known and none was given,
    total = 0 and available = 0: an unknown capacity is not reported as free. used =
    the traffic of those interfaces over the last ``rate_window`` seconds or more,
    per interface the busier of receive and transmit (links are full duplex), summed.

CACHE_SPACE (MiB)
    Room for page cache. total = MEMORY's total. available = min(free + buffers +
    cached, MEMORY's available): new cache can use free pages and evict old cache,
    within the cgroup limit. used = the page cache now (buffers + cached, psutil's
    ``cached`` including reclaimable slab). Unlike the other types, used + available
    may exceed total, because an evictable page of cache is both.

Every availability carries ``pressure``: the PSI ``some avg10`` (percent of the last
10 s in which some task stalled) of memory (MEMORY, CACHE_SPACE), cpu (CPU) or io
(DISK_IO), where the kernel reports PSI; NETWORK_BANDWIDTH has none.

Change events: PSI triggers (see :mod:`.pressure`) on memory, cpu and io wake the
watcher when stall time passes ``pressure_stall_us`` within ``pressure_window_us``;
where they cannot be made (see :meth:`event_source_status`) and for the network,
changes are found by sampling every ``sample_interval`` seconds.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Mapping, TypeVar

import psutil

from ..types import ResourceAvailability, ResourceType
from .base import EventSource, ResourceMonitor, availability_from, read_small_file
from .pressure import (
    UNPRIVILEGED_WINDOW_MULTIPLE_US,
    WINDOW_MAX_US,
    WINDOW_MIN_US,
    PressureTrigger,
    read_pressure,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (~2**63); anything this large
# is no limit on any machine that exists
_UNLIMITED_BYTES = 2**60

_PRESSURE_RESOURCE: Mapping[ResourceType, str] = {
    ResourceType.MEMORY: "memory",
    ResourceType.CACHE_SPACE: "memory",
    ResourceType.CPU: "cpu",
    ResourceType.DISK_IO: "io",
}

_SUPPORTED = frozenset({ResourceType.MEMORY, ResourceType.CPU, ResourceType.DISK_IO,
                        ResourceType.NETWORK_BANDWIDTH, ResourceType.CACHE_SPACE})


# ---------------------------------------------------------------------------------------
# cgroup memory limits


@dataclass(frozen=True, slots=True)
class CgroupMemoryLevel:
    """One cgroup directory that carries a memory limit, and what it reads now."""

    path: Path
    version: int
    limit_bytes: int
    working_set_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return max(0, self.limit_bytes - self.working_set_bytes)


class CgroupMemory:
    """The memory cgroup of this process, v2 or v1, and the limited levels above it."""

    def __init__(self, version: int, directories: list[Path]) -> None:
        self.version = version
        self.directories = directories  # from the process's own cgroup up to the mount root

    @classmethod
    def discover(cls, proc_self: Path = Path("/proc/self")) -> CgroupMemory | None:
        """The memory cgroup of this process; None where there is none to read."""
        found = _controller_directories("memory", ("memory.max", "memory.current"), proc_self)
        return cls(*found) if found is not None else None

    def limited_levels(self) -> list[CgroupMemoryLevel]:
        """The levels with a real limit, as they read now (a level that cannot be read
        is left out: it may have been removed since discovery)."""
        levels = []
        for directory in self.directories:
            try:
                level = self._read_level(directory)
            except (OSError, ValueError):
                continue
            if level is not None:
                levels.append(level)
        return levels

    def _read_level(self, directory: Path) -> CgroupMemoryLevel | None:
        if self.version == 2:
            limit_file, usage_file, inactive_key = "memory.max", "memory.current", "inactive_file"
        else:
            limit_file, usage_file, inactive_key = "memory.limit_in_bytes", "memory.usage_in_bytes", \
                "total_inactive_file"
        try:
            limit_text = read_small_file(directory / limit_file).strip()
        except FileNotFoundError:
            return None  # the v2 root has no memory.max
        if limit_text == "max":
            return None
        limit = int(limit_text)
        if limit >= _UNLIMITED_BYTES:
            return None
        usage = int(read_small_file(directory / usage_file))
        inactive_file = read_memory_stat(directory / "memory.stat").get(inactive_key, 0)
        return CgroupMemoryLevel(path=directory, version=self.version, limit_bytes=limit,
                                 working_set_bytes=max(0, usage - inactive_file))


def _meminfo_total_available() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo, read directly (a quarter of
    psutil.virtual_memory's cost, which parses every field); psutil's estimate where the
    kernel has no MemAvailable (before 3.14) or the file cannot be read."""
    total = available = -1
    try:
        for line in read_small_file("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if total < 0 or available < 0:
        virtual = psutil.virtual_memory()
        return virtual.total, virtual.available
    return total, available


def read_memory_stat(path: Path) -> dict[str, int]:
    """A cgroup memory.stat file as {key: value}; {} if unreadable."""
    try:
        text = read_small_file(path)
    except OSError:
        return {}
    stats: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            stats[key] = int(value)
        except ValueError:
            continue
    return stats


def _controller_directories(controller: str, v2_files: tuple[str, ...],
                            proc_self: Path = Path("/proc/self")) -> tuple[int, list[Path]] | None:
    """(version, directories from this process's cgroup of `controller` up to the mount
    root), found through /proc/self/cgroup and /proc/self/mountinfo; None where there is
    none to read. v1 first: on hybrid hosts the controller is on v1 and the v2 hierarchy
    (mounted at .../unified) holds none of its files, which `v2_files` checks."""
    try:
        membership = (proc_self / "cgroup").read_text()
        mountinfo = (proc_self / "mountinfo").read_text()
    except OSError:
        return None
    v1_path: str | None = None
    v2_path: str | None = None
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path
    v1_mount: tuple[str, str] | None = None
    v2_mount: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, post = before.split(), after.split()
        if len(fields) < 5 or len(post) < 3:
            continue
        root, mount_point = _unescape_mount(fields[3]), _unescape_mount(fields[4])
        fstype, super_options = post[0], post[2].split(",")
        if fstype == "cgroup" and controller in super_options and v1_mount is None:
            v1_mount = (root, mount_point)
        elif fstype == "cgroup2" and v2_mount is None:
            v2_mount = (root, mount_point)
    if v1_path is not None and v1_mount is not None:
        return 1, _levels(v1_mount, v1_path)
    if v2_path is not None and v2_mount is not None:
        directories = _levels(v2_mount, v2_path)
        if any((d / name).exists() for d in directories for name in v2_files):
            return 2, directories
    return None


class CgroupCpu:
    """The cpu cgroup of this process, v2 or v1: its CPU bandwidth limit (a quota of CPU
    time per period, set by docker --cpus, Kubernetes limits, systemd CPUQuota)."""

    def __init__(self, version: int, directories: list[Path]) -> None:
        self.version = version
        self.directories = directories

    @classmethod
    def discover(cls, proc_self: Path = Path("/proc/self")) -> CgroupCpu | None:
        found = _controller_directories("cpu", ("cpu.max",), proc_self)
        return cls(*found) if found is not None else None

    def limit_cpus(self) -> float | None:
        """The tightest quota / period over this cgroup and its ancestors, in CPUs (1.5 =
        one and a half CPUs of time); None where no level is limited. Read at each call:
        limits change at run time. A level that cannot be read is left out."""
        tightest: float | None = None
        for directory in self.directories:
            try:
                if self.version == 2:
                    quota_text, _, period_text = (directory / "cpu.max").read_text().strip().partition(" ")
                    if quota_text == "max":
                        continue
                    quota, period = int(quota_text), int(period_text or 100_000)
                else:
                    quota = int((directory / "cpu.cfs_quota_us").read_text())
                    period = int((directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota <= 0 or period <= 0:
                continue  # -1: no limit (v1)
            cpus = quota / period
            tightest = cpus if tightest is None else min(tightest, cpus)
        return tightest


def _levels(mount: tuple[str, str], cgroup_path: str) -> list[Path]:
    mount_root, mount_point = mount
    relative = cgroup_path
    # in a cgroup namespace, or when a container mounts its own subtree, the mount's
    # root is a prefix of (or equal to) the path /proc/self/cgroup names
    if mount_root != "/" and (cgroup_path == mount_root or cgroup_path.startswith(mount_root + "/")):
        relative = cgroup_path[len(mount_root):]
    base = Path(mount_point)
    own = base / relative.lstrip("/")
    if not own.is_dir():
        # the path is outside what is mounted here (a namespace root shown as "/..");
        # the mount point itself is the closest cgroup we can see
        own = base
    directories = [own]
    current = own
    while current != base and base in current.parents:
        current = current.parent
        directories.append(current)
    return directories


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


# ---------------------------------------------------------------------------------------
# rates from cumulative counters

CounterT = TypeVar("CounterT")


class _RateWindow(Generic[CounterT]):
    """Keeps timestamped counter snapshots so that a rate is always measured over at
    least ``min_seconds`` when that much history exists: callers reading availability
    in a tight loop would otherwise measure over microseconds (zero clock ticks, or
    one packet made into a huge rate)."""

    def __init__(self, read: Callable[[], CounterT], min_seconds: float) -> None:
        self._read = read
        self._min_seconds = min_seconds
        self._snapshots: list[tuple[float, CounterT]] = [(time.monotonic(), read())]

    def advance(self) -> tuple[float, CounterT, CounterT]:
        """(seconds elapsed, the older snapshot, the new one)."""
        now, current = time.monotonic(), self._read()
        # the newest snapshot at least min_seconds old; the oldest when none is
        reference_index = 0
        for index, (taken_at, _) in enumerate(self._snapshots):
            if now - taken_at >= self._min_seconds:
                reference_index = index
        reference_time, reference = self._snapshots[reference_index]
        kept = self._snapshots[reference_index:]
        # keeping one snapshot per quarter window bounds the list (and this scan) to a
        # handful of entries however often availability is read
        if now - kept[-1][0] >= self._min_seconds / 4:
            kept.append((now, current))
        self._snapshots = kept
        return now - reference_time, reference, current


@dataclass(frozen=True, slots=True)
class _CpuTicks:
    busy: int
    total: int


def _read_proc_stat() -> dict[int, _CpuTicks]:
    ticks: dict[int, _CpuTicks] = {}
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return _psutil_cpu_ticks()
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *values = line.split()
        numbers = [int(v) for v in values]
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time
        # is already inside user/nice, so it is left out of the total
        idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
        total = sum(numbers[:8])
        ticks[int(name[3:])] = _CpuTicks(busy=total - idle, total=total)
    return ticks


def _psutil_cpu_ticks() -> dict[int, _CpuTicks]:
    # only without /proc/stat; psutil's list is indexed by position, which is the
    # CPU id when no CPU is offline
    ticks: dict[int, _CpuTicks] = {}
    for cpu_id, times in enumerate(psutil.cpu_times(percpu=True)):
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        ticks[cpu_id] = _CpuTicks(busy=round((total - idle) * 100), total=round(total * 100))
    return ticks


def _network_interfaces() -> tuple[list[str], float]:
    """(the up, non-loopback interfaces; the sum of their known speeds in Mbit/s)."""
    names: list[str] = []
    capacity = 0.0
    for name, stats in psutil.net_if_stats().items():
        flags = getattr(stats, "flags", "")
        loopback = "loopback" in flags.split(",") if flags else name == "lo"
        if not stats.isup or loopback:
            continue
        names.append(name)
        if stats.speed > 0:
            capacity += stats.speed
    return names, capacity


def _network_counters() -> dict[str, tuple[int, int]]:
    return {name: (counters.bytes_recv, counters.bytes_sent)
            for name, counters in psutil.net_io_counters(pernic=True).items()}


# ---------------------------------------------------------------------------------------
# the monitor


class SystemResourceMonitor(ResourceMonitor):
    """MEMORY, CPU, DISK_IO, NETWORK_BANDWIDTH and CACHE_SPACE of this machine, as this
    process may use them; see the module docstring for what each number means."""

    def __init__(
        self,
        disk_path: str | os.PathLike[str] = "/",
        sample_interval: float = 1.0,
        *,
        change_threshold: float = 0.01,
        rate_window: float = 0.5,
        network_capacity_mbit: float | None = None,
        pressure_triggers: bool = True,
        pressure_stall_us: int = 100_000,
        pressure_window_us: int = UNPRIVILEGED_WINDOW_MULTIPLE_US,
    ) -> None:
        super().__init__(sample_interval=sample_interval, change_threshold=change_threshold)
        self.disk_path = os.fspath(disk_path)
        if not os.path.exists(self.disk_path):
            raise ValueError(f"disk_path {self.disk_path!r} does not exist")
        if isinstance(rate_window, bool) or not isinstance(rate_window, (int, float)) or not rate_window > 0:
            raise ValueError(f"rate_window must be a number of seconds > 0, not {rate_window!r}")
        if network_capacity_mbit is not None and (
                isinstance(network_capacity_mbit, bool) or not isinstance(network_capacity_mbit, (int, float))
                or not 0 < network_capacity_mbit < float("inf")):
            raise ValueError(f"network_capacity_mbit must be a finite number > 0, not {network_capacity_mbit!r}")
        if not isinstance(pressure_window_us, int) or not WINDOW_MIN_US <= pressure_window_us <= WINDOW_MAX_US:
            raise ValueError(f"pressure_window_us must be an int in [{WINDOW_MIN_US}, {WINDOW_MAX_US}], "
                             f"not {pressure_window_us!r}")
        if not isinstance(pressure_stall_us, int) or not 0 < pressure_stall_us <= pressure_window_us:
            raise ValueError(f"pressure_stall_us must be an int in (0, pressure_window_us], "
                             f"not {pressure_stall_us!r}")
        self.network_capacity_mbit = None if network_capacity_mbit is None else float(network_capacity_mbit)
        self.pressure_triggers = pressure_triggers
        self.pressure_stall_us = pressure_stall_us
        self.pressure_window_us = pressure_window_us
        self.cgroup_memory = CgroupMemory.discover()
        self.cgroup_cpu = CgroupCpu.discover()
        if self.cgroup_memory is not None:
            log.debug("memory cgroup v%d at %s", self.cgroup_memory.version, self.cgroup_memory.directories[0])
        # the rate windows are shared by the watcher and callers' threads
        self._rate_lock = threading.Lock()
        self._cpu_window = _RateWindow(_read_proc_stat, float(rate_window))
        self._network_window = _RateWindow(_network_counters, float(rate_window))

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return _SUPPORTED

    # -- sampling ----------------------------------------------------------------------

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        if resource_type == ResourceType.MEMORY:
            availability = self._memory()
        elif resource_type == ResourceType.CPU:
            availability = self._cpu()
        elif resource_type == ResourceType.DISK_IO:
            availability = self._disk()
        elif resource_type == ResourceType.NETWORK_BANDWIDTH:
            availability = self._network()
        else:
            availability = self._cache_space()
        pressure_resource = _PRESSURE_RESOURCE.get(resource_type)
        if pressure_resource is not None:
            reading = read_pressure(pressure_resource)
            if reading is not None:
                availability.pressure = reading.some.avg10
        return availability

    def memory_bytes(self) -> tuple[int, int]:
        """(total, available) memory in bytes, cgroup limits applied."""
        total, available = _meminfo_total_available()
        if self.cgroup_memory is not None:
            for level in self.cgroup_memory.limited_levels():
                total = min(total, level.limit_bytes)
                available = min(available, level.headroom_bytes)
        return total, min(available, total)

    def _memory(self) -> ResourceAvailability:
        total, available = self.memory_bytes()
        return availability_from(ResourceType.MEMORY, total / MIB, available / MIB)

    def _cache_space(self) -> ResourceAvailability:
        virtual = psutil.virtual_memory()
        total, memory_available = self.memory_bytes()
        page_cache = virtual.buffers + virtual.cached
        room = min(virtual.free + page_cache, memory_available)
        return availability_from(ResourceType.CACHE_SPACE, total / MIB, room / MIB, used=page_cache / MIB)

    def _cpu(self) -> ResourceAvailability:
        # the process's (main thread's) mask: pid 0 would be the calling thread's
        cpus = os.sched_getaffinity(os.getpid())
        total = 100.0 * len(cpus)
        with self._rate_lock:
            _, before, after = self._cpu_window.advance()
        busy_percent = 0.0
        ticks_seen = False
        for cpu in cpus:
            old, new = before.get(cpu), after.get(cpu)
            if old is None or new is None:
                continue
            elapsed_ticks = new.total - old.total
            if elapsed_ticks <= 0:
                continue
            ticks_seen = True
            busy_percent += 100.0 * min(1.0, max(0.0, (new.busy - old.busy) / elapsed_ticks))
        if not ticks_seen:
            busy_percent = self._cpu_from_load_average(len(cpus))
        limit = self.cgroup_cpu.limit_cpus() if self.cgroup_cpu is not None else None
        if limit is not None and 100.0 * limit < total:
            total = 100.0 * limit
            busy_percent = min(busy_percent, total)
        return availability_from(ResourceType.CPU, total, total - busy_percent)

    @staticmethod
    def _cpu_from_load_average(cpus_in_affinity: int) -> float:
        try:
            load_1min = os.getloadavg()[0]
        except OSError:
            return 0.0
        machine_cpus = os.cpu_count() or cpus_in_affinity
        busy_cpus = min(float(cpus_in_affinity), load_1min * cpus_in_affinity / machine_cpus)
        return 100.0 * busy_cpus

    def _disk(self) -> ResourceAvailability:
        usage = psutil.disk_usage(self.disk_path)
        return availability_from(ResourceType.DISK_IO, usage.total / MIB, usage.free / MIB, used=usage.used / MIB)

    def _network(self) -> ResourceAvailability:
        interfaces, known_capacity = _network_interfaces()
        capacity = self.network_capacity_mbit if self.network_capacity_mbit is not None else known_capacity
        with self._rate_lock:
            elapsed, before, after = self._network_window.advance()
        used_mbit = 0.0
        if elapsed > 0:
            for name in interfaces:
                old, new = before.get(name), after.get(name)
                if old is None or new is None:
                    continue
                # counters reset when an interface goes down and up: no negative rates
                received, sent = max(0, new[0] - old[0]), max(0, new[1] - old[1])
                used_mbit += max(received, sent) * 8 / 1e6 / elapsed
        return availability_from(ResourceType.NETWORK_BANDWIDTH, capacity, capacity - used_mbit, used=used_mbit)

    # -- change events -----------------------------------------------------------------

    def _event_source_name(self, resource_type: ResourceType) -> str | None:
        return _PRESSURE_RESOURCE.get(resource_type) if self.pressure_triggers else None

    def _open_event_source(self, name: str) -> EventSource:
        return PressureTrigger(name, self.pressure_stall_us, self.pressure_window_us)
