"""NETWORK_BANDWIDTH: a guaranteed egress rate for a predicted burst, made with Linux
traffic control (HTB) through netlink (pyroute2, ``pip install "prealloc[net]"``; no
``tc`` is run).

The tree, on the egress interface (given, or the one routing to a destination), made at
the first allocation and removed at the last::

    7061:    htb qdisc, root, default 7061:ffff
    7061:1   root class   rate = ceil = link rate (the shaper: the queue forms here, where
                          HTB can order it, not in the NIC)
    7061:ffff  default    everything unclassified; rate = link - reserved, ceil = link
    7061:10 .. 7061:7fff  one class per allocation: rate = the reserved Mbit/s, ceil = link

so a reserved class gets its rate whatever bulk traffic does, and any class borrows what
others leave idle up to the link. The reserved total never exceeds the link rate less
the monitor's headroom (InsufficientResources otherwise), counted from the kernel's own
classes, so allocators sharing the root — two strategies of one process, or two
processes — never promise the same bandwidth twice.

What reaches an allocation's class (``describe()["matched"]`` says which apply):

- the socket mark handed over at claim (``NetworkClaim.mark``): a socket the consumer
  marks with ``SO_MARK`` (``NetworkClaim.mark_socket(sock)``, or the sockets given in
  ``custom_properties["sockets"]``, marked at claim). Setting SO_MARK needs CAP_NET_ADMIN
  (or CAP_NET_RAW since Linux 5.17). Matched by an ``fw`` filter where the kernel has
  cls_fw; where it has not (CONFIG_NET_CLS_FW unset, as on this project's CI kernel) by
  a four-instruction eBPF classifier (cls_bpf) that compares ``skb->mark``.
- a uid (``custom_properties["uid"]``, or ``"match": "uid"`` with the claim's target
  process): eBPF ``bpf_get_socket_uid``, the uid of the socket that sent the packet —
  for locally generated traffic only (a forwarded packet has no socket: it gets the
  overflow uid and is not matched).
- a cgroup (``custom_properties["cgroup"]``: a cgroup v2 directory, or ``"match":
  "cgroup"`` with the claim's target process): eBPF ``bpf_skb_cgroup_id``, the v2
  cgroup of the socket's creator *when the socket was created* (moving a process later
  does not move its open sockets). Needs the cgroup v2 hierarchy (unified or hybrid);
  v1 ``net_cls`` classids are not used (cls_cgroup is absent on many kernels, and a v1
  hierarchy is read-only here). Both eBPF matches need CAP_BPF or CAP_SYS_ADMIN.

Not matched: traffic of other sockets, forwarded traffic (except by mark, set e.g. by
nftables), and ingress. This is egress only: the kernel shapes what it sends; shaping
what arrives needs an IFB device with the ingress traffic redirected to it (a mirred
action) and the same tree on the IFB — not built. Nor is ``fq``/EDT pacing
(per-socket ``SO_MAX_PACING_RATE`` under an mq + fq root), the better backend for
multi-queue NICs (HTB takes one root lock for all queues), absent from this kernel.

Side effects outlive the process, so each is journaled first (prealloc.journal, kind
``tc_htb``: one entry per process and interface, listing its classes and filters,
updated before every class is added); ``prealloc recover`` — and every new
NetworkBandwidthStrategy — removes what a dead host left, and the root too once no
allocation class is left under it. The root is only installed over the kernel's default
root qdisc (handle 0:, noqueue / pfifo_fast / mq / fq_codel), which deleting ours brings
back exactly; a root qdisc someone configured is never replaced (AllocationError).

Without pyroute2, without CAP_NET_ADMIN, or without a known link rate the strategy is
unavailable: it is still made (a host starts), and allocate fails with the reason
(``unavailable_reason``).
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import logging
import os
import platform
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from ..journal import Entry, Journal, RecoveredTarget, recover
from ..monitors.network import (
    BYTES_PER_MBIT,
    DEFAULT_MINOR,
    PREALLOC_TC_MAJOR,
    ROOT_MINOR,
    NetworkClass,
    NetworkMonitor,
    NetworkUnavailable,
    check_headroom_fraction,
    check_rate_mbit,
    open_netlink,
    pyroute2_missing_reason,
    read_classes,
    reserved_mbit,
)
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, Grant, InsufficientResources

log = logging.getLogger(__name__)

__all__ = ["KIND_TC_HTB", "NetworkBandwidthStrategy", "NetworkClaim", "NetworkGrant", "bpf_classifier",
           "default_class_rate_mbit", "make_network_strategy", "network_unavailable_reason", "undo_tc_entry"]

KIND_TC_HTB = "tc_htb"
ROOT_HANDLE = PREALLOC_TC_MAJOR << 16
FIRST_MINOR, LAST_MINOR = 0x10, 0x7FFF
MATCH_PRIO_OFFSET = 0x8000  # a class's uid/cgroup filter sits at prio minor + this; its mark filter at minor
DEFAULT_MARK_BASE = 0x70610000
MTU_BYTES = 1600
ETH_P_ALL = 0x0003
SO_MARK = getattr(socket, "SO_MARK", 36)
CAP_NET_ADMIN = 12
MATCHES = ("mark", "uid", "cgroup")


# -- pure arithmetic (no kernel) -----------------------------------------------------------

def rate_bytes(mbit: float) -> int:
    """Mbit/s -> the kernel's bytes/s (what HTB stores), at least 1."""
    return max(1, round(mbit * BYTES_PER_MBIT))


