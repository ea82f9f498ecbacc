"""Custom resource strategies as plugins.

A strategy for a resource type prealloc does not cover itself (or a replacement for one
it does) is registered in code with ``register_strategy``, or published by an installed
package under the entry-point group ``prealloc.strategies``:

    [project.entry-points."prealloc.strategies"]
    CUSTOM = "mypackage.fpga:FpgaSlotStrategy"

(the name is a ResourceType name; the object is a factory — usually the class — called
with no arguments). ``CustomResourceAllocator`` builds its strategies from these.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .strategies import AllocationStrategy
from .types import ResourceType

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "prealloc.strategies"
StrategyFactory = Callable[[], AllocationStrategy]

_lock = threading.Lock()
_registered: dict[ResourceType, StrategyFactory] = {}


def register_strategy(resource_type: ResourceType | str, factory: StrategyFactory) -> None:
    """Registers factory as the strategy of resource_type for allocators created later."""
    rtype = ResourceType.parse(resource_type)
    if not callable(factory):
        raise TypeError(f"factory must be callable, not {type(factory).__name__}")
    with _lock:
        _registered[rtype] = factory


def unregister_strategy(resource_type: ResourceType | str) -> bool:
    with _lock:
        return _registered.pop(ResourceType.parse(resource_type), None) is not None


def discover(group: str = ENTRY_POINT_GROUP) -> dict[ResourceType, StrategyFactory]:
    """The strategy factories installed packages publish. A broken entry point is logged
    and skipped: one bad plugin never stops the allocator."""
    # imported here, not at module level: importlib.metadata costs a large share of
    # `import prealloc` and only allocators that look for plugins need it
    from importlib.metadata import entry_points

    found: dict[ResourceType, StrategyFactory] = {}
    for entry in entry_points(group=group):
        try:
            found[ResourceType.parse(entry.name)] = entry.load()
        except Exception:
            log.exception("plugin %s = %s could not be loaded", entry.name, entry.value)
    return found


def load_strategies(group: str = ENTRY_POINT_GROUP) -> dict[ResourceType, AllocationStrategy]:
    """Instantiates every discovered and registered strategy (registered ones win)."""
    with _lock:
        factories = {**discover(group), **_registered}
    strategies: dict[ResourceType, AllocationStrategy] = {}
    for rtype, factory in factories.items():
        strategy = factory()
        if not isinstance(strategy, AllocationStrategy):
            raise TypeError(f"the {rtype.name} plugin made a {type(strategy).__name__}, "
                            "not an AllocationStrategy")
        strategies[rtype] = strategy
    return strategies
