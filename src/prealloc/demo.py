"""The built-in demonstration: one prediction trace, replayed on this machine twice.

A predictor announces at time t that an application will be needed at t + lead. The
same workload runs first through :class:`~prealloc.ResourcePreallocator` (it reserves
memory and cores when the prediction arrives) and then through
:class:`~prealloc.ReactiveResourceAllocator` (it reserves them only when the need
arrives), with the real MEMORY and CPU strategies. For every need the latency from
the moment of need to a usable resource (every page written, the cores claimed) is
measured, and the allocators' own statistics (hit rate, waste, expiries) are read.

The trace is deterministic for a seed. Only two inputs come from the machine, and
both are explicit arguments of :func:`generate_trace`: the memory limit the trace's
peak must stay under, and the number of cores this process may use.

``prealloc demo`` (:mod:`prealloc.cli`) prints what :func:`run_demo` returns.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import random
import re
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import core
from .engine import Claim, PreallocatorConfig, ResourceAllocator, ResourcePreallocator
from .monitors import SystemResourceMonitor
from .reactive import ReactiveResourceAllocator
from .strategies import AllocationError, CpuAllocationStrategy, MemoryAllocationStrategy
from .strategies.cpu import cores_for
from .translate import AdaptiveSizer, RuleTranslator
from .types import (
    AllocationFeedback,
    AllocationStatus,
    PreallocatorStatistics,
    Prediction,
    ResourceAllocation,
    ResourceType,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
MEMORY, CPU = ResourceType.MEMORY, ResourceType.CPU


@dataclass(frozen=True, slots=True)
class App:
    """An application the predictor knows: what one launch of it needs (memory in
    MiB, CPU in percent of a core, 0 = none) and how urgent its rule's requests are."""

    name: str
    memory_mib: float
    cpu_percent: float = 0.0
    priority: float = 0.0


APPS: tuple[App, ...] = (
    App("editor", 256, 100, priority=2.0),
    App("browser", 128, 0, priority=1.0),
    App("compiler", 64, 200, priority=2.0),
    App("game", 384, 0, priority=3.0),
)

