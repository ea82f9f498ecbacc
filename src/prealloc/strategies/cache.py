"""CACHE_SPACE: warm the page cache with the files a predicted program will read.

The amount is MiB of file data made resident. Which files: the request's
``metadata.custom_properties`` — ``{"files": [paths, globs or directories]}`` and/or
``{"profile": NAME}`` (see :mod:`prealloc.profiles`), optionally ``{"max_mib": N}`` —
else the strategy's own ``files`` / ``profile``. The amount is capped by the files'
size; files are taken in order until it is reached (the last one in part).

Allocate (on the engine's worker), in one native pass over the set: open every file
within ``roots`` (the native side checks the path the kernel really opened, so a symlink
or ``..`` cannot lead out, and it never hands contents to anyone; a profile's entry whose
size or mtime changed since the recording is refused there, stale — no stat of its own
in Python), count what is resident already (cachestat, mincore where cachestat is
missing), read its directory once, and issue WILLNEED for the small files; then read
every range (pread into a reused buffer: a whole large file is left to the kernel's own
readahead, measured faster than chunked WILLNEED, and the program after a read-based
warming ran faster than after MADV_POPULATE_READ — pagecache.h "Large files", "Reading,
not mapping") so the pages are resident before ALLOCATED is reported, batch by batch, stopping when memory pressure (PSI ``some avg10`` of the monitor's availability,
or read here) passes ``pressure_limit`` — warming is a soft reservation that yields.
Optionally pin (mlock) within RLIMIT_MEMLOCK; what was asked and what was pinned, and
why not, go to the details. Claim re-counts and re-warms what fell out since (warmed
pages do not stay: an idle 200 MB database fell from 100 % to 83 % in 120 s here).

Release unpins. It does not evict (other programs may use the same pages) unless
``evict_on_unused`` is set: then an allocation that was never claimed evicts the pages
that were not resident before it (the kernel here offers no idle-page tracking, so
"unused" means "never claimed"; a claimed allocation's pages are left alone). A file
whose page-cache state the kernel does not reveal to this process (see
``PageCacheFiles.counts``) looks fully resident before, so nothing of it is evicted.

What a file list cannot cover: failed lookups (gcc probes ~290 paths that do not
exist) in directories that hold none of the files. The directories of the warmed files
are read too (``warm_directories``, in the native open pass before the large readaheads
are queued), so lookups next to them — symlinks, failed probes — hit cached blocks.
"""
from __future__ import annotations

import errno
import glob
import itertools
import logging
import math
import os
import resource
import stat
import threading
import time
from typing import Any, Iterable, NamedTuple, Sequence

from .. import _native
from ..profiles import load_profile
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

__all__ = ["CacheSpaceStrategy", "CacheWarming", "DEFAULT_ROOTS", "memlock_budget"]

log = logging.getLogger(__name__)

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# Where files may be warmed from unless told otherwise: programs, libraries, data and
# the user's own files — not /etc, /proc, /sys, /dev, /root.
DEFAULT_ROOTS: tuple[str, ...] = ("/usr", "/opt", "/srv", "/var/lib", "/var/tmp", "/tmp", "/home")
_CAP_IPC_LOCK = 14
_GLOB_MAGIC = frozenset("*?[")
# Populate in batches of about this many bytes, re-reading memory pressure between them.
_BATCH_BYTES = 64 * MiB


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1], 16 if key.startswith("Cap") else 10)
    except OSError:
        pass
    return None


def memlock_budget() -> int | None:
    """Bytes this process may still mlock: RLIMIT_MEMLOCK minus VmLck; None when
    unlimited (CAP_IPC_LOCK or an infinite limit)."""
    caps = _proc_status("CapEff")
    if caps is not None and caps >> _CAP_IPC_LOCK & 1:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return None
    locked_kib = _proc_status("VmLck") or 0
    return max(0, soft - locked_kib * 1024)


