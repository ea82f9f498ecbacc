# The allocation lifecycle, written once (included into _native.pyx, so it shares the one
# copy of the C core linked into this module). prealloc.engine holds the public face, the
# configuration and the worker threads; everything an allocation goes through from its
# admission to its end is here, in EngineCore, as transitions over the native table's CAS
# statuses. The ledger (quotas), the tally (statistics), the events, the learning
# (sizer, predictor) and the owner index change only inside these transitions.
#
#              admit                 allocate                 claim
#   request ─────────► PENDING ───────────────► ALLOCATED ───────────► ACTIVE
#                       │ │ │  (strategy)          │   │                  │
#     wait: no room ────┘ │ │                      │   │ expire           │
#     (queued again when  │ │ fail                 │   │ (ticker)         │
#      availability       │ └──────► FAILED        │   └──────► EXPIRED   │
#      changes)           │ deadline (ticker)      │                      │
#                         ├────────► EXPIRED       │ release              │ release
#                         │  = failed, never held  └──────► RELEASING ◄───┘
#                         │ cancel / reset                   │       │ strategy refused:
#                         └────────► RELEASED                ▼       └─ back to ALLOCATED
#                                                        RELEASED      (expiry re-armed) or
#                                                                      ACTIVE
# Every final status removes the record. A resource that outlives its release (memory a
# consumer's view keeps mapped: the strategy's DeferredRelease) stays charged to its
# quotas until the strategy says it is gone; the worker books that refund.
#
# Who runs what:
#   admit, allocate (sync), claim, adjust, release, cancel, reset: the caller's thread
#   allocate (queued), wait/retry, finish of an expiry or deadline, release of a dropped
#     claim, refund of a deferred release: a worker thread (prealloc.engine)
#   ALLOCATED/PENDING -> EXPIRED: the native ticker thread, without the GIL; the worker
#     finishes it (_drain_expired)
#   garbage-collector finalizers (a dropped Claim, a DeferredRelease done in a buffer
#     release) only queue an id and wake the worker: they take no lock, call no strategy.
#
# Atomicity: a transition's CAS and the dict and counter updates that go with it run in
# one stretch with the GIL held and no Python code in between (dict operations on int
# keys run none), so no thread sees one without the other; that stretch is marked
# "no Python code" below. Strategies, the ledger, monitors and listeners are called
# outside those stretches. The one wait: a release or expiry of an allocation that is
# being adjusted waits for that adjust (a per-allocation event), never on the adjusting
# thread itself. Built for the GIL interpreter (freethreading_compatible=False).

from cpython.object cimport PyObject, PyTypeObject
from posix.unistd cimport write
from cpython.ref cimport Py_INCREF

from .types import AllocationStatus as _AllocationStatus
from .types import ResourceAllocation as _ResourceAllocation
from .types import ResourceType as _ResourceType
from .types import RequestMetadata as _RequestMetadata
from .types import ResourceRequest as _ResourceRequest
from .types import AllocationFeedback as _AllocationFeedback
from .types import PreallocatorStatistics as _PreallocatorStatistics
from .types import PredictionOutcome as _PredictionOutcome

cdef tuple _TYPE_OF = tuple(_ResourceType)
cdef tuple _STATUS_OF = tuple(_AllocationStatus)
cdef double _NS = 1e-9

# the answer _allocate gives when a queued request must wait for resources
WAIT = object()

cdef uint32_t _BIT_PENDING = 1u << PA_STATUS_PENDING
cdef uint32_t _BIT_ALLOCATED = 1u << PA_STATUS_ALLOCATED
cdef uint32_t _BIT_RELEASING = 1u << PA_STATUS_RELEASING
cdef uint32_t _BIT_ACTIVE = 1u << PA_STATUS_ACTIVE
cdef uint32_t _BIT_RELEASABLE = (1u << PA_STATUS_ALLOCATED) | (1u << PA_STATUS_ACTIVE)

# record.user_data flags
cdef uint64_t _AT_NEED = 1  # allocated at the moment of need (acquire's miss): not a preallocation

cdef enum:
    _TYPES = 8  # ResourceType values are 0..6; one spare


cdef double _INF = float("inf")


# The longest duration and the latest instant accepted (seconds): ~31.7 years. Beyond
# it a deadline in nanoseconds would near the wheel's 64-bit range; types.MAX_SECONDS
# is the same bound, checked by validate() with the message.
cdef double _MAX_SECONDS = 1e9


cdef inline bint _finite_seconds(x):
    return x is None or (type(x) is float and 0.0 <= <double>x <= _MAX_SECONDS)


cdef bint _already_valid(request) except -1:
    """The common case of ResourceRequest.validate() — every field already of its exact
    type and in range — checked without a Python call. Anything else goes through
    validate(), which coerces or raises with the message."""
    metadata = request.metadata
    if type(metadata) is not _RequestMetadata:
        return False
    need = request.predicted_need
    confidence = request.confidence
    priority = request.priority
    request_id = request.request_id
    return (type(request.resource_type) is _ResourceType
            and type(need) is float and 0.0 <= <double>need < _INF
            and type(confidence) is float and 0.0 <= <double>confidence <= 1.0
            and type(priority) is float and -_INF < <double>priority < _INF
            and _finite_seconds(request.duration) and _finite_seconds(request.deadline)
            and type(request_id) is int and 0 < request_id < 0xFFFFFFFFFFFFFFFF
            and metadata.target_process_id is None)


@cython.final
@cython.freelist(64)
cdef class Grant:
    """What a strategy reserved: the amount (in the type's unit) and its handle. A
    compiled class (re-exported by prealloc.strategies): one is made per allocation, and
    a Python dataclass's __init__ cost more than the rest of a no-op allocation."""

    cdef public double amount
    cdef public object handle

    def __init__(self, double amount, handle=None):
        self.amount = amount
        self.handle = handle

    def __repr__(self):
        return f"Grant(amount={self.amount!r}, handle={self.handle!r})"

    def __eq__(self, other):
        if type(other) is not Grant:
            return NotImplemented
        return self.amount == (<Grant>other).amount and self.handle == (<Grant>other).handle

    __hash__ = None  # mutable, like the dataclass it replaces


# ---- ResourceAllocation snapshots without the dataclass's Python __init__ ----
#
# A snapshot is made per allocation and per release that anyone listens to; the
# dataclass's generated __init__ (a Python function of 12 arguments) was a fifth of a
# no-op allocation's cost. Its fields are __slots__, i.e. member descriptors holding the
# offset of each field in the object, so the object is made with tp_alloc and the
# fields are stored directly — the same object the dataclass would make (same type,
# repr, eq, asdict). If the class ever stops being a slots dataclass of object fields,
# the descriptors say so at import and the plain constructor is used.

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    int T_OBJECT_EX
    object PyType_GenericAlloc(PyTypeObject *t, Py_ssize_t nitems)

cdef enum:
    _SNAPSHOT_FIELDS = 12
cdef Py_ssize_t _snapshot_offsets[_SNAPSHOT_FIELDS]
cdef bint _snapshot_direct = False


cdef bint _find_snapshot_offsets() except -1:
    import dataclasses
    import types
    names = [f.name for f in dataclasses.fields(_ResourceAllocation)]
    if len(names) != _SNAPSHOT_FIELDS or getattr(_ResourceAllocation, "__dictoffset__", 0) \
            or _ResourceAllocation.__init__ is object.__init__:
        return False
    for i, name in enumerate(names):
        descr = _ResourceAllocation.__dict__.get(name)
        if type(descr) is not types.MemberDescriptorType:
            return False
        if (<PyMemberDescrObject *><PyObject *>descr).d_member.type != T_OBJECT_EX:
            return False
        _snapshot_offsets[i] = (<PyMemberDescrObject *><PyObject *>descr).d_member.offset
    return True