EVENTS_AT_SCALE_1 = 40
MIN_EVENTS = 5  # room for at least one right, one wrong and one low-confidence prediction
SECONDS_PER_EVENT = 0.075  # 40 events over 3 s; the rate stays put when scale changes the count
LEAD_S = (0.080, 0.300)  # prediction to need
HOLD_S = (0.050, 0.300)  # need to release
USE_SHARE = (0.6, 1.0)  # a launch's real need, as a share of the app's nominal memory
WRONG_SHARE = 0.2  # predictions whose need never arrives
LOW_CONFIDENCE_SHARE = 0.1  # predictions below MIN_CONFIDENCE (skipped by the preallocator)
MIN_CONFIDENCE = 0.5
CONFIDENT = (0.55, 0.98)
UNSURE = (0.15, 0.45)
# An unclaimed preallocation expires this long after it was made: a little longer
# than the longest lead plus the longest hold.
DURATION_S = LEAD_S[1] + HOLD_S[1] + 0.05
# Late wake-ups and allocation time stretch what a run holds beyond the trace's clock;
# the memory bound charges every holding this much longer.
TIMING_SLACK_S = 0.1
SIZER_MARGIN = 0.1  # AdaptiveSizer's margin: a learned size is at most (1 + margin) x the largest use
SAFE_SHARE = 0.25  # of the available memory, the most the trace may hold at its peak
SAFE_CAP_MIB = 1024.0
MIN_SAFE_MIB = 16.0  # below this the demo would measure page rounding, not allocation
PREDICTION_TYPE = "app_launch"


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One prediction (made ``at`` seconds into the run) and, when it ``arrives``, its
    need at ``at + lead``: ``need_mib`` of memory (and the app's CPU), held ``hold``
    seconds. ``use`` is need_mib over the app's (scaled) nominal memory."""

    index: int
    at: float
    app: str
    lead: float
    confidence: float
    arrives: bool
    hold: float
    use: float
    need_mib: float

    @property
    def need_at(self) -> float:
        return self.at + self.lead

    @property
    def low_confidence(self) -> bool:
        return self.confidence < MIN_CONFIDENCE


@dataclass(frozen=True, slots=True)
class Trace:
    seed: int
    scale: float
    events: tuple[TraceEvent, ...]
    apps: dict[str, App]  # memory already multiplied by memory_factor, CPU capped at the cores
    memory_factor: float
    memory_limit_mib: float
    peak_memory_mib: float  # the bound of what the run can hold at once, after scaling
    cores: int
    peak_cores: int

    @property
    def span(self) -> float:
        return max((e.at for e in self.events), default=0.0)

    @property
    def needs(self) -> list[TraceEvent]:
        return [e for e in self.events if e.arrives]

    @property
    def wrong(self) -> int:
        return sum(not e.arrives for e in self.events)

    @property
    def low_confidence(self) -> int:
        return sum(e.low_confidence for e in self.events)


def _peak(intervals: Iterable[tuple[float, float, float]]) -> float:
    """The largest sum of amounts over (start, end, amount) intervals alive at one
    instant; an interval ending where another starts does not overlap it."""
    edges: list[tuple[float, int, float]] = []
    for start, end, amount in intervals:
        edges.append((start, 1, amount))
        edges.append((end, 0, -amount))  # 0 sorts ends before starts at the same instant
    level = peak = 0.0
    for _, _, delta in sorted(edges):
        level += delta
        peak = max(peak, level)
    return peak


def _holding_intervals(events: Sequence[TraceEvent], amount_of_prealloc: dict[str, float],
                       amount_of_need: dict[str, float]) -> list[tuple[float, float, float]]:
    """What a run can hold at once, as intervals. Every live allocation is either
    unclaimed — made for a prediction at ``at`` no earlier, and gone by its expiry at
    most ``lead + duration`` later (it is made by the deadline at the latest) — or
    claimed by one need for at most that need's hold. So charging every confident
    prediction its preallocation over [at, at + lead + duration] and every need the
    largest thing it can hold over [need_at, need_at + hold], each TIMING_SLACK_S
    longer, bounds both runs."""
    intervals = []
    for e in events:
        if not e.low_confidence and amount_of_prealloc[e.app] > 0:
            intervals.append((e.at, e.at + e.lead + DURATION_S + TIMING_SLACK_S, amount_of_prealloc[e.app]))
        if e.arrives and amount_of_need[e.app] > 0:
            intervals.append((e.need_at, e.need_at + e.hold + TIMING_SLACK_S, amount_of_need[e.app]))
    return intervals


def generate_trace(seed: int = 7, scale: float = 1.0, *, memory_limit_mib: float = SAFE_CAP_MIB,
                   cores: int = 1, apps: Sequence[App] = APPS) -> Trace:
    """The demo's workload: round(40 x scale) predictions (at least MIN_EVENTS), one
    every 75 ms on average, the same for the same seed and scale. Exactly
    round(20%) of them (at least one) are wrong and round(10%) (at least one) are
    confident below MIN_CONFIDENCE; those are right. Memory sizes are multiplied by
    one factor (at most 1) so the run never holds more than memory_limit_mib at once;
    CPU needs are capped at ``cores`` cores."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, not {scale!r}")
    if not (isinstance(memory_limit_mib, (int, float)) and memory_limit_mib > 0):
        raise ValueError(f"memory_limit_mib must be > 0, not {memory_limit_mib!r}")
    if not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be an int >= 1, not {cores!r}")
    rng = random.Random(seed)
    n = max(MIN_EVENTS, round(EVENTS_AT_SCALE_1 * scale))
    n_wrong = max(1, round(WRONG_SHARE * n))
    n_low = max(1, round(LOW_CONFIDENCE_SHARE * n))
    # chosen rather than drawn one by one, so a short trace still has both kinds and
    # the shares are what they say
    special = rng.sample(range(n), n_wrong + n_low)
    wrong, low = set(special[:n_wrong]), set(special[n_wrong:])
    times = sorted(rng.uniform(0.0, n * SECONDS_PER_EVENT) for _ in range(n))
    raw = []
    for i, at in enumerate(times):
        app = rng.choice(apps)
        raw.append(TraceEvent(
            index=i, at=round(at, 6), app=app.name, lead=round(rng.uniform(*LEAD_S), 6),
            confidence=round(rng.uniform(*(UNSURE if i in low else CONFIDENT)), 4),
            arrives=i not in wrong, hold=round(rng.uniform(*HOLD_S), 6),
            use=round(rng.uniform(*USE_SHARE), 4), need_mib=0.0))

    # A preallocation is at most (1 + margin) x the largest use the sizer saw (or the
    # template before it learned), and a need holds at most the preallocation it claimed.
    largest = {a.name: a.memory_mib * (1.0 + SIZER_MARGIN) for a in apps}
    nominal_peak = _peak(_holding_intervals(raw, largest, largest))
    factor = min(1.0, memory_limit_mib / nominal_peak) if nominal_peak > 0 else 1.0
    scaled = {a.name: dataclasses.replace(a, memory_mib=a.memory_mib * factor,
                                          cpu_percent=float(min(a.cpu_percent, 100.0 * cores)))
              for a in apps}
    events = tuple(dataclasses.replace(e, need_mib=scaled[e.app].memory_mib * e.use) for e in raw)
    largest_scaled = {name: a.memory_mib * (1.0 + SIZER_MARGIN) for name, a in scaled.items()}
    core_count = {name: float(cores_for(a.cpu_percent)) if a.cpu_percent > 0 else 0.0
                  for name, a in scaled.items()}
    return Trace(
        seed=seed, scale=float(scale), events=events, apps=scaled, memory_factor=factor,
        memory_limit_mib=float(memory_limit_mib),
        peak_memory_mib=_peak(_holding_intervals(events, largest_scaled, largest_scaled)),
        cores=cores, peak_cores=int(_peak(_holding_intervals(events, core_count, core_count))))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks
    (numpy's default method); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], not {q!r}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def build_translator(apps: Iterable[App], sizer: AdaptiveSizer | None = None) -> RuleTranslator:
    """One rule per app: its memory (sized by the sizer once it has learned) and its
    cores, both expiring DURATION_S after allocation when nobody claims them."""
    rules = []
    for app in apps:
        requests: list[dict[str, Any]] = [
            {"resource_type": "MEMORY", "need": app.memory_mib, "duration": DURATION_S,
             "priority": app.priority}]
        if app.cpu_percent > 0:
            # not adaptive: the sizer's margin on 100 % would ask for a second core
            requests.append({"resource_type": "CPU", "need": app.cpu_percent, "duration": DURATION_S,
                             "priority": app.priority, "adaptive": False})
        rules.append({"name": f"launch-{app.name}",
                      "match": {"type": PREDICTION_TYPE, "target_application": app.name},
                      "request": requests})
    return RuleTranslator.from_dict({"rule": rules}, sizer=sizer)


# ---------------------------------------------------------------------------------------
# the machine


def thp_mode() -> str:
    """'always', 'madvise', 'never' or 'unavailable'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else "unknown"


def _has_cap_ipc_lock() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 14 & 1)  # CAP_IPC_LOCK = 14
    except (OSError, ValueError):
        pass
    return False


