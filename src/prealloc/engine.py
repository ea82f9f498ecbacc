"""The allocators: ``ResourceAllocator`` (the shared engine), ``ResourcePreallocator``
(allocates ahead of need from predictions) and, in ``reactive.py``, the
``ReactiveResourceAllocator`` baseline (allocates only when the consumer asks).

One owner for each piece of state:

* the native ``AllocationTable`` owns every allocation's status, amounts, times and
  expiry timer; a status changes only by CAS, so a release racing an expiry (or a
  claim, or a cancel) has exactly one winner, and the winner alone finishes it;
* the native ``ExpiryTicker`` owns time: it expires allocations past their duration and
  requests past their deadline on its own thread and wakes a worker through an eventfd;
* the native ``PriorityQueue`` owns the order of queued requests;
* ``core.EngineCore`` (compiled, ``_engine_core.pxi``, the base class of the allocators)
  owns each allocation's lifecycle — admit, allocate, wait, claim, adjust, release,
  expire, fail, cancel, reset — and everything attached to its transitions: the
  strategy handles, the ready index, the owners, the quota ledger's charges, the tally,
  the events and the feedback to the sizer and the predictor. Its header draws the state
  machine and says which thread runs which transition;
* this module holds the public face (argument checks, then one call into EngineCore),
  the configuration, and the worker threads that run the queued transitions.
"""
from __future__ import annotations

import abc
import atexit
import logging
import os
import selectors
import threading
import time
import types
import uuid
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

from . import core
from ._threads import start_quiet
from .events import ALIASES, EVENT_NAMES, RESET, EventEmitter, EventEmitterProtocol, canonical_event
from .metrics import MetricsCollector
from .quotas import QuotaLedger, Quotas
from .strategies import AllocationError, AllocationStrategy
from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    PreallocatorStatistics,
    ResourceAllocation,
    ResourceAvailability,
    ResourceRequest,
    ResourceType,
    check_amount,
    check_confidence,
    check_seconds,
)

EVENTS = EVENT_NAMES + tuple(ALIASES)  # the spec's names, then their short aliases
# How long close() waits for each worker to finish the allocation it is in (a populate
# of gigabytes takes seconds); a worker still busy then is left to finish on its own, and
# the native objects it uses stay alive until it does.
WORKER_JOIN_TIMEOUT = 10.0


