"""Memory reservation through the OS: VmRSS, VmLck, mincore, smaps, a second process."""
from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prealloc import core
from osutil import anon_huge_pages_kib, lock_size, thp_mode, vm_lck, vm_rss

MiB = 1 << 20
SIZE = 64 * MiB
# Other allocations of the interpreter move VmRSS by a little; a reservation that did
# nothing would miss these bands by SIZE.
SLACK = 4 * MiB


def test_populate_moves_vm_rss_and_release_gives_it_back():
    before = vm_rss()
    region = core.reserve_memory(SIZE)
    assert region.populated and region.size == SIZE
    assert region.populate_method in ("madvise", "map_populate", "touch")
    grown = vm_rss() - before
    assert SIZE - SLACK <= grown <= SIZE + SLACK
    assert region.resident_bytes() == SIZE
    region.release()
    assert region.released and region.size == 0
    assert abs(vm_rss() - before) <= SLACK


def test_without_populate_nothing_is_resident():
    region = core.reserve_memory(SIZE, populate=False)
    try:
        assert not region.populated
        assert region.resident_bytes() <= SLACK
    finally:
        region.release()


def test_lock_moves_vm_lck_exactly_and_release_restores():
    # as much as RLIMIT_MEMLOCK lets an ordinary user lock (8 MiB by default), SIZE for root
    size = lock_size(SIZE)
    before = vm_lck()
    with core.reserve_memory(size, lock=True) as region:
        assert region.locked, f"lock refused: errno {region.lock_error}"
        assert region.lock_error == 0
        assert vm_lck() - before == size
    assert vm_lck() == before


def test_buffer_is_writable_and_zero_copy():
    with core.reserve_memory(4 * MiB) as region:
        view = memoryview(region)
        assert not view.readonly and view.nbytes == region.size and view.format == "B"
        array = np.frombuffer(region, dtype=np.uint64)
        assert array.ctypes.data == region.address  # the same memory, no copy
        array[:] = 7
        assert view[8] == 7 and view[0] == 7
        view[0] = 9
        assert array[0] == 9
        del array, view


def test_release_with_live_view_defers_unmap_until_last_view_goes():
    region = core.reserve_memory(SIZE)
    base = vm_rss()
    view = memoryview(region)
    array = np.frombuffer(region, dtype=np.uint8)
    region.release()
    assert region.released and region.exports == 2
    view[SIZE - 1] = 5  # still mapped: writing must not crash
    assert array[SIZE - 1] == 5
    with pytest.raises(BufferError):
        memoryview(region)
    assert vm_rss() >= base - SLACK  # nothing unmapped yet
    view.release()
    assert vm_rss() >= base - SLACK
    del array
    gc.collect()
    assert region.exports == 0 and region.size == 0
    assert vm_rss() <= base - SIZE + SLACK


def test_resize_in_place_keeps_address_and_lock_follows():
    # 16 MiB, or what RLIMIT_MEMLOCK leaves an ordinary user (8 MiB by default)
    large = lock_size(16 * MiB, at_least=4 * MiB)
    small = large // 4 // core.page_size() * core.page_size()
    before = vm_lck()
    # Shrinking first leaves a hole above the region, so the growth back has room in
    # place (mappings are placed top-down: the space above a fresh one is usually taken).
    region = core.reserve_memory(large, lock=True)
    address = region.address
    try:
        assert region.locked, f"lock refused: errno {region.lock_error}"
        region.resize(small, may_move=False)
        assert region.address == address and region.size == small
        assert vm_lck() - before == small
        region.resize(large, may_move=False)
        assert region.address == address and region.size == large
        assert vm_lck() - before == large
        assert region.resident_bytes() == large
    finally:
        region.release()
    assert vm_lck() == before


def test_resize_that_cannot_happen_in_place_changes_nothing_then_moves():
    region = core.reserve_memory(4 * MiB)
    address = region.address
    neighbour = mmap.mmap(-1, 4 * MiB)  # likely right below; growth in place may collide
    try:
        np.frombuffer(region, dtype=np.uint8)[:4] = [1, 2, 3, 4]
        try:
            region.resize(64 * MiB, may_move=False)
            grew_in_place = True
        except OSError:
            grew_in_place = False
            assert region.size == 4 * MiB and region.address == address  # unchanged
        if not grew_in_place:
            region.resize(64 * MiB, may_move=True)
        assert region.size == 64 * MiB and region.resident_bytes() == 64 * MiB
        assert bytes(memoryview(region)[:4]) == bytes([1, 2, 3, 4])  # contents moved along
    finally:
        region.release()
        neighbour.close()


