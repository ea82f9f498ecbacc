"""The DISK_IO monitor: statvfs less headroom (on a tmpfs of our own when root, where
nothing else moves the free space), /proc/diskstats, the device and scheduler under a
path read against /sys, cgroup weight files, and argument checks."""
from __future__ import annotations

import os
import subprocess

import pytest

from prealloc.monitors.disk import (
    DiskMonitor,
    FilesystemSpace,
    block_device_of,
    cgroup_io_weight_files,
    read_diskstats,
)
from prealloc.strategies.disk import DiskStrategy, io_priority_effect
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

MIB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_space_matches_statvfs(tmp_path):
    space = FilesystemSpace.of(tmp_path)
    vfs = os.statvfs(tmp_path)
    assert space.total == vfs.f_blocks * vfs.f_frsize and space.block_size == vfs.f_frsize
    assert space.device == os.stat(tmp_path).st_dev
    with DiskMonitor(tmp_path, headroom_mib=0, headroom_fraction=0) as monitor:
        availability = monitor.get_resource_availability(ResourceType.DISK_IO)
        assert availability.total == space.total / MIB
        assert availability.pressure is None or availability.pressure >= 0


def test_availability_is_free_space_less_headroom_and_moves_with_a_reservation(small_fs):
    monitor = DiskMonitor(small_fs, headroom_mib=2, headroom_fraction=0.25)
    assert monitor.get_resource_availability("DISK_IO").available == 16 - 2 - 4
    strategy = DiskStrategy(headroom_mib=0)
    grant = strategy.allocate(ResourceRequest(ResourceType.DISK_IO, 5, metadata=RequestMetadata(
        custom_properties={"directory": str(small_fs)})), 5, None)
    assert monitor.get_resource_availability("DISK_IO").available == 16 - 2 - 4 - 5
    strategy.release(grant.handle)
    assert monitor.get_resource_availability("DISK_IO").available == 16 - 2 - 4
    device = block_device_of(small_fs)
    assert device.name is None and io_priority_effect(small_fs).startswith("no effect")
    monitor.close()


def test_device_and_scheduler_of_a_block_device():
    path = next((p for p in ("/", os.getcwd()) if os.major(os.stat(p).st_dev) != 0), None)
    device = block_device_of(path) if path else None
    if device is None or device.name is None:
        pytest.skip("the root filesystem is on no block device here (overlay or tmpfs)")
    text = open(f"/sys/block/{device.name}/queue/scheduler").read()
    assert f"[{device.scheduler}]" in text
    assert device.name in read_diskstats()
    effect = device.priority_effect()
    assert device.name in effect and device.scheduler in effect
    assert effect.startswith("no effect") == (not device.honours_priority_class)


def test_diskstats_and_utilisation(tmp_path):
    stats = read_diskstats()
    assert stats and all(s.in_flight >= 0 and s.io_ticks_ms >= 0 for s in stats.values())
    device = block_device_of("/")
    if device.name is None or device.name not in stats:
        pytest.skip("/ is on no block device listed in /proc/diskstats")
    monitor = DiskMonitor("/")
    first, depth = monitor.device_utilisation()
    assert first is None and depth >= 0
    second, _ = monitor.device_utilisation()
    assert second is not None and 0.0 <= second <= 1.0
    with pytest.raises(ValueError, match="no device"):
        monitor.device_utilisation("no-such-disk")


def test_cgroup_weight_files_exist_where_reported():
    for path in cgroup_io_weight_files(os.getpid()).values():
        assert path is None or os.path.exists(path)


@pytest.mark.parametrize("kwargs, match", [({"headroom_mib": -1}, "headroom_mib"),
                                           ({"headroom_fraction": 1.5}, "headroom_fraction"),
                                           ({"sample_interval": 0}, "sample_interval")])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiskMonitor(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="not a directory"):
        DiskMonitor(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not monitor"):
        DiskMonitor(tmp_path).get_resource_availability("MEMORY")
