"""The MEMORY strategy, called directly (not through the engine): what it plans is what
it maps, huge pages by default for large reservations, a release under a live view is
deferred until the unmap, lock refusals are reported once and clearly, absurd sizes are
refused; a state machine holds the charges to what mincore says is resident. Checked
against mincore, /proc/self/smaps and VmLck."""
from __future__ import annotations

import ctypes
import errno
import gc
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from osutil import vm_lck
from prealloc import _native, core
from prealloc.strategies.base import AllocationError, DeferredRelease, InsufficientResources
from prealloc.strategies.memory import MemoryAllocationStrategy, thp_honours_madvise, thp_mode
from prealloc.types import ResourceRequest, ResourceType

MiB = 1 << 20
PAGE = core.page_size()
HUGE = core.HUGE_PAGE_SIZE


def request(mib: float) -> ResourceRequest:
    return ResourceRequest(ResourceType.MEMORY, mib)


def mapping(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry (field -> text) of the mapping holding address."""
    current: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            if current is not None:
                return current
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            if lo <= address < hi:
                current = {"start": str(lo), "end": str(hi)}
        elif current is not None and ":" in line:
            key, value = line.split(":", 1)
            current[key] = value.strip()
    return current


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident(address: int, length: int) -> int | None:
    """Bytes of [address, address + length) resident in RAM (mincore), None where part
    of the range is not mapped (ENOMEM). Exact per range, unlike a VMA's Rss: the kernel
    merges adjacent anonymous mappings into one VMA."""
    vector = ctypes.create_string_buffer(length // PAGE)
    if _libc.mincore(address, length, vector) != 0:
        assert ctypes.get_errno() == errno.ENOMEM, os.strerror(ctypes.get_errno())
        return None
    return sum(b & 1 for b in vector.raw) * PAGE


def rss_bytes(region) -> int:
    """Resident bytes of the region's whole mapping (its size rounded up to a huge page
    when huge pages were asked for)."""
    length = region.size
    if region.requested_flags & _native.MEM_HUGE_PAGES:
        length = -(-length // HUGE) * HUGE
    found = resident(region.address, length)
    assert found is not None, f"no mapping at {region.address:#x}"
    return found


def allocate(strategy: MemoryAllocationStrategy, mib: float):
    return strategy.allocate(request(mib), mib, None)


# -- what is planned is what is mapped --------------------------------------------------

def test_base_pages_plan_and_map_whole_pages():
    strategy = MemoryAllocationStrategy(huge_pages=False)
    planned = strategy.planned_amount(request(0.01), 0.01)
    assert planned * MiB == 3 * PAGE if PAGE == 4096 else planned * MiB % PAGE == 0
    grant = allocate(strategy, 0.01)
    try:
        assert grant.amount == planned
        assert rss_bytes(grant.handle) == planned * MiB  # populated: every page resident
        details = strategy.describe(grant.handle)
        assert details["mapped_bytes"] == details["resident_bytes"] == planned * MiB
        assert details["huge_pages_requested"] is False
    finally:
        strategy.release(grant.handle)


def test_huge_pages_plan_charge_and_report_the_whole_block():
    strategy = MemoryAllocationStrategy(huge_pages=True)
    assert strategy.planned_amount(request(0.01), 0.01) == HUGE / MiB
    assert strategy.planned_amount(request(2.01), 2.01) == 2 * HUGE / MiB
    grant = allocate(strategy, 0.01)
    region = grant.handle
    try:
        assert grant.amount == HUGE / MiB
        assert region.size == 3 * PAGE  # usable: what was asked, page-rounded
        # the OS: the whole block is mapped and resident (populate covers the mapping)
        entry = mapping(region.address)
        assert int(entry["end"]) - int(entry["start"]) >= HUGE
        assert rss_bytes(region) == HUGE
        details = strategy.describe(region)
        assert details["mapped_bytes"] == HUGE and details["resident_bytes"] == HUGE
        assert details["bytes"] == 3 * PAGE and details["huge_pages_requested"] is True
    finally:
        strategy.release(region)


def test_planned_resize_keeps_the_handles_huge_page_choice():
    strategy = MemoryAllocationStrategy(huge_pages=True)
    grant = allocate(strategy, 3)
    try:
        assert grant.amount == 4.0
        assert strategy.planned_resize(grant.handle, 4.5) == 6.0
        assert strategy.adjust(grant.handle, 4.5) == 6.0
        assert rss_bytes(grant.handle) == 6 * MiB
        assert strategy.adjust(grant.handle, 1) == 2.0
        assert rss_bytes(grant.handle) == 2 * MiB
    finally:
        strategy.release(grant.handle)


@pytest.mark.skipif(not thp_honours_madvise(),
                    reason=f"THP mode is {thp_mode()!r} or hpage_pmd_size is not {HUGE}: no huge pages by default")
def test_default_uses_huge_pages_for_a_few_huge_pages_and_base_pages_below():
    strategy = MemoryAllocationStrategy()
    assert strategy.huge_pages is None
    big = allocate(strategy, 16)
    small = allocate(strategy, 4)
    try:
        # MADV_HUGEPAGE shows as the "hg" VmFlag of the mapping
        entry = mapping(big.handle.address)
        assert "hg" in entry["VmFlags"].split()
        # and the kernel gave it huge pages (at least one of its 8 blocks: compaction may
        # fail for some on a fragmented machine, not for all with defrag honouring madvise)
        assert int(entry["AnonHugePages"].split()[0]) > 0, entry
        assert big.handle.address % HUGE == 0 and big.handle.huge_pages
        assert "hg" not in mapping(small.handle.address)["VmFlags"].split()
        assert strategy.describe(big.handle)["huge_pages_requested"] is True
        assert strategy.describe(small.handle)["huge_pages_policy"] == "auto"
        assert strategy.planned_amount(request(15.5), 15.5) == 16.0
        assert strategy.planned_amount(request(7.9), 7.9) == pytest.approx(7.90234375)
    finally:
        strategy.release(big.handle)
        strategy.release(small.handle)


def test_explicit_huge_pages_false_is_honoured_for_large_reservations():
    strategy = MemoryAllocationStrategy(huge_pages=False)
    grant = allocate(strategy, 16)
    try:
        assert "hg" not in mapping(grant.handle.address)["VmFlags"].split()
        assert grant.amount == 16.0
    finally:
        strategy.release(grant.handle)


# -- absurd sizes ----------------------------------------------------------------------

@pytest.mark.parametrize("amount", [1e18, 1e300, float(core.physical_memory() // MiB + 1)])
def test_amounts_beyond_the_machine_are_a_clear_value_error(amount):
    strategy = MemoryAllocationStrategy()
    with pytest.raises(ValueError, match="more than this machine"):
        strategy.planned_amount(request(1), amount)
    with pytest.raises(AllocationError, match="more than this machine"):
        allocate(strategy, amount)
    grant = allocate(strategy, 1)
    try:
        before = grant.handle.size
        with pytest.raises(ValueError, match="more than this machine"):
            strategy.adjust(grant.handle, amount)
        assert grant.handle.size == before and rss_bytes(grant.handle) == before
    finally:
        strategy.release(grant.handle)


@pytest.mark.parametrize("amount, error", [(float("inf"), ValueError), (float("nan"), ValueError),
                                           (0, ValueError), (-1.0, ValueError),
                                           ("1", TypeError), (True, TypeError), (None, TypeError)])
def test_malformed_amounts_name_the_argument(amount, error):
    strategy = MemoryAllocationStrategy()
    with pytest.raises(error, match="amount"):
        strategy.planned_amount(request(1), amount)


# -- release under a live view ---------------------------------------------------------

def test_release_without_views_unmaps_now_and_returns_none():
    strategy = MemoryAllocationStrategy(huge_pages=False)
    grant = allocate(strategy, 4)
    address = grant.handle.address
    assert resident(address, 4 * MiB) == 4 * MiB
    assert strategy.release(grant.handle) is None
    assert resident(address, 4 * MiB) is None  # unmapped
    assert strategy.release(grant.handle) is None  # again: no error, nothing deferred


def test_release_under_a_view_is_deferred_until_the_unmap():
    strategy = MemoryAllocationStrategy(huge_pages=False)
    grant = allocate(strategy, 4)
    region, address = grant.handle, grant.handle.address
    view = memoryview(region)
    view[:4] = b"live"
    deferred = strategy.release(region)
    assert isinstance(deferred, DeferredRelease) and not deferred.is_done
    fired: list[str] = []
    deferred.add_done_callback(lambda: fired.append(threading.current_thread().name))
    assert resident(address, 4 * MiB) == 4 * MiB and bytes(view[:4]) == b"live"  # still mapped
    assert strategy.release(region) is deferred  # released again: the same pending release
    del view
    assert deferred.is_done and len(fired) == 1
    assert resident(address, 4 * MiB) is None  # unmapped now
    assert strategy.release(region) is None and strategy._pending == {}


def test_deferred_release_completes_in_a_gc_pass_and_on_another_thread():
    strategy = MemoryAllocationStrategy(huge_pages=False)
    grant = allocate(strategy, 2)
    array = np.frombuffer(grant.handle, dtype=np.uint8)
    cycle: list = [array]
    cycle.append(cycle)  # only the cycle collector frees it
    del array
    deferred = strategy.release(grant.handle)
    assert deferred is not None and not deferred.is_done
    fired: list[int] = []
    deferred.add_done_callback(lambda: fired.append(1))
    del cycle
    gc.collect()
    assert deferred.is_done and fired == [1]

    grant = allocate(strategy, 2)
    holder = [memoryview(grant.handle)]
    deferred = strategy.release(grant.handle)
    names: list[str] = []
    deferred.add_done_callback(lambda: names.append(threading.current_thread().name))
    thread = threading.Thread(target=holder.clear, name="view-dropper")
    thread.start()
    thread.join()
    assert names == ["view-dropper"]


# -- locking ---------------------------------------------------------------------------

def test_lock_within_the_limit_shows_in_vmlck():
    strategy = MemoryAllocationStrategy(lock=True, huge_pages=False)
    before = vm_lck()
    grant = allocate(strategy, 2)
    try:
        assert grant.handle.locked and strategy.describe(grant.handle)["locked"] is True
        assert vm_lck() - before == 2 * MiB
    finally:
        strategy.release(grant.handle)
    assert vm_lck() == before


LOCK_REFUSED = textwrap.dedent("""
    import json, logging, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from osutil import CAP_IPC_LOCK, drop_capability, vm_lck
    if os.geteuid() == 0:
        drop_capability(CAP_IPC_LOCK)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, hard))
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("prealloc").addHandler(Keep())
    from prealloc.strategies.base import AllocationError
    from prealloc.strategies.memory import MemoryAllocationStrategy
    from prealloc.types import ResourceRequest, ResourceType
    request = ResourceRequest(ResourceType.MEMORY, 4)
    best_effort = MemoryAllocationStrategy(lock=True, huge_pages=False)
    grants = [best_effort.allocate(request, 4, None) for _ in range(3)]
    out = {"locked": [g.handle.locked for g in grants], "vmlck": vm_lck(),
           "warnings": [m for m in records if "mlock" in m]}
    for g in grants:
        best_effort.release(g.handle)
    required = MemoryAllocationStrategy(require_lock=True, huge_pages=False)
    try:
        required.allocate(request, 4, None)
        out["required"] = None
    except AllocationError as exc:
        out["required"] = str(exc)
    from prealloc import _native, core
    try:
        core.reserve_memory(4 << 20, require_lock=True)
        out["core"] = None
    except OSError as exc:
        out["core"] = str(exc)
    print(json.dumps(out))
