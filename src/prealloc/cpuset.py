"""Other tasks moved off reserved cores through the cgroup v1 cpuset controller.

An affinity mask pins *our* consumer; it does not keep anybody else off the core. The
``cpuset`` isolation level of the CPU strategy does, for the allocation's lifetime: every
task in scope (by default every task this process may move) is confined to the cpus
*other* than the reserved ones, and put back on release.

How, per cpuset cgroup that holds tasks to move:

- the root cpuset (whose ``cpuset.cpus`` the kernel does not let anyone write), or a
  cgroup that also holds a task we keep (our own process, the allocation's target), or
  one with child cgroups: a child ``prealloc-rest-<pid>-<start>-<n>`` is made under it
  with ``cpus`` = its cpus minus the reserved ones, and the tasks are moved into it (by
  tid, through ``tasks``); a task they fork later is born there, so it stays off too;
- any other cgroup (a leaf whose every task is one to move): its ``cpuset.cpus`` is
  shrunk by the reserved cores; one whose cpus would be empty gets a rest child too.

Kernel threads stay (they cannot be moved, and many are per-cpu), and so do interrupts
(IRQ affinity is the operator's; a cpuset does not cover it); tasks we keep stay, and so
do the tasks they start later (children of our process are born in its cgroup). The
result says how many of each stayed. A task that cannot be moved (EINVAL: a task that
forbids affinity changes; EPERM) stays and is counted.

Restoring (release, and :func:`undo_entry` from journal recovery after a crash) runs one
code path, ordered so that no task is ever left on a shrunk cpuset: each rest cgroup is
first widened back to its parent's cpus, then shrunk cgroups get their previous cpus
(when they still hold the ones we wrote; else someone changed them and they are left),
then every task in a rest cgroup (including ones born there) is moved back to the parent
and the rest cgroup removed; last, a moved task whose affinity the move reset (older
kernels forget a task's own mask on a cpuset move; 6.2+ keep it) gets its mask back. The
journal entry (kind ``cpuset``, see prealloc.journal) is written before anything changes
and updated before each further batch of moves, so a SIGKILL at any point leaves an entry
whose undo finds the machine in a state it can restore.

Two cpuset allocations at once (other cores): the second shrinks the first's rest
cgroup too (journaled like any shrink), so while both live the tasks are off both; if
the first is released first, its tasks go back to its parent cgroup, whose cpus include
the second's cores — they may run there until the second is released (or adjusted).
Stacking them properly needs one owner of the machine's cpusets (the broker).

Scope: ``"all"`` (default), ``"uid"`` (tasks of our effective uid) or an explicit set of
pids (their threads; tests and tools use it not to move the whole machine).

cgroup v2: ``cpuset.cpus.partition = isolated`` / ``cpuset.cpus.exclusive`` are not done
here — this machine's v2 hierarchy has no cpuset controller to test them on;
:class:`CpusetUnavailable` says so where only v2 exists.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .journal import RecoveredTarget, process_start_time

log = logging.getLogger(__name__)

KIND_CPUSET = "cpuset"
_REST_PREFIX = "prealloc-rest-"
_PF_KTHREAD = 0x00200000
_sequence = itertools.count(1)


class CpusetUnavailable(OSError):
    """The machine (or this process's rights) offers no cpuset to move tasks with."""


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def v1_cpuset_root() -> Path | None:
    """Where the cgroup v1 cpuset hierarchy is mounted, from /proc/self/mounts."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpuset" in fields[3].split(","):
            return Path(fields[1])
    return None


def _v2_has_cpuset() -> bool:
    """Whether a cgroup v2 hierarchy offers the cpuset controller (whose partitions
    prealloc does not use yet)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            try:
                return "cpuset" in (Path(fields[1]) / "cgroup.controllers").read_text().split()
            except OSError:
                return False
    return False


v2_has_cpuset = _v2_has_cpuset  # public: prealloc doctor asks it


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _cpus_file(cgroup: Path) -> Path:
    return cgroup / "cpuset.cpus" if (cgroup / "cpuset.cpus").exists() else cgroup / "cpus"


def _mems_file(cgroup: Path) -> Path:
    return cgroup / "cpuset.mems" if (cgroup / "cpuset.mems").exists() else cgroup / "mems"


def _tasks(cgroup: Path) -> list[int]:
    try:
        return [int(t) for t in _read(cgroup / "tasks").split()]
    except FileNotFoundError:
        return []


def _is_kernel_thread(tid: int) -> bool | None:
    try:
        text = Path(f"/proc/{tid}/stat").read_text()
    except OSError:
        return None  # gone
    return bool(int(text[text.rindex(")") + 2:].split()[6]) & _PF_KTHREAD)


def _task_uid(tid: int) -> int | None:
    try:
        return os.stat(f"/proc/{tid}").st_uid
    except OSError:
        return None


def _threads_of(pids: Iterable[int]) -> set[int]:
    tids: set[int] = set()
    for pid in pids:
        try:
            tids.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return tids


@dataclass
class CpusetIsolation:
    """The other tasks moved off `reserved` (see the module). release() puts them back;
    idempotent. The counts say what stayed on the cores and why (for details)."""

    reserved: frozenset[int]
    data: dict[str, Any]
    journal_entry: Any = None  # a prealloc.journal.Entry, or None without a journal
    moved: int = 0
    kernel_threads_left: int = 0
    kept: int = 0  # our own process's and the target's threads
    refused: int = 0  # tasks the kernel would not move (EINVAL/EPERM)
    out_of_scope: int = 0
    shrunk: list[str] = field(default_factory=list)
    released: bool = False

    def describe(self) -> dict[str, Any]:
        return {"moved_tasks": self.moved, "kernel_threads_left": self.kernel_threads_left,
                "kept_tasks": self.kept, "refused_tasks": self.refused, "out_of_scope_tasks": self.out_of_scope,
                "rest_cgroups": [r["path"] for r in self.data["rest"]], "shrunk_cgroups": list(self.shrunk),
                "irqs": "left in place (IRQ affinity is not a cpuset's)",
                "later_tasks": "tasks started later by kept tasks are not moved"}

    def readmit(self, pid: int) -> int:
        """Moves pid's threads that were moved off back to where they came from (a
        process that becomes the consumer at claim); returns how many."""
        tids = _threads_of([pid])
        back = 0
        for rest in self.data["rest"]:
            rest_dir = Path(rest["path"])
            for tid in set(_tasks(rest_dir)) & tids:
                try:
                    _write(Path(rest["parent"]) / "tasks", str(tid))
                    back += 1
                except ProcessLookupError:
                    continue
        self.kept += back
        self.moved -= back
        return back

    def release(self) -> RecoveredTarget | None:
        if self.released:
            return None
        result = undo_entry(self.data)
        self.released = True
        if self.journal_entry is not None:
            self.journal_entry.forget()
        return result


def _check_scope(scope: Any) -> str | frozenset[int]:
    if scope in ("all", "uid"):
        return str(scope)
    if isinstance(scope, (str, bytes)) or not hasattr(scope, "__iter__"):
        raise ValueError(f"cpuset scope must be 'all', 'uid' or a set of pids, not {scope!r}")
    pids = frozenset(scope)
    if not pids or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in pids):
        raise ValueError(f"cpuset scope must hold positive int pids, not {scope!r}")
    return pids


