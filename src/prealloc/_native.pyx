# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""The thin binding over the prealloc C core.

It owns the C objects, releases the GIL around anything that blocks or loops, maps
``-errno`` to the matching ``OSError`` subclass through one ``_check`` with a message that
names the C call, and offers batch calls over numpy arrays. Friendly messages and policy
(valid CPUs, sizes against the machine) live in ``prealloc.core``.
"""
import os

import numpy as np

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EBUSY, EEXIST, EINVAL, ENOENT, ENOSPC
from libc.math cimport isnan, NAN
from libc.stdint cimport int8_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset
from posix.types cimport pid_t

cdef extern from "errno.h":
    enum: ENOTSUP
    enum: EALREADY

cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef class CoreReservations  # forward: CoreReservation reaches into its registry


# ---------------------------------------------------------------------------------------
# errors

cdef int _check(int rc, str call) except -1:
    """Turns a -errno from the core into the OSError subclass Python picks for that errno
    (FileNotFoundError, ProcessLookupError, PermissionError, ...), naming the call."""
    if rc >= 0:
        return rc
    raise OSError(-rc, f"{call}: {os.strerror(-rc)}")


# ---------------------------------------------------------------------------------------
# batch arguments: any array-like of numbers, converted only when it is not already a
# contiguous array of the right dtype

cdef object _unsigned(x, dtype, str what):
    """x as a contiguous array of dtype, refusing what a plain cast would change silently
    (a negative or too large integer wraps, a float truncates, a bool is not a number)."""
    if isinstance(x, np.ndarray) and x.dtype == dtype:
        return np.ascontiguousarray(x)  # the hot path: no check, no copy when contiguous
    top = int(np.iinfo(dtype).max)
    out_of_range = f"{what} must be integers in 0..{top}"
    if isinstance(x, (list, tuple)) and all(type(v) is int for v in x):
        # Python ints: checked here (numpy would make a float64 array of [1, 2**64 - 1]
        # and, before 2.0, wrap a negative into uint64)
        if not all(0 <= v <= top for v in x):
            raise ValueError(out_of_range)
        return np.array(x, dtype=dtype)
    try:
        arr = np.asarray(x)
    except OverflowError:
        raise ValueError(out_of_range) from None
    kind = arr.dtype.kind
    if arr.size == 0:
        return np.ascontiguousarray(arr, dtype=dtype)
    if kind == "O":  # Python ints beyond int64 among other objects
        values = arr.ravel().tolist()
        if arr.ndim == 1 and all(type(v) is int for v in values):
            return _unsigned(values, dtype, what)
        raise TypeError(f"{what} must be integers, not {sorted({type(v).__name__ for v in values})}")
    if kind not in "ui":
        raise TypeError(f"{what} must be integers, not {arr.dtype}")
    if (kind == "i" and arr.min() < 0) or arr.max() > top:
        raise ValueError(out_of_range)
    return np.ascontiguousarray(arr, dtype=dtype)


cdef inline object _u64(x, str what="values"):
    return _unsigned(x, np.uint64, what)


cdef inline object _u32(x, str what="values"):
    return _unsigned(x, np.uint32, what)


cdef inline object _f64(x):
    return np.ascontiguousarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# statuses

PENDING = PA_STATUS_PENDING
ALLOCATED = PA_STATUS_ALLOCATED
ACTIVE = PA_STATUS_ACTIVE
RELEASING = PA_STATUS_RELEASING
RELEASED = PA_STATUS_RELEASED
FAILED = PA_STATUS_FAILED
EXPIRED = PA_STATUS_EXPIRED
STATUS_COUNT = PA_STATUS_COUNT
FINAL_MASK = PA_STATUS_FINAL_MASK
LIVE_MASK = PA_STATUS_LIVE_MASK


def status_name(unsigned status):
    return pa_status_name(status).decode()


def transition_legal(unsigned frm, unsigned to):
    return pa_status_transition_legal(frm, to)


def monotonic_ns():
    """CLOCK_MONOTONIC in nanoseconds: the clock of every deadline in the core."""
    return pa_clock_now_ns()


cdef uint32_t _status_mask(statuses) except? 0:
    """A single status (an int) or an iterable of statuses, as a PA_STATUS_BIT() mask."""
    cdef uint32_t mask = 0
    if isinstance(statuses, int):
        statuses = (statuses,)
    for s in statuses:
        s = int(s)
        if not 0 <= s < PA_STATUS_COUNT:
            raise ValueError(f"{s} is not a status (0..{PA_STATUS_COUNT - 1})")
        mask |= 1u << s
    if mask == 0:
        raise ValueError("empty set of statuses")
    return mask


cdef inline uint32_t _checked_mask(uint32_t mask) except? 0:
    if mask == 0 or mask >= (1u << PA_STATUS_COUNT):
        raise ValueError(f"status mask {mask:#x} names no status or an unknown one")
    return mask


def status_mask(statuses):
    """The bit mask of a status or an iterable of statuses (what *_mask arguments take)."""
    return _status_mask(statuses)


cdef inline uint64_t _seconds_to_ns(double seconds) except? 0:
    if isnan(seconds) or seconds < 0:
        raise ValueError(f"time {seconds!r} must be a non-negative number of seconds")
    if seconds >= 1.8e10:
        raise ValueError(f"time {seconds!r} s is beyond the clock's range")
    return <uint64_t>(seconds * 1e9 + 0.5)


# ---------------------------------------------------------------------------------------
# allocation table

@cython.final
@cython.freelist(16)
cdef class Record:
    """A consistent snapshot of one allocation-table record (times in monotonic ns;
    allocated_ns / active_ns are 0 until the record first became ALLOCATED / ACTIVE)."""

    cdef readonly uint64_t id
    cdef readonly uint32_t status
    cdef readonly uint32_t resource_type
    cdef readonly double requested
    cdef readonly double allocated
    cdef readonly uint64_t created_ns
    cdef readonly uint64_t updated_ns
    cdef readonly uint64_t allocated_ns
    cdef readonly uint64_t active_ns
    cdef readonly uint64_t expires_ns
    cdef readonly uint64_t timer
    cdef readonly uint64_t request_id
    cdef readonly uint64_t owner
    cdef readonly uint64_t user_data

    def __repr__(self):
        return (f"Record(id={self.id}, status={status_name(self.status)}, "
                f"resource_type={self.resource_type}, requested={self.requested}, "
                f"allocated={self.allocated}, request_id={self.request_id}, owner={self.owner})")


cdef Record _record_from(const pa_record_t *r):
    cdef Record rec = Record.__new__(Record)
    rec.id = r.id
    rec.status = r.status
    rec.resource_type = r.resource_type
    rec.requested = r.requested
    rec.allocated = r.allocated
    rec.created_ns = r.created_ns
    rec.updated_ns = r.updated_ns
    rec.allocated_ns = r.allocated_ns
    rec.active_ns = r.active_ns
    rec.expires_ns = r.expires_ns
    rec.timer = r.timer
    rec.request_id = r.request_id
    rec.owner = r.owner
    rec.user_data = r.user_data
    return rec


@cython.final
cdef class AllocationTable:
    """The native allocation table: generational 64-bit ids, wait-free lookup, and status
    changes only by compare-and-swap along the legal edges (so a release racing an expiry
    has exactly one winner)."""

    cdef pa_table_t *_table

    def __cinit__(self, capacity=1 << 20):
        if not 1 <= capacity <= PA_TABLE_MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{PA_TABLE_MAX_CAPACITY}, not {capacity}")
        _check(pa_table_create(<uint32_t>capacity, &self._table), "pa_table_create")

    def __dealloc__(self):
        if self._table is not NULL:
            pa_table_destroy(self._table)
            self._table = NULL

    cdef pa_table_t *ptr(self):
        return self._table

    @property
    def capacity(self):
        return pa_table_capacity(self._table)

    def __len__(self):
        return pa_table_live(self._table)

    def __contains__(self, record_id):
        return pa_table_status(self._table, <pa_id_t>record_id) >= 0

    def insert(self, uint32_t resource_type, double requested, *, double allocated=0.0,
               uint32_t status=PA_STATUS_PENDING, uint64_t request_id=0, uint64_t owner=0,
               uint64_t user_data=0):
        """Inserts a record (status PENDING or ALLOCATED) and returns its id."""
        cdef pa_record_init_t init
        cdef pa_id_t rid = 0
        init.status = status
        init.resource_type = resource_type
        init.requested = requested
        init.allocated = allocated
        init.expires_ns = 0
        init.request_id = request_id
        init.owner = owner
        init.user_data = user_data
        cdef int rc = pa_table_insert(self._table, &init, &rid)
        if rc == -EINVAL:
            raise ValueError(
                f"bad record: status {status} must be PENDING or ALLOCATED and amounts "
                f"({requested!r}, {allocated!r}) finite and >= 0")
        _check(rc, "pa_table_insert")
        return rid

    def insert_many(self, resource_types_in, requested_in, /, *, uint32_t status=PA_STATUS_PENDING,
                    request_ids=None, owners=None):
        """Inserts one record per element; returns their ids (uint64 array). All or
        nothing: on any error the records this call inserted are removed again."""
        cdef const uint32_t[::1] resource_types = _u32(resource_types_in)
        cdef const double[::1] requested = _f64(requested_in)
        cdef const uint64_t[::1] request_id_view = None if request_ids is None else _u64(request_ids)
        cdef const uint64_t[::1] owner_view = None if owners is None else _u64(owners)
        cdef Py_ssize_t n = resource_types.shape[0], i, done = 0
        if requested.shape[0] != n or (request_id_view is not None and request_id_view.shape[0] != n) \
                or (owner_view is not None and owner_view.shape[0] != n):
            raise ValueError("all arrays must have the same length")
        out = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] ids = out
        cdef pa_record_init_t init
        cdef int rc = 0
        cdef uint64_t now
        memset(&init, 0, sizeof(init))
        init.status = status
        with nogil:
            now = pa_clock_now_ns()  # one reading stamps the whole batch
            for i in range(n):
                init.resource_type = resource_types[i]
                init.requested = requested[i]
                init.request_id = request_id_view[i] if request_id_view is not None else 0
                init.owner = owner_view[i] if owner_view is not None else 0
                rc = pa_table_insert_at(self._table, &init, now, &ids[i])
                if rc != 0:
                    break
                done += 1
            if rc != 0:
                for i in range(done):
                    pa_table_transition(self._table, ids[i], PA_STATUS_LIVE_MASK, PA_STATUS_FAILED, NULL)
                    pa_table_remove(self._table, ids[i])
        if rc == -EINVAL:
            raise ValueError(f"bad record at index {done}: status must be PENDING or ALLOCATED "
                             "and amounts finite and >= 0")
        _check(rc, "pa_table_insert")
        return out

    def get(self, pa_id_t record_id):
        """A Record snapshot; KeyError for an unknown or stale id."""
        cdef pa_record_t r
        if pa_table_get(self._table, record_id, &r) != 0:
            raise KeyError(record_id)
        return _record_from(&r)

    def status(self, pa_id_t record_id):
        cdef int s = pa_table_status(self._table, record_id)
        if s < 0:
            raise KeyError(record_id)
        return s

    def status_many(self, ids_in, /):
        """Statuses as an int8 array; -1 where the id is unknown or stale."""
        cdef const uint64_t[::1] ids = _u64(ids_in)
        cdef Py_ssize_t n = ids.shape[0], i
        out = np.empty(n, dtype=np.int8)
        cdef int8_t[::1] st = out
        cdef int s
        with nogil:
            for i in range(n):
                s = pa_table_status(self._table, ids[i])
                st[i] = <int8_t>(s if s >= 0 else -1)
        return out

    def transition(self, pa_id_t record_id, from_statuses, uint32_t to):
        """CAS the record from any of from_statuses (a status or an iterable of them) to
        `to`. True when this call won; False when the record's status was not one of them
        (another transition got there first). KeyError for a stale id, ValueError for an
        illegal edge."""
        return self._transition(record_id, _status_mask(from_statuses), to)

    def transition_mask(self, pa_id_t record_id, uint32_t from_mask, uint32_t to):
        """transition() with the from-statuses as a ready mask (status_mask()): the fast path."""
        return self._transition(record_id, _checked_mask(from_mask), to)

    cdef object _transition(self, pa_id_t record_id, uint32_t mask, uint32_t to):
        cdef pa_status_t prev = <pa_status_t>PA_STATUS_COUNT
        cdef int rc = pa_table_transition(self._table, record_id, mask, <pa_status_t>to, &prev)
        if rc == 0:
            return True
        if rc == -EAGAIN:
            return False
        if rc == -ENOENT:
            raise KeyError(record_id)
        if rc == -EINVAL:
            raise ValueError(f"illegal transition {status_name(prev) if prev < PA_STATUS_COUNT else '?'}"
                             f" -> {status_name(to) if to < PA_STATUS_COUNT else to}")
        _check(rc, "pa_table_transition")

    def transition_many(self, ids_in, from_statuses, uint32_t to, /):
        """Batch transition; returns a bool array: True where this call won. Stale ids and
        lost races give False; an illegal edge gives False too (nothing changes)."""
        cdef const uint64_t[::1] ids = _u64(ids_in)
        cdef uint32_t mask = _status_mask(from_statuses)
        if to >= PA_STATUS_COUNT:
            raise ValueError(f"{to} is not a status")
        cdef Py_ssize_t n = ids.shape[0], i
        out = np.zeros(n, dtype=np.bool_)
        cdef uint8_t[::1] won = out.view(np.uint8)
        cdef uint64_t now
        with nogil:
            now = pa_clock_now_ns()  # one reading stamps the whole batch
            for i in range(n):
                won[i] = pa_table_transition_at(self._table, ids[i], mask, <pa_status_t>to, now, NULL) == 0
        return out

    def set_allocated(self, pa_id_t record_id, double amount):
        cdef int rc = pa_table_set_allocated(self._table, record_id, amount)
        if rc == -ENOENT:
            raise KeyError(record_id)
        if rc == -EINVAL:
            raise ValueError(f"amount {amount!r} must be finite and >= 0")
        _check(rc, "pa_table_set_allocated")

    def remove(self, pa_id_t record_id):
        """Removes a record in a final state; its id becomes stale."""
        cdef int rc = pa_table_remove(self._table, record_id)
        if rc == -ENOENT:
            raise KeyError(record_id)
        if rc == -EBUSY:
            raise ValueError(f"record {record_id} is {status_name(pa_table_status(self._table, record_id))},"
                             " not in a final state (RELEASED, FAILED, EXPIRED)")
        _check(rc, "pa_table_remove")

    def remove_many(self, ids_in, /):
        """Removes every record of ids that is in a final state; returns how many."""
        cdef const uint64_t[::1] ids = _u64(ids_in)
        cdef Py_ssize_t n = ids.shape[0], i, removed = 0
        with nogil:
            for i in range(n):
                if pa_table_remove(self._table, ids[i]) == 0:
                    removed += 1
        return removed

    def collect(self, statuses=None, *, mask=None):
        """Ids of the records whose status is one of statuses (a status or an iterable),
        or in mask (LIVE_MASK, FINAL_MASK, status_mask(...)); all records when neither is
        given. A scan, not a snapshot."""
        cdef uint32_t m
        if statuses is not None and mask is not None:
            raise TypeError("give statuses or mask, not both")
        if statuses is not None:
            m = _status_mask(statuses)
        elif mask is not None:
            m = _checked_mask(mask)
        else:
            m = PA_STATUS_LIVE_MASK | PA_STATUS_FINAL_MASK
        cdef size_t cap = pa_table_live(self._table) + 64, count = 0
        cdef uint64_t[::1] ids
        while True:
            out = np.empty(cap, dtype=np.uint64)
            ids = out
            with nogil:
                pa_table_collect(self._table, m, &ids[0], cap, &count)
            if count < cap:
                return out[:count].copy()
            cap *= 2

    def counts(self):
        """A list: counts()[status] = records in that status."""
        cdef size_t counts[PA_STATUS_COUNT]
        pa_table_count_by_status(self._table, counts)
        return [counts[i] for i in range(PA_STATUS_COUNT)]


# ---------------------------------------------------------------------------------------
# timer wheel

cdef struct _FireBuffer:
    uint64_t *values
    uint64_t *deadlines
    size_t count
    size_t capacity
    bint failed


cdef void _collect_fired(void *ctx, pa_timer_id_t timer, uint64_t value, uint64_t deadline_ns) noexcept nogil:
    cdef _FireBuffer *buf = <_FireBuffer *>ctx
    cdef size_t cap
    cdef uint64_t *v
    cdef uint64_t *d
    if buf.count == buf.capacity:
        cap = buf.capacity * 2 if buf.capacity else 64
        v = <uint64_t *>realloc(buf.values, cap * sizeof(uint64_t))
        if v is NULL:
            buf.failed = True
            return
        buf.values = v
        d = <uint64_t *>realloc(buf.deadlines, cap * sizeof(uint64_t))
        if d is NULL:
            buf.failed = True
            return
        buf.deadlines = d
        buf.capacity = cap
    buf.values[buf.count] = value
    buf.deadlines[buf.count] = deadline_ns
    buf.count += 1


@cython.final
cdef class TimerWheel:
    """The hierarchical timer wheel, driven by explicit advance() calls (deterministic; the
    ExpiryTicker runs one on a native thread). Times are monotonic nanoseconds in the *_ns
    methods and monotonic seconds elsewhere. A mutex makes it safe across Python threads,
    including the batch calls that run without the GIL."""

    cdef pa_wheel_t *_wheel
    cdef pthread_mutex_t _lock

    def __cinit__(self, *, tick_ns=1_000_000, start_ns=None, capacity=1 << 20):
        if tick_ns <= 0:
            raise ValueError(f"tick_ns must be > 0, not {tick_ns}")
        if not 1 <= capacity <= (1 << 31):
            raise ValueError(f"capacity must be in 1..2**31, not {capacity}")
        cdef uint64_t start = pa_clock_now_ns() if start_ns is None else <uint64_t>start_ns
        pthread_mutex_init(&self._lock, NULL)
        _check(pa_wheel_create(<uint64_t>tick_ns, start, <uint32_t>capacity, &self._wheel),
               "pa_wheel_create")

    def __dealloc__(self):
        if self._wheel is not NULL:
            pa_wheel_destroy(self._wheel)
            self._wheel = NULL
            pthread_mutex_destroy(&self._lock)

    @property
    def tick_ns(self):
        return pa_wheel_tick_ns(self._wheel)

    @property
    def now_ns(self):
        cdef uint64_t t
        with nogil:
            pthread_mutex_lock(&self._lock)
            t = pa_wheel_now(self._wheel)
            pthread_mutex_unlock(&self._lock)
        return t

    def __len__(self):
        cdef size_t n
        with nogil:
            pthread_mutex_lock(&self._lock)
            n = pa_wheel_pending(self._wheel)
            pthread_mutex_unlock(&self._lock)
        return n

    def schedule_ns(self, uint64_t deadline_ns, uint64_t value):
        """Schedules value to fire at deadline_ns; returns the timer id."""
        cdef pa_timer_id_t tid = 0
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_wheel_schedule(self._wheel, deadline_ns, value, &tid)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_wheel_schedule")
        return tid

    def schedule(self, double deadline, uint64_t value):
        """Schedules value at deadline (time.monotonic() seconds)."""
        return self.schedule_ns(_seconds_to_ns(deadline), value)

    def schedule_many_ns(self, deadlines_ns_in, values_in, /):
        cdef const uint64_t[::1] deadlines_ns = _u64(deadlines_ns_in)
        cdef const uint64_t[::1] values = _u64(values_in)
        cdef Py_ssize_t n = deadlines_ns.shape[0], i, done = 0
        if values.shape[0] != n:
            raise ValueError("deadlines and values must have the same length")
        out = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] ids = out
        cdef int rc = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(n):
                rc = pa_wheel_schedule(self._wheel, deadlines_ns[i], values[i], &ids[i])
                if rc != 0:
                    break
                done += 1
            if rc != 0:  # all or nothing
                for i in range(done):
                    pa_wheel_cancel(self._wheel, ids[i])
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_wheel_schedule")
        return out

    def cancel(self, pa_timer_id_t timer_id):
        """True when the timer was pending and is now cancelled."""
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_wheel_cancel(self._wheel, timer_id)
            pthread_mutex_unlock(&self._lock)
        return rc == 0

    def cancel_many(self, timer_ids_in, /):
        """Cancels each; returns how many were pending."""
        cdef const uint64_t[::1] timer_ids = _u64(timer_ids_in)
        cdef Py_ssize_t n = timer_ids.shape[0], i, cancelled = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(n):
                if pa_wheel_cancel(self._wheel, timer_ids[i]) == 0:
                    cancelled += 1
            pthread_mutex_unlock(&self._lock)
        return cancelled

    def advance_ns(self, uint64_t now_ns):
        """Advances to now_ns; returns (values, deadlines_ns) of the timers that fired, as
        uint64 arrays in firing order."""
        cdef _FireBuffer buf
        cdef size_t i
        cdef uint64_t[::1] v, d
        memset(&buf, 0, sizeof(buf))
        with nogil:
            pthread_mutex_lock(&self._lock)
            pa_wheel_advance(self._wheel, now_ns, _collect_fired, &buf)
            pthread_mutex_unlock(&self._lock)
        try:
            if buf.failed:
                raise MemoryError("TimerWheel.advance: out of memory collecting fired timers")
            values = np.empty(buf.count, dtype=np.uint64)
            deadlines = np.empty(buf.count, dtype=np.uint64)
            v = values
            d = deadlines
            for i in range(buf.count):
                v[i] = buf.values[i]
                d[i] = buf.deadlines[i]
            return values, deadlines
        finally:
            free(buf.values)
            free(buf.deadlines)

    def advance(self, double now):
        """Advances to now (monotonic seconds); returns the values that fired."""
        return self.advance_ns(_seconds_to_ns(now))[0]

    def next_wakeup_ns(self):
        """The earliest instant an advance could fire something, or None when empty."""
        cdef uint64_t wakeup = 0
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_wheel_next_wakeup(self._wheel, &wakeup)
            pthread_mutex_unlock(&self._lock)
        return None if rc != 0 else wakeup


# ---------------------------------------------------------------------------------------
# expiry ticker

@cython.final
cdef class ExpiryTicker:
    """A timer wheel advanced by a native thread, bound to an AllocationTable. When a
    record's expiry comes, the thread moves it to EXPIRED by CAS (from the statuses in
    expire_from) without the GIL, queues its id and signals an eventfd: wait() blocks on
    it with the GIL released, and fileno() plugs into selectors or asyncio."""

    cdef pa_ticker_t *_ticker
    cdef readonly AllocationTable table

    def __cinit__(self, AllocationTable table not None, *, tick_ns=1_000_000, capacity=None,
                  expire_from=None, bint start=True):
        cdef pa_ticker_options_t options
        memset(&options, 0, sizeof(options))
        if tick_ns <= 0:
            raise ValueError(f"tick_ns must be > 0, not {tick_ns}")
        options.tick_ns = tick_ns
        if capacity is not None:
            if not 1 <= capacity <= (1 << 31):
                raise ValueError(f"capacity must be in 1..2**31, not {capacity}")
            options.timer_capacity = capacity
        if expire_from is not None:
            options.expire_from_mask = _status_mask(expire_from)
        self.table = table
        _check(pa_ticker_create(table.ptr(), &options, &self._ticker), "pa_ticker_create")
        if start:
            self.start()

    def __dealloc__(self):
        if self._ticker is not NULL:
            with nogil:
                pa_ticker_destroy(self._ticker)
            self._ticker = NULL

    cdef pa_ticker_t *_live(self) except NULL:
        if self._ticker is NULL:
            raise ValueError("the ticker is closed")
        return self._ticker

    def start(self):
        cdef pa_ticker_t *t = self._live()
        cdef int rc = pa_ticker_start(t)
        if rc != 0 and rc != -EALREADY:  # already running is fine
            _check(rc, "pa_ticker_start")

    def stop(self):
        cdef pa_ticker_t *t = self._live()
        cdef int rc
        with nogil:
            rc = pa_ticker_stop(t)
        _check(rc, "pa_ticker_stop")

    def close(self):
        """Stops the thread and frees the wheel; queued ids are dropped."""
        cdef pa_ticker_t *t = self._ticker
        self._ticker = NULL
        if t is not NULL:
            with nogil:
                pa_ticker_destroy(t)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._ticker is NULL

    @property
    def tick_ns(self):
        return pa_ticker_tick_ns(self._live())

    @property
    def pending(self):
        return pa_ticker_pending(self._live())

    @property
    def queued(self):
        return pa_ticker_queued(self._live())

    def fileno(self):
        return pa_ticker_eventfd(self._live())

    def schedule_ns(self, pa_id_t record_id, uint64_t deadline_ns):
        """Schedules the record's expiry; returns the timer id. KeyError if the record is
        stale or already final."""
        cdef pa_ticker_t *t = self._live()
        cdef pa_timer_id_t tid = 0
        cdef int rc
        with nogil:
            rc = pa_ticker_schedule(t, record_id, deadline_ns, &tid)
        if rc == -ENOENT:
            raise KeyError(record_id)
        _check(rc, "pa_ticker_schedule")
        return tid

    def schedule(self, pa_id_t record_id, double deadline):
        return self.schedule_ns(record_id, _seconds_to_ns(deadline))

    def schedule_many_ns(self, record_ids_in, deadlines_ns_in, /):
        """Schedules each record; returns timer ids (0 where the record was stale/final)."""
        cdef const uint64_t[::1] record_ids = _u64(record_ids_in)
        cdef const uint64_t[::1] deadlines_ns = _u64(deadlines_ns_in)
        cdef pa_ticker_t *t = self._live()
        cdef Py_ssize_t n = record_ids.shape[0], i
        if deadlines_ns.shape[0] != n:
            raise ValueError("record_ids and deadlines must have the same length")
        out = np.zeros(n, dtype=np.uint64)
        cdef uint64_t[::1] ids = out
        cdef int rc = 0
        with nogil:
            for i in range(n):
                rc = pa_ticker_schedule(t, record_ids[i], deadlines_ns[i], &ids[i])
                if rc == -ENOENT:
                    ids[i] = 0
                    rc = 0
                elif rc != 0:
                    break
        if rc != 0:
            for i in range(n):
                if ids[i]:
                    pa_ticker_cancel(t, ids[i])
        _check(rc, "pa_ticker_schedule")
        return out

    def cancel(self, pa_timer_id_t timer_id):
        """True when the timer was pending and is now cancelled."""
        cdef pa_ticker_t *t = self._live()
        cdef int rc
        with nogil:
            rc = pa_ticker_cancel(t, timer_id)
        return rc == 0

    def advance_ns(self, uint64_t now_ns):
        """Advances on the calling thread; returns how many records it expired."""
        cdef pa_ticker_t *t = self._live()
        cdef size_t n
        with nogil:
            n = pa_ticker_advance(t, now_ns)
        return n

    def drain(self, size_t max_ids=65536):
        """Expired ids not yet taken (uint64 array, oldest first). Call until empty after
        each wakeup: the eventfd is cleared only when the queue empties."""
        cdef pa_ticker_t *t = self._live()
        out = np.empty(max_ids, dtype=np.uint64)
        cdef uint64_t[::1] ids = out
        cdef size_t n = 0
        if max_ids:
            with nogil:
                n = pa_ticker_drain(t, &ids[0], max_ids)
        return out[:n].copy() if n < max_ids else out

    def wait(self, timeout=None):
        """Blocks (GIL released) until expired ids are queued or timeout seconds pass;
        returns the drained ids (possibly empty on timeout)."""
        cdef pa_ticker_t *t = self._live()
        cdef pollfd pfd
        cdef int ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        pfd.fd = pa_ticker_eventfd(t)
        pfd.events = POLLIN
        pfd.revents = 0
        if pa_ticker_queued(t) == 0:
            with nogil:
                poll(&pfd, 1, ms)
        return self.drain()


# ---------------------------------------------------------------------------------------
# priority queue

@cython.final
cdef class PriorityQueue:
    """The native lock-free MPMC priority queue. pop() returns the id with the highest
    priority, then highest confidence, then earliest deadline (None sorts last), then
    earliest push. An indexed queue (the default) supports cancel(request_id) and
    refuses a second push of a queued id."""

    cdef pa_pq_t *_pq
    cdef readonly bint indexed

    def __cinit__(self, *, bint indexed=True):
        self.indexed = indexed
        _check(pa_pq_create(PA_PQ_INDEXED if indexed else 0, &self._pq), "pa_pq_create")

    def __dealloc__(self):
        if self._pq is not NULL:
            pa_pq_destroy(self._pq)
            self._pq = NULL

    def __len__(self):
        return pa_pq_size(self._pq)

    def __bool__(self):
        return pa_pq_size(self._pq) != 0

    def push(self, uint64_t request_id, double priority, double confidence=0.0, deadline=None):
        """deadline: time.monotonic() seconds, or None (sorts after every deadline)."""
        cdef double dl = NAN if deadline is None else <double>deadline
        cdef int rc
        if isnan(priority) or isnan(confidence):
            raise ValueError(f"priority {priority!r} and confidence {confidence!r} must be numbers")
        if dl == -float("inf"):
            raise ValueError("deadline must not be -inf")
        with nogil:
            rc = pa_pq_push(self._pq, request_id, priority, confidence, dl)
        if rc == -EEXIST:
            raise ValueError(f"request {request_id} is already queued")
        _check(rc, "pa_pq_push")

    def push_many(self, request_ids_in, priorities_in, confidences_in, deadlines_in, /):
        """Pushes each element (deadline NaN = none). Input is validated before anything is
        pushed; on an indexed queue the call is all or nothing: an id queued already or given
        twice withdraws everything this call queued (an item another thread popped or
        cancelled meanwhile stays taken) and raises ValueError."""
        cdef const uint64_t[::1] request_ids = _u64(request_ids_in, "request ids")
        cdef const double[::1] priorities = _f64(priorities_in)
        cdef const double[::1] confidences = _f64(confidences_in)
        cdef const double[::1] deadlines = _f64(deadlines_in)
        cdef Py_ssize_t n = request_ids.shape[0], i
        cdef size_t done = 0, kept = 0
        cdef int rc = 0
        if priorities.shape[0] != n or confidences.shape[0] != n or deadlines.shape[0] != n:
            raise ValueError("all arrays must have the same length")
        if n == 0:
            return
        with nogil:
            # the core checks every key before pushing any (-EINVAL: nothing pushed); an
            # indexed queue withdraws the whole call itself on failure (done: the failing
            # element), an unindexed one can only fail for memory (done: how many went in)
            if self.indexed:
                rc = pa_pq_push_all(self._pq, <size_t>n, &request_ids[0], &priorities[0],
                                    &confidences[0], &deadlines[0], &done, &kept)
            else:
                rc = pa_pq_push_many(self._pq, <size_t>n, &request_ids[0], &priorities[0],
                                     &confidences[0], &deadlines[0], &done)
        if rc == -EINVAL:
            for i in range(n):  # only to name the element in the message
                if isnan(priorities[i]) or isnan(confidences[i]) or deadlines[i] == -float("inf"):
                    raise ValueError(f"element {i}: priority and confidence must be numbers and the"
                                     " deadline not -inf")
        if rc == -EEXIST:
            taken = f"; {kept} of its items were popped or cancelled first" if kept else ""
            raise ValueError(f"request {request_ids[done]} is already queued (or given twice): nothing"
                             f" of this call stays queued{taken}")
        _check(rc, "pa_pq_push")

    def pop(self):
        """The first id in the order, or None when empty."""
        cdef pa_pq_item_t item
        cdef int got
        with nogil:
            got = pa_pq_pop(self._pq, &item)
        _check(got, "pa_pq_pop")  # -ENOMEM: no reclamation record, not "empty"
        return item.value if got == 1 else None

    def pop_item(self):
        """(id, priority, confidence, deadline or None, arrival) of the first item, removed;
        None when empty."""
        cdef pa_pq_item_t item
        cdef int got
        with nogil:
            got = pa_pq_pop(self._pq, &item)
        _check(got, "pa_pq_pop")
        if got != 1:
            return None
        return (item.value, item.priority, item.confidence,
                None if isnan(item.deadline) or item.deadline == float("inf") else item.deadline,
                item.arrival)

    def peek(self):
        cdef pa_pq_item_t item
        cdef int got = pa_pq_peek(self._pq, &item)
        _check(got, "pa_pq_peek")
        if got != 1:
            return None
        return item.value

    def pop_many(self, Py_ssize_t n):
        """Up to n ids in order (uint64 array)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        # room for what the queue holds now (and what concurrent pushes may add meanwhile),
        # not for n: a caller's "all of it" (pop_many(2**40)) must not allocate n slots
        cdef Py_ssize_t room = min(n, <Py_ssize_t>pa_pq_size(self._pq) + 256)
        out = np.empty(room, dtype=np.uint64)
        cdef uint64_t[::1] values = out
        cdef Py_ssize_t got = 0
        if room:
            with nogil:
                got = pa_pq_pop_many(self._pq, &values[0], <size_t>room)
            _check(<int>got if got < 0 else 0, "pa_pq_pop_many")
        return out[:got].copy() if got < room else out

    def cancel(self, uint64_t request_id):
        """True when the id was queued and is now withdrawn."""
        cdef int rc = pa_pq_cancel(self._pq, request_id)
        if rc == -ENOTSUP:
            raise TypeError("cancel needs an indexed queue (PriorityQueue(indexed=True))")
        return rc == 0


