"""Preallocation across a Ray cluster: Ray places the bundles, each node's prealloc makes
them real.

We build no scheduler, transport or registry. A :class:`ClusterPreallocator` turns the
spec's ``Prediction`` / ``ResourceRequest`` (through the translator of the engine config)
into one Ray placement group whose bundles carry what Ray schedules by — ``CPU`` (whole
cores), ``memory`` (bytes), ``GPU`` — and prealloc's own custom resources where the
cluster advertises them (``prealloc_cache_mib``, ``prealloc_disk_mib``,
``prealloc_net_mbit``, ``prealloc_gpu_mib``: ``ray start --resources='{...}'``; a kind no
node advertises is left out of the bundle, because Ray would call the group infeasible).

One request, in order:

1. ``placement_group(bundles, strategy)`` and ``ray.wait([pg.ready()], timeout=...)``:
   a bound, since an infeasible group waits forever otherwise. Not ready in time: the
   request ends FAILED with the reason read from ``placement_group_table`` (state,
   scheduling state, e.g. ``INFEASIBLE``) and the group is removed.
2. One small actor per bundle (``PlacementGroupSchedulingStrategy``, ``num_cpus=0``: it
   takes nothing a task of the bundle needs) runs a node engine that makes the bundle
   real on its node with prealloc's strategies: memory mapped and populated (memfd
   backed, so it can be handed over), cores reserved and the actor's own process pinned
   to them, page cache warmed, GPU memory mapped where there is a GPU. Each reports one
   ``ResourceAllocation`` per request of the bundle, with the node id in ``details``.
3. Release (or expiry) releases every node's reservations first, then removes the group.
   A node actor that dies (its node went, or ``ray.kill``) fails its bundle's
   allocations with Ray's reason; the other bundles of the request are released and the
   group removed, so nothing stays reserved elsewhere for a request that cannot run.

The node engine. Where no machine broker (``prealloc serve``) runs, the node actor embeds
the engine: its own ``ResourcePreallocator`` in its own process (:class:`EmbeddedNodeEngine`).
It is the only piece that touches the node's resources; :class:`NodeEngine` is the
contract, so a broker client can take its place (``ClusterPreallocator(node_engine=...)``)
without the cluster side changing. Embedded, two bundles placed on one node run two
engines: Ray keeps their CPU counts within the node's, and the CPU strategy's
machine-wide registry (prealloc.machine_registry, a flock per core) keeps their exclusive
cores apart — among the processes of one uid, which Ray's workers are.

Claim. ``prealloc.cluster.claim()`` inside a task or actor scheduled into the bundle gets
its node's resource. Ray cannot pass file descriptors, and a buffer in the node actor's
process cannot be mapped by another process unless it is shared, so MEMORY is a memfd and
the task opens it as ``/proc/<actor pid>/fd/<n>`` — same node, same uid (Ray's workers
are), permitted by the kernel's ptrace *read* check (Yama restricts only attach) — and
maps it with ``MAP_POPULATE``: the very pages the actor populated, zero-copy, no
re-zeroing. We chose that over running the consumer as a method of the node actor
because any task of the bundle can claim, with its own code and its own process; the
price is that a kernel with ``hidepid`` or a task of another uid cannot open the path (the
claim then fails saying so; the broker hands fds over SCM_RIGHTS instead). CPU: the node
engine pins the claiming task's process to the reserved cores (journaled, restored at
release). Other types are node-side (warm page cache serves every process of the node).

Threads: requests are placed and made real on a small pool of the preallocator's; one
watcher thread per live request waits (``ray.wait``, no polling) on each node actor's
``watch()``, which returns at release and raises when the actor dies.
"""
from __future__ import annotations

import enum
import itertools
import logging
import math
import mmap
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

try:
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group,
        placement_group_table,
        remove_placement_group,
    )
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("prealloc.cluster needs Ray: pip install 'prealloc[ray]'") from exc

from ._threads import QuietThreadPoolExecutor, start_quiet
from .engine import PreallocatorConfig, ResourcePreallocator
from .events import ALLOCATED, EXPIRED, FAILED, RELEASED, EventEmitter, canonical_event
from .types import (
    AllocationFeedback,
    AllocationStatus,
    PreallocatorStatistics,
    Prediction,
    ResourceAllocation,
    ResourceRequest,
    ResourceType,
)

log = logging.getLogger(__name__)

__all__ = [
    "PlacementStrategy", "Placement", "ClusterRequest", "ClusterPreallocator", "NodeEngine",
    "EmbeddedNodeEngine", "BundleClaim", "claim", "bundle_resources", "NAMESPACE",
]

MiB = 1 << 20
NAMESPACE = "prealloc"  # the node actors' Ray namespace (claim() finds them by name there)

# prealloc's own Ray custom resources, per type: put into a bundle only where some node
# advertises it (``ray start --resources='{"prealloc_cache_mib": 4096}'``)
CUSTOM_RESOURCES: Mapping[ResourceType, str] = {
    ResourceType.CACHE_SPACE: "prealloc_cache_mib",
    ResourceType.DISK_IO: "prealloc_disk_mib",
    ResourceType.NETWORK_BANDWIDTH: "prealloc_net_mbit",
    ResourceType.GPU: "prealloc_gpu_mib",
}


