"""Exclusive cores across the processes of one machine, without a daemon.

Every process that imports prealloc has its own core registry (prealloc.core
``CoreReservations``; the CPU strategy shares one per process). To keep two *processes*
from both holding core 3 "exclusive", each exclusive core is also taken here: a lock file
per core, ``core-<N>.lock``, locked with ``flock(LOCK_EX | LOCK_NB)`` for as long as the
reservation lives.

Why flock: the kernel drops the lock when the last descriptor of the open file goes —
when the holder releases, exits or is SIGKILLed — so a dead holder's core is free by
construction; nobody has to notice the death, and there is nothing to reclaim by hand.
Two descriptors opened separately conflict even inside one process, so the lock also
keeps two registries of one process apart.

The file names its holder as one JSON object ``{pid, start, uid, level, allocation_id,
since}`` (``start``: the holder's start time in clock ticks since boot, /proc/PID/stat
field 22, which tells it from a later process that reused its pid), written after the
lock is won. The *lock* is the truth and the content only a label, which never misleads:
:meth:`MachineCoreRegistry.holders` lists a core only while its lock is held (read from
/proc/locks, which does not disturb a holder: probing by locking would make a concurrent
acquire fail), and reports ``confirmed=False`` when the content does not name the process
that /proc/locks says holds the lock, alive with that start time (a content left by a
SIGKILLed holder, one being rewritten, or one written by another user in a shared
directory). A holder that releases removes its file while still holding the lock; an
acquirer that locked a file which was removed meanwhile (its inode is no longer the
name's) lets go and tries again, so two holders never lock two different files of one
core.

fork: a child inherits the parent's descriptors, and with them the locks (one open file,
two processes). A child of os.fork() closes its inherited descriptors at once
(os.register_at_fork), so it never holds the parent's cores as its own and the parent's
death still frees them; exec closes them too (O_CLOEXEC). A child made by a raw fork(2)
from C code that never execs keeps them until it exits.

Directory. By default the journal directory's sibling ``<journal directory>.cores``
(prealloc.journal: /run/prealloc.cores for root, $XDG_RUNTIME_DIR/prealloc.cores or
/tmp/prealloc-<uid>.cores for others; a sibling rather than a ``cores/`` subdirectory so
the journal directory holds nothing but entries), with the journal's trust checks: a real directory of our uid, not writable by others. That directory is per
user, so by default cores are exclusive among the processes of one uid (and root's among
root's) — *not* across uids. For exclusivity across users, every cooperating process sets
the same shared directory (``PREALLOC_REGISTRY_DIR`` or ``directory=``), e.g. one made by
root as ``install -d -m 1777 /run/prealloc-cores``: a world-writable directory is accepted
only with the sticky bit (nobody removes another user's lock file) and owned by root or
us; each file is opened without following symlinks, must be a regular file with one link,
and is made 0666 by whoever creates it so every user can lock it and write its label.
Even then this is cooperation, not enforcement: a process that does not use prealloc can
run on any core (the ``cpuset`` isolation level is what moves other tasks off), and any
user who can open a lock file can hold it and deny that core to others.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .journal import UntrustedJournalDirectory, check_directory, default_directory, process_start_time

log = logging.getLogger(__name__)

_PREFIX = "core-"
_SUFFIX = ".lock"
_LABEL_MAX = 4096

# The locks this process holds; in a child of fork each is closed and marked released
# without touching its file (see the module): the file and the lock are the parent's.
_held: weakref.WeakSet[CoreLock] = weakref.WeakSet()
_held_lock = threading.Lock()


def _close_inherited_locks() -> None:
    global _held_lock
    _held_lock = threading.Lock()  # a thread of the parent may have held it
    for lock in list(_held):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)  # the parent's descriptor of the same open file keeps its lock
            except OSError:
                pass
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass(frozen=True, slots=True)
class CoreHolder:
    """One core's lock, held now. pid is the process /proc/locks names as the holder;
    start, uid, level, allocation_id and since come from the file's label, and are None
    when the label does not confirm it (``confirmed`` False: see the module).
    allocation_id is what the holder named: the CPU strategy names the request's id (an
    int or a string; it does not see the engine's allocation id)."""

    core: int
    pid: int | None
    start: int | None
    uid: int | None
    level: str | None
    allocation_id: int | str | None
    since: float | None
    confirmed: bool = True


def shared_directory() -> Path | None:
    """$PREALLOC_REGISTRY_DIR, the shared directory every cooperating process names."""
    env = os.environ.get("PREALLOC_REGISTRY_DIR")
    return Path(env) if env else None


