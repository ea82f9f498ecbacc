"""The asyncio face: the spec's Promise-returning methods as coroutines.

    from prealloc import ResourcePreallocator
    from prealloc.aio import AsyncPreallocator

    async def main():
        async with AsyncPreallocator(ResourcePreallocator(translator=rules)) as pre:
            await pre.handle_prediction(prediction)
            async with pre.acquire("MEMORY", 512, target_application="editor") as claim:
                buffer = memoryview(claim.resource)
            async for name, payload in pre.events("resource:expired"):
                ...

Design: a wrapper (``AsyncPreallocator``) rather than ``async`` methods on the
allocators, so that the synchronous engine keeps one face and no event-loop state, and
the wrapper alone knows about loops: it owns the one ``loop.add_reader`` on the
allocator's readiness eventfd (``ResourceAllocator.readiness_fd()``, written by the core
whenever a request leaves PENDING) and the futures that wait on it.

Where each call's work runs (never on the loop when it may be slow):

* ``request_preallocation`` / ``handle_prediction``: the request is queued (``submit``,
  cheap, on the loop) and the allocator's own worker thread allocates it — the populate
  of a large region runs there, with the GIL released by the native core. The coroutine
  waits on the readiness fd: no thread per call, no polling sleep. Unlike the
  synchronous ``request_preallocation`` (which fails at once when resources are short),
  a queued request waits for resources up to its deadline (``pending_timeout`` without
  one), as every queued request does.
* ``acquire``: a hit (an allocation ready for the need) is claimed on the loop (cheap:
  no allocation). A matching request queued through this face and still PENDING is
  awaited (readiness fd) and then claimed. (Only those: a request queued by a predictor
  wired into the allocator's config is not seen — the engine's snapshots do not carry
  the application — so a need that comes while it is PENDING is a miss. Connect the
  predictor to the face instead, ``face.connect(predictor)``: its predictions are then
  queued through the face, and the allocator still reports outcomes to its
  ``update_model``.) A miss allocates at need: the engine does
  that synchronously on the calling thread (``_acquire_at_need``, booked as a miss, out
  of the hit rate), and it has no queued equivalent — queueing it through the worker
  would book it as a preallocation — so it runs on this face's small executor. That
  executor (``executor_workers`` threads, made on first use) is the one place threads
  are used, and also runs ``release_allocation`` (the strategy's release — an munmap of
  gigabytes, an unpin — runs on the releasing thread in the engine) and
  ``handle_prediction`` when the allocator has ``immediate_processing`` (which allocates
  on the caller's thread by definition).
* The event iterator: listeners on the allocator hand each event to the loop with
  ``loop.call_soon_threadsafe``; they run on whatever thread emits.

Cancellation (nothing leaks):

* a cancelled ``request_preallocation`` withdraws its request (``release_allocation``:
  a cancel while PENDING, a release with ``used_successfully=False, reason "cancelled"``
  if the worker allocated it meanwhile);
* a cancelled ``acquire`` that was waiting for a queued request leaves that request
  queued: it is a preallocation, like any other, for the next need (or it expires by
  its duration). A cancelled ``acquire`` whose at-need allocation is running on the
  executor releases that allocation as soon as it is made;
* a cancelled ``wait_ready`` only stops waiting.

One event loop at a time may wait on one allocator's readiness (two loops would each
consume the eventfd's count and miss the other's wake-up); every ``AsyncPreallocator``
of an allocator on the same loop shares one reader.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import weakref
from typing import Any, Iterable

import numpy as np

from ._threads import QuietThreadPoolExecutor
from .engine import Claim, ResourceAllocator, ResourcePreallocator, _check_application, _check_target_pid
from .events import EVENT_NAMES, EXPIRED, FAILED, canonical_event
from .strategies import AllocationError
from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    ResourceAllocation,
    ResourceRequest,
    ResourceType,
    check_amount,
    check_seconds,
)

log = logging.getLogger(__name__)

_PENDING = int(AllocationStatus.PENDING)
# How long request_preallocation waits for the 'resource:failed' event of a request that
# left the table without being allocated, before it calls it withdrawn (seconds).
ENDING_GRACE = 1.0
_CANCELLED_FEEDBACK = AllocationFeedback(used_successfully=False, reason_for_release="cancelled")


class _Readiness:
    """The one reader of an allocator's readiness fd on one loop, and the futures that
    wait for ids to leave PENDING. Lives and runs on its loop's thread only."""

    def __init__(self, allocator: ResourceAllocator, loop: asyncio.AbstractEventLoop) -> None:
        self.allocator = allocator
        self.loop = loop
        # A duplicate of the allocator's eventfd: if the allocator is closed under the
        # face, the signal its close writes still reaches this reader (the epoll
        # registration lives while any descriptor of the file does), and the number the
        # loop knows is not reused by an unrelated file until this reader lets it go.
        self.fd = os.dup(allocator.readiness_fd())
        self.reading = False
        # id -> futures waiting for it to leave PENDING (a future may wait on several ids)
        self.waiters: dict[int, list[asyncio.Future[int]]] = {}
        # ids queued through a face and still PENDING, with (type, application): acquire
        # waits for them before it calls a need a miss
        self.tracked: dict[int, tuple[ResourceType, str | None]] = {}
        # final snapshots of tracked ids that failed or expired (from the events), so a
        # coroutine can say why its request ended
        self.endings: dict[int, ResourceAllocation] = {}
        self.ending_futures: dict[int, asyncio.Future[None]] = {}
        self._listening = False

    # --- the reader
    def _want_reader(self) -> None:
        if self.fd < 0:
            raise RuntimeError("the allocator was closed")
        if not self.reading and (self.waiters or self.tracked):
            self.loop.add_reader(self.fd, self._on_readable)
            self.reading = True

    def _drop_reader_if_idle(self) -> None:
        if self.reading and not self.waiters and not self.tracked:
            try:
                self.loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):  # the loop or the fd closed meanwhile
                pass
            self.reading = False

    def _release_fd(self) -> None:
        if self.reading:
            try:
                self.loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):  # the loop closed meanwhile
                pass
            self.reading = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with _readers_lock:
            if _readers.get(self.allocator) is self:
                del _readers[self.allocator]

    def _on_readable(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:  # another wake consumed it; the statuses below are what count
            pass
        except OSError:  # the allocator closed its fd: everything is over
            self._fail_all(RuntimeError("the allocator was closed"))
            return
        self.scan()

    def scan(self) -> None:
        """Resolves the futures of ids that left PENDING, forgets tracked ids that did."""
        if self.allocator.closed:  # closed under the face (aclose it first): end every wait
            self._fail_all(RuntimeError("the allocator was closed"))
            self._release_fd()
            return
        ids = list(self.waiters.keys() | self.tracked.keys())
        if not ids:
            self._drop_reader_if_idle()
            return
        try:
            statuses = self.allocator._table.status_many(np.fromiter(ids, dtype=np.uint64, count=len(ids)))
        except Exception as exc:  # the table is gone: the allocator closed
            self._fail_all(RuntimeError(f"the allocator was closed ({exc})"))
            return
        for allocation_id, status in zip(ids, statuses.tolist()):
            if status == _PENDING:
                continue
            self.tracked.pop(allocation_id, None)
            for future in self.waiters.pop(allocation_id, ()):
                if not future.done():
                    future.set_result(allocation_id)
        self._drop_reader_if_idle()

    def _fail_all(self, exc: BaseException | None) -> None:
        """Ends every wait: with exc, or cancelled when exc is None."""
        waiters, self.waiters = self.waiters, {}
        self.tracked.clear()
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    if exc is None:
                        future.cancel()
                    else:
                        future.set_exception(exc)
        self._drop_reader_if_idle()

    # --- waiting
    def wait_any(self, ids: Iterable[int]) -> asyncio.Future[int]:
        """A future resolved with the first of ids to leave PENDING (at once if one has)."""
        future: asyncio.Future[int] = self.loop.create_future()
        ids = list(ids)
        for allocation_id in ids:
            self.waiters.setdefault(allocation_id, []).append(future)
        future.add_done_callback(functools.partial(self._forget, ids=ids))
        self._want_reader()
        self.scan()  # a transition before the registration has been signalled already
        return future

    def _forget(self, future: asyncio.Future[int], *, ids: list[int]) -> None:
        for allocation_id in ids:
            futures = self.waiters.get(allocation_id)
            if futures is not None and future in futures:
                futures.remove(future)
                if not futures:
                    del self.waiters[allocation_id]
        self._drop_reader_if_idle()

    def track(self, allocation_id: int, resource_type: ResourceType, application: str | None) -> None:
        self.tracked[allocation_id] = (resource_type, application)
        self._want_reader()

    # --- why a request ended (failed / expired events)
    def listen_for_endings(self) -> None:
        if not self._listening:
            self.allocator.on(FAILED, self._on_ending)
            self.allocator.on(EXPIRED, self._on_ending)
            self._listening = True

    def _on_ending(self, snapshot: Any) -> None:
        # any thread; a dict store of an int key runs no Python code
        allocation_id = getattr(snapshot, "allocation_id", None)
        if allocation_id in self.ending_futures:
            self.endings[allocation_id] = snapshot
            try:
                self.loop.call_soon_threadsafe(self._wake_ending, allocation_id)
            except RuntimeError:  # the loop closed
                pass

    def _wake_ending(self, allocation_id: int) -> None:
        future = self.ending_futures.get(allocation_id)
        if future is not None and not future.done():
            future.set_result(None)

    def close(self) -> None:
        self._fail_all(None)
        if self._listening and not self.allocator.closed:
            self.allocator.off(FAILED, self._on_ending)
            self.allocator.off(EXPIRED, self._on_ending)
        self._listening = False
        self._release_fd()


# allocator -> its readiness reader (bound to one loop at a time)
_readers: weakref.WeakKeyDictionary[ResourceAllocator, _Readiness] = weakref.WeakKeyDictionary()
_readers_lock = threading.RLock()  # re-entered: a reader's close drops its entry


def _readiness_for(allocator: ResourceAllocator) -> _Readiness:
    loop = asyncio.get_running_loop()
    with _readers_lock:
        reader = _readers.get(allocator)
        if reader is not None and reader.fd < 0:
            reader = None
        if reader is not None and reader.loop is not loop:
            if reader.loop.is_closed() or not (reader.waiters or reader.tracked):
                reader.close()
                reader = None
            else:
                raise RuntimeError("this allocator's readiness is awaited from another event loop; "
                                   "one loop at a time may wait on one allocator")
        if reader is None:
            reader = _readers[allocator] = _Readiness(allocator, loop)
        return reader


class _Acquiring:
    """What ``AsyncPreallocator.acquire`` returns: awaitable (``claim = await ...``) and
    an async context manager (``async with ... as claim``: released at the end, with
    ``used_successfully`` false if the block raised)."""

    __slots__ = ("_face", "_args", "_claim")

    def __init__(self, face: AsyncPreallocator, args: tuple[Any, ...]) -> None:
        self._face = face
        self._args = args
        self._claim: Claim | None = None

    def __await__(self) -> Any:
        return self._face._acquire(*self._args).__await__()

    async def __aenter__(self) -> Claim:
        self._claim = await self._face._acquire(*self._args)
        return self._claim

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            await self._face.release(claim, AllocationFeedback(used_successfully=exc_type is None,
                                                               reason_for_release="claim closed"))


class EventStream:
    """An async iterator of ``(event name, payload)`` for the names it listens to (the
    canonical names; aliases are accepted). Listeners are added at construction and
    removed by ``aclose()``, the end of ``async with``, or a ``break`` out of
    ``async for`` followed by ``aclose``. ``maxsize`` > 0 bounds the backlog: the oldest
    events are dropped beyond it (``dropped`` counts them), so a slow consumer cannot
    grow memory without bound."""

    def __init__(self, allocator: ResourceAllocator, names: Iterable[str], maxsize: int = 0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0, not {maxsize!r}")
        self._loop = asyncio.get_running_loop()
        wanted = [canonical_event(n) for n in names] or list(EVENT_NAMES)
        self._names = tuple(dict.fromkeys(wanted))
        self._maxsize = maxsize
        self._backlog: list[tuple[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._allocator = allocator
        self._closed = False
        self.dropped = 0
        self._listeners: list[tuple[str, Any]] = []
        for name in self._names:
            listener = self._listener_for(name)
            allocator.on(name, listener)
            self._listeners.append((name, listener))

    def _listener_for(self, name: str) -> Any:
        def listener(payload: Any) -> None:  # the emitting thread
            try:
                self._loop.call_soon_threadsafe(self._deliver, name, payload)
            except RuntimeError:  # the loop is closed: nobody will read this stream
                pass
        return listener

    def _deliver(self, name: str, payload: Any) -> None:
        if self._closed:
            return
        self._backlog.append((name, payload))
        if self._maxsize and len(self._backlog) > self._maxsize:
            del self._backlog[0]
            self.dropped += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        while not self._backlog:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._backlog.pop(0)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._allocator.closed:
            for name, listener in self._listeners:
                self._allocator.off(name, listener)
        self._listeners.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncPreallocator:
    """The asyncio face of an allocator (see the module docstring for where each call's
    work runs). ``allocator`` stays the caller's unless ``own=True`` (then ``aclose()``
    closes it too)."""

    def __init__(self, allocator: ResourceAllocator, *, own: bool = True, executor_workers: int = 2) -> None:
        if not isinstance(allocator, ResourceAllocator):
            raise TypeError(f"allocator must be a ResourceAllocator, not {type(allocator).__name__}")
        if isinstance(executor_workers, bool) or not isinstance(executor_workers, int) \
                or not 1 <= executor_workers <= 64:
            raise ValueError(f"executor_workers must be an int in 1..64, not {executor_workers!r}")
        self.allocator = allocator
        self._own = own
        self._executor_workers = executor_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._predictor: Any = None
        self._predictor_loop: asyncio.AbstractEventLoop | None = None
        self._predictor_thread = 0

    # ------------------------------------------------------------------ plumbing
    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = QuietThreadPoolExecutor(
                    self._executor_workers, thread_name_prefix=f"prealloc-aio-{self.allocator.id[:8]}")
            return self._executor

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self._pool().submit(fn, *args))

    def _check_open(self) -> None:
        self.allocator._check_open()

    # ------------------------------------------------------------------ predictions in
    async def handle_prediction(self, prediction: Prediction, *, wait: bool = False,
                                timeout: float | None = None) -> list[int]:
        """The allocator's handle_prediction (validate, translate, queue), then, with
        ``wait=True``, waits until every request left PENDING (or ``timeout`` passed).
        Returns the allocation ids. The requests are tracked, so an ``acquire`` for
        their type and application waits for them instead of allocating at need."""
        self._check_open()
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        handle = getattr(self.allocator, "handle_prediction")  # both allocators have one
        ids: list[int]
        if self.allocator.config.immediate_processing:
            ids = await self._off_loop(handle, prediction)
        else:
            ids = handle(prediction)
        if ids:
            reader = _readiness_for(self.allocator)
            application = prediction.target_application
            for allocation_id in ids:
                snapshot = self.allocator.get_allocation(allocation_id)
                if snapshot is not None and snapshot.status is AllocationStatus.PENDING:
                    reader.track(allocation_id, snapshot.resource_type, application)
            if wait:
                await self.wait_ready(ids, timeout)
        return ids

    async def request_preallocation(self, request: ResourceRequest, *,
                                    timeout: float | None = None) -> ResourceAllocation:
        """Queues the request for the allocator's worker and waits until it was
        allocated (the ALLOCATED snapshot) or ended (FAILED / EXPIRED with its reason,
        RELEASED when withdrawn). ``timeout``: TimeoutError after it, the request
        withdrawn. Cancelled: the request is withdrawn or, if allocated meanwhile,
        released. Allocators without a queue (the reactive baseline) allocate on this
        face's executor instead."""
        self._check_open()
        if not isinstance(request, ResourceRequest):
            raise TypeError(f"request must be a ResourceRequest, not {type(request).__name__}")
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        if not isinstance(self.allocator, ResourcePreallocator):
            result: ResourceAllocation = await self._off_loop(self.allocator.request_preallocation, request)
            return result
        reader = _readiness_for(self.allocator)
        reader.listen_for_endings()
        allocation_id = self.allocator.submit(request, wake=False)
        # registered before the worker is woken: its failure event finds the future
        ending_future = reader.ending_futures[allocation_id] = reader.loop.create_future()
        self.allocator._wake()
        reader.track(allocation_id, request.resource_type, request.metadata.target_application)
        try:
            try:
                await asyncio.wait_for(reader.wait_any([allocation_id]), timeout)
            except BaseException:
                # cancelled or timed out: withdraw it (a cancel while PENDING is cheap; a
                # release of an allocation made meanwhile goes to the executor)
                reader.tracked.pop(allocation_id, None)
                self._withdraw(allocation_id)
                raise
            snapshot = self.allocator.get_allocation(allocation_id)
            if snapshot is not None:
                return snapshot
            if allocation_id not in reader.endings:
                # Gone from the table: failed, past its deadline, or withdrawn. The core
                # signals readiness just before it emits 'resource:failed', so the reason
                # may be a moment behind; a withdrawal emits nothing, hence the bound.
                try:
                    await asyncio.wait_for(asyncio.shield(ending_future), ENDING_GRACE)
                except asyncio.TimeoutError:
                    pass
            ending = reader.endings.get(allocation_id)
            if ending is not None:
                return ending
        finally:
            reader.ending_futures.pop(allocation_id, None)
            reader.endings.pop(allocation_id, None)
        return ResourceAllocation(allocation_id, request.request_id, request.resource_type, request.predicted_need,
                                  0.0, AllocationStatus.RELEASED, None,
                                  failure_reason="withdrawn (reset, cancel or close) before it was allocated")

    def _withdraw(self, allocation_id: int) -> None:
        if self.allocator.closed:
            return
        status = self.allocator._table.status_many(np.array([allocation_id], dtype=np.uint64))[0]
        if status == _PENDING and self.allocator.release_allocation(allocation_id, _CANCELLED_FEEDBACK):
            return
        if status >= 0:
            self._pool().submit(self._release_quietly, allocation_id, _CANCELLED_FEEDBACK)

    def _release_quietly(self, allocation_id: int, feedback: AllocationFeedback) -> None:
        try:
            if not self.allocator.closed:
                self.allocator.release_allocation(allocation_id, feedback)
        except Exception:
            log.exception("releasing allocation %d after a cancelled call failed", allocation_id)

    async def wait_ready(self, allocation_ids: int | Iterable[int], timeout: float | None = None) -> bool:
        """True once every id has left PENDING (ALLOCATED, or ended in any way; an
        unknown id counts as ended); False when ``timeout`` passed first."""
        self._check_open()
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        ids = [allocation_ids] if isinstance(allocation_ids, int) else list(allocation_ids)
        for allocation_id in ids:
            if type(allocation_id) is not int:
                raise TypeError(f"allocation ids are ints, not {type(allocation_id).__name__}")
        reader = _readiness_for(self.allocator)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        left = {i for i in ids if 0 < i < 2**64}
        while left:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                done = await asyncio.wait_for(reader.wait_any(left), remaining)
            except asyncio.TimeoutError:
                return False
            left.discard(done)
            reader.scan()
            statuses = self.allocator._table.status_many(np.fromiter(left, dtype=np.uint64, count=len(left)))
            left = {i for i, s in zip(list(left), statuses.tolist()) if s == _PENDING}
        return True

    # ------------------------------------------------------------------ the need
    def acquire(self, resource_type: ResourceType | str, amount: float, *, target_application: str | None = None,
                target_process_id: int | None = None, wait_queued: bool = True) -> _Acquiring:
        """The moment of need, without blocking the loop: ``claim = await
        pre.acquire(...)`` or ``async with pre.acquire(...) as claim``. A ready
        allocation is claimed (a hit); with ``wait_queued`` (the default), requests of
        this type and application queued through this face and still PENDING are
        awaited first; otherwise it allocates at need off the loop (a miss). Arguments
        are checked here, at the call."""
        rtype = ResourceType.parse(resource_type)
        amount = check_amount("amount", amount)
        application = _check_application(target_application)
        pid = _check_target_pid(target_process_id)
        if not isinstance(wait_queued, bool):
            raise TypeError(f"wait_queued must be a bool, not {type(wait_queued).__name__}")
        return _Acquiring(self, (rtype, amount, application, pid, wait_queued))

    async def _acquire(self, rtype: ResourceType, amount: float, application: str | None, pid: int | None,
                       wait_queued: bool) -> Claim:
        self._check_open()
        allocator = self.allocator
        if wait_queued:
            reader = _readiness_for(allocator)
            while True:
                reader.scan()
                queued = [i for i, (t, app) in reader.tracked.items() if t is rtype and app == application]
                if not queued:
                    break
                # the first of them to be allocated is the one to try; one that failed
                # leaves the others to wait for
                first = await reader.wait_any(queued)
                status = allocator._table.status_many(np.array([first], dtype=np.uint64))[0]
                if status == int(AllocationStatus.ALLOCATED):
                    break
        claim = allocator._claim_ready(rtype, application, amount, pid)
        counted = isinstance(allocator, ResourcePreallocator)
        if claim is not None:
            if counted:
                allocator.metrics.record_metric("preallocation_hit", resource_type=rtype.name)
            return claim
        if counted:
            allocator.metrics.record_metric("preallocation_miss", resource_type=rtype.name)
        job = self._pool().submit(allocator._acquire_at_need, rtype, amount, application, pid)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # the allocation may be running: whatever it makes is given back when done
            job.add_done_callback(_release_abandoned)
            raise

    async def release_allocation(self, allocation_id: int, feedback: AllocationFeedback | None = None) -> bool:
        """The allocator's release_allocation, run off the loop (the strategy's release
        may unmap gigabytes). The id and feedback are checked on the call."""
        self._check_open()
        if type(allocation_id) is not int:
            raise TypeError(f"allocation_id must be an int, not {type(allocation_id).__name__}")
        if feedback is not None and not isinstance(feedback, AllocationFeedback):
            raise TypeError(f"feedback must be an AllocationFeedback, not {type(feedback).__name__}")
        result: bool = await self._off_loop(self.allocator.release_allocation, allocation_id, feedback)
        return result

    async def release(self, claim: Claim, feedback: AllocationFeedback | None = None) -> bool:
        """Claim.release off the loop."""
        if not isinstance(claim, Claim):
            raise TypeError(f"claim must be a Claim, not {type(claim).__name__}")
        result: bool = await self._off_loop(claim.release, feedback)
        return result

    # ------------------------------------------------------------------ a predictor
    def connect(self, predictor: Any) -> None:
        """Takes predictor's 'prediction:generated' predictions through this face (so
        acquire waits for their requests), in place of the allocator's own
        subscription; the allocator still calls its ``update_model`` with every
        outcome. Call it from the loop. A prediction emitted on the loop's thread (an
        ``observe`` in a coroutine) is queued before the emit returns; one emitted on
        another thread is handed to the loop."""
        self._check_open()
        if not callable(getattr(predictor, "on", None)) or not callable(getattr(predictor, "off", None)):
            raise TypeError(f"predictor must have on and off, not {type(predictor).__name__}")
        self.disconnect()
        update = getattr(predictor, "update_model", None)
        self.allocator.initialize(predictor=_LearnOnly(update) if callable(update) else None)
        self._predictor_loop = asyncio.get_running_loop()
        self._predictor_thread = threading.get_ident()
        predictor.on("prediction:generated", self._on_prediction)
        self._predictor = predictor

    def disconnect(self) -> None:
        """Undoes connect (the allocator is left with no predictor)."""
        predictor, self._predictor = self._predictor, None
        if predictor is None:
            return
        predictor.off("prediction:generated", self._on_prediction)
        if not self.allocator.closed:
            self.allocator.initialize(predictor=None)

    def _on_prediction(self, prediction: Prediction) -> None:
        loop = self._predictor_loop
        if loop is None or self.allocator.closed:
            return
        if threading.get_ident() == self._predictor_thread and not self.allocator.config.immediate_processing:
            self._queue_tracked(prediction)
        else:
            try:
                loop.call_soon_threadsafe(self._queue_soon, prediction)
            except RuntimeError:  # the loop closed
                pass

    def _queue_soon(self, prediction: Prediction) -> None:
        if self.allocator.config.immediate_processing:
            asyncio.ensure_future(self.handle_prediction(prediction))
        else:
            self._queue_tracked(prediction)

    def _queue_tracked(self, prediction: Prediction) -> None:
        if self.allocator.closed:
            return
        handle = getattr(self.allocator, "handle_prediction")
        ids = handle(prediction)
        if ids:
            reader = _readiness_for(self.allocator)
            for allocation_id in ids:
                snapshot = self.allocator.get_allocation(allocation_id)
                if snapshot is not None and snapshot.status is AllocationStatus.PENDING:
                    reader.track(allocation_id, snapshot.resource_type, prediction.target_application)

    # ------------------------------------------------------------------ events
    def events(self, *names: str, maxsize: int = 0) -> EventStream:
        """An async iterator of (name, payload) for the given events (all of them when
        none is named): ``async for name, allocation in pre.events("resource:expired")``.
        Call it from the loop; ``aclose()`` (or ``async with``) removes the listeners."""
        self._check_open()
        stream = EventStream(self.allocator, names, maxsize)
        self._streams.add(stream)
        return stream

    # ------------------------------------------------------------------ the end
    async def aclose(self) -> None:
        """Ends the event streams, stops the readiness reader, shuts the executor down
        (waiting for what it runs, off the loop) and closes the allocator if owned."""
        self.disconnect()
        for stream in list(self._streams):
            stream.close()
        with _readers_lock:
            reader = _readers.get(self.allocator)
            if reader is not None and reader.loop is asyncio.get_running_loop():
                reader.close()
                _readers.pop(self.allocator, None)
        with self._executor_lock:
            executor, self._executor = self._executor, None
        loop = asyncio.get_running_loop()
        if executor is not None:
            # what it runs (a release, an at-need allocation) finishes before the close
            await loop.run_in_executor(None, executor.shutdown)
        if self._own and not self.allocator.closed:
            await loop.run_in_executor(None, self.allocator.close)

    async def __aenter__(self) -> AsyncPreallocator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # the synchronous figures, for convenience
    def get_statistics(self) -> Any:
        return self.allocator.get_statistics()

    def get_allocation(self, allocation_id: int) -> ResourceAllocation | None:
        return self.allocator.get_allocation(allocation_id)


class _LearnOnly:
    """What the allocator is given as its predictor when a face takes the predictions:
    update_model only (without ``on`` the allocator subscribes to nothing)."""

    __slots__ = ("update_model",)

    def __init__(self, update_model: Any) -> None:
        self.update_model = update_model


def _release_abandoned(job: concurrent.futures.Future[Claim]) -> None:
    """The executor's thread, after a cancelled acquire's at-need allocation finished."""
    if job.cancelled() or job.exception() is not None:
        return
    try:
        job.result().release(_CANCELLED_FEEDBACK)
    except Exception:
        log.exception("releasing the allocation of a cancelled acquire failed")


__all__ = ["AllocationError", "AsyncPreallocator", "EventStream"]
