"""CACHE_SPACE: the page-cache binding and CacheSpaceStrategy, checked through the
kernel — cachestat and mincore counts of files the tests write (fsync'd, so
POSIX_FADV_DONTNEED can drop them), VmLck in /proc/self/status for pins."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from prealloc import _native
from prealloc.monitors import PageCacheMonitor
from prealloc.monitors.pagecache import resident_bytes
from prealloc.profiles import Profile, save_profile
from prealloc.strategies import CacheSpaceStrategy
from prealloc.strategies.base import AllocationError, InsufficientResources
from prealloc.strategies.cache import memlock_budget
from prealloc.types import RequestMetadata, ResourceAvailability, ResourceRequest, ResourceType

from osutil import vm_lck

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_file(path, size: int) -> str:
    """size bytes, flushed and dropped from the page cache."""
    with open(path, "wb") as out:
        block = bytes(range(256)) * 256
        left = size
        while left > 0:
            out.write(block[:min(left, len(block))])
            left -= len(block)
        out.flush()
        os.fsync(out.fileno())
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return str(path)


def cached(path) -> int:
    """Bytes of path in the page cache, by mincore (independent of the strategy's count)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return min(_native.pagecache_mincore(fd) * PAGE, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def files_dir(tmp_path):
    """A directory whose filesystem drops clean pages on DONTNEED (not tmpfs)."""
    probe = write_file(tmp_path / "probe", 4 * PAGE)
    if cached(probe) != 0:
        pytest.skip(f"{tmp_path} keeps pages after POSIX_FADV_DONTNEED (tmpfs?): residency cannot be tested")
    os.unlink(probe)
    return tmp_path


def request(amount: float, **props) -> ResourceRequest:
    return ResourceRequest(ResourceType.CACHE_SPACE, amount,
                           metadata=RequestMetadata(custom_properties=props)).validate()


# -- the binding --------------------------------------------------------------------------

def test_binding_warms_and_counts(files_dir):
    a = write_file(files_dir / "a.bin", 3 * MiB)
    b = write_file(files_dir / "b.bin", 5 * PAGE + 7)
    with _native.PageCacheFiles([a, str(files_dir / "missing"), b], roots=[str(files_dir)]) as files:
        assert files.is_open == [True, False, True]
        assert files.open_errors[1] == 2  # ENOENT
        assert files.sizes[0] == 3 * MiB and files.lengths[2] == 5 * PAGE + 7
        assert files.noatime[0]  # our own file: O_NOATIME allowed
        pages, methods, _ = files.counts()
        assert pages[0, 0] == 0 and cached(a) == 0
        assert files.warm() == 2
        assert files.warm_methods[0] == "read"  # pread: the default
        assert files.warm(mapped=True) == 2 and files.warm_methods[0] == "populate_read"
        pages, methods, _ = files.counts()
        assert pages[0, 0] == 3 * MiB // PAGE and pages[2, 0] == 6
        assert methods[0] in ("cachestat", "mincore") and methods[1] == "none"
    assert cached(a) == 3 * MiB and cached(b) == 5 * PAGE + 7
    fd = os.open(a, os.O_RDONLY)
    try:
        try:
            assert _native.pagecache_cachestat(fd)[0] == 3 * MiB // PAGE
        except OSError as exc:
            assert exc.errno == 38  # ENOSYS: a kernel before 6.5
        assert _native.pagecache_chunk_bytes(fd) >= 4096
    finally:
        os.close(fd)


def test_binding_refuses_symlinks_out_of_the_roots(files_dir):
    inside = write_file(files_dir / "inside.bin", PAGE)
    os.symlink("/proc/self/exe", files_dir / "escape")
    os.symlink(inside, files_dir / "alias")
    with _native.PageCacheFiles([str(files_dir / "escape"), str(files_dir / "alias"),
                                 str(files_dir / ".." / files_dir.name / "inside.bin")],
                                roots=[str(files_dir)]) as files:
        assert files.open_errors == [13, 0, 0]  # EACCES for the escape only
    with pytest.raises(ValueError, match="NUL"):
        _native.PageCacheFiles(["/tmp/a\0b"])
    with pytest.raises(ValueError, match="offsets and lengths"):
        _native.PageCacheFiles([inside], [0, 0], None)


def test_binding_one_pass_open_counts_before_and_refuses_stale(files_dir):
    small = write_file(files_dir / "small.bin", 3 * PAGE)
    big = write_file(files_dir / "big.bin", 2 * MiB)
    changed = write_file(files_dir / "changed.bin", PAGE)
    hot = write_file(files_dir / "hot.bin", 2 * PAGE)
    with open(hot, "rb") as f:  # another program's pages, resident before the warming
        f.read()
    st = os.stat(changed)
    paths = [small, big, changed, changed, hot]
    with _native.PageCacheFiles(paths, roots=[str(files_dir)],
                                expect_sizes=[3 * PAGE, -1, PAGE + 1, PAGE, None],
                                expect_mtimes_ns=[-1, -1, -1, st.st_mtime_ns + 1, -1],
                                willneed=True, count_before=True) as files:
        assert files.open_errors == [0, 0, 116, 116, 0]  # ESTALE: size, then mtime differ
        pages, methods, restricted = files.counts_before()
        assert pages[4, 0] == 2 and pages[0, 0] == 0 and pages[1, 0] == 0  # before the readahead
        assert methods[2] == "none" and not any(restricted)
        assert files.warm(willneed=False, populate=True, start=0, stop=2, mapped=True) == 2
        assert files.warm_methods[:2] == ["read", "populate_read"]  # small: read even when mapped
        assert files.warm_methods[4] != "read"  # outside [start, stop): not warmed
        with pytest.raises(ValueError, match="start and stop"):
            files.warm(start=3, stop=2)
        with pytest.raises(ValueError, match="start and stop"):
            files.warm(stop=6)
        assert files.dirs_listed == 0  # not asked for
    assert cached(small) == 3 * PAGE and cached(big) == 2 * MiB
    with _native.PageCacheFiles([small]) as files:
        assert files.counts_before() is None  # not asked for
    sub = files_dir / "sub"
    sub.mkdir()
    inner = write_file(sub / "inner.bin", PAGE)
    with _native.PageCacheFiles([small, big, inner], roots=[str(files_dir)], list_dirs=True) as files:
        assert files.dirs_listed == 2  # files_dir and sub, each once
    with _native.PageCacheFiles([small, inner], roots=[str(sub)], list_dirs=True) as files:
        assert files.dirs_listed == 1 and files.open_errors[0] == 13  # files_dir is outside
    with pytest.raises(ValueError, match="expect_sizes"):
        _native.PageCacheFiles([small], expect_sizes=[1, 2])
    with pytest.raises(ValueError, match=r"expect_mtimes_ns\[0\]"):
        _native.PageCacheFiles([small], expect_mtimes_ns=[-5])


# -- the strategy -------------------------------------------------------------------------

def test_allocate_makes_files_resident_and_caps_by_size(files_dir):
    paths = [write_file(files_dir / f"f{i}.bin", (i + 1) * MiB) for i in range(3)]  # 6 MiB
    strategy = CacheSpaceStrategy(roots=[str(files_dir)])
    req = request(100, files=paths)
    assert strategy.planned_amount(req, 100) == pytest.approx(6)
    grant = strategy.allocate(req, 100, None)
    try:
        assert grant.amount == pytest.approx(6)
        assert [cached(p) for p in paths] == [MiB, 2 * MiB, 3 * MiB]
        details = strategy.describe(grant.handle)
        assert details["files"] == 3
        assert details["bytes_requested"] == 6 * MiB
        assert details["bytes_resident_before"] == 0
        assert details["bytes_resident_after"] == 6 * MiB
        assert details["method"] == "read"
        assert details["bytes_pinned"] == 0 and details["pin_requested"] is False
        assert details["warm_seconds"] >= 0
        assert details["directories_listed"] == 1
        # release does not evict by default: other programs may use the pages
        assert strategy.release(grant.handle) is None
        assert [cached(p) for p in paths] == [MiB, 2 * MiB, 3 * MiB]
        assert strategy.release(grant.handle) is None  # twice is fine
    finally:
        strategy.release(grant.handle)


def test_amount_takes_files_in_order_up_to_the_target(files_dir):
    big = write_file(files_dir / "big.bin", 8 * MiB)
    later = write_file(files_dir / "later.bin", MiB)
    strategy = CacheSpaceStrategy(roots=[str(files_dir)])
    grant = strategy.allocate(request(3, files=[big, later]), 3, None)
    try:
        assert grant.amount == pytest.approx(3)
        assert cached(big) == 3 * MiB and cached(later) == 0
        assert strategy.describe(grant.handle)["bytes_requested"] == 3 * MiB
    finally:
        strategy.release(grant.handle)


def test_globs_directories_and_roots(files_dir, tmp_path_factory):
    sub = files_dir / "lib" / "deep"
    sub.mkdir(parents=True)
    so = [write_file(sub / f"m{i}.so", MiB) for i in range(2)]
    write_file(files_dir / "lib" / "notes.txt", MiB)
    outside_dir = tmp_path_factory.mktemp("outside")
    outside = write_file(outside_dir / "secret.bin", MiB)
    os.symlink(outside, files_dir / "lib" / "link.so")
    strategy = CacheSpaceStrategy(roots=[str(files_dir)])
    grant = strategy.allocate(request(64, files=[str(files_dir / "lib" / "**" / "*.so")]), 64, None)
    try:
        details = strategy.describe(grant.handle)
        assert sorted(details["paths"]) == sorted(so)
        assert details["skipped"]["outside_roots"] == 1  # the symlink out
        assert cached(outside) == 0
        assert all(cached(p) == MiB for p in so)
    finally:
        strategy.release(grant.handle)
    # a directory names every file below it
    grant = strategy.allocate(request(64, files=str(files_dir / "lib")), 64, None)
    try:
        assert strategy.describe(grant.handle)["files"] == 3  # m0, m1, notes (the link is out)
    finally:
        strategy.release(grant.handle)
    # only files outside the roots (a root-run allocator must not read /etc/shadow)
    with pytest.raises(AllocationError, match="no files"):
        strategy.allocate(request(1, files=["/etc/shadow", outside]), 1, None)
    with pytest.raises(AllocationError, match="absolute"):
        strategy.allocate(request(1, files=["relative/path"]), 1, None)
    with pytest.raises(ValueError, match="absolute"):
        strategy.planned_amount(request(1, files=["relative/path"]), 1)


def test_bad_file_properties_and_the_file_cap(files_dir):
    paths = [write_file(files_dir / f"c{i}.bin", PAGE) for i in range(5)]
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], max_files=3)
    with pytest.raises(AllocationError, match=r"custom_properties\['files'\]"):
        strategy.allocate(request(1, files={"a": 1}), 1, None)
    with pytest.raises(AllocationError, match=r"custom_properties\['profile'\]"):
        strategy.allocate(request(1, profile=7), 1, None)
    grant = strategy.allocate(request(1, files=str(files_dir / "*.bin")), 1, None)
    try:
        details = strategy.describe(grant.handle)
        assert details["files"] == 3 and details["skipped"]["over_cap"] >= 1
        assert sum(cached(p) for p in paths) == 3 * PAGE
    finally:
        strategy.release(grant.handle)


