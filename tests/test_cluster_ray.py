"""prealloc.cluster on a real (local) Ray cluster: placement groups place the bundles, each
bundle's node actor makes them real, and the OS says so (/proc/<actor pid>/status,
sched_getaffinity of the actor process).

One Ray start for the module: a simulated two-node cluster (ray.cluster_utils.Cluster,
head with 2 CPUs + a node with 1) where it starts, else ``ray.init(num_cpus=2)`` and the
SPREAD test skips saying why. Ray's session files and address file go under a temporary
directory of this test's own (RAY_TMPDIR), so root and an unprivileged user never share
/tmp/ray, and its auth token is one of ours in the environment (RAY_AUTH_TOKEN), so
nothing is written to a HOME that may not be writable.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'prealloc[ray]')")

from prealloc import AllocationStatus, Prediction, ResourceRequest, ResourceType  # noqa: E402
from prealloc.engine import PreallocatorConfig  # noqa: E402
from prealloc.translate import RuleTranslator  # noqa: E402

from osutil import proc_status_kib  # noqa: E402

MEMORY_MIB = 32
# A bound on waits that only guards against a hang: on a loaded 2-core box a Ray worker
# process takes seconds to start, so a bound of a minute failed a correct run
PATIENCE = 300.0
# A worker process that has not registered with its raylet within 60 s (Ray's default) is
# SIGTERMed and its task retried; on a loaded 2-CPU box a worker's start (importing Ray)
# took longer, and the retries never caught up. The bound only guards against a hang.
RAY_SYSTEM_CONFIG = {"worker_register_timeout_seconds": int(PATIENCE)}


def _gone(pid: int, timeout: float = PATIENCE) -> bool:
    """Whether /proc/<pid> disappears within timeout (a Ray worker exits, then is reaped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _ray_log_tails(lines: int = 40) -> str:
    """The ends of this Ray session's raylet and worker logs (for a failure message)."""
    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except Exception as exc:  # no session: nothing to show
        return f"(no Ray logs: {exc!r})"
    out = []
    for path in sorted(logs.glob("raylet*.out")) + sorted(logs.glob("worker-*.err"), key=os.path.getmtime)[-3:]:
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(out)


@pytest.fixture(scope="module")
def ray_cluster():
    """(cluster or None, reason the cluster is single-node or None)."""
    temp = tempfile.mkdtemp(prefix="pa-ray-")  # short: Ray's socket paths must fit 107 bytes
    # Ray's files under our directory; its token authentication with a token of ours in
    # the environment (Ray would write one to ~/.ray, which CI's unprivileged HOME is not)
    ours = {"RAY_TMPDIR": temp, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # (RAY_AUTH_MODE stays unset: ray.init then turns token mode on itself, refreshing
    # the config it read at import, and restoring removes what it set)
    saved = {name: os.environ.get(name) for name in (*ours, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ.update(ours)
    cluster = None
    single_reason = None
    try:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 << 20,
            "_system_config": RAY_SYSTEM_CONFIG})
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
    except Exception as exc:  # the simulated cluster did not start: one node, then
        single_reason = f"a simulated two-node Ray cluster did not start here: {type(exc).__name__}: {exc}"
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:
                pass
        cluster = None
        try:
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(temp, "ray"),
                     object_store_memory=80 << 20, _system_config=RAY_SYSTEM_CONFIG)
        except Exception as exc2:
            shutil.rmtree(temp, ignore_errors=True)
            pytest.skip(f"Ray cannot start here: {type(exc2).__name__}: {exc2}")
    yield cluster, single_reason
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def pre(ray_cluster):
    from prealloc.cluster import ClusterPreallocator

    cp = ClusterPreallocator(placement_timeout=PATIENCE, ready_timeout=PATIENCE)
    yield cp
    cp.close()


def _table_state(pg_id: str) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table()[pg_id]["state"]


def test_request_is_placed_and_made_real_then_released(pre):
    heard = []
    pre.on("resource:allocated", heard.append)
    request = pre.request_preallocation([ResourceRequest(ResourceType.MEMORY, MEMORY_MIB),
                                         ResourceRequest(ResourceType.CPU, 100)])
    assert request.wait(PATIENCE), f"not ready within {PATIENCE} s"
    assert request.status is AllocationStatus.ALLOCATED, request.failure_reason
    assert _table_state(request.placement_group_id) == "CREATED"
    memory, cpu = sorted(request.allocations, key=lambda a: a.resource_type)
    assert memory.status is cpu.status is AllocationStatus.ALLOCATED
    assert {a.allocation_id for a in heard} == {memory.allocation_id, cpu.allocation_id}
    pid = memory.details["node_pid"]
    assert pid == cpu.details["node_pid"] and pid != os.getpid()
    assert memory.details["node_id"] in {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    # the OS: the actor's process holds the populated memfd pages, and is pinned to the
    # cores its engine reserved
    held_shmem = proc_status_kib("RssShmem", pid)
    assert held_shmem >= MEMORY_MIB * 1024
    assert proc_status_kib("VmRSS", pid) >= MEMORY_MIB * 1024
    assert os.sched_getaffinity(pid) == set(cpu.details["cores"])
    assert len(cpu.details["cores"]) == 1

    assert pre.release(request)
    assert request.status is AllocationStatus.RELEASED
    assert all(a.status is AllocationStatus.RELEASED for a in request.allocations)
    # node reservations first: what the actor held after its engine released, from its own
    # /proc/self/status; then the placement group
    after = memory.details["node_after_release"]
    assert after["pid"] == pid
    assert after["RssShmem"] <= held_shmem - MEMORY_MIB * 1024 + 1024
    assert set(after["affinity"]) != set(cpu.details["cores"]) or len(os.sched_getaffinity(0)) == 1
    assert after["VmLck"] == 0
    assert _table_state(request.placement_group_id) == "REMOVED"
    assert _gone(pid), f"node actor {pid} still runs after the release"
    stats = pre.get_statistics()
    assert stats.total_requests == 2 and stats.successful_allocations == 2 and stats.released == 2
    assert stats.active_allocations == 0 and stats.in_flight == 0
    assert not pre.release(request)  # ended already


def test_claim_in_a_task_maps_the_node_memory_and_pins_the_task(ray_cluster):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from prealloc.cluster import ClusterPreallocator

    # the request comes from a prediction, through the engine config's translator
    rules = RuleTranslator.from_dict({"rule": [{
        "name": "shard", "match": {"type": "user_action", "value": "load_model"},
        "request": [{"resource_type": "MEMORY", "need": MEMORY_MIB, "duration": 600},
                    {"resource_type": "CPU", "need": 100, "duration": 600}]}]})
    pre = ClusterPreallocator(PreallocatorConfig(translator=rules, min_confidence=0.5), ready_timeout=PATIENCE)
    assert pre.handle_prediction(Prediction("p0", "user_action", "load_model", confidence=0.1)) is None
    assert pre.get_statistics().skipped_low_confidence == 1
    request = pre.handle_prediction(Prediction("p1", "user_action", "load_model", confidence=0.9),
                                    _placement("PACK", 1))
    assert request is not None and request.wait(PATIENCE), f"not ready within {PATIENCE} s"
    assert request.status is AllocationStatus.ALLOCATED, request.failure_reason
    assert request.expires_at is not None
    cpu = next(a for a in request.allocations if a.resource_type is ResourceType.CPU)

    @ray.remote(num_cpus=1)
    def consumer():
        from prealloc import cluster

        def proc_status_kib(field):  # the worker cannot import the test tree's osutil
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

        before = proc_status_kib("RssShmem")
        with cluster.claim("MEMORY") as memory:
            view = memory.resource
            mapped = proc_status_kib("RssShmem") - before  # MAP_POPULATE of the node's pages
            view[0] = 7
            view[len(view) - 1] = 9
            ends = (view[0], view[len(view) - 1], len(view))
            with cluster.claim("CPU") as cores:
                pinned = os.sched_getaffinity(0)
                held = sorted(cores.resource)
            view.release()
        return mapped, ends, held, sorted(pinned), sorted(os.sched_getaffinity(0)), os.getpid()

    # no retries: a retry of a task whose first run claimed the node's resources cannot do
    # better, and the first run's own error (with Ray's logs) is what a failure must show
    try:
        mapped, ends, held, pinned, after, task_pid = ray.get(consumer.options(
            max_retries=0, scheduling_strategy=PlacementGroupSchedulingStrategy(request.placement_group)).remote(),
            timeout=PATIENCE)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        raise AssertionError(f"the consumer task failed: {exc!r}\n{_ray_log_tails()}") from None
    assert ends == (7, 9, MEMORY_MIB << 20)
    assert mapped >= MEMORY_MIB * 1024 - 4  # the same shared pages, already there
    assert held == cpu.details["cores"] and pinned == held
    assert after != pinned or len(os.sched_getaffinity(0)) == 1  # restored at release
    # both claims were released by the consumer: the node ended them, the request follows
    assert request.wait_ended(30), "the request did not end after its consumer released every claim"
    assert all(a.status is AllocationStatus.RELEASED for a in request.allocations)
    assert all(a.details.get("claimed") for a in request.allocations)
    stats = pre.get_statistics()
    assert stats.claimed == 2 and stats.used == 2 and stats.resource_hit_rate == 1.0
    # the group stays for the tasks that may still run in it (removing a group kills the
    # tasks in its bundles: under load the consumer itself, between its release and its
    # return), until the request is released, its expiry time comes, or close
    assert _table_state(request.placement_group_id) == "CREATED"
    assert pre.release(request) is False  # the request had ended: only its group goes
    assert _table_state(request.placement_group_id) == "REMOVED"
    pre.close()


def test_expiry_releases_the_node_then_removes_the_group(pre):
    expired = []
    pre.on("resource:expired", expired.append)
    request = pre.request_preallocation(ResourceRequest(ResourceType.MEMORY, MEMORY_MIB, duration=1.0))
    assert request.wait(PATIENCE) and request.status is AllocationStatus.ALLOCATED, request.failure_reason
    (allocation,) = request.allocations
    pid = allocation.details["node_pid"]
    assert proc_status_kib("RssShmem", pid) >= MEMORY_MIB * 1024
    assert request.wait_ended(30), "the request did not expire"
    assert request.status is AllocationStatus.EXPIRED and allocation.status is AllocationStatus.EXPIRED
    assert [a.allocation_id for a in expired] == [allocation.allocation_id]
    assert _table_state(request.placement_group_id) == "REMOVED"
    assert _gone(pid)
    stats = pre.get_statistics()
    assert stats.expired == 1 and stats.active_allocations == 0 and stats.used == 0


def test_claim_outside_a_bundle_is_refused(ray_cluster):
    from prealloc import cluster

    with pytest.raises(LookupError, match="placement group"):
        cluster.claim("MEMORY")


def test_infeasible_request_fails_within_its_bound_with_rays_reason(ray_cluster):
    from prealloc.cluster import ClusterPreallocator

    with ClusterPreallocator(placement_timeout=2, ready_timeout=10) as cp:
        failed = []
        cp.on("resource:failed", failed.append)
        request = cp.request_preallocation(ResourceRequest(ResourceType.CPU, 6400))  # 64 cores
        assert request.wait(PATIENCE), "the placement bound did not end the request"
        assert request.status is AllocationStatus.FAILED
        assert "INFEASIBLE" in request.failure_reason and "not ready within 2 s" in request.failure_reason
        assert [a.status for a in failed] == [AllocationStatus.FAILED]
        assert failed[0].failure_reason == request.failure_reason
        assert _table_state(request.placement_group_id) == "REMOVED"
        stats = cp.get_statistics()
        assert stats.total_requests == 1 and stats.failed_allocations == 1 and stats.in_flight == 0


def test_spread_over_two_nodes_then_a_killed_node_actor_fails_its_bundle(pre, ray_cluster):
    """STRICT_SPREAD over the simulated cluster's two nodes (PACK on one node where the
    cluster did not start: the node actor's death is tested either way)."""
    cluster, single_reason = ray_cluster
    strategy = "STRICT_SPREAD" if cluster is not None else "PACK"
    request = pre.request_preallocation([ResourceRequest(ResourceType.MEMORY, MEMORY_MIB),
                                         ResourceRequest(ResourceType.CPU, 100)], _placement(strategy, 2))
    assert request.wait(PATIENCE) and request.status is AllocationStatus.ALLOCATED, request.failure_reason
    by_type = {t: sorted((a for a in request.allocations if a.resource_type is t),
                         key=lambda a: a.details["bundle_index"]) for t in (ResourceType.MEMORY, ResourceType.CPU)}
    first, second = by_type[ResourceType.MEMORY]
    cores = [set(a.details["cores"]) for a in by_type[ResourceType.CPU]]
    # two engines on one machine: the machine-wide registry keeps their exclusive cores apart
    assert not cores[0] & cores[1], cores
    for allocation, held in zip(by_type[ResourceType.CPU], cores):
        assert os.sched_getaffinity(allocation.details["node_pid"]) == held
    if cluster is not None:
        assert first.details["node_id"] != second.details["node_id"]
    dead_pid, other_pid = first.details["node_pid"], second.details["node_pid"]
    assert dead_pid != other_pid
    held_other = proc_status_kib("RssShmem", other_pid)
    assert proc_status_kib("RssShmem", dead_pid) >= MEMORY_MIB * 1024 and held_other >= MEMORY_MIB * 1024
    failed = []
    pre.on("resource:failed", failed.append)
    ray.kill(ray.get_actor(f"prealloc-bundle:{request.placement_group_id}:0", namespace="prealloc"))
    assert request.wait_ended(30), "the node actor's death did not end the request"
    assert request.status is AllocationStatus.FAILED
    assert "bundle 0's node actor died" in request.failure_reason
    assert first.status is AllocationStatus.FAILED and first.failure_reason == request.failure_reason
    assert sorted(a.allocation_id for a in failed) == sorted(
        a.allocation_id for a in request.allocations if a.details["bundle_index"] == 0)
    # the dead node's holdings went with its process; the other bundle was released first
    assert _gone(dead_pid)
    assert second.status is AllocationStatus.RELEASED
    assert second.details["node_after_release"]["RssShmem"] <= held_other - MEMORY_MIB * 1024 + 1024
    assert _table_state(request.placement_group_id) == "REMOVED"
    assert _gone(other_pid)
    if cluster is None:
        pytest.skip(f"SPREAD over two nodes not tested: {single_reason}")


def _placement(strategy: str, bundles: int):
    from prealloc.cluster import Placement

    return Placement(strategy=strategy, bundles=bundles)


def test_bad_input_is_refused_and_places_nothing(ray_cluster):
    from ray.util.placement_group import placement_group_table

    from prealloc.cluster import ClusterPreallocator, Placement

    groups = len(placement_group_table())
    with ClusterPreallocator() as cp:
        with pytest.raises(ValueError, match="placement strategy"):
            cp.request_preallocation(ResourceRequest(ResourceType.MEMORY, 8), Placement(strategy="NEAR"))
        with pytest.raises(ValueError, match="bundles"):
            cp.request_preallocation(ResourceRequest(ResourceType.MEMORY, 8), Placement(bundles=0))
        with pytest.raises(ValueError, match="requests"):
            cp.request_preallocation([])
        with pytest.raises(ValueError, match="predicted_need"):
            cp.request_preallocation(ResourceRequest(ResourceType.MEMORY, -1))
        with pytest.raises(TypeError, match="requests must be ResourceRequest"):
            cp.request_preallocation(["MEMORY"])
        with pytest.raises(ValueError, match="no translator"):
            cp.handle_prediction(Prediction("p", "user_action", "x", confidence=1.0))
        assert cp.get_statistics().total_requests == 0
    with pytest.raises(ValueError, match="placement_timeout"):
        ClusterPreallocator(placement_timeout=0)
    assert len(placement_group_table()) == groups


def test_bundle_resources_carry_what_ray_schedules_by(ray_cluster):
    from prealloc.cluster import bundle_resources

    requests = [ResourceRequest(ResourceType.CPU, 250), ResourceRequest(ResourceType.MEMORY, 64),
                ResourceRequest(ResourceType.CACHE_SPACE, 100), ResourceRequest(ResourceType.GPU, 1024)]
    assert bundle_resources(requests) == {"CPU": 3.0, "memory": float(64 << 20), "GPU": 1.0}
    advertised = {"CPU": 8, "prealloc_cache_mib": 4096, "prealloc_gpu_mib": 8192}
    assert bundle_resources(requests, advertised) == {
        "CPU": 3.0, "memory": float(64 << 20), "GPU": 1.0, "prealloc_cache_mib": 100.0,
        "prealloc_gpu_mib": 1024.0}
    assert bundle_resources([ResourceRequest(ResourceType.CACHE_SPACE, 10)]) == {"CPU": 0.001}