class PlacementStrategy(str, enum.Enum):
    """Ray's placement group strategies, by their names."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"

    @classmethod
    def parse(cls, value: PlacementStrategy | str) -> PlacementStrategy:
        if isinstance(value, PlacementStrategy):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        raise ValueError(f"placement strategy must be one of {[s.value for s in cls]}, not {value!r}")


@dataclass(slots=True)
class Placement:
    """Where a request's bundles go. ``bundles``: how many bundles of the request's shape
    (every bundle gets a copy of the requests: one per shard, replica or worker); or
    ``shapes``: each bundle's own list of requests (then ``bundles`` is their number)."""

    strategy: PlacementStrategy | str = PlacementStrategy.PACK
    bundles: int = 1
    shapes: Sequence[Sequence[ResourceRequest]] | None = None

    def validate(self) -> Placement:
        self.strategy = PlacementStrategy.parse(self.strategy)
        if self.shapes is not None:
            if isinstance(self.shapes, (str, bytes)) or not isinstance(self.shapes, Sequence) or not self.shapes:
                raise ValueError("placement shapes must be a non-empty list of lists of ResourceRequest")
            for i, shape in enumerate(self.shapes):
                if not isinstance(shape, Sequence) or not shape \
                        or not all(isinstance(r, ResourceRequest) for r in shape):
                    raise ValueError(f"placement shapes[{i}] must be a non-empty list of ResourceRequest")
            self.bundles = len(self.shapes)
        if isinstance(self.bundles, bool) or not isinstance(self.bundles, int) or not 0 < self.bundles <= 10_000:
            raise ValueError(f"placement bundles must be an int in 1..10000, not {self.bundles!r}")
        return self


def bundle_resources(requests: Iterable[ResourceRequest],
                     advertised: Mapping[str, float] | None = None) -> dict[str, float]:
    """The Ray resources of one bundle holding requests: CPU as whole cores (the CPU
    strategy reserves ceil(need / 100)), memory in bytes, GPU as one device per bundle
    with GPU memory, and prealloc's custom resources (CUSTOM_RESOURCES) where advertised
    names them (the cluster's resources; None: none advertised)."""
    shape: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        if value > 0:
            shape[name] = shape.get(name, 0.0) + value

    for request in requests:
        rtype, need = request.resource_type, request.predicted_need
        if rtype is ResourceType.CPU:
            add("CPU", float(math.ceil(need / 100.0)))
        elif rtype is ResourceType.MEMORY:
            add("memory", float(math.ceil(need * MiB)))
        elif rtype is ResourceType.GPU:
            shape["GPU"] = 1.0
        name = CUSTOM_RESOURCES.get(rtype)
        if name is not None and advertised is not None and name in advertised:
            add(name, float(math.ceil(need)))
    if not shape:
        # Ray refuses an empty bundle; a request of types Ray does not schedule by still
        # needs a node, and a tiny CPU share takes no whole core from anyone
        shape["CPU"] = 0.001
    return shape


# ----------------------------------------------------------------------------- node side

class NodeEngine(Protocol):
    """What a node actor asks of its node's prealloc (the seam: embedded engine today, a
    client of the node's broker where one runs). All amounts and snapshots are the spec's."""

    def reserve(self, requests: Sequence[ResourceRequest], timeout: float) -> list[ResourceAllocation]: ...

    def snapshots(self) -> list[ResourceAllocation]: ...

    def claim(self, resource_type: ResourceType, consumer_pid: int) -> dict[str, Any]: ...

    def release_claim(self, node_allocation_id: int, feedback: AllocationFeedback | None) -> bool: ...

    def wait_all_ended(self, timeout: float | None = None) -> bool: ...

    def statistics(self) -> PreallocatorStatistics: ...

    def close(self) -> None: ...


class _SharedMemoryPreallocator(ResourcePreallocator):
    """The node's engine: the built-in strategies of the bundle's types (a node actor
    lives for one bundle, so it starts no strategy, monitor or NVML probe it will never
    use), MEMORY memfd-backed (handed over by /proc/<pid>/fd, see the module docstring)."""

    def __init__(self, *, lock_memory: bool, types: frozenset[ResourceType], **overrides: Any) -> None:
        self._lock_memory = lock_memory
        self._types = types
        super().__init__(**overrides)

    def _default_monitors(self) -> dict[ResourceType, Any]:
        if ResourceType.GPU in self._types:
            return super()._default_monitors()
        from .monitors import SystemResourceMonitor

        monitor = SystemResourceMonitor()
        return {t: monitor for t in monitor.supported_types}

    def _default_strategies(self) -> dict[ResourceType, Any]:
        from .strategies import CpuAllocationStrategy, MemoryAllocationStrategy

        if self._types <= {ResourceType.MEMORY, ResourceType.CPU}:
            strategies: dict[ResourceType, Any] = {}
            if ResourceType.CPU in self._types:
                strategies[ResourceType.CPU] = CpuAllocationStrategy()
        else:
            strategies = super()._default_strategies()
        strategies[ResourceType.MEMORY] = MemoryAllocationStrategy(shareable=True, lock=self._lock_memory)
        return strategies