# ---------------------------------------------------------------------------------------
# memory reservation

cdef char *_BYTE_FORMAT = b"B"  # a C string literal: lives as long as the module

_POPULATE_METHODS = {0: "none", 1: "madvise", 2: "map_populate", 3: "touch"}


@cython.final
cdef class MemoryReservation:
    """Memory mapped, faulted in and (if asked and permitted) locked ahead of need. It is
    a writable buffer: memoryview(r) and numpy.frombuffer(r, ...) see it without a copy.

    The memory is never unmapped or moved under a live view: release() with views alive
    only marks the reservation released and the unmap happens when the last view goes;
    resize() with views alive may only grow in place (else BufferError)."""

    cdef pa_memory_t _mem
    cdef Py_ssize_t _exports
    cdef bint _release_pending
    cdef bint _busy
    cdef object _on_unmap  # callable run once by _unmap (see on_unmap), or None

    def __cinit__(self):
        pa_memory_init_empty(&self._mem)

    def __dealloc__(self):
        # No view can be alive here: every view holds a reference to this object.
        pa_memory_release(&self._mem)

    @staticmethod
    cdef MemoryReservation _create(size_t nbytes, unsigned flags):
        cdef MemoryReservation self = MemoryReservation.__new__(MemoryReservation)
        cdef pa_memory_t mem
        cdef int rc
        with nogil:
            rc = pa_memory_reserve(&mem, nbytes, flags)
        _check(rc, "pa_memory_reserve")
        self._mem = mem
        return self

    # -- buffer protocol --
    def __getbuffer__(self, Py_buffer *view, int flags):
        if self._mem.addr is NULL or self._release_pending:
            raise BufferError("the reservation is released")
        if self._busy:
            raise BufferError("the reservation is being resized")
        cdef Py_ssize_t *shape = NULL
        if flags & PyBUF_ND:
            shape = <Py_ssize_t *>PyMem_Malloc(sizeof(Py_ssize_t))
            if shape is NULL:
                raise MemoryError()
            shape[0] = <Py_ssize_t>self._mem.size
        view.buf = self._mem.addr
        view.obj = self
        view.len = <Py_ssize_t>self._mem.size
        view.readonly = 0
        view.itemsize = 1
        if flags & PyBUF_FORMAT:
            view.format = _BYTE_FORMAT
        else:
            view.format = NULL
        view.ndim = 1
        view.shape = shape  # per view, so a later in-place growth never changes a live view
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = shape
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        PyMem_Free(view.internal)
        self._exports -= 1
        if self._exports == 0 and self._release_pending:
            self._unmap()

    cdef _unmap(self):
        cdef pa_memory_t mem = self._mem
        pa_memory_init_empty(&self._mem)
        self._release_pending = False
        callback, self._on_unmap = self._on_unmap, None
        cdef int rc
        with nogil:
            rc = pa_memory_release(&mem)
        if callback is not None:
            callback()  # the region is gone even if the release reports an error
        _check(rc, "pa_memory_release")

    def on_unmap(self, callback):
        """Calls callback() once, with no arguments, when the region is unmapped: by
        release(), or by the release of the last view after a deferred release(); at
        once when it is unmapped already. It may run inside a buffer release (on any
        thread, in a garbage-collector pass), so it must take no lock and not raise.
        One callback per reservation: a second call replaces the first."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if self._mem.addr is NULL:
            callback()
            return
        self._on_unmap = callback

    def release(self):
        """Unlocks and unmaps now, or — while views are alive — as soon as the last one is
        released. Idempotent."""
        if self._busy:
            raise BufferError("the reservation is being resized")
        if self._mem.addr is NULL:
            return
        if self._exports > 0:
            self._release_pending = True
            return
        self._unmap()

    def resize(self, Py_ssize_t new_size, *, may_move=None):
        """Resizes in place with mremap (may_move=False), or letting the kernel move it
        (True). The default moves only when no view is alive. With live views only in-place
        growth is allowed; shrinking or moving raises BufferError."""
        if self._mem.addr is NULL or self._release_pending:
            raise ValueError("the reservation is released")
        if self._busy:
            raise BufferError("the reservation is already being resized")
        if new_size <= 0:
            raise ValueError(f"new size must be > 0 bytes, not {new_size}")
        cdef bint move = (self._exports == 0) if may_move is None else bool(may_move)
        if self._exports > 0:
            if move:
                raise BufferError("cannot move a reservation while views of it are alive")
            if <size_t>new_size < self._mem.size:
                raise BufferError("cannot shrink a reservation while views of it are alive")
        cdef int rc
        self._busy = True
        try:
            with nogil:
                rc = pa_memory_resize(&self._mem, <size_t>new_size, move)
        finally:
            self._busy = False
        _check(rc, "pa_memory_resize")

    def resident_bytes(self):
        """Bytes of the region resident in RAM now (mincore)."""
        cdef size_t resident = 0
        if self._mem.addr is NULL:
            return 0
        _check(pa_memory_resident(&self._mem, &resident), "pa_memory_resident")
        return resident

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __len__(self):
        return self._mem.size

    @property
    def size(self):
        """Usable bytes (the request rounded up to a page); 0 once released."""
        return self._mem.size

    @property
    def requested_size(self):
        return self._mem.requested_size

    @property
    def address(self):
        return <size_t>self._mem.addr

    @property
    def fd(self):
        """The memfd of a shareable reservation (owned by it), else None."""
        return self._mem.fd if self._mem.fd >= 0 else None

    @property
    def released(self):
        return self._mem.addr is NULL or self._release_pending

    @property
    def exports(self):
        return self._exports

    @property
    def requested_flags(self):
        return self._mem.requested_flags

    @property
    def effective_flags(self):
        return self._mem.effective_flags

    @property
    def populated(self):
        return bool(self._mem.effective_flags & PA_MEM_POPULATE)

    @property
    def locked(self):
        return bool(self._mem.effective_flags & PA_MEM_LOCK)

    @property
    def huge_pages(self):
        return bool(self._mem.effective_flags & PA_MEM_HUGE_PAGES)

    @property
    def shareable(self):
        return bool(self._mem.effective_flags & PA_MEM_SHAREABLE)

    @property
    def populate_method(self):
        return _POPULATE_METHODS.get(self._mem.populate_method, str(self._mem.populate_method))

    @property
    def lock_error(self):
        """0, or the errno that kept the region from being locked (EPERM, ENOMEM, ...)."""
        return self._mem.lock_error

    @property
    def huge_pages_error(self):
        return self._mem.huge_pages_error

    @property
    def populate_error(self):
        return self._mem.populate_error

    def __repr__(self):
        if self._mem.addr is NULL:
            return "<MemoryReservation released>"
        return (f"<MemoryReservation {self._mem.size} bytes at {<size_t>self._mem.addr:#x}"
                f" populated={self.populated} locked={self.locked} huge_pages={self.huge_pages}"
                f" shareable={self.shareable} views={self._exports}"
                f"{' release pending' if self._release_pending else ''}>")


MEM_POPULATE = PA_MEM_POPULATE
MEM_LOCK = PA_MEM_LOCK
MEM_LOCK_REQUIRED = PA_MEM_LOCK_REQUIRED
MEM_HUGE_PAGES = PA_MEM_HUGE_PAGES
MEM_SHAREABLE = PA_MEM_SHAREABLE
HUGE_PAGE_SIZE = PA_HUGE_PAGE_SIZE


def _reserve_memory(size_t nbytes, unsigned flags):
    if flags & ~PA_MEM_ALL_FLAGS:
        raise ValueError(f"unknown memory flags {flags:#x}")
    return MemoryReservation._create(nbytes, flags)


def page_size():
    return pa_page_size()


def physical_memory():
    return pa_physical_memory()


# ---------------------------------------------------------------------------------------
# CPU affinity

cdef int _to_mask(cores, pa_cpumask_t *mask) except -1:
    pa_cpumask_zero(mask)
    for c in cores:
        c = int(c)
        if not 0 <= c < PA_CPU_MAX:
            raise ValueError(f"cpu {c} is outside 0..{PA_CPU_MAX - 1}")
        pa_cpumask_set(mask, <unsigned>c)
    return 0


cdef set _from_mask(const pa_cpumask_t *mask):
    return {c for c in range(PA_CPU_MAX) if pa_cpumask_test(mask, c)}


def online_cpus():
    """The cpus the kernel reports online."""
    cdef pa_cpumask_t mask
    _check(pa_cpus_online(&mask), "pa_cpus_online")
    return _from_mask(&mask)


def thread_affinity(pid_t tid=0):
    """The affinity of one thread (0 = the calling thread)."""
    cdef pa_cpumask_t mask
    cdef int rc
    with nogil:
        rc = pa_affinity_get(tid, &mask)
    _check(rc, "pa_affinity_get")
    return _from_mask(&mask)


def set_thread_affinity(pid_t tid, cores):
    cdef pa_cpumask_t mask
    _to_mask(cores, &mask)
    cdef int rc
    with nogil:
        rc = pa_affinity_set_thread(tid, &mask)
    _check(rc, "pa_affinity_set_thread")


@cython.final
cdef class AffinityChange:
    """The previous masks of the threads one set_process_affinity() changed; restore()
    (or leaving the with-block) puts each thread still alive back as it was."""

    cdef pa_affinity_saved_t _saved
    cdef readonly int pid

    def __cinit__(self):
        pa_affinity_saved_init(&self._saved)

    def __dealloc__(self):
        pa_affinity_saved_free(&self._saved)

    @property
    def threads(self):
        return self._saved.count

    def restore(self):
        cdef int rc
        with nogil:
            rc = pa_affinity_restore(&self._saved)
        _check(rc, "pa_affinity_restore")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def set_process_affinity(pid_t pid, cores):
    """Sets the mask on every thread of process pid (0 = this process); returns the
    AffinityChange that can restore the previous masks."""
    cdef pa_cpumask_t mask
    _to_mask(cores, &mask)
    cdef AffinityChange change = AffinityChange.__new__(AffinityChange)
    change.pid = pid
    cdef int rc
    with nogil:
        rc = pa_affinity_set_process(pid, &mask, &change._saved)
    _check(rc, "pa_affinity_set_process")
    return change


@cython.final
cdef class CoreReservation:
    """Cores held in a CoreReservations registry. apply() pins a thread or a process to
    them (saving the previous masks); release() restores every target and frees the
    cores."""

    cdef readonly CoreReservations registry
    cdef pa_core_reservation_t _id
    cdef readonly bint exclusive

    @property
    def id(self):
        return self._id

    @property
    def released(self):
        return self._id == 0

    cdef pa_core_reservation_t _live(self) except 0:
        if self._id == 0:
            raise ValueError("the core reservation is released")
        return self._id

    @property
    def cores(self):
        """The cores held now (a frozenset)."""
        cdef pa_cpumask_t mask
        cdef bint exclusive
        if self._id == 0:
            return frozenset()
        _check(pa_cores_get(self.registry._cores, self._id, &mask, &exclusive), "pa_cores_get")
        return frozenset(_from_mask(&mask))

    def apply(self, pid_t target=0, *, bint whole_process=True):
        """Pins every thread of process `target` (whole_process, 0 = this process) or the
        one thread `target` (0 = the calling thread) to the reserved cores."""
        cdef pa_core_reservation_t rid = self._live()
        cdef int rc
        with nogil:
            rc = pa_cores_apply(self.registry._cores, rid, target, whole_process)
        _check(rc, "pa_cores_apply")

    def resize(self, unsigned count):
        """Grows or shrinks to count cores and re-applies to every target."""
        cdef pa_core_reservation_t rid = self._live()
        cdef int rc
        if count == 0:
            raise ValueError("a core reservation holds at least one core; release it instead")
        with nogil:
            rc = pa_cores_resize(self.registry._cores, rid, count)
        if rc == -EBUSY:
            raise BlockingIOError(rc * -1, f"pa_cores_resize: not enough free cores to grow to {count}")
        _check(rc, "pa_cores_resize")

    def release(self):
        """Restores every target's previous masks and frees the cores. Idempotent."""
        cdef pa_core_reservation_t rid = self._id
        cdef int rc
        if rid == 0:
            return
        self._id = 0
        with nogil:
            rc = pa_cores_release(self.registry._cores, rid)
        _check(rc, "pa_cores_release")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"<CoreReservation cores={sorted(self.cores)} exclusive={self.exclusive}>"


