"""Monitors against what the kernel says (/proc/meminfo, cgroup files, statvfs,
/proc/stat, /sys/class/net, /proc/pressure), PSI parsing and triggers, and the
subscription machinery (notify, failing callbacks, unsubscribe, the watcher's life)."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import prealloc
from prealloc.monitors import (
    CgroupCpu,
    PressureTrigger,
    PressureTriggerUnavailable,
    ResourceMonitor,
    SystemResourceMonitor,
    parse_pressure,
    read_pressure,
)
from prealloc.monitors.base import EventSource
from prealloc.types import ResourceAvailability, ResourceType, SubscriptionHandle

MIB = 1024 * 1024
WAIT = 20.0  # seconds to wait for an event that should come at once; a bound, not a measurement
HAS_PSI = Path("/proc/pressure").is_dir()
NO_PSI_REASON = "this kernel has no /proc/pressure (CONFIG_PSI off, or not Linux)"


# ---------------------------------------------------------------------------------------
# the operating system's view, read here independently of the library


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def own_memory_cgroup() -> tuple[int, Path, Path] | None:
    """(cgroup version, this process's memory cgroup directory, the hierarchy's mount point)."""
    membership = Path("/proc/self/cgroup").read_text().splitlines()
    mounts = [line.split(" - ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for line in membership:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            for before, after in mounts:
                fields, post = before.split(), after.split()
                if post[0] == "cgroup" and "memory" in post[2].split(","):
                    mount = Path(fields[4])
                    directory = mount / path.lstrip("/")
                    return 1, (directory if directory.is_dir() else mount), mount
    for line in membership:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            for before, after in mounts:
                fields, post = before.split(), after.split()
                if post[0] == "cgroup2":
                    mount = Path(fields[4])
                    directory = mount / path.lstrip("/")
                    directory = directory if directory.is_dir() else mount
                    if (directory / "memory.current").exists():
                        return 2, directory, mount
    return None


def cgroup_limit_and_headroom() -> tuple[float, float]:
    """(tightest memory limit, smallest limit - working set) in bytes over this
    process's cgroup and its ancestors; (inf, inf) where nothing is limited."""
    found = own_memory_cgroup()
    limit, headroom = float("inf"), float("inf")
    if found is None:
        return limit, headroom
    version, directory, mount = found
    names = ("memory.max", "memory.current", "inactive_file") if version == 2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    while True:
        limit_file = directory / names[0]
        if limit_file.exists() and limit_file.read_text().strip() != "max":
            level_limit = int(limit_file.read_text())
            if level_limit < 2**60:
                stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
                working_set = int((directory / names[1]).read_text()) - int(stat.get(names[2], 0))
                limit = min(limit, level_limit)
                headroom = min(headroom, level_limit - working_set)
        if directory == mount:
            return limit, headroom
        directory = directory.parent


def proc_stat_busy_total() -> dict[int, tuple[int, int]]:
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and not line.startswith("cpu "):
            name, *values = line.split()
            numbers = [int(v) for v in values[:8]]
            ticks[int(name[3:])] = (sum(numbers) - numbers[3] - numbers[4], sum(numbers))
    return ticks


def busy_percent_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                         cpus: set[int]) -> float:
    busy = 0.0
    for cpu in cpus:
        elapsed = after[cpu][1] - before[cpu][1]
        if elapsed > 0:
            busy += 100.0 * (after[cpu][0] - before[cpu][0]) / elapsed
    return busy


@pytest.fixture
def monitor() -> Iterator[SystemResourceMonitor]:
    with SystemResourceMonitor() as system_monitor:
        yield system_monitor


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prealloc-monitor-")]


# ---------------------------------------------------------------------------------------
# memory


def test_memory_agrees_with_meminfo_and_the_cgroup_limit(monitor: SystemResourceMonitor) -> None:
    limit, headroom = cgroup_limit_and_headroom()
    available_before = meminfo_kib("MemAvailable") * 1024
    availability = monitor.get_resource_availability(ResourceType.MEMORY)
    available_after = meminfo_kib("MemAvailable") * 1024
    headroom_after = cgroup_limit_and_headroom()[1]

    assert availability.resource_type is ResourceType.MEMORY
    assert availability.total == pytest.approx(min(meminfo_kib("MemTotal") * 1024, limit) / MIB, abs=1.0)
    # other processes move memory between our reads: bracket, with a 64 MiB allowance
    low = min(available_before, available_after, headroom, headroom_after) / MIB - 64
    high = min(max(available_before, available_after), max(headroom, headroom_after)) / MIB + 64
    assert low <= availability.available <= high
    assert availability.used == pytest.approx(availability.total - availability.available)


