"""The built-in demonstration: one prediction trace, replayed on this machine by three
consumers, interleaved over rounds.

A predictor announces at time t that an application will be needed at t + lead. The
same workload runs through :class:`~prealloc.ResourcePreallocator` (it reserves memory
and cores when the prediction arrives), through
:class:`~prealloc.ReactiveResourceAllocator` (it reserves them only when the need
arrives), and through what a user does without this library: ``np.empty`` at the need
(glibc's malloc, which reuses freed blocks warm below its mmap threshold). For every
need the latency from the moment of need to a *usable* resource is measured: one full
first pass of writes over the bytes the need uses (and, for the allocators, the CPU
claim that pins the consumer's thread). The variants run in an order rotated every
round, so the machine's drift falls on each alike; percentiles are over every need of
every round (n is printed with them). The allocators' own statistics are read once
every allocation has ended: ``need_hit_rate`` (share of acquire() calls served by a
ready preallocation), ``resource_hit_rate`` (share of finished preallocations that were
used) and ``waste_rate_by_type`` (unused amount x time over held amount x time, per
resource type, because MiB x s and % of a core x s do not add up).

The trace is deterministic for a seed. Only two inputs come from the machine, and
both are explicit arguments of :func:`generate_trace`: the memory limit the trace's
peak must stay under, and the number of cores this process may use.

With ``predictor="markov"`` (``prealloc demo --predictor markov``) the preallocator's
predictions come from the built-in :class:`~prealloc.predict.MarkovPredictor` instead of
the trace: each served need is ``observe``d, the model predicts the next one, and the
allocator tells it how each prediction's request ended (``update_model``). The trace's
applications then follow a habit (each need is followed by its application's successor
with probability ``MARKOV_HABIT``, else by a random one), since a chain learns nothing
from applications drawn independently; the trace's own predictions are not used.

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
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import core
from ._threads import QuietThreadPoolExecutor, start_quiet
from .engine import Claim, PreallocatorConfig, ResourceAllocator, ResourcePreallocator
from .monitors import SystemResourceMonitor
from .reactive import ReactiveResourceAllocator
from .strategies import AllocationError, CpuAllocationStrategy, MemoryAllocationStrategy
from .strategies.cpu import cores_for
from .predict import MarkovPredictor, prediction_type
from .translate import HOST_WARM_MEMORY_MIB, AdaptiveSizer, RuleTranslator
from .types import (
    AllocationFeedback,
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
# How long after the trace's last expiry a run still waits for its allocations to end
# (they all expire; this only bounds a broken expiry path, which the report shows).
EXPIRY_GRACE_S = 60.0
SIZER_MARGIN = 0.1  # AdaptiveSizer's margin: a learned size is at most (1 + margin) x the largest use
SAFE_SHARE = 0.25  # of the available memory, the most the trace may hold at its peak
SAFE_CAP_MIB = 1024.0
MIN_SAFE_MIB = 16.0  # below this the demo would measure page rounding, not allocation
PREDICTION_TYPE = "app_launch"
PREDICTORS = ("trace", "markov")
MARKOV_HABIT = 0.8  # markov mode: the share of needs that follow their predecessor's successor


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
                   cores: int = 1, apps: Sequence[App] = APPS, habit: float = 0.0) -> Trace:
    """The demo's workload: round(40 x scale) predictions (at least MIN_EVENTS), one
    every 75 ms on average, the same for the same seed and scale. Exactly
    round(20%) of them (at least one) are wrong and round(10%) (at least one) are
    confident below MIN_CONFIDENCE; those are right. Memory sizes are multiplied by
    one factor (at most 1) so the run never holds more than memory_limit_mib at once;
    CPU needs are capped at ``cores`` cores. ``habit`` > 0: in the order the needs
    arrive, each need's application is, with that probability, the successor (in
    ``apps``) of the previous need's (drawn from a generator of its own, so the rest of
    the trace is the same as with habit 0)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, not {scale!r}")
    if not (isinstance(memory_limit_mib, (int, float)) and memory_limit_mib > 0):
        raise ValueError(f"memory_limit_mib must be > 0, not {memory_limit_mib!r}")
    if not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be an int >= 1, not {cores!r}")
    if isinstance(habit, bool) or not isinstance(habit, (int, float)) or not 0.0 <= habit <= 1.0:
        raise ValueError(f"habit must be a number in [0, 1], not {habit!r}")
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
    if habit > 0:
        habit_rng = random.Random(seed + 0x5EED)
        names = [a.name for a in apps]
        previous: str | None = None
        for i in sorted((e.index for e in raw if e.arrives), key=lambda k: raw[k].need_at):
            if previous is not None and habit_rng.random() < habit:
                raw[i] = dataclasses.replace(raw[i], app=names[(names.index(previous) + 1) % len(names)])
            previous = raw[i].app

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


