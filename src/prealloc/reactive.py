"""The baseline: an allocator that does nothing ahead of time.

``ReactiveResourceAllocator`` allocates only when the consumer asks (``acquire``), with
the same strategies, quotas, statistics and claims as the preallocator, so both can run
the same workload and be compared: the difference is the latency from the moment of
need to a usable resource, and the waste the preallocator pays for it.
"""
from __future__ import annotations

from typing import Any

from .engine import Claim, PreallocatorConfig, ResourceAllocator, _allocate_and_claim
from .types import Prediction, ResourceType, check_amount


class ReactiveResourceAllocator(ResourceAllocator):
    def __init__(self, config: PreallocatorConfig | None = None, **overrides: Any) -> None:
        overrides.setdefault("name", "ReactiveResourceAllocator")
        super().__init__(config, **overrides)

    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """Predictions change nothing here: that is the point of the baseline. The
        prediction is still validated, so both allocators reject the same bad input."""
        prediction.validate()
        return []

    def acquire(self, resource_type: ResourceType | str, amount: float, *,
                target_application: str | None = None, target_process_id: int | None = None) -> Claim:
        self._check_open()
        return _allocate_and_claim(self, ResourceType.parse(resource_type), check_amount("amount", amount),
                                   target_application, target_process_id)

