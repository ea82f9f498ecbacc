"""What the operating system says, read directly: /proc and /sys. Tests check the
library's claims against these, not against its own bookkeeping."""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path


def proc_status_kib(field: str, pid: int | str = "self") -> int:
    """A 'kB' field of /proc/<pid>/status (VmRSS, VmLck, ...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def vm_rss() -> int:
    return proc_status_kib("VmRSS") * 1024


def vm_lck() -> int:
    return proc_status_kib("VmLck") * 1024


def parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return cpus


def cpus_allowed(pid: int, tid: int | None = None) -> set[int]:
    """Cpus_allowed_list of a process's main thread, or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise KeyError("Cpus_allowed_list")


def thread_ids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def anon_huge_pages_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that contains address."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            current = lo <= address < hi
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def thp_mode() -> str:
    """'always', 'madvise' or 'never' (the bracketed word of the sysfs file)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "never"


CAP_IPC_LOCK = 14


def drop_capability(cap: int) -> None:
    """Removes one capability from this process's effective, permitted and inheritable
    sets (capget/capset, v3 structs), so a root test process can see what an unprivileged
    one sees — the kernel then applies RLIMIT_MEMLOCK to it."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    # glibc's capget/capset wrappers: no per-architecture syscall numbers here
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    word, bit = divmod(cap, 32)
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[word], field, getattr(data[word], field) & ~(1 << bit))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def has_capability(cap: int) -> bool:
    """Whether this process holds cap in its effective set (CapEff of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def lockable_bytes() -> int | None:
    """How much more memory this process may mlock: None when nothing limits it
    (CAP_IPC_LOCK, or RLIMIT_MEMLOCK unlimited), else the soft RLIMIT_MEMLOCK less what
    is locked already (VmLck). An ordinary user has 8 MiB (the kernel's default) or
    whatever the distribution's limits.conf gives."""
    if has_capability(CAP_IPC_LOCK):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - vm_lck())


def lock_size(wanted: int, *, unit: int = 1 << 20, at_least: int = 1 << 20) -> int:
    """wanted, or the largest multiple of unit that RLIMIT_MEMLOCK still lets this
    process lock when that is less; skips the calling test (with the limit in the
    reason) when that is below at_least."""
    budget = lockable_bytes()
    if budget is None or budget >= wanted:
        return wanted
    size = budget // unit * unit
    if size < at_least:
        import pytest

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        pytest.skip(f"RLIMIT_MEMLOCK {soft} bytes (no CAP_IPC_LOCK) leaves {budget} bytes to lock, "
                    f"less than the {at_least} this test needs")
    return size


# A host that pins another process (argv[2]) with the CPU strategy, journaled in the
# directory argv[1], prints the cores, then waits to be killed: what a crashed host leaves
PINNING_HOST = textwrap.dedent("""
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


def build_c_host(source: str, directory: Path, *, header: str, optimize: str = "-O2") -> Path:
    """source compiled and linked against the installed core (prealloc.get_include() /
    get_library_dir(), libprealloc_core.a) as a C host would, into directory/host; skips
    where the machine has no C compiler."""
    import pytest

    import prealloc

    include, libdir = Path(prealloc.get_include()), Path(prealloc.get_library_dir())
    assert (include / "prealloc" / header).is_file(), include
    assert (libdir / "libprealloc_core.a").is_file(), libdir
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    (directory / "host.c").write_text(source)
    exe = directory / "host"
    subprocess.run([cc, "-std=c11", optimize, "-Wall", "-Werror", "-o", str(exe), str(directory / "host.c"),
                    f"-I{include}", f"-L{libdir}", "-lprealloc_core", "-lpthread", "-lm"], check=True)
    return exe


def threads_state(pid: int) -> str:
    """Each thread of pid: its state, kernel wait channel and signal masks (for a failure
    message: where a process that does not end is stuck)."""
    lines = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except FileNotFoundError:
        return f"{pid}: gone"
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        lines.append(f"{tid} {fields.get('State')} wchan={wchan} SigBlk={fields.get('SigBlk')} "
                     f"SigIgn={fields.get('SigIgn')} SigCgt={fields.get('SigCgt')} SigPnd={fields.get('SigPnd')} "
                     f"ShdPnd={fields.get('ShdPnd')}")
    return "\n".join(lines)


def signal_and_wait(proc, signum: int, timeout: float = 120.0) -> tuple[str, str]:
    """Sends signum to a Popen (started with -X faulthandler, pipes for both outputs) and
    returns its (stdout, stderr) once it ends; a process still running after timeout (a
    hang guard, not a timing check) is described, made to print its Python stacks
    (SIGABRT) and killed, and the failure says all of it."""
    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = threads_state(proc.pid)
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"pid {proc.pid} did not end within {timeout} s of signal {signum}:\n{state}\n"
                             f"stderr:\n{err}") from None


# `python -m prealloc` as a terminal's foreground job runs it: with Ctrl-C's SIGINT raising
# KeyboardInterrupt. A test run started in the background of a non-interactive shell (or
# under nohup) has SIGINT ignored, and a child inherits that across exec (Python then keeps
# it ignored, as it should): a Ctrl-C test would wait forever. (-X faulthandler: see
# signal_and_wait.)
FOREGROUND_PREALLOC = [
    sys.executable, "-X", "faulthandler", "-c",
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['prealloc', *sys.argv[1:]]; runpy.run_module('prealloc', run_name='__main__', alter_sys=True)",
]