def registry_directory_for(journal_directory: str | os.PathLike[str]) -> Path:
    """The private registry that goes with a journal directory: its sibling
    ``<journal directory>.cores`` (a sibling, not a subdirectory, so the journal's
    directory holds only journal entries)."""
    journal = Path(journal_directory)
    return journal.with_name(journal.name + ".cores")


def default_registry_directory() -> Path:
    """$PREALLOC_REGISTRY_DIR, else the one that goes with the default journal directory."""
    return shared_directory() or registry_directory_for(default_directory())


def _check_shared_directory(directory: Path) -> None:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"registry directory {directory} does not exist (a shared "
                                f"directory is made by its administrator, e.g. install -d -m 1777 {directory})")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedJournalDirectory(f"registry directory {directory} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise UntrustedJournalDirectory(f"registry directory {directory} belongs to uid {st.st_uid}, "
                                        f"neither root nor us (uid {os.geteuid()})")
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise UntrustedJournalDirectory(f"registry directory {directory} is writable by everyone without "
                                        f"the sticky bit (mode {stat.S_IMODE(st.st_mode):o}): anyone could "
                                        f"remove another user's lock; chmod +t it")


def _locks_by_inode() -> dict[tuple[int, int], int] | None:
    """(device, inode) -> pid of every FLOCK write lock, from /proc/locks; None when that
    file cannot be read."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    locks: dict[tuple[int, int], int] = {}
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2b:5678 0 EOF" ("->" marks a blocked waiter)
        if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            locks[(os.makedev(int(major, 16), int(minor, 16)), int(inode))] = int(fields[4])
        except ValueError:
            continue
    return locks


class CoreLock:
    """One core held in the machine registry. release() (or the end of a with-block, or
    the process's death) frees it. Made by :meth:`MachineCoreRegistry.try_acquire`."""

    __slots__ = ("core", "path", "_fd", "_unlink", "_private", "__weakref__")

    def __init__(self, core: int, path: Path, fd: int, unlink: bool, private: bool) -> None:
        self.core = core
        self.path = path
        self._fd: int | None = fd
        self._unlink = unlink
        self._private = private  # the directory is ours alone: remove it when it empties

    @property
    def released(self) -> bool:
        return self._fd is None

    def release(self) -> None:
        """Removes the file (while still locked: see the module) and drops the lock.
        Idempotent."""
        with _held_lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            _held.discard(self)
        try:
            if self._unlink:
                try:
                    os.unlink(self.path)
                except OSError:  # EPERM: another user's file in a sticky shared directory
                    os.ftruncate(fd, 0)
            else:
                os.ftruncate(fd, 0)
        except OSError as exc:
            log.debug("prealloc registry: tidying %s: %s", self.path, exc)
        finally:
            os.close(fd)
        if self._private:
            try:
                self.path.parent.rmdir()  # the last one out leaves the journal directory clean
            except OSError:
                pass

    def __enter__(self) -> CoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()

    def __repr__(self) -> str:
        return f"<CoreLock core={self.core} {'released' if self._fd is None else 'held'}>"


class MachineCoreRegistry:
    """The machine-wide registry of exclusive cores in `directory` (see the module for
    the default and what it is exclusive across). Thread-safe; holds no state of its own
    beyond the directory: every lock is a :class:`CoreLock`."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        if directory is not None:
            self.directory = Path(directory)
            self.shared = shared_directory() == self.directory or self._looks_shared(self.directory)
        else:
            shared = shared_directory()
            self.directory = shared or registry_directory_for(default_directory())
            self.shared = shared is not None
        self._owner = {"pid": os.getpid(), "start": process_start_time(os.getpid())}

    @staticmethod
    def _looks_shared(directory: Path) -> bool:
        try:
            return bool(os.lstat(directory).st_mode & stat.S_ISVTX)
        except OSError:
            return False

    def describe(self) -> str:
        """What the registry is exclusive across, in words (for details)."""
        if self.shared:
            return f"every process using the shared directory {self.directory}"
        return f"processes of uid {os.geteuid()} using {self.directory}"

    def _prepare(self) -> None:
        if self.shared:
            _check_shared_directory(self.directory)
            return
        check_directory(self.directory, create=True)  # the journal's checks: ours alone

    def path_of(self, core: int) -> Path:
        return self.directory / f"{_PREFIX}{core}{_SUFFIX}"

    def try_acquire(self, core: int, *, level: str = "registry",
                    allocation_id: int | str | None = None) -> CoreLock | None:
        """Takes core, or None when another holder has it now. OSError when the directory
        cannot be made or trusted (UntrustedJournalDirectory) or a lock file is not a
        plain file."""
        if isinstance(core, bool) or not isinstance(core, int) or core < 0:
            raise ValueError(f"core must be a cpu id (an int >= 0), not {core!r}")
        path = self.path_of(core)
        for _attempt in range(100):
            self._prepare()
            mode = 0o666 if self.shared else 0o600
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
            except FileNotFoundError:
                continue  # the directory was removed by the last holder leaving: make it again
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UntrustedJournalDirectory(f"registry lock file {path} is a symlink") from None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    raise UntrustedJournalDirectory(f"registry lock file {path} is not a plain file of one link")
                if not self.shared and st.st_uid != os.geteuid():
                    raise UntrustedJournalDirectory(f"registry lock file {path} belongs to uid {st.st_uid}")
                if self.shared and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o666:
                    os.fchmod(fd, 0o666)  # our umask took bits other users need to label it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
                try:
                    now = os.stat(path, follow_symlinks=False)
                    same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it between our open and our lock
                    os.close(fd)
                    continue
                label = {**self._owner, "uid": os.geteuid(), "level": level,
                         "allocation_id": allocation_id, "since": time.time()}
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps(label).encode(), 0)
                except OSError as exc:  # another user's file we may not write: locked, unlabelled
                    log.debug("prealloc registry: cannot label %s: %s", path, exc)
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            lock = CoreLock(core, path, fd, unlink=not self.shared or st.st_uid == os.geteuid(),
                            private=not self.shared)
            with _held_lock:
                _held.add(lock)
            return lock
        raise OSError(errno.EAGAIN, f"registry lock file {path} kept being replaced; giving up")

    def acquire_cores(self, cores: Iterable[int], **label: Any) -> list[CoreLock] | None:
        """Takes every core in cores or none of them: None when one is held elsewhere."""
        taken: list[CoreLock] = []
        try:
            for c in sorted(cores):
                lock = self.try_acquire(c, **label)
                if lock is None:
                    for held in taken:
                        held.release()
                    return None
                taken.append(lock)
        except BaseException:
            for held in taken:
                held.release()
            raise
        return taken

    def held_cores(self) -> set[int]:
        """Cores whose lock someone holds now (any process)."""
        return {h.core for h in self.holders()}

    def holders(self) -> list[CoreHolder]:
        """Every core held now, with its holder as far as the kernel confirms it (see the
        module). Never changes anything; [] when the directory does not exist."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        locks = _locks_by_inode()
        found: list[CoreHolder] = []
        for name in names:
            if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
                continue
            try:
                core = int(name[len(_PREFIX):-len(_SUFFIX)])
            except ValueError:
                continue
            holder = self._holder_of(core, self.directory / name, locks)
            if holder is not None:
                found.append(holder)
        return sorted(found, key=lambda h: h.core)

    def _holder_of(self, core: int, path: Path, locks: dict[tuple[int, int], int] | None) -> CoreHolder | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None  # removed meanwhile (released), or not a file we may read
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if locks is not None:
                lock_pid = locks.get((st.st_dev, st.st_ino))
                if lock_pid is None:
                    return None  # nobody holds it: whatever it says is stale
            else:  # no /proc/locks: a shared probe tells held from free (and may race an acquire)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return None
                except BlockingIOError:
                    lock_pid = None
            raw = os.pread(fd, _LABEL_MAX, 0)
        finally:
            os.close(fd)
        label: dict[str, Any] = {}
        try:
            parsed = json.loads(raw) if raw else {}
            if isinstance(parsed, dict):
                label = parsed
        except ValueError:
            pass
        pid, start = label.get("pid"), label.get("start")
        confirmed = (isinstance(pid, int) and isinstance(start, int)
                     and (lock_pid is None or lock_pid in (0, pid))  # 0: a pid outside our namespace
                     and process_start_time(pid) == start)
        if not confirmed:
            return CoreHolder(core, lock_pid or None, None, None, None, None, None, confirmed=False)

        def _int(key: str) -> int | None:
            value = label.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        since = label.get("since")
        level = label.get("level")
        allocation_id = label.get("allocation_id")
        if not isinstance(allocation_id, str):
            allocation_id = _int("allocation_id")
        return CoreHolder(core, pid, start, _int("uid"), level if isinstance(level, str) else None,
                          allocation_id, float(since) if isinstance(since, (int, float)) else None)