def _memory_pressure() -> float | None:
    try:
        with open("/proc/pressure/memory") as psi:
            for line in psi:
                if line.startswith("some"):
                    return float(line.split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _counted_before(files: _native.PageCacheFiles) -> tuple[Any, list[str], list[bool]]:
    """The residency counted at open; every set here is opened with count_before=True."""
    before = files.counts_before()
    if before is None:
        raise RuntimeError("cache_space: a file set opened without count_before")
    return before


class _Candidate(NamedTuple):
    """A file of a request's set: its size (recorded by the profile, or stat'ed when a
    pattern named it), the mtime a profile recorded (-1: any) and where it came from."""
    path: str
    size: int
    mtime_ns: int
    from_profile: bool


def _inside(path: str, roots: Sequence[str]) -> bool:
    if "/" in roots:
        return path.startswith("/")
    return any(root == "/" or path == root or path.startswith(root + "/") for root in roots)


class CacheWarming:
    """The handle of one CACHE_SPACE allocation: the opened file set and its facts.
    The consumer's claim gets it (paths and describe(), never file contents)."""

    def __init__(self, files: _native.PageCacheFiles, details: dict[str, Any]) -> None:
        self.files = files
        self.details = details
        self.candidates: list[_Candidate] = []  # the request's whole file set, for adjust
        self.lock = threading.Lock()
        self.claimed = False
        self.released = False

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, ok in zip(self.files.paths, self.files.is_open) if ok)

    def residency(self) -> tuple[int, int]:
        """(bytes of the warmed ranges in the page cache now, through the kernel; bytes of
        ranges whose page-cache state the kernel does not reveal to this process — files
        it neither owns nor may write, without CAP_SYS_ADMIN)."""
        pages, _, restricted = self.files.counts()
        lengths = self.files.lengths
        resident = uncounted = 0
        for i, length in enumerate(lengths):
            if restricted[i]:
                uncounted += length
            else:
                resident += min(int(pages[i, 0]) * PAGE, length)
        return resident, uncounted

    def resident_bytes(self) -> int:
        """Bytes of the warmed ranges counted resident now (uncountable ones excluded)."""
        return self.residency()[0]

    def __repr__(self) -> str:
        return (f"<CacheWarming {len(self.paths)} files {self.details.get('bytes_requested', 0)} bytes"
                f"{' claimed' if self.claimed else ''}{' released' if self.released else ''}>")


