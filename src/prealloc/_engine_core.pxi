# The allocators' hot paths, compiled (included into _native.pyx, so it shares the one copy
# of the C core linked into this module).
#
# EngineCore is the base class of prealloc.engine.ResourceAllocator. It owns the
# bookkeeping every allocation goes through — admit, allocate, finish (release or
# expiry), fail, cancel, hand over — and the running tally. Policy stays in Python:
# strategies, quotas, headroom, events, learning, the worker; EngineCore calls back into
# them only where the policy is configured.
#
# Atomicity: each method below runs with the GIL held and calls no Python code between
# the table transition and the dict updates that must go with it (dict operations on int
# keys run no Python code), so no other Python thread can observe one without the other.
# Python code of the subclass that touches the same dicts takes self._lock. This module
# is built for the GIL interpreter (freethreading_compatible=False).

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF

from .types import AllocationStatus as _AllocationStatus
from .types import ResourceAllocation as _ResourceAllocation
from .types import ResourceType as _ResourceType

cdef tuple _TYPE_OF = tuple(_ResourceType)
cdef tuple _STATUS_OF = tuple(_AllocationStatus)
cdef object _STATUS_RELEASED = _AllocationStatus.RELEASED
cdef object _STATUS_EXPIRED = _AllocationStatus.EXPIRED
cdef double _NS = 1e-9

# the answer _allocate gives when a queued request must wait for resources
WAIT = object()

cdef uint32_t _BIT_PENDING = 1u << PA_STATUS_PENDING
cdef uint32_t _BIT_ALLOCATED = 1u << PA_STATUS_ALLOCATED
cdef uint32_t _BIT_RELEASING = 1u << PA_STATUS_RELEASING
cdef uint32_t _BIT_RELEASABLE = (1u << PA_STATUS_ALLOCATED) | (1u << PA_STATUS_ACTIVE)

cdef enum:
    _TYPES = 8  # ResourceType values are 0..6; one spare


cdef double _INF = float("inf")


cdef inline bint _finite_seconds(x):
    return x is None or (type(x) is float and 0.0 <= <double>x < _INF)


cdef bint _already_valid(request) except -1:
    """The common case of ResourceRequest.validate() — every field already of its exact
    type and in range — checked without a Python call. Anything else goes through
    validate(), which coerces or raises with the message."""
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
            and request.metadata.target_process_id is None)


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


