"""prealloc: reserve real machine resources before a predicted need arrives.

    from prealloc import ResourcePreallocator, Prediction, RuleTranslator

    rules = RuleTranslator.from_toml("rules.toml")
    with ResourcePreallocator(translator=rules) as pre:
        pre.handle_prediction(Prediction("p1", "user_action", "open_editor", 0.9,
                                         target_application="editor"))
        ...
        with pre.acquire("MEMORY", 512, target_application="editor") as claim:
            buffer = memoryview(claim.resource)   # mapped, faulted in, ready

The low-level native core is ``prealloc.core``.
"""
from ._paths import get_include, get_library_dir
from ._threads import import_numpy_quietly

import_numpy_quietly()  # before the native core imports it: its BLAS threads take no signal
from .engine import (
    Claim,
    CpuSchedulerEnhancer,
    CustomResourceAllocator,
    DiskIOOptimizer,
    MemoryPreallocator,
    NetworkBandwidthManager,
    PreallocatorConfig,
    ResourceAllocator,
    ResourcePreallocator,
)
from .plugins import register_strategy, unregister_strategy
from .events import EventEmitter, EventEmitterProtocol
from .metrics import MetricsCollector
from .monitors import ResourceMonitor, SystemResourceMonitor
from .quotas import QuotaExceeded, Quotas
from .reactive import ReactiveResourceAllocator
from .strategies import (
    CacheSpaceStrategy,
    DiskStrategy,
    GpuMemoryStrategy,
    NetworkBandwidthStrategy,
    AllocationError,
    AllocationStrategy,
    CpuAllocationStrategy,
    Grant,
    InsufficientResources,
    MemoryAllocationStrategy,
    NullAllocationStrategy,
)
from .translate import HOST_WARM_MIN_NEED, AdaptiveSizer, Rule, RuleTranslator, Translator
from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    PredictionOutcome,
    PredictionType,
    Predictor,
    PreallocatorStatistics,
    RequestMetadata,
    ResourceAllocation,
    ResourceAvailability,
    ResourceRequest,
    ResourceType,
    SubscriptionHandle,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveSizer", "AllocationError", "AllocationFeedback", "AllocationStatus", "AllocationStrategy",
    "Claim", "CpuAllocationStrategy", "CpuSchedulerEnhancer", "CustomResourceAllocator", "DiskIOOptimizer", "MemoryPreallocator", "NetworkBandwidthManager",
    "register_strategy", "unregister_strategy", "EventEmitter", "EventEmitterProtocol", "Grant", "InsufficientResources", "MemoryAllocationStrategy",
    "MetricsCollector", "NullAllocationStrategy", "PreallocatorConfig", "PreallocatorStatistics", "Prediction",
    "PredictionOutcome", "PredictionType", "Predictor",
    "QuotaExceeded", "Quotas", "ReactiveResourceAllocator", "RequestMetadata", "ResourceAllocation",
    "ResourceAllocator", "ResourceAvailability", "ResourceMonitor", "ResourcePreallocator",
    "ResourceRequest", "ResourceType", "Rule", "RuleTranslator", "SubscriptionHandle",
    "SystemResourceMonitor", "Translator", "get_include", "get_library_dir", "__version__",
    "CacheSpaceStrategy", "DiskStrategy", "GpuMemoryStrategy", "NetworkBandwidthStrategy", "HOST_WARM_MIN_NEED",
    "AsyncPreallocator", "MarkovPredictor",
]

# The asyncio face and the built-in predictor load on first use: `import prealloc` stays
# cheap for hosts that need neither (prealloc.prometheus is imported by name only: its
# package is an optional extra).
_LAZY = {"AsyncPreallocator": ("aio", "AsyncPreallocator"), "MarkovPredictor": ("predict", "MarkovPredictor")}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prealloc' has no attribute {name!r}")
