"""The spec's enums and data types, in Python naming.

Units (used everywhere a request, allocation or availability carries an amount):

    MEMORY             MiB of RAM
    CPU                percent of one core: 250 means two and a half cores, so three
                       cores are reserved
    GPU                MiB of device memory
    NETWORK_BANDWIDTH  Mbit/s
    DISK_IO            MiB (of disk space or I/O budget, per strategy)
    CACHE_SPACE        MiB of page cache
    CUSTOM             whatever the custom strategy says

Durations are seconds; instants (deadline, created_at, allocated_at, expires_at) are
seconds on the monotonic clock (``time.monotonic()``), which is the clock of the native
core's timers.

Ids: allocation ids are the native table's 64-bit generational ids (opaque ints; every
method that takes one refuses anything else with a TypeError). Request ids are the
caller's: a string (a uuid, as the spec's requestId) or a 64-bit int, kept as given on
every snapshot and event; they need not be unique.
"""
from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable


class ResourceType(enum.IntEnum):
    MEMORY = 0
    CPU = 1
    GPU = 2
    NETWORK_BANDWIDTH = 3
    DISK_IO = 4
    CACHE_SPACE = 5
    CUSTOM = 6

    @classmethod
    def parse(cls, value: ResourceType | str | int) -> ResourceType:
        """A ResourceType from itself, its name (any case) or its number; ValueError
        naming the valid types otherwise."""
        if isinstance(value, ResourceType):
            return value
        try:
            if isinstance(value, str):
                return cls[value.strip().upper()]
            if isinstance(value, int) and not isinstance(value, bool):
                return cls(value)
        except (KeyError, ValueError):
            pass
        raise ValueError(f"unknown resource type {value!r}; valid types are {[t.name for t in cls]}")


UNITS: Mapping[ResourceType, str] = {
    ResourceType.MEMORY: "MiB",
    ResourceType.CPU: "% of a core",
    ResourceType.GPU: "MiB",
    ResourceType.NETWORK_BANDWIDTH: "Mbit/s",
    ResourceType.DISK_IO: "MiB",
    ResourceType.CACHE_SPACE: "MiB",
    ResourceType.CUSTOM: "units",
}


class AllocationStatus(enum.IntEnum):
    """The numbers are the native table's statuses (pa_status_t; a test holds them equal)."""

    PENDING = 0
    ALLOCATED = 1
    ACTIVE = 2
    RELEASING = 3
    RELEASED = 4
    FAILED = 5
    EXPIRED = 6

    @property
    def is_final(self) -> bool:
        return self in (AllocationStatus.RELEASED, AllocationStatus.FAILED, AllocationStatus.EXPIRED)


_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_request_ids)


def check_amount(name: str, value: float) -> float:
    """A finite, non-negative number, else ValueError."""
    if type(value) is float and 0.0 <= value < math.inf:  # the common case, cheaply
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite and >= 0, not an int of {int(value).bit_length()} bits") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, not {value!r}")
    return value


# The longest duration and the latest instant (on the monotonic clock, seconds since
# boot) accepted anywhere: ~31.7 years. The native timers count nanoseconds in 64 bits
# (~584 years), so every deadline computed from these stays far inside their range;
# beyond it a value is refused at the edge, before anything is admitted.
MAX_SECONDS = 1e9


# The longest string id accepted (request ids; a uuid is 36).
MAX_ID_LENGTH = 256


def check_seconds(name: str, value: float) -> float:
    """A duration or a monotonic instant: finite, >= 0 and <= MAX_SECONDS."""
    value = check_amount(name, value)
    if value > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:g} s (~31 years), not {value!r}")
    return value


def check_confidence(value: float) -> float:
    if type(value) is float and 0.0 <= value <= 1.0:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"confidence must be a number, not {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"confidence must be in [0, 1], not {value!r}")
    return value


def _check_optional_seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    return check_seconds(name, value)


