"""The allocators: ``ResourceAllocator`` (the shared engine), ``ResourcePreallocator``
(allocates ahead of need from predictions) and, in ``reactive.py``, the
``ReactiveResourceAllocator`` baseline (allocates only when the consumer asks).

One owner for each piece of state:

* the native ``AllocationTable`` owns every allocation's status, amounts, times and
  expiry timer; a status changes only by CAS, so a release racing an expiry (or a
  claim, or a cancel) has exactly one winner, and the winner alone finishes the
  allocation (gives the resource back, books statistics, removes the record);
* the native ``ExpiryTicker`` owns time: it expires allocations past their duration and
  requests past their deadline on its own thread and wakes the worker through an
  eventfd;
* the native ``PriorityQueue`` owns the order of queued requests;
* ``core.EngineCore`` (compiled, the base class of the allocators) owns what the table
  cannot hold: the strategy's handle of each allocation that has one, the index the
  consumer's ``acquire`` uses to find a ready allocation, and the running tally; it runs
  every allocation's hot path (admit, allocate, finish, fail, cancel). Each transition
  into or out of ALLOCATED happens there together with its dict updates, with the GIL
  held and no Python code in between, so no thread sees one without the other;
* this module holds the policy EngineCore calls back into (strategies, quotas, headroom,
  events, learning), the queued request objects, and the worker.
"""
from __future__ import annotations

import abc
import atexit
import logging
import os
import selectors
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from . import core
from .events import EventEmitter
from .metrics import MetricsCollector
from .quotas import QuotaExceeded, QuotaLedger, Quotas
from .strategies import AllocationError, AllocationStrategy, InsufficientResources
from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    PreallocatorStatistics,
    RequestMetadata,
    ResourceAllocation,
    ResourceAvailability,
    ResourceRequest,
    ResourceType,
    check_amount,
    check_confidence,
)

NS = 1e-9
EVENTS = ("allocated", "released", "expired", "failed", "reset")


@dataclass
class PreallocatorConfig:
    """Everything an allocator can be told. Unset monitors and strategies get the
    defaults: the psutil system monitor, and the MEMORY and CPU strategies."""

    id: str | None = None
    name: str = "ResourcePreallocator"
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
    event_emitter: EventEmitter | None = None
    metrics: MetricsCollector | None = None
    logger: logging.Logger | None = None
    predictor: Any | None = None  # has .on(event, fn); may have .update_model(id, feedback)
    # Threads that allocate queued requests. With one, requests start strictly in queue
    # order and one slow allocation (populating a large region) delays every request
    # behind it; with more, each takes the next request as it comes free, so a small
    # request is not stuck behind a large one (they still start in queue order, but may
    # finish in any order).
    allocation_workers: int = 1

    def validate(self) -> PreallocatorConfig:
        self.min_confidence = check_confidence(self.min_confidence)
        if not isinstance(self.capacity, int) or not 1 <= self.capacity <= (1 << 30):
            raise ValueError(f"capacity must be an int in 1..2**30, not {self.capacity!r}")
        if not (isinstance(self.tick, (int, float)) and 1e-6 <= self.tick <= 1.0):
            raise ValueError(f"tick must be between 1 us and 1 s, not {self.tick!r}")
        if isinstance(self.allocation_workers, bool) or not isinstance(self.allocation_workers, int) \
                or not 1 <= self.allocation_workers <= 64:
            raise ValueError(f"allocation_workers must be an int in 1..64, not {self.allocation_workers!r}")
        check_amount("pending_timeout", self.pending_timeout)
        if self.default_duration is not None:
            check_amount("default_duration", self.default_duration)
        self.headroom = {ResourceType.parse(t): check_amount(f"headroom[{t}]", v)
                         for t, v in self.headroom.items()}
        for t, v in self.headroom.items():
            if v >= 1:
                raise ValueError(f"headroom[{t.name}] is a fraction of the total, below 1, not {v}")
        return self


