"""A durable record of the affinity changes made to *other* processes.

Memory, locks and our own threads' masks go away with our process; a mask set on another
process does not. A host killed by SIGKILL (or crashing) between pinning a target and
releasing it would leave the target confined to the reserved cores for the rest of its
life. So before the CPU strategy pins another process it writes an entry here: who pinned
(our pid and start time), whom (the target's pid and start time, so a reused pid is never
touched), the masks applied (one more per resize), and each thread's previous mask.
Release deletes the entry.

`recover()` — run when a CPU strategy is created and by `prealloc recover` — looks at
every entry whose owner is dead and puts the target back: each thread of the target whose
mask is still exactly one we applied gets its previous mask (threads born after the
pin get the main thread's). A thread whose mask differs was changed by someone else since,
and is left alone.

The directory is $PREALLOC_JOURNAL_DIR, else /run/prealloc (root), else
$XDG_RUNTIME_DIR/prealloc, else /tmp/prealloc-<uid>: run-time directories, emptied at
boot, which is right — after a reboot nobody is pinned. Entries are written to a temporary
name and renamed, so a reader never sees half of one; a recoverer claims an entry by
renaming it, so two recoverers never restore the same target.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import core

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_CLAIMED = ".recovering"


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


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which
    tells a live process from a later one that reused its pid; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


@dataclass
class JournalEntry:
    """One pin of another process: what `recover()` needs to undo it."""

    path: Path
    owner: dict  # {"pid", "start"} of the process that pinned
    target_pid: int
    target_start: int
    applied: list[list[int]]  # every mask this pin has set (a resize adds one)
    previous: dict[int, list[int]]  # tid -> that thread's mask before the pin
    default: list[int]              # for threads born after the pin: the main thread's

    def to_json(self) -> dict:
        return {"owner": self.owner,
                "target": {"pid": self.target_pid, "start": self.target_start},
                "applied": self.applied, "previous": {str(t): m for t, m in self.previous.items()},
                "default": self.default}

    def save(self) -> None:
        """Writes the entry under a temporary name and renames it into place."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def add_applied(self, applied: Iterable[int]) -> None:
        """The pin now applies `applied` as well (after a resize: threads may hold either)."""
        mask = sorted(applied)
        if mask not in self.applied:
            self.applied.append(mask)
            self.save()

    def forget(self) -> None:
        """The pin was undone by its owner."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@dataclass
class RecoveredTarget:
    """What recover() did for one entry of a dead owner."""

    target_pid: int
    restored_threads: list[int] = field(default_factory=list)
    left_alone: list[int] = field(default_factory=list)  # changed by someone else since
    target_gone: bool = False


class AffinityJournal:
    """Makes the entries of this process's pins (see the module); each entry then keeps
    its own file up to date."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self._owner = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        self._sequence = itertools.count(1)  # next() is atomic: workers record concurrently

    def record(self, target_pid: int, applied: Iterable[int]) -> JournalEntry:
        """Writes the entry for pinning target_pid to `applied`; call it *before* the pin,
        so a crash in between leaves an entry (whose restore then changes nothing) rather
        than a pin nobody knows about. OSError when the target is gone or the directory
        cannot be written."""
        start = process_start_time(target_pid)
        if start is None:
            raise ProcessLookupError(f"no process {target_pid}")
        previous = {}
        for tid in _thread_ids(target_pid):
            try:
                previous[tid] = sorted(core.get_thread_affinity(tid))
            except ProcessLookupError:
                continue  # the thread ended meanwhile
        main = previous.get(target_pid) or next(iter(previous.values()), [])
        name = f"{self._owner['pid']}-{self._owner['start']}-{next(self._sequence)}{_SUFFIX}"
        entry = JournalEntry(self.directory / name, self._owner, target_pid, start, [sorted(applied)], previous, main)
        entry.save()
        return entry


def _owner_alive(owner: dict) -> bool:
    pid, start = owner.get("pid"), owner.get("start")
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


def _restore(data: dict) -> RecoveredTarget:
    target = data["target"]
    pid, start = int(target["pid"]), int(target["start"])
    done = RecoveredTarget(pid)
    if process_start_time(pid) != start:
        done.target_gone = True  # exited (its pid may belong to someone else now)
        return done
    applied = [set(m) for m in data["applied"]]
    previous = {int(t): set(m) for t, m in data["previous"].items()}
    default = set(data["default"])
    for tid in _thread_ids(pid):
        try:
            if core.get_thread_affinity(tid) not in applied:
                done.left_alone.append(tid)
                continue
            core.set_thread_affinity(tid, previous.get(tid, default) or default)
            done.restored_threads.append(tid)
        except ProcessLookupError:
            continue
    return done


def recover(directory: str | os.PathLike[str] | None = None) -> list[RecoveredTarget]:
    """Undoes the pins of every owner that died without releasing them (see the module);
    entries of live owners are left as they are. Returns what was done, one item per
    entry recovered. An unreadable entry is logged and renamed aside (*.bad), not
    retried forever."""
    folder = Path(directory) if directory is not None else default_directory()
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    results = []
    for name in names:
        if not name.endswith(_SUFFIX):
            continue
        path = folder / name
        try:
            data = json.loads(path.read_text())
            owner = data["owner"]
            if not isinstance(owner, dict):
                raise TypeError(f"owner is {type(owner).__name__}, not an object")
        except FileNotFoundError:
            continue  # released or claimed meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("prealloc journal: unreadable entry %s (%s); set aside as .bad", path, exc)
            os.replace(path, path.with_suffix(".bad"))
            continue
        if _owner_alive(owner):
            continue
        claimed = path.with_suffix(f"{_CLAIMED}-{os.getpid()}")
        try:
            os.rename(path, claimed)  # only one recoverer wins an entry
        except FileNotFoundError:
            continue
        try:
            result = _restore(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("prealloc journal: bad entry %s (%s); set aside as .bad", path, exc)
            os.replace(claimed, path.with_suffix(".bad"))
            continue
        except OSError as exc:
            # e.g. EPERM: put the entry back for a recoverer with the right to do it
            log.warning("prealloc journal: cannot restore process %s (%s)", data["target"].get("pid"), exc)
            os.replace(claimed, path)
            continue
        claimed.unlink()
        if result.restored_threads:
            log.info("prealloc journal: restored the affinity of %d thread(s) of process %d, pinned by "
                     "process %s which died without releasing it", len(result.restored_threads),
                     result.target_pid, owner.get("pid"))
        results.append(result)
    return results
