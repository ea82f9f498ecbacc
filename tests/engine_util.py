"""Helpers for the engine tests."""
from __future__ import annotations

import time
from typing import Any, Callable

from prealloc import (
    AllocationError,
    AllocationStrategy,
    Grant,
    InsufficientResources,
    NullAllocationStrategy,
    ResourceType,
    RuleTranslator,
)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls predicate (the test's side, not the library's) until it is truthy."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached in {timeout} s: {predicate}")
        time.sleep(0.002)


def rules(*requests: dict, name: str = "r", value: str = "go", app: str | None = None) -> RuleTranslator:
    match: dict[str, Any] = {"type": "t", "value": value}
    if app is not None:
        match["target_application"] = app
    return RuleTranslator.from_dict({"rule": [{"name": name, "match": match, "request": list(requests)}]})


class GatedStrategy(AllocationStrategy):
    """CUSTOM strategy whose capacity the test controls: allocations beyond it raise
    InsufficientResources, so requests must wait."""

    resource_type = ResourceType.CUSTOM

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.held = 0.0
        self.released: list[Any] = []

    def allocate(self, request, amount, availability):
        if self.held + amount > self.capacity:
            raise InsufficientResources(f"custom: {self.held}+{amount} > {self.capacity}")
        self.held += amount
        return Grant(amount, ["held", amount])

    def release(self, handle):
        self.held -= handle[1]
        handle[0] = "released"
        self.released.append(handle)


class ExplodingStrategy(NullAllocationStrategy):
    """Raises an unexpected error: a strategy bug must not stop the worker."""

    def allocate(self, request, amount, availability):
        if amount == 13:
            raise RuntimeError("boom")
        if amount == 14:
            raise AllocationError("refused on purpose")
        return super().allocate(request, amount, availability)


CAP_IPC_LOCK = 14


def can_lock(nbytes: int) -> bool:
    """Whether this process may lock nbytes more: CAP_IPC_LOCK, or room under
    RLIMIT_MEMLOCK (an ordinary user has 8 MiB). Tests that lock adapt to it: they
    assert VmLck where locking is allowed and the recorded refusal where it is not."""
    import resource

    from osutil import has_capability, vm_lck

    if has_capability(CAP_IPC_LOCK):
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or vm_lck() + nbytes <= soft
