"""The baseline: an allocator that does nothing ahead of time.

``ReactiveResourceAllocator`` allocates only when the consumer asks (``acquire``), with
the same strategies, quotas, statistics and claims as the preallocator, so both can run
the same workload and be compared: the difference is the latency from the moment of
need to a usable resource, and the waste the preallocator pays for it.
"""
from __future__ import annotations

from .engine import ResourceAllocator
from .types import Prediction


class ReactiveResourceAllocator(ResourceAllocator):
    """Allocates at need only: acquire() allocates on the caller's thread and hands over
    at once (an allocation made earlier with request_preallocation and still unclaimed is
    taken first, as the preallocator would)."""

    DEFAULT_NAME = "ReactiveResourceAllocator"

    def handle_prediction(self, prediction: Prediction) -> list[int]:
        """Predictions change nothing here: that is the point of the baseline. The
        prediction is still validated, so both allocators reject the same bad input."""
        self._check_open()
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        prediction.validate()
        return []