def burst_bytes(mbit: float) -> int:
    """tc's default HTB burst: one timer tick (1 ms at HZ 1000) of the rate plus an MTU."""
    return rate_bytes(mbit) // 1000 + MTU_BYTES


def htb_class(rate_mbit: float, ceil_mbit: float) -> dict[str, Any]:
    """pyroute2's arguments for an HTB class: rate and ceil in bit/s, tc's default
    bursts, and a quantum (bytes a class sends per turn when classes borrow) of a tenth
    of a second's worth of its rate as the kernel would compute — but capped at 200 kB,
    where the kernel would warn and cap it itself."""
    return {"rate": f"{rate_bytes(rate_mbit) * 8}bit", "ceil": f"{rate_bytes(ceil_mbit) * 8}bit",
            "burst": burst_bytes(rate_mbit), "cburst": burst_bytes(ceil_mbit),
            "quantum": min(200_000, max(MTU_BYTES, rate_bytes(rate_mbit) // 10))}


def default_class_rate_mbit(link_mbit: float, reserved: float) -> float:
    """The default class's guarantee: what the reservations leave (at least 0.1 Mbit/s,
    HTB needs a rate)."""
    return max(0.1, link_mbit - reserved)


def check_fits(link_mbit: float, headroom_fraction: float, reserved: float, amount: float) -> None:
    """InsufficientResources unless `amount` more fits under link x (1 - headroom)."""
    usable = link_mbit * (1.0 - headroom_fraction)
    if reserved + amount > usable + 1e-9:
        raise InsufficientResources(
            f"{amount:g} Mbit/s does not fit: {reserved:g} of {usable:g} Mbit/s usable (link {link_mbit:g} Mbit/s "
            f"less {headroom_fraction:.0%} headroom) already reserved")


def has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def network_unavailable_reason() -> str | None:
    """Why no NETWORK_BANDWIDTH strategy can work in this process; None when it can."""
    missing = pyroute2_missing_reason()
    if missing:
        return missing
    if not has_capability(CAP_NET_ADMIN):
        return "changing traffic control needs CAP_NET_ADMIN, which this process lacks"
    return None


def make_network_strategy(**options: Any) -> NetworkBandwidthStrategy:
    """A strategy for the interface `options` name (default: the default route's), made
    only where it can work: NetworkUnavailable (with ``.reason``) without pyroute2 or
    CAP_NET_ADMIN, without a route, or where the link rate is unknown (a virtual link
    given no link_rate_mbit). For an allocator's defaults."""
    reason = network_unavailable_reason()
    if reason:
        raise NetworkUnavailable(reason)
    strategy = NetworkBandwidthStrategy(**options)
    try:
        strategy.monitor().link_rate()
    except (AllocationError, NetworkUnavailable, ValueError) as exc:
        strategy.close()
        raise NetworkUnavailable(str(exc)) from exc
    return strategy


# -- eBPF classifiers (cls_bpf, classic mode: 0 = no match, -1 = the filter's classid) ----

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351, "armv7l": 386}
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_HELPER_GET_SOCKET_UID = 47
_HELPER_SKB_CGROUP_ID = 79
_SKB_MARK_OFFSET = 8  # struct __sk_buff { __u32 len, pkt_type, mark; ... }


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
    if imm >= 1 << 31:
        imm -= 1 << 32  # the field is a signed 32-bit immediate
    return struct.pack("=BBhi", code, regs, off, imm)


_RETURN_MATCH_OR_NOT = (_insn(0xB7, 0, imm=-1) + _insn(0x95)  # r0 = -1 (the filter's classid); exit
                        + _insn(0xB7, 0, imm=0) + _insn(0x95))  # r0 = 0 (no match); exit


def bpf_classifier(match: str, value: int) -> bytes:
    """The eBPF program (instructions, native byte order) that matches packets whose
    mark, socket uid or socket cgroup v2 id is `value`."""
    if match == "mark":
        if not 0 <= value < 1 << 32:
            raise ValueError(f"mark must be a 32-bit unsigned int, not {value!r}")
        return (_insn(0x61, 0, 1, _SKB_MARK_OFFSET)  # r0 = *(u32 *)(r1 + offsetof(mark))
                + _insn(0x56, 0, off=2, imm=value)  # if w0 != value goto +2 (32-bit compare)
                + _RETURN_MATCH_OR_NOT)
    if match == "uid":
        if not 0 <= value < 1 << 32:
            raise ValueError(f"uid must be a 32-bit unsigned int, not {value!r}")
        return (_insn(0x85, imm=_HELPER_GET_SOCKET_UID)  # r0 = bpf_get_socket_uid(skb)
                + _insn(0x56, 0, off=2, imm=value)
                + _RETURN_MATCH_OR_NOT)
    if match == "cgroup":
        if not 0 < value < 1 << 64:
            raise ValueError(f"cgroup id must be a 64-bit unsigned int > 0, not {value!r}")
        return (_insn(0x85, imm=_HELPER_SKB_CGROUP_ID)  # r0 = bpf_skb_cgroup_id(skb)
                + _insn(0x18, 2, imm=value & 0xFFFFFFFF) + _insn(0, imm=value >> 32)  # r2 = value (imm64)
                + _insn(0x5D, 0, 2, off=2)  # if r0 != r2 goto +2
                + _RETURN_MATCH_OR_NOT)
    raise ValueError(f"match must be one of {list(MATCHES)}, not {match!r}")


def load_bpf_classifier(program: bytes, name: str) -> int:
    """Loads a SCHED_CLS program; returns its fd. OSError with the verifier's log."""
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise NetworkUnavailable(f"no bpf() syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(program, len(program))
    license_text = ctypes.create_string_buffer(b"GPL")
    log_buffer = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQIIQII16s", attr, 0, _BPF_PROG_TYPE_SCHED_CLS, len(program) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_text), 1, len(log_buffer),
                     ctypes.addressof(log_buffer), 0, 0, name.encode()[:15])
    fd = libc.syscall(number, _BPF_PROG_LOAD, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_PROG_LOAD) of the {name} classifier: {os.strerror(err)}; "
                           f"{log_buffer.value.decode(errors='replace').strip() or 'no verifier log'}")
    return int(fd)


def cgroup_v2_id(path: str) -> int:
    """A cgroup v2 directory's id (its inode number, what bpf_skb_cgroup_id returns)."""
    return os.stat(path).st_ino


def cgroup_v2_dir_of(pid: int) -> str:
    """The cgroup v2 directory of a process. ValueError where it has none mounted."""
    try:
        lines = open(f"/proc/{pid}/cgroup").read().splitlines()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if relative is not None and os.path.exists(f"{mount}/cgroup.controllers" if mount == "/sys/fs/cgroup"
                                                   else f"{mount}/cgroup.procs"):
            return os.path.normpath(mount + relative)
    raise ValueError(f"process {pid} has no cgroup v2 directory here (no v2 hierarchy mounted)")


def uid_of(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Uid:"):
                return int(line.split()[2])  # the effective uid
    except FileNotFoundError:
        pass
    raise ProcessLookupError(f"no process {pid}")


def netns_inode(netns: str | None) -> int:
    return os.stat(f"/run/netns/{netns}" if netns else "/proc/thread-self/ns/net").st_ino


# -- kernel operations on one root (all under its lock) -----------------------------------

def _netlink_errno(exc: BaseException) -> int | None:
    return getattr(exc, "code", None)


def _delete_filter(ipr: Any, ifindex: int, prio: int) -> None:
    try:
        ipr.tc("del-filter", index=ifindex, parent=ROOT_HANDLE, prio=prio, protocol=ETH_P_ALL)
    except Exception as exc:
        if _netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
            raise


def _delete_class(ipr: Any, ifindex: int, classid: int) -> None:
    try:
        ipr.tc("del-class", index=ifindex, handle=classid, parent=ROOT_HANDLE | ROOT_MINOR)
    except Exception as exc:
        if _netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
            raise


def _root_qdisc(ipr: Any, ifindex: int) -> tuple[str, int] | None:
    for q in ipr.get_qdiscs(ifindex):
        if q["parent"] == 0xFFFFFFFF:
            return q.get_attr("TCA_KIND"), q["handle"]
    return None


def _set_default_rate(ipr: Any, ifindex: int, link_mbit: float, reserved: float | None = None) -> None:
    """The default class gets what the reservations leave (`reserved`: their total,
    read from the kernel when not given)."""
    if reserved is None:
        reserved = reserved_mbit(read_classes(ipr, ifindex))
    rate = default_class_rate_mbit(link_mbit, reserved)
    ipr.tc("change-class", "htb", ifindex, ROOT_HANDLE | DEFAULT_MINOR, parent=ROOT_HANDLE | ROOT_MINOR,
           **htb_class(rate, link_mbit))


def _delete_root_if_unused(ipr: Any, ifindex: int) -> bool:
    """Deletes our root when no allocation class (of any owner) is left under it; the
    kernel then attaches the interface's default qdisc again. True when deleted."""
    root = _root_qdisc(ipr, ifindex)
    if root is None or root[0] != "htb" or root[1] != ROOT_HANDLE:
        return False
    if any((c.classid & 0xFFFF) not in (ROOT_MINOR, DEFAULT_MINOR) for c in read_classes(ipr, ifindex)):
        return False
    try:
        ipr.tc("del", index=ifindex, handle=ROOT_HANDLE, parent=0xFFFFFFFF)
    except Exception as exc:
        if _netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
            raise
    return True


def undo_tc_entry(data: dict) -> RecoveredTarget:
    """The journal's undo for a ``tc_htb`` entry of a dead owner: removes its classes
    and filters, then the root if no allocation class is left (see the module)."""
    done = RecoveredTarget(None, kind=KIND_TC_HTB)
    netns = data.get("netns")
    try:
        inode = netns_inode(netns)
    except FileNotFoundError:
        done.target_gone = True  # the namespace was deleted, and its interfaces with it
        return done
    if inode != int(data["netns_ino"]):
        if netns:
            done.target_gone = True  # a namespace of the same name made since
            return done
        raise OSError(errno.EXDEV, f"the entry is for network namespace inode {data['netns_ino']}, not ours "
                                   f"({inode}); run 'prealloc recover' inside it")
    if pyroute2_missing_reason():
        raise OSError(errno.ENOSYS, pyroute2_missing_reason())
    ipr = open_netlink(netns)
    try:
        ifindex = int(data["ifindex"])
        links = ipr.get_links(ifindex) if ipr.link_lookup(index=ifindex) else []
        if not links or links[0].get_attr("IFLA_IFNAME") != data["ifname"]:
            done.target_gone = True  # the interface went away, its qdiscs with it
            return done
        classes = data.get("classes", [])
        for cls in classes:
            for prio in cls.get("filters", []):
                _delete_filter(ipr, ifindex, int(prio))
            _delete_class(ipr, ifindex, int(cls["classid"]))
        root_deleted = _delete_root_if_unused(ipr, ifindex)
        if not root_deleted and _root_qdisc(ipr, ifindex) == ("htb", ROOT_HANDLE):
            _set_default_rate(ipr, ifindex, float(data["link_mbit"]))
        done.removed = (f"{data['ifname']}: {len(classes)} class(es)" + (", the HTB root" if root_deleted else "")
                        + (f" in netns {netns}" if netns else ""))
    finally:
        ipr.close()
    return done


# -- the shared root -------------------------------------------------------------------------

class _Root:
    """prealloc's HTB root on one interface of one namespace, shared by every strategy of
    this process (refcounted by allocations); owns the netlink socket and the journal
    entry for the interface."""

    def __init__(self, key: tuple[int, int], netns: str | None, ifindex: int, ifname: str,
                 link_mbit: float, journal: Journal | None) -> None:
        self.key = key
        self.netns = netns
        self.ifindex = ifindex
        self.ifname = ifname
        self.link_mbit = link_mbit
        self.journal = journal
        self.lock = threading.Lock()
        self.users = 0
        self.minors: set[int] = set()
        self.entry: Entry | None = None
        self.journaled_classes: dict[int, list[int]] = {}  # classid -> filter prios
        self.mark_classifier: str | None = None  # "fw" or "bpf", found at the first mark filter
        self.ipr = open_netlink(netns)
        self.previous: tuple[str, int] | None = None
        self.closed = False  # removed at exit (or by the last release): handles of it are inert

    def install(self) -> None:
        """Installs the root and its two classes, or adopts ours if it is there already
        (another process's, or one left for recovery to judge)."""
        current = _root_qdisc(self.ipr, self.ifindex)
        self.previous = current
        if current is not None and current[0] == "htb" and current[1] == ROOT_HANDLE:
            try:
                self._journal()
            except OSError as exc:
                raise AllocationError(f"cannot journal the change to {self.ifname} before making it: {exc}") from exc
            return
        if current is not None and current[1] != 0:
            kind, handle = current
            raise AllocationError(
                f"{self.ifname} has a root qdisc {kind} {handle >> 16:x}: that someone configured; prealloc does not "
                f"replace it (it could not put its settings back); remove it or shape with it")
        try:
            self._journal()
        except OSError as exc:
            raise AllocationError(f"cannot journal the change to {self.ifname} before making it: {exc}") from exc
        link = self.link_mbit
        try:
            self.ipr.tc("add", "htb", self.ifindex, ROOT_HANDLE, default=DEFAULT_MINOR)
            self.ipr.tc("add-class", "htb", self.ifindex, ROOT_HANDLE | ROOT_MINOR, parent=ROOT_HANDLE,
                        **htb_class(link, link))
            self.ipr.tc("add-class", "htb", self.ifindex, ROOT_HANDLE | DEFAULT_MINOR,
                        parent=ROOT_HANDLE | ROOT_MINOR, **htb_class(link, link))
        except Exception as exc:
            _delete_root_if_unused(self.ipr, self.ifindex)
            self._forget()
            raise AllocationError(f"installing the HTB root on {self.ifname} failed: {exc}") from exc

    def _journal(self) -> None:
        if self.journal is None:
            return
        previous = None if self.previous is None else {"kind": self.previous[0], "handle": self.previous[1]}
        self.entry = self.journal.record(KIND_TC_HTB, netns=self.netns, netns_ino=self.key[0],
                                         ifindex=self.ifindex, ifname=self.ifname, link_mbit=self.link_mbit,
                                         previous=previous, classes=[])

    def journal_classes(self, *, after_removal: bool = False) -> None:
        """Rewrites the entry's class list. OSError when it cannot be written — except
        after a removal, where the entry naming a class that is gone is only logged
        (recovery finds nothing to delete under that id, unless it was reused since)."""
        if self.entry is None:
            return
        try:
            self.entry.update(classes=[{"classid": c, "filters": f} for c, f in self.journaled_classes.items()])
        except OSError as exc:
            if not after_removal:
                raise
            log.warning("prealloc: the journal entry %s could not be updated after a removal: %s", self.entry.path, exc)

    def next_minor(self, classes: list[NetworkClass]) -> int:
        taken = self.minors | {c.classid & 0xFFFF for c in classes}
        for minor in range(FIRST_MINOR, LAST_MINOR + 1):
            if minor not in taken:
                return minor
        raise InsufficientResources(f"{self.ifname}: every prealloc class id is in use")

    def _forget(self) -> None:
        if self.entry is not None:
            self.entry.forget()
            self.entry = None

    def close(self) -> None:
        """The last allocation of this process is gone: the root goes if nobody else's
        class is left under it."""
        self.closed = True
        try:
            _delete_root_if_unused(self.ipr, self.ifindex)
            if _root_qdisc(self.ipr, self.ifindex) == ("htb", ROOT_HANDLE):
                _set_default_rate(self.ipr, self.ifindex, self.link_mbit)
        finally:
            self._forget()
            self.ipr.close()


_roots: dict[tuple[int, int], _Root] = {}
_roots_lock = threading.Lock()


def _forget_inherited_roots() -> None:
    """In a forked child: the parent's roots, classes and journal entries are the
    parent's (the child would otherwise remove them at its exit)."""
    global _roots_lock
    _roots.clear()
    _roots_lock = threading.Lock()  # it may have been held by another thread at the fork


def _remove_roots_at_exit() -> None:
    """At interpreter exit, what allocations never released (an allocator not closed)
    is removed as recovery would: classes, then the root if nobody else's class is left.
    (SIGKILL skips this; recovery is for that.)"""
    with _roots_lock:
        roots = list(_roots.values())
        _roots.clear()
    for root in roots:
        try:
            with root.lock:
                for classid, prios in list(root.journaled_classes.items()):
                    for prio in prios:
                        _delete_filter(root.ipr, root.ifindex, prio)
                    _delete_class(root.ipr, root.ifindex, classid)
                root.journaled_classes.clear()
                root.close()
        except Exception:  # exit goes on; the journal entry stays for recovery
            log.warning("prealloc: removing the HTB classes on %s at exit failed", root.ifname, exc_info=True)


os.register_at_fork(after_in_child=_forget_inherited_roots)
atexit.register(_remove_roots_at_exit)


# -- the strategy -------------------------------------------------------------------------

@dataclass(slots=True)
class NetworkClaim:
    """What a consumer gets: the mark to set on its sockets (SO_MARK) and the class
    that guarantees their egress rate."""

    interface: str
    netns: str | None
    classid: str
    mark: int
    rate_mbit: float
    ceil_mbit: float
    matched: list[str]

    def mark_socket(self, sock: socket.socket | int) -> None:
        """Sets SO_MARK on sock (a socket or its fd). PermissionError without
        CAP_NET_ADMIN (or CAP_NET_RAW on Linux >= 5.17)."""
        s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        finally:
            if s is not sock:
                s.detach()  # the fd stays the caller's


@dataclass(slots=True)
class NetworkGrant:
    """The handle of one NETWORK_BANDWIDTH allocation."""

    root: _Root
    classid: int
    mark: int
    rate_mbit: float
    filters: dict[int, str] = field(default_factory=dict)  # prio -> what it matches ("mark 0x...", "uid 1000")
    sockets: list[Any] = field(default_factory=list)
    match: str = "mark"
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class NetworkBandwidthStrategy(AllocationStrategy):
    """Guaranteed egress Mbit/s as HTB classes (see the module).

    interface / destination / netns / link_rate_mbit / headroom_fraction: as for
    monitors.network.NetworkMonitor, which the strategy makes at its first allocation
    unless `monitor` is given (then those come from it). mark_base: marks handed out are
    mark_base | the class minor. journal: the side-effect journal (True: the default
    directory; None/False: none — then a crash leaves the classes for good); a new
    strategy with a journal recovers what dead hosts left."""

    resource_type = ResourceType.NETWORK_BANDWIDTH

    def __init__(self, interface: str | None = None, *, destination: str | None = None, netns: str | None = None,
                 link_rate_mbit: float | None = None, headroom_fraction: float = 0.05,
                 monitor: NetworkMonitor | None = None, mark_base: int = DEFAULT_MARK_BASE,
                 journal: Journal | None | bool = True) -> None:
        if interface is not None and (not isinstance(interface, str) or not interface or "/" in interface):
            raise ValueError(f"interface must be an interface name, not {interface!r}")
        if destination is not None and (not isinstance(destination, str) or not destination):
            raise ValueError(f"destination must be an address string, not {destination!r}")
        if netns is not None and (not isinstance(netns, str) or not netns or "/" in netns):
            raise ValueError(f"netns must be a network namespace name, not {netns!r}")
        if monitor is not None and not isinstance(monitor, NetworkMonitor):
            raise TypeError(f"monitor must be a NetworkMonitor, not {type(monitor).__name__}")
        if type(mark_base) is not int or not 0 < mark_base < 1 << 32 or mark_base & 0xFFFF:
            raise ValueError(f"mark_base must be a 32-bit int with its low 16 bits clear, not {mark_base!r}")
        self._options: dict[str, Any] = {"interface": interface, "destination": destination, "netns": netns,
                         "link_rate_mbit": check_rate_mbit("link_rate_mbit", link_rate_mbit, allow_none=True),
                         "headroom_fraction": check_headroom_fraction(headroom_fraction)}
        self.mark_base = mark_base
        self._monitor = monitor
        self._own_monitor = False
        self._lock = threading.Lock()
        self.journal: Journal | None = Journal() if journal is True else (journal or None)
        self.unavailable_reason = network_unavailable_reason()
        if self.journal is not None and self.unavailable_reason is None:
            try:
                recover(self.journal.directory)
            except OSError as exc:  # an unreadable directory must not stop the host
                log.warning("prealloc: side-effect journal recovery failed: %s", exc)

    # -- setup -------------------------------------------------------------------------

    def monitor(self) -> NetworkMonitor:
        with self._lock:
            if self._monitor is None:
                if self.unavailable_reason:
                    raise AllocationError(f"NETWORK_BANDWIDTH is unavailable: {self.unavailable_reason}")
                try:
                    self._monitor = NetworkMonitor(**self._options)
                except (NetworkUnavailable, ValueError) as exc:
                    raise AllocationError(f"NETWORK_BANDWIDTH is unavailable: {exc}") from exc
                self._own_monitor = True
            return self._monitor

    def _acquire_root(self, monitor: NetworkMonitor) -> _Root:
        try:
            link, _ = monitor.link_rate()
        except NetworkUnavailable as exc:
            raise AllocationError(f"NETWORK_BANDWIDTH is unavailable: {exc}") from exc
        key = (netns_inode(monitor.netns), monitor.ifindex)
        with _roots_lock:
            root = _roots.get(key)
            if root is None:
                root = _Root(key, monitor.netns, monitor.ifindex, monitor.interface, link, self.journal)
                try:
                    with root.lock:
                        root.install()
                except BaseException:
                    root.ipr.close()
                    raise
                _roots[key] = root
            root.users += 1
            return root

    @staticmethod
    def _release_root(root: _Root) -> None:
        with _roots_lock:
            root.users -= 1
            if root.users > 0 or root.closed:
                return
            del _roots[root.key]
            with root.lock:
                root.close()

    # -- the contract ------------------------------------------------------------------

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        check_rate_mbit("amount", amount)
        return float(amount)

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        check_rate_mbit("amount", amount)
        props = request.metadata.custom_properties or {}
        match = props.get("match", "mark")
        if match not in MATCHES:
            raise ValueError(f"custom_properties['match'] must be one of {list(MATCHES)}, not {match!r}")
        uid, cgroup = props.get("uid"), props.get("cgroup")
        if uid is not None and (type(uid) is not int or not 0 <= uid < 1 << 32):
            raise ValueError(f"custom_properties['uid'] must be a uid (an int >= 0), not {uid!r}")
        if cgroup is not None and (not isinstance(cgroup, (str, os.PathLike)) or not os.path.isdir(cgroup)):
            raise ValueError(f"custom_properties['cgroup'] must be a cgroup v2 directory, not {cgroup!r}")
        if uid is not None and cgroup is not None:
            raise ValueError("custom_properties: give one of 'uid' and 'cgroup', not both")
        sockets = props.get("sockets", [])
        if not isinstance(sockets, (list, tuple)) or not all(isinstance(s, (socket.socket, int)) for s in sockets):
            raise ValueError("custom_properties['sockets'] must be a list of sockets or socket fds")
        monitor = self.monitor()
        root = self._acquire_root(monitor)
        grant: NetworkGrant | None = None
        try:
            grant = self._add_class(root, float(amount))
            grant.sockets = list(sockets)
            grant.match = match
            if uid is not None:
                self._add_match(grant, "uid", uid)
            if cgroup is not None:
                self._add_match(grant, "cgroup", cgroup_v2_id(os.fspath(cgroup)))
            target = request.metadata.target_process_id
            if target is not None and match != "mark" and uid is None and cgroup is None:
                self._match_process(grant, target)
        except BaseException:
            if grant is not None:
                self.release(grant)
            else:
                self._release_root(root)
            raise
        return Grant(float(amount), grant)

    def _add_class(self, root: _Root, amount: float) -> NetworkGrant:
        with root.lock:
            classes = read_classes(root.ipr, root.ifindex)  # every owner's: the kernel's word
            reserved = reserved_mbit(classes)
            check_fits(root.link_mbit, self.monitor().headroom_fraction, reserved, amount)
            minor = root.next_minor(classes)
            classid = ROOT_HANDLE | minor
            root.minors.add(minor)
            root.journaled_classes[classid] = [minor]
            grant = NetworkGrant(root, classid, self.mark_base | minor, amount)
            try:
                root.journal_classes()  # before the change: a crash now leaves an entry, not an orphan
                root.ipr.tc("add-class", "htb", root.ifindex, classid, parent=ROOT_HANDLE | ROOT_MINOR,
                            **htb_class(amount, root.link_mbit))
                self._add_filter(root, grant, minor, "mark", grant.mark)
                _set_default_rate(root.ipr, root.ifindex, root.link_mbit, reserved + amount)
            except BaseException as exc:
                self._remove_class(root, grant)
                if isinstance(exc, (AllocationError, ValueError)):
                    raise
                raise AllocationError(f"adding the HTB class on {root.ifname} failed: {exc}") from exc
            return grant

    def _add_filter(self, root: _Root, grant: NetworkGrant, prio: int, match: str, value: int) -> None:
        """One filter at prio sending what `match` = value selects to the grant's class
        (root.lock held; the prio is journaled already)."""
        if match == "mark" and root.mark_classifier != "bpf":
            try:
                root.ipr.tc("add-filter", "fw", root.ifindex, value, parent=ROOT_HANDLE, prio=prio,
                            protocol=ETH_P_ALL, classid=grant.classid)
                root.mark_classifier = "fw"
                grant.filters[prio] = f"mark {value:#x} (fw)"
                return
            except Exception as exc:
                if _netlink_errno(exc) not in (errno.ENOENT, errno.EOPNOTSUPP) or root.mark_classifier == "fw":
                    raise
                root.mark_classifier = "bpf"  # no cls_fw in this kernel: eBPF reads the mark instead
        fd = load_bpf_classifier(bpf_classifier(match, value), f"prealloc_{match}")
        try:
            root.ipr.tc("add-filter", "bpf", root.ifindex, 1, parent=ROOT_HANDLE, prio=prio, protocol=ETH_P_ALL,
                        fd=fd, name=f"prealloc_{match}", classid=grant.classid)
        finally:
            os.close(fd)  # the filter holds its own reference to the program
        grant.filters[prio] = f"{match} {value:#x} (bpf)" if match == "mark" else f"{match} {value} (bpf)"

    def _add_match(self, grant: NetworkGrant, match: str, value: int) -> None:
        root = grant.root
        prio = (grant.classid & 0xFFFF) + MATCH_PRIO_OFFSET
        with root.lock:
            if prio in grant.filters:
                raise AllocationError(f"the allocation already matches {grant.filters[prio]}")
            root.journaled_classes[grant.classid].append(prio)
            try:
                root.journal_classes()
                self._add_filter(root, grant, prio, match, value)
            except BaseException as exc:
                _delete_filter(root.ipr, root.ifindex, prio)
                root.journaled_classes[grant.classid].remove(prio)
                root.journal_classes(after_removal=True)
                if isinstance(exc, (AllocationError, ValueError)):
                    raise
                raise AllocationError(f"adding the {match} filter on {root.ifname} failed: {exc}") from exc

    def _match_process(self, grant: NetworkGrant, pid: int) -> None:
        if grant.match == "uid":
            self._add_match(grant, "uid", uid_of(pid))
        elif grant.match == "cgroup":
            self._add_match(grant, "cgroup", cgroup_v2_id(cgroup_v2_dir_of(pid)))

    def _remove_class(self, root: _Root, grant: NetworkGrant) -> None:
        """Filters, then the class; the journal entry forgets it after (root.lock held)."""
        for prio in root.journaled_classes.get(grant.classid, []):
            _delete_filter(root.ipr, root.ifindex, prio)
        _delete_class(root.ipr, root.ifindex, grant.classid)
        root.journaled_classes.pop(grant.classid, None)
        root.minors.discard(grant.classid & 0xFFFF)
        root.journal_classes(after_removal=True)
        grant.filters.clear()

    def claim(self, handle: NetworkGrant, target_process_id: int | None = None) -> NetworkClaim:
        if target_process_id is not None and handle.match != "mark" and \
                (handle.classid & 0xFFFF) + MATCH_PRIO_OFFSET not in handle.filters:
            self._match_process(handle, target_process_id)
        result = NetworkClaim(handle.root.ifname, handle.root.netns, _classid_text(handle.classid), handle.mark,
                              handle.rate_mbit, handle.root.link_mbit, sorted(handle.filters.values()))
        for sock in handle.sockets:
            result.mark_socket(sock)
        return result

    def adjust(self, handle: NetworkGrant, new_amount: float) -> float:
        check_rate_mbit("new_amount", new_amount)
        root = handle.root
        with handle.lock, root.lock:
            if handle.released or root.closed:
                raise AllocationError("the allocation was released")
            reserved = reserved_mbit(read_classes(root.ipr, root.ifindex)) - handle.rate_mbit
            check_fits(root.link_mbit, self.monitor().headroom_fraction, max(0.0, reserved), new_amount)
            root.ipr.tc("change-class", "htb", root.ifindex, handle.classid, parent=ROOT_HANDLE | ROOT_MINOR,
                        **htb_class(new_amount, root.link_mbit))
            handle.rate_mbit = float(new_amount)
            _set_default_rate(root.ipr, root.ifindex, root.link_mbit)
        return float(new_amount)

    def release(self, handle: NetworkGrant) -> None:
        with handle.lock:
            if handle.released:
                return None
            handle.released = True
        root = handle.root
        try:
            with root.lock:
                if root.closed:
                    return None  # removed at exit already
                self._remove_class(root, handle)
                _set_default_rate(root.ipr, root.ifindex, root.link_mbit)
        finally:
            self._release_root(root)
        return None

    def describe(self, handle: NetworkGrant) -> dict[str, Any]:
        root = handle.root
        facts: dict[str, Any] = {"interface": root.ifname, "netns": root.netns, "classid": _classid_text(handle.classid),
                                 "mark": handle.mark, "requested_mbit": handle.rate_mbit,
                                 "ceil_mbit": root.link_mbit, "matched": sorted(handle.filters.values()),
                                 "egress_only": True}
        if not handle.released and not root.closed:
            with root.lock:
                found = [c for c in read_classes(root.ipr, root.ifindex) if c.classid == handle.classid]
            if found:
                facts.update(effective_mbit=found[0].rate_mbit, bytes_sent=found[0].bytes_sent,
                             drops=found[0].drops)
        return facts

    def close(self) -> None:
        with self._lock:
            monitor, self._monitor = (self._monitor, None) if self._own_monitor else (None, self._monitor)
        if monitor is not None:
            monitor.close()


def _classid_text(classid: int) -> str:
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"
