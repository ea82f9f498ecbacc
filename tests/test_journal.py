"""The side-effect journal: a host killed (SIGKILL) while it pins another process, sets its
I/O priority or holds a named reserve file must not leave the process pinned or
deprioritised, or the disk space gone. Verified through /proc/PID/task/TID/status
(Cpus_allowed_list), ioprio_get of each thread and the directory listing / st_blocks, with
a real host process, a real target and a real kill; and the directory's trust (a planted
directory or entry is refused)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from osutil import PINNING_HOST, cpus_allowed, thread_ids
from prealloc import _native, cli, core, journal
from prealloc.strategies.cpu import CpuAllocationStrategy
from prealloc.strategies.disk import DiskStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

ALL = core.get_affinity(0)
needs_two_cores = pytest.mark.skipif(len(ALL) < 2, reason="pinning to a subset needs 2 or more usable cores")

HOST = PINNING_HOST


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


@needs_two_cores
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


@needs_two_cores
def test_a_new_strategy_recovers_at_start(child, journal_dir):
    before = all_threads_on(child.pid)
    host, cores = start_host_pinning(journal_dir, child.pid)
    kill(host)
    assert all(m == cores for m in all_threads_on(child.pid).values())
    CpuAllocationStrategy()  # what a restarted host does first
    assert all_threads_on(child.pid) == before
    assert entries(journal_dir) == []


@needs_two_cores
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


@needs_two_cores
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


@needs_two_cores
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


@needs_two_cores
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


@needs_two_cores
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


@needs_two_cores
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


@needs_two_cores
def test_the_recover_command(child, journal_dir, capsys):
    assert cli.main(["recover", "--dir", str(journal_dir)]) == 0
    assert capsys.readouterr().out.strip() == "nothing to recover"
    host, _ = start_host_pinning(journal_dir, child.pid)
    kill(host)
    assert cli.main(["recover", "--dir", str(journal_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["target_pid"] == child.pid and len(out[0]["restored_threads"]) == len(thread_ids(child.pid))


@needs_two_cores
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


# ---- every kind: disk reserve files and I/O priorities of other processes ----

DISK_HOST = textwrap.dedent("""
    import os, sys, time
    os.environ["PREALLOC_JOURNAL_DIR"] = sys.argv[1]
    from prealloc.strategies.disk import DiskStrategy
    from prealloc.types import RequestMetadata, ResourceRequest, ResourceType
    strategy = DiskStrategy(headroom_mib=0, prefer_tmpfile=False)
    props = {"directory": sys.argv[2]}
    pid = int(sys.argv[3]) if len(sys.argv) > 3 else None
    if pid:
        props.update(mode="none", io_priority="best-effort:6")
    if len(sys.argv) > 4:
        props["io_weight"] = int(sys.argv[4])
    request = ResourceRequest(ResourceType.DISK_IO, 4.0,
                              metadata=RequestMetadata(target_process_id=pid, custom_properties=props))
    grant = strategy.allocate(request, 4.0, None)
    print(grant.handle.reservation.path if grant.handle.reservation else "-", flush=True)
    time.sleep(60)