_snapshot_direct = _find_snapshot_offsets()


def _snapshots_direct():
    """True when snapshots are built field by field (tests check it stays so)."""
    return _snapshot_direct


cdef inline void _store_field(object obj, int i, object value):
    # the slot is NULL in a fresh object: no old reference to drop
    Py_INCREF(value)
    (<PyObject **>((<char *><PyObject *>obj) + _snapshot_offsets[i]))[0] = <PyObject *>value


cdef object _new_snapshot(allocation_id, request_id, rtype, requested, allocated, status,
                          allocated_at, expires_at, actual_usage, feedback, failure_reason,
                          details):
    if not _snapshot_direct:
        return _ResourceAllocation(allocation_id, request_id, rtype, requested, allocated, status,
                                   allocated_at, expires_at, actual_usage, feedback, failure_reason,
                                   details)
    obj = PyType_GenericAlloc(<PyTypeObject *>_ResourceAllocation, 0)
    _store_field(obj, 0, allocation_id)
    _store_field(obj, 1, request_id)
    _store_field(obj, 2, rtype)
    _store_field(obj, 3, requested)
    _store_field(obj, 4, allocated)
    _store_field(obj, 5, status)
    _store_field(obj, 6, allocated_at)
    _store_field(obj, 7, expires_at)
    _store_field(obj, 8, actual_usage)
    _store_field(obj, 9, feedback)
    _store_field(obj, 10, failure_reason)
    _store_field(obj, 11, details)
    return obj



cdef inline object _ready_key(uint32_t rtype, uint64_t owner):
    return (<uint64_t>rtype << 32) | owner


import threading as _threading
cdef object _get_ident = _threading.get_ident

cdef object _EXPIRED_FEEDBACK = _AllocationFeedback(used_successfully=False, reason_for_release="Expired")
cdef object _DROPPED_FEEDBACK = _AllocationFeedback(used_successfully=True,
                                                    reason_for_release="claim dropped without release")
cdef object _RESET_FEEDBACK = _AllocationFeedback(used_successfully=False, reason_for_release="reset")
cdef object _CLOSE_FEEDBACK = _AllocationFeedback(used_successfully=False, reason_for_release="allocator closed")


