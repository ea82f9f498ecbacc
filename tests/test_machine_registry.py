"""The machine-wide registry of exclusive cores (prealloc.machine_registry): real
processes race for one core and exactly one wins; a SIGKILLed holder's core is free at
once; a stale label never names a holder; a child of fork() does not keep its parent's
cores; a shared directory is checked. Holders are verified through /proc/locks (what the
kernel says holds the lock), not only through the registry's own files."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prealloc.journal import UntrustedJournalDirectory, process_start_time
from prealloc.machine_registry import MachineCoreRegistry, registry_directory_for


def kernel_lock_pids(path: Path) -> list[int]:
    """Pids /proc/locks names as holding a FLOCK on path's inode."""
    st = os.stat(path)
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK":
            major, minor, inode = fields[5].split(":")
            if (os.makedev(int(major, 16), int(minor, 16)), int(inode)) == (st.st_dev, st.st_ino):
                pids.append(int(fields[4]))
    return pids


RACER = textwrap.dedent("""
    import sys
    from prealloc.machine_registry import MachineCoreRegistry
    registry = MachineCoreRegistry(sys.argv[1])
    sys.stdin.readline()                      # the start signal: all racers are ready
    lock = registry.try_acquire(0, level="registry")
    print("won" if lock is not None else "lost", flush=True)
    sys.stdin.readline()                      # hold until told to go
""")


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_processes_racing_for_one_core_exactly_one_wins(tmp_path):
    directory = tmp_path / "cores"
    racers = [start(RACER, str(directory)) for _ in range(4)]
    try:
        for racer in racers:
            racer.stdin.write("go\n")
        for racer in racers:
            racer.stdin.flush()
        answers = [racer.stdout.readline().strip() for racer in racers]
        assert sorted(answers) == ["lost", "lost", "lost", "won"]
        winner = racers[answers.index("won")]
        assert kernel_lock_pids(directory / "core-0.lock") == [winner.pid]
        holders = MachineCoreRegistry(directory).holders()
        assert [(h.core, h.pid, h.confirmed) for h in holders] == [(0, winner.pid, True)]
        assert holders[0].start == process_start_time(winner.pid) and holders[0].level == "registry"
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()


def test_a_sigkilled_holders_core_is_free_and_its_label_is_not_reported(tmp_path):
    directory = tmp_path / "cores"
    holder = start(RACER, str(directory))
    try:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "won"
        registry = MachineCoreRegistry(directory)
        assert registry.try_acquire(0) is None  # held by the child
        assert [h.pid for h in registry.holders()] == [holder.pid]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    label = (directory / "core-0.lock").read_text()
    assert str(holder.pid) in label  # the dead holder's label is still there ...
    assert registry.holders() == []  # ... and never taken for a holder
    with registry.try_acquire(0) as lock:  # reclaimed at once, nothing to clean by hand
        assert lock is not None
        assert kernel_lock_pids(directory / "core-0.lock") == [os.getpid()]
        assert [h.pid for h in registry.holders()] == [os.getpid()]
    assert not directory.exists()  # released: the last one out removed file and directory


def test_a_label_that_names_a_live_process_but_holds_no_lock_is_stale(tmp_path):
    directory = tmp_path / "cores"
    directory.mkdir(mode=0o700)
    label = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "uid": os.geteuid(),
             "level": "registry", "allocation_id": 7, "since": 1.0}
    (directory / "core-0.lock").write_text(__import__("json").dumps(label))
    registry = MachineCoreRegistry(directory)
    assert registry.holders() == []
    lock = registry.try_acquire(0)
    assert lock is not None
    lock.release()


def test_two_registries_of_one_process_do_not_share_a_core(tmp_path):
    first, second = MachineCoreRegistry(tmp_path / "c"), MachineCoreRegistry(tmp_path / "c")
    lock = first.try_acquire(1, allocation_id=42)
    try:
        assert second.try_acquire(1) is None
        (holder,) = second.holders()
        assert (holder.core, holder.pid, holder.allocation_id, holder.uid) == (1, os.getpid(), 42, os.geteuid())
        assert second.acquire_cores([0, 1]) is None
        assert not (tmp_path / "c" / "core-0.lock").exists()  # all or nothing: core 0 was let go
    finally:
        lock.release()
    assert second.holders() == []


def test_a_child_of_fork_does_not_keep_the_parents_core(tmp_path):
    registry = MachineCoreRegistry(tmp_path / "cores")
    lock = registry.try_acquire(0)
    assert lock is not None
    lock_fd = lock._fd
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: tells whether it can still see the lock's descriptor, then waits
        try:
            os.fstat(lock_fd)  # before anything else opens a file and takes the number again
            inherited = True
        except OSError:
            inherited = False
        inherited = inherited or not lock.released  # a release here must not touch the parent's file
        lock.release()
        os.write(write_end, str(inherited).encode())
        signal.pause()
        os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 16) == b"False"  # closed in the child at fork
        assert (tmp_path / "cores" / "core-0.lock").exists()  # the child's release left it alone
        assert kernel_lock_pids(tmp_path / "cores" / "core-0.lock") == [os.getpid()]
        lock.release()
        # the child is alive; without closing its inherited descriptor it would hold the lock
        again = registry.try_acquire(0)
        assert again is not None
        again.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)


def test_a_shared_directory_must_be_sticky_and_its_files_plain(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("PREALLOC_REGISTRY_DIR", str(shared))
    with pytest.raises(UntrustedJournalDirectory, match="sticky"):
        MachineCoreRegistry().try_acquire(0)
    monkeypatch.delenv("PREALLOC_REGISTRY_DIR")
    os.chmod(shared, 0o1777)
    registry = MachineCoreRegistry(shared)
    assert registry.shared
    lock = registry.try_acquire(0)
    assert lock is not None
    assert stat.S_IMODE(os.stat(shared / "core-0.lock").st_mode) == 0o666  # every user can label it
    lock.release()
    os.symlink("/etc/passwd", shared / "core-1.lock")
    with pytest.raises(UntrustedJournalDirectory, match="symlink"):
        registry.try_acquire(1)
    assert shared.exists()  # a shared directory is never removed


def test_the_private_directory_is_checked_like_the_journal(tmp_path):
    directory = tmp_path / "cores"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(UntrustedJournalDirectory):
        MachineCoreRegistry(directory).try_acquire(0)


@pytest.mark.parametrize("core", [-1, True, 1.0, "0"])
def test_a_bad_core_is_a_value_error(tmp_path, core):
    with pytest.raises(ValueError, match="core"):
        MachineCoreRegistry(tmp_path / "c").try_acquire(core)
    assert not (tmp_path / "c").exists()


def test_the_default_private_directory_is_the_journals_sibling(monkeypatch, tmp_path):
    monkeypatch.delenv("PREALLOC_REGISTRY_DIR", raising=False)
    monkeypatch.setenv("PREALLOC_JOURNAL_DIR", str(tmp_path / "journal"))
    assert MachineCoreRegistry().directory == registry_directory_for(tmp_path / "journal") \
        == tmp_path / "journal.cores"
    monkeypatch.setenv("PREALLOC_REGISTRY_DIR", str(tmp_path / "shared"))
    assert MachineCoreRegistry().directory == tmp_path / "shared" and MachineCoreRegistry().shared