class EmbeddedNodeEngine:
    """A ResourcePreallocator in the node actor's own process, started at the first
    reserve with the strategies of the bundle's types."""

    def __init__(self, *, lock_memory: bool = False) -> None:
        self._lock_memory = lock_memory
        self._pre: _SharedMemoryPreallocator | None = None
        self._ids: list[int] = []
        self._claims: dict[int, Any] = {}
        self._claimed: set[int] = set()  # ever claimed
        self._ended: dict[int, ResourceAllocation] = {}  # the last snapshot of each that ended
        self._lock = threading.Lock()
        self._all_ended = threading.Event()
        self.start_s = 0.0

    def _engine(self) -> _SharedMemoryPreallocator:
        if self._pre is None:
            raise RuntimeError("the node engine has reserved nothing yet")
        return self._pre

    def _on_end(self, allocation: ResourceAllocation) -> None:
        # the engine's worker or a releasing thread: only bookkeeping here
        with self._lock:
            if allocation.allocation_id in self._ids:
                self._ended[allocation.allocation_id] = allocation
                if len(self._ended) == len(self._ids):
                    self._all_ended.set()

    def reserve(self, requests: Sequence[ResourceRequest], timeout: float) -> list[ResourceAllocation]:
        if self._pre is not None:
            raise RuntimeError("a node engine reserves one bundle, once")
        start = time.perf_counter()
        self._pre = _SharedMemoryPreallocator(lock_memory=self._lock_memory,
                                              types=frozenset(r.resource_type for r in requests))
        for event in (RELEASED, EXPIRED, FAILED):
            self._pre.on(event, self._on_end)
        self.start_s = time.perf_counter() - start
        me = os.getpid()
        for request in requests:
            request = replace(request, metadata=replace(request.metadata))
            if request.resource_type is ResourceType.CPU:
                # a pid of the driver's machine means nothing here: the cores are shown
                # real by pinning this actor's process; a claim pins the consumer
                request.metadata.target_process_id = me
            else:
                request.metadata.target_process_id = None
            with self._lock:
                self._ids.append(self._pre.submit(request))
        self._pre.wait_ready(self._ids, timeout=timeout)
        return self.snapshots()

    def snapshots(self) -> list[ResourceAllocation]:
        """Every allocation of the bundle: live ones read now, ended ones as they ended
        (a request dropped before it was allocated is left out)."""
        if self._pre is None:
            return []
        out = []
        for node_id in self._ids:
            snap = self._engine().get_allocation(node_id)
            if snap is None:
                with self._lock:
                    snap = self._ended.get(node_id)
            if snap is not None:
                snap.details = {**snap.details, "claimed": node_id in self._claimed}
                out.append(snap)
        return out

    def claim(self, resource_type: ResourceType, consumer_pid: int) -> dict[str, Any]:
        with self._lock:
            for node_id in self._ids:
                snap = self._engine().get_allocation(node_id)
                if snap is None or snap.resource_type is not resource_type \
                        or snap.status is not AllocationStatus.ALLOCATED:
                    continue
                if resource_type is ResourceType.CPU:
                    held = self._engine().claim(node_id, target_process_id=consumer_pid)
                else:
                    held = self._engine().claim(node_id)
                self._claims[node_id] = held
                self._claimed.add(node_id)
                handover: dict[str, Any] = {"node_allocation_id": node_id, "pid": os.getpid(),
                                            "resource_type": resource_type.name,
                                            "amount": snap.allocated_amount}
                if resource_type is ResourceType.MEMORY:
                    region = held.resource
                    handover.update(fd=region.fd, size=region.size)
                elif resource_type is ResourceType.CPU:
                    handover.update(cores=sorted(held.resource))
                return handover
        raise LookupError(f"no ready {resource_type.name} reservation left on this bundle")

    def release_claim(self, node_allocation_id: int, feedback: AllocationFeedback | None) -> bool:
        with self._lock:
            held = self._claims.pop(node_allocation_id, None)
        return held is not None and held.release(feedback)

    def wait_all_ended(self, timeout: float | None = None) -> bool:
        """Blocks until every allocation of the bundle has ended (claims released,
        expiries); False on timeout."""
        return self._all_ended.wait(timeout)

    def statistics(self) -> PreallocatorStatistics:
        return self._engine().get_statistics()

    def close(self) -> None:
        with self._lock:
            self._claims.clear()
        if self._pre is not None:
            self._pre.close()  # releases everything, restores every pin
        self._all_ended.set()


