"""CACHE_SPACE end to end through ResourcePreallocator's public API: a request naming
files is warmed by the worker (the kernel shows them resident before ALLOCATED), the
need claims it, and release hands it back."""
from __future__ import annotations

import pytest

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    RequestMetadata,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
from prealloc.strategies import CacheSpaceStrategy

from engine_util import wait_until
from test_cache import MiB, cached, drop, files_dir, write_file  # noqa: F401 (files_dir: a fixture)

CACHE = ResourceType.CACHE_SPACE


def test_request_warm_claim_release(files_dir):  # noqa: F811
    paths = [write_file(files_dir / f"lib{i}.so", 2 * MiB) for i in range(2)]
    strategy = CacheSpaceStrategy(roots=[str(files_dir)])
    with ResourcePreallocator(translator=None, allocation_strategies={CACHE: strategy}) as pre:
        request = ResourceRequest(CACHE, 16, metadata=RequestMetadata(
            target_application="app", custom_properties={"files": paths}))
        rid = pre.submit(request)
        snap = wait_until(lambda: (s := pre.get_allocation(rid)) is not None
                          and s.status == AllocationStatus.ALLOCATED and s)
        # capped by the files' size, and resident before ALLOCATED was reported
        assert snap.allocated_amount == pytest.approx(4)
        assert snap.details["bytes_resident_after"] == 4 * MiB
        assert [cached(p) for p in paths] == [2 * MiB, 2 * MiB]
        drop(paths[0])  # fell out before the need: the claim re-warms it
        claim = pre.acquire(CACHE, 4, target_application="app")
        assert claim.preallocated and claim.allocation_id == rid
        assert claim.resource.paths == tuple(paths)
        assert cached(paths[0]) == 2 * MiB
        assert pre.get_allocation(rid).status == AllocationStatus.ACTIVE
        pre.release_allocation(rid, AllocationFeedback(used_successfully=True))
        after = pre.get_allocation(rid)
        assert after is None or after.status == AllocationStatus.RELEASED
        assert claim.resource.released
        assert [cached(p) for p in paths] == [2 * MiB, 2 * MiB]  # release does not evict
