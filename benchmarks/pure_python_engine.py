"""The baseline for the engine benchmarks: the preallocator a Python developer would
write without prealloc's core — the spec's ResourcePreallocator in plain Python, with a
dict and a threading.Lock for the allocations and the same validation, quota check,
statistics and events as prealloc's engine. Expiry comes in three flavours a Python
developer would reach for:

  heapq   a heap of (deadline, id) with lazy cancellation and one timer thread waiting
          on a Condition (the strongest of the three)
  sched   sched.scheduler events (cancel is a list removal) run by one timer thread
          waiting on a Condition
  timer   one threading.Timer per allocation (the spec's setTimeout, translated)

Predictions go through a heapq priority queue and a worker thread on a Condition. It keeps
the same public calls (request_preallocation, release_allocation, submit), so the
benchmarks time the same work.
"""
from __future__ import annotations

import heapq
import itertools
import sched
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    EventEmitter,
    ResourceAllocation,
    ResourceRequest,
    ResourceType,
)


@dataclass
class _Allocation:
    allocation: ResourceAllocation
    handle: Any
    deadline: float | None
    application: str | None


@dataclass
class _Stats:
    total: int = 0
    successful: int = 0
    failed: int = 0
    allocation_seconds: float = 0.0
    finished: int = 0
    hits: int = 0
    amount_seconds: float = 0.0
    unused_amount_seconds: float = 0.0
    by_type: dict = field(default_factory=dict)