def test_resize_with_live_view_only_grows_in_place():
    region = core.reserve_memory(4 * MiB)
    view = memoryview(region)
    with pytest.raises(BufferError):
        region.resize(2 * MiB)
    with pytest.raises(BufferError):
        region.resize(8 * MiB, may_move=True)
    assert region.size == 4 * MiB and view.nbytes == 4 * MiB
    view.release()
    region.resize(8 * MiB)  # no views: may move
    assert region.size == 8 * MiB
    region.release()


@pytest.mark.parametrize("bad", [0, -1, -(1 << 40)])
def test_bad_sizes_raise_value_error_and_map_nothing(bad):
    before = vm_rss()
    with pytest.raises(ValueError):
        core.reserve_memory(bad)
    assert abs(vm_rss() - before) <= SLACK


def test_size_larger_than_the_machine_is_refused():
    with pytest.raises(ValueError, match="machine has"):
        core.reserve_memory(core.physical_memory() + 1)


def test_non_int_size_is_a_type_error():
    with pytest.raises(TypeError):
        core.reserve_memory(1.5)  # type: ignore[arg-type]


def test_huge_pages_request_is_reported_and_backed_by_thp():
    mode = thp_mode()
    with core.reserve_memory(8 * MiB, huge_pages=True) as region:
        if mode == "never":
            assert not region.huge_pages and region.huge_pages_error != 0
            pytest.skip("transparent huge pages are disabled on this machine ([never])")
        assert region.huge_pages and region.address % core.HUGE_PAGE_SIZE == 0
        # the kernel may still fall back to small pages under fragmentation; most of a
        # freshly populated, aligned, advised region is huge on an idle machine
        assert anon_huge_pages_kib(region.address) * 1024 >= 4 * MiB


def test_shareable_region_is_seen_by_another_process():
    with core.reserve_memory(2 * MiB, shareable=True) as region:
        assert region.shareable and region.fd is not None
        np.frombuffer(region, dtype=np.uint8)[:16] = np.arange(16, dtype=np.uint8)
        code = textwrap.dedent(
            f"""
            import mmap, sys
            m = mmap.mmap({region.fd}, {region.size}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            assert bytes(m[:16]) == bytes(range(16)), bytes(m[:16])
            m[16] = 99
            """
        )
        subprocess.run([sys.executable, "-c", code], pass_fds=[region.fd], check=True)
        assert memoryview(region)[16] == 99  # the child's write is visible here


LOCK_REFUSED_CHILD = textwrap.dedent(
    """
    import errno, os, resource, sys
    sys.path[:0] = {paths!r}
    from osutil import drop_capability, CAP_IPC_LOCK
    # As root, CAP_IPC_LOCK bypasses RLIMIT_MEMLOCK: drop it, then lower the limit.
    drop_capability(CAP_IPC_LOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    from prealloc import core
    from osutil import vm_rss
    r = core.reserve_memory(16 << 20, lock=True)
    assert not r.locked and r.lock_error in (errno.EPERM, errno.ENOMEM, errno.EAGAIN), r.lock_error
    assert r.populated and r.resident_bytes() == r.size
    r.release()
    before = vm_rss()
    try:
        core.reserve_memory(16 << 20, require_lock=True)
    except OSError as exc:
        assert exc.errno in (errno.EPERM, errno.ENOMEM, errno.EAGAIN), exc
    else:
        raise AssertionError("require_lock did not raise")
    assert abs(vm_rss() - before) < (4 << 20), "a refused reservation left memory mapped"
    print("ok", r.lock_error)
    """
)


def test_lock_refused_is_reported_not_fatal_and_required_lock_raises():
    paths = [os.path.dirname(__file__)]
    proc = subprocess.run([sys.executable, "-c", LOCK_REFUSED_CHILD.format(paths=paths)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_reserved_pages_are_resident_where_a_cold_map_is_not():
    # Not a timing test: the mechanism behind the first-touch speed-up, seen by mincore
    with core.reserve_memory(SIZE) as region:
        assert region.resident_bytes() == SIZE
    cold = mmap.mmap(-1, SIZE)
    try:
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(cold))
        vec = (ctypes.c_ubyte * (SIZE // mmap.PAGESIZE))()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(SIZE), vec) == 0
        assert sum(b & 1 for b in vec) * mmap.PAGESIZE <= SLACK
    finally:
        del address
        cold.close()
