"""The machine broker (prealloc serve) and its Python client, across real processes.

What is checked goes through the operating system: the bytes a client process writes
into a claimed MEMORY buffer are in the broker's own mapping (the same pages); the
client's RssShmem rises by the claimed size while its RssAnon does not (no copy); a
SIGKILLed client's holdings are released (the broker's allocations, its VmLck); a CPU
pin of the client is undone at the client's end, at a drain and — after the broker is
SIGKILLed — by the journal at the broker's next start (sched_getaffinity).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from osutil import proc_status_kib
from prealloc import AllocationStatus, ResourceRequest, ResourceType
from prealloc.client import Client
from prealloc.protocol import Closed, RateLimited
from prealloc.quotas import QuotaExceeded
from prealloc.server import Broker, broker_config_from_dict

MiB = 1 << 20


def wait_for(predicate, what: str, limit: float = 30.0):
    """Waits for an asynchronous end (a peer's thread releasing, a process starting);
    the limit only turns a hang into a failure, nothing is asserted on time."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _connectable(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class BrokerProcess:
    """``prealloc serve`` in a process of its own."""

    def __init__(self, tmp_path: Path, config: str | None = None, *, name: str = "broker",
                 extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.socket_path = tmp_path / f"{name}.sock"
        self.config_path = None
        # -X faulthandler: a broker that does not end is made to print every thread's stack
        args = [sys.executable, "-X", "faulthandler", "-m", "prealloc", "serve", "--socket", str(self.socket_path)]
        if config is not None:
            self.config_path = tmp_path / f"{name}.toml"
            self.config_path.write_text(config)
            args += ["--config", str(self.config_path)]
        args += extra_args or []
        env = dict(os.environ, **(extra_env or {}))
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or _connectable(self.socket_path), "the broker to listen")
        assert self.proc.poll() is None, self.log()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler writes the stacks to the log
            self.proc.wait()
            raise AssertionError(f"the broker did not end at SIGTERM; its log:\n{self.log()}") from None
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def broker_process(tmp_path):
    made: list[BrokerProcess] = []

    def make(config: str | None = None, **kwargs) -> BrokerProcess:
        broker = BrokerProcess(tmp_path, config, name=f"broker{len(made)}", **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        if broker.proc.poll() is None:
            broker.kill()


@pytest.fixture
def broker(tmp_path):
    """A broker on a thread of this process: the test can look at its own pages."""
    with Broker(tmp_path / "inproc.sock", config=broker_config_from_dict({})) as running:
        running.start()
        yield running


CLIENT_PRELUDE = """
import os, sys
from prealloc.client import Client
from prealloc import ResourceRequest, ResourceType

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
    return 0

def say(*words):
    print(*words, flush=True)
"""


def client_process(script: str, *args: str) -> subprocess.Popen:
    code = CLIENT_PRELUDE + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen) -> list[str]:
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"client process ended: {proc.wait()} {proc.stderr.read()}")
    return line.split()


# ---------------------------------------------------------------------------------------
# memory crosses the process boundary without a copy


