"""The CPU strategy's isolation levels, checked through the operating system: two
strategies of one process and two processes never share an exclusive core; the cpuset
level moves another process (a `sleep` we start) off the reserved core — its
/proc/PID/status Cpus_allowed_list — and puts it back on release and, after the
allocator is SIGKILLed, through journal recovery; the priority level's policy is what
os.sched_getscheduler says of the thread. Unprivileged runs get effective < requested
with the reason. Tests that need root or a cpuset say so when they skip."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from osutil import cpus_allowed
from prealloc import core, cpuset, journal
from prealloc.strategies.base import AllocationError, InsufficientResources
from prealloc.strategies.cpu import CpuAllocationStrategy, process_core_registry
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

ALLOWED = frozenset(os.sched_getaffinity(0))
ROOT = os.geteuid() == 0
CPUSET_ROOT = cpuset.v1_cpuset_root()
CAN_CPUSET = ROOT and CPUSET_ROOT is not None and os.access(CPUSET_ROOT, os.W_OK)
needs_cpuset = pytest.mark.skipif(not CAN_CPUSET, reason="the cpuset level needs root and a writable cgroup v1 "
                                  "cpuset hierarchy (unprivileged runs check the refusal below)")
needs_two_cores = pytest.mark.skipif(len(ALLOWED) < 2, reason="moving tasks off a core needs another core to move "
                                     "them to")


def request(percent: float = 100, pid: int | None = None, **props) -> ResourceRequest:
    return ResourceRequest(ResourceType.CPU, percent,
                           metadata=RequestMetadata(target_process_id=pid, custom_properties=props))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def isolation(strategy, grant):
    return strategy.describe(grant.handle)["isolation"]


def no_rest_cgroups_left():
    mine = [p for p in cpuset.leftover_rest_cgroups() if f"-{os.getpid()}-" in p.name]
    assert mine == []


# -- one registry per process ----------------------------------------------------------

def test_two_strategies_in_one_process_never_share_an_exclusive_core():
    first, second = CpuAllocationStrategy(), CpuAllocationStrategy(isolation="affinity")
    assert first.registry is second.registry is process_core_registry()
    grants = []
    try:
        grants.append(first.allocate(request(), 100, None))
        if len(ALLOWED) >= 2:
            grants.append(second.allocate(request(), 100, None))
            cores = [g.handle.reservation.cores for g in grants]
            assert not cores[0] & cores[1]
        held = set().union(*(g.handle.reservation.cores for g in grants))
        if held == ALLOWED:
            with pytest.raises(InsufficientResources):
                second.allocate(request(), 100, None)
        # a claim on a thread pins it to its own core, verified by the kernel
        seen = {}

        def claim_in_thread(strategy, grant, key):
            strategy.claim(grant.handle)
            seen[key] = os.sched_getaffinity(0)

        for i, (strategy, grant) in enumerate(zip((first, second), grants)):
            t = threading.Thread(target=claim_in_thread, args=(strategy, grant, i))
            t.start()
            t.join()
            assert seen[i] == set(grant.handle.reservation.cores)
    finally:
        for strategy, grant in zip((first, second), grants):
            strategy.release(grant.handle)


def test_two_cpu_scheduler_enhancers_never_both_get_a_core_exclusive():
    from prealloc.engine import CpuSchedulerEnhancer
    from prealloc.types import AllocationStatus

    with CpuSchedulerEnhancer(translator=None) as first, CpuSchedulerEnhancer(translator=None) as second:
        a = first.request_preallocation(ResourceRequest(ResourceType.CPU, 100))
        b = second.request_preallocation(ResourceRequest(ResourceType.CPU, 100))
        assert a.status is AllocationStatus.ALLOCATED
        if len(ALLOWED) >= 2:
            assert b.status is AllocationStatus.ALLOCATED
            assert not set(a.details["cores"]) & set(b.details["cores"])
        else:
            assert b.status is AllocationStatus.FAILED
        assert a.details["isolation"]["effective"] == ["affinity", "registry"]


def test_a_child_of_fork_gets_a_registry_of_its_own():
    parent_registry = process_core_registry()
    strategy = CpuAllocationStrategy(isolation="affinity")
    grant = strategy.allocate(request(), 100, None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            mine = process_core_registry()
            os.write(write_end, f"{mine is not parent_registry} {sorted(mine.available())}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 256).decode()
    os.waitpid(pid, 0)
    os.close(read_end)
    strategy.release(grant.handle)
    assert answer == f"True {sorted(ALLOWED)}"  # not the parent's holdings as its own


RACER = textwrap.dedent("""
    import sys
    from prealloc import core
    from prealloc.strategies.base import InsufficientResources
    from prealloc.strategies.cpu import CpuAllocationStrategy
    from prealloc.types import ResourceRequest, ResourceType
    strategy = CpuAllocationStrategy(core.CoreReservations({int(sys.argv[1])}))
    sys.stdin.readline()
    try:
        grant = strategy.allocate(ResourceRequest(ResourceType.CPU, 100), 100, None)
        print("won", sorted(grant.handle.reservation.cores), flush=True)
    except InsufficientResources as exc:
        print("lost", exc, flush=True)
    sys.stdin.readline()