class _BundleNode:
    """The node actor of one bundle (a Ray actor class: made with ``ray.remote`` below)."""

    def __init__(self, engine_factory: Callable[[], NodeEngine]) -> None:
        self._engine = engine_factory()

    def reserve(self, requests: list[ResourceRequest], timeout: float) -> list[ResourceAllocation]:
        node = ray.get_runtime_context().get_node_id()
        start = time.perf_counter()
        snaps = self._engine.reserve(requests, timeout)
        engine_start_s = float(getattr(self._engine, "start_s", 0.0))
        reserve_s = time.perf_counter() - start - engine_start_s
        for snap in snaps:
            snap.details = {**snap.details, "node_id": node, "node_pid": os.getpid(),
                            "node_allocation_id": snap.allocation_id,
                            "node_engine_start_s": engine_start_s, "node_reserve_s": reserve_s}
        return snaps

    def snapshots(self) -> list[ResourceAllocation]:
        return self._engine.snapshots()

    def node(self) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def claim(self, resource_type: str, consumer_pid: int) -> dict[str, Any]:
        handover = self._engine.claim(ResourceType.parse(resource_type), consumer_pid)
        handover["node_id"] = ray.get_runtime_context().get_node_id()
        return handover

    def release_claim(self, node_allocation_id: int, feedback: AllocationFeedback | None = None) -> bool:
        return self._engine.release_claim(node_allocation_id, feedback)

    def statistics(self) -> PreallocatorStatistics:
        return self._engine.statistics()

    def release(self) -> tuple[list[ResourceAllocation], dict[str, Any]]:
        """Releases every reservation of the bundle; returns the last snapshots and what
        this process holds after the release, read from the OS (VmRSS, VmLck, RssShmem
        in KiB from /proc/self/status; the CPU affinity)."""
        last = self._engine.snapshots()
        self._engine.close()
        facts: dict[str, Any] = {"pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0))}
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmLck", "RssShmem"):
                    facts[key] = int(line.split()[1])
        return last, facts

    def watch(self) -> list[ResourceAllocation]:
        """Returns the bundle's snapshots once every allocation of it has ended (claims
        released, expiries, or the bundle released); raises (RayActorError at the caller)
        when the actor dies first. The caller's ray.wait on it is the death notice."""
        self._engine.wait_all_ended()
        return self._engine.snapshots()


BundleNode: Any = ray.remote(_BundleNode)


# ----------------------------------------------------------------------------- driver side

@dataclass(slots=True)
class ClusterRequest:
    """One request across the cluster: its bundles, placement group and allocations
    (one ResourceAllocation per request per bundle, ``details['bundle_index']``,
    ``details['node_id']``)."""

    request_id: int
    placement: Placement
    shapes: list[list[ResourceRequest]]
    status: AllocationStatus = AllocationStatus.PENDING
    failure_reason: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    placement_ready_at: float | None = None
    placement_group_id: str | None = None
    allocations: list[ResourceAllocation] = field(default_factory=list)
    expires_at: float | None = None
    _pg: Any = None
    _group_kept: bool = False  # ended by its consumers: the group outlives the request
    _nodes: list[Any] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _settled: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request is ALLOCATED or ended; False on timeout."""
        return self._settled.wait(timeout)

    @property
    def placement_group(self) -> Any:
        """Ray's PlacementGroup (for ``PlacementGroupSchedulingStrategy``); None before
        it was created."""
        return self._pg

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Blocks until the request has ended (released, expired, failed); False on timeout."""
        return self._done.wait(timeout)


_allocation_ids = itertools.count(1)


class ClusterPreallocator:
    """The spec's preallocator across a Ray cluster (see the module docstring).

    config: the engine config; its ``translator`` turns predictions into requests.
    placement_timeout: the bound on a placement group becoming ready (seconds).
    ready_timeout: the bound on the node actors making the bundles real.
    node_engine: makes a node's engine inside each node actor (default: the embedded
    engine; a broker client later). lock_memory: mlock the node's memory where allowed.
    Ray must be initialised (``ray.init``) before the first request."""

    def __init__(self, config: PreallocatorConfig | None = None, *, placement_timeout: float = 30.0,
                 ready_timeout: float = 60.0, node_engine: Callable[[], NodeEngine] | None = None,
                 lock_memory: bool = False, workers: int = 4) -> None:
        if config is not None and not isinstance(config, PreallocatorConfig):
            raise TypeError(f"config must be a PreallocatorConfig, not {type(config).__name__}")
        for name, value in (("placement_timeout", placement_timeout), ("ready_timeout", ready_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise ValueError(f"{name} must be a number of seconds in (0, 1e6), not {value!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, not {workers!r}")
        if not isinstance(lock_memory, bool):
            raise TypeError(f"lock_memory must be a bool, not {type(lock_memory).__name__}")
        self.config = (replace(config) if config is not None else PreallocatorConfig()).validate()
        self.placement_timeout = float(placement_timeout)
        self.ready_timeout = float(ready_timeout)
        if node_engine is None:
            def node_engine() -> NodeEngine:
                return EmbeddedNodeEngine(lock_memory=lock_memory)
        elif not callable(node_engine):
            raise TypeError("node_engine must be a callable that makes a NodeEngine")
        self._node_engine = node_engine
        self.events = EventEmitter()
        self._lock = threading.Lock()
        self._requests: dict[int, ClusterRequest] = {}
        self._ids = itertools.count(1)
        self._pool = QuietThreadPoolExecutor(max_workers=workers, thread_name_prefix="prealloc-cluster")
        self._timers: dict[int, threading.Timer] = {}
        self._closed = False
        self._tally = PreallocatorStatistics()
        self._allocation_time_total = 0.0

    # -- the API ---------------------------------------------------------------------

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        self.events.on(canonical_event(event), listener)
        return listener

    def off(self, event: str, listener: Callable[..., Any]) -> bool:
        return bool(self.events.off(canonical_event(event), listener))

    def handle_prediction(self, prediction: Prediction, placement: Placement | None = None) -> ClusterRequest | None:
        """Translates a prediction with the config's translator and places its requests
        (one bundle shape) as ``placement`` says. None when it is below min_confidence
        or translates to nothing."""
        self._check_open()
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        prediction.validate()
        if prediction.confidence < self.config.min_confidence:
            with self._lock:
                self._tally.skipped_low_confidence += 1
            return None
        translator = self.config.translator
        if translator is None:
            raise ValueError("no translator configured: give PreallocatorConfig(translator=...)")
        requests = list(translator.translate(prediction))
        if not requests:
            return None
        return self.request_preallocation(requests, placement)

    def request_preallocation(self, requests: ResourceRequest | Sequence[ResourceRequest] | None = None,
                              placement: Placement | None = None) -> ClusterRequest:
        """Places the requests (the shape of every bundle; or placement.shapes) and makes
        them real on their nodes, on the preallocator's pool: returns at once, PENDING;
        ``wait_ready`` / ``request.wait`` until it is ALLOCATED or FAILED. ValueError /
        TypeError for bad input (nothing is placed)."""
        self._check_open()
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call ray.init() (or ray.init(address=...)) first")
        placement = replace(placement) if placement is not None else Placement()
        if not isinstance(placement, Placement):
            raise TypeError(f"placement must be a Placement, not {type(placement).__name__}")
        placement.validate()
        if placement.shapes is not None:
            if requests is not None:
                raise ValueError("give requests or placement.shapes, not both")
            shapes = [[replace(r, metadata=replace(r.metadata)).validate() for r in shape]
                      for shape in placement.shapes]
        else:
            if isinstance(requests, ResourceRequest):
                requests = [requests]
            if requests is None or not isinstance(requests, Sequence) or not requests:
                raise ValueError("requests must be a ResourceRequest or a non-empty list of them")
            for r in requests:
                if not isinstance(r, ResourceRequest):
                    raise TypeError(f"requests must be ResourceRequest, not {type(r).__name__}")
                r.validate()
            shapes = [[replace(r, metadata=replace(r.metadata)) for r in requests]
                      for _ in range(placement.bundles)]
        with self._lock:
            self._check_open()
            request = ClusterRequest(next(self._ids), placement, shapes)
            self._requests[request.request_id] = request
            count = sum(len(s) for s in shapes)
            self._tally.total_requests += count
            self._tally.in_flight += count
        self._pool.submit(self._place, request)
        return request

    def wait_ready(self, request: ClusterRequest | int, timeout: float | None = None) -> bool:
        return self._lookup(request).wait(timeout)

    def get_request(self, request: ClusterRequest | int, *, refresh: bool = False) -> ClusterRequest:
        """The request; refresh=True first reads each live bundle's allocations from its
        node (claims happen there, between the task and its node actor)."""
        found = self._lookup(request)
        if refresh and found.status in (AllocationStatus.ALLOCATED, AllocationStatus.ACTIVE):
            self._refresh(found)
        return found

    def allocations(self, *statuses: AllocationStatus) -> list[ResourceAllocation]:
        with self._lock:
            requests = list(self._requests.values())
        out = [a for r in requests for a in r.allocations]
        return [a for a in out if a.status in statuses] if statuses else out

    def release(self, request: ClusterRequest | int, feedback: AllocationFeedback | None = None) -> bool:
        """Releases the nodes' reservations, then removes the placement group. False if
        the request had ended already (its consumers released every claim: its group,
        kept for their tasks, is removed now)."""
        found = self._lookup(request)
        if feedback is not None:
            feedback.validate()
        found._settled.wait(self.placement_timeout + self.ready_timeout + 10)
        return self._finish(found, AllocationStatus.RELEASED, None, feedback)

    def get_statistics(self) -> PreallocatorStatistics:
        """The tally over bundle allocations (one per request per bundle); ``claimed``
        counts claims reported by the nodes of live requests at their last refresh."""
        with self._lock:
            stats = replace(self._tally, allocations_by_type=dict(self._tally.allocations_by_type),
                            waste_rate_by_type={})
            done = stats.successful_allocations
            stats.average_allocation_time = self._allocation_time_total / done if done else 0.0
            finished = stats.finished
            stats.resource_hit_rate = stats.used / finished if finished else 0.0
        return stats

    def node_statistics(self, request: ClusterRequest | int) -> list[PreallocatorStatistics]:
        """Each live bundle's node engine tally, in bundle order."""
        found = self._lookup(request)
        return ray.get([node.statistics.remote() for node in found._nodes])

    def close(self) -> None:
        """Releases every live request (nodes first, then groups) and stops the pool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = [r for r in self._requests.values() if not r.status.is_final or r._group_kept]
        for request in live:
            request._settled.wait(self.placement_timeout + self.ready_timeout + 10)
            self._finish(request, AllocationStatus.RELEASED, None, None)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ClusterPreallocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the work --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cluster preallocator is closed")

    def _lookup(self, request: ClusterRequest | int) -> ClusterRequest:
        rid = request.request_id if isinstance(request, ClusterRequest) else request
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise TypeError(f"request must be a ClusterRequest or its int id, not {type(request).__name__}")
        with self._lock:
            found = self._requests.get(rid)
        if found is None:
            raise KeyError(f"no cluster request {rid}")
        return found

    def _place(self, request: ClusterRequest) -> None:
        try:
            advertised = ray.cluster_resources()
            bundles = [bundle_resources(shape, advertised) for shape in request.shapes]
            pg = placement_group(bundles, strategy=PlacementStrategy.parse(request.placement.strategy).value)
            request._pg = pg
            request.placement_group_id = pg.id.hex()
            ready, _ = ray.wait([pg.ready()], timeout=self.placement_timeout)
            if not ready:
                self._finish(request, AllocationStatus.FAILED, self._placement_failure(pg, bundles), None)
                return
            request.placement_ready_at = time.monotonic()
            self._make_real(request, pg)
        except Exception as exc:  # a Ray error must end the request, never the pool thread
            log.exception("cluster request %d failed", request.request_id)
            self._finish(request, AllocationStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
        finally:
            request._settled.set()

    def _placement_failure(self, pg: PlacementGroup, bundles: list[dict[str, float]]) -> str:
        try:
            table = placement_group_table(pg)
        except Exception as exc:  # the table itself unreachable: say so
            return f"placement group not ready within {self.placement_timeout:g} s (table unreadable: {exc})"
        stats = table.get("stats") or {}
        return (f"placement group {table.get('placement_group_id')} not ready within "
                f"{self.placement_timeout:g} s: state {table.get('state')}, scheduling state "
                f"{stats.get('scheduling_state')}; bundles {bundles}, strategy {table.get('strategy')}; "
                f"cluster resources {_plain_resources(ray.cluster_resources())}")

    def _make_real(self, request: ClusterRequest, pg: PlacementGroup) -> None:
        nodes = []
        for index in range(len(request.shapes)):
            options: dict[str, Any] = dict(
                name=node_actor_name(request.placement_group_id or "", index), namespace=NAMESPACE,
                # max_concurrency: watch() waits while claims, snapshots and release are served
                num_cpus=0, max_concurrency=8, max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=False))
            if any(r.resource_type is ResourceType.GPU for r in request.shapes[index]):
                # num_gpus=0 would hide every device (CUDA_VISIBLE_DEVICES=""): the node's
                # engine must see the node's GPUs to reserve memory on one
                options["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
            nodes.append(BundleNode.options(**options).remote(self._node_engine))
        request._nodes = nodes
        refs = [node.reserve.remote(shape, self.ready_timeout) for node, shape in zip(nodes, request.shapes)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.ready_timeout + 10)
        allocations: list[ResourceAllocation] = []
        reasons = []
        if len(ready) < len(refs):
            reasons.append(f"{len(refs) - len(ready)} of {len(refs)} bundles not made real within "
                           f"{self.ready_timeout:g} s")
        for index, ref in enumerate(refs):
            if ref not in ready:
                continue
            try:
                snaps = ray.get(ref)
            except Exception as exc:
                reasons.append(f"bundle {index}: {type(exc).__name__}: {exc}")
                continue
            for snap in snaps:
                allocations.append(self._as_cluster_allocation(request, index, snap))
                if snap.status is not AllocationStatus.ALLOCATED:
                    reasons.append(f"bundle {index} {snap.resource_type.name}: "
                                   f"{snap.failure_reason or snap.status.name}")
            if len(snaps) < len(request.shapes[index]):
                reasons.append(f"bundle {index}: {len(request.shapes[index]) - len(snaps)} requests ended "
                               "before they were allocated (dropped at their deadline or refused)")
        request.allocations = allocations
        if reasons:
            self._finish(request, AllocationStatus.FAILED, "; ".join(reasons), None)
            return
        now = time.monotonic()
        durations = [r.duration for shape in request.shapes for r in shape if r.duration is not None]
        with self._lock:
            if request.status is not AllocationStatus.PENDING:  # released or closed meanwhile
                return
            request.status = AllocationStatus.ALLOCATED
            request.ready_at = now
            count = len(allocations)
            self._tally.in_flight -= count
            self._tally.successful_allocations += count
            self._tally.active_allocations += count
            self._allocation_time_total += (now - request.created_at) * count
            for a in allocations:
                self._tally.allocations_by_type[a.resource_type] = \
                    self._tally.allocations_by_type.get(a.resource_type, 0) + 1
            if durations and len(durations) == count:
                request.expires_at = now + max(durations)
                timer = threading.Timer(max(durations), self._expire, (request,))
                timer.daemon = True
                self._timers[request.request_id] = timer
                start_quiet(timer)
        for a in allocations:
            self.events.emit(ALLOCATED, a)
        start_quiet(threading.Thread(target=self._watch, args=(request,), daemon=True,
                                     name=f"prealloc-cluster-watch-{request.request_id}"))

    def _as_cluster_allocation(self, request: ClusterRequest, index: int,
                               snap: ResourceAllocation) -> ResourceAllocation:
        details = dict(snap.details)
        details.update(bundle_index=index, placement_group_id=request.placement_group_id,
                       cluster_request_id=request.request_id)
        # the node's monotonic instants are another machine's clock: kept in details
        details.update(node_allocated_at=snap.allocated_at, node_expires_at=snap.expires_at)
        return replace(snap, allocation_id=next(_allocation_ids), details=details,
                       allocated_at=time.monotonic() if snap.status is AllocationStatus.ALLOCATED else None,
                       expires_at=None)

    def _refresh(self, request: ClusterRequest) -> None:
        try:
            per_node = ray.get([node.snapshots.remote() for node in request._nodes], timeout=10)
        except Exception as exc:  # a dead node: the watcher ends the request
            log.debug("refresh of request %d: %s", request.request_id, exc)
            return
        self._update(request, {index: snaps for index, snaps in enumerate(per_node)})

    def _update(self, request: ClusterRequest, per_node: Mapping[int, list[ResourceAllocation]]) -> None:
        """Takes the nodes' snapshots in: claims and the ends the nodes saw (a claim
        released by its consumer, a node-side expiry), counted at that transition."""
        ended: list[tuple[str, ResourceAllocation]] = []
        with self._lock:
            by_node = {(a.details["bundle_index"], a.details["node_allocation_id"]): a
                       for a in request.allocations}
            for index, snaps in per_node.items():
                for snap in snaps:
                    mine = by_node.get((index, snap.allocation_id))
                    if mine is None or mine.status.is_final:
                        continue
                    if snap.details.get("claimed") and not mine.details.get("claimed"):
                        mine.details["claimed"] = True
                        self._tally.claimed += 1
                    mine.allocated_amount = snap.allocated_amount
                    mine.feedback = snap.feedback
                    if snap.status.is_final:
                        ended.append((self._end_allocation(mine, snap.status, snap.failure_reason), mine))
                    else:
                        mine.status = snap.status
        for event, a in ended:
            self.events.emit(event, a)

    def _end_allocation(self, a: ResourceAllocation, status: AllocationStatus, reason: str | None) -> str:
        """One live allocation ends (under self._lock); returns its event."""
        a.status = status
        a.failure_reason = reason if status is AllocationStatus.FAILED else a.failure_reason
        self._tally.active_allocations -= 1
        self._tally.finished += 1
        self._tally.preallocations_finished += 1
        used = bool(a.details.get("claimed")) or bool(a.feedback and a.feedback.used_successfully)
        self._tally.used += used
        if status is AllocationStatus.EXPIRED:
            self._tally.expired += 1
            return EXPIRED
        if status is AllocationStatus.FAILED:
            return FAILED
        self._tally.released += 1
        return RELEASED

    def _watch(self, request: ClusterRequest) -> None:
        pending = {node.watch.remote(): index for index, node in enumerate(request._nodes)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    snaps = ray.get(ref)
                except Exception as exc:  # the actor died (RayActorError) or its node went
                    self._node_died(request, index, exc)
                    return
                self._update(request, {index: snaps})
        # every bundle's allocations ended on their nodes (claims released by their
        # consumers, expiries): the request is over. Its group stays while tasks may
        # still run in it — a consumer that released its claims is one of them, and
        # removing a group kills the tasks in its bundles — until the request is
        # released, its expiry time comes, or the preallocator closes.
        expired = bool(request.allocations) and all(a.status is AllocationStatus.EXPIRED
                                                     for a in request.allocations)
        self._finish(request, AllocationStatus.EXPIRED if expired else AllocationStatus.RELEASED, None, None,
                     keep_group=not expired)

    def _node_died(self, request: ClusterRequest, index: int, exc: BaseException) -> None:
        if request.status.is_final:  # our own kill after the release: not news
            return
        reason = f"bundle {index}'s node actor died: {type(exc).__name__}: {exc}"
        log.warning("cluster request %d: %s", request.request_id, reason)
        self._finish(request, AllocationStatus.FAILED, reason, None, dead_bundle=index)

    def _expire(self, request: ClusterRequest) -> None:
        self._refresh(request)
        if any(a.status is AllocationStatus.ACTIVE for a in request.allocations):
            # a claimed allocation belongs to its consumer and never expires (as in the
            # engine): the request lives until it is released
            log.info("cluster request %d reached its expiry with claimed allocations: kept",
                     request.request_id)
            return
        self._finish(request, AllocationStatus.EXPIRED, None, None)

    @staticmethod
    def _remove_group(request: ClusterRequest) -> None:
        if request._pg is not None:
            try:
                remove_placement_group(request._pg)
            except Exception as exc:
                log.warning("cluster request %d: removing its placement group: %s", request.request_id, exc)

    def _finish(self, request: ClusterRequest, status: AllocationStatus, reason: str | None,
                feedback: AllocationFeedback | None, dead_bundle: int | None = None,
                keep_group: bool = False) -> bool:
        """The one end of a request: nodes released first, then the group removed (kept
        with keep_group: see _watch); the tally and events at the transition. A request
        that ended with its group kept has the group removed by a later call."""
        with self._lock:
            ended_before = request.status.is_final
            if ended_before:
                kept, request._group_kept = request._group_kept, False
            else:
                was = request.status
                request.status = status
                request.failure_reason = reason
            # the expiry timer of a live request, or the group timer of a kept group
            timer = self._timers.pop(request.request_id, None) if not ended_before or kept else None
        if timer is not None:
            timer.cancel()
        if ended_before:
            if kept:
                self._remove_group(request)
            return False
        last: dict[tuple[int, int], ResourceAllocation] = {}
        after: dict[int, dict[str, Any]] = {}
        releases = [(index, node.release.remote()) for index, node in enumerate(request._nodes)
                    if index != dead_bundle]
        for index, ref in releases:
            try:
                snaps, after[index] = ray.get(ref, timeout=30)
                for snap in snaps:
                    last[(index, snap.allocation_id)] = snap
            except Exception as exc:  # a node that cannot answer is gone: its holdings with it
                log.warning("cluster request %d: bundle %d release: %s", request.request_id, index, exc)
        for node in request._nodes:
            try:
                ray.kill(node, no_restart=True)
            except Exception:  # already dead
                pass
        if keep_group and request._pg is not None:
            with self._lock:
                request._group_kept = True
                if request.expires_at is not None and not self._closed:
                    timer = threading.Timer(max(0.0, request.expires_at - time.monotonic()), self._finish,
                                            (request, status, None, None))
                    timer.daemon = True
                    self._timers[request.request_id] = timer
                    start_quiet(timer)
        else:
            self._remove_group(request)
        ended: list[tuple[str, ResourceAllocation]] = []
        with self._lock:
            if status is AllocationStatus.FAILED and not request.allocations:
                # nothing was made real (placement failed): one FAILED allocation per
                # request per bundle, so the caller hears of each
                request.allocations = [
                    ResourceAllocation(next(_allocation_ids), r.request_id, r.resource_type, r.predicted_need,
                                       0.0, AllocationStatus.FAILED, None, failure_reason=reason,
                                       details={"bundle_index": index, "node_allocation_id": None,
                                                "placement_group_id": request.placement_group_id,
                                                "cluster_request_id": request.request_id})
                    for index, shape in enumerate(request.shapes) for r in shape]
                ended.extend((FAILED, a) for a in request.allocations)
            for a in request.allocations:
                index = a.details["bundle_index"]
                live = a.status in (AllocationStatus.ALLOCATED, AllocationStatus.ACTIVE)
                if not live:
                    if a.status is AllocationStatus.FAILED and was is AllocationStatus.PENDING \
                            and (FAILED, a) not in ended:
                        ended.append((FAILED, a))  # the node refused it
                    continue
                if was is AllocationStatus.PENDING:  # made real, but the request failed: given back
                    a.status = AllocationStatus.RELEASED
                    a.details["released_because"] = reason
                    ended.append((RELEASED, a))
                    continue
                if index in after:
                    a.details["node_after_release"] = after[index]
                snap = last.get((index, a.details["node_allocation_id"]))
                if snap is not None and snap.details.get("claimed") and not a.details.get("claimed"):
                    a.details["claimed"] = True
                    self._tally.claimed += 1
                a.feedback = feedback
                if index == dead_bundle:
                    ended.append((self._end_allocation(a, AllocationStatus.FAILED, reason), a))
                    continue
                if status is AllocationStatus.FAILED:
                    a.details["released_because"] = reason
                ended.append((self._end_allocation(
                    a, AllocationStatus.RELEASED if status is AllocationStatus.FAILED else status, None), a))
            if was is AllocationStatus.PENDING:
                count = sum(len(s) for s in request.shapes)
                self._tally.in_flight -= count
                self._tally.failed_allocations += count
        request._done.set()
        request._settled.set()
        for event, a in ended:
            self.events.emit(event, a)
        return True


def _plain_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """The cluster's resources without the per-group names Ray derives from bundles."""
    return {k: v for k, v in resources.items() if "_group_" not in k and not k.startswith("node:")}


def node_actor_name(placement_group_id: str, bundle_index: int) -> str:
    return f"prealloc-bundle:{placement_group_id}:{bundle_index}"


# ----------------------------------------------------------------------------- claim

class BundleClaim:
    """A node's reservation in a task's hands: ``resource`` is a writable memoryview of
    the node's populated memory (MEMORY), the frozenset of cores this process is pinned
    to (CPU), or None (types whose effect is node-wide). ``release()`` (or the end of a
    with-block) ends the node's allocation; memory stays mapped here until the view and
    this claim are gone."""

    def __init__(self, node: Any, handover: dict[str, Any], resource: Any, mapping: mmap.mmap | None) -> None:
        self.node = node
        self.handover = handover
        self.resource = resource
        self.resource_type = ResourceType.parse(handover["resource_type"])
        self._mapping = mapping
        self._released = False

    def release(self, feedback: AllocationFeedback | None = None) -> bool:
        if self._released:
            return False
        self._released = True
        return bool(ray.get(self.node.release_claim.remote(self.handover["node_allocation_id"], feedback)))

    def __enter__(self) -> BundleClaim:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.release(AllocationFeedback(used_successfully=exc_type is None, reason_for_release="claim closed"))


def _bundle_nodes_here(placement_group_id: str, bundle_index: int | None) -> list[Any]:
    if bundle_index is not None:
        indices = [bundle_index]
    else:
        here = ray.get_runtime_context().get_node_id()
        try:  # this one group's row, not the whole cluster's table
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(placement_group_id)))
            table = placement_group_table(group)
        except Exception as exc:
            raise LookupError(f"placement group {placement_group_id} is unknown to the cluster: {exc}") from exc
        indices = [i for i, node in table.get("bundles_to_node_id", {}).items() if node == here]
    nodes = []
    for index in indices:
        try:
            nodes.append(ray.get_actor(node_actor_name(placement_group_id, index), namespace=NAMESPACE))
        except ValueError:  # no such actor: released, or not made yet
            continue
    return nodes


