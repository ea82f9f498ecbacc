"""NETWORK_BANDWIDTH, side by side in one run, in network namespaces the benchmark makes
(a veth pair, the sender's egress shaped to 100 Mbit/s; CAP_NET_ADMIN and iproute2
needed, skipped with the reason otherwise).

  class    install and remove one reservation (an HTB class at 60 Mbit/s + its mark
           filter) under a root already there: NetworkBandwidthStrategy allocate +
           release (netlink, journaled, an eBPF mark classifier loaded on this kernel,
           which lacks cls_fw) vs the two `tc` commands a user would type for the same
           class and filter, and the two that remove them (u32 on a port: the classifier
           a user has here without cls_fw).
  flows    (test_two_flow_rates, printed with -s) a bulk flow running, then the burst's
           flow: its goodput without a reservation (one HTB class for all), with the
           strategy's 60 Mbit/s reservation, and with the same reservation typed as
           plain `tc` commands; Python TCP sender/receiver pairs, and iperf3 for the
           plain-tc row where it is installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import per_item

pytest.importorskip("pyroute2", reason='pyroute2 is not installed (pip install "prealloc[net]")')
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_network_netns import NetnsPair, measure_flows, netns_unavailable_reason, request  # noqa: E402

from prealloc.strategies.network import NetworkBandwidthStrategy  # noqa: E402


@pytest.fixture
def pair():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    p = NetnsPair()
    yield p
    p.close()


@pytest.mark.benchmark(group="network-class")
@pytest.mark.parametrize("journal_on", ["tmpfs", "disk"])
def test_strategy_class_install_remove(benchmark, pair, tmp_path, journal_on):
    """journal_on tmpfs: like the default /run/prealloc; disk: each journal update's
    fsync reaches the disk (two per install + remove)."""
    from prealloc.journal import Journal

    if journal_on == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm tmpfs here")
        directory = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="prealloc-bench-"))
    else:
        directory = tmp_path / "j"
    strategy = NetworkBandwidthStrategy("va", netns=pair.a, link_rate_mbit=100, journal=Journal(directory))
    keep = strategy.allocate(request(1), 1, None)  # the root stays: the class alone is measured

    def install_remove():
        grant = strategy.allocate(request(60), 60, None)
        strategy.release(grant.handle)

    benchmark(install_remove)
    per_item(benchmark, 1)
    strategy.release(keep.handle)
    strategy.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.benchmark(group="network-class")
def test_tc_commands_class_install_remove(benchmark, pair):
    if shutil.which("tc") is None:
        pytest.skip("iproute2's tc is not installed")
    pair.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb", "default", "ffff")
    pair.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb", "rate", "100mbit")

    def install_remove():
        pair.tc("class", "add", "dev", "va", "parent", "1:1", "classid", "1:10", "htb", "rate", "60mbit",
                "ceil", "100mbit")
        pair.tc("filter", "add", "dev", "va", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                "dport", "5201", "0xffff", "flowid", "1:10")
        pair.tc("filter", "del", "dev", "va", "parent", "1:", "protocol", "ip", "prio", "1")
        pair.tc("class", "del", "dev", "va", "classid", "1:10")

    benchmark(install_remove)
    per_item(benchmark, 1, baseline=True)


PLAIN_TC = [
    "tc qdisc add dev va root handle 1: htb default 20",
    "tc class add dev va parent 1: classid 1:1 htb rate 100mbit",
    "tc class add dev va parent 1:1 classid 1:10 htb rate 60mbit ceil 100mbit",
    "tc class add dev va parent 1:1 classid 1:20 htb rate 40mbit ceil 100mbit",
    "tc filter add dev va parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:10",
]


def _iperf3_server(pair: NetnsPair, port: int) -> subprocess.Popen:
    server = subprocess.Popen(["ip", "netns", "exec", pair.b, "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return server


def _iperf3_rates(pair: NetnsPair, seconds: int = 3) -> tuple[float, float]:
    """A bulk iperf3 flow (port 5202) running, then the burst's (port 5201); their
    receiver-side Mbit/s over the burst flow's run (the first second omitted)."""
    servers = [_iperf3_server(pair, port) for port in (5201, 5202)]
    try:
        bulk = subprocess.Popen(["ip", "netns", "exec", pair.a, "iperf3", "-J", "-c", pair.addr_b, "-p", "5202",
                                 "-t", str(seconds + 2)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        burst = subprocess.run(["ip", "netns", "exec", pair.a, "iperf3", "-J", "-c", pair.addr_b, "-p", "5201",
                                "-t", str(seconds), "-O", "1"], capture_output=True, text=True, timeout=60)
        bulk_out = bulk.communicate(timeout=60)[0]
        burst_mbit = json.loads(burst.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        intervals = json.loads(bulk_out)["intervals"]
        during = [i["sum"]["bits_per_second"] for i in intervals[2:2 + seconds]]  # while the burst ran
        return sum(during) / len(during) / 1e6, burst_mbit
    finally:
        for s in servers:
            s.kill()
            s.wait()


def test_two_flow_rates(pair, tmp_path, capsys):
    from prealloc.journal import Journal

    rows = []
    pair.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb", "default", "1")
    pair.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb", "rate", "100mbit")
    for _ in range(3):
        rows.append(("no reservation (one 100mbit HTB class)", *measure_flows(pair, [None, 1]).goodput_mbit))
    pair.tc("qdisc", "del", "dev", "va", "root")
    strategy = NetworkBandwidthStrategy("va", netns=pair.a, link_rate_mbit=100, journal=Journal(tmp_path / "j"))
    grant = strategy.allocate(request(60), 60, None)
    for _ in range(3):
        rows.append(("NetworkBandwidthStrategy 60 Mbit/s, SO_MARK", *measure_flows(pair, [None, grant.handle.mark])
                     .goodput_mbit))
    strategy.release(grant.handle)
    strategy.close()
    if shutil.which("iperf3") is not None:
        for line in PLAIN_TC:
            pair.tc(*line.format(port=5201).split()[1:])
        for _ in range(3):
            rows.append(("plain tc 60mbit class + u32 dport, iperf3", *_iperf3_rates(pair)))
        pair.tc("qdisc", "del", "dev", "va", "root")
        pair.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb", "default", "1")
        pair.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb", "rate", "100mbit")
        for _ in range(3):
            rows.append(("no reservation, iperf3", *_iperf3_rates(pair)))
        pair.tc("qdisc", "del", "dev", "va", "root")
    else:
        rows.append(("plain tc + iperf3: skipped, iperf3 is not installed", float("nan"), float("nan")))
    with capsys.disabled():
        print("\n| setup (link shaped to 100 Mbit/s) | bulk flow Mbit/s | burst flow Mbit/s |\n|---|---:|---:|")
        for name, bulk, burst in rows:
            print(f"| {name} | {bulk:.1f} | {burst:.1f} |")
    reserved = [r[2] for r in rows if r[0].startswith("NetworkBandwidthStrategy")]
    assert min(reserved) >= 0.9 * 60 * 0.955  # goodput: HTB counts the ~4.5 % of headers too

