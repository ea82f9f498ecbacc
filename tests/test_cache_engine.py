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


def test_prediction_names_a_profile(files_dir, tmp_path_factory, monkeypatch):  # noqa: F811
    """A rule's CACHE_SPACE request carries the prediction's properties: {"profile": ...}
    there reaches the strategy (handle_prediction -> worker -> allocate)."""
    from prealloc import Prediction, RuleTranslator
    from prealloc.profiles import Profile, save_profile

    profiles = tmp_path_factory.mktemp("profiles")
    paths = [write_file(files_dir / f"p{i}.bin", MiB) for i in range(3)]
    save_profile(Profile.from_paths("start-app", paths), profiles)
    translator = RuleTranslator.from_dict({"rule": [{
        "name": "warm", "match": {"type": "launch"},
        "request": [{"resource_type": "CACHE_SPACE", "need": 64}]}]})
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], profile_dir=profiles)
    with ResourcePreallocator(translator=translator, allocation_strategies={CACHE: strategy}) as pre:
        [rid] = pre.handle_prediction(Prediction(id="p1", type="launch", predicted_value="app", confidence=0.9,
                                                 properties={"profile": "start-app"}))
        snap = wait_until(lambda: (s := pre.get_allocation(rid)) is not None
                          and s.status == AllocationStatus.ALLOCATED and s)
        assert snap.allocated_amount == pytest.approx(3)  # capped by the profile's files
        assert snap.details["profile"] == "start-app"
        assert [cached(p) for p in paths] == [MiB] * 3
        pre.release_allocation(rid)