CHILD_IN_CGROUP = r"""
import json, os, sys
cgroup, version = sys.argv[1], int(sys.argv[2])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
ballast = bytearray(b"\x01") * (64 << 20)  # charged to the new cgroup
from prealloc.monitors import SystemResourceMonitor
from prealloc.types import ResourceType
monitor = SystemResourceMonitor()
memory = monitor.get_resource_availability(ResourceType.MEMORY)
names = ("memory.max", "memory.current", "inactive_file") if version == 2 else \
    ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
read = lambda name: open(os.path.join(cgroup, name)).read()
stat = dict(line.split() for line in read("memory.stat").splitlines())
print(json.dumps({"total": memory.total, "available": memory.available,
                  "limit": int(read(names[0])), "usage": int(read(names[1])),
                  "inactive_file": int(stat.get(names[2], 0))}))
"""


def run_in_child_memory_cgroup(script: str, limit: int) -> tuple[int, dict]:
    """Runs script (argv: the cgroup directory and the cgroup version) in a child memory
    cgroup of this process's, limited to limit bytes; returns (version, its JSON output).
    Skips where no such cgroup can be made (unprivileged, no memory controller)."""
    found = own_memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup is visible to this process")
    version, parent, _ = found
    child = parent / f"prealloc-test-{uuid.uuid4().hex[:8]}"
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    try:
        child.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a child memory cgroup under {parent}: {error}")
    try:
        try:
            (child / limit_file).write_text(str(limit))
        except OSError as error:
            pytest.skip(f"cannot set {limit_file} in {child}: {error}")
        env = dict(os.environ, PYTHONPATH=str(Path(prealloc.__file__).parents[1]))
        result = subprocess.run([sys.executable, "-c", script, str(child), str(version)],
                                capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0 and "cgroup.procs" in result.stderr:
            pytest.skip(f"cannot move a process into {child}: {result.stderr.strip()[-300:]}")
        assert result.returncode == 0, result.stderr
        return version, json.loads(result.stdout)
    finally:
        child.rmdir()  # the child has exited, so the cgroup is empty


def test_memory_total_is_the_limit_of_a_cgroup_the_process_runs_in() -> None:
    _, seen = run_in_child_memory_cgroup(CHILD_IN_CGROUP, 256 * MIB)
    assert seen["limit"] == 256 * MIB
    assert seen["total"] == pytest.approx(256.0)
    expected_available = (seen["limit"] - (seen["usage"] - seen["inactive_file"])) / MIB
    assert seen["available"] == pytest.approx(expected_available, abs=8.0)
    assert seen["available"] <= 256 - 64  # the 64 MiB ballast counts against the limit


CHILD_TOUCHES_256_MIB = r"""
import json, os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
from prealloc.monitors import SystemResourceMonitor
from prealloc.types import ResourceType
monitor = SystemResourceMonitor()
before = monitor.get_resource_availability(ResourceType.MEMORY).available
ballast = bytearray(b"") * (256 << 20)  # written, so every page is faulted in
after = monitor.get_resource_availability(ResourceType.MEMORY).available
del ballast
freed = monitor.get_resource_availability(ResourceType.MEMORY).available
print(json.dumps({"before": before, "after": after, "freed": freed}))
"""


def test_touching_256_mib_lowers_available_memory_by_that() -> None:
    # In a memory cgroup of its own with a 1 GiB limit, available is that cgroup's
    # headroom, which only this child moves (machine-wide MemAvailable moves with every
    # other process of the machine, so it is no place to look for our 256 MiB).
    if meminfo_kib("MemAvailable") * 1024 < 2 * 1024 * MIB:
        pytest.skip("under 2 GiB available: a 1 GiB cgroup limit would not be the binding figure")
    _, seen = run_in_child_memory_cgroup(CHILD_TOUCHES_256_MIB, 1024 * MIB)
    assert seen["before"] - seen["after"] == pytest.approx(256, abs=8), seen
    assert seen["freed"] - seen["after"] == pytest.approx(256, abs=8), seen


# ---------------------------------------------------------------------------------------
# cpu, disk, network, cache


def test_cpu_total_is_100_per_cpu_of_the_affinity(monitor: SystemResourceMonitor) -> None:
    availability = monitor.get_resource_availability(ResourceType.CPU)
    assert availability.total == 100.0 * len(os.sched_getaffinity(0))
    assert 0.0 <= availability.used <= availability.total
    assert availability.available == pytest.approx(availability.total - availability.used)


def test_cpu_total_follows_a_narrowed_affinity(monitor: SystemResourceMonitor) -> None:
    original = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(original)})
        assert monitor.get_resource_availability(ResourceType.CPU).total == 100.0
    finally:
        os.sched_setaffinity(0, original)
    assert monitor.get_resource_availability(ResourceType.CPU).total == 100.0 * len(original)