@dataclass(slots=True)
class RequestMetadata:
    created_at: float = field(default_factory=time.monotonic)
    source_predictor_id: str = "unknown"
    triggering_pattern_id: str | None = None
    target_application: str | None = None
    target_process_id: int | None = None
    user_id: str | None = None
    custom_properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ResourceRequest:
    """What a translator (or a caller) asks the preallocator for.

    predicted_need is in the resource type's unit (see the module docstring); duration
    is how long the resource is expected to be needed (seconds, None = until released);
    deadline is the monotonic instant by which it should be ready (a request still
    waiting for resources at its deadline is dropped)."""

    resource_type: ResourceType
    predicted_need: float
    confidence: float = 1.0
    priority: float = 0.0
    duration: float | None = None
    deadline: float | None = None
    metadata: RequestMetadata = field(default_factory=RequestMetadata)
    associated_prediction_id: str | None = None
    # The caller's id: a string (a uuid, as the spec's requestId) or a 64-bit int. Kept
    # as given on every snapshot and event. Ids need not be unique: two live requests
    # may share one (each has its own allocation id, which is what the API takes).
    request_id: int | str = field(default_factory=next_request_id)

    def validate(self) -> ResourceRequest:
        """Checks every field; ValueError naming the bad one. Returns self."""
        if type(self.resource_type) is not ResourceType:
            self.resource_type = ResourceType.parse(self.resource_type)
        self.predicted_need = check_amount("predicted_need", self.predicted_need)
        self.confidence = check_confidence(self.confidence)
        priority = self.priority
        if type(priority) is not float or not -math.inf < priority < math.inf:
            if isinstance(priority, bool) or not isinstance(priority, (int, float)) \
                    or not math.isfinite(priority):
                raise ValueError(f"priority must be a finite number, not {priority!r}")
        self.duration = _check_optional_seconds("duration", self.duration)
        self.deadline = _check_optional_seconds("deadline", self.deadline)
        if not isinstance(self.metadata, RequestMetadata):
            raise TypeError(f"metadata must be a RequestMetadata, not {type(self.metadata).__name__}")
        request_id = self.request_id
        if type(request_id) is str:
            if not 0 < len(request_id) <= MAX_ID_LENGTH:
                raise ValueError(f"request_id must be a non-empty string of at most {MAX_ID_LENGTH} characters, "
                                 f"not {request_id[:40]!r}")
        elif type(request_id) is not int or not 0 < request_id < 2**64:
            raise ValueError(f"request_id must be a str or an int in 1..2**64-1, not {request_id!r}")
        pid = self.metadata.target_process_id
        if pid is not None and (type(pid) is not int or pid <= 0):
            raise ValueError(f"target_process_id must be a positive int, not {pid!r}")
        if not isinstance(self.metadata.custom_properties, dict):
            raise TypeError("metadata.custom_properties must be a dict, not "
                            f"{type(self.metadata.custom_properties).__name__}")
        return self


@dataclass(slots=True)
class AllocationFeedback:
    used_successfully: bool
    actual_duration: float | None = None
    actual_amount_used: float | None = None
    reason_for_release: str | None = None

    def validate(self) -> AllocationFeedback:
        if not isinstance(self.used_successfully, bool):
            raise TypeError(f"used_successfully must be a bool, not {type(self.used_successfully).__name__}")
        self.actual_duration = _check_optional_seconds("actual_duration", self.actual_duration)
        if self.actual_amount_used is not None:
            self.actual_amount_used = check_amount("actual_amount_used", self.actual_amount_used)
        return self


@dataclass(slots=True)
class ResourceAllocation:
    """A snapshot of one allocation, read from the native table when asked for.

    requested_amount is what the request asked; allocated_amount what the strategy
    reserved. details records requested-vs-effective facts of the strategy (locked or
    not and why, huge pages, the cores, ...). failure_reason says why a FAILED one
    failed."""

    allocation_id: int
    request_id: int | str
    resource_type: ResourceType
    requested_amount: float
    allocated_amount: float
    status: AllocationStatus
    allocated_at: float | None
    expires_at: float | None = None
    actual_usage: float | None = None
    feedback: AllocationFeedback | None = None
    failure_reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ResourceAvailability:
    resource_type: ResourceType
    total: float
    available: float
    used: float
    timestamp: float = field(default_factory=time.monotonic)
    predicted_usage: float | None = None
    pressure: float | None = None  # PSI "some avg10" (% of time stalled), where known


