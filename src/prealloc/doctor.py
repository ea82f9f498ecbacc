"""`prealloc doctor`: what this machine lets this process do, and why not where it does not.

Each check answers yes or no for *this* process (its uid, capabilities, limits, cgroup)
and, for every no, the reason: the limit, the missing capability, the kernel knob, the
missing module. Where a probe can be tried without changing anything it is tried, not
guessed from version numbers: memory is really mapped, populated and locked (one page,
released at once), cachestat(2) really called on a file, an RT policy really set — in a
forked child that exits at once. A cpuset is never written: its writability is
access(W_OK) on the file, with its owner and mode and whether the mount is read-only.

The probes are the code base's own (the memory strategy's THP reading, the core's
memlock figures, the PSI monitor, the cgroup monitor's controller lookup, NVML's and the
CUDA driver's reasons, the network strategy's capability and pyroute2 checks, the
journal's trust check), so doctor says what the strategies will find.

``--strict`` (exit status 1 when one fails) covers what the default configuration —
``ResourcePreallocator()`` with its MEMORY, CPU, CACHE_SPACE and DISK_IO strategies —
cannot work without; the checks marked ``required``:

- ``memory_reservation``: an anonymous mapping can be made and populated;
- ``cpu_affinity``: this process may set its own CPU mask (set to what it is already);
- ``journal_directory``: the journal directory is trusted, or can be created — the CPU
  and disk strategies journal pins of other processes and reserve files there, and
  refuse an untrusted one.

Everything else (mlock, huge pages, MADV_POPULATE_WRITE, cachestat, PSI, cgroups,
cpusets, isolated cpus, real-time scheduling, GPUs, traffic control, the machine-wide
core registry, the broker) makes a
strategy better or possible but the defaults run without it: a no there is reported and
the strategy degrades, saying so in ``details``.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

SCHEMA_VERSION = 1

CAP_NET_ADMIN = 12
CAP_IPC_LOCK = 14
CAP_SYS_NICE = 23
MiB = 1 << 20


@dataclass
class Check:
    """One answer: ``ok`` yes or no; ``detail`` what was found; ``reason`` why not (None
    when ok); ``required`` by ``--strict``; ``facts`` the raw values, for scripts."""

    name: str
    ok: bool
    detail: str
    reason: str | None = None
    required: bool = False
    facts: dict[str, Any] = field(default_factory=dict)


def _limit(value: int) -> str:
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{value} bytes ({value / MiB:g} MiB)" if value >= 1024 else f"{value} bytes"


def _has_cap(bit: int) -> bool:
    from .strategies.network import has_capability
    return has_capability(bit)


def _proc_self_status(key: str) -> str | None:
    from .core import _proc_self_status as read
    return read(key)


# ---------------------------------------------------------------------------------------
# memory


def check_memory() -> list[Check]:
    from . import core

    checks = []
    page = core.page_size()
    try:
        with core.reserve_memory(2 * page, populate=True) as region:
            method, populate_error, populated = region.populate_method, region.populate_error, region.populated
    except OSError as exc:
        reason = f"reserve_memory of {2 * page} bytes failed: {exc}"
        return [Check("memory_reservation", False, "an anonymous mapping cannot be made", reason, True),
                Check("madv_populate_write", False, "not tried", reason)]
    checks.append(Check("memory_reservation", populated, f"mapped and populated {2 * page} bytes ({method})",
                        None if populated else "the pages could not be faulted in", True,
                        {"populate_method": method}))
    if method == "madvise":
        checks.append(Check("madv_populate_write", True, "madvise(MADV_POPULATE_WRITE) faults pages in",
                            facts={"populate_method": method}))
    else:
        why = os.strerror(populate_error) if populate_error else "not used"
        checks.append(Check("madv_populate_write", False, f"pages are populated by {method}",
                            f"madvise(MADV_POPULATE_WRITE) answered {why} (it needs Linux 5.14+); "
                            "memory is faulted in one touch per page instead",
                            facts={"populate_method": method, "errno": populate_error}))

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap = _has_cap(CAP_IPC_LOCK)
    locked_kib = int(_proc_self_status("VmLck") or 0)
    facts = {"rlimit_memlock_soft": None if soft == resource.RLIM_INFINITY else soft,
             "rlimit_memlock_hard": None if hard == resource.RLIM_INFINITY else hard,
             "cap_ipc_lock": cap, "vmlck_bytes": locked_kib * 1024}
    limits = f"RLIMIT_MEMLOCK soft {_limit(soft)}, hard {_limit(hard)}; CAP_IPC_LOCK {'held' if cap else 'not held'}"
    try:
        with core.reserve_memory(page, lock=True) as region:
            locked, lock_error = region.locked, region.lock_error
    except OSError as exc:
        locked, lock_error = False, exc.errno or 0
    checks.append(Check("mlock", locked, f"{'locked' if locked else 'could not lock'} one page; {limits}",
                        None if locked else f"mlock of one page: {os.strerror(lock_error)}; {core.memlock_status()}",
                        facts=dict(facts, locked=locked, errno=lock_error)))
    unlimited = cap or soft == resource.RLIM_INFINITY
    checks.append(Check(
        "mlock_beyond_limit", unlimited,
        "any amount can be locked" if unlimited else f"at most {_limit(soft)} can be locked in all",
        None if unlimited else
        f"RLIMIT_MEMLOCK is {_limit(soft)} (hard {_limit(hard)}) and CAP_IPC_LOCK is not held: a lock beyond "
        "it is refused (raise it with ulimit -l, systemd LimitMEMLOCK=, or grant CAP_IPC_LOCK)",
        facts=facts))

    from .strategies.memory import thp_honours_madvise, thp_mode, thp_pmd_size
    mode, shmem = thp_mode(), thp_mode(shmem=True)
    honours = thp_honours_madvise()
    size = thp_pmd_size()
    thp_reason: str | None
    if honours:
        thp_reason = None
    elif mode is None:
        thp_reason = "the kernel has no transparent huge pages (/sys/kernel/mm/transparent_hugepage is missing)"
    elif mode == "never":
        thp_reason = "transparent huge pages are off (enabled = never)"
    else:
        thp_reason = f"the huge page size is {size} bytes, not the core's {core.HUGE_PAGE_SIZE}"
    checks.append(Check("transparent_huge_pages", honours,
                        f"enabled = {mode}, shmem_enabled = {shmem}, huge page {size} bytes", thp_reason,
                        facts={"enabled": mode, "shmem_enabled": shmem, "hpage_pmd_size": size}))
    return checks


# ---------------------------------------------------------------------------------------
# page cache and pressure


def _cachestat_errno(path: str) -> int:
    from . import _native

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _native.pagecache_cachestat(fd)
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def check_cachestat() -> Check:
    """cachestat(2) on a file of our own (the kernel answers for files we own or may
    write; another user's file needs CAP_SYS_ADMIN, like mincore's rule), then on a
    file of the installation when that is not ours."""
    import tempfile

    with tempfile.NamedTemporaryFile() as own:
        own.write(b"prealloc doctor")
        own.flush()
        error = _cachestat_errno(own.name)
    if error:
        why = ("the kernel lacks cachestat(2) (Linux 6.5+)" if error == errno.ENOSYS
               else f"cachestat(2) refused on a file of our own: {os.strerror(error)}")
        return Check("cachestat", False, "page cache residency is counted with mincore(2) instead",
                     why, facts={"errno": error, "others_files": None})
    others: bool | None = None
    if os.stat(__file__).st_uid != os.geteuid():
        others = _cachestat_errno(__file__) == 0
    return Check("cachestat", True, "cachestat(2) answers on files of our own" + (
        "" if others is None else "; on other users' files too" if others else
        "; other users' read-only files are refused (EPERM: counted with mincore)"),
        facts={"errno": 0, "others_files": others})


def check_pressure() -> list[Check]:
    from .monitors.pressure import RESOURCES, PressureTrigger, PressureTriggerUnavailable, read_pressure

    readings: dict[str, Any] = {}
    for name in RESOURCES:
        try:
            readings[name] = read_pressure(name)
        except ValueError:
            readings[name] = None
    missing = [name for name, r in readings.items() if r is None]
    detail = ", ".join(f"{name} some avg10 {r.some.avg10:g}%" for name, r in readings.items() if r is not None)
    checks = [Check("psi", not missing, detail or "no /proc/pressure files",
                    None if not missing else
                    f"/proc/pressure/{{{','.join(missing)}}} cannot be read: PSI is compiled out (CONFIG_PSI) "
                    "or disabled at boot (psi=0)", facts={"readable": sorted(set(readings) - set(missing))})]
    try:
        with PressureTrigger("memory", 100_000):
            pass
        checks.append(Check("psi_trigger", True, "a PSI trigger on /proc/pressure/memory can be made"))
    except PressureTriggerUnavailable as exc:
        checks.append(Check("psi_trigger", False, "monitors sample instead of waiting on a trigger", str(exc)))
    return checks


# ---------------------------------------------------------------------------------------
# cgroups and cpusets


def _cgroup_mounts() -> tuple[dict[str, str], str | None]:
    """({v1 controller: mount point}, the cgroup2 mount point or None)."""
    from .monitors.system import _unescape_mount

    v1: dict[str, str] = {}
    v2: str | None = None
    try:
        # the kernel's controllers; a v1 mount's other options (clone_children, xattr...) are not
        known = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()
                 if line and not line.startswith("#")}
    except OSError:
        known = set()
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return v1, v2
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, post = before.split(), after.split()
        if len(fields) < 5 or len(post) < 3:
            continue
        point = _unescape_mount(fields[4])
        if post[0] == "cgroup":
            for option in post[2].split(","):
                if option in known or option.startswith("name="):
                    v1.setdefault(option, point)
        elif post[0] == "cgroup2" and v2 is None:
            v2 = point
    return v1, v2


def _own_v2_cgroup(mount: str) -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = Path(mount) / line[3:].lstrip("/")
                return own if own.is_dir() else Path(mount)
    except OSError:
        pass
    return None


def check_cgroups() -> Check:
    v1, v2 = _cgroup_mounts()
    v2_controllers: list[str] = []
    own = _own_v2_cgroup(v2) if v2 else None
    if own is not None:
        try:
            v2_controllers = (own / "cgroup.controllers").read_text().split()
        except OSError:
            pass
    versions = ([1] if v1 else []) + ([2] if v2 else [])
    parts = []
    if v1:
        parts.append("v1: " + ", ".join(sorted(v1)))
    if v2:
        parts.append(f"v2 at {v2} (this cgroup's controllers: {' '.join(v2_controllers) or 'none'})")
    return Check("cgroups", bool(versions), "; ".join(parts) or "no cgroup file system mounted",
                 None if versions else "no cgroup or cgroup2 mount in /proc/self/mountinfo",
                 facts={"versions": versions, "v1_controllers": sorted(v1), "v2_mount": v2,
                        "v2_controllers": v2_controllers})


def _who_may_write(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    return (f"{path} owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
            + (", on a read-only mount" if read_only else "") + f"; we are uid {os.geteuid()}")


def check_cpuset() -> Check:
    """What the CPU strategy's ``cpuset`` level needs (prealloc.cpuset): the cgroup v1
    cpuset hierarchy, and the right to make cgroups in its root (it moves other tasks
    into ``prealloc-rest-*`` children there) — access(2), nothing written. This
    process's own cpuset and its ``cpuset.cpus`` are reported too."""
    from . import cpuset
    from .monitors.system import _controller_directories

    facts: dict[str, Any] = {"v1_root": None, "can_create_child": False, "cgroup": None, "cpus_writable": None}
    own = _controller_directories("cpuset", ("cpuset.cpus.effective",))
    if own is not None:
        version, directories = own
        cpus = directories[0] / "cpuset.cpus"
        facts.update(version=version, cgroup=str(directories[0]),
                     cpus_writable=cpus.exists() and os.access(cpus, os.W_OK))
    root = cpuset.v1_cpuset_root()
    if root is None:
        v2 = cpuset._v2_has_cpuset()
        return Check("cpuset_writable", False, "no cgroup v1 cpuset hierarchy",
                     "only a cgroup v2 cpuset exists here, and prealloc's cpuset level drives v1 (v2 partitions, "
                     "cpuset.cpus.partition=isolated, are not supported yet)" if v2 else
                     "no cpuset controller is mounted (neither cgroup v1 cpuset nor a v2 cpuset)", facts=facts)
    can_create = os.access(root, os.W_OK | os.X_OK)
    facts.update(v1_root=str(root), can_create_child=can_create)
    own_words = ("" if facts["cgroup"] is None else
                 f"; this process's cpuset {facts['cgroup']}: cpuset.cpus "
                 f"{'writable' if facts['cpus_writable'] else 'not writable'}")
    detail = (f"v1 cpuset at {root}: cgroups {'can' if can_create else 'cannot'} be made there{own_words} "
              "(checked with access(2); nothing written)")
    reason = None if can_create else (f"the cpuset level makes cgroups in {root}, which this process may not: "
                                      f"{_who_may_write(root)} (needs root or a delegated cpuset)")
    return Check("cpuset_writable", can_create, detail, reason, facts=facts)