def test_cpu_used_agrees_with_proc_stat_over_the_same_window() -> None:
    cpus = os.sched_getaffinity(0)
    start = proc_stat_busy_total()
    with SystemResourceMonitor(rate_window=0.5) as system_monitor:
        primed = proc_stat_busy_total()
        time.sleep(0.6)  # lets some clock ticks pass; nothing is asserted about time
        end_before = proc_stat_busy_total()
        used = system_monitor.get_resource_availability(ResourceType.CPU).used
        end_after = proc_stat_busy_total()
    candidates = [busy_percent_between(a, b, cpus) for a in (start, primed) for b in (end_before, end_after)]
    # the windows differ by the microseconds between reads: 15 points per CPU of slack
    slack = 15.0 * len(cpus)
    assert min(candidates) - slack <= used <= max(candidates) + slack, (used, candidates)


CHILD_IN_CPU_CGROUP = r"""
import json, os, sys
with open(os.path.join(sys.argv[1], sys.argv[2]), "w") as procs:
    procs.write(str(os.getpid()))
from prealloc.monitors import SystemResourceMonitor
from prealloc.types import ResourceType
cpu = SystemResourceMonitor().get_resource_availability(ResourceType.CPU)
print(json.dumps({"total": cpu.total, "available": cpu.available, "used": cpu.used}))
"""