def test_default_roots_refuse_etc():
    strategy = CacheSpaceStrategy()
    with pytest.raises(AllocationError, match="no files"):
        strategy.allocate(request(1, files=["/etc/shadow", "/etc/passwd"]), 1, None)


def test_pinned_pages_stay_resident_and_release_unpins(files_dir):
    path = write_file(files_dir / "pin.bin", 4 * MiB)  # within an 8 MiB RLIMIT_MEMLOCK
    budget = memlock_budget()
    if budget is not None and budget < 4 * MiB:
        pytest.skip(f"RLIMIT_MEMLOCK leaves only {budget} bytes to lock")
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], pin=True)
    locked_before = vm_lck()
    grant = strategy.allocate(request(4, files=[path]), 4, None)
    try:
        details = strategy.describe(grant.handle)
        assert details["bytes_pinned"] == 4 * MiB and details["pin_error"] is None
        assert vm_lck() - locked_before == 4 * MiB
        drop(path)
        assert cached(path) == 4 * MiB  # locked pages survive DONTNEED
    finally:
        strategy.release(grant.handle)
    assert vm_lck() == locked_before
    drop(path)
    assert cached(path) == 0  # unpinned: DONTNEED drops them again


def test_pin_beyond_rlimit_memlock_is_partial_and_says_why(files_dir):
    """Unprivileged (no CAP_IPC_LOCK) in a child: a 2 MiB RLIMIT_MEMLOCK pins 2 MiB of a
    6 MiB file, the allocation still succeeds, and the details say why."""
    path = write_file(files_dir / "big-pin.bin", 6 * MiB)
    code = textwrap.dedent(f"""
        import json, os, resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from osutil import CAP_IPC_LOCK, drop_capability, vm_lck
        if os.geteuid() == 0:
            drop_capability(CAP_IPC_LOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (2 << 20, 2 << 20))
        from prealloc.strategies import CacheSpaceStrategy
        from prealloc.types import RequestMetadata, ResourceRequest, ResourceType
        s = CacheSpaceStrategy(roots=[{str(files_dir)!r}], pin=True)
        req = ResourceRequest(ResourceType.CACHE_SPACE, 6,
                              metadata=RequestMetadata(custom_properties={{"files": [{path!r}]}}))
        g = s.allocate(req, 6, None)
        d = s.describe(g.handle)
        locked = vm_lck()
        s.release(g.handle)
        print(json.dumps({{"pinned": d["bytes_pinned"], "why": d["pin_error"], "amount": g.amount,
                          "locked": locked, "after": vm_lck()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    facts = json.loads(out)
    assert facts["amount"] == pytest.approx(6)
    assert 0 < facts["pinned"] <= 2 * MiB
    assert "RLIMIT_MEMLOCK" in facts["why"]
    assert facts["locked"] == facts["pinned"] and facts["after"] == 0


def test_adjust_grows_and_shrinks_within_the_set(files_dir):
    first = write_file(files_dir / "first.bin", 3 * MiB)
    second = write_file(files_dir / "second.bin", 3 * MiB)
    budget = memlock_budget()
    pin = budget is None or budget >= 5 * MiB
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], pin=pin)
    locked_before = vm_lck()
    grant = strategy.allocate(request(2, files=[first, second]), 2, None)
    try:
        assert cached(first) == 2 * MiB and cached(second) == 0
        assert strategy.adjust(grant.handle, 5) == pytest.approx(5)
        assert cached(first) == 3 * MiB and cached(second) == 2 * MiB
        assert strategy.adjust(grant.handle, 100) == pytest.approx(6)  # capped by the set
        assert strategy.describe(grant.handle)["bytes_requested"] == 6 * MiB
        assert strategy.adjust(grant.handle, 1) == pytest.approx(1)
        details = strategy.describe(grant.handle)
        assert details["paths"] == [first] and details["bytes_requested"] == MiB
        if pin:
            assert details["bytes_pinned"] == MiB
            assert vm_lck() - locked_before == MiB
        assert cached(second) == 3 * MiB  # shrinking evicts nothing
    finally:
        strategy.release(grant.handle)
    assert vm_lck() == locked_before
    with pytest.raises(AllocationError, match="released"):
        strategy.adjust(grant.handle, 2)


def test_evict_on_unused_evicts_only_what_was_cold(files_dir):
    warm_already = write_file(files_dir / "shared.bin", 2 * MiB)
    cold = write_file(files_dir / "cold.bin", 2 * MiB)
    with open(warm_already, "rb") as f:  # another program's pages
        f.read()
    assert cached(warm_already) == 2 * MiB
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], evict_on_unused=True)
    grant = strategy.allocate(request(4, files=[warm_already, cold]), 4, None)
    assert strategy.describe(grant.handle)["bytes_resident_before"] == 2 * MiB
    assert cached(cold) == 2 * MiB
    strategy.release(grant.handle)  # never claimed
    assert cached(warm_already) == 2 * MiB
    assert cached(cold) == 0
    assert strategy.describe(grant.handle)["bytes_evicted_at_release"] == 2 * MiB
    # a claimed allocation's pages are left alone
    grant = strategy.allocate(request(4, files=[warm_already, cold]), 4, None)
    strategy.claim(grant.handle)
    strategy.release(grant.handle)
    assert cached(cold) == 2 * MiB


def test_claim_rewarms_what_fell_out(files_dir):
    path = write_file(files_dir / "falls.bin", 3 * MiB)
    strategy = CacheSpaceStrategy(roots=[str(files_dir)])
    grant = strategy.allocate(request(3, files=[path]), 3, None)
    try:
        drop(path)  # evicted before the need arrived
        assert cached(path) == 0
        resource = strategy.claim(grant.handle)
        assert cached(path) == 3 * MiB
        assert resource.paths == (path,)
        details = strategy.describe(grant.handle)
        assert details["bytes_resident_at_claim"] == 0
        assert details["bytes_rewarmed"] == 3 * MiB
    finally:
        strategy.release(grant.handle)
    with pytest.raises(AllocationError, match="released"):
        strategy.claim(grant.handle)


def test_warming_yields_under_memory_pressure(files_dir):
    path = write_file(files_dir / "p.bin", MiB)
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], pressure_limit=5)
    busy = ResourceAvailability(ResourceType.CACHE_SPACE, 1000, 500, 500, pressure=40.0)
    with pytest.raises(InsufficientResources, match="pressure"):
        strategy.allocate(request(1, files=[path]), 1, busy)
    assert cached(path) == 0
    calm = ResourceAvailability(ResourceType.CACHE_SPACE, 1000, 500, 500, pressure=0.0)
    grant = strategy.allocate(request(1, files=[path]), 1, calm)
    strategy.release(grant.handle)


def test_profiles_missing_stale_huge_and_outside(files_dir, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles")
    keep = write_file(files_dir / "keep.bin", MiB)
    changes = write_file(files_dir / "changes.bin", MiB)
    gone = write_file(files_dir / "gone.bin", MiB)
    huge = files_dir / "huge.bin"
    with open(huge, "wb") as f:  # sparse: 16 GiB of size, no blocks
        f.truncate(16 << 30)
    touched = write_file(files_dir / "touched.bin", MiB)
    profile = Profile.from_paths("app", [keep, changes, gone, touched, str(huge), "/etc/passwd"])
    save_profile(profile, profiles)
    with open(changes, "ab") as f:
        f.write(b"x")  # size changed since the recording: stale
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # same size, new mtime: stale
    os.unlink(gone)  # gone: stale
    strategy = CacheSpaceStrategy(roots=[str(files_dir)], profile_dir=profiles)
    grant = strategy.allocate(request(5, profile="app"), 5, None)
    try:
        details = strategy.describe(grant.handle)
        assert details["skipped"]["stale"] == 3
        assert details["skipped"]["outside_roots"] == 1  # /etc/passwd
        assert cached(touched) == 0  # refused at open: never warmed
        assert details["profile"] == "app"
        # the huge file is capped by the amount: 1 MiB of keep + 4 MiB of huge
        assert details["bytes_requested"] == 5 * MiB
        assert cached(keep) == MiB
    finally:
        strategy.release(grant.handle)
    with pytest.raises(AllocationError, match="no profile"):
        strategy.allocate(request(1, profile="nope"), 1, None)
    (profiles / "bad.json").write_text('{"format": "prealloc-profile", "version": 99}')
    with pytest.raises(AllocationError, match="version"):
        strategy.allocate(request(1, profile="bad"), 1, None)


def test_constructor_validates():
    with pytest.raises(ValueError, match="roots"):
        CacheSpaceStrategy(roots=["relative"])
    with pytest.raises(TypeError, match="roots"):
        CacheSpaceStrategy(roots="/usr")
    with pytest.raises(ValueError, match="pressure_limit"):
        CacheSpaceStrategy(pressure_limit=200)
    with pytest.raises(ValueError, match="max_files"):
        CacheSpaceStrategy(max_files=0)


# -- the monitor --------------------------------------------------------------------------

def test_monitor_reports_cache_space_and_residency(files_dir):
    path = write_file(files_dir / "m.bin", 2 * MiB)
    with PageCacheMonitor(yield_pressure=100, pressure_triggers=False) as monitor:
        availability = monitor.get_resource_availability(ResourceType.CACHE_SPACE)
        assert availability.resource_type == ResourceType.CACHE_SPACE
        assert 0 <= availability.available <= availability.total
        assert monitor.supported_types == frozenset({ResourceType.CACHE_SPACE})
        with pytest.raises(ValueError):
            monitor.get_resource_availability(ResourceType.MEMORY)
    assert resident_bytes([path]) == (0, 2 * MiB)
    with open(path, "rb") as f:
        f.read()
    assert resident_bytes([path, str(files_dir / "missing")]) == (2 * MiB, 2 * MiB)
    with pytest.raises(ValueError, match="yield_pressure"):
        PageCacheMonitor(yield_pressure=-1)


def test_file_the_kernel_will_not_count_for_us():
    """A root-owned, read-only system file, warmed by an unprivileged process (as root:
    a child that drops to uid 65534 after importing): cachestat refuses, mincore would
    claim every page resident, so the count is marked restricted and the amount rests
    on the populate that succeeded."""
    import shutil
    target = os.path.realpath(shutil.which("sh") or "/bin/sh")
    st = os.stat(target)
    if st.st_uid == os.geteuid() and os.geteuid() != 0:
        pytest.skip(f"{target} belongs to this user")
    code = textwrap.dedent(f"""
        import json, os
        from prealloc.strategies import CacheSpaceStrategy
        from prealloc.types import RequestMetadata, ResourceRequest, ResourceType
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        s = CacheSpaceStrategy(roots=["/usr", "/bin"])
        req = ResourceRequest(ResourceType.CACHE_SPACE, 64,
                              metadata=RequestMetadata(custom_properties={{"files": [{target!r}]}}))
        g = s.allocate(req, 64, None)
        d = s.describe(g.handle)
        s.claim(g.handle)
        s.release(g.handle)
        print(json.dumps({{"amount": g.amount, "restricted": d["count_restricted"],
                          "uncounted": d["bytes_uncounted"], "populated": d["bytes_populated_uncounted"],
                          "after": d["bytes_resident_after"], "count_method": d["count_method"]}}))
    """)
    facts = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert facts["restricted"] is True and facts["count_method"] == "none"
    assert facts["uncounted"] == facts["populated"] == facts["after"] == st.st_size
    assert facts["amount"] == pytest.approx(st.st_size / MiB)