""")


def test_two_processes_racing_for_one_exclusive_core_exactly_one_wins():
    target = min(ALLOWED)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(target)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for racer in racers:
            racer.stdin.write("go\n")
            racer.stdin.flush()
        answers = [racer.stdout.readline().split(" ", 1) for racer in racers]
        assert sorted(a[0] for a in answers) == ["lost", "won"]
        assert [a[1].strip() for a in answers if a[0] == "won"] == [f"[{target}]"]
        assert all("held by other processes" in a[1] for a in answers if a[0] == "lost")
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()


def test_a_sigkilled_holders_core_is_taken_by_the_next_strategy():
    target = min(ALLOWED)
    holder = subprocess.Popen([sys.executable, "-c", RACER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().startswith("won")
        strategy = CpuAllocationStrategy(core.CoreReservations({target}))
        with pytest.raises(InsufficientResources, match="held by other processes"):
            strategy.allocate(request(), 100, None)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    grant = strategy.allocate(request(), 100, None)
    assert grant.handle.reservation.cores == {target}
    assert isolation(strategy, grant)["effective"] == ["affinity", "registry"]
    strategy.release(grant.handle)


# -- requested vs effective ------------------------------------------------------------

def test_bad_isolation_names_the_argument():
    with pytest.raises(ValueError, match="isolation 'walls'"):
        CpuAllocationStrategy(isolation="walls")
    strategy = CpuAllocationStrategy()
    with pytest.raises(AllocationError, match="isolation"):
        strategy.allocate(request(isolation="cpuset+walls"), 100, None)
    with pytest.raises(AllocationError, match="rt_priority"):
        strategy.allocate(request(isolation="priority", priority={"rt_priority": 500}), 100, None)
    assert strategy.available_cores() == len(ALLOWED)  # nothing held


def test_isolated_is_reported_from_the_kernel_and_never_set():
    strategy = CpuAllocationStrategy()
    grant = strategy.allocate(request(isolation="isolated"), 100, None)
    try:
        iso = isolation(strategy, grant)
        kernel = Path("/sys/devices/system/cpu/isolated").read_text().strip()
        assert iso["requested"] == ["affinity", "registry", "isolated"]
        if not kernel:
            assert "isolated" not in iso["effective"] and "isolcpus" in iso["reasons"]["isolated"]
        assert Path("/sys/devices/system/cpu/isolated").read_text().strip() == kernel
    finally:
        strategy.release(grant.handle)


def test_shared_cores_report_registry_and_cpuset_as_not_effective():
    strategy = CpuAllocationStrategy(exclusive=False)
    grant = strategy.allocate(request(isolation="cpuset"), 100, None)
    try:
        iso = isolation(strategy, grant)
        assert iso["effective"] == ["affinity"] and "shared" in iso["reasons"]["cpuset"]
    finally:
        strategy.release(grant.handle)


@pytest.mark.skipif(CAN_CPUSET, reason="checks the refusal an unprivileged run gets; this run may make cpusets")
def test_unprivileged_cpuset_is_lower_with_the_reason(sleeper):
    strategy = CpuAllocationStrategy(isolation="cpuset", cpuset_scope={sleeper.pid})
    before = cpus_allowed(sleeper.pid)
    grant = strategy.allocate(request(), 100, None)
    try:
        iso = isolation(strategy, grant)
        assert iso["requested"] == ["affinity", "registry", "cpuset"]
        assert iso["effective"] == ["affinity", "registry"]
        assert "cpuset" in iso["reasons"]["cpuset"]
        assert cpus_allowed(sleeper.pid) == before
    finally:
        strategy.release(grant.handle)


# -- cpuset ------------------------------------------------------------------------------

@needs_cpuset
@needs_two_cores
def test_cpuset_moves_another_process_off_the_core_and_back(sleeper):
    os.sched_setaffinity(sleeper.pid, ALLOWED)
    strategy = CpuAllocationStrategy(isolation="cpuset", cpuset_scope={sleeper.pid})
    grant = strategy.allocate(request(), 100, None)
    reserved = set(grant.handle.reservation.cores)
    try:
        iso = isolation(strategy, grant)
        assert iso["effective"] == ["affinity", "registry", "cpuset"], iso["reasons"]
        assert cpus_allowed(sleeper.pid) == ALLOWED - reserved
        assert iso["cpuset"]["moved_tasks"] == 1 and "IRQ" in iso["cpuset"]["irqs"]
        entries = [p for p in Path(os.environ["PREALLOC_JOURNAL_DIR"]).glob("*.json")]
        assert any('"cpuset"' in p.read_text() for p in entries)  # journaled while it lasts
        assert cpus_allowed(os.getpid()) == ALLOWED  # our own process stays
    finally:
        strategy.release(grant.handle)
    assert cpus_allowed(sleeper.pid) == ALLOWED
    no_rest_cgroups_left()


@needs_cpuset
@needs_two_cores
def test_cpuset_gives_back_a_mask_the_process_had_set_itself(sleeper):
    reserved_core = max(ALLOWED)
    os.sched_setaffinity(sleeper.pid, {reserved_core})  # a task pinned to the very core we take
    strategy = CpuAllocationStrategy(core.CoreReservations({reserved_core}), isolation="cpuset",
                                     cpuset_scope={sleeper.pid})
    grant = strategy.allocate(request(), 100, None)
    try:
        assert reserved_core not in cpus_allowed(sleeper.pid)
    finally:
        strategy.release(grant.handle)
    assert cpus_allowed(sleeper.pid) == {reserved_core}
    no_rest_cgroups_left()


@needs_cpuset
@needs_two_cores
def test_cpuset_shrinks_a_cgroup_of_other_tasks_and_widens_it_back(sleeper):
    group = CPUSET_ROOT / f"prealloc-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpuset.mems").write_text((CPUSET_ROOT / "cpuset.mems").read_text())
        (group / "cpuset.cpus").write_text((CPUSET_ROOT / "cpuset.cpus").read_text())
        (group / "tasks").write_text(str(sleeper.pid))
        before = (group / "cpuset.cpus").read_text()
        strategy = CpuAllocationStrategy(isolation="cpuset", cpuset_scope={sleeper.pid})
        grant = strategy.allocate(request(), 100, None)
        reserved = set(grant.handle.reservation.cores)
        try:
            assert isolation(strategy, grant)["cpuset"]["shrunk_cgroups"] == [str(group)]
            assert cpus_allowed(sleeper.pid) == ALLOWED - reserved
            assert cpuset.parse_cpus((group / "cpuset.cpus").read_text()) == ALLOWED - reserved
        finally:
            strategy.release(grant.handle)
        assert (group / "cpuset.cpus").read_text() == before
        assert cpus_allowed(sleeper.pid) == ALLOWED
    finally:
        (CPUSET_ROOT / "tasks").write_text(str(sleeper.pid))
        group.rmdir()


ALLOCATOR = textwrap.dedent("""
    import sys
    from prealloc.strategies.cpu import CpuAllocationStrategy
    from prealloc.types import RequestMetadata, ResourceRequest, ResourceType
    isolation, target = sys.argv[1], int(sys.argv[2])
    strategy = CpuAllocationStrategy(isolation=isolation, cpuset_scope={target})
    pid = target if isolation == "priority" else None
    request = ResourceRequest(ResourceType.CPU, 100, metadata=RequestMetadata(target_process_id=pid))
    grant = strategy.allocate(request, 100, None)
    print(" ".join(map(str, sorted(grant.handle.reservation.cores))), strategy.describe(grant.handle)["isolation"]["effective"], flush=True)
    sys.stdin.readline()