def own_cpu_cgroup() -> tuple[int, Path] | None:
    """(version, the hierarchy directory this process's cpu cgroup is in) — the v1 cpu
    controller's mount, or the v2 cgroup where cpu.max can be set below it."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, post = before.split(), after.split()
        if post[0] == "cgroup" and "cpu" in post[2].split(","):
            return 1, Path(fields[4])
    membership = Path("/proc/self/cgroup").read_text().splitlines()
    for before, _, after in (line.partition(" - ") for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        if after.split()[0] == "cgroup2":
            for line in membership:
                hierarchy, _, path = line.split(":", 2)
                if hierarchy == "0":
                    directory = Path(before.split()[4]) / path.lstrip("/")
                    if "cpu" in (directory / "cgroup.subtree_control").read_text().split():
                        return 2, directory
    return None


def test_cpu_total_is_the_quota_of_a_cpu_cgroup_the_process_runs_in() -> None:
    found = own_cpu_cgroup()
    if found is None:
        pytest.skip("no cpu cgroup controller is visible to this process")
    version, parent = found
    child = parent / f"prealloc-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a child cpu cgroup under {parent}: {error}")
    try:
        try:
            if version == 2:
                (child / "cpu.max").write_text("50000 100000")
            else:
                (child / "cpu.cfs_period_us").write_text("100000")
                (child / "cpu.cfs_quota_us").write_text("50000")
        except OSError as error:
            pytest.skip(f"cannot set a CPU quota in {child}: {error}")
        env = dict(os.environ, PYTHONPATH=str(Path(prealloc.__file__).parents[1]))
        procs = "cgroup.procs" if version == 2 else "tasks"
        result = subprocess.run([sys.executable, "-c", CHILD_IN_CPU_CGROUP, str(child), procs],
                                capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0 and procs in result.stderr:
            pytest.skip(f"cannot move a process into {child}: {result.stderr.strip()[-300:]}")
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
    finally:
        child.rmdir()
    assert seen["total"] == pytest.approx(50.0)  # half a CPU of time, whatever the affinity
    assert 0.0 <= seen["used"] <= 50.0 and seen["available"] == pytest.approx(50.0 - seen["used"])


def fake_cgroup_tree(tmp_path: Path, cpu_max: dict[str, str]) -> Path:
    """A /proc/self (cgroup, mountinfo) naming a cgroup2 mount at tmp_path/cg and the
    process in /a/b, with cpu.max files as given (relative path -> content)."""
    mount = tmp_path / "cg"
    (mount / "a" / "b").mkdir(parents=True)
    for relative, text in cpu_max.items():
        (mount / relative / "cpu.max").write_text(text)
    proc_self = tmp_path / "proc_self"
    proc_self.mkdir()
    (proc_self / "cgroup").write_text("0::/a/b\n")
    (proc_self / "mountinfo").write_text(f"30 1 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    return proc_self


def test_cgroup_cpu_limit_is_the_tightest_level(tmp_path: Path) -> None:
    proc_self = fake_cgroup_tree(tmp_path, {"a/b": "max 100000", "a": "150000 100000", ".": "400000 50000"})
    cgroup = CgroupCpu.discover(proc_self)
    assert cgroup is not None and cgroup.version == 2
    assert cgroup.directories[0] == tmp_path / "cg" / "a" / "b"
    assert cgroup.limit_cpus() == pytest.approx(1.5)
    (tmp_path / "cg" / "a" / "cpu.max").write_text("max 100000")  # lifted at run time
    assert cgroup.limit_cpus() == pytest.approx(8.0)
    (tmp_path / "cg" / "cpu.max").write_text("garbage")  # unreadable levels are left out
    assert cgroup.limit_cpus() is None


def test_cgroup_cpu_absent_without_cpu_files(tmp_path: Path) -> None:
    assert CgroupCpu.discover(fake_cgroup_tree(tmp_path, {})) is None
    assert CgroupCpu.discover(tmp_path / "nowhere") is None


def test_disk_matches_statvfs(tmp_path: Path) -> None:
    with SystemResourceMonitor(disk_path=tmp_path) as system_monitor:
        before = os.statvfs(tmp_path)
        availability = system_monitor.get_resource_availability(ResourceType.DISK_IO)
        after = os.statvfs(tmp_path)
    assert availability.total == pytest.approx(before.f_blocks * before.f_frsize / MIB)
    free = sorted([before.f_bavail * before.f_frsize / MIB, after.f_bavail * after.f_frsize / MIB])
    assert free[0] - 64 <= availability.available <= free[1] + 64
    in_use = (before.f_blocks - before.f_bfree) * before.f_frsize / MIB
    assert availability.used == pytest.approx(in_use, abs=64)


def test_network_capacity_is_the_sum_of_known_link_speeds(monitor: SystemResourceMonitor) -> None:
    expected = 0.0
    for interface in Path("/sys/class/net").iterdir():
        flags = int((interface / "flags").read_text(), 16)
        if not flags & 0x1 or flags & 0x8:  # IFF_UP, IFF_LOOPBACK
            continue
        try:
            speed = int((interface / "speed").read_text())
        except (OSError, ValueError):
            continue  # no speed for this kind of link
        expected += max(speed, 0)
    availability = monitor.get_resource_availability(ResourceType.NETWORK_BANDWIDTH)
    assert availability.total == expected
    assert availability.used >= 0.0
    assert 0.0 <= availability.available <= availability.total
    assert availability.pressure is None


def test_network_capacity_can_be_given_where_the_nic_does_not_say() -> None:
    with SystemResourceMonitor(network_capacity_mbit=1000.0) as system_monitor:
        availability = system_monitor.get_resource_availability(ResourceType.NETWORK_BANDWIDTH)
    assert availability.total == 1000.0
    assert availability.available == pytest.approx(1000.0 - min(availability.used, 1000.0))


def test_cache_space_agrees_with_meminfo(monitor: SystemResourceMonitor) -> None:
    def page_cache_mib() -> float:
        return (meminfo_kib("Buffers") + meminfo_kib("Cached") + meminfo_kib("SReclaimable")) / 1024

    before = page_cache_mib()
    availability = monitor.get_resource_availability(ResourceType.CACHE_SPACE)
    after = page_cache_mib()
    memory = monitor.get_resource_availability(ResourceType.MEMORY)
    assert min(before, after) - 64 <= availability.used <= max(before, after) + 64
    assert availability.total == memory.total
    assert 0.0 <= availability.available <= availability.total


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
def test_availabilities_carry_the_pressure_of_their_resource(monitor: SystemResourceMonitor) -> None:
    for resource_type in (ResourceType.MEMORY, ResourceType.CPU, ResourceType.DISK_IO, ResourceType.CACHE_SPACE):
        pressure = monitor.get_resource_availability(resource_type).pressure
        assert pressure is not None and 0.0 <= pressure <= 100.0, (resource_type, pressure)


def test_unsupported_type_is_refused_naming_the_supported_ones(monitor: SystemResourceMonitor) -> None:
    for call in (lambda: monitor.get_resource_availability(ResourceType.GPU),
                 lambda: monitor.subscribe_to_resource_changes(ResourceType.GPU, lambda a: None),
                 lambda: monitor.notify_changed("GPU"),
                 lambda: monitor.get_resource_availability("bogus")):
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert "MEMORY" in message and "CPU" in message and "NETWORK_BANDWIDTH" in message
    assert monitor.supported_types == frozenset({ResourceType.MEMORY, ResourceType.CPU, ResourceType.DISK_IO,
                                                 ResourceType.NETWORK_BANDWIDTH, ResourceType.CACHE_SPACE})


def test_bad_monitor_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_interval"):
        SystemResourceMonitor(sample_interval=0)
    with pytest.raises(ValueError, match="disk_path"):
        SystemResourceMonitor(disk_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="pressure_window_us"):
        SystemResourceMonitor(pressure_window_us=100)
    with pytest.raises(ValueError, match="change_threshold"):
        SystemResourceMonitor(change_threshold=2.0)


# ---------------------------------------------------------------------------------------
# pressure

SAMPLE_PRESSURE = """some avg10=1.50 avg60=0.25 avg300=0.05 total=123456
full avg10=0.00 avg60=0.10 avg300=0.02 total=789
"""


def test_parse_pressure_reads_both_lines() -> None:
    reading = parse_pressure("memory", SAMPLE_PRESSURE)
    assert reading.resource == "memory"
    assert (reading.some.avg10, reading.some.avg60, reading.some.avg300, reading.some.total_us) == (
        1.5, 0.25, 0.05, 123456)
    assert reading.full is not None
    assert (reading.full.avg60, reading.full.total_us) == (0.10, 789)


def test_parse_pressure_without_full_line_and_malformed_text() -> None:
    reading = parse_pressure("cpu", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert reading.full is None and reading.some.total_us == 0
    for bad in ("", "some avg10=x avg60=0 avg300=0 total=0", "half avg10=0 avg60=0 avg300=0 total=0",
                "some avg10=0 avg60=0 total=0", "some avg10"):
        with pytest.raises(ValueError):
            parse_pressure("cpu", bad)


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
@pytest.mark.parametrize("resource", ["memory", "cpu", "io"])
def test_read_pressure_parses_this_machines_files(resource: str) -> None:
    text_before = Path(f"/proc/pressure/{resource}").read_text()
    reading = read_pressure(resource)
    assert reading is not None
    total_before = int(text_before.split("total=")[1].split()[0])
    assert reading.some.total_us >= total_before  # cumulative: never goes back
    for line in (reading.some, reading.full):
        if line is not None:
            assert 0.0 <= line.avg10 <= 100.0 and 0.0 <= line.avg300 <= 100.0


def test_read_pressure_of_a_missing_file_is_none_and_bad_names_are_refused(tmp_path: Path) -> None:
    assert read_pressure("memory", path=tmp_path / "absent") is None
    (tmp_path / "memory.pressure").write_text(SAMPLE_PRESSURE)
    reading = read_pressure("memory", path=tmp_path / "memory.pressure")
    assert reading is not None and reading.some.total_us == 123456
    with pytest.raises(ValueError, match="unknown pressure resource"):
        read_pressure("gpu")


def process_has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool((int(line.split()[1], 16) >> 24) & 1)
    return False


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
def test_pressure_trigger_is_registered_with_the_kernel_and_polls() -> None:
    with PressureTrigger("memory", stall_us=150_000, window_us=2_000_000) as trigger:
        fd = trigger.fileno()
        assert os.readlink(f"/proc/self/fd/{fd}") == "/proc/pressure/memory"
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        events = poller.poll(0)
        # no error bits: the kernel accepted the trigger (a bad one reports POLLERR)
        assert all(not mask & (select.POLLERR | select.POLLNVAL) for _, mask in events)
        assert trigger.poll(0.01) in (True, False)
    assert trigger.closed
    assert not os.path.exists(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}") != "/proc/pressure/memory"


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
def test_sub_two_second_window_needs_cap_sys_resource() -> None:
    if process_has_cap_sys_resource():
        with PressureTrigger("cpu", stall_us=100_000, window_us=1_000_000) as trigger:
            assert trigger.fileno() >= 0
    else:
        with pytest.raises(PressureTriggerUnavailable, match="CAP_SYS_RESOURCE"):
            PressureTrigger("cpu", stall_us=100_000, window_us=1_000_000)


def test_pressure_trigger_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="window_us"):
        PressureTrigger("memory", stall_us=1000, window_us=100_000)
    with pytest.raises(ValueError, match="stall_us"):
        PressureTrigger("memory", stall_us=3_000_000, window_us=2_000_000)
    with pytest.raises(ValueError, match="kind"):
        PressureTrigger("memory", stall_us=1000, window_us=2_000_000, kind="most")
    with pytest.raises(ValueError, match="unknown pressure resource"):
        PressureTrigger("disk", stall_us=1000, window_us=2_000_000)


def test_pressure_trigger_on_a_missing_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(PressureTriggerUnavailable, match="does not exist"):
        PressureTrigger("memory", stall_us=1000, window_us=2_000_000, path=tmp_path / "absent")


# ---------------------------------------------------------------------------------------
# subscriptions


class Collector:
    """A callback that records what it receives and lets a test wait for it."""

    def __init__(self) -> None:
        self.received: list[ResourceAvailability] = []
        self._condition = threading.Condition()

    def __call__(self, availability: ResourceAvailability) -> None:
        with self._condition:
            self.received.append(availability)
            self._condition.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: len(self.received) >= count, timeout=WAIT)


def test_notify_changed_delivers_a_fresh_availability(monitor: SystemResourceMonitor) -> None:
    collector = Collector()
    handle = monitor.subscribe_to_resource_changes(ResourceType.MEMORY, collector)
    assert handle.resource_type is ResourceType.MEMORY
    before = time.monotonic()
    monitor.notify_changed(ResourceType.MEMORY)
    assert collector.wait_for(1)
    availability = collector.received[0]
    assert availability.resource_type is ResourceType.MEMORY
    assert availability.total > 0 and availability.timestamp >= before


def test_a_raising_callback_does_not_stop_the_others(monitor: SystemResourceMonitor,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def explode(availability: ResourceAvailability) -> None:
        raise RuntimeError("subscriber bug")

    collector = Collector()
    monitor.subscribe_to_resource_changes(ResourceType.CPU, explode)
    monitor.subscribe_to_resource_changes(ResourceType.CPU, collector)
    with caplog.at_level("ERROR", logger="prealloc.monitors.base"):
        monitor.notify_changed(ResourceType.CPU)
        assert collector.wait_for(1)
        monitor.notify_changed(ResourceType.CPU)  # the watcher survived the first raise
        assert collector.wait_for(2)
    assert "subscriber bug" in caplog.text


def test_unsubscribe_stops_callbacks_and_the_last_one_ends_the_watcher(monitor: SystemResourceMonitor) -> None:
    assert watcher_threads() == []
    kept, dropped = Collector(), Collector()
    kept_handle = monitor.subscribe_to_resource_changes(ResourceType.MEMORY, kept)
    dropped_handle = monitor.subscribe_to_resource_changes(ResourceType.MEMORY, dropped)
    assert len(watcher_threads()) == 1  # one thread for every subscription

    assert monitor.unsubscribe(dropped_handle) is True
    assert monitor.unsubscribe(dropped_handle) is False
    monitor.notify_changed(ResourceType.MEMORY)
    assert kept.wait_for(1)
    monitor.notify_changed(ResourceType.MEMORY)
    assert kept.wait_for(2)
    assert dropped.received == []

    assert monitor.unsubscribe(kept_handle) is True
    assert watcher_threads() == []


def test_close_ends_the_watcher_and_refuses_new_subscriptions() -> None:
    system_monitor = SystemResourceMonitor()
    system_monitor.subscribe_to_resource_changes(ResourceType.DISK_IO, Collector())
    assert len(watcher_threads()) == 1
    system_monitor.close()
    assert watcher_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        system_monitor.subscribe_to_resource_changes(ResourceType.DISK_IO, Collector())
    system_monitor.close()  # idempotent
    assert system_monitor.get_resource_availability(ResourceType.DISK_IO).total > 0


def test_a_callback_may_unsubscribe_itself(monitor: SystemResourceMonitor) -> None:
    done = threading.Event()
    handles: list[SubscriptionHandle] = []
    unsubscribed: list[bool] = []

    def once(availability: ResourceAvailability) -> None:
        unsubscribed.append(monitor.unsubscribe(handles[0]))
        done.set()

    handles.append(monitor.subscribe_to_resource_changes(ResourceType.MEMORY, once))
    monitor.notify_changed(ResourceType.MEMORY)
    assert done.wait(WAIT)
    assert unsubscribed == [True]
    for thread in watcher_threads():
        thread.join(WAIT)
    assert watcher_threads() == []


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
def test_cpu_pressure_event_wakes_subscribers_without_sampling() -> None:
    # an hour's sample interval: any callback here comes from the kernel's PSI trigger
    with SystemResourceMonitor(sample_interval=3600.0, pressure_stall_us=50_000) as system_monitor:
        collector = Collector()
        system_monitor.subscribe_to_resource_changes(ResourceType.CPU, collector)
        deadline = time.monotonic() + WAIT
        while "cpu" not in system_monitor.event_source_status() and time.monotonic() < deadline:
            time.sleep(0.01)
        status = system_monitor.event_source_status().get("cpu")
        if status != "active":
            pytest.skip(f"no PSI trigger on cpu here: {status}")
        # more runnable spinners than CPUs we may use: tasks wait for a CPU, which is cpu stall
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(2 * len(os.sched_getaffinity(0)) + 1)]
        try:
            assert collector.wait_for(1), "no PSI event while the CPUs were oversubscribed"
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    assert collector.received[0].resource_type is ResourceType.CPU
    assert collector.received[0].pressure is not None


# ---------------------------------------------------------------------------------------
# the watcher's change threshold and fallback, on a monitor whose readings the test sets


class ScriptedMonitor(ResourceMonitor):
    """Reports the availability the test sets; counts samples so tests can wait for them."""

    def __init__(self, *, event_source_error: str | None = None, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.available = 500.0
        self.samples = 0
        self.failing = False
        self.event_source_error = event_source_error
        self._condition = threading.Condition()

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({ResourceType.CUSTOM})

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        with self._condition:
            self.samples += 1
            self._condition.notify_all()
            if self.failing:
                raise OSError("sensor unplugged")
            return ResourceAvailability(resource_type, total=1000.0, available=self.available,
                                        used=1000.0 - self.available)

    def _event_source_name(self, resource_type: ResourceType) -> str | None:
        return "scripted" if self.event_source_error else None

    def _open_event_source(self, name: str) -> EventSource:
        raise OSError(self.event_source_error)

    def wait_for_samples(self, count: int) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: self.samples >= count, timeout=WAIT)


def test_timed_samples_call_back_only_past_the_change_threshold() -> None:
    with ScriptedMonitor(sample_interval=0.01, change_threshold=0.05) as scripted:
        collector = Collector()
        scripted.subscribe_to_resource_changes(ResourceType.CUSTOM, collector)
        assert scripted.wait_for_samples(1)  # the baseline
        scripted.available = 540.0  # 4 % of total: under the threshold
        assert scripted.wait_for_samples(scripted.samples + 5)
        assert collector.received == []
        scripted.available = 600.0  # 10 % from the baseline
        assert collector.wait_for(1)
        assert collector.received[0].available == 600.0
        # drift adds up from the last delivered value, not the last sample
        scripted.available = 630.0
        assert scripted.wait_for_samples(scripted.samples + 5)
        assert len(collector.received) == 1
        scripted.available = 660.0
        assert collector.wait_for(2)


def test_sampling_is_the_fallback_when_no_event_source_opens(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="prealloc.monitors.base"):
        with ScriptedMonitor(sample_interval=0.01, event_source_error="not here") as scripted:
            collector = Collector()
            scripted.subscribe_to_resource_changes(ResourceType.CUSTOM, collector)
            assert scripted.wait_for_samples(1)
            assert scripted.event_source_status() == {"scripted": "not here"}
            scripted.available = 100.0
            assert collector.wait_for(1)
    assert "not here" in caplog.text


def test_a_failing_sample_does_not_kill_the_watcher() -> None:
    with ScriptedMonitor(sample_interval=0.01) as scripted:
        collector = Collector()
        scripted.subscribe_to_resource_changes(ResourceType.CUSTOM, collector)
        assert scripted.wait_for_samples(1)
        scripted.failing = True
        assert scripted.wait_for_samples(scripted.samples + 3)
        scripted.failing = False
        scripted.available = 100.0
        assert collector.wait_for(1)
        assert len(watcher_threads()) == 1


def test_handles_belong_to_their_monitor_and_notify_without_subscribers_starts_nothing() -> None:
    with SystemResourceMonitor() as first, SystemResourceMonitor() as second:
        handle = first.subscribe_to_resource_changes(ResourceType.MEMORY, Collector())
        assert second.unsubscribe(handle) is False  # ids are unique across monitors
        second.notify_changed(ResourceType.MEMORY)
        assert len(watcher_threads()) == 1  # only first's
        assert first.unsubscribe(handle) is True
    assert watcher_threads() == []


@pytest.mark.skipif(not HAS_PSI, reason=NO_PSI_REASON)
def test_watcher_holds_a_psi_trigger_only_while_subscribed(monitor: SystemResourceMonitor) -> None:
    def pressure_fds() -> list[str]:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue  # closed between listdir and readlink
        return [link for link in links if link == "/proc/pressure/memory"]

    assert pressure_fds() == []
    handle = monitor.subscribe_to_resource_changes(ResourceType.MEMORY, Collector())
    deadline = time.monotonic() + WAIT
    while "memory" not in monitor.event_source_status() and time.monotonic() < deadline:
        time.sleep(0.01)
    if monitor.event_source_status().get("memory") != "active":
        pytest.skip(f"no PSI trigger on memory here: {monitor.event_source_status().get('memory')}")
    assert pressure_fds() == ["/proc/pressure/memory"]
    monitor.unsubscribe(handle)
    assert pressure_fds() == []


# ---------------------------------------------------------------------------------------
# cached availability: the watcher's view, or at most one sample per max_age


class GatedMonitor(ScriptedMonitor):
    """A ScriptedMonitor that records which threads sampled and can hold a sample open."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.sampled_by: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        self.sampled_by.append(threading.current_thread().name)
        self.inside.set()
        assert self.gate.wait(WAIT)
        return super()._sample(resource_type)


