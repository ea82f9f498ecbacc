"""A durable record of the side effects that outlive the process that made them.

Memory, locks and our own threads' settings go away with our process. Some side effects
do not: a CPU mask set on another process, an I/O priority set on another process, a
named reserve file holding disk space. A host killed by SIGKILL (or crashing) between
making one and undoing it would leave the target pinned or deprioritised, or the disk
space gone, for good. So before a strategy makes such a side effect it writes an entry
here, and undoing it deletes the entry.

One format for every kind: a JSON object with

- ``kind``: what to undo — ``"affinity"``, ``"ioprio"``, ``"reserve_file"``,
  ``"cgroup_weight"``, ``"tc_htb"`` (HTB classes and filters; its fields and undo are
  prealloc.strategies.network's), ``"cpuset"`` (tasks moved off reserved cores: rest
  cgroups made, cpusets shrunk, the moved tasks' masks; fields and undo are
  prealloc.cpuset's) or ``"sched"`` (a scheduling policy set on another process's
  threads: each value ``[policy, rt_priority, nice]``, restored like ``affinity``);
- ``owner``: ``{"pid", "start"}`` of the process that made it (start time in clock ticks
  since boot, /proc/PID/stat field 22, so a reused pid is never taken for the owner);
- the kind's own fields: for ``affinity`` and ``ioprio`` the target ``{"pid", "start"}``,
  every value ``applied`` (a resize adds one), each thread's ``previous`` value and a
  ``default`` for threads born after the change (the main thread's previous value); for
  ``reserve_file`` the file's ``path`` and, once created, its ``dev`` and ``ino``; for
  ``cgroup_weight`` the weight file's ``path``, the ``previous`` and ``applied`` weights.

(Entries written before kinds existed have no ``kind`` and are affinity entries.)

One recovery: :func:`recover` — run when a CPU or disk strategy is created and by
``prealloc recover`` — looks at every entry whose owner is dead and undoes it:

- affinity / ioprio: each thread of the target (same pid *and* start time) whose value
  is still exactly one we applied gets its previous value back; a thread whose value
  differs was changed by someone else since and is left alone;
- cgroup_weight: the previous weight is written back if the file still holds ours;
- cpuset: prealloc.cpuset.undo_entry (rest cgroups widened, emptied into their parents
  and removed; shrunk cpusets given back their cpus if they still hold ours); sched: like
  affinity, each thread still on the policy we set gets its previous one;
- reserve_file: the file is removed if it is still a regular file owned by us and (when
  the entry knows them) has the recorded device and inode; the name is one we made
  unique (our pid, start time and a sequence) and created with O_EXCL, so an entry
  written just before the create names nothing or our file.

The directory is $PREALLOC_JOURNAL_DIR, else /run/prealloc (root), else
$XDG_RUNTIME_DIR/prealloc, else /tmp/prealloc-<uid>: run-time directories, emptied at
boot, which is right — after a reboot nobody is pinned. A shared /tmp lets anyone create
/tmp/prealloc-<uid> first and plant entries that recovery would act on, so the directory
is created 0700 and used only if it is a real directory (not a symlink) owned by our
effective uid and not writable by group or others (:class:`UntrustedJournalDirectory`
otherwise); entries not owned by our uid are ignored even in a trusted directory.
Entries are written to a temporary name and renamed, so a reader never sees half of one;
a recoverer claims an entry by renaming it, so two recoverers never undo one twice.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import core

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_CLAIMED = ".recovering"

KIND_AFFINITY = "affinity"
KIND_IOPRIO = "ioprio"
KIND_RESERVE_FILE = "reserve_file"
KIND_CGROUP_WEIGHT = "cgroup_weight"
KIND_TC_HTB = "tc_htb"  # prealloc.strategies.network: HTB classes and filters on an interface
KIND_CPUSET = "cpuset"  # prealloc.cpuset: other tasks moved off reserved cores
KIND_SCHED = "sched"  # prealloc.strategies.cpu: [policy, rt_priority, nice] of another process's threads


_SEQUENCE = itertools.count(1)


class UntrustedJournalDirectory(PermissionError):
    """The journal directory is not a private directory of this user: using it would let
    another user plant entries that recovery acts on."""


def default_directory() -> Path:
    env = os.environ.get("PREALLOC_JOURNAL_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/prealloc")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "prealloc"
    return Path(tempfile.gettempdir()) / f"prealloc-{os.getuid()}"


def check_directory(directory: Path, *, create: bool) -> bool:
    """Makes sure `directory` is ours alone (see the module); creates it 0700 when asked
    and missing. False when it does not exist (and was not to be created); raises
    UntrustedJournalDirectory when it exists but cannot be trusted."""
    if create:
        try:
            directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedJournalDirectory(f"journal directory {directory} is not a directory "
                                        f"({'a symlink' if stat.S_ISLNK(st.st_mode) else 'a file'})")
    if st.st_uid != uid:
        raise UntrustedJournalDirectory(f"journal directory {directory} belongs to uid {st.st_uid}, not to "
                                        f"us (uid {uid}); remove it or set PREALLOC_JOURNAL_DIR")
    if st.st_mode & 0o022:
        raise UntrustedJournalDirectory(f"journal directory {directory} is writable by others "
                                        f"(mode {stat.S_IMODE(st.st_mode):o}); chmod it go-w")
    return True


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which
    tells a live process from a later one that reused its pid; None when it is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(stat_line[stat_line.rindex(")") + 2:].split()[19])


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


_thread_ids = thread_ids  # the name this module used before


class Entry:
    """One journaled side effect: its file and its data (see the module for the
    format). Made by :meth:`Journal.record`; kept up to date by the strategy that made
    it, deleted by :meth:`forget` once the side effect is undone or handed over."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", KIND_AFFINITY))

    def save(self) -> None:
        """Writes the entry under a temporary name and renames it into place."""
        check_directory(self.path.parent, create=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def add_applied(self, applied: Any) -> None:
        """The change now applies `applied` as well (after a resize: threads may hold
        either). For affinity, an iterable of cores; for ioprio, a priority value."""
        value: Any = sorted(applied) if self.kind == KIND_AFFINITY else applied
        if value not in self.data["applied"]:
            self.data["applied"].append(value)
            self.save()

    def forget(self) -> None:
        """The side effect was undone (or handed over) by its owner."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


JournalEntry = Entry  # the affinity journal's name for it


class Journal:
    """Makes this process's entries (see the module). Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self._owner = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        # one sequence for every Journal of the process (next() is atomic: workers record
        # concurrently), so two journals (the CPU's, the disk's) never write one name
        self._sequence = _SEQUENCE

    def unique_name(self, prefix: str) -> str:
        """A name nobody else makes: prefix-<our pid>-<our start time>-<sequence>."""
        return f"{prefix}-{self._owner['pid']}-{self._owner['start']}-{next(self._sequence)}"

    def record(self, kind: str, **fields: Any) -> Entry:
        """Writes an entry of `kind`; call it *before* making the side effect, so a crash
        in between leaves an entry (whose undo then changes nothing) rather than a side
        effect nobody knows about. OSError when the directory cannot be written or
        trusted."""
        return self._write(kind, fields)

    def _write(self, kind: str, fields: dict[str, Any]) -> Entry:
        if kind not in _UNDO:
            raise ValueError(f"kind must be one of {sorted(_UNDO)}, not {kind!r}")
        data = {"kind": kind, "owner": dict(self._owner), "uid": os.geteuid(), **fields}
        entry = Entry(self.directory / (self.unique_name("e") + _SUFFIX), data)
        entry.save()
        return entry

    def record_threads(self, kind: str, target_pid: int, applied: Any,
                       read: Callable[[int], Any]) -> Entry:
        """An affinity or ioprio entry for target_pid: every thread's previous value
        (read(tid)) and the value about to be applied. ProcessLookupError when the
        target is gone."""
        start = process_start_time(target_pid)
        if start is None:
            raise ProcessLookupError(f"no process {target_pid}")
        previous = {}
        for tid in thread_ids(target_pid):
            try:
                previous[str(tid)] = read(tid)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
        main = previous.get(str(target_pid), next(iter(previous.values()), None))
        return self._write(kind, {"target": {"pid": target_pid, "start": start}, "applied": [applied],
                                  "previous": previous, "default": main})

    def record_reserve_file(self, path: str | os.PathLike[str]) -> Entry:
        """An entry for a reserve file about to be created at path (O_EXCL); call
        ``entry.update(dev=..., ino=...)`` once it exists."""
        return self._write(KIND_RESERVE_FILE, {"path": os.fspath(path)})


class AffinityJournal(Journal):
    """The CPU strategy's view: entries for pins of other processes."""

    def record(self, target_pid: int, applied: Iterable[int]) -> Entry:  # type: ignore[override]
        """Writes the entry for pinning target_pid to `applied` (before the pin).
        OSError when the target is gone or the directory cannot be written."""
        return self.record_threads(KIND_AFFINITY, target_pid, sorted(applied),
                                   lambda tid: sorted(core.get_thread_affinity(tid)))


@dataclass
class RecoveredTarget:
    """What recover() did for one entry of a dead owner."""

    target_pid: int | None
    restored_threads: list[int] = field(default_factory=list)
    left_alone: list[int] = field(default_factory=list)  # changed by someone else since
    target_gone: bool = False
    kind: str = KIND_AFFINITY
    removed: str | None = None  # reserve_file: the path removed; cgroup_weight: the file restored


def _owner_alive(owner: dict) -> bool:
    pid, start = owner.get("pid"), owner.get("start")
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


def _restore_threads(data: dict, get: Callable[[int], Any], put: Callable[[int, Any], None],
                     normalise: Callable[[Any], Any]) -> RecoveredTarget:
    target = data["target"]
    pid, start = int(target["pid"]), int(target["start"])
    done = RecoveredTarget(pid, kind=data.get("kind", KIND_AFFINITY))
    if process_start_time(pid) != start:
        done.target_gone = True  # exited (its pid may belong to someone else now)
        return done
    applied = [normalise(v) for v in data["applied"]]
    previous = {int(t): normalise(v) for t, v in data["previous"].items()}
    default = normalise(data["default"])
    for tid in thread_ids(pid):
        try:
            if get(tid) not in applied:
                done.left_alone.append(tid)
                continue
            value = previous.get(tid, default)
            put(tid, value if value is not None and value != set() else default)
            done.restored_threads.append(tid)
        except ProcessLookupError:
            continue
    return done


def _undo_affinity(data: dict) -> RecoveredTarget:
    return _restore_threads(data, core.get_thread_affinity, core.set_thread_affinity,
                            lambda v: set(v) if v is not None else set())


def _undo_ioprio(data: dict) -> RecoveredTarget:
    from . import _native
    return _restore_threads(data, _native.ioprio_get, _native.ioprio_set, lambda v: int(v) if v is not None else 0)


def _undo_reserve_file(data: dict) -> RecoveredTarget:
    path = os.fspath(data["path"])
    done = RecoveredTarget(None, kind=KIND_RESERVE_FILE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        done.target_gone = True
        return done
    same = ("ino" not in data or (st.st_ino == int(data["ino"]) and st.st_dev == int(data["dev"])))
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or not same:
        done.left_alone.append(st.st_ino)  # not the file we made
        return done
    os.unlink(path)
    done.removed = path
    return done


def _undo_cgroup_weight(data: dict) -> RecoveredTarget:
    from .monitors.disk import read_io_weight, write_io_weight
    path = os.fspath(data["path"])
    done = RecoveredTarget(None, kind=KIND_CGROUP_WEIGHT)
    try:
        current = read_io_weight(path)
    except FileNotFoundError:
        done.target_gone = True  # the cgroup was removed
        return done
    if current != int(data["applied"]):
        done.left_alone.append(current)  # someone set another weight since
        return done
    write_io_weight(path, int(data["previous"]))
    done.removed = path
    return done


def _undo_tc_htb(data: dict) -> RecoveredTarget:
    from .strategies.network import undo_tc_entry
    return undo_tc_entry(data)


def _undo_cpuset(data: dict) -> RecoveredTarget:
    from .cpuset import undo_entry
    return undo_entry(data)


def _undo_sched(data: dict) -> RecoveredTarget:
    from .strategies.cpu import read_thread_sched, write_thread_sched
    return _restore_threads(data, read_thread_sched, write_thread_sched, lambda v: list(v) if v is not None else [])


_UNDO: dict[str, Callable[[dict], RecoveredTarget]] = {
    KIND_AFFINITY: _undo_affinity,
    KIND_IOPRIO: _undo_ioprio,
    KIND_RESERVE_FILE: _undo_reserve_file,
    KIND_CGROUP_WEIGHT: _undo_cgroup_weight,
    KIND_TC_HTB: _undo_tc_htb,
    KIND_CPUSET: _undo_cpuset,
    KIND_SCHED: _undo_sched,
}


def read_entry(path: str | os.PathLike[str]) -> dict | None:
    """One journal entry's data, read without following a symlink; None when it vanished
    or is not a regular file of our uid; ValueError / TypeError when it is not an entry."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink planted in place of an entry
            log.warning("prealloc journal: %s is a symlink; ignored", path)
            return None
        raise
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            log.warning("prealloc journal: %s is not a file of ours (uid %d); ignored", path, st.st_uid)
            return None
        data = json.loads(f.read())
    if not isinstance(data, dict) or not isinstance(data.get("owner"), dict):
        raise TypeError("not an entry object with an owner")
    return data


def recover(directory: str | os.PathLike[str] | None = None) -> list[RecoveredTarget]:
    """Undoes the side effects of every owner that died without undoing them (see the
    module); entries of live owners are left as they are. Returns what was done, one
    item per entry recovered. An unreadable entry is logged and renamed aside (*.bad),
    not retried forever. UntrustedJournalDirectory when the directory is not ours."""
    folder = Path(directory) if directory is not None else default_directory()
    if not check_directory(folder, create=False):
        return []
    names = sorted(os.listdir(folder))
    results = []
    for name in names:
        if not name.endswith(_SUFFIX):
            continue
        path = folder / name
        try:
            data = read_entry(path)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("prealloc journal: unreadable entry %s (%s); set aside as .bad", path, exc)
            os.replace(path, path.with_suffix(".bad"))
            continue
        if data is None or _owner_alive(data["owner"]):
            continue
        undo = _UNDO.get(str(data.get("kind", KIND_AFFINITY)))
        if undo is None:
            log.warning("prealloc journal: entry %s of unknown kind %r; set aside as .bad", path, data.get("kind"))
            os.replace(path, path.with_suffix(".bad"))
            continue
        claimed = path.with_suffix(f"{_CLAIMED}-{os.getpid()}")
        try:
            os.rename(path, claimed)  # only one recoverer wins an entry
        except FileNotFoundError:
            continue
        try:
            result = undo(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("prealloc journal: bad entry %s (%s); set aside as .bad", path, exc)
            os.replace(claimed, path.with_suffix(".bad"))
            continue
        except OSError as exc:
            # e.g. EPERM: put the entry back for a recoverer with the right to do it
            log.warning("prealloc journal: cannot undo %s entry %s (%s)", data.get("kind", KIND_AFFINITY), path, exc)
            os.replace(claimed, path)
            continue
        claimed.unlink()
        if result.restored_threads or result.removed:
            log.info("prealloc journal: undid a %s side effect (%s) of process %s, which died without undoing it",
                     result.kind, result.removed or f"{len(result.restored_threads)} thread(s) of process "
                     f"{result.target_pid}", data["owner"].get("pid"))
        results.append(result)
    return results
