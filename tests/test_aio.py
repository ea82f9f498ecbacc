"""prealloc.aio: the asyncio face. Plain asyncio.run, no plugin. Where work runs is
checked by the thread that ran the strategy; memory by VmRSS; waits end on the
readiness eventfd (a test that hung would fail on asyncio.wait_for's timeout)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from prealloc import (
    AllocationFeedback,
    AllocationStatus,
    MemoryAllocationStrategy,
    Prediction,
    ReactiveResourceAllocator,
    ResourcePreallocator,
    ResourceRequest,
    ResourceType,
)
import prealloc.aio
from prealloc.aio import AsyncPreallocator
from engine_util import ExplodingStrategy, GatedStrategy, rules
from osutil import vm_rss

MiB = 1 << 20
MEM, CUSTOM = ResourceType.MEMORY, ResourceType.CUSTOM
LIMIT = 20.0  # a wait that never ends fails the test instead of hanging it


class ThreadNotingMemory(MemoryAllocationStrategy):
    """The real MEMORY strategy, noting which thread ran each allocate."""

    def __init__(self) -> None:
        super().__init__(populate=True)
        self.threads: list[int] = []

    def allocate(self, request, amount, availability):
        self.threads.append(threading.get_ident())
        return super().allocate(request, amount, availability)


class HeldStrategy(GatedStrategy):
    """GatedStrategy whose allocate blocks until the test opens it (a slow populate)."""

    def __init__(self) -> None:
        super().__init__(capacity=1e9)
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.threads: list[int] = []

    def allocate(self, request, amount, availability):
        self.threads.append(threading.get_ident())
        self.entered.set()
        assert self.proceed.wait(LIMIT)
        return super().allocate(request, amount, availability)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, LIMIT))


def prediction(app: str | None = None) -> Prediction:
    return Prediction("p1", "t", "go", 0.9, target_application=app)


def test_request_preallocation_runs_on_the_worker_and_the_memory_is_resident():
    memory = ThreadNotingMemory()
    allocator = ResourcePreallocator(allocation_strategies={MEM: memory}, headroom={})

    async def main():
        loop_thread = threading.get_ident()
        async with AsyncPreallocator(allocator) as pre:
            before = vm_rss()
            snap = await pre.request_preallocation(ResourceRequest(MEM, 64))
            assert snap.status is AllocationStatus.ALLOCATED and snap.allocated_amount == 64
            assert memory.threads and loop_thread not in memory.threads  # populated off the loop
            assert vm_rss() - before >= 56 * MiB  # faulted in (populate), seen by the kernel
            claim = await pre.acquire(MEM, 64)
            assert claim.preallocated and claim.allocation_id == snap.allocation_id
            assert len(memoryview(claim.resource)) == 64 * MiB
            assert await pre.release(claim, AllocationFeedback(used_successfully=True))
            assert pre.get_allocation(snap.allocation_id) is None
            stats = pre.get_statistics()
            assert stats.needs == 1 and stats.needs_preallocated == 1
            assert pre._executor is not None  # the release ran on the face's executor
            ready_fd = prealloc.aio._readers[allocator].fd  # the reader's duplicate of the eventfd
        assert allocator.closed  # owned by default
        assert not [t for t in threading.enumerate() if t.name.startswith("prealloc-aio-")]  # executor gone
        assert ready_fd not in asyncio.get_running_loop()._selector.get_map()  # the reader removed
        assert allocator not in prealloc.aio._readers  # and its duplicate of the eventfd closed

    run(main())


def test_acquire_waits_for_a_queued_request_instead_of_missing():
    gate = GatedStrategy(capacity=10)
    translator = rules({"resource_type": "CUSTOM", "need": 5}, app="editor")
    allocator = ResourcePreallocator(translator=translator, allocation_strategies={CUSTOM: gate})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            holder = allocator.request_preallocation(ResourceRequest(CUSTOM, 8))
            ids = await pre.handle_prediction(prediction("editor"))
            assert len(ids) == 1
            need = asyncio.ensure_future(pre.acquire(CUSTOM, 5, target_application="editor"))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not need.done()  # the request waits for room, and so does the need
            assert pre.get_allocation(ids[0]).status is AllocationStatus.PENDING
            assert await pre.release_allocation(holder.allocation_id)  # room: the worker allocates
            claim = await need
            assert claim.preallocated and claim.allocation_id == ids[0]
            assert gate.held == 5
            await pre.release(claim)
            assert gate.held == 0
            assert pre.get_statistics().needs_preallocated == 1

    run(main())


def test_cancelled_acquire_leaves_the_queued_request_queued():
    gate = GatedStrategy(capacity=10)
    translator = rules({"resource_type": "CUSTOM", "need": 5}, app="editor")
    allocator = ResourcePreallocator(translator=translator, allocation_strategies={CUSTOM: gate})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            holder = allocator.request_preallocation(ResourceRequest(CUSTOM, 8))
            [queued] = await pre.handle_prediction(prediction("editor"))
            need = asyncio.ensure_future(pre.acquire(CUSTOM, 5, target_application="editor"))
            for _ in range(20):
                await asyncio.sleep(0)
            need.cancel()
            with pytest.raises(asyncio.CancelledError):
                await need
            assert pre.get_allocation(queued).status is AllocationStatus.PENDING  # documented: stays
            assert allocator.release_allocation(holder.allocation_id)
            assert await pre.wait_ready([queued])
            assert pre.get_allocation(queued).status is AllocationStatus.ALLOCATED
            assert len(allocator) == 1 and gate.held == 5  # nothing else made or held
        assert gate.held == 0  # the close released it

    run(main())


def test_a_miss_allocates_at_need_off_the_loop():
    memory = ThreadNotingMemory()
    allocator = ResourcePreallocator(allocation_strategies={MEM: memory}, headroom={})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            async with pre.acquire(MEM, 16) as claim:
                assert not claim.preallocated
                assert memory.threads[-1] != threading.get_ident()
                assert len(memoryview(claim.resource)) == 16 * MiB
            assert claim.released and len(allocator) == 0
            stats = pre.get_statistics()
            assert stats.needs == 1 and stats.needs_preallocated == 0
            assert allocator.metrics.get("preallocation_miss") == 1

    run(main())


def test_cancelled_acquire_releases_its_at_need_allocation_when_it_is_made():
    slow = HeldStrategy()
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: slow})

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncPreallocator(allocator) as pre:
            need = asyncio.ensure_future(pre.acquire(CUSTOM, 3))
            assert await loop.run_in_executor(None, slow.entered.wait, LIMIT)
            need.cancel()
            with pytest.raises(asyncio.CancelledError):
                await need
            assert slow.threads[0] != threading.get_ident()
            slow.proceed.set()  # the allocation completes after the cancel ...
            released = threading.Event()
            allocator.on("resource:released", lambda snap: released.set())
            assert await loop.run_in_executor(None, released.wait, LIMIT)
            assert slow.held == 0 and len(allocator) == 0  # ... and is given back

    run(main())


def test_cancelled_request_preallocation_withdraws_the_request():
    gate = GatedStrategy(capacity=0)
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: gate})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            task = asyncio.ensure_future(pre.request_preallocation(ResourceRequest(CUSTOM, 1)))
            for _ in range(20):
                await asyncio.sleep(0)
            assert len(allocator) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(allocator) == 0 and pre.get_statistics().cancelled == 1
            with pytest.raises(TimeoutError):
                await pre.request_preallocation(ResourceRequest(CUSTOM, 1), timeout=0.05)
            assert len(allocator) == 0

    run(main())


def test_request_preallocation_reports_a_failure_with_its_reason():
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: ExplodingStrategy(CUSTOM)})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            snap = await pre.request_preallocation(ResourceRequest(CUSTOM, 14))
            assert snap.status is AllocationStatus.FAILED and "refused on purpose" in snap.failure_reason
            ok = await pre.request_preallocation(ResourceRequest(CUSTOM, 2))
            assert ok.status is AllocationStatus.ALLOCATED

    run(main())


def test_event_stream_delivers_events_from_the_worker_in_order():
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: GatedStrategy(100)})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            stream = pre.events("allocated", "resource:released")  # an alias is accepted
            a = await pre.request_preallocation(ResourceRequest(CUSTOM, 1))
            await pre.release_allocation(a.allocation_id)
            seen = [await stream.__anext__(), await stream.__anext__()]
            assert [name for name, _ in seen] == ["resource:allocated", "resource:released"]
            assert all(snap.allocation_id == a.allocation_id for _, snap in seen)
            await stream.aclose()
            assert not allocator.events.has_listeners("resource:allocated")  # listeners removed
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()

    run(main())


def test_handle_prediction_with_wait_and_the_reactive_allocator():
    translator = rules({"resource_type": "CUSTOM", "need": 2})

    async def main():
        async with AsyncPreallocator(ResourcePreallocator(
                translator=translator, allocation_strategies={CUSTOM: GatedStrategy(100)})) as pre:
            ids = await pre.handle_prediction(prediction(), wait=True)
            assert pre.get_allocation(ids[0]).status is AllocationStatus.ALLOCATED
        reactive = ReactiveResourceAllocator(allocation_strategies={CUSTOM: GatedStrategy(100)})
        async with AsyncPreallocator(reactive) as face:
            assert await face.handle_prediction(prediction()) == []
            snap = await face.request_preallocation(ResourceRequest(CUSTOM, 1))  # on the executor
            assert snap.status is AllocationStatus.ALLOCATED
            claim = await face.acquire(CUSTOM, 1)
            assert claim.preallocated
            await face.release(claim)

    run(main())


def test_bad_input_is_refused_at_the_call():
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: GatedStrategy(100)})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            with pytest.raises(ValueError):
                pre.acquire("NOT_A_TYPE", 1)
            with pytest.raises(ValueError):
                pre.acquire(CUSTOM, -1)
            with pytest.raises(TypeError):
                await pre.release_allocation("x")
            with pytest.raises(TypeError):
                await pre.request_preallocation("x")
            with pytest.raises(ValueError):
                pre.events("nope")
            assert len(allocator) == 0
    with pytest.raises(TypeError):
        AsyncPreallocator(object())
    run(main())


def test_a_bounded_event_stream_drops_the_oldest_and_counts_them():
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: GatedStrategy(100)})

    async def main():
        async with AsyncPreallocator(allocator) as pre:
            async with pre.events("resource:allocated", maxsize=2) as stream:
                made = [allocator.request_preallocation(ResourceRequest(CUSTOM, 1)) for _ in range(5)]
                for _ in range(5):
                    await asyncio.sleep(0)  # the call_soon_threadsafe deliveries run
                assert stream.dropped == 3
                got = [await stream.__anext__(), await stream.__anext__()]
                assert [snap.allocation_id for _, snap in got] == [m.allocation_id for m in made[3:]]
            with pytest.raises(ValueError):
                pre.events(maxsize=-1)

    run(main())


def test_a_connected_predictor_queues_through_the_face_and_still_learns():
    from prealloc.predict import MarkovPredictor

    from engine_util import wait_until

    model = MarkovPredictor(min_confidence=0.5)
    for _ in range(4):
        model.observe("browser", CUSTOM, 4)
        model.observe("editor", CUSTOM, 6)
    model.horizon = 0.0  # what training predicted (no allocator yet) lapses at the next observe
    gate = GatedStrategy(capacity=10)
    allocator = ResourcePreallocator(translator=model.translator(types=[CUSTOM], duration=60),
                                     predictor=model, allocation_strategies={CUSTOM: gate})

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncPreallocator(allocator) as pre:
            pre.connect(model)
            assert not isinstance(allocator.config.predictor, MarkovPredictor)  # the face queues now
            holder = allocator.request_preallocation(ResourceRequest(CUSTOM, 8))
            model.observe("browser", CUSTOM, 4)  # predicts editor's 6: queued, waiting for room
            assert len(allocator) == 2
            need = asyncio.ensure_future(pre.acquire(CUSTOM, 6, target_application="editor"))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not need.done()  # it waits for the predicted request instead of missing
            allocator.release_allocation(holder.allocation_id)
            claim = await need
            assert claim.preallocated and gate.held == 6
            await pre.release(claim)
            # the allocator told the model how its prediction's request ended
            await loop.run_in_executor(None, wait_until, lambda: model.outcomes["released"] == 1)
            pre.disconnect()
            assert allocator.config.predictor is None

    run(main())


def test_cancel_while_the_worker_is_allocating_gives_the_resource_back():
    from engine_util import wait_until

    slow = HeldStrategy()
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: slow})

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncPreallocator(allocator) as pre:
            task = asyncio.ensure_future(pre.request_preallocation(ResourceRequest(CUSTOM, 3)))
            assert await loop.run_in_executor(None, slow.entered.wait, LIMIT)  # the worker is inside allocate
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            slow.proceed.set()  # the allocation completes for a request that was withdrawn ...
            await loop.run_in_executor(None, wait_until, lambda: slow.released)
            assert slow.held == 0 and len(allocator) == 0  # ... and the strategy gave it back
            assert slow.threads[0] != threading.get_ident()

    run(main())


def test_closing_the_allocator_under_a_waiting_coroutine_ends_the_wait():
    gate = GatedStrategy(capacity=0)
    allocator = ResourcePreallocator(allocation_strategies={CUSTOM: gate})

    async def main():
        loop = asyncio.get_running_loop()
        pre = AsyncPreallocator(allocator)
        rid = allocator.submit(ResourceRequest(CUSTOM, 1))
        waiting = asyncio.ensure_future(pre.wait_ready([rid]))
        for _ in range(5):
            await asyncio.sleep(0)
        await loop.run_in_executor(None, allocator.close)  # not through the face
        # the close withdrew the request: the wait ends (True: it left PENDING) or says closed
        try:
            assert await asyncio.wait_for(waiting, LIMIT) is True
        except RuntimeError as exc:
            assert "closed" in str(exc)
        await pre.aclose()
        registered = set(loop._selector.get_map())
        assert registered == {loop._ssock.fileno()}  # only the loop's own wake-up socket

    run(main())