def test_cached_availability_unsubscribed_samples_once_per_max_age() -> None:
    with GatedMonitor(sample_interval=3600.0) as gated:
        first = gated.cached_availability(ResourceType.CUSTOM)
        assert gated.samples == 1 and first.available == 500.0
        gated.available = 100.0
        for _ in range(100):  # within max_age (the default: sample_interval): no sample
            assert gated.cached_availability("custom") is first
        assert gated.samples == 1
        fresh = gated.cached_availability(ResourceType.CUSTOM, max_age=0)  # always stale
        assert gated.samples == 2 and fresh.available == 100.0
        assert gated.cached_availability(ResourceType.CUSTOM) is fresh
        gated.available = 200.0
        assert gated.get_resource_availability(ResourceType.CUSTOM).available == 200.0
        assert gated.cached_availability(ResourceType.CUSTOM).available == 200.0  # a fresh sample is kept
        assert gated.samples == 3


def test_cached_availability_subscribed_is_the_watchers_sample_not_the_callers() -> None:
    with GatedMonitor(sample_interval=0.05) as gated:
        gated.subscribe_to_resource_changes(ResourceType.CUSTOM, Collector())
        assert gated.wait_for_samples(1)  # the watcher's baseline
        caller = threading.current_thread().name
        gated.sampled_by.clear()
        for _ in range(200):
            assert gated.cached_availability(ResourceType.CUSTOM).resource_type is ResourceType.CUSTOM
        assert caller not in gated.sampled_by
        # a notification makes the watcher re-sample: the cache follows without a caller sample
        gated.available = 42.0
        gated.notify_changed(ResourceType.CUSTOM)
        deadline = time.monotonic() + WAIT
        while gated.cached_availability(ResourceType.CUSTOM).available != 42.0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert gated.cached_availability(ResourceType.CUSTOM).available == 42.0
        assert caller not in gated.sampled_by