""")


def start_disk_host(directory, data_dir, target: int | None = None,
                    weight: int | None = None) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-c", DISK_HOST, str(directory), str(data_dir)] + ([str(target)] if target else []) \
        + ([str(weight)] if weight else [])
    host = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = host.stdout.readline().strip()
    assert line, "the host died before reserving"
    return host, line


def thread_ioprios(pid: int) -> dict[int, int]:
    return {tid: _native.ioprio_get(tid) for tid in thread_ids(pid)}


def test_a_killed_hosts_reserve_file_is_removed_by_recover(tmp_path, journal_dir):
    data = tmp_path / "data"
    data.mkdir()
    host, path = start_disk_host(journal_dir, data)
    assert os.listdir(data) == [os.path.basename(path)]
    assert os.stat(path).st_blocks * 512 >= 4 * 1024 * 1024
    entry = json.loads((journal_dir / entries(journal_dir)[0]).read_text())
    assert entry["kind"] == "reserve_file" and entry["path"] == path and entry["ino"] == os.stat(path).st_ino
    assert journal.recover(journal_dir) == []  # the owner lives: left alone
    kill(host)
    assert os.path.exists(path)  # SIGKILL ran no cleanup
    results = journal.recover(journal_dir)
    assert [(r.kind, r.removed) for r in results] == [("reserve_file", path)]
    assert os.listdir(data) == [] and entries(journal_dir) == []


def test_a_reserve_file_replaced_since_is_left_alone(tmp_path, journal_dir):
    data = tmp_path / "data"
    data.mkdir()
    host, path = start_disk_host(journal_dir, data)
    kill(host)
    with open(path + ".new", "w") as f:  # someone's file renamed over it: another inode
        f.write("keep me")
    os.replace(path + ".new", path)
    results = journal.recover(journal_dir)
    assert results[0].removed is None and results[0].left_alone
    assert open(path).read() == "keep me"


def test_a_killed_hosts_io_priority_is_undone_by_recover(child, tmp_path, journal_dir):
    before = thread_ioprios(child.pid)
    host, _ = start_disk_host(journal_dir, tmp_path, child.pid)
    value = 2 << 13 | 6
    assert set(thread_ioprios(child.pid).values()) == {value}
    (name,) = entries(journal_dir)
    assert json.loads((journal_dir / name).read_text())["kind"] == "ioprio"
    kill(host)
    assert set(thread_ioprios(child.pid).values()) == {value}  # still, after SIGKILL
    tids = thread_ids(child.pid)
    _native.ioprio_set(tids[-1], 2 << 13 | 1)  # an operator changed one thread since
    results = journal.recover(journal_dir)
    assert [r.kind for r in results] == ["ioprio"] and results[0].left_alone == [tids[-1]]
    after = thread_ioprios(child.pid)
    assert {t: after[t] for t in tids[:-1]} == {t: before[t] for t in tids[:-1]}
    assert after[tids[-1]] == 2 << 13 | 1
    assert entries(journal_dir) == []


def test_a_new_disk_strategy_recovers_at_start(child, tmp_path, journal_dir):
    before = thread_ioprios(child.pid)
    host, _ = start_disk_host(journal_dir, tmp_path, child.pid)
    kill(host)
    DiskStrategy()  # what a restarted host does first
    assert thread_ioprios(child.pid) == before and entries(journal_dir) == []


def test_the_recover_command_reports_every_kind(child, tmp_path, journal_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    hosts = [start_disk_host(journal_dir, data, target)[0] for target in (None, child.pid)]
    for host in hosts:  # both alive until now: neither start recovered the other
        kill(host)
    assert cli.main(["recover", "--dir", str(journal_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["kind"] for r in out) == ["ioprio", "reserve_file"]
    assert os.listdir(data) == []


# ---- the directory's trust ----

def test_a_world_writable_directory_is_refused(tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chmod(planted, 0o777)
    (planted / "1-x-1.json").write_text("{}")
    with pytest.raises(journal.UntrustedJournalDirectory, match="writable by others"):
        journal.recover(planted)
    with pytest.raises(journal.UntrustedJournalDirectory):
        journal.Journal(planted).record_reserve_file(tmp_path / "f")
    assert cli.main(["recover", "--dir", str(planted)]) == 2
    assert (planted / "1-x-1.json").exists()  # not acted on, not set aside


def test_a_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(journal.UntrustedJournalDirectory, match="symlink"):
        journal.recover(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory or file owned by another uid needs root")
def test_another_users_directory_and_entries_are_refused(tmp_path, child):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 12345, 12345)
    with pytest.raises(journal.UntrustedJournalDirectory, match="belongs to uid 12345"):
        journal.recover(other)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    before = thread_ioprios(child.pid)
    _native.ioprio_set(child.pid, 2 << 13 | 7)
    entry = {"kind": "ioprio", "owner": {"pid": 1, "start": -1},
             "target": {"pid": child.pid, "start": journal.process_start_time(child.pid)},
             "applied": [2 << 13 | 7], "previous": {str(child.pid): 2 << 13 | 1}, "default": 0}
    (ours / "planted.json").write_text(json.dumps(entry))
    os.chown(ours / "planted.json", 12345, 12345)  # planted by another user
    assert journal.recover(ours) == []
    assert _native.ioprio_get(child.pid) == 2 << 13 | 7  # not acted on
    _native.ioprio_set(child.pid, before[child.pid])


def test_a_symlinked_entry_is_ignored(tmp_path):
    directory = tmp_path / "j"
    directory.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"kind": "reserve_file", "owner": {"pid": 1, "start": -1},
                                  "path": str(tmp_path / "victim")}))
    (tmp_path / "victim").write_text("x")
    (directory / "e.json").symlink_to(target)
    assert journal.recover(directory) == []
    assert (tmp_path / "victim").exists()


def test_the_fallback_directory_is_created_private(tmp_path, monkeypatch):
    monkeypatch.delenv("PREALLOC_JOURNAL_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(journal.tempfile, "tempdir", str(tmp_path))
    if os.geteuid() == 0:
        assert journal.default_directory() == journal.Path("/run/prealloc")
        fallback = tmp_path / f"prealloc-{os.getuid()}"
    else:
        fallback = journal.default_directory()
        assert fallback == tmp_path / f"prealloc-{os.getuid()}"
    entry = journal.Journal(fallback).record_reserve_file(tmp_path / "f")
    st = os.stat(fallback)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    entry.forget()


def test_an_entry_of_unknown_kind_is_set_aside(journal_dir):
    journal_dir.mkdir()
    (journal_dir / "u.json").write_text(json.dumps({"kind": "teleport", "owner": {"pid": 1, "start": -1}}))
    assert journal.recover(journal_dir) == []
    assert (journal_dir / "u.bad").exists()
    with pytest.raises(ValueError, match="kind"):
        journal.Journal(journal_dir).record("teleport")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a cgroup and moving a process into it needs root")
def test_a_killed_hosts_cgroup_weight_is_undone_by_recover(child, tmp_path, journal_dir):
    from prealloc.monitors.disk import _cgroup_mounts, read_io_weight
    base = _cgroup_mounts().get("blkio")
    if base is None:
        pytest.skip("no cgroup v1 blkio hierarchy mounted here")
    group = base / f"prealloc-journal-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(child.pid))
        weight_file = next((group / n for n in ("blkio.weight", "blkio.bfq.weight") if (group / n).exists()), None)
        if weight_file is None:
            pytest.skip("the blkio cgroup has no weight file (neither CFQ nor BFQ)")
        before = read_io_weight(weight_file)
        host, _ = start_disk_host(journal_dir, tmp_path, child.pid, weight=321)
        assert read_io_weight(weight_file) == 321
        kill(host)
        assert read_io_weight(weight_file) == 321  # still, after SIGKILL
        results = journal.recover(journal_dir)
        assert sorted(r.kind for r in results) == ["cgroup_weight", "ioprio"]
        assert read_io_weight(weight_file) == before and entries(journal_dir) == []
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (base / "cgroup.procs").write_text(pid)
        group.rmdir()
