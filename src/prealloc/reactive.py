"""The baseline: an allocator that does nothing ahead of time.

``ReactiveResourceAllocator`` allocates only when the consumer asks (``acquire``), with
the same strategies, quotas, statistics and claims as the preallocator, so both can run
the same workload and be compared: the difference is the latency from the moment of
need to a usable resource, and the waste the preallocator pays for it.
"""
from __future__ import annotations

from .engine import Claim, ResourceAllocator, _check_application, _check_target_pid
from .types import Prediction, ResourceType, check_amount


class ReactiveResourceAllocator(ResourceAllocator):
    DEFAULT_NAME = "ReactiveResourceAllocator"

    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """Predictions change nothing here: that is the point of the baseline. The
        prediction is still validated, so both allocators reject the same bad input."""
        self._check_open()
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        prediction.validate()
        return []

    def acquire(self, resource_type: ResourceType | str, amount: float, *,
                target_application: str | None = None, target_process_id: int | None = None) -> Claim:
        """Allocates now and hands over at once (an allocation made earlier with
        request_preallocation and still unclaimed is taken first, as the preallocator
        would)."""
        self._check_open()
        rtype = ResourceType.parse(resource_type)
        amount = check_amount("amount", amount)
        application = _check_application(target_application)
        pid = _check_target_pid(target_process_id)
        claim = self._claim_ready(rtype, application, amount, pid)
        if claim is not None:
            return claim
        return self._acquire_at_need(rtype, amount, application, pid)