cdef class EngineCore:
    """The lifecycle of every allocation (see this file's header). prealloc.engine's
    ResourceAllocator subclasses it and calls only the methods below; it never writes
    the state here."""

    # read (never written) by the Python layer
    cdef readonly AllocationTable _table
    cdef readonly ExpiryTicker _ticker
    cdef readonly bint _closed
    # what allocations go through, set once by _core_setup (strategies) or by
    # _core_configure (the live options); the Python layer reads them
    cdef readonly dict _strategies       # ResourceType -> AllocationStrategy (the only copy)
    cdef list _strategy_of               # the same, indexed by type number
    cdef readonly object _ledger         # quotas.QuotaLedger
    cdef bint _quotas_active
    cdef readonly object events
    cdef object _metrics
    cdef bint _metrics_direct            # a collector of the caller's: every metric recorded on it
    cdef object _log
    cdef dict _monitors                  # ResourceType -> monitor
    cdef dict _unavailable               # ResourceType -> why its built-in strategy could not start
    cdef dict _headroom                  # ResourceType -> fraction (only types with a monitor)
    cdef object _default_duration
    cdef object _sizer
    cdef object _predictor_update
    cdef object _claim_class
    cdef dict _listeners                 # the EventEmitter's own map, when it is one
    # per allocation, keyed by allocation id
    cdef dict _requests                  # PENDING: the request
    cdef dict _handles                   # the strategy's handle (only those with one)
    cdef dict _ready                     # (type << 32 | owner) -> {id: None}: ALLOCATED ones
    cdef dict _origins                   # (prediction id, sizer key, requested amount)
    cdef dict _str_ids                   # the caller's string request id (int ids live in the record)
    cdef dict _labels                    # the predictor label, where not "unknown"
    cdef dict _usage                     # (amount x s before the last adjust, since ns)
    cdef dict _charges                   # what the ledger holds for it (quotas active only)
    cdef dict _busy                      # (Event, thread ident) of an adjust in flight
    cdef dict _waiters                   # PENDING ids someone waits on: [Event, ...]
    # owners: target application <-> the small key stored in the record, dropped with
    # the owner's last record
    cdef dict _owner_keys
    cdef dict _owners                    # key -> [application, records]
    cdef uint64_t _next_owner
    # the queue (preallocators)
    cdef readonly object _queue
    cdef list _waiting                   # PENDING ids that wait for resources
    # handed from finalizers to the worker (deque.append is atomic and takes no lock)
    cdef object _dropped                 # ids of claims dropped unreleased
    cdef object _returned                # (type, application, amount) of deferred releases done
    cdef object _outcomes                # PredictionOutcomes for the predictor, in the order requests ended
    cdef dict _deferred                  # (type, application) -> charge kept for deferred releases
    cdef int _wake_fd
    cdef int _ready_fd                   # written when a request leaves PENDING (the asyncio face), -1: none
    # the tally
    cdef long long _total_requests, _successful, _failed, _cancelled, _skipped_low_confidence
    cdef long long _pending, _in_flight, _live
    cdef long long _expired, _claimed, _released, _finished, _prealloc_finished, _used
    cdef long long _needs, _needs_preallocated
    cdef double _allocation_seconds
    # what this allocator holds per type now, and at the time of the monitor's last
    # sample: a cached view does not see what was allocated since, so the headroom check
    # takes it off
    cdef double _net_held[_TYPES]
    cdef dict _sample_marks              # ResourceType -> (sample timestamp, _net_held then)
    cdef long long _by_type[_TYPES]
    cdef long long _released_by_type[_TYPES]   # resource_released of predictor "unknown"
    cdef long long _allocated_by_type[_TYPES]  # resource_allocated of predictor "unknown"
    cdef dict _labelled_counts                 # (metric, type name, predictor) -> count, the others
    cdef double _amount_seconds[_TYPES]
    cdef double _unused_amount_seconds[_TYPES]

    def _core_setup(self, AllocationTable table not None, ExpiryTicker ticker not None, dict strategies,
                    ledger, events, metrics, log, claim_class, queue=None):
        from collections import deque

        self._table = table
        self._ticker = ticker
        self._strategies = dict(strategies)
        self._strategy_of = [self._strategies.get(t) for t in _TYPE_OF] + [None]
        self._ledger = ledger
        q = ledger.quotas
        self._quotas_active = bool(q.per_request or q.per_type or q.per_application)
        self.events = events
        # The fast path reads the EventEmitter's map (it swaps tuples in a dict it keeps
        # for life); any other emitter is called for every event.
        from .events import EventEmitter
        self._listeners = events._listeners if type(events) is EventEmitter else None
        self._metrics = metrics
        from .metrics import MetricsCollector
        self._metrics_direct = type(metrics) is not MetricsCollector
        self._log = log
        self._claim_class = claim_class
        self._monitors = {}
        self._unavailable = {}
        self._headroom = {}
        self._requests = {}
        self._handles = {}
        self._ready = {}
        self._origins = {}
        self._str_ids = {}
        self._labels = {}
        self._labelled_counts = {}
        self._usage = {}
        self._charges = {}
        self._busy = {}
        self._waiters = {}
        self._owner_keys = {}
        self._owners = {}
        self._next_owner = 1
        self._queue = queue
        self._waiting = []
        self._dropped = deque()
        self._returned = deque()
        self._outcomes = deque()
        self._deferred = {}
        self._sample_marks = {}
        self._wake_fd = -1
        self._ready_fd = -1

    def _core_configure(self, dict monitors, dict headroom, default_duration, translator, predictor):
        """The live options (initialize()); each is read once per use, so a change takes
        effect for the next transition."""
        self._monitors = dict(monitors)
        self._headroom = {t: f for t, f in headroom.items() if t in self._monitors}
        self._default_duration = default_duration
        self._sizer = getattr(translator, "sizer", None)
        update = getattr(predictor, "update_model", None)
        self._predictor_update = update if callable(update) else None

    def _set_unavailable(self, dict unavailable):
        self._unavailable = dict(unavailable)

    def _set_wake_fd(self, int fd):
        self._wake_fd = fd

    def _set_ready_fd(self, int fd):
        """An eventfd the core writes whenever a request leaves PENDING (allocated, failed,
        cancelled, dropped at its deadline): the asyncio face waits on it with
        loop.add_reader. -1 turns it off; returns the previous fd."""
        cdef int old = self._ready_fd
        self._ready_fd = fd
        return old

    cdef inline void _signal_ready(self):
        cdef uint64_t one = 1
        if self._ready_fd >= 0:
            write(self._ready_fd, &one, sizeof(one))

    cdef inline bint _listened(self, str event):
        if self._listeners is None:
            return True
        return bool(self._listeners.get(event))

    cdef void _emit(self, str event, payload):
        try:
            self.events.emit(event, payload)
        except Exception:  # an emitter's own failure must not undo the transition
            self._log.exception("emitting %r failed", event)

    # ------------------------------------------------------------------ waking the worker
    cpdef void _wake(self):
        """One wake of a worker. The write happens with the GIL held, so it can never hit
        the fd after close() gave it up (close sets _wake_fd to -1, with the GIL, before
        it closes the descriptor) — and it is safe in a finalizer: no lock."""
        cdef uint64_t one = 1
        if self._wake_fd >= 0:
            write(self._wake_fd, &one, sizeof(one))  # EAGAIN: saturated, a worker is awake anyway

    def _queue_dropped(self, uint64_t allocation_id):
        """A Claim's finalizer: the worker releases it (never the finalizer's thread, which
        may be inside an adjust or hold any lock)."""
        self._dropped.append(allocation_id)
        self._wake()

    def _drain_returns(self):
        """The worker's share of the queues above, and the predictor's outcomes. Returns
        how many it handled."""
        cdef long n = 0
        while self._outcomes:
            try:
                outcome = self._outcomes.popleft()
            except IndexError:
                break
            update = self._predictor_update
            if update is not None:
                try:
                    update(outcome)
                except Exception:
                    self._log.exception("predictor.update_model raised for prediction %s", outcome.prediction_id)
            n += 1
        while self._dropped:
            try:
                rid = self._dropped.popleft()
            except IndexError:
                break
            self._release(rid, _DROPPED_FEEDBACK)
            n += 1
        while self._returned:
            try:
                rtype, application, amount = self._returned.popleft()
            except IndexError:
                break
            self._ledger.refund(rtype, application, amount)
            key = (rtype, application)
            left = self._deferred.get(key, 0.0) - amount
            if left > 1e-9:
                self._deferred[key] = left
            else:
                self._deferred.pop(key, None)
            n += 1
            if self._waiting:
                self._availability_changed()
        return n

    def _mark_closed(self):
        self._closed = True

    def _give_up_wake_fd(self):
        """close(): from now on nobody writes the fd; returns it for closing."""
        cdef int fd = self._wake_fd
        self._wake_fd = -1
        return fd

    # ------------------------------------------------------------------ owners
    cdef uint64_t _owner_ref(self, application) except? 0xFFFFFFFFFFFFFFFF:
        """The key of a target application (0 for None), counting one more record."""
        cdef uint64_t key
        if application is None:
            return 0
        k = self._owner_keys.get(application)
        if k is None:
            key = self._next_owner
            self._next_owner += 1
            self._owner_keys[application] = key
            self._owners[key] = [application, 1]
            return key
        entry = self._owners[k]
        entry[1] += 1
        return <uint64_t>k

    cdef object _owner_unref(self, uint64_t key):
        """One record of the owner ended; drops the owner with its last. Returns the
        application."""
        if key == 0:
            return None
        entry = self._owners.get(key)
        if entry is None:
            return None
        application = entry[0]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._owners[key]
            del self._owner_keys[application]
        return application

    cdef object _application_of(self, uint64_t key):
        if key == 0:
            return None
        entry = self._owners.get(key)
        return entry[0] if entry is not None else None

    def _owner_count(self):
        return len(self._owners)

    def _busy_count(self):
        """Adjusts in flight (tests)."""
        return len(self._busy)

    # ------------------------------------------------------------------ public hot paths
    def request_preallocation(self, request):
        """Allocates now, on the calling thread. Returns the allocation: ALLOCATED, or
        FAILED with failure_reason (no strategy, over quota, below headroom, refused by
        the machine), or RELEASED with failure_reason when a reset, cancel or close
        withdrew it while it was being allocated. Bad input raises ValueError/TypeError
        and changes nothing; after close(), RuntimeError."""
        cdef uint64_t rid
        if self._closed:
            self._check_open()
        if type(request) is not _ResourceRequest:
            if not isinstance(request, _ResourceRequest):
                raise TypeError(f"request must be a ResourceRequest, not {type(request).__name__}")
            request.validate()
        elif not _already_valid(request):
            request.validate()
        rid = self._admit(request, 0)
        result = self._allocate(rid, request, False)
        if result is None:
            return self._withdrawn_snapshot(rid, request)
        return result

    def release_allocation(self, allocation_id, feedback=None):
        """Gives an allocation back (or withdraws a request still queued). False when
        the id is unknown, already finished, or another release or the expiry won.
        TypeError for an id that is not an int, or feedback that is not an
        AllocationFeedback; after close(), RuntimeError."""
        if self._closed:
            self._check_open()
        if type(allocation_id) is not int:
            _check_id(allocation_id)
        if feedback is not None:
            if type(feedback) is not _AllocationFeedback:
                raise TypeError(f"feedback must be an AllocationFeedback, not {type(feedback).__name__}")
            feedback.validate()
        if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF:
            return False
        return self._release(<uint64_t>allocation_id, feedback)

    cdef bint _release(self, uint64_t allocation_id, feedback) except -1:
        cdef pa_status_t prev = <pa_status_t>PA_STATUS_COUNT
        cdef int rc = pa_table_transition(self._table._table, allocation_id, _BIT_RELEASABLE,
                                          PA_STATUS_RELEASING, &prev)
        if rc == 0:
            return self._finish(allocation_id, True, feedback)
        if rc == -EAGAIN and prev == PA_STATUS_PENDING:
            return self._cancel(allocation_id)
        return False

    # ------------------------------------------------------------------ admit
    cdef uint64_t _admit(self, request, uint64_t flags) except 0:
        """The request's PENDING record, with its request kept until it leaves PENDING."""
        cdef pa_record_init_t init
        cdef pa_id_t rid = 0
        cdef int rc
        memset(&init, 0, sizeof(init))
        init.status = PA_STATUS_PENDING
        init.resource_type = <uint32_t>request.resource_type
        init.requested = request.predicted_need
        request_id = request.request_id
        init.request_id = request_id if type(request_id) is int else 0
        init.user_data = flags
        init.owner = self._owner_ref(request.metadata.target_application)
        rc = pa_table_insert(self._table._table, &init, &rid)
        if rc != 0:
            self._owner_unref(init.owner)
            if rc == -EINVAL:
                raise ValueError(f"bad request amount {init.requested!r}")
            if rc == -ENOSPC:
                raise OSError(ENOSPC, f"pa_table_insert: the allocation table is full "
                                      f"({pa_table_capacity(self._table._table)} live records); "
                                      "raise PreallocatorConfig.capacity")
            _check(rc, "pa_table_insert")
        # no Python code from the insert to here
        self._requests[rid] = request
        if type(request_id) is not int:
            self._str_ids[rid] = request_id
        self._total_requests += 1
        self._pending += 1
        return rid

    def _submit(self, request, double deadline):
        """Admits a request for the worker: its deadline timer, then the queue. Returns
        its id; a reset or cancel may withdraw it at any moment after the admit (the id
        then reads as finished)."""
        cdef uint64_t rid = self._admit(request, 0)
        cdef int rc = pa_ticker_schedule(self._ticker._ticker, rid, _seconds_to_ns(deadline), NULL)
        if rc != 0 and rc != -ENOENT:  # ENOENT: withdrawn already
            self._cancel(rid)
            _check(rc, "pa_ticker_schedule")
        self._queue.push(rid, request.priority, request.confidence, request.deadline)
        return rid

    # ------------------------------------------------------------------ allocate
    cdef object _allocate(self, uint64_t record_id, request, bint may_wait):
        """PENDING -> ALLOCATED through the strategy. Returns the allocation snapshot
        (ALLOCATED or FAILED), None when the request was withdrawn or dropped meanwhile,
        or WAIT when it must wait for resources and may_wait."""
        self._in_flight += 1
        try:
            return self._allocate_now(record_id, request, may_wait)
        finally:
            self._in_flight -= 1

    cdef object _allocate_now(self, uint64_t record_id, request, bint may_wait):
        cdef uint32_t rtype = <uint32_t>request.resource_type
        cdef double amount = request.predicted_need
        cdef double granted, charged = 0.0, fraction
        cdef pa_record_t rec
        cdef uint64_t expires_ns
        cdef int rc
        strategy = self._strategy_of[rtype] if rtype < _TYPES else None
        if strategy is None:
            why = self._unavailable.get(_TYPE_OF[rtype]) if self._unavailable else None
            return self._fail(record_id, f"no strategy for {_TYPE_OF[rtype].name}"
                                         + (f" ({why})" if why else ""))
        rtype_obj = _TYPE_OF[rtype]
        metadata = request.metadata
        application = metadata.target_application
        if self._quotas_active:
            # charge what the strategy will really hold (whole cores, whole huge pages)
            try:
                planned = float(strategy.planned_amount(request, amount))
            except ValueError as exc:
                return self._fail(record_id, str(exc))
            except Exception as exc:
                self._log.error("%s.planned_amount raised", type(strategy).__name__, exc_info=exc)
                return self._fail(record_id, f"planned_amount failed: {exc}")
            reason = self._charge(rtype_obj, application, planned, planned)
            if reason is not None:
                return self._fail(record_id, reason)
            charged = planned
        availability = None
        try:
            if self._headroom and rtype_obj in self._headroom:
                availability = self._availability(rtype_obj)
                fraction = self._headroom[rtype_obj]
                if self._available_now(rtype, availability) - amount < fraction * availability.total:
                    if charged:
                        self._ledger.refund(rtype_obj, application, charged)
                    if may_wait:
                        return WAIT
                    return self._fail(record_id, f"insufficient {rtype_obj.name}: {amount:g} would leave less "
                                                 f"than the {fraction:.0%} headroom")
            grant = strategy.allocate(request, amount, availability)
            if type(grant) is Grant:
                granted = (<Grant>grant).amount
                handle = (<Grant>grant).handle
            else:  # any object with these two attributes will do
                granted = grant.amount
                handle = grant.handle
        except Exception as exc:  # a strategy's or monitor's failure must not leak the charge
            if charged:
                self._ledger.refund(rtype_obj, application, charged)
            return self._allocation_refused(record_id, strategy, exc, may_wait)
        except BaseException:
            if charged:
                self._ledger.refund(rtype_obj, application, charged)
            self._fail(record_id, "interrupted")
            raise
        if self._quotas_active and granted != charged:
            self._rebook(rtype_obj, application, charged, granted)
            charged = granted

        prediction_id = request.associated_prediction_id
        pattern = metadata.triggering_pattern_id
        # the transition and its bookkeeping: no Python code from here ...
        if pa_table_set_allocated(self._table._table, record_id, granted) != 0 or \
                pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_ALLOCATED,
                                    NULL) != 0:
            # withdrawn (cancel, reset) or dropped at its deadline while the strategy worked
            self._give_back_unowned(strategy, handle, rtype_obj, application, charged)
            return None
        del self._requests[record_id]
        self._pending -= 1
        self._live += 1
        if handle is not None:
            self._handles[record_id] = handle
        if self._quotas_active:
            self._charges[record_id] = charged
        pa_table_get(self._table._table, record_id, &rec)
        key = _ready_key(rtype, rec.owner)
        ready = self._ready.get(key)
        if ready is None:
            ready = self._ready[key] = {}
        ready[record_id] = None
        if prediction_id is not None or pattern is not None:
            self._origins[record_id] = (prediction_id, (pattern, rtype_obj) if pattern is not None else None,
                                        amount)
        predictor = metadata.source_predictor_id
        if predictor != "unknown":
            self._labels[record_id] = predictor
        if self._metrics_direct:
            self._metrics.record_metric("resource_allocated", resource_type=rtype_obj.name, predictor=predictor)
        elif predictor == "unknown":
            self._allocated_by_type[rtype] += 1
        else:
            key3 = ("resource_allocated", rtype_obj.name, predictor)
            self._labelled_counts[key3] = self._labelled_counts.get(key3, 0) + 1
        self._successful += 1
        self._net_held[rtype] += granted
        self._allocation_seconds += (rec.allocated_ns - rec.created_ns) * _NS
        self._by_type[rtype] += 1
        if rec.timer:  # the deadline timer of a queued request: its job is done
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        closed = self._closed
        # ... to here
        if closed:  # close() raced this allocation: it collected the live ids before it existed
            self._release(record_id, _CLOSE_FEEDBACK)
            return self._withdrawn_snapshot(record_id, request)
        duration = request.duration
        if duration is None:
            duration = self._default_duration
        if duration is not None:
            expires_ns = rec.allocated_ns + <uint64_t>(<double>duration * 1e9)
            rc = pa_ticker_schedule(self._ticker._ticker, record_id, expires_ns, NULL)
            if rc == 0:
                rec.expires_ns = expires_ns
            elif rc != -ENOENT:  # ENOENT: released already
                _check(rc, "pa_ticker_schedule")
        if self._waiters:
            self._notify_waiters(record_id)
        self._signal_ready()
        if self._listened("resource:allocated"):
            snapshot = self._snapshot_of(&rec, handle, None, None)
            self._emit("resource:allocated", snapshot)
            return snapshot
        return self._snapshot_of(&rec, handle, None, None)

    cdef object _availability(self, rtype):
        """The monitor's view for the headroom check: its cached, subscribed view where it
        keeps one (a fresh sample costs ~0.35 ms), a fresh sample otherwise."""
        monitor = self._monitors[rtype]
        cached = getattr(monitor, "cached_availability", None)
        if cached is not None:
            return cached(rtype)
        return monitor.get_resource_availability(rtype)

    cdef double _available_now(self, uint32_t rtype, availability):
        """The view's available amount less what this allocator took since the view was
        sampled (and plus what it gave back)."""
        rtype_obj = _TYPE_OF[rtype]
        mark = self._sample_marks.get(rtype_obj)
        if mark is None or mark[0] != availability.timestamp:
            mark = self._sample_marks[rtype_obj] = (availability.timestamp, self._net_held[rtype])
        return availability.available - (self._net_held[rtype] - <double>mark[1])

    cdef str _type_name_of(self, uint64_t record_id):
        cdef pa_record_t rec
        if pa_table_get(self._table._table, record_id, &rec) != 0:
            return "?"
        return _TYPE_OF[rec.resource_type].name

    cdef object _allocation_refused(self, uint64_t record_id, strategy, exc, bint may_wait):
        from .strategies import AllocationError, InsufficientResources

        if isinstance(exc, InsufficientResources):
            if may_wait:
                return WAIT
        elif not isinstance(exc, AllocationError):
            self._log.error("%s raised while allocating", type(strategy).__name__, exc_info=exc)
            self._metrics.record_metric("preallocation_error", resource_type=self._type_name_of(record_id))
        return self._fail(record_id, str(exc) or type(exc).__name__)

    cdef void _give_back_unowned(self, strategy, handle, rtype, application, double charged):
        """A resource the strategy reserved for a request that ended meanwhile."""
        deferred = None
        if handle is not None:
            try:
                deferred = strategy.release(handle)
            except Exception:
                self._log.exception("%s failed to release %r", type(strategy).__name__, handle)
        self._refund_after(deferred, rtype, application, charged)

    cdef void _refund_after(self, deferred, rtype, application, double charged):
        if not charged:
            return
        if deferred is not None and getattr(deferred, "is_done", True) is False:
            key = (rtype, application)
            self._deferred[key] = self._deferred.get(key, 0.0) + charged
            deferred.add_done_callback(_DeferredRefund(self, rtype, application, charged))
        else:
            self._ledger.refund(rtype, application, charged)

    # ------------------------------------------------------------------ fail / cancel
    cdef object _fail(self, uint64_t record_id, str reason):
        """PENDING -> FAILED with a reason; the snapshot, or None if it was not PENDING."""
        cdef pa_record_t rec
        if pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_FAILED, NULL) != 0:
            return None
        pa_table_get(self._table._table, record_id, &rec)
        request = self._end_pending(&rec, "failed")
        self._failed += 1
        snapshot = self._snapshot_of(&rec, None, reason, None)
        self._forget_ids(record_id)
        self._note_failure(snapshot, reason, request)
        self._signal_ready()
        return snapshot

    cdef bint _cancel(self, uint64_t record_id) except -1:
        """PENDING -> RELEASED: a request withdrawn before it was allocated."""
        cdef pa_record_t rec
        if pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_RELEASED, NULL) != 0:
            return False
        pa_table_get(self._table._table, record_id, &rec)
        self._end_pending(&rec, "cancelled")
        self._forget_ids(record_id)
        self._cancelled += 1
        self._signal_ready()
        self._metrics.record_metric("request_cancelled", resource_type=_TYPE_OF[rec.resource_type].name)
        return True

    cdef object _end_pending(self, pa_record_t *rec, str outcome):
        """A PENDING record's end (failed, cancelled, dropped at its deadline): no Python
        code until the waiters are told. Returns its request. The caller signals the
        readiness fd once the end is fully told (a failure's event emitted), so an event
        loop woken by it finds the reason."""
        if rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        pa_table_remove(self._table._table, rec.id)
        request = self._requests.pop(rec.id, None)
        self._pending -= 1
        self._owner_unref(rec.owner)
        if self._waiters:
            self._notify_waiters(rec.id)
        if request is not None and self._predictor_update is not None \
                and request.associated_prediction_id is not None:
            self._queue_outcome(_PredictionOutcome(request.associated_prediction_id, request.resource_type,
                                                   request.predicted_need, 0.0, False, outcome, rec.id, None))
        return request

    cdef inline void _forget_ids(self, uint64_t record_id):
        if self._str_ids:
            self._str_ids.pop(record_id, None)

    cdef void _queue_outcome(self, outcome):
        """The predictor hears of it on the worker, in order (never on the caller's or
        the ticker's path)."""
        self._outcomes.append(outcome)
        self._wake()

    cdef void _note_failure(self, snapshot, str reason, request):
        predictor = request.metadata.source_predictor_id if request is not None else "unknown"
        self._metrics.record_metric("preallocation_failed", resource_type=snapshot.resource_type.name,
                                    predictor=predictor)
        self._log.warning("request %d for %g of %s failed: %s", snapshot.request_id,
                          snapshot.requested_amount, snapshot.resource_type.name, reason)
        if self._listened("resource:failed"):
            self._emit("resource:failed", snapshot)

    def _withdraw(self, allocation_id):
        """cancel_request(): PENDING -> RELEASED, nothing else (an allocation that is
        ALLOCATED by now stays)."""
        if type(allocation_id) is not int:
            _check_id(allocation_id)
        if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF:
            return False
        return self._cancel(<uint64_t>allocation_id)

    # ------------------------------------------------------------------ claim
    cdef bint _to_active(self, uint64_t allocation_id) except -1:
        """ALLOCATED -> ACTIVE, the one place it happens: the consumer owns it now, so its
        expiry stops and it leaves the ready index."""
        cdef pa_record_t rec
        if pa_table_transition(self._table._table, allocation_id, _BIT_ALLOCATED, PA_STATUS_ACTIVE, NULL) != 0:
            return False
        pa_table_get(self._table._table, allocation_id, &rec)
        if rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        ready = self._ready.get(_ready_key(rec.resource_type, rec.owner))
        if ready is not None:
            ready.pop(allocation_id, None)
            if not ready and rec.owner:  # an application's index goes with it (owner 0 stays)
                del self._ready[_ready_key(rec.resource_type, rec.owner)]
        self._claimed += 1
        return True

    def _claim(self, allocation_id, target_process_id=None):
        """claim(): the consumer takes a ready allocation by id."""
        cdef int status
        if type(allocation_id) is not int:
            _check_id(allocation_id)
        if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF or \
                pa_table_status(self._table._table, <uint64_t>allocation_id) < 0:
            raise KeyError(f"no allocation {allocation_id}")
        if not self._to_active(<uint64_t>allocation_id):
            status = pa_table_status(self._table._table, <uint64_t>allocation_id)
            if status < 0:
                raise KeyError(f"no allocation {allocation_id}")
            raise ValueError(f"allocation {allocation_id} is {_STATUS_OF[status].name}, not ALLOCATED")
        return self._hand_over(allocation_id, True, target_process_id)

    def _claim_ready(self, rtype, application, double amount, target_process_id=None):
        """acquire()'s hit: claims the first ready allocation of rtype for application
        holding at least amount; the Claim, or None when none is ready (a miss). Counts
        the need either way."""
        cdef pa_record_t rec
        cdef uint64_t owner = 0
        self._needs += 1
        if application is not None:
            k = self._owner_keys.get(application)
            if k is None:
                return None
            owner = k
        ready = self._ready.get(_ready_key(<uint32_t>rtype, owner))
        if not ready:
            return None
        for rid in list(ready):
            if pa_table_get(self._table._table, rid, &rec) != 0 or rec.status != PA_STATUS_ALLOCATED \
                    or rec.allocated < amount:
                continue
            if self._to_active(rid):
                self._needs_preallocated += 1
                return self._hand_over(rid, True, target_process_id)
        return None

    def _acquire_at_need(self, rtype, double amount, application, target_process_id):
        """acquire()'s miss (and the reactive allocator's every need): allocate now, on
        the caller's thread, and hand over at once. Not a preallocation: it stays out of
        the hit rate."""
        from .strategies import AllocationError

        request = _ResourceRequest(rtype, amount, 1.0, metadata=_RequestMetadata(
            target_application=application, target_process_id=target_process_id))
        cdef uint64_t rid = self._admit(request, _AT_NEED)
        allocation = self._allocate(rid, request, False)
        if allocation is None:
            raise AllocationError(f"{rtype.name} allocation was withdrawn (reset or close) before the claim")
        if allocation.status is not _AllocationStatus.ALLOCATED:
            raise AllocationError(allocation.failure_reason or f"{rtype.name} allocation failed")
        if not self._to_active(rid):
            raise AllocationError(f"allocation {rid} was released (reset or close) before the claim")
        return self._hand_over(rid, False, target_process_id)

    cdef object _hand_over(self, uint64_t allocation_id, bint preallocated, target_process_id):
        """After this thread won ALLOCATED -> ACTIVE: the strategy's claim, on the
        consumer's thread, then the Claim."""
        cdef pa_record_t rec
        if pa_table_get(self._table._table, allocation_id, &rec) != 0:
            from .strategies import AllocationError
            raise AllocationError(f"allocation {allocation_id} ended before the claim")
        rtype = _TYPE_OF[rec.resource_type]
        handle = self._handles.get(allocation_id)
        resource = None
        if handle is not None:
            strategy = self._strategy_of[rec.resource_type]
            try:
                if target_process_id is None:
                    resource = strategy.claim(handle)
                else:
                    resource = strategy.claim(handle, target_process_id)
            except Exception as exc:
                from .strategies import AllocationError
                self._release(allocation_id, _AllocationFeedback(
                    used_successfully=False, reason_for_release=f"claim failed: {exc}"))
                if isinstance(exc, (ValueError, TypeError)):
                    raise
                raise AllocationError(f"claim of {allocation_id} failed: {exc}") from exc
        return self._claim_class(self, allocation_id, rtype, resource, preallocated)

    # ------------------------------------------------------------------ adjust
    def _adjust(self, allocation_id, double new_amount):
        """adjust_allocation(): grows or shrinks a live allocation through its strategy.
        False (nothing changed, nothing charged) when the id is not live, the strategy
        cannot, a quota or the machine says no. One adjust of an allocation at a time; a
        release or expiry of it waits for the adjust in flight (see _finish)."""
        cdef pa_record_t rec
        cdef double charged, planned, delta, effective, before
        cdef uint64_t now, since
        import threading
        from .quotas import QuotaExceeded
        from .strategies import AllocationError

        if type(allocation_id) is not int:
            _check_id(allocation_id)
        if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF:
            return False
        rid = allocation_id
        mine = (threading.Event(), threading.get_ident())
        while True:
            if pa_table_get(self._table._table, rid, &rec) != 0 or \
                    rec.status not in (PA_STATUS_ALLOCATED, PA_STATUS_ACTIVE):
                return False
            other = self._busy.get(rid)
            if other is None:
                self._busy[rid] = mine  # no Python code since the status check
                break
            if other[1] == mine[1]:
                return False  # an adjust of this allocation from inside its own adjust
            other[0].wait()
        try:
            rtype = _TYPE_OF[rec.resource_type]
            strategy = self._strategy_of[rec.resource_type]
            handle = self._handles.get(rid)
            if strategy is None:
                return False
            application = self._application_of(rec.owner)
            charged = self._charges.get(rid, 0.0)
            planned = new_amount
            extra = 0.0
            if self._quotas_active:
                planned = float(strategy.planned_resize(handle, new_amount))  # ValueError: absurd
                if planned > charged:
                    try:
                        self._ledger.charge(rtype, application, planned - charged, request_amount=planned)
                    except QuotaExceeded as exc:
                        self._log.warning("adjust of %d refused: %s", rid, exc)
                        return False
                    extra = planned - charged
            try:
                delta = new_amount - rec.allocated
                if delta > 0 and self._headroom and rtype in self._headroom:
                    availability = self._availability(rtype)
                    if self._available_now(rec.resource_type, availability) - delta \
                            < self._headroom[rtype] * availability.total:
                        raise AllocationError(f"{rtype.name}: growth by {delta:g} would eat the headroom")
                effective = float(strategy.adjust(handle, new_amount))
            except BaseException as exc:
                if extra:
                    self._ledger.refund(rtype, application, extra)
                if isinstance(exc, ValueError):
                    raise
                if not isinstance(exc, Exception):
                    raise
                if not isinstance(exc, AllocationError):
                    self._log.error("%s.adjust raised", type(strategy).__name__, exc_info=exc)
                else:
                    self._log.warning("adjust of %d refused: %s", rid, exc)
                return False
            if self._quotas_active:
                if effective != charged + extra:
                    self._rebook(rtype, application, charged + extra, effective)
                self._charges[rid] = effective
            now = pa_clock_now_ns()
            # the usage history and the new amount: no Python code from here ...
            pa_table_get(self._table._table, rid, &rec)
            history = self._usage.get(rid)
            before, since = (history[0], history[1]) if history is not None else (0.0, rec.allocated_ns)
            self._usage[rid] = (before + rec.allocated * (now - since if now > since else 0) * _NS, now)
            pa_table_set_allocated(self._table._table, rid, effective)
            self._net_held[rec.resource_type] += effective - rec.allocated
            # ... to here
        finally:
            del self._busy[rid]
            mine[0].set()
        self._metrics.record_metric("resource_adjusted", resource_type=rtype.name)
        self._log.info("adjusted allocation %d of %s: %g -> %g", rid, rtype.name, rec.allocated, effective)
        if self._waiting and effective < rec.allocated:
            self._availability_changed()
        return True

    # ------------------------------------------------------------------ the end
    cdef bint _finish(self, uint64_t record_id, bint released, feedback) except -1:
        """The end of an allocation, run by whoever won the transition out of it
        (RELEASING for a release, EXPIRED for the ticker): give the resource back, book
        hit and waste, refund the ledger, feed the sizer and the predictor, emit, remove
        the record."""
        cdef pa_record_t rec
        cdef pa_table_t *table = self._table._table
        cdef uint64_t now, since, start
        cdef double held, unused, used, before = 0.0, charged
        cdef bint hit
        cdef pa_status_t back
        cdef int rc

        if self._busy:
            busy = self._busy.get(record_id)
            if busy is not None and busy[1] != _get_ident():
                busy[0].wait()  # the adjust in flight finishes first; what is read below is final
        if pa_table_get(table, record_id, &rec) != 0:
            return False
        rtype = _TYPE_OF[rec.resource_type]
        handle = self._handles.get(record_id)
        deferred = None
        if handle is not None:
            try:
                deferred = self._strategy_of[rec.resource_type].release(handle)
            except Exception as exc:
                from .strategies import AllocationError

                self._log.exception("%s failed to release %r", type(self._strategy_of[rec.resource_type]).__name__,
                                    handle)
                self._metrics.record_metric("release_failed" if isinstance(exc, AllocationError) else "release_error",
                                            resource_type=rtype.name)
                if released:
                    # the spec's revert: a release that failed leaves the allocation as it was,
                    # with its expiry (a timer that fired meanwhile found it RELEASING)
                    back = PA_STATUS_ACTIVE if rec.active_ns else PA_STATUS_ALLOCATED
                    rc = pa_ticker_revert(self._ticker._ticker, record_id, back)
                    if rc != 0 and rc != -EAGAIN:
                        self._log.error("re-arming the expiry of %d after a failed release: %s", record_id,
                                        os.strerror(-rc))
                    return False
                # an expiry cannot be undone: the strategy keeps what it could not give back
            pa_table_get(table, record_id, &rec)
        if released and rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        now = pa_clock_now_ns()
        # the bookkeeping: no Python code from here ...
        if handle is not None:
            del self._handles[record_id]
        key = _ready_key(rec.resource_type, rec.owner)
        ready = self._ready.get(key)
        if ready is not None:
            ready.pop(record_id, None)
            if not ready and rec.owner:
                del self._ready[key]
        origin = self._origins.pop(record_id, None) if self._origins else None
        history = self._usage.pop(record_id, None) if self._usage else None
        predictor = self._labels.pop(record_id, None) if self._labels else None
        charge = self._charges.pop(record_id, None) if self._quotas_active else None
        application = self._owner_unref(rec.owner)

        # usage: the whole amount is unused while it waited unclaimed; after a claim,
        # amount minus the reported use (use not reported after a claim counts as all used)
        since = rec.allocated_ns
        if history is not None:
            before, since = history
        held = before + rec.allocated * (now - since if now > since else 0) * _NS
        hit = rec.active_ns != 0 or (feedback is not None and feedback.used_successfully)
        if not hit:
            unused = held
        else:
            used = rec.allocated
            if feedback is not None and feedback.actual_amount_used is not None:
                used = min(<double>feedback.actual_amount_used, rec.allocated)
            start = rec.active_ns if rec.active_ns else rec.allocated_ns
            unused = rec.allocated * ((start - rec.allocated_ns) * _NS) \
                + (rec.allocated - used) * ((now - start if now > start else 0) * _NS)
            if unused > held:
                unused = held
        self._finished += 1
        if not (rec.user_data & _AT_NEED):
            self._prealloc_finished += 1
            self._used += hit
        self._amount_seconds[rec.resource_type] += held
        self._unused_amount_seconds[rec.resource_type] += unused
        self._live -= 1
        self._net_held[rec.resource_type] -= rec.allocated
        if predictor is None and not self._metrics_direct:
            self._released_by_type[rec.resource_type] += 1
        if released:
            self._released += 1
            pa_table_transition(table, record_id, _BIT_RELEASING, PA_STATUS_RELEASED, NULL)
            rec.status = PA_STATUS_RELEASED
        else:
            self._expired += 1
        pa_table_remove(table, record_id)
        # ... to here
        if self._waiters:
            self._notify_waiters(record_id)
        if charge is not None:
            self._refund_after(deferred, rtype, application, <double>charge)
        if self._metrics_direct:
            self._metrics.record_metric("resource_released", resource_type=rtype.name,
                                        predictor=predictor if predictor is not None else "unknown")
        elif predictor is not None:
            key3 = ("resource_released", rtype.name, predictor)
            self._labelled_counts[key3] = self._labelled_counts.get(key3, 0) + 1
        if origin is not None:
            if feedback is not None:
                self._learn(origin, feedback)
            if origin[0] is not None and self._predictor_update is not None:
                used_amount = rec.allocated if hit else 0.0
                if feedback is not None and feedback.actual_amount_used is not None:
                    used_amount = feedback.actual_amount_used
                self._queue_outcome(_PredictionOutcome(origin[0], rtype, origin[2], used_amount, hit,
                                                       "released" if released else "expired", record_id, feedback))
        name = "resource:released" if released else "resource:expired"
        if self._listened(name):
            snapshot = self._snapshot_of(&rec, handle, None, feedback)
            snapshot.actual_usage = feedback.actual_amount_used if feedback is not None else None
            self._emit(name, snapshot)
        self._forget_ids(record_id)
        if self._waiting:
            self._availability_changed()
        return True

    cdef void _learn(self, origin, feedback):
        """The adaptive sizer learns the real use (the predictor hears through
        _queue_outcome)."""
        sizer_key = origin[1]
        if self._sizer is not None and sizer_key is not None and feedback.actual_amount_used is not None:
            try:
                self._sizer.observe(sizer_key, feedback.actual_amount_used)
            except Exception:
                self._log.exception("the sizer failed to learn from %s", sizer_key)

    def _drain_expired(self):
        """Finishes what the ticker expired: allocations past their duration, and queued
        requests past their deadline (those never got a resource). Returns how many."""
        cdef pa_id_t ids[256]
        cdef size_t n, i
        cdef pa_record_t rec
        cdef long done = 0
        while self._ticker._ticker is not NULL:
            n = pa_ticker_drain(self._ticker._ticker, ids, 256)
            for i in range(n):
                if pa_table_get(self._table._table, ids[i], &rec) != 0:
                    continue
                done += 1
                if rec.allocated_ns == 0:  # never allocated: a request dropped at its deadline
                    request = self._end_pending(&rec, "failed")
                    self._failed += 1
                    rec.status = PA_STATUS_FAILED  # what it is to the caller: it never got its resource
                    reason = "deadline passed before the resource was available"
                    snapshot = self._snapshot_of(&rec, None, reason, None)
                    self._forget_ids(ids[i])
                    self._note_failure(snapshot, reason, request)
                    self._signal_ready()
                else:
                    self._finish(ids[i], False, _EXPIRED_FEEDBACK)
            if n < 256:
                break
        return done

    # ------------------------------------------------------------------ the queue (worker)
    def _process_queue(self, Py_ssize_t batch, bint pass_wake):
        """Allocates queued requests in priority order. Returns True when a request had
        to wait (the caller subscribes to the monitors then)."""
        cdef bint waited = False
        cdef uint64_t rid
        while True:
            ids = self._queue.pop_many(batch)
            if ids.size == 0:
                return waited
            if pass_wake and len(self._queue):
                # one read of the wake fd may have consumed several callers' wakes; pass
                # one on, so an idle worker takes what is left while this one allocates
                self._wake()
            for r in ids.tolist():
                rid = r
                request = self._requests.get(rid)
                if request is None:
                    continue  # withdrawn or dropped at its deadline
                try:
                    result = self._allocate(rid, request, True)
                except Exception:
                    self._log.exception("allocation of request %d failed", request.request_id)
                    self._fail(rid, "internal error; see the log")
                    continue
                if result is WAIT:
                    # the status check and the append with no Python code between: a deadline
                    # expiry either happened before (not PENDING: dropped) or finds it here
                    if pa_table_status(self._table._table, rid) == PA_STATUS_PENDING:
                        self._waiting.append(rid)
                        waited = True

    def _requeue_waiting(self):
        """Availability changed: the waiting requests go back into the queue."""
        waiting, self._waiting = self._waiting, []
        for rid in waiting:
            request = self._requests.get(rid)
            if request is not None:
                self._queue.push(rid, request.priority, request.confidence, request.deadline)
        return len(waiting)

    def _has_waiting(self):
        return bool(self._waiting)

    def _availability_changed(self):
        """Something was given back while requests wait (the preallocator retries them)."""

    # ------------------------------------------------------------------ reset
    def _release_all(self, feedback):
        """reset() and close(): withdraws every queued request and releases every
        allocation (claimed memory stays mapped, and charged, until the consumer's last
        view is gone). Returns how many ended here."""
        cdef long n = 0
        self._waiting = []
        for rid in self._table.collect(mask=LIVE_MASK).tolist():
            n += self._release(rid, feedback)
        return n

    # ------------------------------------------------------------------ waiting for readiness
    def _wait_ready(self, ids, timeout):
        """True once every id has left PENDING (ALLOCATED, claimed, or finished in any
        way), False at the timeout."""
        import threading
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for allocation_id in ids:
            if type(allocation_id) is not int:
                _check_id(allocation_id)
            if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF:
                continue
            event = threading.Event()
            # the status check and the registration with no Python code between: a
            # transition out of PENDING either came first or finds the event
            if pa_table_status(self._table._table, <uint64_t>allocation_id) != PA_STATUS_PENDING:
                continue
            self._waiters.setdefault(allocation_id, []).append(event)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(remaining):
                events = self._waiters.get(allocation_id)
                if events is not None and event in events:
                    events.remove(event)
                    if not events:
                        self._waiters.pop(allocation_id, None)
                return False
        return True

    cdef void _notify_waiters(self, uint64_t record_id):
        events = self._waiters.pop(record_id, None)
        if events:
            for event in events:
                event.set()

    # ------------------------------------------------------------------ the tally
    def _count_skipped(self):
        self._skipped_low_confidence += 1

    def _statistics(self, Py_ssize_t queued_in_queue=0):
        """The counters, read in one go (the GIL makes it one consistent snapshot)."""
        cdef int i
        by_type = {}
        waste = {}
        rates = []
        for i in range(len(_TYPE_OF)):
            if self._by_type[i]:
                by_type[_TYPE_OF[i]] = self._by_type[i]
            if self._amount_seconds[i] > 0:
                waste[_TYPE_OF[i]] = self._unused_amount_seconds[i] / self._amount_seconds[i]
                rates.append(waste[_TYPE_OF[i]])
        return _PreallocatorStatistics(
            total_requests=self._total_requests,
            successful_allocations=self._successful,
            failed_allocations=self._failed,
            average_allocation_time=self._allocation_seconds / self._successful if self._successful else 0.0,
            resource_hit_rate=self._used / self._prealloc_finished if self._prealloc_finished else 0.0,
            resource_waste_rate=sum(rates) / len(rates) if rates else 0.0,
            allocations_by_type=by_type,
            skipped_low_confidence=self._skipped_low_confidence,
            expired=self._expired,
            claimed=self._claimed,
            released=self._released,
            active_allocations=self._live,
            queued_requests=self._pending - self._in_flight,
            cancelled=self._cancelled,
            in_flight=self._in_flight,
            finished=self._finished,
            used=self._used,
            needs=self._needs,
            needs_preallocated=self._needs_preallocated,
            need_hit_rate=self._needs_preallocated / self._needs if self._needs else 0.0,
            waste_rate_by_type=waste,
            preallocations_finished=self._prealloc_finished,
        )

    def _holdings(self):
        """What the ledger should hold, from the per-allocation charges (tests compare it
        with the ledger): {(type, application): amount} of the live allocations."""
        cdef pa_record_t rec
        out = {}
        for rid, amount in self._charges.items():
            if pa_table_get(self._table._table, rid, &rec) != 0:
                continue
            key = (_TYPE_OF[rec.resource_type], self._application_of(rec.owner))
            out[key] = out.get(key, 0.0) + amount
        return out

    def _metric_counts(self):
        """The counters the core keeps for the metrics that happen on every allocation
        (a MetricsCollector source): [(name, labels, value)]."""
        cdef int i
        out = []
        for i in range(len(_TYPE_OF)):
            if self._allocated_by_type[i]:
                out.append(("resource_allocated", (("predictor", "unknown"), ("resource_type", _TYPE_OF[i].name)),
                            self._allocated_by_type[i]))
            if self._released_by_type[i]:
                out.append(("resource_released", (("predictor", "unknown"), ("resource_type", _TYPE_OF[i].name)),
                            self._released_by_type[i]))
        for (name, type_name, predictor), value in list(self._labelled_counts.items()):
            out.append((name, (("predictor", predictor), ("resource_type", type_name)), value))
        return out

    def _deferred_holdings(self):
        """{(type, application): amount} still charged for resources that outlive their
        release (a consumer's view), until the worker books their refund."""
        return dict(self._deferred)

    # ------------------------------------------------------------------ ledger helpers
    cdef object _charge(self, rtype, application, double amount, double request_amount):
        """Books amount against the quotas; the reason when a quota refuses."""
        try:
            self._ledger.charge(rtype, application, amount, request_amount=request_amount)
        except Exception as exc:
            from .quotas import QuotaExceeded  # here, not per call: the refusal is the rare path

            if isinstance(exc, QuotaExceeded):
                return str(exc)
            raise
        return None

    cdef void _rebook(self, rtype, application, double booked, double actual):
        """The ledger holds what was really reserved (a CPU request of 250 holds 300)."""
        if actual > booked:
            self._ledger.force(rtype, application, actual - booked)
        elif actual < booked:
            self._ledger.refund(rtype, application, booked - actual)

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, Record rec, handle=None, failure_reason=None, feedback=None):
        cdef pa_record_t r
        r.id = rec.id
        r.status = rec.status
        r.resource_type = rec.resource_type
        r.requested = rec.requested
        r.allocated = rec.allocated
        r.allocated_ns = rec.allocated_ns
        r.expires_ns = rec.expires_ns
        r.request_id = rec.request_id
        return self._snapshot_of(&r, handle, failure_reason, feedback)

    def _get(self, allocation_id):
        """get_allocation(): a snapshot of a live allocation or queued request, or None."""
        cdef pa_record_t rec
        if type(allocation_id) is not int:
            _check_id(allocation_id)
        if not 0 < allocation_id <= 0xFFFFFFFFFFFFFFFF or \
                pa_table_get(self._table._table, <uint64_t>allocation_id, &rec) != 0:
            return None
        return self._snapshot_of(&rec, None, None, None)

    cdef object _withdrawn_snapshot(self, uint64_t record_id, request):
        return _new_snapshot(record_id, request.request_id, request.resource_type, request.predicted_need,
                             0.0, _AllocationStatus.RELEASED, None, None, None, None,
                             "withdrawn (reset, cancel, deadline or close) before it was allocated", {})

    cdef object _snapshot_of(self, const pa_record_t *rec, handle, failure_reason, feedback):
        rtype = _TYPE_OF[rec.resource_type]
        if handle is None and self._handles:
            handle = self._handles.get(rec.id)
        details = {}
        if handle is not None:
            try:
                details = self._strategy_of[rec.resource_type].describe(handle)
            except Exception:  # a released handle may not describe itself
                pass
        request_id = rec.request_id
        if self._str_ids:
            request_id = self._str_ids.get(rec.id, request_id)
        return _new_snapshot(
            rec.id, request_id, rtype, rec.requested, rec.allocated, _STATUS_OF[rec.status],
            rec.allocated_ns * _NS if rec.allocated_ns else None,
            rec.expires_ns * _NS if rec.expires_ns and rec.allocated_ns else None,
            None, feedback, failure_reason, details)

    # ------------------------------------------------------------------ the Python layer's
    def _check_open(self):
        raise RuntimeError("the allocator is closed")


cdef class _DeferredRefund:
    """The callback a DeferredRelease runs when the resource is really gone: it only
    queues the refund for the worker (it may run in a finalizer)."""

    cdef EngineCore core
    cdef object rtype, application
    cdef double amount

    def __cinit__(self, EngineCore core, rtype, application, double amount):
        self.core = core
        self.rtype = rtype
        self.application = application
        self.amount = amount

    def __call__(self):
        self.core._returned.append((self.rtype, self.application, self.amount))
        self.core._wake()


cdef int _check_id(allocation_id) except -1:
    """An allocation id is an int (not a bool, not a float that happens to be whole)."""
    if type(allocation_id) is int:
        return 0
    if isinstance(allocation_id, int) and not isinstance(allocation_id, bool):
        return 0
    raise TypeError(f"allocation_id must be an int, not {type(allocation_id).__name__} ({allocation_id!r})")