def mlock_status(peak_bytes: int) -> tuple[bool, str]:
    """Whether mlock would hold the run's peak, and why: a one-page probe (containers
    may refuse mlock outright), then CAP_IPC_LOCK or RLIMIT_MEMLOCK against the peak."""
    probe = core.reserve_memory(core.page_size(), lock=True)
    try:
        locked, error = probe.locked, probe.lock_error
    finally:
        probe.release()
    if not locked:
        return False, f"refused: {os.strerror(error) if error else 'unknown reason'}"
    if _has_cap_ipc_lock():
        return True, "CAP_IPC_LOCK"
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return True, "RLIMIT_MEMLOCK unlimited"
    if soft >= peak_bytes:
        return True, f"RLIMIT_MEMLOCK {soft / MiB:.0f} MiB covers the peak"
    return False, (f"partly: RLIMIT_MEMLOCK {soft / MiB:.0f} MiB < peak {peak_bytes / MiB:.0f} MiB; "
                   "allocations beyond it stay unlocked")


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True, slots=True)
class Machine:
    cores_usable: int
    cores_online: int
    memory_total_mib: float
    memory_available_mib: float  # psutil's, with cgroup limits applied
    thp: str

    @classmethod
    def probe(cls) -> Machine:
        monitor = SystemResourceMonitor()
        try:
            total, available = monitor.memory_bytes()
        finally:
            monitor.close()
        return cls(cores_usable=len(os.sched_getaffinity(0)), cores_online=os.cpu_count() or 1,
                   memory_total_mib=total / MiB, memory_available_mib=available / MiB, thp=thp_mode())

    def safe_memory_mib(self, headroom: float = 0.0) -> float:
        """The most the demo may hold at once: min(25% of the available memory, 1 GiB),
        and never so much that less than ``headroom`` of the total would stay
        available (the allocators refuse allocations beyond their headroom)."""
        return max(0.0, min(SAFE_SHARE * self.memory_available_mib, SAFE_CAP_MIB,
                            self.memory_available_mib - headroom * self.memory_total_mib))