# Allocators not closed yet. At a normal interpreter exit they are closed (an atexit
# hook): memory would go with the process anyway, but a CPU pin of *another* process
# would not, and neither would anything a custom strategy holds outside the process.
# (A crash skips this; the affinity journal covers pins then — see prealloc.journal.)
_open_allocators: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_open_allocators() -> None:
    for allocator in list(_open_allocators):
        try:
            allocator.close()
        except Exception:  # one failure must not keep the others open
            logging.getLogger(__name__).exception("closing %s at exit failed", allocator.id)


class Claim:
    """A resource in the consumer's hands. ``resource`` is what the strategy handed over:
    a writable zero-copy buffer (MemoryReservation) for MEMORY, the frozenset of cores
    for CPU, None for strategies that hand over nothing. ``release()`` gives it back; so
    does the end of a with-block, and so does garbage collection of a claim never
    released (a claim never leaks its resource)."""

    __slots__ = ("allocation_id", "resource_type", "resource", "preallocated", "_allocator_ref",
                 "_finalizer", "__weakref__")

    def __init__(self, allocator: ResourceAllocator, allocation_id: int, resource_type: ResourceType,
                 resource: Any, preallocated: bool) -> None:
        self.allocation_id = allocation_id
        self.resource_type = resource_type
        self.resource = resource
        self.preallocated = preallocated  # True: it was ready before the need (a hit)
        self._allocator_ref = weakref.ref(allocator)
        self._finalizer = weakref.finalize(self, _release_dropped_claim, self._allocator_ref,
                                           allocation_id)

    def release(self, feedback: AllocationFeedback | None = None) -> bool:
        """Gives the resource back; False if it was already released (or expired)."""
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


def _release_dropped_claim(allocator_ref: Callable[[], ResourceAllocator | None], allocation_id: int) -> None:
    allocator = allocator_ref()
    if allocator is not None and not allocator.closed:
        allocator.release_allocation(allocation_id, AllocationFeedback(
            used_successfully=True, reason_for_release="claim dropped without release"))


