"""What the operating system says, read directly: /proc and /sys. Tests check the
library's claims against these, not against its own bookkeeping."""
from __future__ import annotations

import os
import re
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