def test_memory_claim_maps_the_brokers_pages_in_the_client(broker):
    size_mib = 32
    proc = client_process(f"""
        c = Client(sys.argv[1])
        aid = c.submit(ResourceRequest(ResourceType.MEMORY, {size_mib}))
        assert c.wait_ready([aid], timeout=120)
        before_shmem, before_anon = status('RssShmem'), status('RssAnon')
        claim = c.claim(aid)
        buf = memoryview(claim.resource)
        for offset in range(0, len(buf), 4096):
            buf[offset] = offset // 4096 % 251
        buf[:8] = b'prealloc'
        say(aid, len(buf), status('RssShmem') - before_shmem, status('RssAnon') - before_anon)
        sys.stdin.readline()
        buf.release()
        claim.release()
        say('released', status('RssShmem') - before_shmem, len(c.allocations()))
        sys.stdin.readline()
    """, str(broker.socket_path))
    try:
        aid, length, shmem_growth, anon_growth = map(int, read_line(proc))
        assert length == size_mib * MiB
        # the client's resident set grew by the claimed pages, as shared memory ...
        assert shmem_growth >= size_mib * MiB
        # ... and not by a private copy of them
        assert anon_growth < size_mib * MiB // 4
        # the broker's own mapping shows what the client wrote: the same pages
        claim = broker.claim_of(aid)
        assert claim is not None
        view = memoryview(claim.resource)
        assert bytes(view[:8]) == b"prealloc"
        assert [view[p * 4096] for p in range(2, 600, 97)] == [p % 251 for p in range(2, 600, 97)]
        del view
        # the memfd the client mapped is sealed against shrinking, for good
        import fcntl
        seals = fcntl.fcntl(claim.resource.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        proc.stdin.write("\n")
        proc.stdin.flush()
        word, shmem_after, left = read_line(proc)
        assert word == "released" and int(left) == 0
        assert int(shmem_after) < size_mib * MiB // 4  # unmapped in the client
        wait_for(lambda: not broker.held(), "the broker to forget the allocation")
        assert broker.allocator.allocations() == []
    finally:
        proc.kill()
        proc.wait()


def test_sigkilled_client_has_its_holdings_released(broker):
    from osutil import vm_lck

    baseline_lck = vm_lck()
    baseline_shmem = proc_status_kib("RssShmem") * 1024
    proc = client_process("""
        c = Client(sys.argv[1])
        memory = c.acquire('memory', 4)
        memory.resource[:4] = b'held'
        queued = c.submit(ResourceRequest(ResourceType.MEMORY, 2))
        c.wait_ready([queued], timeout=120)
        cpu = c.acquire('cpu', 100)
        say(memory.allocation_id, memory.allocation.details['locked'], sorted(cpu.resource)[0],
            sorted(os.sched_getaffinity(0)) == sorted(cpu.resource))
        sys.stdin.readline()
    """, str(broker.socket_path))
    try:
        memory_id, locked, core, pinned = read_line(proc)
        assert pinned == "True"
        assert len(broker.held()) == 3
        assert {a.status for a in broker.allocator.allocations()} == {AllocationStatus.ACTIVE,
                                                                      AllocationStatus.ALLOCATED}
        if locked == "True":
            assert vm_lck() - baseline_lck >= 6 * MiB  # 4 + 2 MiB locked in the broker
        assert proc_status_kib("RssShmem") * 1024 - baseline_shmem >= 6 * MiB  # the memfds' pages, here
        proc.kill()
        proc.wait()
        # its thread forgets each allocation as it releases it, and drops the peer after
        # closing the peer's descriptors: both ends are waited for
        wait_for(lambda: not broker.held() and not broker.peers(), "the dead client's end")
        assert broker.allocator.allocations() == []
        assert vm_lck() == baseline_lck
        assert proc_status_kib("RssShmem") * 1024 - baseline_shmem < 1 * MiB
        assert broker.usage() == {}
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------
# ownership


def test_a_peer_cannot_touch_another_peers_allocations(broker):
    with Client(broker.socket_path) as alice, Client(broker.socket_path) as bob:
        aid = alice.submit(ResourceRequest(ResourceType.MEMORY, 2))
        assert alice.wait_ready([aid], timeout=120)
        for attempt in (lambda: bob.get_allocation(aid), lambda: bob.claim(aid), lambda: bob.release_allocation(aid),
                        lambda: bob.adjust_allocation(aid, 4), lambda: bob.cancel_request(aid),
                        lambda: bob.wait_ready([aid], timeout=0)):
            with pytest.raises(KeyError, match=f"unknown allocation {aid}"):
                attempt()
        assert bob.allocations() == []
        # bob's need is not served by alice's preallocation, even for the same application
        with bob.acquire("memory", 2) as claim:
            assert claim.preallocated is False
            assert claim.allocation_id != aid
        assert alice.get_allocation(aid).status is AllocationStatus.ALLOCATED
        # alice's own need is
        with alice.acquire("memory", 2) as claim:
            assert claim.preallocated is True and claim.allocation_id == aid
        assert alice.allocations() == []


def test_only_root_lists_every_peer(broker):
    with Client(broker.socket_path) as alice, Client(broker.socket_path) as bob:
        aid = alice.submit(ResourceRequest(ResourceType.MEMORY, 1))
        alice.wait_ready([aid], timeout=120)
        if os.geteuid() == 0:
            listed = bob.allocations(all=True)
            assert [a.allocation_id for a in listed] == [aid]
            assert listed[0].details["owner_pid"] == os.getpid()
        else:
            with pytest.raises(PermissionError, match="only root"):
                bob.allocations(all=True)
        # status shows bob his uid's holdings (alice is his uid too: a `prealloc status`
        # beside a host), while only alice's connection may touch them
        [row] = bob.status()["reservations"]
        assert row["allocation_id"] == aid and row["owner_uid"] == os.geteuid()
        assert bob.allocations() == []
        with pytest.raises(KeyError):
            bob.release_allocation(aid)


def test_status_counts_only_the_askers_uids_connections(broker):
    from types import SimpleNamespace

    with Client(broker.socket_path), Client(broker.socket_path):
        assert broker.status()["connections"] == 2  # root's view: every peer
        assert broker.status(SimpleNamespace(uid=os.geteuid()))["connections"] == 2
        other = SimpleNamespace(uid=os.geteuid() + 4242)  # a uid with no connection
        assert broker.status(other)["connections"] == 0
        assert broker.status(other)["reservations"] == [] and broker.status(other)["quotas"] == {}


def test_a_claim_of_the_wrong_type_is_refused_before_anything_is_claimed(broker):
    from prealloc.protocol import WrongResourceType

    with Client(broker.socket_path) as client:
        cpu = client.request_preallocation(ResourceRequest(ResourceType.CPU, 100))
        if cpu.status is not AllocationStatus.ALLOCATED:
            pytest.skip(f"no core could be reserved here: {cpu.failure_reason}")
        before = os.sched_getaffinity(0)
        with pytest.raises(WrongResourceType, match="is cpu, not memory"):
            client.claim(cpu.allocation_id, resource_type="memory")
        assert os.sched_getaffinity(0) == before  # nothing pinned
        assert client.get_allocation(cpu.allocation_id).status is AllocationStatus.ALLOCATED
        with client.claim(cpu.allocation_id, resource_type="CPU") as claim:  # still there, as what it is
            assert os.sched_getaffinity(0) == set(claim.resource)
        assert os.sched_getaffinity(0) == before


def test_the_peer_is_who_so_peercred_says(broker):
    with Client(broker.socket_path) as client:
        assert client.server["peer"] == {"pid": os.getpid(), "uid": os.geteuid(), "gid": os.getegid()}
        aid = client.submit(ResourceRequest(ResourceType.MEMORY, 1))
        # what the client says of itself is not taken: the request's user is the peer's uid
        assert client.status()["quotas"] == {str(os.geteuid()): {"memory": 1.0}}
        client.release_allocation(aid)


def test_cpu_pin_of_a_process_of_another_uid_is_refused(broker):
    if os.geteuid() == 0:
        pytest.skip("root may pin any process")
    with Client(broker.socket_path) as client:
        with pytest.raises(PermissionError, match="does not belong"):
            client.acquire("cpu", 100, target_process_id=1)
        assert client.allocations() == []


# ---------------------------------------------------------------------------------------
# limits


def test_per_uid_quota_is_enforced_across_connections(tmp_path):
    config = broker_config_from_dict({"quotas": {str(os.geteuid()): {"MEMORY": 8}}})
    with Broker(tmp_path / "quota.sock", config=config) as broker:
        broker.start()
        with Client(broker.socket_path) as first, Client(broker.socket_path) as second:
            a = first.submit(ResourceRequest(ResourceType.MEMORY, 4))
            b = second.submit(ResourceRequest(ResourceType.MEMORY, 4))
            with pytest.raises(QuotaExceeded, match="at most 8"):
                second.submit(ResourceRequest(ResourceType.MEMORY, 1))
            with pytest.raises(QuotaExceeded):
                first.acquire("memory", 1)
            assert len(broker.held()) == 2
            assert broker.usage() == {os.geteuid(): {ResourceType.MEMORY: 8.0}}
            first.release_allocation(a)
            c = second.submit(ResourceRequest(ResourceType.MEMORY, 4))
            assert broker.usage() == {os.geteuid(): {ResourceType.MEMORY: 8.0}}
            second.release_allocation(b)
            second.release_allocation(c)
        wait_for(lambda: not broker.peers(), "the peers to close")
        assert broker.usage() == {}


def test_rate_limit_answers_rate_limited(tmp_path):
    config = broker_config_from_dict({"rate_limit": 0.001, "rate_burst": 5})
    with Broker(tmp_path / "rate.sock", config=config) as broker:
        broker.start()
        with Client(broker.socket_path) as client:  # hello is the first of the five
            for _ in range(4):
                client.get_statistics()
            with pytest.raises(RateLimited):
                client.get_statistics()
            with pytest.raises(RateLimited):
                client.submit(ResourceRequest(ResourceType.MEMORY, 1))
        assert broker.held() == {}
        with Client(broker.socket_path) as fresh:  # per peer: another connection has its own bucket
            fresh.get_statistics()


def test_bad_arguments_are_answered_and_change_nothing(broker):
    with Client(broker.socket_path) as client:
        with pytest.raises(ValueError, match="predicted_need"):
            client._call("request_preallocation", {"resource_type": "memory", "predicted_need": -1})
        with pytest.raises(ValueError, match="unknown resource type"):
            client._call("request_preallocation", {"resource_type": "plutonium", "predicted_need": 1})
        with pytest.raises(TypeError, match="allocation_id"):
            client._call("claim", {"allocation_id": "seven"})
        with pytest.raises(KeyError):
            client.claim(12345)
        assert client.allocations() == [] and broker.held() == {}


def test_events_reach_the_subscriber(broker):
    import threading

    seen: list = []
    arrived = threading.Event()
    with Client(broker.socket_path) as client:
        client.on("resource:allocated", lambda a: (seen.append(a), arrived.set()))
        aid = client.submit(ResourceRequest(ResourceType.MEMORY, 1))
        assert arrived.wait(30)
        assert seen[0].allocation_id == aid and seen[0].status is AllocationStatus.ALLOCATED
        assert client.release_allocation(aid)


# ---------------------------------------------------------------------------------------
# the broker's own life: SIGTERM, SIGHUP, SIGKILL, socket activation


def test_sigterm_drains_releases_and_exits_0(broker_process):
    running = broker_process()
    before = os.sched_getaffinity(0)
    client = Client(running.socket_path)
    claim = client.acquire("cpu", 100)
    assert os.sched_getaffinity(0) == set(claim.resource)
    memory = client.acquire("memory", 2)
    assert running.stop() == 0, running.log()
    assert os.sched_getaffinity(0) == before  # the drain undid the pin
    assert not running.socket_path.exists()
    with pytest.raises(Closed):
        client.get_statistics()
    memory.resource[:1] = b"x"  # the mapping stays valid here until released
    client.close()


def test_sighup_reloads_the_quotas(broker_process):
    uid = os.geteuid()
    running = broker_process(f'[quotas.{uid}]\nMEMORY = 2\n')
    with Client(running.socket_path) as client:
        with pytest.raises(QuotaExceeded):
            client.submit(ResourceRequest(ResourceType.MEMORY, 4))
        running.config_path.write_text(f'[quotas.{uid}]\nMEMORY = 64\n')
        running.proc.send_signal(signal.SIGHUP)

        def admitted():
            try:
                return client.submit(ResourceRequest(ResourceType.MEMORY, 4))
            except QuotaExceeded:
                return None

        aid = wait_for(admitted, "the reloaded quota")
        assert client.get_allocation(aid) is not None
        # a broken file keeps the old config
        running.config_path.write_text("rate_limit = 'fast'\n")
        running.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the old config" in running.log(), "the refused reload")
        assert client.release_allocation(aid)
    assert running.stop() == 0


def test_sigkilled_broker_is_recovered_by_the_journal_at_its_next_start(broker_process):
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("one usable cpu: a pin changes nothing to see")
    first = broker_process()
    client = Client(first.socket_path)
    claim = client.acquire("cpu", 100)
    pinned = set(claim.resource)
    assert os.sched_getaffinity(0) == pinned
    # the pin of this process is in the broker's journal, and the status shows it to us
    entries = client.status()["journal"]
    assert [e["target"]["pid"] for e in entries if e["kind"] == "affinity"] == [os.getpid()]
    first.kill()  # no drain: the pin outlives the broker
    assert os.sched_getaffinity(0) == pinned
    second = broker_process()  # its CPU strategy recovers the dead broker's journal
    with Client(second.socket_path) as fresh:  # answered once the engine is made
        assert os.sched_getaffinity(0) == before
        assert fresh.allocations() == []
    client.close()
    assert second.stop() == 0


def test_socket_activation_takes_the_inherited_listening_socket(tmp_path, broker_process):
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(os.fspath(path))
    listener.listen(16)
    # what systemd does: the socket at fd 3, LISTEN_PID naming the broker, LISTEN_FDS=1
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, '-m', 'prealloc', "
                "'serve'])")
    env = {"PREALLOC_SOCKET": str(tmp_path / "not-this-one.sock")}
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno())], pass_fds=[listener.fileno()],
                            env=dict(os.environ, **env), stderr=subprocess.PIPE)
    listener.close()  # only the broker holds it now
    try:
        with Client(path) as client:
            assert client.server["pid"] == proc.pid
            aid = client.submit(ResourceRequest(ResourceType.MEMORY, 1))
            assert client.wait_ready([aid], timeout=120)
        assert not (tmp_path / "not-this-one.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert path.exists()  # the socket is systemd's: the broker does not remove it
    finally:
        proc.kill()
        proc.wait()


def test_the_socket_is_0660_of_its_group_and_served_by_one_broker(broker_process):
    gid = os.getegid()
    running = broker_process(extra_args=["--group", str(gid)])
    info = running.socket_path.stat()
    assert info.st_mode & 0o777 == 0o660 and info.st_gid == gid
    with pytest.raises(RuntimeError, match="another broker"):
        Broker(running.socket_path, config=broker_config_from_dict({}))
    assert running.socket_path.exists()  # the refused one left the live socket alone
    with Client(running.socket_path) as client:
        assert client.server["pid"] == running.pid
    assert running.stop() == 0


def test_config_file_errors_name_the_key():
    from prealloc.config_file import ConfigError

    with pytest.raises(ConfigError) as caught:
        broker_config_from_dict({"rate_limit": -1, "quotas": {"no-such-user-here": {"MEMORY": 1}},
                                 "speed": 3, "engine": {"capacity": "big"}})
    text = str(caught.value)
    for key in ("rate_limit", "no-such-user-here", "speed", "engine.capacity"):
        assert key in text


def test_contrib_units_name_the_protocols_socket():
    contrib = Path(__file__).resolve().parents[1] / "contrib"
    if not contrib.is_dir():
        pytest.skip(f"no contrib/ beside the tests ({contrib}): a copy of the tests alone")
    socket_unit = (contrib / "prealloc.socket").read_text()
    assert "ListenSequentialPacket=/run/prealloc-broker/broker.sock" in socket_unit
    assert "SocketMode=0660" in socket_unit
    assert "prealloc serve" in (contrib / "prealloc.service").read_text()
    from prealloc.server import load_broker_config

    assert load_broker_config(contrib / "broker.toml").quota_for(12345)[ResourceType.MEMORY] == 4096



def test_request_preallocation_allocates_now_as_in_process(broker):
    from prealloc import ResourceAllocation

    with Client(broker.socket_path) as client:
        allocation = client.request_preallocation(ResourceRequest(ResourceType.MEMORY, 2))
        assert isinstance(allocation, ResourceAllocation)
        assert allocation.status is AllocationStatus.ALLOCATED and allocation.allocated_amount == 2.0
        assert allocation.details["owner_uid"] == os.geteuid()
        assert [a.allocation_id for a in client.allocations()] == [allocation.allocation_id]
        with client.claim(allocation.allocation_id) as claim:
            assert len(claim.resource) == 2 * MiB and claim.preallocated is True
        assert client.allocations() == [] and broker.held() == {}


def test_metrics_on_a_local_address(broker_process, tmp_path):
    pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed")
    import urllib.request

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    running = broker_process(extra_args=["--metrics", f"127.0.0.1:{port}"])
    with Client(running.socket_path) as client:
        with client.acquire("memory", 1):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert "prealloc_broker_connections 1.0" in text
    assert 'prealloc_held_bytes{preallocator=' in text and "prealloc_broker_requests_total" in text
    assert running.stop() == 0


def test_handle_prediction_through_the_brokers_translator(tmp_path):
    from prealloc import Prediction

    config = broker_config_from_dict({"engine": {"translator": {"rule": [
        {"name": "open", "match": {"type": "user_action", "value": "open_*"},
         "request": [{"resource_type": "MEMORY", "need": 2}]}]}}})
    with Broker(tmp_path / "predict.sock", config=config) as broker:
        broker.start()
        with Client(broker.socket_path) as client, Client(broker.socket_path) as other:
            ids = client.handle_prediction(Prediction(id="p1", type="user_action", predicted_value="open_editor",
                                                      confidence=0.9))
            assert len(ids) == 1 and client.wait_ready(ids, timeout=30)
            assert [a.allocation_id for a in client.allocations()] == ids
            assert client.handle_prediction(Prediction(id="p2", type="user_action", predicted_value="close",
                                                       confidence=0.9)) == []
            with pytest.raises(KeyError):
                other.claim(ids[0])
            with client.acquire("memory", 2) as claim:
                assert claim.preallocated and claim.allocation_id == ids[0]
        wait_for(lambda: not broker.held(), "the peers' ends")


def test_one_client_shared_by_threads(broker):
    import threading

    errors: list[BaseException] = []
    events: list = []
    with Client(broker.socket_path) as client:

        def work(subscribe: bool, name: str) -> None:
            try:
                if subscribe:  # the reader thread takes over the answers midway
                    client.on("resource:released", events.append)
                for _ in range(10):
                    # an application of its own: the others' preallocations are not its needs
                    with client.acquire("memory", 1, target_application=name) as claim:
                        memoryview(claim.resource)[0] = 7
                    aid = client.submit(ResourceRequest(ResourceType.MEMORY, 1))
                    assert client.wait_ready([aid], timeout=120)
                    assert client.release_allocation(aid)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i == 3, f"thread-{i}")) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert client.allocations() == []
        assert events  # the subscriber heard its releases
    wait_for(lambda: not broker.held(), "the client's end")