def test_cached_availability_holds_no_lock_while_sampling_and_samples_once_at_a_time() -> None:
    with GatedMonitor(sample_interval=3600.0) as gated:
        stale = gated.cached_availability(ResourceType.CUSTOM)
        gated.gate.clear()
        gated.inside.clear()
        sampler = threading.Thread(target=gated.cached_availability, args=(ResourceType.CUSTOM,),
                                   kwargs={"max_age": 0})
        sampler.start()
        try:
            assert gated.inside.wait(WAIT)  # a sample is in progress, held open
            # no lock is held: subscribing (which takes the monitor's lock) goes through
            handle = gated.subscribe_to_resource_changes(ResourceType.CUSTOM, Collector())
            # a second stale caller does not sample again: it gets the previous sample
            results = []
            others = [threading.Thread(target=lambda: results.append(
                gated.cached_availability(ResourceType.CUSTOM, max_age=0))) for _ in range(8)]
            for thread in others:
                thread.start()
            for thread in others:
                thread.join(WAIT)
            assert results == [stale] * 8
            assert gated.sampled_by.count(sampler.name) == 1
            assert len([name for name in gated.sampled_by if name.startswith("Thread")]) == 1
        finally:
            gated.gate.set()
            sampler.join(WAIT)
        assert gated.unsubscribe(handle)


def test_cached_availability_refuses_bad_arguments() -> None:
    with GatedMonitor() as gated:
        for bad in (-1.0, float("nan"), "1", True):
            with pytest.raises(ValueError, match="max_age"):
                gated.cached_availability(ResourceType.CUSTOM, max_age=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="supported types"):
            gated.cached_availability(ResourceType.MEMORY)
        assert gated.samples == 0


def test_cached_memory_availability_of_the_system_monitor(monitor: SystemResourceMonitor) -> None:
    fresh = monitor.get_resource_availability(ResourceType.MEMORY)
    cached = monitor.cached_availability(ResourceType.MEMORY)
    assert cached is fresh  # the fresh sample was kept
    assert monitor.cached_availability(ResourceType.MEMORY, max_age=0) is not fresh
    assert cached.total == pytest.approx(min(meminfo_kib("MemTotal") * 1024, cgroup_limit_and_headroom()[0])
                                         / MIB, abs=1.0)