def claim(resource_type: ResourceType | str = ResourceType.MEMORY, *, bundle_index: int | None = None,
          placement_group_id: str | None = None) -> BundleClaim:
    """Inside a task or actor scheduled into a ClusterPreallocator's bundle: takes one
    ready reservation of resource_type from a bundle of this node (bundle_index: that
    bundle, which must be on this node). LookupError when none is ready here;
    PermissionError when /proc/<pid>/fd of the node actor cannot be opened (another uid,
    or hidepid)."""
    rtype = ResourceType.parse(resource_type)
    context = ray.get_runtime_context()
    pg_id = placement_group_id or context.get_placement_group_id()
    if not pg_id:
        raise LookupError("claim() runs inside a task or actor scheduled into a placement group "
                          "(or give placement_group_id=)")
    if bundle_index is not None and (isinstance(bundle_index, bool) or not isinstance(bundle_index, int)
                                     or bundle_index < 0):
        raise ValueError(f"bundle_index must be an int >= 0, not {bundle_index!r}")
    nodes = _bundle_nodes_here(pg_id, bundle_index)
    here = context.get_node_id()
    for node in nodes:
        try:
            handover = ray.get(node.claim.remote(rtype.name, os.getpid()))
        except Exception as exc:  # Ray's RayTaskError wraps (and subclasses) the node's error
            if isinstance(exc, LookupError) or isinstance(getattr(exc, "cause", None), LookupError):
                continue  # this bundle has none left: the next of this node may
            raise
        try:
            if handover["node_id"] != here:
                raise LookupError(f"bundle {bundle_index} of {pg_id} is on node {handover['node_id']}, "
                                  f"not on this node {here}")
            return _take(node, handover)
        except BaseException:
            ray.get(node.release_claim.remote(handover["node_allocation_id"], None))
            raise
    raise LookupError(f"no ready {rtype.name} reservation of placement group {pg_id} on this node")


def _take(node: Any, handover: dict[str, Any]) -> BundleClaim:
    rtype = ResourceType.parse(handover["resource_type"])
    if rtype is ResourceType.MEMORY:
        path = f"/proc/{handover['pid']}/fd/{handover['fd']}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"cannot open the node actor's memory {path}: {exc.strerror} "
                                  "(another uid, or /proc mounted with hidepid; a broker hands it over "
                                  "by SCM_RIGHTS instead)") from exc
        try:
            mapping = mmap.mmap(fd, handover["size"], flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the memfd alive
        return BundleClaim(node, handover, memoryview(mapping), mapping)
    if rtype is ResourceType.CPU:
        return BundleClaim(node, handover, frozenset(handover["cores"]), None)
    return BundleClaim(node, handover, None, None)