def build_translator(apps: Iterable[App], sizer: AdaptiveSizer | None = None, *,
                     duration: float = DURATION_S) -> RuleTranslator:
    """One rule per app: its memory (sized by the sizer once it has learned) and its
    cores, both expiring ``duration`` seconds after allocation when nobody claims them."""
    rules = []
    for app in apps:
        requests: list[dict[str, Any]] = [
            {"resource_type": "MEMORY", "need": app.memory_mib, "duration": duration,
             "priority": app.priority}]
        if app.cpu_percent > 0:
            # not adaptive: the sizer's margin on 100 % would ask for a second core
            requests.append({"resource_type": "CPU", "need": app.cpu_percent, "duration": duration,
                             "priority": app.priority, "adaptive": False})
        rules.append({"name": f"launch-{app.name}",
                      "match": {"type": PREDICTION_TYPE, "target_application": app.name},
                      "request": requests})
    return RuleTranslator.from_dict({"rule": rules}, sizer=sizer)


def build_markov_translator(apps: Iterable[App], sizer: AdaptiveSizer | None = None, *,
                            duration: float = DURATION_S) -> RuleTranslator:
    """The rules for MarkovPredictor's predictions (``resource_usage:MEMORY`` for an
    application, the amount as the value): that memory and the application's cores."""
    rules = []
    for app in apps:
        requests: list[dict[str, Any]] = [
            {"resource_type": "MEMORY", "need_from_value": True, "duration": duration, "priority": app.priority}]
        if app.cpu_percent > 0:
            requests.append({"resource_type": "CPU", "need": app.cpu_percent, "duration": duration,
                             "priority": app.priority, "adaptive": False})
        rules.append({"name": f"markov-{app.name}",
                      "match": {"type": prediction_type(MEMORY), "target_application": app.name},
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

PREALLOCATED, REACTIVE, PLAIN = "preallocated", "reactive", "plain"
VARIANTS = (PREALLOCATED, REACTIVE, PLAIN)
DEFAULT_ROUNDS = 4
# glibc's malloc serves blocks below its mmap threshold from the heap, and the threshold
# rises to the size of any mmap'ed block freed, up to DEFAULT_MMAP_THRESHOLD_MAX (32 MiB
# on 64-bit): below it, a block freed by one need is handed warm to the next.
HOST_WARM_MIB = HOST_WARM_MEMORY_MIB
WRITE_BYTE = 0x5A


def _malloc_trim() -> None:
    """Hands glibc's free heap memory back to the kernel (what the plain variant's freed
    buffers leave), so VmRSS after the demo measures leaks, not the heap's cache."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def malloc_free_bytes() -> int | None:
    """Bytes glibc's malloc holds free in its arenas (mallinfo2's fordblks; glibc >=
    2.33), None elsewhere. The plain variant's freed buffers stay there, resident, even
    after malloc_trim — a cache that warms the next np.empty, not a leak — so the
    demo reports it beside VmRSS."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = MallInfo2
        return int(mallinfo2().fordblks)
    except (OSError, AttributeError):
        return None


@dataclass(slots=True)
class _NeedOutcome:
    app: str
    latency_ns: int | None  # None: the need could not be served
    claims: int = 0
    claims_preallocated: int = 0
    error: str | None = None


def _reason(exc: BaseException) -> str:
    """A failure's reason without the numbers that make every instance unique (ids,
    sizes), so equal causes are counted together."""
    text = re.sub(r"\d+(\.\d+)?", "N", str(exc)) or type(exc).__name__
    return text if len(text) <= 90 else text[:87] + "..."


def _first_pass(buffer: Any, nbytes: int) -> None:
    """Usable = one full first pass of writes over the bytes the need uses (a consumer
    that only wrote a byte per page would hide the cost of the pass itself)."""
    array = np.frombuffer(buffer, dtype=np.uint8, count=nbytes)
    array.fill(WRITE_BYTE)
    del array  # no view may outlive the claim, or the unmap waits for it


def _serve_plain(event: TraceEvent, app: App) -> _NeedOutcome:
    """What a user does without this library: np.empty and the first pass."""
    nbytes = math.ceil(event.need_mib * MiB)
    start = time.perf_counter_ns()  # the moment of need
    try:
        buffer = np.empty(nbytes, dtype=np.uint8)
        buffer.fill(WRITE_BYTE)
    except MemoryError as exc:
        return _NeedOutcome(app.name, None, error=_reason(exc) or "MemoryError")
    latency = time.perf_counter_ns() - start
    time.sleep(event.hold)  # the application's work
    del buffer
    return _NeedOutcome(app.name, latency)


def _serve(allocator: ResourceAllocator, event: TraceEvent, app: App,
           observe: Callable[[str, ResourceType, float], Any] | None = None) -> _NeedOutcome:
    """The consumer of one need: acquire, make usable, hold, release with real use.
    ``observe``: told of the need once it is served (the Markov predictor)."""
    claims: list[tuple[Claim, float]] = []
    used_successfully = False
    try:
        start = time.perf_counter_ns()  # the moment of need
        try:
            memory = allocator.acquire(MEMORY, event.need_mib, target_application=app.name)
            claims.append((memory, event.need_mib))
            if app.cpu_percent > 0:
                # the claim pins this thread to the cores, so the writes run there
                claims.append((allocator.acquire(CPU, app.cpu_percent, target_application=app.name),
                               app.cpu_percent))
        except AllocationError as exc:
            log.info("%s: need %d (%s) not served: %s", allocator.name, event.index, app.name, exc)
            return _NeedOutcome(app.name, None, len(claims), sum(c.preallocated for c, _ in claims),
                                _reason(exc))
        # a preallocated buffer may be larger than the need: the consumer writes what it uses
        _first_pass(memory.resource, min(memory.resource.size, math.ceil(event.need_mib * MiB)))
        latency = time.perf_counter_ns() - start
        if observe is not None:
            observe(app.name, MEMORY, app.memory_mib)
        time.sleep(event.hold)  # the application's work
        used_successfully = True
        return _NeedOutcome(app.name, latency, len(claims), sum(c.preallocated for c, _ in claims))
    finally:
        for claim, amount in claims:
            claim.release(AllocationFeedback(
                used_successfully=used_successfully,
                actual_duration=event.hold if used_successfully else None,
                actual_amount_used=amount if used_successfully else None,
                reason_for_release="done" if used_successfully else "need not served"))


class _Ledger:
    """What an allocator's events say: how many MEMORY allocations, how many locked,
    the most MEMORY held at once (which the trace's bound must cover), and why
    allocations failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # events come from the workers and the consumers' threads
        self.count = self.locked = 0
        self.held_mib = self.peak_mib = 0.0
        self.failures: dict[str, int] = {}

    def allocated(self, allocation: ResourceAllocation) -> None:
        if allocation.resource_type is MEMORY:
            with self._lock:
                self.count += 1
                self.locked += bool(allocation.details.get("locked"))
                self.held_mib += allocation.allocated_amount
                self.peak_mib = max(self.peak_mib, self.held_mib)

    def ended(self, allocation: ResourceAllocation) -> None:
        """Released or expired (a request dropped before allocation never held anything)."""
        if allocation.resource_type is MEMORY and allocation.allocated_at is not None:
            with self._lock:
                self.held_mib -= allocation.allocated_amount

    def failed(self, allocation: ResourceAllocation) -> None:
        reason = f"{allocation.resource_type.name}: {allocation.failure_reason or 'unknown reason'}"
        reason = re.sub(r"\d+(\.\d+)?", "N", reason)
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1


@dataclass
class VariantResult:
    """One variant over every round: what its consumers saw and, for the two allocators,
    their statistics read after the last round, once every allocation had ended."""

    label: str
    allocator: str  # the class, or "numpy.empty" for the plain path
    needs: int = 0
    needs_served: int = 0
    claims: int = 0
    claims_preallocated: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    latencies_ns_by_app: dict[str, list[int]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # reason -> needs it failed
    allocation_failures: dict[str, int] = field(default_factory=dict)  # reason -> allocations
    statistics: PreallocatorStatistics | None = None
    memory_allocations: int = 0
    memory_locked: int = 0
    memory_peak_mib: float = 0.0  # the most MEMORY the allocator held at once
    live_before_close: int = 0  # the most allocations still live after a round's wait
    live_after_close: int = 0
    wall_s: list[float] = field(default_factory=list)  # per round
    schedule_lag_max_ms: float = 0.0
    learned_sizes_mib: dict[str, float] = field(default_factory=dict)

    @property
    def needs_failed(self) -> int:
        return self.needs - self.needs_served

    def latency_ms(self, q: float, app: str | None = None) -> float | None:
        values = self.latencies_ns if app is None else self.latencies_ns_by_app.get(app, [])
        value = percentile(values, q)
        return None if value is None else value / 1e6

    def add(self, outcomes: Sequence[_NeedOutcome]) -> None:
        for o in outcomes:
            self.needs += 1
            self.claims += o.claims
            self.claims_preallocated += o.claims_preallocated
            if o.latency_ns is None:
                reason = o.error or "unknown reason"
                self.failures[reason] = self.failures.get(reason, 0) + 1
            else:
                self.needs_served += 1
                self.latencies_ns.append(o.latency_ns)
                self.latencies_ns_by_app.setdefault(o.app, []).append(o.latency_ns)


Allocator = ResourcePreallocator | ReactiveResourceAllocator


def _replay_once(allocator: Allocator | None, trace: Trace, tag: str, ledger: _Ledger | None,
                 observe: Callable[[str, ResourceType, float], Any] | None = None,
                 ) -> tuple[list[_NeedOutcome], float, float, int]:
    """Drives the trace through allocator (None: the plain path) in real time. A driver
    thread sleeps until each event's time and hands predictions over on the spot; needs
    run on a thread pool large enough that holds overlap as the trace says. Afterwards
    it waits until every allocation has ended by release or expiry, so the next run
    starts on an idle machine and the statistics are complete. Returns the outcomes,
    the wall time, the largest schedule lag and what was still live after the wait."""
    needs = trace.needs
    # the plain path has no predictor; with a model (observe) the trace's predictions are not used
    events = trace.events if allocator is not None and observe is None else ()
    schedule = sorted([(e.at, 0, e.index) for e in events] + [(e.need_at, 1, e.index) for e in needs])
    by_index = {e.index: e for e in trace.events}
    pool_size = min(32, 2 + int(_peak((e.need_at, e.need_at + e.hold, 1.0) for e in needs)))
    ended = threading.Condition()

    def on_ended(allocation: ResourceAllocation) -> None:
        if ledger is not None:
            ledger.ended(allocation)
        with ended:
            ended.notify_all()

    def on_failed(allocation: ResourceAllocation) -> None:
        if ledger is not None:
            ledger.failed(allocation)
        with ended:
            ended.notify_all()

    listeners = []
    if allocator is not None and ledger is not None:
        listeners += [("allocated", allocator.on("allocated", ledger.allocated)),
                      ("released", allocator.on("released", on_ended)),
                      ("expired", allocator.on("expired", on_ended)),
                      ("failed", allocator.on("failed", on_failed))]
    futures: list[Future[_NeedOutcome]] = []
    lag = [0.0]
    driver_error: list[Exception] = []
    try:
        with QuietThreadPoolExecutor(max_workers=pool_size, thread_name_prefix=f"demo-{tag}") as pool:
            origin = time.monotonic()

            def drive() -> None:
                try:
                    for at, kind, index in schedule:
                        delay = origin + at - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        lag[0] = max(lag[0], time.monotonic() - origin - at)
                        event = by_index[index]
                        app = trace.apps[event.app]
                        if kind == 0:
                            assert allocator is not None
                            allocator.handle_prediction(Prediction(
                                id=f"{tag}-{index}", type=PREDICTION_TYPE, predicted_value=event.app,
                                confidence=event.confidence, expected_at=origin + event.need_at,
                                target_application=event.app, source_predictor_id="demo-trace"))
                        elif allocator is None:
                            futures.append(pool.submit(_serve_plain, event, app))
                        else:
                            futures.append(pool.submit(_serve, allocator, event, app, observe))
                except Exception as exc:  # re-raised on the caller's thread
                    driver_error.append(exc)

            driver = threading.Thread(target=drive, name=f"demo-driver-{tag}")
            start_quiet(driver)
            driver.join()
            outcomes = [f.result() for f in futures]  # a consumer's unexpected error propagates
        if driver_error:
            raise driver_error[0]
        live = 0
        if allocator is not None:
            # the last unclaimed preallocation can outlive the last need; wait for its
            # expiry (the 'ended' events wake this early; the timeout covers the record
            # removal that follows an event). Every allocation has a duration, so all of
            # them end; the bound is far past the trace's last expiry because on a busy
            # machine the schedule lags and allocations are made (and expire) late.
            latest_end = max((e.need_at + DURATION_S for e in trace.events), default=0.0) + EXPIRY_GRACE_S
            with ended:
                while len(allocator) and time.monotonic() < origin + latest_end:
                    ended.wait(0.02)
            live = len(allocator)
            if live:
                log.warning("%s: %d allocations still live after the trace; close releases them", tag, live)
        return outcomes, time.monotonic() - origin, lag[0] * 1e3, live
    finally:
        if allocator is not None:
            for name, listener in listeners:
                allocator.off(name, listener)


@dataclass
class DemoReport:
    machine: Machine
    trace: Trace
    rounds: int
    order: list[list[str]]  # the variants' order in each round
    lock: bool
    memory_headroom: float  # the allocators' MEMORY headroom, a fraction of the total
    mlock_effective: bool
    mlock_detail: str
    variants: dict[str, VariantResult]
    rss_before_bytes: int
    rss_after_bytes: int
    malloc_free_before_bytes: int | None = None
    malloc_free_after_bytes: int | None = None
    predictor: str = "trace"  # where the preallocator's predictions came from (PREDICTORS)
    predictor_counts: dict[str, Any] | None = None  # markov: observations, predictions, outcomes

    def ratio(self, slower: str, q: float = 50) -> float | None:
        """slower's latency percentile over the preallocated one's; None if either is
        missing or zero."""
        pre, other = self.variants[PREALLOCATED].latency_ms(q), self.variants[slower].latency_ms(q)
        if not pre or other is None:
            return None
        return other / pre

    def apps_where_plain_wins(self) -> list[str]:
        """The apps whose preallocated p50 is slower than np.empty + the first pass."""
        pre, plain = self.variants[PREALLOCATED], self.variants[PLAIN]
        out = []
        for name in self.trace.apps:
            a, b = pre.latency_ms(50, name), plain.latency_ms(50, name)
            if a is not None and b is not None and b < a:
                out.append(name)
        return out

    def conclusion(self) -> str:
        """What the figures mean, in words."""
        pre, reactive, plain = (self.variants[v] for v in VARIANTS)
        n = len(pre.latencies_ns)

        def p(v: VariantResult, q: float) -> str:
            value = v.latency_ms(q)
            return "-" if value is None else f"{value:.2f}"

        def x(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}x"

        text = ("Predictions came from the built-in MarkovPredictor, learned online from the needs. "
                if self.predictor == "markov" else "")
        text += (f"Over {self.rounds} interleaved round(s) (n={n} needs per variant), a preallocated need was "
                f"usable (a full first pass written) after p50 {p(pre, 50)} ms / p99 {p(pre, 99)} ms, against "
                f"{p(reactive, 50)} / {p(reactive, 99)} ms for the reactive allocator ({x(self.ratio(REACTIVE))} "
                f"slower at p50, {x(self.ratio(REACTIVE, 99))} at p99) and {p(plain, 50)} / {p(plain, 99)} ms "
                f"for plain np.empty + the pass ({x(self.ratio(PLAIN))} at p50).")
        if 0 < n < 1000:
            # numpy's linear p99 interpolates between ranks floor(0.99 (n-1)) and the next
            top = n - math.floor(0.99 * (n - 1))
            text += (f" With n={n} the p99 rests on the {top} largest samples; --rounds adds "
                     f"{len(self.trace.needs)} a round.")
        plain_ratio = self.ratio(PLAIN)
        if plain_ratio is not None and plain_ratio < 1.0:
            text += " Preallocation loses to the plain path on this machine overall."
        winners = self.apps_where_plain_wins()
        if winners:
            sizes = ", ".join(f"{name} {self.trace.apps[name].memory_mib:.0f} MiB" for name in winners)
            small = all(self.trace.apps[name].memory_mib * (1 + SIZER_MARGIN) <= HOST_WARM_MIB for name in winners)
            text += (f" Preallocation loses to the plain path for {sizes}"
                     + (f": below glibc's {HOST_WARM_MIB:.0f} MiB mmap threshold a freed block is reused warm, "
                        "so preallocating such sizes buys nothing (RuleTranslator(min_need=HOST_WARM_MIN_NEED) "
                        "leaves them to malloc)" if small else "")
                     + ".")
        stats = pre.statistics
        if stats is not None:
            waste = ", ".join(f"{t.name} {100 * w:.0f}%" for t, w in sorted(stats.waste_rate_by_type.items()))
            text += (f" The preallocator served {100 * stats.need_hit_rate:.0f}% of its acquire() calls from a "
                     f"ready preallocation (need_hit_rate), used {100 * stats.resource_hit_rate:.0f}% of the "
                     f"preallocations it finished (resource_hit_rate)"
                     + (f", and paid for it in waste ({waste} of amount x time held)" if waste else "") + ".")
        return text


def _strategies(lock: bool, exclusive_cores: bool) -> dict[ResourceType, Any]:
    return {MEMORY: MemoryAllocationStrategy(populate=True, lock=lock),
            CPU: CpuAllocationStrategy(exclusive=exclusive_cores)}


def run_demo(*, scale: float = 1.0, seed: int = 7, lock: bool = False, rounds: int = DEFAULT_ROUNDS,
             progress: Callable[[str], None] | None = None, predictor: str = "trace") -> DemoReport:
    """Generates the trace for this machine and replays it ``rounds`` times through each
    variant — the preallocator, the reactive allocator, plain np.empty — in an order
    rotated every round, so drift of the machine (other tenants, the heap's warmth)
    falls on every variant alike. Both allocators live across the rounds (the sizer
    keeps learning) and are closed before it returns (or raises). ``progress`` gets a
    line after each run. ``predictor``: "trace" (the trace's predictions) or "markov"
    (the built-in MarkovPredictor, on a trace with habits; see the module docstring)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, not {rounds!r}")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, not {predictor!r}")
    markov = predictor == "markov"
    say = progress or (lambda line: None)
    machine = Machine.probe()
    headroom = PreallocatorConfig().headroom.get(MEMORY, 0.0)  # the allocators' default, which both use
    limit = machine.safe_memory_mib(headroom)
    if limit < MIN_SAFE_MIB:
        raise RuntimeError(f"too little memory available for the demo: {machine.memory_available_mib:.0f} MiB "
                           f"available of {machine.memory_total_mib:.0f} MiB leaves {limit:.0f} MiB "
                           f"(at least {MIN_SAFE_MIB:.0f} MiB needed)")
    trace = generate_trace(seed, scale, memory_limit_mib=limit, cores=machine.cores_usable,
                           habit=MARKOV_HABIT if markov else 0.0)
    mlock_effective, mlock_detail = mlock_status(math.ceil(trace.peak_memory_mib * MiB))
    # Exclusive cores where the trace's worst overlap fits the machine; otherwise the
    # cores are shared, or most CPU needs would fail on contention rather than show latency.
    exclusive = trace.peak_cores <= machine.cores_usable
    log.info("trace: %d events, memory factor %.3f, peak %.0f MiB (limit %.0f), %s cores",
             len(trace.events), trace.memory_factor, trace.peak_memory_mib, trace.memory_limit_mib,
             "exclusive" if exclusive else "shared")
    gc.collect()
    _malloc_trim()
    rss_before, malloc_free_before = vm_rss_bytes(), malloc_free_bytes()
    sizer = AdaptiveSizer(margin=SIZER_MARGIN)
    results = {PREALLOCATED: VariantResult(PREALLOCATED, "ResourcePreallocator"),
               REACTIVE: VariantResult(REACTIVE, "ReactiveResourceAllocator"),
               PLAIN: VariantResult(PLAIN, "numpy.empty")}
    ledgers = {PREALLOCATED: _Ledger(), REACTIVE: _Ledger()}
    order: list[list[str]] = []
    allocators: dict[str, Allocator] = {}
    try:
        model = MarkovPredictor(min_confidence=MIN_CONFIDENCE, max_predictions=1) if markov else None
        allocators[PREALLOCATED] = ResourcePreallocator(
            translator=(build_markov_translator if markov else build_translator)(trace.apps.values(), sizer),
            min_confidence=MIN_CONFIDENCE, predictor=model, allocation_strategies=_strategies(lock, exclusive))
        allocators[REACTIVE] = ReactiveResourceAllocator(min_confidence=MIN_CONFIDENCE,
                                                         allocation_strategies=_strategies(lock, exclusive))
        for r in range(rounds):
            this_round = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)])
            order.append(this_round)
            for label in this_round:
                result = results[label]
                log.info("round %d, %s: replaying %d predictions and %d needs", r + 1, label,
                         len(trace.events) if label != PLAIN else 0, len(trace.needs))
                outcomes, wall, lag, live = _replay_once(
                    allocators.get(label), trace, f"{label}-{r}", ledgers.get(label),
                    model.observe if model is not None and label == PREALLOCATED else None)
                result.add(outcomes)
                result.wall_s.append(wall)
                result.schedule_lag_max_ms = max(result.schedule_lag_max_ms, lag)
                result.live_before_close = max(result.live_before_close, live)
                served = [o.latency_ns for o in outcomes if o.latency_ns is not None]
                p50 = percentile(served, 50)
                say(f"round {r + 1}/{rounds} {label:>12}: {len(served)}/{len(outcomes)} needs served, "
                    f"p50 {'-' if p50 is None else f'{p50 / 1e6:.3f}'} ms, {wall:.1f} s")
        for label, allocator in allocators.items():
            results[label].statistics = allocator.get_statistics()
    finally:
        for allocator in allocators.values():
            allocator.close()
    for label, allocator in allocators.items():
        result, ledger = results[label], ledgers[label]
        result.live_after_close = len(allocator)
        result.memory_allocations, result.memory_locked = ledger.count, ledger.locked
        result.memory_peak_mib, result.allocation_failures = ledger.peak_mib, dict(ledger.failures)
    for key, size in sizer.snapshot().items():  # keys are (rule name, resource type)
        if isinstance(key, tuple) and key[1] is MEMORY:
            results[PREALLOCATED].learned_sizes_mib[str(key[0])] = size
    counts = None if model is None else {"observations": model.observations, "predictions": model.emitted,
                                         "outcomes": dict(model.outcomes)}
    gc.collect()
    _malloc_trim()
    return DemoReport(machine=machine, trace=trace, rounds=rounds, order=order, lock=lock,
                      memory_headroom=headroom, mlock_effective=mlock_effective, mlock_detail=mlock_detail,
                      variants=results, rss_before_bytes=rss_before, rss_after_bytes=vm_rss_bytes(),
                      malloc_free_before_bytes=malloc_free_before, malloc_free_after_bytes=malloc_free_bytes(),
                      predictor=predictor, predictor_counts=counts)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _latency(result: VariantResult, app: str | None = None) -> dict[str, Any]:
    values = result.latencies_ns if app is None else result.latencies_ns_by_app.get(app, [])
    return {"n": len(values), "p50": _round(result.latency_ms(50, app)), "p90": _round(result.latency_ms(90, app)),
            "p99": _round(result.latency_ms(99, app)), "max": _round(result.latency_ms(100, app)),
            "mean": _round(sum(values) / len(values) / 1e6) if values else None}