def isolate(reserved: Iterable[int], *, keep_pids: Iterable[int] = (), scope: Any = "all",
            journal: Any = None) -> CpusetIsolation:
    """Moves the tasks in scope off `reserved` (see the module). CpusetUnavailable when
    there is no v1 cpuset or we may not make cgroups in it; ValueError for a bad scope or
    reserved set. Everything done is undone before an error propagates."""
    reserved_set = frozenset(reserved)
    scope_value = _check_scope(scope)
    root = v1_cpuset_root()
    if root is None:
        if _v2_has_cpuset():
            raise CpusetUnavailable(errno.ENOTSUP, "only a cgroup v2 cpuset exists here; its partitions "
                                    "(cpuset.cpus.partition=isolated) are not supported by prealloc yet")
        raise CpusetUnavailable(errno.ENOENT, "no cpuset controller is mounted (cgroup v1 cpuset)")
    all_cpus = parse_cpus(_read(_cpus_file(root)))
    if not reserved_set or not reserved_set <= all_cpus:
        raise ValueError(f"reserved cores {sorted(reserved_set)} must be cpus of the root cpuset {sorted(all_cpus)}")
    if not os.access(root, os.W_OK):
        raise CpusetUnavailable(errno.EACCES, f"cannot make cgroups in {root} (not writable by uid "
                                f"{os.geteuid()}: needs root or a delegated cpuset)")
    keep = {os.getpid(), *keep_pids}
    scope_tids = None if isinstance(scope_value, str) else _threads_of(scope_value)
    owner = f"{os.getpid()}-{process_start_time(os.getpid())}"
    data: dict[str, Any] = {"root": str(root), "reserved": sorted(reserved_set), "rest": [], "shrunk": [],
                            "moved": {}}
    result = CpusetIsolation(reserved_set, data)
    entry = journal.record(KIND_CPUSET, **data) if journal is not None else None
    result.journal_entry = entry
    try:
        _sweep(root, result, keep, scope_value, scope_tids, owner, entry, first=True)
        for _pass in range(3):  # tasks forked meanwhile in the cgroups we left behind
            if not _sweep(root, result, keep, scope_value, scope_tids, owner, entry, first=False):
                break
    except BaseException:
        undo_entry(data)
        if entry is not None:
            entry.forget()
        raise
    return result