""")


def test_lock_refused_warns_once_and_require_lock_names_mlock_and_the_limit():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", LOCK_REFUSED, tests_dir], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["locked"] == [False, False, False] and out["vmlck"] == 0
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "RLIMIT_MEMLOCK is 1048576 bytes" in out["warnings"][0]
    message = out["required"]
    assert message is not None and "mlock" in message and "RLIMIT_MEMLOCK is 1048576 bytes" in message
    assert "CAP_IPC_LOCK not held" in message
    assert out["core"] is not None and "mlock of 4194304 bytes" in out["core"]
    assert "RLIMIT_MEMLOCK is 1048576 bytes" in out["core"]


def test_one_lock_warning_per_strategy_even_from_many_threads(caplog):
    # a best-effort lock that the machine refuses: more than RLIMIT_MEMLOCK allows,
    # unless this process may lock without limit (then there is nothing to warn about)
    strategy = MemoryAllocationStrategy(lock=True, huge_pages=False)
    grant = allocate(strategy, 1)
    locks_freely = grant.handle.locked and strategy._lock_limit_refuses(64 * MiB) is False
    strategy.release(grant.handle)
    if locks_freely:
        pytest.skip("this process locks memory without limit (CAP_IPC_LOCK): no refusal to warn about")
    caplog.set_level(logging.WARNING, logger="prealloc")
    grants = []
    threads = [threading.Thread(target=lambda: grants.append(allocate(strategy, 16))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(grants) == 4 and not any(g.handle.locked for g in grants)
        assert len([r for r in caplog.records if "mlock" in r.getMessage()]) == 1
    finally:
        for g in grants:
            strategy.release(g.handle)


# -- the ledger equals what is mapped, whatever the order of calls -----------------------

STRATEGIES = {"auto": MemoryAllocationStrategy(), "huge": MemoryAllocationStrategy(huge_pages=True),
              "base": MemoryAllocationStrategy(huge_pages=False)}


class Held:
    """One allocation as a quota ledger would see it: charged from allocate until the
    strategy says the memory is gone (release returned None, or its DeferredRelease ran)."""

    def __init__(self, grant, kind: str) -> None:
        self.region, self.kind, self.charged = grant.handle, kind, grant.amount
        self.views: list = []
        self.released = False
        self.gone = False


class LedgerMachine(RuleBasedStateMachine):
    """Allocate / view / drop views (directly, in a GC cycle, on another thread) / adjust
    / release in any order; after every step the charges of what is not gone equal the
    bytes resident in those regions (mincore), and what is gone is charged nothing."""

    holdings = Bundle("holdings")

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Held] = []

    @rule(target=holdings, kind=st.sampled_from(sorted(STRATEGIES)), mib=st.sampled_from([0.01, 0.5, 3, 9]))
    def allocate(self, kind, mib):
        strategy = STRATEGIES[kind]
        planned = strategy.planned_amount(request(mib), mib)
        grant = allocate(strategy, mib)
        assert grant.amount == planned
        held = Held(grant, kind)
        self.all.append(held)
        return held

    @rule(held=holdings)
    def take_view(self, held):
        if not held.released:
            held.views.append(memoryview(held.region))

    @rule(held=holdings, how=st.sampled_from(["del", "gc", "thread"]))
    def drop_view(self, held, how):
        if not held.views:
            return
        view = held.views.pop()
        if how == "gc":
            cycle: list = [view]
            cycle.append(cycle)
            del view, cycle
            gc.collect()
        elif how == "thread":
            box = [view]
            del view
            thread = threading.Thread(target=box.clear)
            thread.start()
            thread.join()
        else:
            del view

    @rule(held=holdings, mib=st.sampled_from([0.5, 2, 5]))
    def adjust(self, held, mib):
        if held.released:
            return
        strategy = STRATEGIES[held.kind]
        expected = strategy.planned_resize(held.region, mib)
        try:
            got = strategy.adjust(held.region, mib)
        except (AllocationError, InsufficientResources):
            assert held.views  # only live views may stop a resize here
            return
        assert got == expected
        held.charged = got

    @rule(held=consumes(holdings))
    def release(self, held):
        deferred = STRATEGIES[held.kind].release(held.region)
        held.released = True
        if deferred is None:
            assert not held.views
            held.gone = True
        else:
            assert held.views
            deferred.add_done_callback(lambda: setattr(held, "gone", True))

    @invariant()
    def ledger_matches_the_os(self):
        for held in self.all:
            if held.gone:
                assert held.region.size == 0 and not held.views
                continue
            mapped = int(held.charged * MiB)
            assert resident(held.region.address, mapped) == mapped, (held.kind, held.charged)

    def teardown(self):
        for held in self.all:
            held.views.clear()
            STRATEGIES[held.kind].release(held.region)


LedgerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None, database=None)
test_ledger_equals_what_is_mapped = LedgerMachine.TestCase
