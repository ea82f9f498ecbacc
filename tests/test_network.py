"""NETWORK_BANDWIDTH without privilege: rate arithmetic, headroom, validation, the eBPF
classifiers' encoding, the unavailable path, journal records and their recovery where
nothing can be reached, and the monitor on our own loopback. The traffic-control tests
proper are in test_network_netns.py (CAP_NET_ADMIN)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from prealloc.journal import KIND_TC_HTB as JOURNAL_KIND_TC_HTB
from prealloc.journal import Entry, Journal, recover
from prealloc.monitors.network import (
    NetworkClass,
    check_headroom_fraction,
    check_rate_mbit,
    reserved_mbit,
    sysfs_link_rate_mbit,
)
from prealloc.strategies.base import AllocationError, InsufficientResources
from prealloc.strategies.network import (
    KIND_TC_HTB,
    NetworkBandwidthStrategy,
    bpf_classifier,
    burst_bytes,
    check_fits,
    default_class_rate_mbit,
    has_capability,
    htb_class,
    network_unavailable_reason,
    rate_bytes,
    undo_tc_entry,
)
from prealloc.types import AllocationStatus, ResourceRequest, ResourceType


def test_rates_convert_to_the_kernels_bytes_per_second():
    assert rate_bytes(60) == 7_500_000  # tc's 60mbit
    assert rate_bytes(0.000001) == 1  # HTB needs a rate > 0
    assert burst_bytes(100) == 12_500 + 1600  # one 1 ms tick of the rate plus an MTU, as tc computes it
    assert htb_class(60, 100) == {"rate": "60000000bit", "ceil": "100000000bit", "burst": 9100, "cburst": 14100,
                                  "quantum": 200_000}  # 750 kB capped
    assert htb_class(1, 100)["quantum"] == 12_500 and htb_class(0.01, 1)["quantum"] == 1600
    assert default_class_rate_mbit(100, 60) == 40
    assert default_class_rate_mbit(100, 100) == 0.1


def test_headroom_bounds_the_reserved_total():
    check_fits(100, 0.05, 35, 60)  # 95: exactly the usable rate
    with pytest.raises(InsufficientResources, match=r"does not fit: 35.1 of 95 Mbit/s usable"):
        check_fits(100, 0.05, 35.1, 60)
    check_fits(100, 0.0, 0, 100)
    with pytest.raises(InsufficientResources):
        check_fits(100, 0.5, 0, 50.5)


def test_reserved_total_counts_allocation_classes_only():
    classes = [NetworkClass(0x70610001, 0x70610000, 100, 100, 0, 0, 0),  # root class
               NetworkClass(0x7061FFFF, 0x70610001, 40, 100, 0, 0, 0),  # default class
               NetworkClass(0x70610010, 0x70610001, 45, 100, 0, 0, 0),
               NetworkClass(0x70610011, 0x70610001, 15, 100, 0, 0, 0)]
    assert reserved_mbit(classes) == 60
    assert classes[2].name == "7061:10"


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "10", None])
def test_bad_rates_are_refused_naming_the_argument(value):
    with pytest.raises(ValueError, match="link_rate_mbit"):
        check_rate_mbit("link_rate_mbit", value)


def test_constructor_validates_every_argument_and_changes_nothing(tmp_path):
    journal = Journal(tmp_path / "j")
    for kwargs, name in [({"interface": "a/b"}, "interface"), ({"interface": ""}, "interface"),
                         ({"destination": 5}, "destination"), ({"netns": "../x"}, "netns"),
                         ({"link_rate_mbit": -5}, "link_rate_mbit"), ({"headroom_fraction": 1.0}, "headroom_fraction"),
                         ({"headroom_fraction": -0.1}, "headroom_fraction"), ({"mark_base": 0x70610001}, "mark_base"),
                         ({"mark_base": 1 << 32}, "mark_base")]:
        with pytest.raises(ValueError, match=name):
            NetworkBandwidthStrategy(journal=journal, **kwargs)
    with pytest.raises(TypeError, match="monitor"):
        NetworkBandwidthStrategy(monitor=object(), journal=journal)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="headroom_fraction"):
        check_headroom_fraction(2)
    assert not (tmp_path / "j").exists()


def test_planned_amount_refuses_what_is_not_a_rate(tmp_path):
    strategy = NetworkBandwidthStrategy(journal=Journal(tmp_path / "j"))
    assert strategy.planned_amount(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 5), 5) == 5.0
    with pytest.raises(ValueError, match="amount"):
        strategy.planned_amount(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 5), 0)


def test_request_properties_are_checked_before_anything_is_made(tmp_path):
    strategy = NetworkBandwidthStrategy("lo", link_rate_mbit=1000, journal=Journal(tmp_path / "j"))
    for props, name in [({"match": "nfmark"}, "match"), ({"uid": -1}, "uid"), ({"uid": "root"}, "uid"),
                        ({"cgroup": "/no/such/cgroup"}, "cgroup"), ({"sockets": [1.5]}, "sockets"),
                        ({"uid": 0, "cgroup": str(tmp_path)}, "not both")]:
        req = ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 5)
        req.metadata.custom_properties = props
        with pytest.raises(ValueError, match=name):
            strategy.allocate(req, 5, None)
    with pytest.raises(ValueError, match="amount"):
        strategy.allocate(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 5), -5, None)
    assert not (tmp_path / "j").exists()  # nothing journaled, so nothing made
    strategy.close()


def _instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=BBhi", program[i:i + 8]) for i in range(0, len(program), 8)]


def test_ebpf_classifiers_are_encoded_as_the_kernel_reads_them():
    regs = (lambda dst, src: src << 4 | dst) if sys.byteorder == "little" else (lambda dst, src: dst << 4 | src)
    tail = [(0xB7, 0, 0, -1), (0x95, 0, 0, 0), (0xB7, 0, 0, 0), (0x95, 0, 0, 0)]
    assert _instructions(bpf_classifier("mark", 0x70610010)) == [
        (0x61, regs(0, 1), 8, 0),  # r0 = skb->mark
        (0x56, 0, 2, 0x70610010),  # if w0 != mark goto +2
        *tail]
    # a mark above 2**31 is the same 32 bits, as the signed immediate the instruction has
    assert _instructions(bpf_classifier("mark", 0xFFFFFFFF))[1] == (0x56, 0, 2, -1)
    assert _instructions(bpf_classifier("uid", 1000))[:2] == [(0x85, 0, 0, 47), (0x56, 0, 2, 1000)]
    cgroup = _instructions(bpf_classifier("cgroup", (7 << 32) | 9))
    assert cgroup[0] == (0x85, 0, 0, 79)
    assert cgroup[1] == (0x18, regs(2, 0), 0, 9) and cgroup[2] == (0, 0, 0, 7)  # imm64 in two halves
    assert cgroup[3] == (0x5D, regs(0, 2), 2, 0)
    assert cgroup[4:] == tail
    for match, value, name in [("mark", -1, "mark"), ("mark", 1 << 32, "mark"), ("uid", -2, "uid"),
                               ("cgroup", 0, "cgroup"), ("nfmark", 1, "match")]:
        with pytest.raises(ValueError, match=name):
            bpf_classifier(match, value)


def test_unavailable_without_cap_net_admin_says_why_and_the_host_still_starts(tmp_path):
    from prealloc import ResourcePreallocator

    reason = network_unavailable_reason()
    strategy = NetworkBandwidthStrategy("lo", link_rate_mbit=1000, journal=Journal(tmp_path / "j"))
    assert strategy.unavailable_reason == reason
    if has_capability(12):
        pytest.importorskip("pyroute2")
        assert reason is None
        return
    assert reason is not None and ("CAP_NET_ADMIN" in reason or "pyroute2" in reason)
    with pytest.raises(AllocationError, match="unavailable"):
        strategy.allocate(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 10), 10, None)
    with ResourcePreallocator(allocation_strategies={ResourceType.NETWORK_BANDWIDTH: strategy},
                              resource_monitors={}) as pre:
        allocation = pre.request_preallocation(ResourceRequest(ResourceType.NETWORK_BANDWIDTH, 10))
        assert allocation.status == AllocationStatus.FAILED
        assert "unavailable" in (allocation.failure_reason or "")
    strategy.close()


def test_make_network_strategy_raises_the_reason_where_it_cannot_work(tmp_path):
    from prealloc.monitors.network import NetworkUnavailable
    from prealloc.strategies.network import make_network_strategy

    # loopback never has a link rate: without pyroute2 / CAP_NET_ADMIN that is the reason
    # given, else the unknown rate
    with pytest.raises(NetworkUnavailable) as caught:
        make_network_strategy(interface="lo", journal=Journal(tmp_path / "j"))
    reason = network_unavailable_reason()
    assert caught.value.reason == reason if reason else "link rate of lo is unknown" in caught.value.reason


def test_mark_socket_sets_so_mark_where_permitted_and_leaves_the_fd_open():
    import socket

    from prealloc.strategies.network import NetworkClaim

    claim = NetworkClaim("lo", None, "7061:10", 0x70610010, 10.0, 100.0, ["mark 0x70610010 (bpf)"])
    with socket.socket() as sock:
        if not (has_capability(12) or has_capability(13)):  # CAP_NET_ADMIN, or CAP_NET_RAW on >= 5.17
            with pytest.raises(PermissionError):
                claim.mark_socket(sock)
            return
        claim.mark_socket(sock.fileno())  # an fd: marked, and still the caller's
        assert sock.getsockopt(socket.SOL_SOCKET, 36) == 0x70610010
        os.fstat(sock.fileno())


def test_the_journal_knows_the_kind():
    assert JOURNAL_KIND_TC_HTB == KIND_TC_HTB


def _dead_owner() -> dict:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return {"pid": int(child.stdout), "start": 1}


def _entry(directory, **fields) -> Entry:
    data = {"kind": KIND_TC_HTB, "owner": _dead_owner(), "uid": os.geteuid(), "ifindex": 5, "ifname": "va",
            "link_mbit": 100.0, "previous": {"kind": "noqueue", "handle": 0},
            "classes": [{"classid": 0x70610010, "filters": [0x10]}], **fields}
    directory.mkdir(mode=0o700, exist_ok=True)
    entry = Entry(directory / "e-1-1-1.json", data)
    entry.save()
    return entry


def test_a_record_made_by_the_journal_has_the_fields_recovery_reads(tmp_path):
    entry = Journal(tmp_path / "j").record(KIND_TC_HTB, netns=None, netns_ino=1, ifindex=2, ifname="eth0",
                                           link_mbit=100.0, previous=None, classes=[])
    data = json.loads(entry.path.read_text())
    assert data["kind"] == "tc_htb" and data["owner"]["pid"] == os.getpid() and data["classes"] == []
    entry.update(classes=[{"classid": 0x70610010, "filters": [0x10, 0x8010]}])
    assert json.loads(entry.path.read_text())["classes"][0]["filters"] == [0x10, 0x8010]
    assert recover(tmp_path / "j") == []  # our own entry: the owner is alive
    entry.forget()


def test_recovery_of_a_deleted_namespace_drops_the_entry(tmp_path):
    _entry(tmp_path / "j", netns="pa-no-such-namespace", netns_ino=12345)
    assert undo_tc_entry(json.loads((tmp_path / "j" / "e-1-1-1.json").read_text())).target_gone
    [result] = recover(tmp_path / "j")
    assert result.kind == KIND_TC_HTB and result.target_gone and not result.removed
    assert list((tmp_path / "j").iterdir()) == []


def test_recovery_in_another_namespace_puts_the_entry_back(tmp_path):
    ours = os.stat("/proc/thread-self/ns/net").st_ino
    _entry(tmp_path / "j", netns=None, netns_ino=ours + 1)
    with pytest.raises(OSError, match="run 'prealloc recover' inside it"):
        undo_tc_entry(json.loads((tmp_path / "j" / "e-1-1-1.json").read_text()))
    assert recover(tmp_path / "j") == []
    assert [p.name for p in (tmp_path / "j").iterdir()] == ["e-1-1-1.json"]  # kept for a recoverer there


def test_sysfs_link_rate():
    assert sysfs_link_rate_mbit("lo") is None  # loopback has no speed
    assert sysfs_link_rate_mbit("pa-no-such-if") is None
    with pytest.raises(ValueError, match="interface"):
        sysfs_link_rate_mbit("../lo")


def test_monitor_of_loopback_unprivileged():
    pytest.importorskip("pyroute2", reason='pyroute2 is not installed (pip install "prealloc[net]")')
    from prealloc.monitors.network import NetworkMonitor, NetworkUnavailable

    with NetworkMonitor("lo", link_rate_mbit=1000, headroom_fraction=0.1) as monitor:
        snap = monitor.snapshot()
        assert snap.interface == "lo" and snap.tx_mbit is None and snap.qdiscs  # noqueue, at least
        assert all(c.classid >> 16 == 0x7061 for c in snap.classes)
        availability = monitor.get_resource_availability(ResourceType.NETWORK_BANDWIDTH)
        assert availability.total == 1000 and availability.available == pytest.approx(900 - snap.reserved_mbit)
        assert monitor.snapshot().tx_mbit is not None  # a rate from the second snapshot on
    with NetworkMonitor("lo") as unknown:
        with pytest.raises(NetworkUnavailable, match="link_rate_mbit"):
            unknown.link_rate()
    with pytest.raises(ValueError, match="no such interface"):
        NetworkMonitor("pa-no-such-if", link_rate_mbit=10)
