"""File-set profiles for CACHE_SPACE: which files a program reads when it starts.

A profile is a plain JSON file ``<directory>/<name>.json``::

    {"format": "prealloc-profile", "version": 1, "name": "numpy",
     "command": ["python3", "-c", "import numpy"], "method": "fanotify",
     "recorded_at": 1764580000.0, "seconds": 5.0,
     "files": [{"path": "/usr/lib/...", "size": 123, "mtime_ns": 456}, ...]}

It is validated when loaded (ValueError naming the field). Entries whose file is gone or
changed size or mtime since the recording are *stale*: :meth:`Profile.current` skips
them and counts them, so a profile ages gracefully instead of warming the wrong bytes.

Recording (:func:`record`) runs a program once and collects the regular files its
process tree opened during its first ``seconds``:

- ``fanotify`` (root, CAP_SYS_ADMIN): FAN_OPEN marks on every mount, the events
  filtered to the child's process tree. Every open is seen, however short-lived (an
  exec'd or mmap'd file is opened first). FAN_ACCESS is left out: it reports every
  read() of every process on the marked mounts, a flood for no more files; ranges are
  not recorded, whole files are warmed.
- ``strace`` (unprivileged, where the ``strace`` program is installed and ptrace of a
  child is allowed): every successful open/openat/openat2/execve of the tree, with the
  path the kernel resolved (``-y``). Exact like fanotify, but the program runs traced
  (slower) for the recording.
- ``proc`` (unprivileged fallback, always available): samples ``/proc/PID/maps`` and ``/proc/PID/fd`` of
  the tree every ``sample_interval``. It sees mapped files (libraries) for the
  process's life, and open files only while they are open at a sample, so a file opened
  and closed between two samples can be missed: prefer fanotify where it is allowed.

Neither records what a file list cannot warm (directory entries, failed lookups).
The directory defaults to ``$PREALLOC_PROFILE_DIR``, else
``$XDG_DATA_HOME/prealloc/profiles`` (``~/.local/share/prealloc/profiles``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["FORMAT", "VERSION", "Profile", "ProfileEntry", "default_profile_dir", "load_profile",
           "profile_path", "record", "save_profile"]

log = logging.getLogger(__name__)

FORMAT = "prealloc-profile"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_profile_dir() -> Path:
    env = os.environ.get("PREALLOC_PROFILE_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "prealloc" / "profiles"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"profile name must be 1-128 characters of letters, digits, '.', '_' or '-' "
                         f"(not starting with '.' or '-'), not {name!r}")
    return name


def profile_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    return Path(directory if directory is not None else default_profile_dir()) / f"{_check_name(name)}.json"


@dataclasses.dataclass(frozen=True, slots=True)
class ProfileEntry:
    path: str
    size: int
    mtime_ns: int

    def is_current(self) -> bool:
        """The file exists with the recorded size and mtime."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


