"""NETWORK_BANDWIDTH on real traffic control, in network namespaces the tests make and
remove: a veth pair between namespace A (the sender, whose egress is shaped) and B.

Needs CAP_NET_ADMIN (namespaces, tc) and iproute2's ``ip`` to make the namespaces;
skipped with the reason otherwise. Only namespace addresses (10.201.x.0/24) are used and
the host's interfaces are never touched. The flow helpers here (``NetnsPair``,
``measure_flows``) are also the benchmark's (benchmarks/test_bench_network.py).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

pyroute2 = pytest.importorskip("pyroute2", reason='pyroute2 is not installed (pip install "prealloc[net]")')

from prealloc.journal import Journal, recover  # noqa: E402
from prealloc.monitors.network import NetworkMonitor  # noqa: E402
from prealloc.strategies.base import AllocationError, InsufficientResources  # noqa: E402
from prealloc.strategies.network import (  # noqa: E402
    KIND_TC_HTB,
    NetworkBandwidthStrategy,
    has_capability,
)
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType  # noqa: E402

CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)


def netns_unavailable_reason() -> str | None:
    if not has_capability(12):
        return "needs CAP_NET_ADMIN to make network namespaces and change traffic control"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (it makes the test's network namespaces)"
    return None


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class NetnsPair:
    """Namespaces <name>-a and <name>-b joined by veth va (in a, 10.201.N.1) and vb (in
    b, 10.201.N.2). Removed by close(), whatever happened."""

    def __init__(self) -> None:
        n = next(_counter)
        self.name = f"pa-net-{os.getpid()}-{n}"
        self.a, self.b = f"{self.name}-a", f"{self.name}-b"
        subnet = (os.getpid() * 7 + n) % 250 + 1
        self.addr_a, self.addr_b = f"10.201.{subnet}.1", f"10.201.{subnet}.2"
        _run("ip", "netns", "add", self.a)
        try:
            _run("ip", "netns", "add", self.b)
            _run("ip", "-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", self.b)
            _run("ip", "-n", self.a, "addr", "add", f"{self.addr_a}/24", "dev", "va")
            _run("ip", "-n", self.b, "addr", "add", f"{self.addr_b}/24", "dev", "vb")
            for ns, dev in ((self.a, "va"), (self.b, "vb")):
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def tc(self, *args: str, ns: str | None = None) -> str:
        """`tc ARGS` in namespace a (or ns): what a user would type."""
        return _run("ip", "netns", "exec", ns or self.a, "tc", *args)

    def qdisc_show(self) -> str:
        return self.tc("qdisc", "show", "dev", "va")

    def socket_in(self, ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of namespace ns, made on a thread that joined it (setns changes only
        the calling thread; the socket keeps its namespace)."""
        made: list = []

        def make() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    made.append(OSError(ctypes.get_errno(), "setns"))
                    return
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, kind))

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if isinstance(made[0], Exception):
            raise made[0]
        return made[0]

    def close(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Flow:
    """One TCP flow a -> b: a sender thread writing as fast as the shaper lets it
    (bounded by max_bytes) and a receiver thread counting what arrives."""

    def __init__(self, pair: NetnsPair, mark: int | None = None, max_bytes: int = 200 << 20) -> None:
        self.received = 0
        self.stop = threading.Event()
        self.max_bytes = max_bytes
        listener = pair.socket_in(pair.b)
        listener.bind((pair.addr_b, 0))
        listener.listen(1)
        self.sender = pair.socket_in(pair.a)
        if mark is not None:
            self.sender.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
        self.mark_socket = self.sender
        self._listener = listener
        self._threads = [threading.Thread(target=self._receive, daemon=True),
                         threading.Thread(target=self._send, args=(listener.getsockname(),), daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _receive(self) -> None:
        conn, _ = self._listener.accept()
        buffer = bytearray(1 << 16)
        with conn:
            while not self.stop.is_set():
                n = conn.recv_into(buffer)
                if not n:
                    return
                self.received += n

    def _send(self, address: tuple[str, int]) -> None:
        payload = b"\0" * (1 << 16)
        sent = 0
        try:
            self.sender.connect(address)
            self.sender.settimeout(0.5)
            while not self.stop.is_set() and sent < self.max_bytes:
                try:
                    sent += self.sender.send(payload)
                except socket.timeout:
                    continue
        except OSError:
            return

    def close(self) -> None:
        self.stop.set()
        try:
            self.sender.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=5)
        self.sender.close()
        self._listener.close()


def measure_flows(pair: NetnsPair, marks: list[int | None], *, warmup: float = 0.7, window: float = 2.0,
                  stagger: float = 0.3, probe: Callable[[], list[int]] | None = None) -> FlowRates:
    """Starts one flow per mark, in order, `stagger` seconds apart (the first one is
    running when the next arrives, as bulk traffic is when a burst comes); returns each
    flow's received Mbit/s (goodput) over `window` seconds after `warmup`, and the rates
    of the byte counters `probe` returns (tc class bytes: what the shaper counts, headers
    included). Bounded in time, and in bytes by each flow's max_bytes."""
    flows = [Flow(pair, mark) for mark in marks]
    try:
        for i, f in enumerate(flows):
            if i:
                time.sleep(stagger)
            f.start()
        time.sleep(warmup)
        start, before, probed = time.monotonic(), [f.received for f in flows], probe() if probe else []
        time.sleep(window)
        elapsed, after = time.monotonic() - start, [f.received for f in flows]
        probed_after = probe() if probe else []
        return FlowRates([(a - b) * 8 / 1e6 / elapsed for a, b in zip(after, before)],
                         [(a - b) * 8 / 1e6 / elapsed for a, b in zip(probed_after, probed)])
    finally:
        for f in flows:
            f.close()


@dataclass
class FlowRates:
    goodput_mbit: list[float]
    probed_mbit: list[float]


def class_bytes(pair: NetnsPair, *classids: str) -> Callable[[], list[int]]:
    """A probe: the bytes tc says each class sent."""
    def read() -> list[int]:
        text = pair.tc("-s", "class", "show", "dev", "va")
        found = {block.split()[0]: int(block.split("Sent ")[1].split()[0])
                 for block in text.split("class htb ")[1:]}
        return [found.get(c, 0) for c in classids]
    return read


def request(mbit: float, **props) -> ResourceRequest:
    return ResourceRequest(ResourceType.NETWORK_BANDWIDTH, mbit, metadata=RequestMetadata(custom_properties=props))


@pytest.fixture
def pair():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    p = NetnsPair()
    yield p
    p.close()


@pytest.fixture
def journal(tmp_path):
    return Journal(tmp_path / "journal")


def strategy_for(pair: NetnsPair, journal: Journal, **kwargs) -> NetworkBandwidthStrategy:
    return NetworkBandwidthStrategy("va", netns=pair.a, link_rate_mbit=100, journal=journal, **kwargs)


def test_install_and_remove_leave_tc_qdisc_show_as_it_was(pair, journal):
    before = pair.qdisc_show()
    strategy = strategy_for(pair, journal)
    grant = strategy.allocate(request(30), 30, None)
    shown = pair.qdisc_show()
    assert "htb 7061:" in shown and shown != before
    classes = pair.tc("class", "show", "dev", "va")
    assert "class htb 7061:10 parent 7061:1" in classes and "rate 30Mbit ceil 100Mbit" in classes
    assert "class htb 7061:ffff" in classes and "rate 70Mbit" in classes  # the default class got the rest
    assert "flowid 7061:10" in pair.tc("filter", "show", "dev", "va")
    entries = list(journal.directory.iterdir())
    assert len(entries) == 1 and KIND_TC_HTB in entries[0].read_text()
    strategy.release(grant.handle)
    strategy.release(grant.handle)  # twice: nothing more happens
    assert pair.qdisc_show() == before
    assert list(journal.directory.iterdir()) == []
    strategy.close()


def test_reservation_never_exceeds_link_less_headroom_and_adjust_keeps_it(pair, journal):
    strategy = strategy_for(pair, journal, headroom_fraction=0.10)
    first = strategy.allocate(request(50), 50, None)
    with pytest.raises(InsufficientResources, match="does not fit"):
        strategy.allocate(request(41), 41, None)  # 50 + 41 > 90
    second = strategy.allocate(request(40), 40, None)
    with pytest.raises(InsufficientResources):
        strategy.adjust(first.handle, 51)
    assert "rate 50Mbit" in pair.tc("class", "show", "dev", "va", "classid", "7061:10")
    assert strategy.adjust(first.handle, 20) == 20
    assert "rate 20Mbit" in pair.tc("class", "show", "dev", "va", "classid", "7061:10")
    strategy.release(first.handle)
    strategy.release(second.handle)
    assert "7061" not in pair.qdisc_show()
    strategy.close()


def test_nothing_is_changed_when_the_journal_cannot_be_written(pair, tmp_path):
    (tmp_path / "file").write_text("")
    before = pair.qdisc_show()
    strategy = strategy_for(pair, Journal(tmp_path / "file" / "journal"))  # a directory under a file
    with pytest.raises(AllocationError, match="cannot journal"):
        strategy.allocate(request(10), 10, None)
    assert pair.qdisc_show() == before
    strategy.close()


def test_two_strategies_in_one_process_share_the_root(pair, journal):
    before = pair.qdisc_show()
    one, two = strategy_for(pair, journal), strategy_for(pair, journal)
    a = one.allocate(request(40), 40, None)
    b = two.allocate(request(40), 40, None)
    assert a.handle.classid != b.handle.classid and a.handle.mark != b.handle.mark
    with pytest.raises(InsufficientResources):
        two.allocate(request(20), 20, None)  # 40 + 40 + 20 > 95: the other's class counts
    one.release(a.handle)
    classes = pair.tc("class", "show", "dev", "va")
    assert f"7061:{b.handle.classid & 0xffff:x} " in classes and "7061:10 " not in classes
    assert "htb 7061:" in pair.qdisc_show()  # still in use by the other
    two.release(b.handle)
    assert pair.qdisc_show() == before
    one.close()
    two.close()


def test_threads_allocating_and_releasing_at_once_leave_nothing(pair, journal):
    before = pair.qdisc_show()
    strategies = [strategy_for(pair, journal), strategy_for(pair, journal)]
    errors: list[BaseException] = []
    held: list[int] = []

    def work(strategy: NetworkBandwidthStrategy) -> None:
        try:
            for _ in range(5):
                grant = strategy.allocate(request(10), 10, None)
                held.append(grant.handle.classid)
                strategy.release(grant.handle)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(strategies[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(held) == 20
    assert pair.qdisc_show() == before
    assert list(journal.directory.iterdir()) == []
    for strategy in strategies:
        strategy.close()


def test_a_root_someone_configured_is_not_replaced(pair, journal):
    pair.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb", "default", "1")
    pair.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb", "rate", "7mbit")

    def tree() -> str:  # without the counters a stray IPv6 packet moves
        return "".join(pair.tc(what, "show", "dev", "va").split("direct_packets_stat")[0] for what in ("qdisc", "class"))

    before = tree()
    strategy = strategy_for(pair, journal)
    with pytest.raises(AllocationError, match="someone configured"):
        strategy.allocate(request(10), 10, None)
    assert tree() == before and "rate 7Mbit" in before
    assert not journal.directory.exists() or list(journal.directory.iterdir()) == []
    strategy.close()


def test_monitor_reads_link_rate_counters_and_classes(pair, journal):
    monitor = NetworkMonitor("va", netns=pair.a, link_rate_mbit=100, headroom_fraction=0.05)
    strategy = strategy_for(pair, journal, monitor=monitor)
    grant = strategy.allocate(request(25), 25, None)
    snap = monitor.snapshot()
    assert snap.link_rate_mbit == 100 and snap.link_rate_source == "configured"
    assert ("htb", "7061:0", "root") in snap.qdiscs
    assert [c.rate_mbit for c in snap.classes if c.classid == grant.handle.classid] == [25.0]
    availability = monitor.get_resource_availability(ResourceType.NETWORK_BANDWIDTH)
    assert availability.total == 100 and availability.used == 25 and availability.available == pytest.approx(70)
    measure_flows(pair, [grant.handle.mark], warmup=0.1, window=0.3)
    snap2 = monitor.snapshot()
    assert snap2.tx_bytes > snap.tx_bytes and snap2.tx_mbit is not None and snap2.tx_mbit > 0
    sent = [c.bytes_sent for c in snap2.classes if c.classid == grant.handle.classid]
    assert sent and sent[0] > 1 << 20  # the marked flow went through its class
    # a UDP burst far over the default class's queue (1000 packets): the overflow is counted
    flood = pair.socket_in(pair.a, socket.SOCK_DGRAM)
    flood.setsockopt(socket.SOL_SOCKET, 32, 64 << 20)  # SO_SNDBUFFORCE: the socket must not hold it back
    for _ in range(4000):
        flood.sendto(b"\0" * 1400, (pair.addr_b, 9))
    flood.close()
    snap3 = monitor.snapshot()
    assert snap3.qdisc_drops > snap2.qdisc_drops
    assert [c.drops for c in snap3.classes if c.classid & 0xFFFF == 0xFFFF][0] > 0
    strategy.release(grant.handle)
    strategy.close()
    monitor.close()
    with NetworkMonitor(destination=pair.addr_b, netns=pair.a, link_rate_mbit=10) as routed:
        assert routed.interface == "va"  # the interface routing to the destination


def test_claim_marks_the_consumers_sockets_and_uid_match_classifies(pair, journal):
    strategy = strategy_for(pair, journal)
    sock = pair.socket_in(pair.a)
    grant = strategy.allocate(request(20, sockets=[sock], uid=os.geteuid()), 20, None)
    claim = strategy.claim(grant.handle)
    assert sock.getsockopt(socket.SOL_SOCKET, 36) == claim.mark == grant.handle.mark
    assert any(m.startswith("uid ") for m in claim.matched) and any(m.startswith("mark ") for m in claim.matched)
    sock.close()
    # an unmarked flow of our uid is classified into the class by the uid filter
    measure_flows(pair, [None], warmup=0.1, window=0.3)
    sent = [line for line in pair.tc("-s", "class", "show", "dev", "va").split("class htb ")
            if line.startswith("7061:10 ")]
    assert sent and int(sent[0].split("Sent ")[1].split()[0]) > 1 << 20
    strategy.release(grant.handle)
    assert "7061" not in pair.qdisc_show()
    strategy.close()


def test_cgroup_match_classifies_the_target_process_traffic(pair, journal):
    from prealloc.strategies.network import cgroup_v2_dir_of

    try:
        cgroup_v2_dir_of(os.getpid())
    except ValueError as exc:
        pytest.skip(str(exc))
    strategy = strategy_for(pair, journal)
    req = ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 20, metadata=RequestMetadata(
        target_process_id=os.getpid(), custom_properties={"match": "cgroup"}))
    grant = strategy.allocate(req, 20, None)
    assert any(m.startswith("cgroup ") for m in strategy.describe(grant.handle)["matched"])
    assert any(m.startswith("cgroup ") for m in strategy.claim(grant.handle, os.getpid()).matched)
    measure_flows(pair, [None], warmup=0.1, window=0.3)  # unmarked: only our cgroup selects the class
    [sent] = class_bytes(pair, "7061:10")()
    assert sent > 1 << 20
    strategy.release(grant.handle)
    assert "7061" not in pair.qdisc_show()
    strategy.close()


def test_reserved_flow_gets_its_rate_while_a_bulk_flow_competes(pair, journal):
    """The issue's proof: the link shaped to 100 Mbit/s; a bulk flow runs, then the
    burst's flow starts. Without a reservation they share one queue; with 60 Mbit/s
    reserved for the marked flow, its class carries >= 90 % of 60 Mbit/s (HTB counts
    frames, headers included) and its goodput is >= 90 % of that less the ~4.5 % of
    TCP/IP/Ethernet headers, while the bulk flow still takes the rest."""
    pair.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb", "default", "1")
    pair.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb", "rate", "100mbit")
    plain = measure_flows(pair, [None, 1]).goodput_mbit
    pair.tc("qdisc", "del", "dev", "va", "root")
    strategy = strategy_for(pair, journal)
    grant = strategy.allocate(request(60), 60, None)
    reserved = measure_flows(pair, [None, grant.handle.mark], probe=class_bytes(pair, "7061:10", "7061:ffff"))
    strategy.release(grant.handle)
    strategy.close()
    print(f"\nwithout reservation: bulk {plain[0]:.1f}, burst {plain[1]:.1f} Mbit/s; with 60 reserved: bulk "
          f"{reserved.goodput_mbit[0]:.1f}, burst {reserved.goodput_mbit[1]:.1f} Mbit/s goodput, "
          f"on the wire: reserved class {reserved.probed_mbit[0]:.1f}, default class {reserved.probed_mbit[1]:.1f} Mbit/s")
    assert reserved.probed_mbit[0] >= 0.9 * 60, reserved
    assert reserved.goodput_mbit[1] >= 0.9 * 60 * 0.955, reserved
    assert reserved.goodput_mbit[0] >= 20, reserved  # the bulk flow still gets the rest
    assert sum(plain) >= 80 and min(plain) > 0, plain  # the baseline is shaped to the same link, and both flow


def test_through_the_engine_a_preallocation_is_claimed_and_given_back(pair, journal):
    from prealloc import ResourcePreallocator
    from prealloc.strategies import NetworkClaim

    before = pair.qdisc_show()
    monitor = NetworkMonitor("va", netns=pair.a, link_rate_mbit=100)
    strategy = strategy_for(pair, journal, monitor=monitor)
    with ResourcePreallocator(allocation_strategies={ResourceType.NETWORK_BANDWIDTH: strategy},
                              resource_monitors={ResourceType.NETWORK_BANDWIDTH: monitor}) as pre:
        allocation = pre.request_preallocation(request(30))
        assert allocation.status.name == "ALLOCATED", allocation.failure_reason
        assert allocation.details["classid"] == "7061:10" and allocation.details["effective_mbit"] == 30
        with pre.acquire("NETWORK_BANDWIDTH", 30) as claim:
            assert isinstance(claim.resource, NetworkClaim) and claim.resource.rate_mbit == 30
            assert "rate 30Mbit" in pair.tc("class", "show", "dev", "va", "classid", "7061:10")
    assert pair.qdisc_show() == before
    strategy.close()
    monitor.close()


# -- crash recovery ----------------------------------------------------------------------

HOST = """
import sys, time
from prealloc.journal import Journal
from prealloc.strategies.network import NetworkBandwidthStrategy
from prealloc.types import ResourceRequest, ResourceType
s = NetworkBandwidthStrategy("va", netns=sys.argv[1], link_rate_mbit=100, journal=Journal(sys.argv[2]))
for mbit in (30, 20):
    s.allocate(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, mbit), mbit, None)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_host_that_exits_without_releasing_leaves_nothing(pair, tmp_path):
    before = pair.qdisc_show()
    directory = tmp_path / "journal"
    script = HOST.replace('print("ready", flush=True)\ntime.sleep(60)', 'print("ready", flush=True)')
    done = subprocess.run([sys.executable, "-c", script, pair.a, str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ready", done.stderr
    assert pair.qdisc_show() == before
    assert list(directory.iterdir()) == []


def test_recovery_removes_what_a_sigkilled_host_left(pair, tmp_path):
    before = pair.qdisc_show()
    directory = tmp_path / "journal"
    host = subprocess.Popen([sys.executable, "-c", HOST, pair.a, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "ready"
        # a live owner's entry is left alone
        assert recover(directory) == []
        assert "7061:11" in pair.tc("class", "show", "dev", "va")
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    assert "7061:11" in pair.tc("class", "show", "dev", "va")  # the kernel keeps them: nobody removed them
    done = subprocess.run([sys.executable, "-m", "prealloc", "recover", "--dir", str(directory), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"kind": "tc_htb"' in done.stdout and "2 class(es), the HTB root" in done.stdout
    assert pair.qdisc_show() == before
    assert list(Path(directory).iterdir()) == []


def test_recovery_keeps_the_root_while_a_live_allocators_class_is_under_it(pair, tmp_path, journal):
    directory = tmp_path / "dead"
    host = subprocess.Popen([sys.executable, "-c", HOST, pair.a, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "ready"
        live = strategy_for(pair, journal)  # adopts the dead-to-be host's root
        grant = live.allocate(request(10), 10, None)
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    [result] = recover(directory)
    assert result.removed and "root" not in result.removed
    classes = pair.tc("class", "show", "dev", "va")
    assert f"7061:{grant.handle.classid & 0xffff:x} " in classes and "7061:10 " not in classes
    assert "rate 90Mbit" in pair.tc("class", "show", "dev", "va", "classid", "7061:ffff")
    live.release(grant.handle)
    assert "7061" not in pair.qdisc_show()
    live.close()
