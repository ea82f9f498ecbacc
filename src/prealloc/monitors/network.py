"""NETWORK_BANDWIDTH availability of one egress interface, and the facts the network
strategy sizes its reservations with.

- Link rate, in Mbit/s, from the first source that knows it: the configured shaping rate
  (``link_rate_mbit``, which a virtual link — veth, bridge, tun — needs: its sysfs speed
  is absent or a made-up 10000), else ``/sys/class/net/IF/speed`` (what ethtool reports;
  readable only for interfaces of the namespace sysfs was mounted in, so a monitor of
  another namespace must be given the rate).
- Throughput from the interface's own counters (netlink IFLA_STATS64: tx/rx bytes and
  drops), as the rate between two samples.
- The qdiscs on the interface and, under prealloc's HTB root, every class with its
  rate, ceil, bytes sent and drops.

Availability is the link rate less a headroom (``headroom_fraction``, default 5 %: the
share no reservation may take, left to unclassified traffic and to the shaper's slack)
less what prealloc's HTB classes already guarantee. Traffic that merely *uses* the link
does not reduce it: a reservation is a guarantee against other reservations, and bulk
traffic borrows only what the reserved classes leave idle.

Needs ``pyroute2`` (``pip install "prealloc[net]"``); reading needs no privilege.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._threads import start_quiet
from ..types import ResourceAvailability, ResourceType
from .base import ResourceMonitor, availability_from, read_small_file

__all__ = ["NetworkClass", "NetworkMonitor", "NetworkSnapshot", "NetworkUnavailable", "PREALLOC_TC_MAJOR",
           "check_headroom_fraction", "check_rate_mbit", "open_netlink", "pyroute2_missing_reason",
           "reserved_mbit", "sysfs_link_rate_mbit"]

# prealloc's HTB qdisc handle is 7061: ("pa"); its root class 7061:1, the default class
# 7061:ffff, one class per allocation in between.
PREALLOC_TC_MAJOR = 0x7061
ROOT_MINOR = 0x1
DEFAULT_MINOR = 0xFFFF
BYTES_PER_MBIT = 125_000  # 1 Mbit/s = 10**6 bit/s = 125 000 bytes/s (tc's "mbit")


class NetworkUnavailable(OSError):
    """The network strategy or monitor cannot work here; ``reason`` (the message) says why."""

    @property
    def reason(self) -> str:
        return str(self)


def pyroute2_missing_reason() -> str | None:
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return 'pyroute2 is not installed (pip install "prealloc[net]")'
    return None


def check_rate_mbit(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """A rate in Mbit/s: a finite number > 0. ValueError naming `name`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number of Mbit/s > 0, not {value!r}")
    return float(value)


def check_headroom_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"headroom_fraction must be a fraction in [0, 1), not {value!r}")
    return float(value)


def sysfs_link_rate_mbit(ifname: str) -> float | None:
    """/sys/class/net/IF/speed in Mbit/s; None where the kernel does not know it (a
    virtual link, a link that is down: -1 or EINVAL) or the interface is not in the
    namespace sysfs shows."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"interface must be an interface name, not {ifname!r}")
    try:
        speed = int(read_small_file(f"/sys/class/net/{ifname}/speed").strip())
    except (OSError, ValueError):
        return None
    return float(speed) if speed > 0 else None


def open_netlink(netns: str | None) -> Any:
    """An IPRoute socket in netns (a name under /run/netns) or in ours."""
    reason = pyroute2_missing_reason()
    if reason:
        raise NetworkUnavailable(reason)
    from pyroute2 import IPRoute
    if netns is None:
        return IPRoute()
    if not isinstance(netns, str) or not netns or "/" in netns:
        raise ValueError(f"netns must be a network namespace name (under /run/netns), not {netns!r}")
    if not os.path.exists(f"/run/netns/{netns}"):
        raise ValueError(f"netns {netns!r}: no /run/netns/{netns}")
    import pyroute2
    if _version_tuple(getattr(pyroute2, "__version__", "0")) >= (0, 9):
        return IPRoute(netns=netns)  # a socket of that namespace, in this process
    # Before 0.9, NetNS is a proxy to a forked helper, where descriptors we pass (an eBPF
    # program's) name nothing: the socket is made instead on a thread that joined the
    # namespace (setns moves only the calling thread; a socket keeps its namespace).
    made: list[Any] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into netns {netns!r}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(IPRoute())
        except BaseException as exc:  # handed to the caller's thread
            made.append(exc)

    thread = start_quiet(threading.Thread(target=make, name=f"prealloc-netns-{netns}"))
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


_CLONE_NEWNET = 0x40000000


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class NetworkClass:
    """One HTB class under prealloc's root, as the kernel reports it."""

    classid: int
    parent: int
    rate_mbit: float
    ceil_mbit: float
    bytes_sent: int
    packets_sent: int
    drops: int

    @property
    def name(self) -> str:
        return f"{self.classid >> 16:x}:{self.classid & 0xFFFF:x}"