@cython.final
cdef class CoreReservations:
    """The core reservation registry: an exclusive core is never given to two holders;
    shared reservations may overlap each other but not an exclusive one."""

    cdef pa_cores_t *_cores

    def __cinit__(self, allowed=None):
        cdef pa_cpumask_t mask
        if allowed is not None:
            _to_mask(allowed, &mask)
        _check(pa_cores_create(&mask if allowed is not None else NULL, &self._cores), "pa_cores_create")

    def __dealloc__(self):
        if self._cores is not NULL:
            with nogil:
                pa_cores_destroy(self._cores)
            self._cores = NULL

    cdef CoreReservation _wrap(self, pa_core_reservation_t rid, bint exclusive):
        cdef CoreReservation r = CoreReservation.__new__(CoreReservation)
        r.registry = self
        r._id = rid
        r.exclusive = exclusive
        return r

    def reserve(self, unsigned count, *, bint exclusive=True, prefer=None):
        cdef pa_cpumask_t prefer_mask
        cdef pa_core_reservation_t rid = 0
        cdef int rc
        if prefer is not None:
            _to_mask(prefer, &prefer_mask)
        with nogil:
            rc = pa_cores_reserve(self._cores, count, exclusive,
                                  &prefer_mask if prefer is not None else NULL, &rid)
        if rc == -EBUSY:
            raise BlockingIOError(EBUSY, f"pa_cores_reserve: {count} {'exclusive' if exclusive else 'shared'}"
                                  f" cores are not free (free now: {sorted(self.available())})")
        if rc == -EINVAL:
            raise ValueError(f"cannot reserve {count} cores from {sorted(self.allowed())}")
        _check(rc, "pa_cores_reserve")
        return self._wrap(rid, exclusive)

    def reserve_cores(self, cores, *, bint exclusive=True):
        cdef pa_cpumask_t mask
        cdef pa_core_reservation_t rid = 0
        cdef int rc
        _to_mask(cores, &mask)
        with nogil:
            rc = pa_cores_reserve_mask(self._cores, &mask, exclusive, &rid)
        if rc == -EBUSY:
            raise BlockingIOError(EBUSY, f"pa_cores_reserve_mask: cores {sorted(cores)} are held")
        if rc == -EINVAL:
            raise ValueError(f"cores {sorted(cores)} are empty or outside the allowed set "
                             f"{sorted(self.allowed())}")
        _check(rc, "pa_cores_reserve_mask")
        return self._wrap(rid, exclusive)

    def available(self):
        """Cores free for an exclusive reservation now."""
        cdef pa_cpumask_t free_mask, allowed
        _check(pa_cores_available(self._cores, &free_mask, &allowed), "pa_cores_available")
        return _from_mask(&free_mask)

    def allowed(self):
        cdef pa_cpumask_t free_mask, allowed
        _check(pa_cores_available(self._cores, &free_mask, &allowed), "pa_cores_available")
        return _from_mask(&allowed)

    def __len__(self):
        return pa_cores_live(self._cores)


# ---------------------------------------------------------------------------------------
# the allocators' compiled half

include "_engine_core.pxi"

include "_disk.pxi"

include "_pagecache.pxi"
