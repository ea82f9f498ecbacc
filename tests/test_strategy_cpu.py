"""The CPU strategy, called directly (not through the engine): whole cores planned and
charged, a claim that pins the named process rather than the caller, adjust beyond the
machine refused without OSError. Checked through sched_getaffinity and
/proc/PID/status Cpus_allowed_list."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from osutil import cpus_allowed, thread_ids
from prealloc import core
from prealloc.strategies.base import AllocationError
from prealloc.strategies.cpu import CpuAllocationStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

ALLOWED = frozenset(os.sched_getaffinity(0))


def request(percent: float, pid: int | None = None) -> ResourceRequest:
    return ResourceRequest(ResourceType.CPU, percent, metadata=RequestMetadata(target_process_id=pid))


@pytest.fixture
def strategy(private_affinity_journal):
    s = CpuAllocationStrategy(core.CoreReservations(ALLOWED), exclusive=True)
    yield s
    s.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it)


# -- planned amounts -------------------------------------------------------------------

def test_planned_amount_is_whole_cores(strategy):
    assert strategy.planned_amount(request(1), 1) == 100.0
    assert strategy.planned_amount(request(100), 100) == 100.0
    assert strategy.planned_amount(request(100.5), 100.5) == 200.0 or len(ALLOWED) < 2


def test_more_cores_than_the_process_may_use_is_a_value_error(strategy):
    too_many = 100.0 * len(ALLOWED) + 1
    with pytest.raises(ValueError, match=f"may use {len(ALLOWED)}"):
        strategy.planned_amount(request(too_many), too_many)
    with pytest.raises(AllocationError, match="whole cores"):
        strategy.allocate(request(too_many), too_many, None)
    assert strategy.available_cores() == len(ALLOWED)  # nothing reserved


@pytest.mark.parametrize("amount, error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                           (0, ValueError), (-5, ValueError), (True, TypeError),
                                           ("100", TypeError)])
def test_malformed_amounts_name_the_argument(strategy, amount, error):
    with pytest.raises(error, match="amount"):
        strategy.planned_amount(request(100), amount)


# -- claim pins the named process ------------------------------------------------------

def test_claim_with_a_target_pins_that_process_not_the_calling_thread(strategy, child):
    before_self = os.sched_getaffinity(0)
    before_child = cpus_allowed(child.pid)
    grant = strategy.allocate(request(100), 100, None)  # no target at allocation
    handle = grant.handle
    try:
        cores = strategy.claim(handle, target_process_id=child.pid)
        assert len(cores) == 1 and cores <= ALLOWED
        for tid in thread_ids(child.pid):  # every thread of the target
            assert cpus_allowed(child.pid, tid) == set(cores)
        assert os.sched_getaffinity(0) == before_self  # the caller is left alone
        assert strategy.describe(handle)["claimed_processes"] == [child.pid]
    finally:
        strategy.release(handle)
    assert cpus_allowed(child.pid) == before_child


def test_claim_without_a_target_pins_the_calling_thread_only(strategy):
    before = os.sched_getaffinity(0)
    grant = strategy.allocate(request(100), 100, None)
    seen: dict[str, set[int]] = {}

    def consumer():
        seen["cores"] = set(strategy.claim(grant.handle))
        seen["mask"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=consumer)
    thread.start()
    thread.join()
    try:
        assert seen["mask"] == seen["cores"] and len(seen["cores"]) == 1
        assert os.sched_getaffinity(0) == before
    finally:
        strategy.release(grant.handle)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (0, ValueError), (True, TypeError),
                                        (1.5, TypeError), ("1", TypeError), (2**64, ValueError)])
def test_claim_rejects_a_malformed_target_and_changes_nothing(strategy, child, bad, error):
    before_self, before_child = os.sched_getaffinity(0), cpus_allowed(child.pid)
    grant = strategy.allocate(request(100), 100, None)
    try:
        with pytest.raises(error, match="target_process_id"):
            strategy.claim(grant.handle, target_process_id=bad)
        assert os.sched_getaffinity(0) == before_self and cpus_allowed(child.pid) == before_child
    finally:
        strategy.release(grant.handle)


def test_claim_rejects_a_process_that_does_not_exist(strategy):
    grant = strategy.allocate(request(100), 100, None)
    try:
        with pytest.raises(ValueError, match="no such process"):
            strategy.claim(grant.handle, target_process_id=dead_pid())
    finally:
        strategy.release(grant.handle)


def test_claim_of_the_process_pinned_at_allocation_pins_it_once(strategy, child, private_affinity_journal):
    grant = strategy.allocate(request(100, child.pid), 100, None)
    try:
        cores = strategy.claim(grant.handle, target_process_id=child.pid)
        assert cpus_allowed(child.pid) == set(cores)
        assert len(list(private_affinity_journal.iterdir())) == 1  # one journal entry, not two
    finally:
        strategy.release(grant.handle)
    assert list(private_affinity_journal.iterdir()) == []


# -- adjust ----------------------------------------------------------------------------

def test_adjust_beyond_the_machine_is_an_allocation_error_and_changes_nothing(strategy, child):
    grant = strategy.allocate(request(100), 100, None)
    handle = grant.handle
    try:
        cores = strategy.claim(handle, target_process_id=child.pid)
        for amount in (100.0 * len(ALLOWED) + 100, 1e18):
            with pytest.raises(AllocationError) as caught:
                strategy.adjust(handle, amount)
            assert "whole cores" in str(caught.value) and not isinstance(caught.value.__cause__, OSError)
            assert handle.reservation.cores == cores and cpus_allowed(child.pid) == set(cores)
        with pytest.raises(ValueError, match="new amount"):
            strategy.adjust(handle, float("nan"))
        assert handle.reservation.cores == cores
    finally:
        strategy.release(handle)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="one cpu allowed: no room to grow")
def test_adjust_grows_the_claimed_process_mask(strategy, child):
    grant = strategy.allocate(request(100), 100, None)
    try:
        strategy.claim(grant.handle, target_process_id=child.pid)
        assert strategy.adjust(grant.handle, 150) == 200.0
        assert cpus_allowed(child.pid) == set(grant.handle.reservation.cores) and \
            len(grant.handle.reservation.cores) == 2
    finally:
        strategy.release(grant.handle)


# -- the core face's edge checks (prealloc.core: set_affinity and friends) ---------------

ONLINE = sorted(core.online_cpus())


@pytest.mark.parametrize("cores, error, words", [
    ("01", TypeError, "not str"),
    (b"\x00\x01", TypeError, "not bytes"),
    (5, TypeError, "not int"),
    ([0.0], TypeError, "not float"),
    ([True], TypeError, "not bool"),
    ([max(ONLINE) + 1], ValueError, f"valid cpus are {ONLINE}"),
    ([2**64], ValueError, f"valid cpus are {ONLINE}"),
    ([-1], ValueError, f"valid cpus are {ONLINE}"),
    ([], ValueError, f"valid cpus are {ONLINE}"),
])
def test_set_affinity_refuses_what_is_not_a_set_of_online_cpus(cores, error, words):
    before = os.sched_getaffinity(0), cpus_allowed(os.getpid())
    for call in (lambda: core.set_affinity(0, cores), lambda: core.set_thread_affinity(0, cores)):
        with pytest.raises(error, match="cores") as caught:
            call()
        assert words in str(caught.value)
    assert (os.sched_getaffinity(0), cpus_allowed(os.getpid())) == before  # nothing changed


@pytest.mark.parametrize("pid, error", [(2**64, ValueError), (2**31, ValueError), (-1, ValueError),
                                        (1.0, TypeError), (True, TypeError), ("0", TypeError)])
def test_pids_and_tids_outside_the_range_name_the_argument(pid, error):
    with pytest.raises(error, match="pid"):
        core.set_affinity(pid, ONLINE)
    with pytest.raises(error, match="pid"):
        core.get_affinity(pid)
    with pytest.raises(error, match="tid"):
        core.get_thread_affinity(pid)
    with pytest.raises(error, match="tid"):
        core.set_thread_affinity(pid, ONLINE)


def test_numpy_integers_are_cpu_ids(child):
    import numpy as np

    first = min(ALLOWED)
    with core.set_affinity(np.int64(child.pid), np.array([first])) as change:
        assert change.threads == len(thread_ids(child.pid))
        assert cpus_allowed(child.pid) == {first}