@dataclasses.dataclass(slots=True)
class Profile:
    name: str
    files: list[ProfileEntry]
    command: list[str] = dataclasses.field(default_factory=list)
    method: str = "given"
    recorded_at: float = 0.0
    seconds: float | None = None

    def current(self) -> tuple[list[ProfileEntry], int]:
        """(entries still current, how many were stale and skipped)."""
        kept = [entry for entry in self.files if entry.is_current()]
        return kept, len(self.files) - len(kept)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "command": list(self.command),
                "method": self.method, "recorded_at": self.recorded_at, "seconds": self.seconds,
                "files": [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in self.files]}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "profile") -> Profile:
        """Validates a parsed profile; ValueError naming the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a profile is a JSON object, not {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: format must be {FORMAT!r}, not {data.get('format')!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"{source}: version {data.get('version')!r} is not supported (only {VERSION})")
        name = _check_name(data.get("name"))
        files = data.get("files")
        if not isinstance(files, list):
            raise ValueError(f"{source}: files must be a list")
        entries = []
        for i, item in enumerate(files):
            if not isinstance(item, dict):
                raise ValueError(f"{source}: files[{i}] must be an object")
            path, size, mtime = item.get("path"), item.get("size"), item.get("mtime_ns")
            if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
                raise ValueError(f"{source}: files[{i}].path must be an absolute path, not {path!r}")
            for field, value in (("size", size), ("mtime_ns", mtime)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{source}: files[{i}].{field} must be an int >= 0, not {value!r}")
            entries.append(ProfileEntry(os.path.normpath(path), int(size), int(mtime)))  # type: ignore[arg-type]
        command = data.get("command", [])
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise ValueError(f"{source}: command must be a list of strings")
        method = data.get("method", "given")
        if not isinstance(method, str):
            raise ValueError(f"{source}: method must be a string")
        recorded_at = data.get("recorded_at", 0.0)
        if isinstance(recorded_at, bool) or not isinstance(recorded_at, (int, float)):
            raise ValueError(f"{source}: recorded_at must be a number")
        seconds = data.get("seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
            raise ValueError(f"{source}: seconds must be a number or null")
        return cls(name=name, files=entries, command=list(command), method=method,
                   recorded_at=float(recorded_at), seconds=None if seconds is None else float(seconds))

    @classmethod
    def from_paths(cls, name: str, paths: Iterable[str]) -> Profile:
        """A profile of existing regular files as they are now."""
        entries = []
        for path in paths:
            st = os.stat(path)
            entries.append(ProfileEntry(os.path.abspath(path), st.st_size, st.st_mtime_ns))
        return cls(name=_check_name(name), files=entries)


def save_profile(profile: Profile, directory: str | os.PathLike[str] | None = None) -> Path:
    """Writes the profile atomically (a temporary file renamed over the old one)."""
    path = profile_path(profile.name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(profile.to_json(), out, indent=1)
        out.write("\n")
    os.replace(temporary, path)
    return path


def load_profile(name: str, directory: str | os.PathLike[str] | None = None) -> Profile:
    """Loads and validates a profile. FileNotFoundError when there is none; ValueError
    when it is not a valid profile."""
    path = profile_path(name, directory)
    with open(path, encoding="utf-8") as source:
        try:
            data = json.load(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
    return Profile.from_json(data, source=str(path))


# ---------------------------------------------------------------------------------------
# recording

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _tree(root: int) -> set[int]:
    seen = {root}
    stack = [root]
    while stack:
        for child in _children(stack.pop()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _files_of(pid: int) -> set[str]:
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    found.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            found.add(target)
    return found


def _record_proc(process: subprocess.Popen[bytes], seconds: float, sample_interval: float) -> set[str]:
    seen: set[str] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pid in _tree(process.pid):
            seen |= _files_of(pid)
        if process.poll() is not None:
            break
        time.sleep(sample_interval)
    return seen


# fanotify through libc (Python has no binding); constants from <linux/fanotify.h>
_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
_FAN_CLASS_NOTIF = 0x0
_FAN_UNLIMITED_QUEUE = 0x10
_FAN_MARK_ADD = 0x1
_FAN_MARK_MOUNT = 0x10
_FAN_OPEN = 0x20
_FAN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_NOT_FILES = ("/proc/", "/sys/", "/dev/")
_PSEUDO_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
              "tracefs", "pstore", "bpf", "mqueue", "hugetlbfs", "configfs", "fusectl", "autofs",
              "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs", "tmpfs", "ramfs", "squashfs"}


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] not in _PSEUDO_FS:
                points.append(fields[1].replace("\\040", " "))
    return points


def _fanotify_open() -> int:
    """A fanotify group with FAN_OPEN marks on every real mount; OSError
    (EPERM unprivileged) where the kernel refuses."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    fd = libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_CLASS_NOTIF | _FAN_UNLIMITED_QUEUE,
                            os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_init: {os.strerror(err)}")
    marked = 0
    for point in _mount_points():
        if libc.fanotify_mark(fd, _FAN_MARK_ADD | _FAN_MARK_MOUNT, _FAN_OPEN, -100,
                              os.fsencode(point)) == 0:
            marked += 1
    if marked == 0:
        os.close(fd)
        raise OSError(errno.EPERM, "fanotify_mark: no mount could be marked")
    return fd


def _record_fanotify(group: int, process: subprocess.Popen[bytes], seconds: float) -> set[str]:
    seen: set[str] = set()
    tree: set[int] = {process.pid}
    outside: set[int] = set()
    poller = select.poll()
    poller.register(group, select.POLLIN)
    end = time.monotonic() + seconds
    exited_at: float | None = None

    def in_tree(pid: int) -> bool:
        if pid in tree:
            return True
        if pid in outside:
            return False
        chain = []
        current: int | None = pid
        while current is not None and current > 1 and current not in tree and current not in outside:
            chain.append(current)
            current = _parent(current)
        inside = current in tree
        (tree if inside else outside).update(chain)
        return inside

    while True:
        now = time.monotonic()
        if now >= end or (exited_at is not None and now - exited_at > 0.05):
            break
        if exited_at is None and process.poll() is not None:
            exited_at = now  # drain what is queued, then stop
        else:
            tree |= _tree(process.pid) if exited_at is None else set()
        if not poller.poll(20):
            continue
        try:
            buffer = os.read(group, 1 << 16)
        except BlockingIOError:
            continue
        offset = 0
        while offset + _EVENT.size <= len(buffer):
            event_len, _, _, _, mask, fd, pid = _EVENT.unpack_from(buffer, offset)
            offset += event_len or _EVENT.size
            if fd < 0:
                if mask & _FAN_Q_OVERFLOW:
                    log.warning("fanotify queue overflowed: the recording may miss files")
                continue
            try:
                if in_tree(pid):
                    seen.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
            finally:
                os.close(fd)
    return seen