def _sweep(root: Path, result: CpusetIsolation, keep: set[int], scope: str | frozenset[int],
           scope_tids: set[int] | None, owner: str, entry: Any, *, first: bool) -> int:
    """One pass over the hierarchy: moves the tasks still on the reserved cores; returns
    how many it moved."""
    data = result.data
    reserved = result.reserved
    keep_tids = _threads_of(keep)
    rest_paths = {r["path"] for r in data["rest"]}
    shrunk_paths = {s["path"] for s in data["shrunk"]}
    plans: list[tuple[Path, list[int], bool]] = []  # cgroup, tids to move, shrink it
    counts = {"kernel": 0, "kept": 0, "scope": 0}
    for dirpath, dirnames, _files in os.walk(root):
        cgroup = Path(dirpath)
        if str(cgroup) in rest_paths:
            dirnames.clear()  # ours: already off the cores
            continue
        if str(cgroup) in shrunk_paths:
            continue
        try:
            cpus = parse_cpus(_read(_cpus_file(cgroup)))
        except (OSError, ValueError):
            continue
        if not cpus & reserved:
            continue
        movable: list[int] = []
        has_kept = has_others = False
        for tid in _tasks(cgroup):
            kthread = _is_kernel_thread(tid)
            if kthread is None:
                continue
            if kthread:
                counts["kernel"] += 1
            elif tid in keep_tids:
                counts["kept"] += 1
                has_kept = True
            elif (scope_tids is not None and tid not in scope_tids) or (scope == "uid" and _task_uid(tid) != os.geteuid()):
                counts["scope"] += 1
                has_others = True
            else:
                movable.append(tid)
        if not movable:
            continue
        if not cpus - reserved:  # nowhere else to put them in this cgroup
            result.refused += len(movable) if first else 0
            continue
        leaf = all(str(cgroup / d) in rest_paths for d in dirnames)  # a parent's cpus cover its children's
        # shrinking moves every task of the cgroup: only when all of them are to move
        shrink = cgroup != root and not has_kept and not has_others and leaf and bool(cpus - reserved)
        plans.append((cgroup, movable, shrink))
    if first:
        result.kernel_threads_left, result.kept, result.out_of_scope = counts["kernel"], counts["kept"], counts["scope"]
    if not plans:
        return 0
    # journal the whole batch before touching anything
    for cgroup, tids, shrink in plans:
        if shrink:
            previous = _read(_cpus_file(cgroup))
            data["shrunk"].append({"path": str(cgroup), "previous": previous,
                                   "applied": format_cpus(parse_cpus(previous) - reserved)})
        else:
            rest = next((r for r in data["rest"] if r["parent"] == str(cgroup)), None)
            if rest is None:
                data["rest"].append({"parent": str(cgroup),
                                     "path": str(cgroup / f"{_REST_PREFIX}{owner}-{next(_sequence)}")})
        for tid in tids:
            try:
                affinity = sorted(os.sched_getaffinity(tid))
            except OSError:
                continue
            data["moved"][str(tid)] = {"start": process_start_time(tid), "affinity": affinity}
    if entry is not None:
        entry.update(**data)
    moved = 0
    for cgroup, tids, shrink in plans:
        if shrink:
            record = next(s for s in data["shrunk"] if s["path"] == str(cgroup))
            _write(_cpus_file(cgroup), record["applied"])
            result.shrunk.append(str(cgroup))
            moved += len(tids)
            continue
        rest = next(r for r in data["rest"] if r["parent"] == str(cgroup))
        rest_dir = Path(rest["path"])
        if not rest_dir.exists():
            rest_dir.mkdir()
            _write(_mems_file(rest_dir), _read(_mems_file(cgroup)))
            _write(_cpus_file(rest_dir), format_cpus(parse_cpus(_read(_cpus_file(cgroup))) - reserved))
        fd = os.open(rest_dir / "tasks", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for tid in tids:
                try:
                    os.write(fd, str(tid).encode())
                    moved += 1
                except ProcessLookupError:
                    continue  # exited meanwhile
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        continue
                    if exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES):
                        result.refused += 1
                        data["moved"].pop(str(tid), None)
                        continue
                    raise
        finally:
            os.close(fd)
    result.moved += moved
    return moved


