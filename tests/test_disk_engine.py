"""DISK_IO end to end through the public API only: a DiskStrategy registered with
ResourcePreallocator(allocation_strategies=...), a request submitted ahead of need, the
need acquired (the claim hands over the preallocated file), the allocation released.
Verified through st_blocks and the directory listing."""
from __future__ import annotations

import os
import threading

from prealloc import ResourcePreallocator
from prealloc.strategies.disk import DiskClaim, DiskStrategy
from prealloc.types import AllocationStatus, RequestMetadata, ResourceRequest, ResourceType

MIB = 1024 * 1024


def test_submit_acquire_release_through_the_engine(tmp_path):
    strategy = DiskStrategy(headroom_mib=0)
    with ResourcePreallocator(allocation_strategies={ResourceType.DISK_IO: strategy},
                              resource_monitors={}) as pre:
        request = ResourceRequest(ResourceType.DISK_IO, 4.0, metadata=RequestMetadata(
            target_application="recorder",
            custom_properties={"directory": str(tmp_path), "name": "take-1"}))
        allocation_id = pre.submit(request)
        assert pre.wait_ready(allocation_id, timeout=30)
        allocation = pre.get_allocation(allocation_id)
        assert allocation is not None and allocation.status == AllocationStatus.ALLOCATED
        assert allocation.details["allocated_bytes"] >= 4 * MIB
        claim = pre.acquire(ResourceType.DISK_IO, 4.0, target_application="recorder")
        assert claim.preallocated and claim.allocation_id == allocation_id
        handed = claim.resource
        assert isinstance(handed, DiskClaim) and handed.path == str(tmp_path / "take-1")
        assert os.fstat(handed.fd).st_blocks * 512 >= 4 * MIB
        assert os.path.samestat(os.fstat(handed.fd), os.stat(handed.path))
        assert pre.release_allocation(allocation_id)
        assert sorted(os.listdir(tmp_path)) == ["take-1"]  # the consumer's file stays
        os.close(handed.fd)

        # an unclaimed reservation is removed by release
        other = pre.submit(ResourceRequest(ResourceType.DISK_IO, 2.0, metadata=RequestMetadata(
            custom_properties={"directory": str(tmp_path), "mode": "ballast"})))
        assert pre.wait_ready(other, timeout=30)
        assert pre.get_allocation(other).status == AllocationStatus.ALLOCATED
        assert pre.release_allocation(other)
        assert sorted(os.listdir(tmp_path)) == ["take-1"]
    strategy.close()


def test_expiry_removes_an_unclaimed_reserve_file(tmp_path):
    strategy = DiskStrategy(headroom_mib=0, prefer_tmpfile=False)  # a named file, to watch it go
    at_allocation: list[tuple[list[str], int]] = []
    expired = threading.Event()

    def allocated(allocation) -> None:  # on the worker, right after the strategy reserved
        names = os.listdir(tmp_path)
        at_allocation.append((names, sum(os.stat(tmp_path / n).st_blocks * 512 for n in names)))

    with ResourcePreallocator(allocation_strategies={ResourceType.DISK_IO: strategy},
                              resource_monitors={}) as pre:
        pre.on("allocated", allocated)
        pre.on("expired", lambda allocation: expired.set())
        allocation_id = pre.submit(ResourceRequest(ResourceType.DISK_IO, 2.0, duration=0.5, metadata=RequestMetadata(
            custom_properties={"directory": str(tmp_path), "mode": "ballast"})))
        assert expired.wait(timeout=30), "the allocation never expired"
        ((names, held),) = at_allocation
        assert len(names) == 1 and names[0].startswith(".prealloc-reserve-") and held >= 2 * MIB
        assert os.listdir(tmp_path) == []  # expiry released it: the file is gone
        assert pre.get_allocation(allocation_id) is None or \
            pre.get_allocation(allocation_id).status == AllocationStatus.EXPIRED
    strategy.close()