_STRACE_OPENED = re.compile(r"= \d+<(/.*)>$")
_STRACE_EXECVE = re.compile(r'^\d+ +execve\("(/[^"]*)"')


def _record_strace(strace: str, command: Sequence[str], seconds: float, stdout: Any) -> set[str]:
    """OSError when strace cannot trace here (ptrace refused)."""
    with tempfile.TemporaryDirectory(prefix="prealloc-record-") as scratch:
        log_path = os.path.join(scratch, "trace")
        process = subprocess.Popen([strace, "-f", "-qq", "-y", "-e", "trace=open,openat,openat2,execve",
                                    "-e", "status=successful", "-o", log_path, "--", *command],
                                   stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
        _wait_or_kill(process, seconds)
        try:
            with open(log_path, errors="replace") as trace:
                lines = trace.read().splitlines()
        except FileNotFoundError:
            lines = []
        if not lines:
            message = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
            raise OSError(errno.EPERM, f"strace could not trace the program: {message or 'no output'}")
    seen: set[str] = set()
    for line in lines:
        match = _STRACE_OPENED.search(line)
        if match:
            seen.add(match.group(1))
        elif (match := _STRACE_EXECVE.match(line)) is not None:
            seen.add(os.path.realpath(match.group(1)))  # execve shows the path as given
    return seen


def _wait_or_kill(process: subprocess.Popen[bytes], seconds: float) -> None:
    """Waits up to seconds, then kills the program's whole session (its children too)."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def record(command: Sequence[str], *, name: str, seconds: float = 5.0,
           directory: str | os.PathLike[str] | None = None, method: str = "auto",
           roots: Sequence[str] | None = None, sample_interval: float = 0.005,
           save: bool = True, stdout: Any = subprocess.DEVNULL) -> Profile:
    """Runs command once and records the regular files its process tree read during its
    first `seconds` (see the module docstring for the methods). method: "auto" (fanotify
    where permitted, else strace where it can trace, else proc), "fanotify", "strace" or
    "proc". roots: keep only files under
    these directories. The program is killed after `seconds` if still running. The
    profile is saved unless save=False; its `method` says which recorder was used."""
    _check_name(name)
    if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
        raise ValueError(f"command must be a non-empty list of strings, not {command!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise ValueError(f"seconds must be a number in (0, 3600], not {seconds!r}")
    if method not in ("auto", "fanotify", "strace", "proc"):
        raise ValueError(f"method must be 'auto', 'fanotify', 'strace' or 'proc', not {method!r}")
    group = -1
    used = "proc"
    found: set[str] | None = None
    if method in ("auto", "fanotify"):
        try:
            group = _fanotify_open()
            used = "fanotify"
        except OSError as exc:
            if method == "fanotify":
                raise
            log.info("fanotify unavailable (%s)", exc.strerror)
    strace = shutil.which("strace") if method in ("auto", "strace") and group < 0 else None
    if method == "strace" and strace is None:
        raise FileNotFoundError(errno.ENOENT, "strace is not installed")
    if strace is not None:
        try:
            found = _record_strace(strace, command, float(seconds), stdout)
            used = "strace"
        except OSError as exc:
            if method == "strace":
                raise
            log.info("strace cannot trace here (%s): recording with /proc sampling", exc.strerror)
    if found is None:
        try:
            process = subprocess.Popen(list(command), stdout=stdout, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
            try:
                if group >= 0:
                    found = _record_fanotify(group, process, float(seconds))
                else:
                    found = _record_proc(process, float(seconds), sample_interval)
            finally:
                _wait_or_kill(process, 0)
        finally:
            if group >= 0:
                os.close(group)
    real_roots = [os.path.realpath(r) for r in roots] if roots else None
    entries = []
    for path in sorted(found):
        if path.startswith(_NOT_FILES):
            continue  # kernel interfaces and devices: nothing to cache
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not os.path.isfile(path):
            continue
        if real_roots is not None and not any(path == r or path.startswith(r.rstrip("/") + "/")
                                              for r in real_roots):
            continue
        entries.append(ProfileEntry(path, st.st_size, st.st_mtime_ns))
    profile = Profile(name=name, files=entries, command=list(command), method=used,
                      recorded_at=time.time(), seconds=float(seconds))
    if save:
        save_profile(profile, directory)
    return profile