class CacheSpaceStrategy(AllocationStrategy):
    """Warms, proves and optionally pins file data in the page cache (module docstring).

    roots: directories files may come from (realpath'd; the native open re-checks).
    files / profile: the file set when a request names none. populate: make residency
    certain before ALLOCATED (False: WILLNEED only, asynchronous). pin: mlock within
    RLIMIT_MEMLOCK. evict_on_unused: see the module docstring. pressure_limit: PSI
    memory ``some avg10`` (%) above which warming stops. max_files: cap on a set.
    warm_directories: also read the directories of the files (their entries, for the
    program's lookups and failed lookups there).
    """

    resource_type = ResourceType.CACHE_SPACE

    def __init__(self, *, roots: Iterable[str] = DEFAULT_ROOTS, files: Iterable[str] = (),
                 profile: str | None = None, profile_dir: str | os.PathLike[str] | None = None,
                 populate: bool = True, pin: bool = False, evict_on_unused: bool = False,
                 pressure_limit: float = 10.0, max_files: int = 100_000,
                 warm_directories: bool = True) -> None:
        if isinstance(roots, str):
            raise TypeError("roots must be an iterable of directories, not a string")
        root_list = []
        for root in roots:
            if not isinstance(root, str) or not os.path.isabs(root):
                raise ValueError(f"roots must be absolute directories, not {root!r}")
            root_list.append(os.path.realpath(root))
        if not root_list:
            raise ValueError("roots must name at least one directory")
        if isinstance(files, str):
            files = [files]
        if not isinstance(max_files, int) or max_files <= 0:
            raise ValueError(f"max_files must be an int > 0, not {max_files!r}")
        if isinstance(pressure_limit, bool) or not isinstance(pressure_limit, (int, float)) \
                or not 0 <= pressure_limit <= 100:
            raise ValueError(f"pressure_limit must be a percentage in [0, 100], not {pressure_limit!r}")
        self.roots = tuple(root_list)
        self.files = tuple(files)
        self.profile = profile
        self.profile_dir = profile_dir
        self.populate = populate
        self.pin = pin
        self.evict_on_unused = evict_on_unused
        self.pressure_limit = float(pressure_limit)
        self.max_files = max_files
        self.warm_directories = warm_directories

    # -- which files -------------------------------------------------------------------

    def _allowed(self, path: str) -> bool:
        """path lies inside the roots: lexically (the common case, no syscall), else
        after resolving its symlinks (a root may itself be reached through one)."""
        return _inside(path, self.roots) or _inside(os.path.realpath(path), self.roots)

    def _expand(self, pattern: str, skipped: dict[str, int], limit: int) -> list[_Candidate]:
        """The files a path, glob or directory names, at most `limit` + 1 of them (a
        glob or walk of a large tree stops there instead of listing it all), each with
        its size now."""
        if not isinstance(pattern, str) or not os.path.isabs(pattern) or "\0" in pattern:
            raise AllocationError(f"cache_space: files must be absolute paths or globs, not {pattern!r}")
        if _GLOB_MAGIC & set(pattern):
            found = sorted(itertools.islice(glob.iglob(pattern, recursive=True), limit + 1))
        else:
            found = [pattern]
        out: list[_Candidate] = []
        for path in found:
            if len(out) > limit:
                break
            real = os.path.realpath(path)
            if not _inside(real, self.roots):
                skipped["outside_roots"] += 1
                continue
            try:
                st = os.stat(real)
            except OSError:
                skipped["missing"] += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                for directory, subdirs, names in os.walk(real):
                    subdirs.sort()
                    for name in sorted(names):
                        full = os.path.join(directory, name)
                        try:
                            size = os.stat(full).st_size
                        except OSError:
                            skipped["missing"] += 1
                            continue
                        out.append(_Candidate(full, size, -1, False))
                    if len(out) > limit:
                        break
            else:
                out.append(_Candidate(path, st.st_size, -1, False))
        return out

    def _file_set(self, request: ResourceRequest) -> tuple[list[_Candidate], dict[str, Any]]:
        """The request's files in order. A profile's entries are taken as recorded (path,
        size, mtime): nothing is stat'ed here, the native open refuses what changed since
        (stale) — after drop_caches every stat is an inode read, so the one in the open is
        the only one paid."""
        props = request.metadata.custom_properties or {}
        skipped = {"missing": 0, "outside_roots": 0, "stale": 0, "not_regular": 0, "over_cap": 0}
        patterns = props.get("files")
        profile_name = props.get("profile")
        if patterns is None and profile_name is None:
            patterns, profile_name = list(self.files), self.profile
        if isinstance(patterns, str):
            patterns = [patterns]
        if patterns is not None and not isinstance(patterns, (list, tuple)):
            raise AllocationError(f"cache_space: custom_properties['files'] must be a path or a list of "
                                  f"paths, not {type(patterns).__name__}")
        if profile_name is not None and not isinstance(profile_name, str):
            raise AllocationError(f"cache_space: custom_properties['profile'] must be a name, "
                                  f"not {profile_name!r}")
        found: list[_Candidate] = []
        for pattern in patterns or ():
            found.extend(self._expand(pattern, skipped, self.max_files - len(found)))
            if len(found) > self.max_files:
                break
        if profile_name is not None:
            try:
                profile = load_profile(profile_name, self.profile_dir)
            except FileNotFoundError:
                raise AllocationError(f"cache_space: no profile {profile_name!r}") from None
            except ValueError as exc:
                raise AllocationError(f"cache_space: profile {profile_name!r}: {exc}") from None
            for entry in profile.files:
                if len(found) > self.max_files:
                    break
                if not self._allowed(entry.path):
                    skipped["outside_roots"] += 1
                    continue
                found.append(_Candidate(entry.path, entry.size, entry.mtime_ns, True))
        seen: set[str] = set()
        unique = [c for c in found if not (c.path in seen or seen.add(c.path))]  # type: ignore[func-returns-value]
        if len(unique) > self.max_files:
            skipped["over_cap"] += len(unique) - self.max_files
            unique = unique[:self.max_files]
        return unique, {"skipped": skipped, "profile": profile_name, "max_mib": props.get("max_mib")}

    @staticmethod
    def _cap_mib(amount: float, info: dict[str, Any]) -> float:
        max_mib = info.get("max_mib")
        if max_mib is not None:
            if isinstance(max_mib, bool) or not isinstance(max_mib, (int, float)) or not max_mib > 0:
                raise AllocationError(f"cache_space: max_mib must be a number > 0, not {max_mib!r}")
            amount = min(amount, float(max_mib))
        return amount

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        """The amount capped by max_mib and by the size of the request's files."""
        try:
            candidates, info = self._file_set(request)
            amount = self._cap_mib(amount, info)
        except AllocationError as exc:
            raise ValueError(str(exc)) from None
        total = 0
        for candidate in candidates:
            total += candidate.size
            if total >= amount * MiB:
                return amount
        return min(amount, total / MiB)

    # -- the lifecycle -----------------------------------------------------------------

    def _pressure(self, availability: ResourceAvailability | None) -> float | None:
        if availability is not None and availability.pressure is not None:
            return availability.pressure
        return _memory_pressure()

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        started = time.monotonic()
        pressure = self._pressure(availability)
        if pressure is not None and pressure > self.pressure_limit:
            raise InsufficientResources(f"cache_space: memory pressure {pressure:.1f}% > "
                                        f"{self.pressure_limit:g}%: warming yields")
        candidates, info = self._file_set(request)
        amount = self._cap_mib(amount, info)
        if not candidates:
            raise AllocationError(f"cache_space: no files to warm (skipped: {info['skipped']})")
        target = max(1, math.ceil(amount * MiB))
        # One native pass: open, check, count "before", and (unless the pages must be
        # marked first) issue each file's readahead at once.
        failed: dict[str, tuple[_Candidate, int]] = {}
        earlier: dict[str, tuple[Any, str, bool]] = {}
        while True:
            chosen, lengths = self._choose([c for c in candidates if c.path not in failed], target)
            files = self._open(chosen, lengths, willneed=not self.evict_on_unused, count_before=True,
                               list_dirs=self.warm_directories)
            errors = files.open_errors
            refused = {c.path: (c, e) for c, e in zip(chosen, errors) if e}
            short = sum(n for n, e in zip(files.lengths, errors) if not e) < target
            if not (refused and short):
                break
            # Files refused at open (stale, gone, out of the roots) leave the target
            # short: choose again without them (rare: a profile that aged).
            pages, methods, restricted = _counted_before(files)
            for i, c in enumerate(chosen):
                if not errors[i]:
                    earlier.setdefault(c.path, (pages[i].copy(), methods[i], restricted[i]))
            failed.update(refused)
            files.close()
        try:
            grant = self._warm(files, chosen, list(failed.values()), earlier, info, target, started)
        except BaseException:
            files.close()
            raise
        grant.handle.candidates = candidates
        return grant

    def _open(self, chosen: Sequence[_Candidate], lengths: Sequence[int], *, willneed: bool,
              count_before: bool = False, list_dirs: bool = False) -> _native.PageCacheFiles:
        return _native.PageCacheFiles([c.path for c in chosen], None, lengths, self.roots,
                                      expect_sizes=[c.size if c.from_profile else -1 for c in chosen],
                                      expect_mtimes_ns=[c.mtime_ns for c in chosen],
                                      willneed=willneed, count_before=count_before,
                                      list_dirs=list_dirs)

    @staticmethod
    def _choose(candidates: Sequence[_Candidate], target: int) -> tuple[list[_Candidate], list[int]]:
        """The files in order and the bytes of each up to target (the last one in part),
        by their known sizes (a profile's entry that changed since is refused at open,
        and its share of the target is not refilled)."""
        lengths, chosen = [], []
        left = target
        for candidate in candidates:
            if left <= 0:
                break
            chosen.append(candidate)
            lengths.append(min(candidate.size, left))
            left -= candidate.size
        return chosen, lengths

    def adjust(self, handle: Any, new_amount: float) -> float:
        """Grows (warming the next files or bytes of the request's set) or shrinks (the
        tail is no longer held or pinned; nothing is evicted) to new_amount MiB, capped by
        the set's size. Returns the MiB now resident. Nothing changes on failure."""
        with handle.lock:
            if handle.released:
                raise AllocationError("cache_space: the allocation is released")
            target = max(1, math.ceil(new_amount * MiB))
            chosen, lengths = self._choose(handle.candidates, target)
            files = self._open(chosen, lengths, willneed=True)
            try:
                if not any(files.is_open):
                    raise InsufficientResources("cache_space: none of the files can be opened now")
                files.warm(willneed=False, populate=self.populate)
                old = handle.files
                pinned = 0
                if self.pin:
                    old.unpin()  # first, so the new pin has the budget the old one held
                    budget = memlock_budget()
                    pinned = files.pin(budget if budget is not None else 2**63)
            except BaseException:
                files.close()
                raise
            handle.files = files
            old.close()
            after = handle.resident_bytes()
            handle.details.update(files=sum(files.is_open), paths=list(handle.paths), bytes_target=target,
                                  bytes_requested=sum(files.lengths), bytes_resident_after=after,
                                  bytes_pinned=pinned, bytes_populated_uncounted=0)
            return after / MiB

    def _warm(self, files: _native.PageCacheFiles, chosen: list[_Candidate],
              failed: list[tuple[_Candidate, int]], earlier: dict[str, tuple[Any, str, bool]],
              info: dict[str, Any], target: int, started: float) -> Grant:
        skipped = info["skipped"]
        for candidate, err in failed + list(zip(chosen, files.open_errors)):
            if err == errno.EACCES:  # the native check of the opened path against the roots
                skipped["outside_roots"] += 1
            elif err == errno.EINVAL:  # not a regular file
                skipped["not_regular"] += 1
            elif err == errno.ESTALE or (err == errno.ENOENT and candidate.from_profile):
                skipped["stale"] += 1  # a profile's entry changed or gone since the recording
            elif err:
                skipped["missing"] += 1
        if not any(files.is_open):
            raise AllocationError(f"cache_space: none of {len(chosen) + len(failed)} files could be opened "
                                  f"(skipped: {skipped})")
        handle = CacheWarming(files, {})
        lengths = files.lengths
        requested = sum(lengths)
        pages, methods, restricted = _counted_before(files)
        for i, c in enumerate(chosen):  # counted by an earlier pass, before its readahead
            if c.path in earlier:
                pages[i], methods[i], restricted[i] = earlier[c.path]
        before = sum(min(int(pages[i, 0]) * PAGE, n) for i, n in enumerate(lengths) if not restricted[i])
        uncounted = sum(n for n, r in zip(lengths, restricted) if r)
        if self.evict_on_unused:
            files.mark()  # before any readahead (the open issued none)
        paused = False
        if self.populate:
            # One native batch per ~64 MiB, so rising pressure stops the warming. Large
            # files are not advised: populate's faults read them ahead, in large folios.
            paused = self._populate_in_batches(files, lengths, willneed=self.evict_on_unused)
        else:
            files.warm(willneed=True, populate=False)  # asynchronous only: every file
        directories = int(files.dirs_listed)
        pinned, pin_error = 0, None
        if self.pin:
            budget = memlock_budget()
            pinned = files.pin(budget if budget is not None else 2**63)
            errors = {e for e in files.pin_errors if e}
            if pinned < requested:
                pin_error = (f"RLIMIT_MEMLOCK leaves {budget} bytes" if budget is not None and budget < requested
                             else os.strerror(min(errors)) if errors else None)
        after = handle.resident_bytes()
        # A file the kernel will not count for us is known resident only by a populate
        # that succeeded (MADV_POPULATE_READ returns once every page is in).
        populated_uncounted = 0
        if uncounted and self.populate and not paused:
            populated_uncounted = sum(
                n for n, r, err, method in zip(lengths, restricted, files.warm_errors, files.warm_methods)
                if r and not err and method in ("populate_read", "read"))
        after += populated_uncounted
        if after == 0 and requested > 0:
            raise InsufficientResources("cache_space: nothing became resident")
        handle.details = {
            "files": sum(files.is_open),
            "paths": list(handle.paths),
            "bytes_requested": requested,
            "bytes_target": target,
            "bytes_resident_before": before,
            "bytes_resident_after": after,
            "bytes_pinned": pinned,
            "pin_requested": self.pin,
            "pin_error": pin_error,
            "method": ("populate_read" if "populate_read" in files.warm_methods else "read")
                      if self.populate else "willneed",
            "count_method": "cachestat" if "cachestat" in methods else ("mincore" if "mincore" in methods
                                                                        else "none"),
            "count_restricted": any(restricted),
            "bytes_uncounted": uncounted,
            "bytes_populated_uncounted": populated_uncounted,
            "noatime": all(n for n, ok in zip(files.noatime, files.is_open) if ok),
            "paused_under_pressure": paused,
            "directories_listed": directories,
            "warm_seconds": time.monotonic() - started,
            "skipped": skipped,
            "profile": info.get("profile"),
            "not_covered": "failed path lookups in directories that hold none of the files",
        }
        log.debug("cache_space warmed %d of %d bytes (%d resident before) in %.3f s", after, requested,
                  before, handle.details["warm_seconds"])
        return Grant(after / MiB, handle)

    def _populate_in_batches(self, files: _native.PageCacheFiles, lengths: list[int], *,
                             willneed: bool = False) -> bool:
        """Populates the set in slices of about _BATCH_BYTES, re-reading memory pressure
        between them; True when pressure stopped it."""
        start, acc = 0, 0
        for i, n in enumerate(lengths):
            acc += n
            if acc < _BATCH_BYTES and i + 1 < len(lengths):
                continue
            if start > 0:
                pressure = _memory_pressure()
                if pressure is not None and pressure > self.pressure_limit:
                    return True
            files.warm(willneed=willneed, populate=True, start=start, stop=i + 1)
            start, acc = i + 1, 0
        return False

    def claim(self, handle: Any, target_process_id: int | None = None) -> Any:
        """The need has arrived: re-count, re-warm what fell out, record it."""
        with handle.lock:
            if handle.released:
                raise AllocationError("cache_space: the allocation is released")
            handle.claimed = True
            resident, uncounted = handle.residency()
            handle.details["bytes_resident_at_claim"] = resident
            pages, _, _ = handle.files.counts()
            handle.details["pages_evicted_before_claim"] = int(pages[:, 3].sum())
            expected = handle.details["bytes_resident_after"] - handle.details["bytes_populated_uncounted"]
            # Uncountable files are populated again (cheap where they stayed: page hits).
            if resident < expected or uncounted:
                handle.files.warm(willneed=True, populate=self.populate)
                handle.details["bytes_rewarmed"] = handle.resident_bytes() - resident
            else:
                handle.details["bytes_rewarmed"] = 0
        return handle

    def release(self, handle: Any) -> None:
        with handle.lock:
            if handle.released:
                return None
            handle.released = True
            evicted = 0
            try:
                handle.files.unpin()
                handle.details["bytes_resident_at_release"] = handle.resident_bytes()
                if self.evict_on_unused and not handle.claimed:
                    evicted = handle.files.evict(only_unmarked=True)
            finally:
                handle.files.close()
            handle.details["bytes_evicted_at_release"] = evicted
        return None

    def describe(self, handle: Any) -> dict[str, Any]:
        return dict(handle.details)
