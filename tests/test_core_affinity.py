"""CPU affinity and core reservations, checked in /proc/<pid>/task/*/status."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from prealloc import core
from osutil import cpus_allowed, parse_cpu_list, thread_ids

ONLINE = sorted(core.online_cpus())

def test_online_cpus_match_the_kernel():
    with open("/sys/devices/system/cpu/online") as f:
        assert core.online_cpus() == parse_cpu_list(f.read())


def test_get_affinity_of_this_process_matches_proc():
    assert core.get_affinity() == cpus_allowed(os.getpid())


def test_set_affinity_moves_every_thread_of_a_child_and_restore_puts_them_back(child):
    original = {tid: cpus_allowed(child.pid, tid) for tid in thread_ids(child.pid)}
    assert len(original) >= 4
    target = {ONLINE[-1]}
    change = core.set_affinity(child.pid, target)
    assert change.threads == len(original)
    for tid in thread_ids(child.pid):
        assert cpus_allowed(child.pid, tid) == target
    assert core.get_affinity(child.pid) == target
    change.restore()
    for tid, mask in original.items():
        assert cpus_allowed(child.pid, tid) == mask


def test_dead_pid_raises_process_lookup_error():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        core.set_affinity(proc.pid, {ONLINE[0]})
    with pytest.raises(ProcessLookupError):
        core.get_affinity(proc.pid)


def test_core_out_of_range_lists_the_valid_cpus_and_changes_nothing(child):
    before = cpus_allowed(child.pid)
    with pytest.raises(ValueError, match="valid cpus are"):
        core.set_affinity(child.pid, {ONLINE[-1] + 1000})
    with pytest.raises(ValueError):
        core.set_affinity(child.pid, set())
    with pytest.raises(ValueError):
        core.set_affinity(-5, {0})
    assert cpus_allowed(child.pid) == before


def test_thread_affinity_applies_to_the_calling_thread_only():
    seen = {}

    def worker():
        core.set_thread_affinity(0, {ONLINE[0]})
        seen["worker"] = core.get_thread_affinity(0)
        seen["tid"] = threading.get_native_id()

    before = core.get_thread_affinity(0)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["worker"] == {ONLINE[0]}
    assert core.get_thread_affinity(0) == before


def test_exclusive_core_is_never_given_twice():
    registry = core.CoreReservations()
    allowed = sorted(registry.allowed())
    assert set(allowed) == os.sched_getaffinity(0)
    held = [registry.reserve(1) for _ in allowed]
    assert set().union(*(r.cores for r in held)) == set(allowed)
    with pytest.raises(BlockingIOError):
        registry.reserve(1)
    with pytest.raises(BlockingIOError):
        registry.reserve(1, exclusive=False)  # shared may not overlap exclusive
    held[0].release()
    again = registry.reserve(1)
    assert again.cores == frozenset({allowed[0]})  # the freed core, the only free one
    for r in held[1:] + [again]:
        r.release()
    assert len(registry) == 0 and registry.available() == set(allowed)


def test_shared_reservations_overlap_each_other():
    registry = core.CoreReservations()
    allowed = registry.allowed()
    a = registry.reserve(len(allowed), exclusive=False)
    b = registry.reserve(len(allowed), exclusive=False)
    assert a.cores == b.cores == allowed
    with pytest.raises(BlockingIOError):
        registry.reserve(1, exclusive=True)
    a.release()
    b.release()


def test_reservation_applied_to_a_child_is_restored_on_release(child):
    registry = core.CoreReservations()
    original = {tid: cpus_allowed(child.pid, tid) for tid in thread_ids(child.pid)}
    with registry.reserve(1) as reservation:
        reservation.apply(child.pid)
        for tid in thread_ids(child.pid):
            assert cpus_allowed(child.pid, tid) == set(reservation.cores)
    assert reservation.released
    for tid, mask in original.items():
        assert cpus_allowed(child.pid, tid) == mask


@pytest.mark.skipif(len(ONLINE) < 2, reason="resizing needs at least 2 online cpus")
def test_resize_adds_and_gives_back_cores_and_reapplies(child):
    registry = core.CoreReservations()
    reservation = registry.reserve(1)
    reservation.apply(child.pid)
    reservation.resize(2)
    assert len(reservation.cores) == 2
    assert cpus_allowed(child.pid) == set(reservation.cores)
    reservation.resize(1)
    assert len(reservation.cores) == 1
    assert cpus_allowed(child.pid) == set(reservation.cores)
    reservation.release()


def test_threads_reserving_exclusive_cores_never_share_one():
    registry = core.CoreReservations()
    holders: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def worker(n: int) -> None:
        for _ in range(300):
            try:
                r = registry.reserve(1)
            except BlockingIOError:
                continue
            (cpu,) = r.cores
            with lock:
                if holders.get(cpu):
                    errors.append(f"cpu {cpu} given twice")
                holders[cpu] = holders.get(cpu, 0) + 1
            time.sleep(0)
            with lock:
                holders[cpu] -= 1
            r.release()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(registry) == 0