@dataclass(slots=True)
class NetworkSnapshot:
    """What the monitor saw on the interface at one instant."""

    interface: str
    link_rate_mbit: float
    link_rate_source: str  # "configured" or "sysfs"
    tx_bytes: int
    rx_bytes: int
    tx_dropped: int
    tx_mbit: float | None  # since the previous snapshot; None on the first
    rx_mbit: float | None
    qdiscs: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, handle, parent)
    classes: list[NetworkClass] = field(default_factory=list)  # under prealloc's root
    qdisc_drops: int = 0  # packets the qdiscs dropped (queue full), summed over them

    @property
    def reserved_mbit(self) -> float:
        return reserved_mbit(self.classes)


def reserved_mbit(classes: list[NetworkClass]) -> float:
    """What prealloc's allocation classes guarantee together (the root and default
    classes are not reservations)."""
    return sum(c.rate_mbit for c in classes if (c.classid & 0xFFFF) not in (ROOT_MINOR, DEFAULT_MINOR))


def _handle(value: int) -> str:
    if value == 0xFFFFFFFF:
        return "root"
    return f"{value >> 16:x}:{value & 0xFFFF:x}"


def _htb_rates(message: Any) -> tuple[float, float]:
    options = message.get_attr("TCA_OPTIONS")
    params = options.get_attr("TCA_HTB_PARMS") if options is not None else None
    if params is None:
        return 0.0, 0.0
    rate = options.get_attr("TCA_HTB_RATE64") or params["rate"]
    ceil = options.get_attr("TCA_HTB_CEIL64") or params["ceil"]
    return rate / BYTES_PER_MBIT, ceil / BYTES_PER_MBIT


def _drops(message: Any) -> int:
    stats = message.get_attr("TCA_STATS2")
    queue = stats.get_attr("TCA_STATS_QUEUE") if stats is not None else None
    return int(queue["drops"]) if queue is not None else 0


def read_classes(ipr: Any, ifindex: int) -> list[NetworkClass]:
    """The HTB classes under prealloc's root on ifindex (empty without the root)."""
    found = []
    for message in ipr.get_classes(ifindex):
        if message["handle"] >> 16 != PREALLOC_TC_MAJOR or message.get_attr("TCA_KIND") != "htb":
            continue
        rate, ceil = _htb_rates(message)
        stats = message.get_attr("TCA_STATS2")
        basic = stats.get_attr("TCA_STATS_BASIC") if stats is not None else None
        sent, packets = (basic["bytes"], basic["packets"]) if basic is not None else (0, 0)
        found.append(NetworkClass(message["handle"], message["parent"], rate, ceil, sent, packets, _drops(message)))
    return found