def undo_entry(data: dict[str, Any]) -> RecoveredTarget:
    """Puts back what a cpuset entry moved (see the module for the order); the journal's
    undo for kind ``cpuset`` and the release path alike. Tolerates a half-made change
    (an entry written just before a crash names cgroups that may not exist yet)."""
    done = RecoveredTarget(None, kind=KIND_CPUSET)
    first_error: OSError | None = None
    rests = [r for r in data.get("rest", []) if Path(r["path"]).is_dir()]
    for rest in rests:  # 1. nobody stays on a shrunk rest, whatever happens below
        try:
            _write(_cpus_file(Path(rest["path"])), _read(_cpus_file(Path(rest["parent"]))))
        except OSError as exc:
            first_error = first_error or exc
    for shrunk in sorted(data.get("shrunk", []), key=lambda s: len(Path(s["path"]).parts)):  # 2. parents first
        path = Path(shrunk["path"])
        try:
            current = _read(_cpus_file(path))
        except FileNotFoundError:
            continue  # the cgroup was removed
        if parse_cpus(current) == parse_cpus(shrunk["applied"]):
            try:
                _write(_cpus_file(path), shrunk["previous"])
                done.restored_threads.extend(_tasks(path))
            except OSError as exc:
                first_error = first_error or exc
        else:
            done.left_alone.append(len(done.left_alone))  # someone set other cpus since
    for rest in rests:  # 3. everyone back to the parent, then the rest cgroup goes
        rest_dir, parent = Path(rest["path"]), Path(rest["parent"])
        for _attempt in range(20):
            tids = _tasks(rest_dir)
            if not tids:
                break
            fd = os.open(parent / "tasks", os.O_WRONLY | os.O_CLOEXEC)
            try:
                for tid in tids:
                    try:
                        os.write(fd, str(tid).encode())
                        done.restored_threads.append(tid)
                    except OSError as exc:
                        if exc.errno != errno.ESRCH:
                            first_error = first_error or exc
            finally:
                os.close(fd)
        try:
            rest_dir.rmdir()
            done.removed = str(rest_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:  # EBUSY: a task is still in it (at its parent's cpus, so on every core)
            first_error = first_error or exc
    for tid_text, moved in data.get("moved", {}).items():  # 4. masks a move reset
        tid = int(tid_text)
        if moved.get("start") is None or process_start_time(tid) != moved["start"]:
            continue
        previous = set(moved.get("affinity") or ())
        try:
            mask_now = os.sched_getaffinity(tid)
            if previous and mask_now != previous:
                allowed = _cgroup_cpus_of(tid)
                if allowed is not None and mask_now == allowed and previous <= allowed:
                    os.sched_setaffinity(tid, previous)
        except OSError:
            continue
    done.target_gone = not rests and not data.get("shrunk")
    if first_error is not None:
        raise first_error  # journal.recover keeps the entry for a retry
    return done


def _cgroup_cpus_of(tid: int) -> set[int] | None:
    root = v1_cpuset_root()
    if root is None:
        return None
    try:
        for line in Path(f"/proc/{tid}/cgroup").read_text().splitlines():
            _id, controllers, path = line.split(":", 2)
            if "cpuset" in controllers.split(","):
                return parse_cpus(_read(_cpus_file(root / path.lstrip("/"))))
    except (OSError, ValueError):
        return None
    return None


def leftover_rest_cgroups() -> list[Path]:
    """Rest cgroups that exist now (for diagnostics and tests: after every release and
    recovery there should be none of ours)."""
    root = v1_cpuset_root()
    if root is None:
        return []
    return [Path(d) for d, _subdirs, _f in os.walk(root) if Path(d).name.startswith(_REST_PREFIX)]