# ---------------------------------------------------------------------------------------
# the replay


@dataclass(slots=True)
class _NeedOutcome:
    latency_ns: int | None  # None: the need could not be served
    claims: int
    claims_preallocated: int
    error: str | None = None


@dataclass
class RunResult:
    """One allocator's run: what the consumer saw, and the allocator's statistics read
    after every allocation had ended (released or expired), before close."""

    label: str
    allocator: str
    needs: int
    needs_served: int
    needs_failed: int
    claims: int
    claims_preallocated: int
    latencies_ns: list[int]
    statistics: PreallocatorStatistics
    memory_allocations: int = 0
    memory_locked: int = 0
    memory_peak_mib: float = 0.0  # the most MEMORY the allocator held at once
    live_before_close: int = 0
    live_after_close: int = 0
    wall_s: float = 0.0
    schedule_lag_max_ms: float = 0.0
    learned_sizes_mib: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """Share of the consumer's claims that were ready before the need."""
        return self.claims_preallocated / self.claims if self.claims else 0.0

    def latency_ms(self, q: float) -> float | None:
        value = percentile(self.latencies_ns, q)
        return None if value is None else value / 1e6


class _MemoryLedger:
    """What the allocator's events say about its memory: how many allocations, how
    many locked, and the most held at once (which the trace's bound must cover)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # events come from the worker and the consumers' threads
        self.count = self.locked = 0
        self.held_mib = self.peak_mib = 0.0

    def allocated(self, allocation: ResourceAllocation) -> None:
        if allocation.resource_type is MEMORY:
            with self._lock:
                self.count += 1
                self.locked += bool(allocation.details.get("locked"))
                self.held_mib += allocation.allocated_amount
                self.peak_mib = max(self.peak_mib, self.held_mib)

    def ended(self, allocation: ResourceAllocation) -> None:
        # a failed request never held anything; released and expired ones did
        if allocation.resource_type is MEMORY and allocation.allocated_at is not None \
                and allocation.status is not AllocationStatus.FAILED:
            with self._lock:
                self.held_mib -= allocation.allocated_amount


def _serve(allocator: ResourceAllocator, event: TraceEvent, app: App, page: int) -> _NeedOutcome:
    """The consumer of one need: acquire, make usable, hold, release with real use."""
    claims: list[tuple[Claim, float]] = []
    used_successfully = False
    try:
        start = time.perf_counter_ns()  # the moment of need
        try:
            memory = allocator.acquire(MEMORY, event.need_mib, target_application=app.name)
            claims.append((memory, event.need_mib))
            if app.cpu_percent > 0:
                # the claim pins this thread to the cores, so the page writes run there
                claims.append((allocator.acquire(CPU, app.cpu_percent, target_application=app.name),
                               app.cpu_percent))
        except AllocationError as exc:
            log.warning("%s: need %d (%s) not served: %s", allocator.name, event.index, app.name, exc)
            return _NeedOutcome(None, len(claims), sum(c.preallocated for c, _ in claims), str(exc))
        # usable = one byte written to every page the need uses (a preallocated buffer
        # may be larger than the need; the consumer touches only what it uses)
        nbytes = min(memory.resource.size, math.ceil(event.need_mib * MiB))
        pages = np.frombuffer(memory.resource, dtype=np.uint8, count=nbytes)
        pages[::page] = 1
        del pages  # no view may outlive the claim, or the unmap waits for it
        latency = time.perf_counter_ns() - start
        time.sleep(event.hold)  # the application's work
        used_successfully = True
        return _NeedOutcome(latency, len(claims), sum(c.preallocated for c, _ in claims))
    finally:
        for claim, amount in claims:
            claim.release(AllocationFeedback(
                used_successfully=used_successfully,
                actual_duration=event.hold if used_successfully else None,
                actual_amount_used=amount if used_successfully else None,
                reason_for_release="done" if used_successfully else "need not served"))


def replay(allocator: ResourcePreallocator | ReactiveResourceAllocator, trace: Trace, label: str, *,
           sizer: AdaptiveSizer | None = None) -> RunResult:
    """Drives the trace through allocator in real time and collects what happened.

    A driver thread sleeps until each event's time (the workload's own clock) and
    hands predictions to the allocator on the spot; needs run on a thread pool large
    enough that holds overlap as the trace says. Afterwards it waits until every
    allocation has ended by release or expiry, so the statistics are complete."""
    page = core.page_size()
    needs = trace.needs
    schedule = sorted([(e.at, 0, e.index) for e in trace.events] + [(e.need_at, 1, e.index) for e in needs])
    by_index = {e.index: e for e in trace.events}
    pool_size = min(32, 2 + int(_peak((e.need_at, e.need_at + e.hold, 1.0) for e in needs)))
    memory = _MemoryLedger()
    ended = threading.Condition()

    def on_ended(allocation: ResourceAllocation) -> None:
        memory.ended(allocation)
        with ended:
            ended.notify_all()

    allocator.on("allocated", memory.allocated)
    for event_name in ("released", "expired", "failed"):
        allocator.on(event_name, on_ended)

    futures: list[Future[_NeedOutcome]] = []
    lag = [0.0]
    driver_error: list[Exception] = []
    log.info("%s: replaying %d predictions and %d needs on %d threads", label, len(trace.events),
             len(needs), pool_size)
    with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix=f"demo-{label}") as pool:
        origin = time.monotonic()

        def drive() -> None:
            try:
                for at, kind, index in schedule:
                    delay = origin + at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    lag[0] = max(lag[0], time.monotonic() - origin - at)
                    event = by_index[index]
                    if kind == 0:
                        allocator.handle_prediction(Prediction(
                            id=f"{label}-{index}", type=PREDICTION_TYPE, predicted_value=event.app,
                            confidence=event.confidence, expected_at=origin + event.need_at,
                            target_application=event.app, source_predictor_id="demo-trace"))
                    else:
                        futures.append(pool.submit(_serve, allocator, event, trace.apps[event.app], page))
            except Exception as exc:  # re-raised on the caller's thread
                driver_error.append(exc)

        driver = threading.Thread(target=drive, name=f"demo-driver-{label}")
        driver.start()
        driver.join()
        outcomes = [f.result() for f in futures]  # a consumer's unexpected error propagates
    if driver_error:
        raise driver_error[0]

    # the last unclaimed preallocation can outlive the last need; wait for its expiry
    # (the 'ended' events wake this early; the timeout covers the record removal that
    # follows an event)
    latest_end = max((e.need_at + DURATION_S for e in trace.events), default=0.0) + 1.0
    with ended:
        while len(allocator) and time.monotonic() < origin + latest_end:
            ended.wait(0.02)
    wall = time.monotonic() - origin
    live = len(allocator)
    if live:
        log.warning("%s: %d allocations still live after the trace; close releases them", label, live)

    served = [o for o in outcomes if o.latency_ns is not None]
    learned: dict[str, float] = {}
    if sizer is not None:
        for key, size in sizer.snapshot().items():  # keys are (rule name, resource type)
            if isinstance(key, tuple) and key[1] is MEMORY:
                learned[str(key[0])] = size
    return RunResult(
        label=label, allocator=type(allocator).__name__, needs=len(needs), needs_served=len(served),
        needs_failed=len(outcomes) - len(served), claims=sum(o.claims for o in outcomes),
        claims_preallocated=sum(o.claims_preallocated for o in outcomes),
        latencies_ns=[o.latency_ns for o in served if o.latency_ns is not None],
        statistics=allocator.get_statistics(), memory_allocations=memory.count,
        memory_locked=memory.locked, memory_peak_mib=memory.peak_mib, live_before_close=live, wall_s=wall,
        schedule_lag_max_ms=lag[0] * 1e3, learned_sizes_mib=learned,
        errors=[o.error for o in outcomes if o.error])


@dataclass
class DemoReport:
    machine: Machine
    trace: Trace
    lock: bool
    memory_headroom: float  # the allocators' MEMORY headroom, a fraction of the total
    mlock_effective: bool
    mlock_detail: str
    runs: list[RunResult]
    rss_before_bytes: int
    rss_after_bytes: int

    @property
    def p50_ratio(self) -> float | None:
        """Reactive p50 over preallocated p50; None when either is missing or zero."""
        pre, reactive = (run.latency_ms(50) for run in self.runs[:2])
        if not pre or reactive is None:
            return None
        return reactive / pre


def _strategies(lock: bool, exclusive_cores: bool) -> dict[ResourceType, Any]:
    return {MEMORY: MemoryAllocationStrategy(populate=True, lock=lock),
            CPU: CpuAllocationStrategy(exclusive=exclusive_cores)}


def run_demo(*, scale: float = 1.0, seed: int = 7, lock: bool = False) -> DemoReport:
    """Generates the trace for this machine and replays it through the preallocator,
    then the reactive allocator. Both are closed before it returns (or raises)."""
    machine = Machine.probe()
    headroom = PreallocatorConfig().headroom.get(MEMORY, 0.0)  # the allocators' default, which both use
    limit = machine.safe_memory_mib(headroom)
    if limit < MIN_SAFE_MIB:
        raise RuntimeError(f"too little memory available for the demo: {machine.memory_available_mib:.0f} MiB "
                           f"available of {machine.memory_total_mib:.0f} MiB leaves {limit:.0f} MiB "
                           f"(at least {MIN_SAFE_MIB:.0f} MiB needed)")
    trace = generate_trace(seed, scale, memory_limit_mib=limit, cores=machine.cores_usable)
    mlock_effective, mlock_detail = mlock_status(math.ceil(trace.peak_memory_mib * MiB))
    # Exclusive cores where the trace's worst overlap fits the machine; otherwise the
    # cores are shared, or most CPU needs would fail on contention rather than show latency.
    exclusive = trace.peak_cores <= machine.cores_usable
    log.info("trace: %d events, memory factor %.3f, peak %.0f MiB (limit %.0f), %s cores",
             len(trace.events), trace.memory_factor, trace.peak_memory_mib, trace.memory_limit_mib,
             "exclusive" if exclusive else "shared")
    gc.collect()
    rss_before = vm_rss_bytes()
    runs = []
    sizer = AdaptiveSizer(margin=SIZER_MARGIN)
    pre = ResourcePreallocator(translator=build_translator(trace.apps.values(), sizer),
                               min_confidence=MIN_CONFIDENCE,
                               allocation_strategies=_strategies(lock, exclusive))
    try:
        runs.append(replay(pre, trace, "preallocated", sizer=sizer))
    finally:
        pre.close()
    runs[-1].live_after_close = len(pre)
    reactive = ReactiveResourceAllocator(min_confidence=MIN_CONFIDENCE,
                                         allocation_strategies=_strategies(lock, exclusive))
    try:
        runs.append(replay(reactive, trace, "reactive"))
    finally:
        reactive.close()
    runs[-1].live_after_close = len(reactive)
    gc.collect()
    return DemoReport(machine=machine, trace=trace, lock=lock, memory_headroom=headroom,
                      mlock_effective=mlock_effective, mlock_detail=mlock_detail, runs=runs,
                      rss_before_bytes=rss_before, rss_after_bytes=vm_rss_bytes())


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def report_as_dict(report: DemoReport) -> dict[str, Any]:
    """The report as plain JSON-ready data (what ``prealloc demo --json`` prints)."""
    t, m = report.trace, report.machine
    allocators = {}
    for run in report.runs:
        s = run.statistics
        allocators[run.label] = {
            "allocator": run.allocator,
            "needs": run.needs,
            "needs_served": run.needs_served,
            "needs_failed": run.needs_failed,
            "claims": run.claims,
            "claims_preallocated": run.claims_preallocated,
            "claims_not_preallocated": run.claims - run.claims_preallocated,
            "hit_rate": round(run.hit_rate, 4),
            "engine_hit_rate": round(s.resource_hit_rate, 4),
            "waste_rate": round(s.resource_waste_rate, 4),
            "latency_ms": {"p50": _round(run.latency_ms(50)), "p99": _round(run.latency_ms(99)),
                           "max": _round(run.latency_ms(100)),
                           "mean": _round(sum(run.latencies_ns) / len(run.latencies_ns) / 1e6)
                           if run.latencies_ns else None},
            "allocations_by_type": {t_.name: n for t_, n in sorted(s.allocations_by_type.items())},
            "total_requests": s.total_requests,
            "successful_allocations": s.successful_allocations,
            "failed_allocations": s.failed_allocations,
            "skipped_low_confidence": s.skipped_low_confidence,
            "expired": s.expired,
            "claimed": s.claimed,
            "released": s.released,
            "average_allocation_ms": round(s.average_allocation_time * 1e3, 3),
            "memory_allocations": run.memory_allocations,
            "memory_locked": run.memory_locked,
            "memory_peak_mib": round(run.memory_peak_mib, 1),
            "live_before_close": run.live_before_close,
            "live_after_close": run.live_after_close,
            "learned_sizes_mib": {k: round(v, 2) for k, v in run.learned_sizes_mib.items()},
            "wall_s": round(run.wall_s, 3),
            "schedule_lag_max_ms": round(run.schedule_lag_max_ms, 3),
            "errors": run.errors,
        }
    return {
        "machine": {
            "cores_usable": m.cores_usable, "cores_online": m.cores_online,
            "memory_total_mib": round(m.memory_total_mib, 1),
            "memory_available_mib": round(m.memory_available_mib, 1),
            "thp": m.thp, "mlock_requested": report.lock, "mlock_effective": report.mlock_effective,
            "mlock_detail": report.mlock_detail,
        },
        "trace": {
            "seed": t.seed, "scale": t.scale, "events": len(t.events), "span_s": round(t.span, 3),
            "needs": len(t.needs), "wrong": t.wrong, "low_confidence": t.low_confidence,
            "min_confidence": MIN_CONFIDENCE,
            "memory_headroom": report.memory_headroom,
            "memory_factor": round(t.memory_factor, 4), "memory_limit_mib": round(t.memory_limit_mib, 1),
            "peak_memory_mib": round(t.peak_memory_mib, 1), "peak_cores": t.peak_cores,
            "cores_exclusive": t.peak_cores <= m.cores_usable,
            "apps": {a.name: {"memory_mib": round(a.memory_mib, 2), "cpu_percent": a.cpu_percent}
                     for a in t.apps.values()},
        },
        "allocators": allocators,
        "p50_ratio": _round(report.p50_ratio, 2),
        "rss_mib": {"before": round(report.rss_before_bytes / MiB, 1),
                    "after": round(report.rss_after_bytes / MiB, 1)},
    }