def test_out_of_descriptors_pauses_accepting_until_a_peer_ends(tmp_path):
    limit = 64  # the broker's descriptors: a dozen peers (3 each) beside the engine's own
    code = ("import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
            "sys.argv = ['prealloc', 'serve', '--socket', sys.argv[1]]; runpy.run_module('prealloc', run_name='__main__')"
            % (limit, limit))
    path = tmp_path / "emfile.sock"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.DEVNULL)
    hello = b'{"v": 1, "id": 1, "op": "hello"}'
    socks = []
    try:
        wait_for(lambda: proc.poll() is not None or _connectable(path), "the broker to listen")
        served = 0
        for _ in range(limit):  # more peers than descriptors
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(3)
            sock.connect(os.fspath(path))
            socks.append(sock)
            try:
                sock.send(hello)
                if not sock.recv(1 << 17):
                    break  # refused
            except (BrokenPipeError, ConnectionResetError):
                break  # accepted, then closed: no descriptor left for its pidfd or eventfd
            except TimeoutError:
                break  # waiting in the backlog: the descriptors ran out
            served += 1
        assert 0 < served < limit
        assert proc.poll() is None
        for sock in socks:
            sock.close()
        socks.clear()
        # the peers ended: accepting resumed, a new peer is served
        with Client(path, timeout=30) as client:
            assert client.server["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
        proc.wait()


def test_a_forked_child_does_not_speak_for_its_parent(broker):
    with Client(broker.socket_path) as client:
        aid = client.submit(ResourceRequest(ResourceType.MEMORY, 1))
        pid = os.fork()
        if pid == 0:  # the child: the inherited client is closed, a new one is its own peer
            try:
                ok = client.closed
                with Client(broker.socket_path) as own:
                    try:
                        own.get_allocation(aid)
                        ok = False
                    except KeyError:
                        pass
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.get_allocation(aid) is not None  # the parent's connection is untouched
        assert client.release_allocation(aid)


def test_adjust_before_the_claim_and_not_after_it(tmp_path):
    config = broker_config_from_dict({"quotas": {str(os.geteuid()): {"MEMORY": 6}}})
    with Broker(tmp_path / "adjust.sock", config=config) as broker:
        broker.start()
        with Client(broker.socket_path) as client:
            aid = client.submit(ResourceRequest(ResourceType.MEMORY, 2))
            assert client.wait_ready([aid], timeout=120)
            assert client.adjust_allocation(aid, 4) is True
            assert client.get_allocation(aid).allocated_amount == 4.0
            assert broker.usage() == {os.geteuid(): {ResourceType.MEMORY: 4.0}}
            with pytest.raises(QuotaExceeded):  # the growth is checked against the uid's quota
                client.adjust_allocation(aid, 8)
            assert broker.usage() == {os.geteuid(): {ResourceType.MEMORY: 4.0}}
            with client.claim(aid) as claim:
                assert len(claim.resource) == 4 * MiB
                with pytest.raises(ValueError, match="sealed"):
                    client.adjust_allocation(aid, 2)
            assert broker.usage() == {}


def test_client_socket_path_takes_the_users_variable_and_refuses_a_squatted_tmp_dir(monkeypatch, tmp_path):
    from prealloc import protocol

    named = tmp_path / "absent.sock"
    monkeypatch.setenv("PREALLOC_SOCKET", str(named))
    assert protocol.client_socket_path() == named  # named by the user: no fall-through
    squat = Path(f"/tmp/prealloc-broker-{os.geteuid()}")
    if squat.exists():
        pytest.skip(f"{squat} exists (a real broker's): left alone")
    squat.mkdir()
    try:
        squat.chmod(0o777)  # as another user who made it first would leave it
        with pytest.raises(PermissionError, match="refusing"):
            protocol._checked_tmp_socket(squat / "broker.sock")
        squat.chmod(0o700)
        assert protocol._checked_tmp_socket(squat / "broker.sock") == squat / "broker.sock"
    finally:
        squat.rmdir()