@dataclass(slots=True)
class PreallocatorStatistics:
    """The allocator's tally. The counts add up:

        total_requests == successful_allocations + failed_allocations + cancelled
                          + queued_requests + in_flight
        successful_allocations == finished + active_allocations (+ adjustments never
                                  add allocations)

    ``resource_hit_rate`` is the spec's: the share of *finished* preallocations that were
    used (claimed, or released with ``used_successfully=True``). ``need_hit_rate`` is the
    consumer's view: the share of needs (``acquire`` calls) served by an allocation that
    was ready before the need. Waste is kept per resource type, because the units differ
    (MiB x s is not % of a core x s): ``waste_rate_by_type[t]`` is unused amount x time over
    held amount x time for type t, and ``resource_waste_rate`` is the mean of those
    unit-free ratios over the types that held anything (equal to the one type's rate when
    only one type was used)."""

    total_requests: int = 0
    successful_allocations: int = 0
    failed_allocations: int = 0
    average_allocation_time: float = 0.0  # seconds, request to ALLOCATED
    resource_hit_rate: float = 0.0  # share of finished preallocations that were used
    resource_waste_rate: float = 0.0  # mean over types of waste_rate_by_type
    allocations_by_type: dict[ResourceType, int] = field(default_factory=dict)
    skipped_low_confidence: int = 0
    expired: int = 0
    claimed: int = 0
    released: int = 0
    active_allocations: int = 0
    queued_requests: int = 0
    cancelled: int = 0  # requests withdrawn before allocation (cancel_request, reset, release)
    in_flight: int = 0  # requests being allocated right now (PENDING, taken by a worker)
    finished: int = 0  # allocations that ended (released or expired), at-need ones included
    preallocations_finished: int = 0  # finished allocations made ahead of need (the hit rate's denominator)
    used: int = 0  # ... of those, the ones used (the hit rate's numerator)
    needs: int = 0  # acquire() calls
    needs_preallocated: int = 0  # ... served by an allocation ready before the need
    need_hit_rate: float = 0.0  # needs_preallocated / needs
    waste_rate_by_type: dict[ResourceType, float] = field(default_factory=dict)


class PredictionType(str, enum.Enum):
    """The common kinds of prediction (the spec's PredictionType). Prediction.type takes
    one of these or any other non-empty string: rules match on the string value."""

    USER_ACTION = "user_action"
    APPLICATION_LAUNCH = "application_launch"
    TIME_BASED = "time_based"
    PATTERN = "pattern"
    WORKLOAD = "workload"
    RESOURCE_USAGE = "resource_usage"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PredictionOutcome:
    """How a prediction's request ended: what the predictor's ``update_model`` gets,
    exactly once per request that carries a prediction id, in the order the requests
    ended. reason is "released", "expired", "failed" or "cancelled"; used says whether
    the allocation served a need (claimed, or released with used_successfully)."""

    prediction_id: str
    resource_type: ResourceType
    predicted_amount: float
    used_amount: float
    used: bool
    reason: str
    allocation_id: int
    feedback: AllocationFeedback | None = None


@runtime_checkable
class Predictor(Protocol):
    """What an allocator wires to (``PreallocatorConfig(predictor=...)``), as the spec
    does: it subscribes its ``handle_prediction`` with ``on("prediction:generated", fn)``
    (and unsubscribes with ``off``), and calls ``update_model(outcome)`` with a
    PredictionOutcome exactly once per request that carried a prediction id, on the
    allocator's worker thread, in the order the requests ended."""

    def on(self, event: str, listener: Callable[..., Any]) -> Any: ...

    def off(self, event: str, listener: Callable[..., Any]) -> Any: ...

    def update_model(self, outcome: PredictionOutcome) -> None: ...


@dataclass(slots=True)
class Prediction:
    """What a predictor says will happen: `type` and `predicted_value` are matched by
    the translator's rules; expected_at is the monotonic instant the need is expected
    (None = now)."""

    id: str
    type: str
    predicted_value: Any
    confidence: float
    expected_at: float | None = None
    target_application: str | None = None
    target_process_id: int | None = None
    source_predictor_id: str = "unknown"
    properties: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> Prediction:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"prediction id must be a non-empty string, not {self.id!r}")
        if isinstance(self.type, PredictionType):
            self.type = self.type.value
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"prediction type must be a non-empty string, not {self.type!r}")
        self.confidence = check_confidence(self.confidence)
        if isinstance(self.predicted_value, float) and not math.isfinite(self.predicted_value):
            raise ValueError(f"predicted_value must be finite, not {self.predicted_value!r}")
        self.expected_at = _check_optional_seconds("expected_at", self.expected_at)
        pid = self.target_process_id
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise ValueError(f"target_process_id must be a positive int, not {pid!r}")
        return self


@dataclass(frozen=True, slots=True)
class SubscriptionHandle:
    id: int
    resource_type: ResourceType