cdef class EngineCore:
    """The compiled half of every allocator (see this file's header)."""

    # shared with the Python layer, which reads them on its slower paths
    cdef public AllocationTable _table
    cdef public ExpiryTicker _ticker
    cdef public dict _handles       # allocation id -> strategy handle (only those with one)
    cdef public dict _ready         # (type << 32 | owner) -> {allocation id: None}, ALLOCATED ones
    cdef public dict _origins       # allocation id -> (prediction id, sizer key)
    cdef public dict _amount_seconds_before_adjust  # allocation id -> (amount x s, since ns)
    cdef public dict _owner_keys    # target application -> owner key
    cdef public list _owners        # owner key -> target application (0: None)
    cdef public dict strategies
    cdef public object events
    cdef public object log
    cdef public object quotas
    cdef public object _lock
    cdef public object _resize_lock
    cdef public bint _quotas_active
    cdef public frozenset _headroom_types
    cdef public object _default_duration
    cdef public bint _closed
    cdef public list _waiting       # queued requests waiting for resources (preallocator)
    cdef list _strategy_of          # indexed by type number
    cdef dict _listeners            # the EventEmitter's own map, read without a call
    # the tally
    cdef long long _total_requests, _successful, _failed, _skipped_low_confidence
    cdef long long _expired, _claimed, _released, _finished, _hits
    cdef double _allocation_seconds, _amount_seconds, _unused_amount_seconds
    cdef long long _by_type[_TYPES]

    def _core_setup(self, AllocationTable table not None, ExpiryTicker ticker not None):
        self._table = table
        self._ticker = ticker
        self._handles = {}
        self._ready = {}
        self._origins = {}
        self._amount_seconds_before_adjust = {}
        self._owner_keys = {}
        self._owners = [None]
        self._strategy_of = [self.strategies.get(t) for t in _TYPE_OF] + [None]
        self._waiting = []
        # EventEmitter keeps this dict for its life and swaps the tuples in it, so an
        # empty-or-missing entry here means nobody listens (see events.py)
        self._listeners = self.events._listeners

    cdef inline bint _listened(self, str event):
        return bool(self._listeners.get(event))

    # ------------------------------------------------------------------ tally
    def _count(self, str what, long long n=1):
        """Adds to one of the counters the Python layer owns the events of."""
        if what == "failed":
            self._failed += n
        elif what == "claimed":
            self._claimed += n
        elif what == "skipped_low_confidence":
            self._skipped_low_confidence += n
        else:
            raise ValueError(what)

    def _tally(self):
        """The counters, read in one go (the GIL makes it a consistent snapshot)."""
        return {
            "total_requests": self._total_requests, "successful": self._successful,
            "failed": self._failed, "skipped_low_confidence": self._skipped_low_confidence,
            "expired": self._expired, "claimed": self._claimed, "released": self._released,
            "finished": self._finished, "hits": self._hits,
            "allocation_seconds": self._allocation_seconds, "amount_seconds": self._amount_seconds,
            "unused_amount_seconds": self._unused_amount_seconds,
            "by_type": {_TYPE_OF[i]: self._by_type[i] for i in range(len(_TYPE_OF)) if self._by_type[i]},
        }

    # ------------------------------------------------------------------ owners
    cpdef uint64_t _owner_key(self, application) except? 0xFFFFFFFFFFFFFFFF:
        """A small int for a target application (0 for None), stored in the record."""
        if application is None:
            return 0
        key = self._owner_keys.get(application)
        if key is None:
            # new application: the GIL makes this check-and-insert atomic
            key = len(self._owners)
            self._owners.append(application)
            self._owner_keys[application] = key
        return key

    # ------------------------------------------------------------------ public hot paths
    def request_preallocation(self, request):
        """Allocates now, on the calling thread. Returns the allocation: ALLOCATED, or
        FAILED with failure_reason (no strategy, over quota, below headroom, refused by
        the machine). Bad input raises ValueError and changes nothing."""
        if self._closed:
            self._check_open()
        if not _already_valid(request):
            request.validate()
        return self._allocate(self._admit(request), request, False)

    def release_allocation(self, uint64_t allocation_id, feedback=None):
        """Gives an allocation back (or withdraws a request still queued). False when
        the id is unknown, already finished, or another release or the expiry won."""
        cdef pa_status_t prev = <pa_status_t>PA_STATUS_COUNT
        cdef int rc
        if feedback is not None:
            feedback.validate()
        rc = pa_table_transition(self._table._table, allocation_id, _BIT_RELEASABLE,
                                 PA_STATUS_RELEASING, &prev)
        if rc == 0:
            return self._finish(allocation_id, True, feedback)
        if rc == -EAGAIN and prev == PA_STATUS_PENDING:
            return self._cancel_pending(allocation_id)
        return False

    # ------------------------------------------------------------------ the flow
    cpdef uint64_t _admit(self, request) except 0:
        """The request's PENDING record."""
        cdef pa_record_init_t init
        cdef pa_id_t rid = 0
        cdef int rc
        memset(&init, 0, sizeof(init))
        init.status = PA_STATUS_PENDING
        init.resource_type = <uint32_t>request.resource_type
        init.requested = request.predicted_need
        init.request_id = request.request_id
        init.owner = self._owner_key(request.metadata.target_application)
        rc = pa_table_insert(self._table._table, &init, &rid)
        if rc == -EINVAL:
            raise ValueError(f"bad request amount {init.requested!r}")
        if rc == -ENOSPC:
            raise OSError(ENOSPC, f"pa_table_insert: the allocation table is full "
                                  f"({pa_table_capacity(self._table._table)} live records); "
                                  "raise PreallocatorConfig.capacity")
        _check(rc, "pa_table_insert")
        self._total_requests += 1
        return rid

    cpdef object _allocate(self, uint64_t record_id, request, bint may_wait):
        """PENDING -> ALLOCATED through the strategy. Returns the allocation snapshot
        (ALLOCATED or FAILED), None when the request was withdrawn or dropped meanwhile,
        or WAIT when it must wait for resources and may_wait."""
        cdef uint32_t rtype = <uint32_t>request.resource_type
        cdef double amount = request.predicted_need
        cdef double granted
        cdef pa_record_t rec
        cdef pa_timer_id_t timer
        cdef uint64_t owner
        cdef bint quotas = self._quotas_active
        cdef int rc
        strategy = self._strategy_of[rtype] if rtype < _TYPES else None
        if strategy is None:
            return self._fail(record_id, f"no strategy for {_TYPE_OF[rtype].name}")
        metadata = request.metadata
        application = metadata.target_application
        if quotas:
            reason = self._charge(_TYPE_OF[rtype], application, amount)
            if reason is not None:
                return self._fail(record_id, reason)
        if self._headroom_types and _TYPE_OF[rtype] in self._headroom_types \
                and not self._within_headroom(_TYPE_OF[rtype], amount):
            if quotas:
                self.quotas.refund(_TYPE_OF[rtype], application, amount)
            if may_wait:
                return WAIT
            return self._fail(record_id, self._headroom_reason(_TYPE_OF[rtype], amount))
        try:
            grant = strategy.allocate(request, amount, None)
        except Exception as exc:  # a strategy's bug must not kill the worker
            if quotas:
                self.quotas.refund(_TYPE_OF[rtype], application, amount)
            return self._allocation_refused(record_id, strategy, exc, may_wait)
        if type(grant) is Grant:
            granted = (<Grant>grant).amount
            handle = (<Grant>grant).handle
        else:  # any object with these two attributes will do
            granted = grant.amount
            handle = grant.handle
        if quotas and granted != amount:
            self._rebook(_TYPE_OF[rtype], application, amount, granted)

        # the transition and its bookkeeping, with no Python code in between
        owner = self._owner_key(application)
        pattern = metadata.triggering_pattern_id
        prediction_id = request.associated_prediction_id
        if pa_table_set_allocated(self._table._table, record_id, granted) != 0 or \
                pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_ALLOCATED,
                                    NULL) != 0:
            # withdrawn or dropped at its deadline while the strategy worked
            self._give_back(strategy, handle)
            if quotas:
                self.quotas.refund(_TYPE_OF[rtype], application, granted)
            return None
        if handle is not None:
            self._handles[record_id] = handle
        key = _ready_key(rtype, owner)
        ready = self._ready.get(key)
        if ready is None:
            ready = self._ready[key] = {}
        ready[record_id] = None
        if prediction_id is not None or pattern is not None:
            self._origins[record_id] = (prediction_id, (pattern, _TYPE_OF[rtype]) if pattern is not None else None)
        pa_table_get(self._table._table, record_id, &rec)
        self._successful += 1
        self._allocation_seconds += (rec.allocated_ns - rec.created_ns) * _NS
        self._by_type[rtype] += 1

        if rec.timer:  # the deadline timer of a queued request: its job is done
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        duration = request.duration
        if duration is None:
            duration = self._default_duration
        if duration is not None:
            rc = pa_ticker_schedule(self._ticker._ticker, record_id,
                                    rec.allocated_ns + <uint64_t>(<double>duration * 1e9), &timer)
            if rc == 0:
                rec.expires_ns = rec.allocated_ns + <uint64_t>(<double>duration * 1e9)
            elif rc != -ENOENT:  # ENOENT: released already
                _check(rc, "pa_ticker_schedule")
        snapshot = self._snapshot_of(&rec, handle, None, None)
        if self._listened("allocated"):
            self.events.emit("allocated", snapshot)
        return snapshot

    cdef object _allocation_refused(self, uint64_t record_id, strategy, exc, bint may_wait):
        from .strategies import AllocationError, InsufficientResources

        if isinstance(exc, InsufficientResources):
            if may_wait:
                return WAIT
        elif not isinstance(exc, AllocationError):
            self.log.error("strategy %s raised", type(strategy).__name__, exc_info=exc)
        return self._fail(record_id, str(exc) or type(exc).__name__)

    cpdef object _fail(self, uint64_t record_id, str reason):
        """PENDING -> FAILED with a reason; the snapshot, or None if it was not PENDING."""
        cdef pa_record_t rec
        if pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_FAILED, NULL) != 0:
            return None
        pa_table_get(self._table._table, record_id, &rec)
        if rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        pa_table_remove(self._table._table, record_id)
        self._failed += 1
        self._forget_pending(record_id)
        snapshot = self._snapshot_of(&rec, None, reason, None)
        self._note_failure(snapshot, reason)
        return snapshot

    cpdef bint _cancel_pending(self, uint64_t record_id) except -1:
        """Withdraws a request still PENDING (queued or waiting)."""
        cdef pa_record_t rec
        if pa_table_transition(self._table._table, record_id, _BIT_PENDING, PA_STATUS_RELEASED, NULL) != 0:
            return False
        pa_table_get(self._table._table, record_id, &rec)
        if rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        pa_table_remove(self._table._table, record_id)
        self._forget_pending(record_id)
        self._note_cancelled(_TYPE_OF[rec.resource_type])
        return True

    cpdef bint _finish(self, uint64_t record_id, bint released, feedback) except -1:
        """The end of an allocation, run by whoever won the transition out of it
        (RELEASING for a release, EXPIRED for the ticker): give the resource back, book
        hit and waste, feed the sizer and the predictor, emit, remove the record."""
        cdef pa_record_t rec
        cdef pa_table_t *table = self._table._table
        cdef uint64_t now
        cdef double held, unused, used, before = 0.0
        cdef uint64_t since
        cdef bint hit
        if pa_table_get(table, record_id, &rec) != 0:
            return False
        rtype_obj = _TYPE_OF[rec.resource_type]
        if rec.timer and released:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)
        handle = self._handles.get(record_id)
        if handle is not None:
            # _give_back waits for an adjust in flight on this handle, so what is read
            # after it (amounts, the adjust history) is final.
            if not self._give_back(self.strategies[rtype_obj], handle) and released:
                # the spec's revert: a release that failed leaves the allocation as it was
                pa_table_transition(table, record_id, _BIT_RELEASING,
                                    PA_STATUS_ACTIVE if rec.active_ns else PA_STATUS_ALLOCATED, NULL)
                self._note_release_failed(rtype_obj)
                return False
            pa_table_get(table, record_id, &rec)
        now = pa_clock_now_ns()
        # the bookkeeping, with no Python code in between
        if handle is not None:
            del self._handles[record_id]
        ready = self._ready.get(_ready_key(rec.resource_type, rec.owner))
        if ready is not None:
            ready.pop(record_id, None)
        origin = self._origins.pop(record_id, None) if self._origins else None
        adjusted = self._amount_seconds_before_adjust.pop(record_id, None) \
            if self._amount_seconds_before_adjust else None

        # usage: the whole amount is unused while it waited unclaimed; after a claim,
        # amount minus the reported use (use not reported after a claim counts as all used)
        since = rec.allocated_ns
        if adjusted is not None:
            before, since = adjusted
        held = before + rec.allocated * (now - since if now > since else 0) * _NS
        hit = rec.active_ns != 0 or (feedback is not None and feedback.used_successfully)
        if not hit:
            unused = held
        else:
            used = rec.allocated
            if feedback is not None and feedback.actual_amount_used is not None:
                used = min(<double>feedback.actual_amount_used, rec.allocated)
            start = rec.active_ns if rec.active_ns else rec.allocated_ns
            unused = rec.allocated * (start - rec.allocated_ns) * _NS \
                + (rec.allocated - used) * (now - start if now > start else 0) * _NS
            if unused > held:
                unused = held
        self._finished += 1
        self._hits += hit
        self._amount_seconds += held
        self._unused_amount_seconds += unused
        if released:
            self._released += 1
            pa_table_transition(table, record_id, _BIT_RELEASING, PA_STATUS_RELEASED, NULL)
            rec.status = PA_STATUS_RELEASED
        else:
            self._expired += 1
        pa_table_remove(table, record_id)

        if self._quotas_active:
            self.quotas.refund(rtype_obj, self._owners[rec.owner], rec.allocated)
        if origin is not None and feedback is not None:
            self._learn(origin, feedback)
        name = "released" if released else "expired"
        if self._listened(name):
            snapshot = self._snapshot_of(&rec, handle, None, feedback)
            snapshot.actual_usage = feedback.actual_amount_used if feedback is not None else None
            self.events.emit(name, snapshot)
        if self._waiting:
            self._availability_changed()
        return True

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
                    pa_table_remove(self._table._table, ids[i])
                    self._failed += 1
                    self._forget_pending(ids[i])
                    reason = "deadline passed before the resource was available"
                    self._note_failure(self._snapshot_of(&rec, None, reason, None), reason)
                else:
                    self._finish(ids[i], False, None)
            if n < 256:
                break
        return done

    def _take_for_claim(self, uint64_t allocation_id):
        """After the caller won ALLOCATED -> ACTIVE: stops the expiry, leaves the ready
        index, counts the claim; returns (resource type, handle)."""
        cdef pa_record_t rec
        if pa_table_get(self._table._table, allocation_id, &rec) != 0:
            raise KeyError(allocation_id)
        if rec.timer:
            pa_ticker_cancel(self._ticker._ticker, rec.timer)  # the consumer owns it: no expiry
        ready = self._ready.get(_ready_key(rec.resource_type, rec.owner))
        if ready is not None:
            ready.pop(allocation_id, None)
        self._claimed += 1
        return _TYPE_OF[rec.resource_type], self._handles.get(allocation_id)

    def _claim_ready(self, uint32_t rtype, uint64_t owner, double amount):
        """Claims (ALLOCATED -> ACTIVE) the first ready allocation of rtype for owner holding
        at least amount; its id, or 0 when none is ready."""
        cdef pa_record_t rec
        ready = self._ready.get(_ready_key(rtype, owner))
        if not ready:
            return 0
        for rid in list(ready):
            if pa_table_get(self._table._table, rid, &rec) != 0 or rec.status != PA_STATUS_ALLOCATED \
                    or rec.allocated < amount:
                continue
            if pa_table_transition(self._table._table, rid, _BIT_ALLOCATED, PA_STATUS_ACTIVE, NULL) == 0:
                return rid
        return 0

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

    cdef object _snapshot_of(self, const pa_record_t *rec, handle, failure_reason, feedback):
        rtype = _TYPE_OF[rec.resource_type]
        if handle is None and self._handles:
            handle = self._handles.get(rec.id)
        details = {}
        if handle is not None:
            try:
                details = self.strategies[rtype].describe(handle)
            except Exception:  # a released handle may not describe itself
                pass
        return _new_snapshot(
            rec.id, rec.request_id, rtype, rec.requested, rec.allocated, _STATUS_OF[rec.status],
            rec.allocated_ns * _NS if rec.allocated_ns else None,
            rec.expires_ns * _NS if rec.expires_ns and rec.allocated_ns else None,
            None, feedback, failure_reason, details)

    # ------------------------------------------------------------------ policy hooks (Python)
    def _check_open(self):
        pass

    def _give_back(self, strategy, handle):
        return True

    def _charge(self, rtype, application, double amount):
        return None

    def _rebook(self, rtype, application, double booked, double actual):
        pass

    def _within_headroom(self, rtype, double amount):
        return True

    def _headroom_reason(self, rtype, double amount):
        return f"insufficient {rtype.name}"

    def _learn(self, origin, feedback):
        pass

    def _forget_pending(self, record_id):
        pass

    def _note_failure(self, snapshot, reason):
        pass

    def _note_cancelled(self, rtype):
        pass

    def _note_release_failed(self, rtype):
        pass

    def _availability_changed(self):
        pass