class PurePythonPreallocator:
    def __init__(self, strategies: dict[ResourceType, Any], quotas: dict[ResourceType, float] | None = None,
                 timers: str = "heapq"):
        if timers not in ("heapq", "sched", "timer"):
            raise ValueError(timers)
        self.timer_kind = timers
        self.scheduler = sched.scheduler(time.monotonic)
        self.timer_handles: dict[int, Any] = {}
        self.queue: list[tuple] = []
        self.queue_seq = itertools.count()
        self.strategies = strategies
        self.quotas = quotas or {}
        self.held: dict[ResourceType, float] = {}
        self.allocations: dict[int, _Allocation] = {}
        self.lock = threading.Lock()
        self.events = EventEmitter()
        self.stats = _Stats()
        self.ids = itertools.count(1)
        self.timers: list[tuple[float, int]] = []
        self.timer_cv = threading.Condition(self.lock)
        self.closed = False
        self.timer_thread = threading.Thread(target=self._expire_loop, daemon=True)
        self.timer_thread.start()
        self.work_cv = threading.Condition(threading.Lock())
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def request_preallocation(self, request: ResourceRequest) -> ResourceAllocation:
        request.validate()
        started = time.monotonic()
        strategy = self.strategies.get(request.resource_type)
        amount = request.predicted_need
        with self.lock:
            self.stats.total += 1
            allocation_id = next(self.ids)
            limit = self.quotas.get(request.resource_type)
            if strategy is None or (limit is not None and self.held.get(request.resource_type, 0) + amount > limit):
                self.stats.failed += 1
                return ResourceAllocation(allocation_id, request.request_id, request.resource_type, amount, 0,
                                          AllocationStatus.FAILED, None, failure_reason="refused")
            self.held[request.resource_type] = self.held.get(request.resource_type, 0) + amount
        grant = strategy.allocate(request, amount, None)
        now = time.monotonic()
        deadline = now + request.duration if request.duration is not None else None
        allocation = ResourceAllocation(allocation_id, request.request_id, request.resource_type, amount,
                                        grant.amount, AllocationStatus.ALLOCATED, now, deadline)
        with self.lock:
            self.allocations[allocation_id] = _Allocation(allocation, grant.handle, deadline,
                                                          request.metadata.target_application)
            if deadline is not None:
                self._schedule(allocation_id, deadline)
            self.stats.successful += 1
            self.stats.allocation_seconds += now - started
            self.stats.by_type[request.resource_type] = self.stats.by_type.get(request.resource_type, 0) + 1
        self.events.emit("allocated", allocation)
        return allocation

    def release_allocation(self, allocation_id: int, feedback: AllocationFeedback | None = None) -> bool:
        return self._finish(allocation_id, AllocationStatus.RELEASED, feedback)

    def _finish(self, allocation_id: int, status: AllocationStatus, feedback: AllocationFeedback | None) -> bool:
        with self.lock:
            entry = self.allocations.pop(allocation_id, None)
            if entry is None:
                return False
            self._cancel(allocation_id)
            a = entry.allocation
            self.held[a.resource_type] -= a.requested_amount
        self.strategies[a.resource_type].release(entry.handle)
        now = time.monotonic()
        held = a.allocated_amount * (now - a.allocated_at)
        used = feedback is not None and feedback.used_successfully
        with self.lock:
            self.stats.finished += 1
            self.stats.hits += used
            self.stats.amount_seconds += held
            self.stats.unused_amount_seconds += 0 if used else held
        a.status = status
        self.events.emit("released" if status is AllocationStatus.RELEASED else "expired", a)
        return True

    # ---- expiry, three ways (called with self.lock held)
    def _schedule(self, allocation_id: int, deadline: float) -> None:
        if self.timer_kind == "heapq":
            heapq.heappush(self.timers, (deadline, allocation_id))
            if self.timers[0][1] == allocation_id:
                self.timer_cv.notify()
        elif self.timer_kind == "sched":
            self.timer_handles[allocation_id] = self.scheduler.enterabs(deadline, 0, self._expire_one,
                                                                        (allocation_id,))
            self.timer_cv.notify()
        else:
            timer = threading.Timer(deadline - time.monotonic(), self._expire_one, (allocation_id,))
            timer.daemon = True
            self.timer_handles[allocation_id] = timer
            timer.start()

    def _cancel(self, allocation_id: int) -> None:
        if self.timer_kind == "heapq":
            return  # lazy: the timer thread skips ids no longer in the dict
        handle = self.timer_handles.pop(allocation_id, None)
        if handle is None:
            return
        if self.timer_kind == "sched":
            try:
                self.scheduler.cancel(handle)
            except ValueError:
                pass
        else:
            handle.cancel()

    def _expire_one(self, allocation_id: int) -> None:
        if self.timer_kind == "sched":  # runs on the timer thread, lock held
            self.timer_handles.pop(allocation_id, None)
            self.lock.release()
            try:
                self._finish(allocation_id, AllocationStatus.EXPIRED, None)
            finally:
                self.lock.acquire()
        else:
            self._finish(allocation_id, AllocationStatus.EXPIRED, None)

    def _expire_loop(self) -> None:
        if self.timer_kind == "timer":
            return
        with self.lock:
            while not self.closed:
                if self.timer_kind == "sched":
                    delay = self.scheduler.run(blocking=False)
                    self.timer_cv.wait(delay)
                    continue
                if not self.timers:
                    self.timer_cv.wait()
                    continue
                deadline, allocation_id = self.timers[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self.timer_cv.wait(delay)
                    continue
                heapq.heappop(self.timers)
                if allocation_id in self.allocations:
                    self.lock.release()
                    try:
                        self._finish(allocation_id, AllocationStatus.EXPIRED, None)
                    finally:
                        self.lock.acquire()

    # ---- predictions: a heapq priority queue and a worker on a Condition
    def submit(self, request: ResourceRequest) -> None:
        request.validate()
        with self.work_cv:
            heapq.heappush(self.queue, (-request.priority, -request.confidence, next(self.queue_seq), request))
            self.work_cv.notify()

    def _work(self) -> None:
        while True:
            with self.work_cv:
                while not self.queue and not self.closed:
                    self.work_cv.wait()
                if self.closed:
                    return
                request = heapq.heappop(self.queue)[-1]
            self.request_preallocation(request)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.timer_cv.notify()
        with self.work_cv:
            self.work_cv.notify()
        self.timer_thread.join()
        self.worker.join()
        with self.lock:
            for handle in self.timer_handles.values():
                if self.timer_kind == "timer":
                    handle.cancel()
