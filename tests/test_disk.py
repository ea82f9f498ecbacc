"""The DISK_IO strategy and its native component, verified through the kernel: st_blocks,
st_size, st_mode and FD_CLOEXEC of the files, directory listings, statvfs of a small
tmpfs the test mounts (root only: unprivileged runs assert on st_blocks in a temporary
directory and skip what needs a filesystem small enough to fill), and ioprio_get of
each thread for priorities."""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading

import pytest

from prealloc import _native
from prealloc.strategies.base import AllocationError, InsufficientResources
from prealloc.strategies.disk import DiskClaim, DiskStrategy, format_io_priority, parse_io_priority
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

MIB = 1024 * 1024
ROOT = os.geteuid() == 0


def request(mib: float, directory, pid: int | None = None, **props) -> ResourceRequest:
    return ResourceRequest(ResourceType.DISK_IO, mib, metadata=RequestMetadata(
        target_process_id=pid, custom_properties={"directory": str(directory), **props}))


def blocks(path_or_fd) -> int:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return st.st_blocks * 512


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def strategy(tmp_path):
    s = DiskStrategy(headroom_mib=0)
    yield s
    s.close()


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request, tmp_path):
    """A 32 MiB filesystem of our own — a tmpfs, or ext4 on a loop-mounted image (a real
    disk filesystem: extents, unwritten blocks) — that nothing else writes to, so statvfs
    is ours to read."""
    if not ROOT:
        pytest.skip("mounting a small filesystem needs root (unprivileged runs check st_blocks only)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if request.param == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)]
    else:
        image = tmp_path / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(40 * MIB)  # 32 MiB free after the filesystem's own metadata, roughly
        mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)],
                              capture_output=True, text=True)
        if mkfs.returncode != 0:
            pytest.skip(f"cannot make an ext4 image here: {mkfs.stderr.strip() or 'mkfs.ext4 failed'}")
        command = ["mount", "-o", "loop", str(image), str(mnt)]
    rc = subprocess.run(command, capture_output=True, text=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a {request.param} here: {rc.stderr.strip()}")
    for leftover in ("lost+found",):
        if (mnt / leftover).exists():
            (mnt / leftover).rmdir()
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def moved(before: int, after: int, expected: int) -> bool:
    """statvfs moved by the reservation: exactly on tmpfs, plus at most a few blocks of
    extent metadata on a disk filesystem."""
    return expected <= before - after <= expected + 64 * 1024


# ---- the native component ----

def test_native_reservation_holds_blocks_and_cleans_up(tmp_path):
    r = _native._reserve_disk(tmp_path, "named", 3 * MIB, 0)
    assert r.named and not r.unnamed and r.path == str(tmp_path / "named")
    assert blocks(r.fd) >= 3 * MIB and os.fstat(r.fd).st_size == 3 * MIB
    assert os.stat(r.path).st_mode & 0o777 == 0o600
    assert fcntl.fcntl(r.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    r.resize(5 * MIB)
    assert r.allocated_bytes() >= 5 * MIB and os.fstat(r.fd).st_size == 5 * MIB
    r.resize(1 * MIB)
    assert MIB <= r.allocated_bytes() < MIB + 64 * 1024
    r.release()
    assert r.released and listing(tmp_path) == []
    r.release()  # idempotent
    with pytest.raises(OSError) as err:
        _native._reserve_disk(tmp_path, "x", 0, 0)
    assert err.value.errno == errno.EINVAL and "pa_disk_reserve" in str(err.value)


def test_native_tmpfile_is_unnamed_until_linked(tmp_path):
    r = _native._reserve_disk(tmp_path, None, 2 * MIB, _native.DISK_TMPFILE | _native.DISK_KEEP_SIZE)
    if not r.unnamed:
        pytest.skip(f"no O_TMPFILE on the filesystem of {tmp_path}")
    assert listing(tmp_path) == [] and blocks(r.fd) >= 2 * MIB and os.fstat(r.fd).st_size == 0
    r.link(tmp_path / "linked")
    assert listing(tmp_path) == ["linked"] and r.named and blocks(tmp_path / "linked") >= 2 * MIB
    fd = r.detach()
    r.release()
    assert listing(tmp_path) == ["linked"]  # the consumer's now
    os.close(fd)


def test_native_ioprio_round_trip():
    saved = _native.ioprio_get(0)
    try:
        _native.ioprio_set(0, parse_io_priority("best-effort:6"))
        assert _native.ioprio_get(threading.get_native_id()) == (2 << 13 | 6)
        with pytest.raises(OSError) as err:
            _native.ioprio_set(0, 5 << 13)
        assert err.value.errno == errno.EINVAL
    finally:
        _native.ioprio_set(0, saved)
    assert _native.ioprio_get(0) == saved


# ---- file mode ----

def test_file_mode_hands_over_a_preallocated_file(strategy, tmp_path):
    grant = strategy.allocate(request(4, tmp_path, name="wal"), 4, None)
    assert grant.amount == 4.0
    facts = strategy.describe(grant.handle)
    assert facts["allocated_bytes"] >= 4 * MIB and facts["keep_size"]
    if facts["unnamed"]:
        assert listing(tmp_path) == []  # an O_TMPFILE: nothing to clean up after a crash
    claim = strategy.claim(grant.handle)
    assert isinstance(claim, DiskClaim) and claim.path == str(tmp_path / "wal")
    assert listing(tmp_path) == ["wal"]
    st = os.fstat(claim.fd)
    assert st.st_blocks * 512 >= 4 * MIB and st.st_size == 0 and st.st_mode & 0o777 == 0o600
    assert os.path.samestat(st, os.stat(claim.path))
    assert fcntl.fcntl(claim.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    before = blocks(claim.fd)
    os.write(claim.fd, b"x" * (4 * MIB))  # lands in the reserved blocks
    assert blocks(claim.fd) == before
    strategy.release(grant.handle)
    assert listing(tmp_path) == ["wal"]  # handed over: release leaves the consumer's file
    os.close(claim.fd)


def test_file_mode_without_keep_size_and_without_tmpfile(tmp_path, private_affinity_journal):
    strategy = DiskStrategy(headroom_mib=0, prefer_tmpfile=False)
    grant = strategy.allocate(request(2, tmp_path, keep_size=False), 2, None)
    hidden = listing(tmp_path)
    assert len(hidden) == 1 and hidden[0].startswith(".prealloc-reserve-")
    assert os.stat(tmp_path / hidden[0]).st_size == 2 * MIB
    entries = [p for p in private_affinity_journal.iterdir() if p.suffix == ".json"]
    assert len(entries) == 1  # a named reserve file outlives a crash: journaled
    claim = strategy.claim(grant.handle)
    assert listing(tmp_path) == [os.path.basename(claim.path)]
    assert [p for p in private_affinity_journal.iterdir() if p.suffix == ".json"] == []
    strategy.release(grant.handle)
    os.close(claim.fd)


def test_release_and_expiry_of_an_unclaimed_reservation_remove_it(tmp_path):
    for prefer_tmpfile in (True, False):
        strategy = DiskStrategy(headroom_mib=0, prefer_tmpfile=prefer_tmpfile)
        grant = strategy.allocate(request(2, tmp_path), 2, None)
        fd = grant.handle.reservation.fd
        st = os.fstat(fd)
        strategy.release(grant.handle)  # what expiry does
        assert listing(tmp_path) == []
        # the descriptor is closed: fd is free or names another file now
        try:
            assert not os.path.samestat(os.fstat(fd), st)
        except OSError as exc:
            assert exc.errno == errno.EBADF
        strategy.release(grant.handle)  # twice: no error
        with pytest.raises(AllocationError, match="released"):
            strategy.claim(grant.handle)


def test_adjust_grows_and_shrinks_the_blocks(strategy, tmp_path):
    grant = strategy.allocate(request(2, tmp_path), 2, None)
    assert strategy.adjust(grant.handle, 6) == 6.0
    assert grant.handle.reservation.allocated_bytes() >= 6 * MIB
    assert strategy.adjust(grant.handle, 1) == 1.0
    assert MIB <= grant.handle.reservation.allocated_bytes() < MIB + 64 * 1024
    claim = strategy.claim(grant.handle)
    with pytest.raises(AllocationError, match="handed over"):
        strategy.adjust(grant.handle, 2)
    strategy.release(grant.handle)
    os.close(claim.fd)


# ---- ballast mode ----

def test_ballast_is_released_at_claim(tmp_path):
    strategy = DiskStrategy(headroom_mib=0, prefer_tmpfile=False)
    grant = strategy.allocate(request(3, tmp_path, mode="ballast"), 3, None)
    (hidden,) = listing(tmp_path)
    assert blocks(tmp_path / hidden) >= 3 * MIB
    claim = strategy.claim(grant.handle)
    assert claim.mode == "ballast" and claim.fd is None and claim.reserved_bytes == 3 * MIB
    assert listing(tmp_path) == []
    strategy.release(grant.handle)


# ---- on a small filesystem of our own: statvfs and the ENOSPC race ----

def test_statvfs_moves_by_the_reservation_and_comes_back(small_fs):
    strategy = DiskStrategy(headroom_mib=0)
    before = free_bytes(small_fs)
    file_grant = strategy.allocate(request(8, small_fs), 8, None)
    assert moved(before, free_bytes(small_fs), 8 * MIB)
    ballast = strategy.allocate(request(4, small_fs, mode="ballast"), 4, None)
    assert moved(before, free_bytes(small_fs), 12 * MIB)
    strategy.claim(ballast.handle)
    assert moved(before, free_bytes(small_fs), 8 * MIB)  # the ballast went back at claim
    strategy.adjust(file_grant.handle, 2)
    assert moved(before, free_bytes(small_fs), 2 * MIB)
    strategy.release(file_grant.handle)
    strategy.release(ballast.handle)
    assert free_bytes(small_fs) == before


def test_reserved_writes_succeed_while_another_writer_gets_enospc(small_fs):
    strategy = DiskStrategy(headroom_mib=0)
    grant = strategy.allocate(request(12, small_fs, name="recording"), 12, None)
    # another writer fills the filesystem
    with open(small_fs / "other", "wb") as other:
        with pytest.raises(OSError) as err:
            while True:
                other.write(b"y" * MIB)
                other.flush()
    assert err.value.errno == errno.ENOSPC
    assert free_bytes(small_fs) < MIB
    claim = strategy.claim(grant.handle)
    chunk = b"z" * MIB
    for _ in range(12):
        assert os.write(claim.fd, chunk) == MIB  # no ENOSPC: the blocks were ours
    os.fsync(claim.fd)
    assert os.fstat(claim.fd).st_size == 12 * MIB
    os.close(claim.fd)
    strategy.release(grant.handle)


def test_more_than_is_free_is_insufficient_and_leaves_nothing(small_fs):
    strategy = DiskStrategy(headroom_mib=4)
    before = free_bytes(small_fs)
    free_mib = before // MIB
    with pytest.raises(InsufficientResources, match="headroom"):
        strategy.allocate(request(free_mib - 2, small_fs), free_mib - 2, None)
    half = free_mib // 2
    grant = strategy.allocate(request(half, small_fs), half, None)
    with pytest.raises(InsufficientResources):
        strategy.adjust(grant.handle, free_mib + 1)
    assert moved(before, free_bytes(small_fs), half * MIB)  # the failed growth left nothing
    # past the headroom check, the kernel's ENOSPC (fallocate may have allocated part of
    # the range before running out): the native resize gives that part back
    held = free_bytes(small_fs)
    with pytest.raises(OSError) as err:
        grant.handle.reservation.resize((free_mib + 1) * MIB)
    assert err.value.errno == errno.ENOSPC and free_bytes(small_fs) == held
    assert grant.handle.reservation.size == half * MIB
    strategy.release(grant.handle)
    assert listing(small_fs) == [] and free_bytes(small_fs) == before


# ---- bad input ----

@pytest.mark.parametrize("props, match", [
    ({"mode": "sparse"}, "mode"), ({"io_priority": "urgent"}, "io_priority"),
    ({"io_priority": "best-effort:9"}, "level"), ({"keep_size": "yes"}, "keep_size"),
    ({"name": "a/b"}, "name"), ({"directory": "/nonexistent-prealloc"}, "directory"),
])
def test_bad_properties_name_the_property_and_change_nothing(strategy, tmp_path, props, match):
    req = request(1, tmp_path)
    req.metadata.custom_properties.update(props)
    with pytest.raises(AllocationError, match=match):
        strategy.allocate(req, 1, None)
    assert listing(tmp_path) == []


def test_priority_strings():
    assert parse_io_priority("realtime:2") == 1 << 13 | 2
    assert parse_io_priority("be") == 2 << 13
    assert parse_io_priority("idle") == 3 << 13
    assert format_io_priority(parse_io_priority("best-effort:5")) == "best-effort:5"
    with pytest.raises(ValueError, match="io_priority"):
        parse_io_priority(3)
    with pytest.raises(ValueError):
        DiskStrategy(headroom_mib=-1)


# ---- I/O priority ----

def test_priority_of_the_claiming_thread_is_set_and_restored(strategy, tmp_path):
    grant = strategy.allocate(request(1, tmp_path, mode="none", io_priority="best-effort:3"), 1, None)
    assert grant.amount == 0.0
    results = {}

    def consumer() -> None:
        before = _native.ioprio_get(0)
        claim = strategy.claim(grant.handle)
        results["during"] = _native.ioprio_get(0)
        results["claim"] = claim
        strategy.release(grant.handle)
        results["after"], results["before"] = _native.ioprio_get(0), before

    t = threading.Thread(target=consumer)
    t.start()
    t.join()
    assert results["during"] == parse_io_priority("best-effort:3")
    assert results["after"] == results["before"]
    assert results["claim"].io_priority == "best-effort:3"
    assert "effect" not in strategy.describe(grant.handle)  # says io_priority_effect instead
    assert strategy.describe(grant.handle)["io_priority_effect"].split(":")[0] in (
        "effective", "class only", "no effect", "unknown")


def test_priority_of_a_target_process_covers_every_thread(strategy, tmp_path, child, private_affinity_journal):
    tids = sorted(int(t) for t in os.listdir(f"/proc/{child.pid}/task"))
    before = {t: _native.ioprio_get(t) for t in tids}
    value = parse_io_priority("best-effort:5")
    grant = strategy.allocate(request(1, tmp_path, pid=child.pid, io_priority="best-effort:5"), 1, None)
    assert {t: _native.ioprio_get(t) for t in tids} == {t: value for t in tids}
    assert len([p for p in private_affinity_journal.iterdir() if p.suffix == ".json"]) == 1
    _native.ioprio_set(tids[-1], parse_io_priority("best-effort:1"))  # someone else changes one
    strategy.release(grant.handle)
    after = {t: _native.ioprio_get(t) for t in tids}
    assert {t: after[t] for t in tids[:-1]} == {t: before[t] for t in tids[:-1]}
    assert after[tids[-1]] == parse_io_priority("best-effort:1")  # left alone
    assert [p for p in private_affinity_journal.iterdir() if p.suffix == ".json"] == []
    assert listing(tmp_path) == []


def test_realtime_needs_privilege(strategy, tmp_path):
    grant = strategy.allocate(request(1, tmp_path, mode="none", io_priority="realtime:1"), 1, None)
    saved = _native.ioprio_get(0)
    try:
        if ROOT:
            strategy.claim(grant.handle)
            assert _native.ioprio_get(0) == parse_io_priority("realtime:1")
        else:
            with pytest.raises(AllocationError, match="I/O priority"):
                strategy.claim(grant.handle)
            assert _native.ioprio_get(0) == saved
    finally:
        strategy.release(grant.handle)
    assert _native.ioprio_get(0) == saved


def test_a_gone_target_fails_the_allocation_and_leaves_nothing(strategy, tmp_path, private_affinity_journal):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(AllocationError, match="cannot set the I/O priority"):
        strategy.allocate(request(2, tmp_path, pid=gone.pid, io_priority="best-effort:0"), 2, None)
    assert listing(tmp_path) == []
    assert [p for p in private_affinity_journal.iterdir() if p.suffix == ".json"] == []


# ---- the cgroup weight, the second mechanism ----

@pytest.fixture
def child_in_blkio_cgroup(child):
    """The child moved into a v1 blkio (or v2) cgroup of our own, which has a weight file."""
    if not ROOT:
        pytest.skip("creating a cgroup and moving a process into it needs root")
    from prealloc.monitors.disk import _cgroup_mounts
    mounts = _cgroup_mounts()
    base = mounts.get("blkio")
    if base is None:
        pytest.skip("no cgroup v1 blkio hierarchy mounted here")
    group = base / f"prealloc-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(child.pid))
        if not any((group / n).exists() for n in ("blkio.weight", "blkio.bfq.weight")):
            pytest.skip("the blkio cgroup has no weight file (neither CFQ nor BFQ)")
        yield child, group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (base / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_io_weight_of_a_target_cgroup_is_set_reported_and_restored(tmp_path, child_in_blkio_cgroup,
                                                                   private_affinity_journal):
    from prealloc.monitors.disk import read_io_weight
    child, group = child_in_blkio_cgroup
    strategy = DiskStrategy(headroom_mib=0)
    weight_file = next(group / n for n in ("blkio.weight", "blkio.bfq.weight") if (group / n).exists())
    before = read_io_weight(weight_file)
    grant = strategy.allocate(request(1, tmp_path, pid=child.pid, mode="none", io_weight=500), 1, None)
    assert read_io_weight(weight_file) == 500
    report = strategy.describe(grant.handle)["io_weight"]
    assert report["applied"] and report["file"] == str(weight_file) and report["previous"] == before
    assert report["effect"].startswith(("effective", "no effect"))
    assert len([p for p in private_affinity_journal.iterdir() if p.suffix == ".json"]) == 1
    strategy.release(grant.handle)
    assert read_io_weight(weight_file) == before
    assert [p for p in private_affinity_journal.iterdir() if p.suffix == ".json"] == []


def test_io_weight_where_there_is_no_weight_file_is_reported(strategy, tmp_path):
    from prealloc.monitors.disk import cgroup_io_weight_files
    if any(cgroup_io_weight_files(os.getpid()).values()):
        pytest.skip("this process's cgroup has a weight file; the absent case cannot be shown here")
    grant = strategy.allocate(request(1, tmp_path, mode="none", io_weight=200), 1, None)
    strategy.claim(grant.handle)
    report = strategy.describe(grant.handle)["io_weight"]
    assert report["applied"] is False and report["reason"]
    strategy.release(grant.handle)
    with pytest.raises(AllocationError, match="io_weight"):
        strategy.allocate(request(1, tmp_path, io_weight=5000), 1, None)


def test_a_claim_naming_a_process_sets_its_priority_not_the_callers(strategy, tmp_path, child):
    tids = sorted(int(t) for t in os.listdir(f"/proc/{child.pid}/task"))
    before = {t: _native.ioprio_get(t) for t in tids}
    mine = _native.ioprio_get(0)
    grant = strategy.allocate(request(1, tmp_path, mode="none", io_priority="idle"), 1, None)
    strategy.claim(grant.handle, target_process_id=child.pid)
    assert {_native.ioprio_get(t) for t in tids} == {parse_io_priority("idle")}
    assert _native.ioprio_get(0) == mine
    strategy.release(grant.handle)
    assert {t: _native.ioprio_get(t) for t in tids} == before


def test_a_filesystem_without_fallocate_is_said_so_not_emulated(tmp_path):
    """ext2 (no extents) has no fallocate; glibc's posix_fallocate would quietly write a
    byte per block instead. We say "not supported on this filesystem" and leave nothing."""
    if not ROOT:
        pytest.skip("mounting an ext2 image needs root")
    image, mnt = tmp_path / "ext2.img", tmp_path / "ext2"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    mkfs = subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], capture_output=True, text=True)
    if mkfs.returncode != 0:
        pytest.skip(f"cannot make an ext2 image here: {mkfs.stderr.strip() or 'mkfs.ext2 failed'}")
    rc = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount ext2 here: {rc.stderr.strip()}")
    try:
        before = sorted(os.listdir(mnt))
        with pytest.raises(OSError) as err:
            _native._reserve_disk(mnt, "x", MIB, 0)
        assert err.value.errno == errno.EOPNOTSUPP
        strategy = DiskStrategy(headroom_mib=0)
        for prefer_tmpfile in (True, False):
            strategy.prefer_tmpfile = prefer_tmpfile
            with pytest.raises(AllocationError, match="not supported on this filesystem"):
                strategy.allocate(request(1, mnt, keep_size=False), 1, None)
        assert sorted(os.listdir(mnt)) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