class ResourceAllocator(core.EngineCore, abc.ABC):
    """The engine both allocators share: the native table, expiry, strategies, quotas,
    statistics, claims and events. Thread-safe. The hot paths (request_preallocation,
    release_allocation, allocation, expiry) are compiled in ``core.EngineCore``; this
    class holds the policy they call back into. Subclasses decide *when* to allocate:
    ahead of need (ResourcePreallocator) or at need (ReactiveResourceAllocator)."""

    def __init__(self, config: PreallocatorConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else PreallocatorConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown configuration option {key!r}")
            setattr(config, key, value)
        self.config = config.validate()
        self.id = config.id or uuid.uuid4().hex
        self.name = config.name
        self.description = config.description
        self.log = config.logger or logging.getLogger(f"prealloc.{type(self).__name__}")
        self.events = config.event_emitter or EventEmitter()
        self.metrics = config.metrics or MetricsCollector()
        self.quotas = QuotaLedger(config.quotas)
        q = self.quotas.quotas
        self._quotas_active = bool(q.per_request or q.per_type or q.per_application)
        self.monitors = config.resource_monitors if config.resource_monitors is not None \
            else self._default_monitors()
        self.strategies = config.allocation_strategies if config.allocation_strategies is not None \
            else self._default_strategies()
        for t, strategy in self.strategies.items():
            if not isinstance(strategy, AllocationStrategy):
                raise TypeError(f"strategy for {t} must be an AllocationStrategy, not {type(strategy).__name__}")
        self.strategies = {ResourceType.parse(t): s for t, s in self.strategies.items()}
        # types checked against their monitor before allocating (headroom configured)
        self._headroom_types = frozenset(t for t in self.config.headroom if t in self.monitors)
        self._default_duration = config.default_duration
        self._lock = threading.Lock()
        self._resize_lock = threading.Lock()  # a strategy never resizes and releases one handle at once
        table = core.AllocationTable(config.capacity)
        # PENDING records expire at their deadline, ALLOCATED ones after their duration;
        # a claimed (ACTIVE) allocation belongs to its consumer and never expires.
        ticker = core.ExpiryTicker(table, tick_ns=int(config.tick * 1e9),
                                   expire_from=[core.PENDING, core.ALLOCATED])
        self._closed = False
        self._core_setup(table, ticker)
        # The workers sleep in select() on eventfds: the ticker's (expiries), this one
        # (work from callers) and the stop fd below. No polling interval anywhere.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Written once at close and never read, so it stays readable and every worker
        # sees it (a wake on _wake_fd is consumed by whichever worker reads it first).
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"prealloc-worker-{self.id[:8]}-{i}", daemon=True)
                         for i in range(config.allocation_workers)]
        self._init_state()
        self.log.info("initialized %s %s (capacity %d, %d worker(s))", type(self).__name__, self.id,
                      config.capacity, len(self._workers))
        for worker in self._workers:
            worker.start()
        _open_allocators.add(self)

    # ------------------------------------------------------------------ defaults
    def _default_monitors(self) -> dict[ResourceType, Any]:
        from .monitors import SystemResourceMonitor

        monitor = SystemResourceMonitor()
        return {t: monitor for t in monitor.supported_types}

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import CpuAllocationStrategy, MemoryAllocationStrategy

        return {ResourceType.MEMORY: MemoryAllocationStrategy(), ResourceType.CPU: CpuAllocationStrategy()}

    # ------------------------------------------------------------------ the public face
    # request_preallocation and release_allocation are EngineCore's (compiled).

    # What initialize() may change on a running allocator; the rest shapes native
    # structures or threads made at construction.
    LIVE_OPTIONS = frozenset({"name", "description", "translator", "min_confidence", "immediate_processing",
                              "pending_timeout", "default_duration", "headroom", "predictor"})

    def initialize(self, config: PreallocatorConfig | None = None, **changes: Any) -> None:
        """The spec's initialize(config): applies configuration to the running allocator
        (the constructor applies the first one). Options in LIVE_OPTIONS take effect at
        once; asking to change any other (capacity, tick, strategies, monitors, quotas,
        emitter, ...) raises ValueError and changes nothing."""
        self._check_open()
        wanted = dict(changes)
        if config is not None:
            for name in PreallocatorConfig.__dataclass_fields__:
                value = getattr(config, name)
                if name in self.LIVE_OPTIONS or value is not getattr(self.config, name) \
                        and value != getattr(self.config, name):
                    wanted.setdefault(name, value)
        fixed = sorted(n for n in wanted if n not in self.LIVE_OPTIONS)
        unknown = sorted(n for n in wanted if n not in PreallocatorConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown configuration options {unknown}")
        if fixed:
            raise ValueError(f"{fixed} are fixed at construction; make a new allocator to change them")
        candidate = PreallocatorConfig(**{**self.config.__dict__, **wanted}).validate()
        old_predictor = self.config.predictor
        self.config = candidate
        self.name, self.description = candidate.name, candidate.description
        self._default_duration = candidate.default_duration
        self._headroom_types = frozenset(t for t in candidate.headroom if t in self.monitors)
        self._apply_live_config(old_predictor)
        self.log.info("reconfigured %s: %s", self.id, sorted(wanted))

    def _apply_live_config(self, old_predictor: Any) -> None:
        """A subclass's share of initialize()."""

    @property
    def closed(self) -> bool:
        return self._closed

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Listens to 'allocated', 'released', 'expired', 'failed' (each with a
        ResourceAllocation) or 'reset' (with the allocator's id)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events are {EVENTS}")
        return self.events.on(event, listener)

    def off(self, event: str, listener: Callable[..., Any]) -> bool:
        return self.events.off(event, listener)

    def claim(self, allocation_id: int) -> Claim:
        """The consumer takes a ready allocation: MEMORY gives its writable zero-copy
        buffer, CPU pins the calling thread (or the target process, already pinned).
        KeyError for an unknown id; ValueError when it is not ALLOCATED (claimed,
        released or expired already)."""
        self._check_open()
        try:
            won = self._table.transition_mask(allocation_id, _ALLOCATED, core.ACTIVE)
        except KeyError:
            raise KeyError(f"no allocation {allocation_id}") from None
        if not won:
            status = AllocationStatus(self._table.status(allocation_id))
            raise ValueError(f"allocation {allocation_id} is {status.name}, not ALLOCATED")
        return self._hand_over(allocation_id, preallocated=True)

    @abc.abstractmethod
    def acquire(self, resource_type: ResourceType | str, amount: float, *,
                target_application: str | None = None, target_process_id: int | None = None) -> Claim:
        """The moment of need: the consumer wants amount of resource_type now."""

    def adjust_allocation(self, allocation_id: int, new_amount: float) -> bool:
        """Grows or shrinks a live allocation in place (memory by mremap, cores added or
        given back). False when the id is not live, the strategy cannot, a quota or the
        machine says no; nothing changes then."""
        new_amount = check_amount("new_amount", new_amount)
        if new_amount == 0:
            raise ValueError("new_amount must be > 0; release the allocation instead")
        # One resize at a time, and never during the release of the same handle (which
        # takes this lock too), so the record read here stays current.
        with self._resize_lock:
            try:
                rec = self._table.get(allocation_id)
            except KeyError:
                return False
            if rec.status not in (core.ALLOCATED, core.ACTIVE):
                return False
            rtype = ResourceType(rec.resource_type)
            strategy = self.strategies.get(rtype)
            if strategy is None:
                return False
            application = self._owners[rec.owner]
            delta = new_amount - rec.allocated
            charge = delta if delta > 0 and self._quotas_active else 0.0
            if charge:
                try:
                    self.quotas.charge(rtype, application, charge, is_new_request=False)
                except QuotaExceeded as exc:
                    self.log.warning("adjust of %d refused: %s", allocation_id, exc)
                    return False
            try:
                if delta > 0 and rtype in self._headroom_types and not self._within_headroom(rtype, delta):
                    raise InsufficientResources(f"{rtype.name}: growth by {delta:g} would eat the headroom")
                effective = strategy.adjust(self._handles.get(allocation_id), new_amount)
            except AllocationError as exc:
                if charge:
                    self.quotas.refund(rtype, application, charge)
                self.log.warning("adjust of %d refused: %s", allocation_id, exc)
                return False
            if self._quotas_active:
                self._rebook(rtype, application, rec.allocated + charge, effective)
            now = core.monotonic_ns()
            with self._lock:
                before, since = self._amount_seconds_before_adjust.get(
                    allocation_id, (0.0, rec.allocated_ns))
                self._amount_seconds_before_adjust[allocation_id] = (
                    before + rec.allocated * (now - since) * NS, now)
            self._table.set_allocated(allocation_id, effective)
        self.metrics.record_metric("resource_adjusted", resource_type=rtype.name)
        self.log.info("adjusted allocation %d of %s: %g -> %g", allocation_id, rtype.name,
                      rec.allocated, effective)
        return True

    def get_allocation(self, allocation_id: int) -> ResourceAllocation | None:
        """A snapshot of a live allocation (or queued request), None if unknown."""
        try:
            return self._snapshot(self._table.get(allocation_id))
        except KeyError:
            return None

    def allocations(self, *statuses: AllocationStatus) -> list[ResourceAllocation]:
        """Snapshots of live allocations, optionally only those in statuses."""
        mask = core.status_mask(statuses) if statuses else core.LIVE_MASK
        out = []
        for rid in self._table.collect(mask=mask).tolist():
            snap = self.get_allocation(rid)
            if snap is not None:
                out.append(snap)
        return out

    def get_statistics(self) -> PreallocatorStatistics:
        t = self._tally()
        counts = self._table.counts()
        return PreallocatorStatistics(
            total_requests=t["total_requests"],
            successful_allocations=t["successful"],
            failed_allocations=t["failed"],
            average_allocation_time=t["allocation_seconds"] / t["successful"] if t["successful"] else 0.0,
            resource_hit_rate=t["hits"] / t["finished"] if t["finished"] else 0.0,
            resource_waste_rate=t["unused_amount_seconds"] / t["amount_seconds"] if t["amount_seconds"] else 0.0,
            allocations_by_type=t["by_type"],
            skipped_low_confidence=t["skipped_low_confidence"],
            expired=t["expired"],
            claimed=t["claimed"],
            released=t["released"],
            active_allocations=counts[core.ALLOCATED] + counts[core.ACTIVE],
            queued_requests=counts[core.PENDING],
        )

    def reset(self) -> None:
        """Withdraws every queued request and releases every allocation (claimed memory
        stays mapped until the consumer's last view is gone: nothing is pulled out from
        under a live buffer), then emits 'reset'."""
        self.log.info("resetting %s", self.id)
        self._before_reset()
        for rid in self._table.collect(mask=core.LIVE_MASK).tolist():
            self.release_allocation(rid, AllocationFeedback(used_successfully=False,
                                                            reason_for_release="reset"))
        self.events.emit("reset", self.id)

    def close(self) -> None:
        """Resets, stops the threads and frees the native objects. Idempotent."""
        if self._closed:
            return
        self.reset()
        self._closed = True
        _open_allocators.discard(self)
        self._stop_threads()
        self._drain_expired()
        self._ticker.close()
        closed: set[int] = set()
        for monitor in list(self.monitors.values()):
            if id(monitor) not in closed and hasattr(monitor, "close"):
                closed.add(id(monitor))
                monitor.close()
        for strategy in set(self.strategies.values()):
            strategy.close()
        self.log.info("closed %s", self.id)

    def __enter__(self) -> ResourceAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Live allocations and queued requests."""
        return len(self._table)

    # ------------------------------------------------------------------ the worker
    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except BlockingIOError:  # the counter is saturated: the worker is awake anyway
            pass

    def _work(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_fd, selectors.EVENT_READ)
        selector.register(self._ticker.fileno(), selectors.EVENT_READ)
        selector.register(self._stop_fd, selectors.EVENT_READ)
        try:
            while not self._stopping:
                selector.select()  # blocks until the core or a caller has something
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                if self._stopping:
                    break
                try:
                    self._drain_expired()
                    self._on_wake()
                except Exception:  # nothing a request does may stop the worker
                    self.log.exception("worker iteration failed")
        finally:
            selector.close()

    def _on_worker(self) -> bool:
        return threading.current_thread() in self._workers

    def _stop_threads(self) -> None:
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
        os.close(self._wake_fd)
        os.close(self._stop_fd)

    # ------------------------------------------------------------------ hooks of subclasses
    def _init_state(self) -> None:
        """A subclass's own state, set up before the worker starts."""

    def _on_wake(self) -> None:
        """The worker's work besides expiries."""

    def _before_reset(self) -> None:
        pass

    # ------------------------------------------------------------------ policy EngineCore calls
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} {self.id} is closed")

    def _charge(self, rtype: ResourceType, application: str | None, amount: float) -> str | None:
        """Books amount against the quotas; the reason when a quota refuses."""
        try:
            self.quotas.charge(rtype, application, amount)
        except QuotaExceeded as exc:
            return str(exc)
        return None

    def _rebook(self, rtype: ResourceType, application: str | None, booked: float, actual: float) -> None:
        """The quota ledger holds what was really reserved (a CPU request of 250 holds 300)."""
        if actual > booked:
            self.quotas.force(rtype, application, actual - booked)
        elif actual < booked:
            self.quotas.refund(rtype, application, booked - actual)

    def _within_headroom(self, rtype: ResourceType, amount: float) -> bool:
        headroom = self.config.headroom.get(rtype)
        monitor = self.monitors.get(rtype)
        if headroom is None or monitor is None:
            return True
        availability: ResourceAvailability = monitor.get_resource_availability(rtype)
        return availability.available - amount >= headroom * availability.total

    def _headroom_reason(self, rtype: ResourceType, amount: float) -> str:
        return (f"insufficient {rtype.name}: {amount:g} would leave less than the "
                f"{self.config.headroom[rtype]:.0%} headroom")

    def _give_back(self, strategy: AllocationStrategy, handle: Any) -> bool:
        if handle is None:
            return True
        try:
            with self._resize_lock:
                strategy.release(handle)
            return True
        except Exception:
            self.log.exception("%s failed to release %r", type(strategy).__name__, handle)
            return False

    def _learn(self, origin: tuple[str | None, tuple[str, ResourceType] | None],
               feedback: AllocationFeedback) -> None:
        """Feeds the outcome back: the adaptive sizer learns real use, and the predictor
        (the spec's predictor.updateModel) hears how its prediction turned out."""
        prediction_id, sizer_key = origin
        sizer = getattr(self.config.translator, "sizer", None)
        if sizer is not None and sizer_key is not None and feedback.actual_amount_used is not None:
            sizer.observe(sizer_key, feedback.actual_amount_used)
        predictor = self.config.predictor
        update = getattr(predictor, "update_model", None)
        if prediction_id is not None and callable(update):
            try:
                update(prediction_id, feedback)
            except Exception:
                self.log.exception("predictor.update_model raised for prediction %s", prediction_id)

    def _forget_pending(self, record_id: int) -> None:
        """Drops a subclass's per-request state of a request that ended before allocation."""

    def _note_failure(self, snapshot: ResourceAllocation, reason: str) -> None:
        self.metrics.record_metric("preallocation_failed", resource_type=snapshot.resource_type.name)
        self.log.warning("request %d for %g of %s failed: %s", snapshot.request_id,
                         snapshot.requested_amount, snapshot.resource_type.name, reason)
        self.events.emit("failed", snapshot)

    def _note_cancelled(self, rtype: ResourceType) -> None:
        self.metrics.record_metric("request_cancelled", resource_type=rtype.name)

    def _note_release_failed(self, rtype: ResourceType) -> None:
        self.metrics.record_metric("release_failed", resource_type=rtype.name)

    def _availability_changed(self) -> None:
        """Called after this allocator gave something back while requests wait."""

    def _hand_over(self, allocation_id: int, *, preallocated: bool) -> Claim:
        """After this thread won ALLOCATED -> ACTIVE: the strategy's claim."""
        rtype, handle = self._take_for_claim(allocation_id)
        try:
            resource = self.strategies[rtype].claim(handle) if handle is not None else None
        except Exception as exc:
            self.release_allocation(allocation_id, AllocationFeedback(
                used_successfully=False, reason_for_release=f"claim failed: {exc}"))
            raise AllocationError(f"claim of {allocation_id} failed: {exc}") from exc
        return Claim(self, allocation_id, rtype, resource, preallocated)


# from-masks of the transitions the engine makes here (transition_mask: the fast path)
_ALLOCATED = core.status_mask(core.ALLOCATED)


class ResourcePreallocator(ResourceAllocator):
    """Allocates ahead of need. ``handle_prediction`` translates a prediction into
    requests, queues them on the native priority queue and returns at once; a worker
    thread, woken by the core (an eventfd for new work, the expiry ticker's eventfd for
    expiries — no polling interval), allocates them in priority order. A request that
    must wait for resources is retried when availability changes and dropped at its
    deadline. The consumer then ``acquire``s (or ``claim``s) what is ready."""

    def _init_state(self) -> None:
        self.translator = self.config.translator
        self._queue = core.PriorityQueue(indexed=False)  # cancellation is lazy: the table's status
        self._queued: dict[int, ResourceRequest] = {}  # PENDING requests, queued or waiting
        self._retry = threading.Event()
        # Monitors are subscribed to only once a request has to wait for resources: until
        # then nothing needs to hear about changes, and a monitor's watcher thread costs.
        self._subscriptions: list[tuple[Any, Any]] | None = None
        self._connect_predictor()

    def _subscribe_to_monitors(self) -> None:
        self._subscriptions = []
        for rtype in self.strategies:
            monitor = self.monitors.get(rtype)
            if monitor is not None and rtype in getattr(monitor, "supported_types", ()):
                handle = monitor.subscribe_to_resource_changes(rtype, self._on_availability)
                self._subscriptions.append((monitor, handle))

    def _connect_predictor(self) -> None:
        predictor = self.config.predictor
        if predictor is not None and hasattr(predictor, "on"):
            predictor.on("prediction:generated", self.handle_prediction)
            self.log.info("subscribed to predictions from %s", getattr(predictor, "id", predictor))

    def _apply_live_config(self, old_predictor: Any) -> None:
        self.translator = self.config.translator
        if self.config.predictor is not old_predictor:
            if old_predictor is not None and hasattr(old_predictor, "off"):
                old_predictor.off("prediction:generated", self.handle_prediction)
            self._connect_predictor()

    # ------------------------------------------------------------------ predictions in
    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """Validates and translates a prediction and queues its requests; returns their
        allocation ids (PENDING now). A prediction below min_confidence is counted and
        skipped. ValueError for a bad prediction (nothing is queued)."""
        self._check_open()
        prediction.validate()
        if prediction.confidence < self.config.min_confidence:
            self._count("skipped_low_confidence")
            self.metrics.record_metric("prediction_skipped_low_confidence")
            self.log.debug("prediction %s skipped: confidence %.2f < %.2f", prediction.id,
                           prediction.confidence, self.config.min_confidence)
            return []
        if self.translator is None:
            raise ValueError("no translator configured: give PreallocatorConfig(translator=...)")
        requests = self.translator.translate(prediction)
        for request in requests:
            request.validate()
        ids = [self.submit(request, wake=False) for request in requests]
        if ids:
            self._wake()
        if self.config.immediate_processing:
            self._process_queue()
        return ids

    def submit(self, request: ResourceRequest, *, wake: bool = True) -> int:
        """Queues one request for the worker; returns its allocation id (PENDING)."""
        self._check_open()
        request.validate()
        record_id = self._admit(request)
        deadline = request.deadline
        if deadline is None:
            deadline = time.monotonic() + self.config.pending_timeout
        with self._lock:
            self._queued[record_id] = request
        self._ticker.schedule(record_id, deadline)
        self._queue.push(record_id, request.priority, request.confidence, request.deadline)
        self.metrics.record_metric("preallocation_request_generated",
                                   resource_type=request.resource_type.name,
                                   predictor=request.metadata.source_predictor_id)
        self.log.debug("queued request %d for %g of %s as %d", request.request_id,
                       request.predicted_need, request.resource_type.name, record_id)
        if wake:
            self._wake()
        return record_id

    def cancel_request(self, allocation_id: int) -> bool:
        """Withdraws a request that is still queued; False if it is not PENDING."""
        return self._cancel_pending(allocation_id)

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ the need
    def acquire(self, resource_type: ResourceType | str, amount: float, *,
                target_application: str | None = None, target_process_id: int | None = None) -> Claim:
        """Claims a ready allocation of resource_type holding at least amount for
        target_application (a hit: the resource was prepared ahead), or allocates now
        when none is ready (a miss). Raises AllocationError when it cannot be had."""
        self._check_open()
        rtype = ResourceType.parse(resource_type)
        amount = check_amount("amount", amount)
        rid = self._claim_ready(rtype, self._owner_key(target_application), amount)
        if rid:
            self.metrics.record_metric("preallocation_hit", resource_type=rtype.name)
            return self._hand_over(rid, preallocated=True)
        self.metrics.record_metric("preallocation_miss", resource_type=rtype.name)
        return _allocate_and_claim(self, rtype, amount, target_application, target_process_id)

    # ------------------------------------------------------------------ the worker
    def _on_availability(self, availability: ResourceAvailability) -> None:
        if self._waiting:
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
        self._process_queue()

    def _process_queue(self) -> None:
        # One worker takes requests in batches; several take one at a time, so that a
        # request is never held by a worker busy with a slow allocation.
        batch = 64 if len(self._workers) == 1 else 1
        while True:
            ids = self._queue.pop_many(batch)
            if ids.size == 0:
                return
            if batch == 1 and len(self._queue):
                # One read of the wake fd may have consumed several callers' wakes; pass
                # one on, so an idle worker takes what is left while this one allocates.
                self._wake()
            for rid in ids.tolist():
                with self._lock:
                    request = self._queued.pop(rid, None)
                if request is None:
                    continue  # withdrawn, dropped at its deadline, or taken by another thread
                try:
                    result = self._allocate(rid, request, True)
                except Exception:
                    self.log.exception("allocation of request %d failed", request.request_id)
                    self._fail(rid, "internal error; see the log")
                    continue
                if result is core.WAIT:
                    with self._lock:
                        # the status check and the insertion under one lock: a deadline
                        # expiry either happened before (not PENDING: drop it) or will
                        # find the request in _queued
                        if rid in self._table and self._table.status(rid) == core.PENDING:
                            self._queued[rid] = request
                            self._waiting.append(rid)
                    if self._subscriptions is None:
                        self._subscribe_to_monitors()

    def _requeue_waiting(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
            requests = [(rid, self._queued.get(rid)) for rid in waiting]
        for rid, request in requests:
            if request is not None:
                self._queue.push(rid, request.priority, request.confidence, request.deadline)

    def _forget_pending(self, record_id: int) -> None:
        with self._lock:
            self._queued.pop(record_id, None)

    def _before_reset(self) -> None:
        with self._lock:
            self._waiting = list[int]()
        # queued ids are withdrawn through their records; what stays in the native
        # queue is skipped by the worker (lazy cancellation)

    def _stop_threads(self) -> None:
        super()._stop_threads()
        for monitor, handle in self._subscriptions or ():
            monitor.unsubscribe(handle)
        self._subscriptions = None
        self._queue.pop_many(len(self._queue) + 1)


def _allocate_and_claim(allocator: ResourceAllocator, rtype: ResourceType, amount: float,
                        application: str | None, pid: int | None) -> Claim:
    """The reactive path: allocate at the moment of need, then hand over at once."""
    request = ResourceRequest(rtype, amount, confidence=1.0,
                              metadata=RequestMetadata(target_application=application,
                                                       target_process_id=pid))
    allocation = allocator.request_preallocation(request)
    if allocation.status is not AllocationStatus.ALLOCATED:
        raise AllocationError(allocation.failure_reason or f"{rtype.name} allocation failed")
    if not allocator._table.transition_mask(allocation.allocation_id, _ALLOCATED, core.ACTIVE):
        raise AllocationError(f"allocation {allocation.allocation_id} was taken before the claim")
    return allocator._hand_over(allocation.allocation_id, preallocated=False)


class MemoryPreallocator(ResourcePreallocator):
    """A preallocator of memory only: its requests of other types fail with "no strategy".
    memory_options go to MemoryAllocationStrategy (lock, require_lock, huge_pages, ...)."""

    def __init__(self, config: PreallocatorConfig | None = None, *, memory_options: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        self._memory_options = dict(memory_options or {})
        overrides.setdefault("name", "MemoryPreallocator")
        super().__init__(config, **overrides)

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import MemoryAllocationStrategy

        return {ResourceType.MEMORY: MemoryAllocationStrategy(**self._memory_options)}


class CpuSchedulerEnhancer(ResourcePreallocator):
    """A preallocator of CPU cores only (the spec's CPUSchedulerEnhancer): it pins target
    processes, or the claiming thread, to cores reserved ahead of a predicted burst."""

    def __init__(self, config: PreallocatorConfig | None = None, *, exclusive: bool = True,
                 **overrides: Any) -> None:
        self._exclusive = exclusive
        overrides.setdefault("name", "CpuSchedulerEnhancer")
        super().__init__(config, **overrides)

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .strategies import CpuAllocationStrategy

        return {ResourceType.CPU: CpuAllocationStrategy(exclusive=self._exclusive)}


class CustomResourceAllocator(ResourcePreallocator):
    """A preallocator whose strategies come from plugins (prealloc.plugins): the built-in
    MEMORY and CPU strategies, overridden and extended by every registered or installed
    plugin strategy."""

    def _default_strategies(self) -> dict[ResourceType, AllocationStrategy]:
        from .plugins import load_strategies

        return {**super()._default_strategies(), **load_strategies()}