""")


@needs_cpuset
@needs_two_cores
def test_cpuset_of_a_sigkilled_allocator_is_restored_by_recovery(sleeper):
    os.sched_setaffinity(sleeper.pid, ALLOWED)
    allocator = subprocess.Popen([sys.executable, "-c", ALLOCATOR, "cpuset", str(sleeper.pid)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = allocator.stdout.readline()
        reserved = {int(c) for c in line.split("[")[0].split()}
        assert "'cpuset'" in line
        assert cpus_allowed(sleeper.pid) == ALLOWED - reserved
    finally:
        allocator.send_signal(signal.SIGKILL)
        allocator.wait()
    assert cpus_allowed(sleeper.pid) == ALLOWED - reserved  # the crash left it moved ...
    done = journal.recover(os.environ["PREALLOC_JOURNAL_DIR"])
    assert [r.kind for r in done] == ["cpuset"]
    assert cpus_allowed(sleeper.pid) == ALLOWED  # ... until recovery put it back
    assert [p for p in cpuset.leftover_rest_cgroups() if f"-{allocator.pid}-" in p.name] == []


# -- priority ------------------------------------------------------------------------------

def test_priority_of_the_claiming_thread():
    strategy = CpuAllocationStrategy(isolation="priority", priority={"policy": "fifo", "rt_priority": 5})
    grant = strategy.allocate(request(), 100, None)
    seen = {}

    def consumer():
        seen["before"] = os.sched_getscheduler(0)
        strategy.claim(grant.handle)
        seen["during"] = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(0).sched_priority, \
            os.getpriority(
            os.PRIO_PROCESS, 0)
        seen["iso"] = isolation(strategy, grant)
        strategy.release(grant.handle)
        seen["after"] = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    t = threading.Thread(target=consumer)
    t.start()
    t.join()
    iso = seen["iso"]
    assert seen["after"] == (seen["before"], 0)  # restored
    runtime = int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
    if ROOT and runtime != -1:
        assert seen["during"][:2] == (os.SCHED_FIFO, 5)
        assert "priority" in iso["effective"] and iso["priority"][0]["effective"] == "SCHED_FIFO 5"
    else:  # unprivileged: RLIMIT_RTPRIO 0, no CAP_SYS_NICE — effective < requested, with why
        assert seen["during"][0] == seen["before"]
        assert "priority" not in iso["effective"]
        assert "RLIMIT_RTPRIO" in iso["reasons"]["priority"] and "CAP_SYS_NICE" in iso["reasons"]["priority"]
    assert Path("/proc/sys/kernel/sched_rt_runtime_us").read_text().strip() == str(runtime)  # left as it was


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO for another process needs root or CAP_SYS_NICE")
def test_priority_of_a_target_process_is_journaled_and_restored_after_a_crash(sleeper):
    allocator = subprocess.Popen([sys.executable, "-c", ALLOCATOR, "priority", str(sleeper.pid)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = allocator.stdout.readline()
        assert "'priority'" in line, line
        # real-time, and reset on fork: a child it starts does not inherit it
        assert os.sched_getscheduler(sleeper.pid) == os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
    finally:
        allocator.send_signal(signal.SIGKILL)
        allocator.wait()
    assert os.sched_getscheduler(sleeper.pid) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO  # left by the crash ...
    kinds = sorted(r.kind for r in journal.recover(os.environ["PREALLOC_JOURNAL_DIR"]))
    assert kinds == ["affinity", "sched"]
    assert os.sched_getscheduler(sleeper.pid) == os.SCHED_OTHER  # ... restored by recovery


@needs_cpuset
@needs_two_cores
def test_cpuset_puts_back_the_children_a_moved_task_forked_meanwhile():
    spawner = subprocess.Popen(["sh", "-c", "while :; do sleep 5 & sleep 0.02; done"])
    try:
        strategy = CpuAllocationStrategy(isolation="cpuset", cpuset_scope={spawner.pid})
        grant = strategy.allocate(request(), 100, None)
        reserved = set(grant.handle.reservation.cores)
        rest = Path(isolation(strategy, grant)["cpuset"]["rest_cgroups"][0])
        try:
            born_there: set[int] = set()
            for _ in range(1000):  # children born in the rest cgroup, off the core (bounded: never hangs)
                born_there = set(int(t) for t in (rest / "tasks").read_text().split()) - {spawner.pid}
                if len(born_there) >= 3:
                    break
                time.sleep(0.01)
            assert len(born_there) >= 3, "the spawner forked nothing in the rest cgroup"
            for tid in born_there:
                try:
                    assert not cpus_allowed(tid) & reserved
                except FileNotFoundError:
                    pass
        finally:
            strategy.release(grant.handle)
        assert not rest.exists()  # everyone went back, then the rest cgroup was removed
        for tid in born_there:
            try:
                assert cpus_allowed(tid) == ALLOWED
            except FileNotFoundError:
                pass
        assert cpus_allowed(spawner.pid) == ALLOWED
    finally:
        children = Path(f"/proc/{spawner.pid}/task/{spawner.pid}/children").read_text().split()
        spawner.kill()
        spawner.wait()
        for child in children:  # the `sleep 5`s it started
            try:
                os.kill(int(child), signal.SIGKILL)
            except ProcessLookupError:
                pass


@needs_cpuset
def test_an_entry_journaled_just_before_a_crash_is_undone_without_error():
    # the allocator died right after journaling: the rest cgroup it named was never made
    data = {"root": str(CPUSET_ROOT), "reserved": [max(ALLOWED)], "shrunk": [], "moved": {},
            "rest": [{"parent": str(CPUSET_ROOT), "path": str(CPUSET_ROOT / "prealloc-rest-1-1-1")}]}
    done = cpuset.undo_entry(data)
    assert done.kind == "cpuset" and done.removed is None


@needs_two_cores
def test_adjust_takes_and_gives_back_machine_registry_cores():
    from prealloc.machine_registry import MachineCoreRegistry

    strategy = CpuAllocationStrategy()
    registry = MachineCoreRegistry(strategy.machine_registry.directory)
    grant = strategy.allocate(request(), 100, None)
    try:
        mine = lambda: {h.core for h in registry.holders() if h.pid == os.getpid()}  # noqa: E731
        assert mine() == set(grant.handle.reservation.cores)
        assert strategy.adjust(grant.handle, 200) == 200.0
        assert mine() == set(grant.handle.reservation.cores) and len(mine()) == 2
        assert strategy.adjust(grant.handle, 100) == 100.0
        assert mine() == set(grant.handle.reservation.cores) and len(mine()) == 1
    finally:
        strategy.release(grant.handle)
    assert {h.core for h in registry.holders() if h.pid == os.getpid()} == set()


@needs_two_cores
def test_adjust_cannot_grow_onto_a_core_another_process_holds():
    other_core = max(ALLOWED)
    holder = subprocess.Popen([sys.executable, "-c", RACER, str(other_core)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    strategy = CpuAllocationStrategy(core.CoreReservations({min(ALLOWED), other_core}))
    try:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().startswith("won")
        grant = strategy.allocate(request(), 100, None)
        assert grant.handle.reservation.cores == {min(ALLOWED)}
        with pytest.raises(InsufficientResources, match="held by another process"):
            strategy.adjust(grant.handle, 200)
        assert grant.handle.reservation.cores == {min(ALLOWED)}  # nothing changed
        assert [lock.core for lock in grant.handle.core_locks] == [min(ALLOWED)]
        strategy.release(grant.handle)
    finally:
        holder.kill()
        holder.wait()