class NetworkMonitor(ResourceMonitor):
    """NETWORK_BANDWIDTH of one egress interface (see the module).

    interface: its name, or None for the one routing to `destination` (default: the
    default route's). netns: a namespace name under /run/netns (None: ours).
    link_rate_mbit: the rate to shape to (required where sysfs does not know it)."""

    def __init__(self, interface: str | None = None, *, destination: str | None = None,
                 netns: str | None = None, link_rate_mbit: float | None = None,
                 headroom_fraction: float = 0.05, **kwargs: float) -> None:
        super().__init__(**kwargs)
        if interface is not None and (not isinstance(interface, str) or not interface or "/" in interface):
            raise ValueError(f"interface must be an interface name, not {interface!r}")
        if destination is not None and not isinstance(destination, str):
            raise ValueError(f"destination must be an address string, not {destination!r}")
        self.configured_rate_mbit = check_rate_mbit("link_rate_mbit", link_rate_mbit, allow_none=True)
        self.headroom_fraction = check_headroom_fraction(headroom_fraction)
        self.netns = netns
        self._ipr = open_netlink(netns)
        self._ipr_lock = threading.Lock()
        try:
            self.ifindex, self.interface = self._resolve(interface, destination)
        except BaseException:
            self._ipr.close()
            raise
        self._last: tuple[float, int, int] | None = None

    def _resolve(self, interface: str | None, destination: str | None) -> tuple[int, str]:
        if interface is not None:
            found = self._ipr.link_lookup(ifname=interface)
            if not found:
                raise ValueError(f"interface {interface!r}: no such interface"
                                 + (f" in netns {self.netns!r}" if self.netns else ""))
            return found[0], interface
        if destination is None:
            # the default route with the lowest metric (no lookup of any address)
            routes = sorted((r for r in self._ipr.get_default_routes() if r.get_attr("RTA_OIF")),
                            key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
            if not routes:
                raise ValueError("no default route" + (f" in netns {self.netns!r}" if self.netns else "")
                                 + "; name the interface")
        else:
            try:
                routes = self._ipr.route("get", dst=destination)
            except Exception as exc:  # NetlinkError: ENETUNREACH and the like
                raise ValueError(f"destination {destination!r}: no route ({exc})") from None
        ifindex = routes[0].get_attr("RTA_OIF")
        link = self._ipr.get_links(ifindex)[0]
        return ifindex, link.get_attr("IFLA_IFNAME")

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({ResourceType.NETWORK_BANDWIDTH})

    def link_rate(self) -> tuple[float, str]:
        """(Mbit/s, source). NetworkUnavailable when nothing knows it."""
        if self.configured_rate_mbit is not None:
            return self.configured_rate_mbit, "configured"
        speed = sysfs_link_rate_mbit(self.interface) if self.netns is None else None
        if speed is None:
            raise NetworkUnavailable(f"the link rate of {self.interface} is unknown (no sysfs speed: a virtual link, "
                                     f"a link that is down or another namespace); pass link_rate_mbit")
        return speed, "sysfs"

    def usable_mbit(self) -> float:
        """What all reservations together may guarantee: link rate less the headroom."""
        return self.link_rate()[0] * (1.0 - self.headroom_fraction)

    def classes(self) -> list[NetworkClass]:
        with self._ipr_lock:
            return read_classes(self._ipr, self.ifindex)

    def snapshot(self) -> NetworkSnapshot:
        rate, source = self.link_rate()
        with self._ipr_lock:
            link = self._ipr.get_links(self.ifindex)[0]
            qdisc_messages = list(self._ipr.get_qdiscs(self.ifindex))
            qdiscs = [(q.get_attr("TCA_KIND"), _handle(q["handle"]), _handle(q["parent"])) for q in qdisc_messages]
            qdisc_drops = sum(_drops(q) for q in qdisc_messages)
            classes = read_classes(self._ipr, self.ifindex)
        stats = link.get_attr("IFLA_STATS64")
        now = time.monotonic()
        tx, rx, dropped = stats["tx_bytes"], stats["rx_bytes"], stats["tx_dropped"]
        tx_mbit = rx_mbit = None
        previous, self._last = self._last, (now, tx, rx)
        if previous is not None and now > previous[0]:
            elapsed = now - previous[0]
            tx_mbit = max(0, tx - previous[1]) * 8 / 1e6 / elapsed
            rx_mbit = max(0, rx - previous[2]) * 8 / 1e6 / elapsed
        return NetworkSnapshot(self.interface, rate, source, tx, rx, dropped, tx_mbit, rx_mbit, qdiscs, classes,
                               qdisc_drops)

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        snap = self.snapshot()
        usable = snap.link_rate_mbit * (1.0 - self.headroom_fraction)
        reserved = snap.reserved_mbit
        return availability_from(ResourceType.NETWORK_BANDWIDTH, snap.link_rate_mbit, usable - reserved,
                                 used=reserved)

    def _close_resources(self) -> None:
        with self._ipr_lock:
            self._ipr.close()