@dataclass
class PreallocatorConfig:
    """Everything an allocator can be told. Unset monitors and strategies get the
    defaults: the psutil system monitor, and the MEMORY and CPU strategies. An
    allocator works on its own copy: the caller's config is never changed."""

    id: str | None = None
    name: str | None = None  # None: the allocator class's own name
    description: str = "Proactively allocates system resources based on predictions."
    immediate_processing: bool = False
    min_confidence: float = 0.0
    capacity: int = 1 << 20  # allocations and queued requests live at once
    tick: float = 0.001  # the expiry wheel's resolution, seconds
    pending_timeout: float = 30.0  # a queued request without a deadline waits at most this long
    default_duration: float | None = None  # expiry of allocations whose request gives none
    # Fraction of each type's total an allocation must leave available; a type without
    # an entry is not checked against its monitor (the strategy alone decides).
    headroom: dict[ResourceType, float] = field(default_factory=lambda: {ResourceType.MEMORY: 0.10})
    quotas: Quotas | None = None
    translator: Any | None = None  # a translate.Translator
    resource_monitors: dict[ResourceType, Any] | None = None  # monitors.ResourceMonitor
    allocation_strategies: dict[ResourceType, AllocationStrategy] | None = None
    event_emitter: EventEmitterProtocol | None = None  # anything with on / off / emit
    metrics: MetricsCollector | None = None
    logger: logging.Logger | None = None
    predictor: Any | None = None  # a Predictor: .on / .off("prediction:generated", fn), .update_model(outcome)
    # Threads that allocate queued requests. With one, requests start strictly in queue
    # order and one slow allocation (populating a large region) delays every request
    # behind it; with more, each takes the next request as it comes free, so a small
    # request is not stuck behind a large one (they still start in queue order, but may
    # finish in any order).
    allocation_workers: int = 1

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> PreallocatorConfig:
        """A config read from a TOML file (the spec's Configuration Manager), validated:
        an unknown key, a wrong type or a bad value raises ValueError naming it."""
        from .config_file import load_config

        return load_config(path)

    def validate(self) -> PreallocatorConfig:
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise ValueError(f"id must be a non-empty string or None, not {self.id!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"name must be a string, not {type(self.name).__name__}")
        if not isinstance(self.immediate_processing, bool):
            raise ValueError(f"immediate_processing must be a bool, not {self.immediate_processing!r}")
        self.min_confidence = check_confidence(self.min_confidence)
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) \
                or not 1 <= self.capacity <= (1 << 30):
            raise ValueError(f"capacity must be an int in 1..2**30, not {self.capacity!r}")
        if isinstance(self.tick, bool) or not (isinstance(self.tick, (int, float)) and 1e-6 <= self.tick <= 1.0):
            raise ValueError(f"tick must be between 1 us and 1 s, not {self.tick!r}")
        if isinstance(self.allocation_workers, bool) or not isinstance(self.allocation_workers, int) \
                or not 1 <= self.allocation_workers <= 64:
            raise ValueError(f"allocation_workers must be an int in 1..64, not {self.allocation_workers!r}")
        self.pending_timeout = check_seconds("pending_timeout", self.pending_timeout)
        if self.default_duration is not None:
            self.default_duration = check_seconds("default_duration", self.default_duration)
        if not isinstance(self.headroom, Mapping):
            raise ValueError(f"headroom must be a mapping of type -> fraction, not {type(self.headroom).__name__}")
        self.headroom = {ResourceType.parse(t): check_amount(f"headroom[{t}]", v)
                         for t, v in self.headroom.items()}
        for t, v in self.headroom.items():
            if v >= 1:
                raise ValueError(f"headroom[{t.name}] is a fraction of the total, below 1, not {v}")
        if self.quotas is not None and not isinstance(self.quotas, Quotas):
            raise ValueError(f"quotas must be a Quotas, not {type(self.quotas).__name__}")
        for name in ("resource_monitors", "allocation_strategies"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping of resource type -> object, not {type(value).__name__}")
        return self


# Allocators not closed yet. At a normal interpreter exit they are closed (an atexit
# hook): memory would go with the process anyway, but a CPU pin of *another* process
# would not, and neither would anything a custom strategy holds outside the process.
# (A crash skips this; the journal covers pins then — see prealloc.journal.)
_open_allocators: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_open_allocators() -> None:
    for allocator in list(_open_allocators):
        try:
            allocator.close()
        except Exception:  # one failure must not keep the others open
            logging.getLogger(__name__).exception("closing %s at exit failed", allocator.id)


def _forget_inherited_allocators() -> None:
    """In a child of fork(): the allocators it inherited are the parent's. Their worker
    and ticker threads do not exist here and their resources are the parent's to give
    back, so the child never touches them: every method raises, and close() (also the
    one at exit) does nothing."""
    for allocator in list(_open_allocators):
        allocator._inherited = True
        allocator._mark_closed()
    _open_allocators.clear()


os.register_at_fork(after_in_child=_forget_inherited_allocators)


def _make_gpu_monitor() -> Any:
    from .monitors.nvml import NvmlMonitor

    return NvmlMonitor()  # GpuUnavailable (with .reason) where there is no driver or device


class Claim:
    """A resource in the consumer's hands. ``resource`` is what the strategy handed over:
    a writable zero-copy buffer (MemoryReservation) for MEMORY, the frozenset of cores
    for CPU, None for strategies that hand over nothing. ``release()`` gives it back; so
    does the end of a with-block, and so does garbage collection of a claim never
    released: its finalizer only hands the id to the allocator's worker (a finalizer may
    run on any thread, inside any lock), so the release happens there, soon after."""

    __slots__ = ("allocation_id", "resource_type", "resource", "preallocated", "_allocator_ref",
                 "_finalizer", "__weakref__")

    def __init__(self, allocator: ResourceAllocator, allocation_id: int, resource_type: ResourceType,
                 resource: Any, preallocated: bool) -> None:
        self.allocation_id = allocation_id
        self.resource_type = resource_type
        self.resource = resource
        self.preallocated = preallocated  # True: it was ready before the need (a hit)
        self._allocator_ref = weakref.ref(allocator)
        self._finalizer = weakref.finalize(self, _queue_dropped_claim, self._allocator_ref, allocation_id)

    def release(self, feedback: AllocationFeedback | None = None) -> bool:
        """Gives the resource back; False if it was already released (or expired), or
        the allocator is closed (which released it)."""
        if self._finalizer.detach() is None:
            return False
        allocator = self._allocator_ref()
        if allocator is None or allocator.closed:
            return False
        return allocator.release_allocation(self.allocation_id, feedback)

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.release(AllocationFeedback(used_successfully=exc_type is None,
                                        reason_for_release="claim closed"))

    def __repr__(self) -> str:
        return (f"<Claim {self.resource_type.name} allocation={self.allocation_id}"
                f" preallocated={self.preallocated}{' released' if self.released else ''}>")


def _queue_dropped_claim(allocator_ref: Callable[[], ResourceAllocator | None], allocation_id: int) -> None:
    # No lock, no strategy: the worker releases it (see Claim).
    allocator = allocator_ref()
    if allocator is not None and not allocator.closed:
        allocator._queue_dropped(allocation_id)


def _check_target_pid(target_process_id: object) -> int | None:
    if target_process_id is None:
        return None
    if type(target_process_id) is not int or target_process_id <= 0:
        raise ValueError(f"target_process_id must be a positive int, not {target_process_id!r}")
    return target_process_id


def _check_application(target_application: object) -> str | None:
    if target_application is not None and not isinstance(target_application, str):
        raise TypeError(f"target_application must be a str or None, not {type(target_application).__name__}")
    return target_application


class _WeakSource:
    """The allocator's core counters as a metrics source, without keeping it alive."""

    __slots__ = ("_ref",)

    def __init__(self, allocator: ResourceAllocator) -> None:
        self._ref = weakref.ref(allocator)

    def __call__(self) -> list[Any]:
        allocator = self._ref()
        return allocator._metric_counts() if allocator is not None else []


class ResourceAllocator(core.EngineCore, abc.ABC):
    """The engine both allocators share: the native table, expiry, strategies, quotas,
    statistics, claims and events. Thread-safe. The lifecycle is compiled in
    ``core.EngineCore``; this class checks arguments and runs the workers. Subclasses
    decide *when* to allocate: ahead of need (ResourcePreallocator) or at need
    (ReactiveResourceAllocator)."""

    DEFAULT_NAME = "ResourceAllocator"

    def __init__(self, config: PreallocatorConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, PreallocatorConfig):
            raise TypeError(f"config must be a PreallocatorConfig, not {type(config).__name__}")
        config = replace(config) if config is not None else PreallocatorConfig()  # ours, not the caller's
        known = {f.name for f in fields(PreallocatorConfig)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown configuration option {key!r}")
            setattr(config, key, value)
        if config.name is None:
            config.name = self.DEFAULT_NAME
        self.config = config.validate()
        self.id = config.id or uuid.uuid4().hex
        self.name: str = config.name
        self.description = config.description
        self.log = config.logger or logging.getLogger(f"prealloc.{type(self).__name__}")
        self._inherited = False
        self._ready_fd_owned = -1
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._closing = False
        # What close() closes: only what this allocator made itself, never the caller's.
        self._owned: list[Any] = []
        # resource types this machine cannot serve with a built-in, and why
        self.unavailable: dict[ResourceType, str] = {}
        if config.resource_monitors is not None:
            monitors = {ResourceType.parse(t): m for t, m in config.resource_monitors.items()}
        else:
            monitors = self._default_monitors()
            self._owned.extend({id(m): m for m in monitors.values()}.values())
        self._gpu_monitor = monitors.get(ResourceType.GPU)
        if config.allocation_strategies is not None:
            strategies = {ResourceType.parse(t): s for t, s in config.allocation_strategies.items()}
        else:
            strategies = self._default_strategies()
            self._owned.extend(strategies.values())
        for t, strategy in strategies.items():
            if not isinstance(strategy, AllocationStrategy):
                raise TypeError(f"strategy for {t.name} must be an AllocationStrategy, not {type(strategy).__name__}")
        self.monitors: Mapping[ResourceType, Any] = types.MappingProxyType(monitors)
        events = config.event_emitter if config.event_emitter is not None else EventEmitter()
        if not isinstance(events, EventEmitterProtocol):
            raise TypeError(f"event_emitter must have on, off and emit, not {type(events).__name__}")
        self.metrics = config.metrics if config.metrics is not None else MetricsCollector()
        self.quotas = QuotaLedger(config.quotas)
        table = core.AllocationTable(config.capacity)
        # PENDING records expire at their deadline, ALLOCATED ones after their duration;
        # a claimed (ACTIVE) allocation belongs to its consumer and never expires.
        ticker = core.ExpiryTicker(table, tick_ns=int(config.tick * 1e9),
                                   expire_from=[core.PENDING, core.ALLOCATED])
        self._core_setup(table, ticker, strategies, self.quotas, events, self.metrics, self.log, Claim,
                         self._make_queue())
        self._set_unavailable(dict(self.unavailable))
        self._apply_live_config()
        if type(self.metrics) is MetricsCollector:
            self.metrics.add_source(_WeakSource(self))
        # The workers sleep in select() on eventfds: the ticker's (expiries), this one
        # (work from callers and finalizers) and the stop fd below. No polling interval.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Written once at close and never read, so it stays readable and every worker
        # sees it (a wake on _wake_fd is consumed by whichever worker reads it first).
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._set_wake_fd(self._wake_fd)
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"prealloc-worker-{self.id[:8]}-{i}", daemon=True)
                         for i in range(config.allocation_workers)]
        self.log.info("initialized %s %s (capacity %d, %d worker(s))", type(self).__name__, self.id,
                      config.capacity, len(self._workers))
        for worker in self._workers:
            start_quiet(worker)
        _open_allocators.add(self)

    # ------------------------------------------------------------------ defaults
    def _default_monitors(self) -> dict[ResourceType, Any]:
        """The psutil/cgroup/PSI system monitor for what it covers, and NVML for GPU where
        a driver answers (where none does, the reason is kept in ``unavailable``)."""
        from .monitors import SystemResourceMonitor

        monitor = SystemResourceMonitor()
        monitors: dict[ResourceType, Any] = {t: monitor for t in monitor.supported_types}
        gpu = self._optional(ResourceType.GPU, _make_gpu_monitor)
        if gpu is not None:
            monitors[ResourceType.GPU] = gpu
        return monitors

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        """Every built-in strategy this machine can run: MEMORY, CPU, CACHE_SPACE (page
        cache warming under the default roots), DISK_IO (space and I/O priority), GPU
        (where NVML and a CUDA driver answer), NETWORK_BANDWIDTH (HTB classes through
        pyroute2, where it is installed and CAP_NET_ADMIN held). One that cannot start here is left out
        with its reason in ``unavailable`` (a request of that type then fails saying so)."""
        from .strategies import CacheSpaceStrategy, CpuAllocationStrategy, DiskStrategy, MemoryAllocationStrategy

        strategies: dict[ResourceType, AllocationStrategy] = {
            ResourceType.MEMORY: MemoryAllocationStrategy(), ResourceType.CPU: CpuAllocationStrategy()}
        from .strategies.network import make_network_strategy

        for rtype, make in ((ResourceType.CACHE_SPACE, CacheSpaceStrategy), (ResourceType.DISK_IO, DiskStrategy),
                            (ResourceType.GPU, self._make_gpu_strategy),
                            (ResourceType.NETWORK_BANDWIDTH, make_network_strategy)):
            if rtype in self.unavailable:  # its monitor said why already
                continue
            strategy = self._optional(rtype, make)
            if strategy is not None:
                strategies[rtype] = strategy
        return strategies

    def _optional(self, rtype: ResourceType, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except Exception as exc:  # a missing driver or library must not stop the allocator
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            self.unavailable[rtype] = reason
            self.log.info("%s unavailable: %s", rtype.name, reason)
            return None

    def _make_gpu_strategy(self) -> AllocationStrategy:
        from .strategies.gpu import GpuMemoryStrategy

        monitor = self._gpu_monitor
        if monitor is None:
            raise RuntimeError(self.unavailable.get(ResourceType.GPU, "no GPU monitor"))
        return GpuMemoryStrategy(monitor=monitor)

    def _make_queue(self) -> Any:
        return None

    # ------------------------------------------------------------------ configuration
    # What initialize() may change on a running allocator; the rest shapes native
    # structures or threads made at construction.
    LIVE_OPTIONS = frozenset({"name", "description", "translator", "min_confidence", "immediate_processing",
                              "pending_timeout", "default_duration", "headroom", "predictor"})

    @property
    def strategies(self) -> Mapping[ResourceType, AllocationStrategy]:
        """The strategies, read-only: the one set every transition uses."""
        return types.MappingProxyType(self._strategies)

    @property
    def translator(self) -> Any:
        return self.config.translator

    def initialize(self, config: PreallocatorConfig | None = None, **changes: Any) -> None:
        """The spec's initialize(config): applies configuration to the running allocator
        (the constructor applies the first one). Options in LIVE_OPTIONS take effect at
        once; asking to change any other (capacity, tick, strategies, monitors, quotas,
        emitter, ...) raises ValueError and changes nothing."""
        self._check_open()
        wanted = dict(changes)
        if config is not None:
            if not isinstance(config, PreallocatorConfig):
                raise TypeError(f"config must be a PreallocatorConfig, not {type(config).__name__}")
            for f in fields(PreallocatorConfig):
                value = getattr(config, f.name)
                current = getattr(self.config, f.name)
                if f.name in self.LIVE_OPTIONS or value is not current and value != current:
                    wanted.setdefault(f.name, value)
            if wanted.get("name") is None:
                wanted["name"] = self.config.name
        unknown = sorted(n for n in wanted if n not in {f.name for f in fields(PreallocatorConfig)})
        if unknown:
            raise TypeError(f"unknown configuration options {unknown}")
        fixed = sorted(n for n in wanted if n not in self.LIVE_OPTIONS)
        if fixed:
            raise ValueError(f"{fixed} are fixed at construction; make a new allocator to change them")
        candidate = replace(self.config, **wanted).validate()
        old_predictor = self.config.predictor
        self.config = candidate
        self.name, self.description = candidate.name or self.DEFAULT_NAME, candidate.description
        self._apply_live_config(old_predictor)
        self.log.info("reconfigured %s: %s", self.id, sorted(wanted))

    def _apply_live_config(self, old_predictor: Any = None) -> None:
        c = self.config
        self._core_configure(dict(self.monitors), c.headroom, c.default_duration, c.translator, c.predictor)

    # ------------------------------------------------------------------ the public face
    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._inherited:
            raise RuntimeError(f"{type(self).__name__} {self.id} was inherited across fork(); it belongs "
                               "to the parent process: make a new allocator in the child")
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} {self.id} is closed")

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Listens to 'resource:allocated', 'resource:released', 'resource:expired',
        'resource:failed' (each with a ResourceAllocation) or 'preallocator:reset' (with
        {"preallocator_id": id}); the short names 'allocated', ... 'reset' are aliases.
        Returns the listener."""
        self._check_open()
        if not callable(listener):
            raise TypeError(f"listener must be callable, not {type(listener).__name__}")
        self.events.on(canonical_event(event), listener)
        return listener

    def off(self, event: str, listener: Callable[..., Any]) -> bool:
        self._check_open()
        return bool(self.events.off(canonical_event(event), listener))

    def claim(self, allocation_id: int, *, target_process_id: int | None = None) -> Claim:
        """The consumer takes a ready allocation: MEMORY gives its writable zero-copy
        buffer, CPU pins the calling thread (or target_process_id). KeyError for an
        unknown id; ValueError when it is not ALLOCATED (claimed, released or expired
        already); TypeError for an id that is not an int."""
        self._check_open()
        return self._claim(allocation_id, _check_target_pid(target_process_id))

    @abc.abstractmethod
    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """A prediction in: what the allocator does with it (queue its requests, or
        nothing at all for the reactive baseline)."""

    def acquire(self, resource_type: ResourceType | str, amount: float, *,
                target_application: str | None = None, target_process_id: int | None = None) -> Claim:
        """The moment of need. Claims a ready allocation of resource_type holding at least
        amount for target_application (a hit: the resource was prepared ahead), or
        allocates now, on this thread, when none is ready (a miss; for the reactive
        allocator, every need). target_process_id: the process to hand it to (a CPU
        claim pins it). Raises AllocationError when it cannot be had."""
        self._check_open()
        rtype = ResourceType.parse(resource_type)
        amount = check_amount("amount", amount)
        application = _check_application(target_application)
        pid = _check_target_pid(target_process_id)
        claim = self._claim_ready(rtype, application, amount, pid)
        if claim is not None:
            self.metrics.record_metric("preallocation_hit", resource_type=rtype.name)
            return claim
        self.metrics.record_metric("preallocation_miss", resource_type=rtype.name)
        return self._acquire_at_need(rtype, amount, application, pid)


    def adjust_allocation(self, allocation_id: int, new_amount: float) -> bool:
        """Grows or shrinks a live allocation in place (memory by mremap, cores added or
        given back). False when the id is not live, the strategy cannot, a quota or the
        machine says no: nothing changes then. ValueError for an absurd amount (more
        than the machine could ever hold), TypeError for an id that is not an int."""
        self._check_open()
        new_amount = check_amount("new_amount", new_amount)
        if new_amount == 0:
            raise ValueError("new_amount must be > 0; release the allocation instead")
        return self._adjust(allocation_id, new_amount)

    def get_allocation(self, allocation_id: int) -> ResourceAllocation | None:
        """A snapshot of a live allocation (or queued request), None if unknown."""
        self._check_open()
        return self._get(allocation_id)

    def allocations(self, *statuses: AllocationStatus) -> list[ResourceAllocation]:
        """Snapshots of live allocations, optionally only those in statuses."""
        self._check_open()
        mask = core.status_mask(statuses) if statuses else core.LIVE_MASK
        out = []
        for rid in self._table.collect(mask=mask).tolist():
            snap = self._get(rid)
            if snap is not None:
                out.append(snap)
        return out

    def wait_ready(self, allocation_ids: int | Iterable[int], timeout: float | None = None) -> bool:
        """Blocks until every id has left PENDING — ALLOCATED (ready to claim), or ended
        in any way (failed, cancelled, released, expired) — or the timeout passes (False
        then). An unknown id counts as ended."""
        self._check_open()
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        ids: list[int] = [allocation_ids] if isinstance(allocation_ids, int) \
            else list(allocation_ids)  # a bool is refused by the id check
        return self._wait_ready(ids, timeout)

    def readiness_fd(self) -> int:
        """An eventfd (non-blocking, close-on-exec, owned by the allocator: do not close
        it) that becomes readable whenever a request leaves PENDING — it was allocated,
        failed, was withdrawn or dropped at its deadline. For event loops: wait on it
        (``loop.add_reader``), read it to clear it, then look at the requests you wait for
        (``get_allocation``). The asyncio face (prealloc.aio) is built on it."""
        self._check_open()
        with self._close_lock:
            self._check_open()
            if self._ready_fd_owned < 0:
                self._ready_fd_owned = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._set_ready_fd(self._ready_fd_owned)
            return self._ready_fd_owned

    def get_statistics(self) -> PreallocatorStatistics:
        """The tally (see PreallocatorStatistics for what each figure means)."""
        self._check_open()
        return self._statistics()

    def reset(self) -> None:
        """Withdraws every queued request and releases every allocation (claimed memory
        stays mapped — and charged — until the consumer's last view is gone: nothing is
        pulled out from under a live buffer), then emits 'reset'."""
        self._check_open()
        self.log.info("resetting %s", self.id)
        self._release_all(_RESET_FEEDBACK)
        try:
            self.events.emit(RESET, {"preallocator_id": self.id})
        except Exception:
            self.log.exception("emitting %r failed", RESET)

    def close(self) -> None:
        """Releases everything (as reset, without the event), stops the workers, then
        frees the native objects and closes what this allocator made itself (monitors
        and strategies the caller passed in stay open: they are the caller's).
        Idempotent and safe to race: one caller closes, the others wait for it. A step
        that fails is logged and the rest still run."""
        with self._close_lock:
            if self._closing or self._inherited:
                first = False
            else:
                self._closing = first = True
                self._mark_closed()  # from here every public method raises
        if not first:
            if not self._inherited and not self._on_worker():
                self._close_done.wait(WORKER_JOIN_TIMEOUT * 2)
            return
        _open_allocators.discard(self)
        try:
            stopped = self._close_steps()
        finally:
            self._close_done.set()
        self.log.info("closed %s%s", self.id, "" if stopped else " (a worker was still busy)")

    def _close_steps(self) -> bool:
        def step(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception:
                self.log.exception("close of %s: %s failed", self.id, what)

        step("releasing allocations", lambda: self._release_all(_CLOSE_FEEDBACK))
        stopped = self._stop_workers()
        step("stopping monitor subscriptions", self._stop_watching)
        if not stopped:
            # a worker is still inside an allocation: it uses the ticker, the table and
            # the wake fd, so they stay until it is done (the allocation it finishes is
            # released by the close check in EngineCore)
            return False
        step("finishing expiries", self._drain_expired)
        step("refunding deferred releases", self._drain_returns)
        step("closing the ticker", self._ticker.close)
        for thing in self._owned:
            step(f"closing {type(thing).__name__}", thing.close)
        fd = self._give_up_wake_fd()
        step("closing the wake fd", lambda: os.close(fd))
        step("closing the stop fd", lambda: os.close(self._stop_fd))
        ready_fd = self._set_ready_fd(-1)
        if ready_fd >= 0:
            step("closing the readiness fd", lambda: os.close(ready_fd))
        return True

    def __enter__(self) -> ResourceAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Live allocations and queued requests."""
        return len(self._table)

    # ------------------------------------------------------------------ the workers
    def _work(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_fd, selectors.EVENT_READ)
        selector.register(self._ticker.fileno(), selectors.EVENT_READ)
        selector.register(self._stop_fd, selectors.EVENT_READ)
        try:
            while not self._stopping:
                selector.select()  # blocks until the core, a caller or a finalizer has something
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                if self._stopping:
                    break
                try:
                    self._drain_expired()
                    self._drain_returns()
                    self._on_wake()
                except Exception:  # nothing a request does may stop the worker
                    self.log.exception("worker iteration failed")
        finally:
            selector.close()

    def _on_wake(self) -> None:
        """The worker's work besides expiries, dropped claims and deferred refunds."""

    def _on_worker(self) -> bool:
        return threading.current_thread() in self._workers

    def _stop_workers(self) -> bool:
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        deadline = time.monotonic() + WORKER_JOIN_TIMEOUT
        stopped = True
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    self.log.error("worker %s did not stop within %.0f s", worker.name, WORKER_JOIN_TIMEOUT)
                    stopped = False
        return stopped

    def _stop_watching(self) -> None:
        """Drops the monitor subscriptions (the preallocator has some)."""


_RESET_FEEDBACK = AllocationFeedback(used_successfully=False, reason_for_release="reset")
_CLOSE_FEEDBACK = AllocationFeedback(used_successfully=False, reason_for_release="allocator closed")


class ResourcePreallocator(ResourceAllocator):
    """Allocates ahead of need. ``handle_prediction`` translates a prediction into
    requests, queues them on the native priority queue and returns at once; a worker
    thread, woken by the core (an eventfd for new work, the expiry ticker's eventfd for
    expiries — no polling interval), allocates them in priority order. A request that
    must wait for resources is retried when availability changes and dropped at its
    deadline. The consumer then ``acquire``s (or ``claim``s) what is ready;
    ``wait_ready`` blocks until the worker has allocated given requests."""

    DEFAULT_NAME = "ResourcePreallocator"

    def __init__(self, config: PreallocatorConfig | None = None, **overrides: Any) -> None:
        self._retry = threading.Event()
        # Monitors are subscribed to only once a request has to wait for resources: until
        # then nothing needs to hear about changes, and a monitor's watcher thread costs.
        self._subscriptions: list[tuple[Any, Any]] | None = None
        self._subscribe_lock = threading.Lock()
        self._connected_predictor: Any = None
        super().__init__(config, **overrides)

    def _make_queue(self) -> Any:
        return core.PriorityQueue(indexed=False)  # cancellation is lazy: the table's status

    def _apply_live_config(self, old_predictor: Any = None) -> None:
        super()._apply_live_config(old_predictor)
        predictor = self.config.predictor
        if predictor is not self._connected_predictor:
            old = self._connected_predictor
            if old is not None and hasattr(old, "off"):
                old.off("prediction:generated", self.handle_prediction)
            self._connected_predictor = None
            if predictor is not None and hasattr(predictor, "on"):
                predictor.on("prediction:generated", self.handle_prediction)
                self._connected_predictor = predictor
                self.log.info("subscribed to predictions from %s", getattr(predictor, "id", predictor))

    # ------------------------------------------------------------------ predictions in
    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """Validates and translates a prediction and queues its requests; returns their
        allocation ids (PENDING now). A prediction below min_confidence is counted and
        skipped. ValueError for a bad prediction (nothing is queued)."""
        self._check_open()
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        prediction.validate()
        if prediction.confidence < self.config.min_confidence:
            self._count_skipped()
            self.metrics.record_metric("prediction_skipped_low_confidence")
            self.log.debug("prediction %s skipped: confidence %.2f < %.2f", prediction.id,
                           prediction.confidence, self.config.min_confidence)
            return []
        translator = self.config.translator
        if translator is None:
            raise ValueError("no translator configured: give PreallocatorConfig(translator=...)")
        requests = translator.translate(prediction)
        for request in requests:
            request.validate()
        ids = [self._queue_request(request) for request in requests]
        if ids:
            self._wake()
        if self.config.immediate_processing:
            self._on_wake()
        return ids

    def submit(self, request: ResourceRequest, *, wake: bool = True) -> int:
        """Queues one request for the worker; returns its allocation id (PENDING). The id
        is the caller's even if a reset or cancel withdraws the request at once (it then
        reads as ended: get_allocation gives None, wait_ready returns)."""
        self._check_open()
        if not isinstance(request, ResourceRequest):
            raise TypeError(f"request must be a ResourceRequest, not {type(request).__name__}")
        request.validate()
        record_id = self._queue_request(request)
        if wake:
            self._wake()
        return record_id

    def _queue_request(self, request: ResourceRequest) -> int:
        deadline = request.deadline
        if deadline is None:
            deadline = time.monotonic() + self.config.pending_timeout
        record_id = self._submit(request, deadline)
        self.metrics.record_metric("preallocation_request_generated",
                                   resource_type=request.resource_type.name,
                                   predictor=request.metadata.source_predictor_id)
        self.log.debug("queued request %d for %g of %s as %d", request.request_id,
                       request.predicted_need, request.resource_type.name, record_id)
        return record_id

    def cancel_request(self, allocation_id: int) -> bool:
        """Withdraws a request that is still queued; False if it is not PENDING."""
        self._check_open()
        return self._withdraw(allocation_id)

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ the worker
    def _on_availability(self, availability: ResourceAvailability) -> None:
        if self._has_waiting():
            self._retry.set()
            self._wake()

    def _availability_changed(self) -> None:
        self._retry.set()
        if not self._on_worker():
            self._wake()

    def _on_wake(self) -> None:
        if self._retry.is_set():
            self._retry.clear()
            self._requeue_waiting()
        # One worker takes requests in batches; several take one at a time, so that a
        # request is never held by a worker busy with a slow allocation.
        many = len(self._workers) > 1
        if self._process_queue(1 if many else 64, many) and self._subscriptions is None:
            self._subscribe_to_monitors()

    def _subscribe_to_monitors(self) -> None:
        with self._subscribe_lock:
            if self._subscriptions is not None or self._stopping:
                return
            subscriptions = []
            for rtype in self._strategies:
                monitor = self.monitors.get(rtype)
                if monitor is not None and rtype in getattr(monitor, "supported_types", ()):
                    handle = monitor.subscribe_to_resource_changes(rtype, self._on_availability)
                    subscriptions.append((monitor, handle))
            self._subscriptions = subscriptions

    def _stop_watching(self) -> None:
        with self._subscribe_lock:
            subscriptions, self._subscriptions = self._subscriptions or [], []
        for monitor, handle in subscriptions:
            monitor.unsubscribe(handle)
        if self._connected_predictor is not None and hasattr(self._connected_predictor, "off"):
            self._connected_predictor.off("prediction:generated", self.handle_prediction)
            self._connected_predictor = None
        self._queue.pop_many(len(self._queue) + 1)


class MemoryPreallocator(ResourcePreallocator):
    """A preallocator of memory only: its requests of other types fail with "no strategy".
    memory_options go to MemoryAllocationStrategy (lock, require_lock, huge_pages, ...)."""

    DEFAULT_NAME = "MemoryPreallocator"

    def __init__(self, config: PreallocatorConfig | None = None, *, memory_options: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        self._memory_options = dict(memory_options or {})
        super().__init__(config, **overrides)

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import MemoryAllocationStrategy

        return {ResourceType.MEMORY: MemoryAllocationStrategy(**self._memory_options)}


class CpuSchedulerEnhancer(ResourcePreallocator):
    """A preallocator of CPU cores only (the spec's CPUSchedulerEnhancer): it pins target
    processes, or the claiming thread, to cores reserved ahead of a predicted burst."""

    DEFAULT_NAME = "CpuSchedulerEnhancer"

    def __init__(self, config: PreallocatorConfig | None = None, *, exclusive: bool = True,
                 isolation: Any = None, **overrides: Any) -> None:
        self._exclusive = exclusive
        self._isolation = isolation  # the default isolation level(s): prealloc.strategies.cpu
        super().__init__(config, **overrides)

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import CpuAllocationStrategy

        # every enhancer of the process shares one core registry (and the machine's)
        return {ResourceType.CPU: CpuAllocationStrategy(exclusive=self._exclusive, isolation=self._isolation)}


class DiskIOOptimizer(ResourcePreallocator):
    """A preallocator of disk only (the spec's DiskIOOptimizer): space reserved ahead of
    a predicted write (a file handed over, or ballast given back at the need) and I/O
    priority for a predicted burst."""

    DEFAULT_NAME = "DiskIOOptimizer"

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import DiskStrategy

        return {ResourceType.DISK_IO: DiskStrategy()}


class NetworkBandwidthManager(ResourcePreallocator):
    """A preallocator of egress bandwidth only (the spec's NetworkBandwidthManager): an
    HTB class per predicted burst, its traffic matched by the socket mark handed over at
    claim (or by uid / cgroup), everything else sharing the rest of the link."""

    DEFAULT_NAME = "NetworkBandwidthManager"

    def __init__(self, config: PreallocatorConfig | None = None, *, network_options: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        self._network_options = dict(network_options or {})
        super().__init__(config, **overrides)

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies.network import NetworkBandwidthStrategy

        return {ResourceType.NETWORK_BANDWIDTH: NetworkBandwidthStrategy(**self._network_options)}


class CustomResourceAllocator(ResourcePreallocator):
    """A preallocator whose strategies come from plugins (prealloc.plugins): the built-in
    MEMORY and CPU strategies, overridden and extended by every registered or installed
    plugin strategy."""

    DEFAULT_NAME = "CustomResourceAllocator"

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .plugins import load_strategies

        return {**super()._default_strategies(), **load_strategies()}


__all__ = ["AllocationError", "Claim", "CpuSchedulerEnhancer", "CustomResourceAllocator", "DiskIOOptimizer",
           "MemoryPreallocator", "NetworkBandwidthManager",
           "PreallocatorConfig", "ResourceAllocator", "ResourcePreallocator"]
