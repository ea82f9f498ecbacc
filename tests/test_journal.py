"""The affinity journal: a host killed (SIGKILL) while it pins another process must not
leave that process pinned. Verified through /proc/PID/task/TID/status (Cpus_allowed_list),
with a real host process, a real target and a real kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from osutil import cpus_allowed, thread_ids
from prealloc import cli, core, journal
from prealloc.strategies.cpu import CpuAllocationStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

ALL = core.get_affinity(0)
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="pinning to a subset needs 2 or more usable cores")

HOST = textwrap.dedent("""
    import os, sys, time
    os.environ["PREALLOC_JOURNAL_DIR"] = sys.argv[1]
    from prealloc.strategies.cpu import CpuAllocationStrategy
    from prealloc.types import RequestMetadata, ResourceRequest, ResourceType
    strategy = CpuAllocationStrategy()
    request = ResourceRequest(ResourceType.CPU, 100.0,
                              metadata=RequestMetadata(target_process_id=int(sys.argv[2])))
    grant = strategy.allocate(request, 100.0, None)
    print(" ".join(map(str, sorted(grant.handle.reservation.cores))), flush=True)
    time.sleep(60)
""")


def entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".json")


def all_threads_on(pid: int) -> dict[int, set[int]]:
    return {tid: cpus_allowed(pid, tid) for tid in thread_ids(pid)}


@pytest.fixture
def journal_dir(tmp_path, monkeypatch):
    directory = tmp_path / "journal"
    monkeypatch.setenv("PREALLOC_JOURNAL_DIR", str(directory))
    return directory


def start_host_pinning(directory, target: int) -> tuple[subprocess.Popen, set[int]]:
    host = subprocess.Popen([sys.executable, "-c", HOST, str(directory), str(target)],
                            stdout=subprocess.PIPE, text=True)
    line = host.stdout.readline()
    assert line, "the host died before pinning"
    return host, {int(c) for c in line.split()}


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_hosts_pin_is_undone_by_recover(child, journal_dir):
    before = all_threads_on(child.pid)
    host, cores = start_host_pinning(journal_dir, child.pid)
    assert cores < ALL
    assert all(m == cores for m in all_threads_on(child.pid).values())
    assert len(entries(journal_dir)) == 1
    # the owner is alive: recovery leaves its pin alone
    assert journal.recover(journal_dir) == []
    assert all(m == cores for m in all_threads_on(child.pid).values())

    kill(host)
    # SIGKILL ran no cleanup: the target is still pinned, as without a journal
    assert all(m == cores for m in all_threads_on(child.pid).values())
    results = journal.recover(journal_dir)
    assert [r.target_pid for r in results] == [child.pid]
    assert sorted(results[0].restored_threads) == sorted(before)
    assert all_threads_on(child.pid) == before
    assert entries(journal_dir) == []
    assert journal.recover(journal_dir) == []  # nothing left to do


def test_a_new_strategy_recovers_at_start(child, journal_dir):
    before = all_threads_on(child.pid)
    host, cores = start_host_pinning(journal_dir, child.pid)
    kill(host)
    assert all(m == cores for m in all_threads_on(child.pid).values())
    CpuAllocationStrategy()  # what a restarted host does first
    assert all_threads_on(child.pid) == before
    assert entries(journal_dir) == []


def test_threads_changed_by_someone_else_are_left_alone(child, journal_dir):
    before = all_threads_on(child.pid)
    host, cores = start_host_pinning(journal_dir, child.pid)
    kill(host)
    tids = thread_ids(child.pid)
    other = sorted(ALL - cores)[:1]
    core.set_thread_affinity(tids[-1], other)  # an operator re-pinned one thread since
    results = journal.recover(journal_dir)
    assert results[0].left_alone == [tids[-1]]
    assert cpus_allowed(child.pid, tids[-1]) == set(other)
    for tid in tids[:-1]:
        assert cpus_allowed(child.pid, tid) == before[tid]


def test_a_target_that_exited_only_drops_the_entry(journal_dir):
    target = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert target.stdout.readline().strip() == "ready"
    host, _ = start_host_pinning(journal_dir, target.pid)
    kill(host)
    kill(target)
    results = journal.recover(journal_dir)
    assert results[0].target_gone and results[0].restored_threads == []
    assert entries(journal_dir) == []


def test_a_reused_pid_is_not_touched(child, journal_dir):
    """An entry naming the child's pid but another start time (the pinned process exited
    and its pid was reused) must not change the child."""
    journal_dir.mkdir()
    before = all_threads_on(child.pid)
    mask = sorted(core.get_thread_affinity(child.pid))
    core.set_affinity(child.pid, mask[:1])
    pinned = all_threads_on(child.pid)
    entry = {"owner": {"pid": 1, "start": -1},  # not pid 1's start time: a dead owner
             "target": {"pid": child.pid, "start": journal.process_start_time(child.pid) + 1},
             "applied": [mask[:1]], "previous": {str(t): sorted(m) for t, m in before.items()},
             "default": mask}
    (journal_dir / "1-x-1.json").write_text(json.dumps(entry))
    results = journal.recover(journal_dir)
    assert results[0].target_gone
    assert all_threads_on(child.pid) == pinned


def test_release_and_a_failed_pin_leave_no_entry(child, journal_dir):
    strategy = CpuAllocationStrategy()
    request = ResourceRequest(ResourceType.CPU, 100.0, metadata=RequestMetadata(target_process_id=child.pid))
    grant = strategy.allocate(request, 100.0, None)
    assert len(entries(journal_dir)) == 1
    data = json.loads((journal_dir / entries(journal_dir)[0]).read_text())
    assert data["target"]["pid"] == child.pid and data["owner"]["pid"] == os.getpid()
    assert data["applied"] == [sorted(grant.handle.reservation.cores)]
    assert set(map(int, data["previous"])) == set(thread_ids(child.pid))
    strategy.release(grant.handle)
    assert entries(journal_dir) == []

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    bad = ResourceRequest(ResourceType.CPU, 100.0, metadata=RequestMetadata(target_process_id=gone.pid))
    with pytest.raises(Exception, match="cannot pin process"):
        strategy.allocate(bad, 100.0, None)
    assert entries(journal_dir) == []
    assert strategy.available_cores() == len(ALL)


def test_resize_journals_the_new_mask(child, journal_dir):
    strategy = CpuAllocationStrategy()
    request = ResourceRequest(ResourceType.CPU, 100.0, metadata=RequestMetadata(target_process_id=child.pid))
    grant = strategy.allocate(request, 100.0, None)
    strategy.adjust(grant.handle, 200.0)
    data = json.loads((journal_dir / entries(journal_dir)[0]).read_text())
    assert sorted(grant.handle.reservation.cores) in data["applied"] and len(data["applied"]) == 2
    strategy.release(grant.handle)


def test_an_unreadable_entry_is_set_aside(journal_dir):
    journal_dir.mkdir()
    (journal_dir / "junk.json").write_text("{not json")
    assert journal.recover(journal_dir) == []
    assert entries(journal_dir) == []
    assert (journal_dir / "junk.bad").exists()


def test_concurrent_recoverers_restore_each_entry_once(child, journal_dir):
    host, _ = start_host_pinning(journal_dir, child.pid)
    kill(host)
    results: list = []
    barrier = threading.Barrier(4)

    def recover() -> None:
        barrier.wait()
        results.extend(journal.recover(journal_dir))

    threads = [threading.Thread(target=recover) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.target_pid for r in results] == [child.pid]


def test_the_recover_command(child, journal_dir, capsys):
    assert cli.main(["recover", "--dir", str(journal_dir)]) == 0
    assert capsys.readouterr().out.strip() == "nothing to recover"
    host, _ = start_host_pinning(journal_dir, child.pid)
    kill(host)
    assert cli.main(["recover", "--dir", str(journal_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["target_pid"] == child.pid and len(out[0]["restored_threads"]) == len(thread_ids(child.pid))


def test_a_host_that_exits_without_closing_still_unpins(child, journal_dir):
    """Normal interpreter exit closes open allocators (an atexit hook), so a pin of
    another process does not outlive the host even when it never called close()."""
    before = all_threads_on(child.pid)
    script = textwrap.dedent("""
        import sys
        from prealloc import CpuAllocationStrategy, ResourcePreallocator, ResourceRequest, ResourceType
        from prealloc.types import RequestMetadata
        pre = ResourcePreallocator(allocation_strategies={ResourceType.CPU: CpuAllocationStrategy()},
                                   resource_monitors={})
        a = pre.request_preallocation(ResourceRequest(ResourceType.CPU, 100.0,
                                      metadata=RequestMetadata(target_process_id=int(sys.argv[1]))))
        assert a.status.name == "ALLOCATED", a
        print(" ".join(map(str, a.details["cores"])), flush=True)
        sys.stdin.readline()  # the parent looks at the pin, then lets us exit (no close)
    """)
    host = subprocess.Popen([sys.executable, "-c", script, str(child.pid)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    cores = {int(c) for c in host.stdout.readline().split()}
    assert cores and all(m == cores for m in all_threads_on(child.pid).values())
    assert len(entries(journal_dir)) == 1
    host.communicate("\n", timeout=60)
    assert host.returncode == 0
    assert all_threads_on(child.pid) == before
    assert entries(journal_dir) == []