def _statistics_as_dict(s: PreallocatorStatistics) -> dict[str, Any]:
    return {
        "total_requests": s.total_requests,
        "successful_allocations": s.successful_allocations,
        "failed_allocations": s.failed_allocations,
        "cancelled": s.cancelled,
        "skipped_low_confidence": s.skipped_low_confidence,
        "expired": s.expired,
        "claimed": s.claimed,
        "released": s.released,
        "finished": s.finished,
        "preallocations_finished": s.preallocations_finished,
        "used": s.used,
        "needs": s.needs,
        "needs_preallocated": s.needs_preallocated,
        "need_hit_rate": round(s.need_hit_rate, 4),
        "resource_hit_rate": round(s.resource_hit_rate, 4),
        "waste_rate_by_type": {t.name: round(w, 4) for t, w in sorted(s.waste_rate_by_type.items())},
        "resource_waste_rate": round(s.resource_waste_rate, 4),
        "active_allocations": s.active_allocations,
        "queued_requests": s.queued_requests,
        "in_flight": s.in_flight,
        "allocations_by_type": {t.name: n for t, n in sorted(s.allocations_by_type.items())},
        "average_allocation_ms": round(s.average_allocation_time * 1e3, 3),
    }


def report_as_dict(report: DemoReport) -> dict[str, Any]:
    """The report as plain JSON-ready data (what ``prealloc demo --json`` prints)."""
    t, m = report.trace, report.machine
    variants: dict[str, Any] = {}
    for label, v in report.variants.items():
        entry: dict[str, Any] = {
            "allocator": v.allocator,
            "needs": v.needs,
            "needs_served": v.needs_served,
            "needs_failed": v.needs_failed,
            "failures": dict(sorted(v.failures.items())),
            "latency_ms": _latency(v),
            "latency_ms_by_app": {name: _latency(v, name) for name in t.apps},
            "wall_s": [round(w, 3) for w in v.wall_s],
            "schedule_lag_max_ms": round(v.schedule_lag_max_ms, 3),
        }
        if v.statistics is not None:
            entry.update({
                "claims": v.claims,
                "claims_preallocated": v.claims_preallocated,
                "statistics": _statistics_as_dict(v.statistics),
                "allocation_failures": dict(sorted(v.allocation_failures.items())),
                "memory_allocations": v.memory_allocations,
                "memory_locked": v.memory_locked,
                "memory_peak_mib": round(v.memory_peak_mib, 1),
                "live_before_close": v.live_before_close,
                "live_after_close": v.live_after_close,
                "learned_sizes_mib": {k: round(size, 2) for k, size in v.learned_sizes_mib.items()},
            })
        variants[label] = entry
    data: dict[str, Any] = {
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
        "rounds": report.rounds,
        "order": report.order,
        "usable": "a full first pass of writes over the need's bytes (and, for the allocators, the CPU claim)",
        "variants": variants,
        "ratios": {f"{other}_over_preallocated": {"p50": _round(report.ratio(other, 50), 2),
                                                  "p99": _round(report.ratio(other, 99), 2)}
                   for other in (REACTIVE, PLAIN)},
        "apps_where_plain_wins": report.apps_where_plain_wins(),
        "conclusion": report.conclusion(),
        "rss_mib": {"before": round(report.rss_before_bytes / MiB, 1),
                    "after": round(report.rss_after_bytes / MiB, 1),
                    "malloc_free_before": _mib(report.malloc_free_before_bytes),
                    "malloc_free_after": _mib(report.malloc_free_after_bytes)},
    }
    if report.predictor != "trace":  # the default report keeps its keys
        data["predictor"] = report.predictor
        data["predictor_counts"] = report.predictor_counts
        data["trace"]["habit"] = MARKOV_HABIT
    return data


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 1)