def _cpu_list_file(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_isolated_cpus() -> Check:
    from .strategies.cpu import isolated_cpus

    isolated = _cpu_list_file("/sys/devices/system/cpu/isolated")
    nohz = _cpu_list_file("/sys/devices/system/cpu/nohz_full")
    ok = bool(isolated_cpus())  # what the CPU strategy's isolated level reads
    detail = f"isolated: {isolated or 'none'}; nohz_full: {nohz or 'none'}"
    if ok:
        reason = None
    elif isolated is None:
        reason = "/sys/devices/system/cpu/isolated cannot be read"
    else:
        reason = "the kernel booted without isolcpus= (the isolated level needs it; it is never set at run time)"
    return Check("isolated_cpus", ok, detail, reason, facts={"isolated": isolated or "", "nohz_full": nohz})


# ---------------------------------------------------------------------------------------
# scheduling


def _try_rt_in_child() -> int:
    """0 when a forked child could make itself SCHED_FIFO priority 1, else the errno. The
    child exits at once: nothing of ours changes."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def check_rt_scheduling() -> Check:
    from .strategies.cpu import rt_runtime_us

    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    cap = _has_cap(CAP_SYS_NICE)
    runtime_us = rt_runtime_us()  # the CPU strategy's priority level checks the same
    runtime = None if runtime_us is None else str(runtime_us)
    period = _cpu_list_file("/proc/sys/kernel/sched_rt_period_us")
    facts: dict[str, Any] = {"rlimit_rtprio_soft": soft, "rlimit_rtprio_hard": hard, "cap_sys_nice": cap,
                             "sched_rt_runtime_us": int(runtime) if runtime else None,
                             "sched_rt_period_us": int(period) if period else None}
    error = _try_rt_in_child()
    facts["probe_errno"] = error
    throttle = ("RT throttling off (sched_rt_runtime_us = -1)" if runtime == "-1"
                else f"RT tasks may use {runtime} of every {period} us")
    detail = f"RLIMIT_RTPRIO {soft} (hard {hard}), CAP_SYS_NICE {'held' if cap else 'not held'}, {throttle}"
    if error == 0:
        return Check("rt_scheduling", True, detail + "; SCHED_FIFO was set in a test child", facts=facts)
    if runtime == "0":
        reason = "sched_rt_runtime_us is 0: the kernel gives real-time tasks no time"
    elif not cap and soft == 0:
        reason = ("RLIMIT_RTPRIO is 0 and CAP_SYS_NICE is not held (raise it with ulimit -r or limits.conf "
                  "rtprio); the priority level falls back to a nice value")
    else:
        reason = (f"sched_setscheduler(SCHED_FIFO, 1) was refused: {os.strerror(error)} (with RT group "
                  "scheduling, this cgroup's cpu.rt_runtime_us may be 0)")
    return Check("rt_scheduling", False, detail, reason, facts=facts)


def check_cpu_affinity() -> Check:
    try:
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, mask)  # the mask it has: a no-change write
    except OSError as exc:
        return Check("cpu_affinity", False, "this process cannot set its CPU mask",
                     f"sched_setaffinity: {exc.strerror}", True)
    return Check("cpu_affinity", True, f"{len(mask)} usable cpus: {_cpus(mask)}", required=True,
                 facts={"cpus": sorted(mask)})


def _cpus(mask: set[int]) -> str:
    from .status import _cpu_list
    return _cpu_list(sorted(mask))


# ---------------------------------------------------------------------------------------
# GPUs, network


def check_gpu() -> list[Check]:
    from .monitors.nvml import nvml_unavailable_reason

    nvml_reason = nvml_unavailable_reason()
    checks = [Check("nvml", nvml_reason is None, "NVML reports at least one GPU" if nvml_reason is None
                    else "no GPU through NVML", nvml_reason)]
    from .strategies.gpu import GpuUnavailable, _Driver
    try:
        driver = _Driver.get()
        count = driver.device_count()
        checks.append(Check("cuda", count > 0, f"CUDA driver {driver.version}, {count} device(s)",
                            None if count > 0 else "the CUDA driver sees no device",
                            facts={"driver_version": driver.version, "devices": count}))
    except GpuUnavailable as exc:
        checks.append(Check("cuda", False, "no CUDA driver", exc.reason))
    except OSError as exc:
        checks.append(Check("cuda", False, "the CUDA driver failed", str(exc)))
    return checks


def check_network() -> list[Check]:
    from .strategies.network import network_unavailable_reason, pyroute2_missing_reason

    cap = _has_cap(CAP_NET_ADMIN)
    checks = [Check("cap_net_admin", cap, "CAP_NET_ADMIN " + ("held" if cap else "not held"),
                    None if cap else "traffic control (NETWORK_BANDWIDTH) needs CAP_NET_ADMIN, which this "
                                     "process lacks")]
    tools = {name: shutil.which(name) for name in ("tc", "ip")}
    pyroute2 = pyroute2_missing_reason()
    missing = [name for name, where in tools.items() if where is None]
    checks.append(Check("iproute2", not missing,
                        ", ".join(f"{n} {w or 'not found'}" for n, w in tools.items())
                        + f"; pyroute2 {'installed' if pyroute2 is None else 'not installed'}",
                        None if not missing else f"{' and '.join(missing)} not found on PATH (iproute2; the "
                                                 "strategy itself speaks netlink through pyroute2)",
                        facts={"tc": tools["tc"], "ip": tools["ip"], "pyroute2": pyroute2 is None}))
    why = network_unavailable_reason()
    checks.append(Check("network_bandwidth", why is None, "the NETWORK_BANDWIDTH strategy can run" if why is None
                        else "no NETWORK_BANDWIDTH strategy here", why))
    return checks


# ---------------------------------------------------------------------------------------
# the journal and the broker


def check_journal(directory: str | os.PathLike[str] | None = None) -> Check:
    from . import journal

    folder = Path(directory) if directory is not None else journal.default_directory()
    facts: dict[str, Any] = {"directory": str(folder), "exists": False, "owner_uid": None, "mode": None}
    try:
        exists = journal.check_directory(folder, create=False)
    except journal.UntrustedJournalDirectory as exc:
        st = os.lstat(folder)
        facts.update(exists=True, owner_uid=st.st_uid, mode=f"{stat.S_IMODE(st.st_mode):o}")
        return Check("journal_directory", False, f"{folder} exists but cannot be trusted", str(exc), True, facts)
    except OSError as exc:
        return Check("journal_directory", False, f"{folder} cannot be examined", str(exc), True, facts)
    if exists:
        st = os.lstat(folder)
        facts.update(exists=True, owner_uid=st.st_uid, mode=f"{stat.S_IMODE(st.st_mode):o}")
        return Check("journal_directory", True,
                     f"{folder}: ours (uid {st.st_uid}), mode {stat.S_IMODE(st.st_mode):o}, trusted",
                     required=True, facts=facts)
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    creatable = os.access(ancestor, os.W_OK | os.X_OK)
    return Check("journal_directory", creatable,
                 f"{folder} does not exist yet" + ("; it will be created 0700 on first use" if creatable else ""),
                 None if creatable else f"it cannot be created: {_who_may_write(ancestor)}", True, facts)


def check_core_registry(journal_dir: str | os.PathLike[str] | None = None) -> Check:
    """The machine-wide core registry's directory (prealloc.machine_registry), checked as
    the CPU strategy's ``registry`` level checks it before locking — but not created:
    private (the journal's rules) or shared ($PREALLOC_REGISTRY_DIR: root's or ours,
    sticky where world-writable). Without it the level is not effective and says why."""
    try:
        from . import machine_registry
    except ImportError:
        return Check("core_registry", False, "no machine-wide core registry",
                     "the machine-wide core registry is not available in this version")
    from . import journal

    directory = None
    if journal_dir is not None:
        directory = machine_registry.shared_directory() or machine_registry.registry_directory_for(journal_dir)
    registry = machine_registry.MachineCoreRegistry(directory)
    facts: dict[str, Any] = {"directory": str(registry.directory), "shared": registry.shared, "exists": False}
    try:
        if registry.shared:
            machine_registry._check_shared_directory(registry.directory)
            exists = True
        else:
            exists = journal.check_directory(registry.directory, create=False)
    except (OSError, journal.UntrustedJournalDirectory) as exc:
        return Check("core_registry", False, f"{registry.directory} cannot be used ({registry.describe()})",
                     f"{exc}; exclusive cores stay exclusive within this process only", facts=facts)
    facts["exists"] = exists
    held = len(registry.holders()) if exists else 0
    facts["held"] = held
    if exists:
        return Check("core_registry", True, f"exclusive among {registry.describe()}; {held} core(s) held now",
                     facts=facts)
    ancestor = registry.directory.parent
    creatable = os.access(ancestor, os.W_OK | os.X_OK)
    return Check("core_registry", creatable, f"{registry.directory} does not exist yet"
                 + ("; it will be created 0700 on first use" if creatable else ""),
                 None if creatable else f"it cannot be created: {_who_may_write(ancestor)}", facts=facts)


def check_broker(socket_path: str | None = None) -> Check:
    from .status import _ask_broker, default_socket_path

    path = socket_path if socket_path is not None else default_socket_path()
    answer, why_not = _ask_broker(path)
    if answer is not None:
        return Check("broker", True, f"a broker answers at {path} ({len(answer.get('reservations') or [])} "
                     "reservation(s) visible to us)", facts={"socket": path})
    return Check("broker", False, f"no broker at {path}; library mode (each process its own engine)",
                 why_not, facts={"socket": path})


# ---------------------------------------------------------------------------------------
# all of them


def _guarded(name: str, probe: Callable[[], Any]) -> list[Check]:
    """A probe's checks; one that raises is a no naming the error, never a crash."""
    try:
        result = probe()
    except Exception as exc:
        return [Check(name, False, "the probe failed", f"{type(exc).__name__}: {exc}")]
    return result if isinstance(result, list) else [result]


def run_checks(*, journal_dir: str | None = None, socket_path: str | None = None) -> list[Check]:
    """Every check, in a fixed order."""
    checks: list[Check] = []
    for name, probe in (
        ("memory", check_memory),
        ("cpu_affinity", check_cpu_affinity),
        ("cachestat", check_cachestat),
        ("psi", check_pressure),
        ("cgroups", check_cgroups),
        ("cpuset_writable", check_cpuset),
        ("isolated_cpus", check_isolated_cpus),
        ("rt_scheduling", check_rt_scheduling),
        ("gpu", check_gpu),
        ("network", check_network),
        ("journal_directory", lambda: check_journal(journal_dir)),
        ("core_registry", lambda: check_core_registry(journal_dir)),
        ("broker", lambda: check_broker(socket_path)),
    ):
        checks.extend(_guarded(name, probe))
    return checks


def as_dict(checks: list[Check]) -> dict[str, Any]:
    """The JSON form: ``{"schema", "uid", "strict_ok", "checks": [Check fields]}``."""
    return {"schema": SCHEMA_VERSION, "uid": os.geteuid(),
            "strict_ok": all(c.ok for c in checks if c.required),
            "checks": [asdict(c) for c in checks]}


def format_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"prealloc doctor (uid {os.geteuid()}): what this machine allows this process"]
    for c in checks:
        mark = "yes" if c.ok else "no "
        lines.append(f"  {c.name.ljust(width)}  {mark}  {c.detail}" + ("  [required]" if c.required else ""))
        if not c.ok and c.reason:
            lines.append(f"  {' ' * width}       why: {c.reason}")
    missing = [c.name for c in checks if c.required and not c.ok]
    lines.append("default configuration: " + ("everything it needs is here" if not missing
                                               else f"MISSING {', '.join(missing)}"))
    return "\n".join(lines) + "\n"


def run(*, as_json: bool = False, strict: bool = False, journal_dir: str | None = None,
        socket_path: str | None = None, out: TextIO | None = None) -> int:
    """Prints the checks; 0, or 1 with strict when a required one says no."""
    stream = out if out is not None else sys.stdout
    checks = run_checks(journal_dir=journal_dir, socket_path=socket_path)
    if as_json:
        json.dump(as_dict(checks), stream, indent=2, sort_keys=True)
        stream.write("\n")
    else:
        stream.write(format_text(checks))
    return 1 if strict and not all(c.ok for c in checks if c.required) else 0
