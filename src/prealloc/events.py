"""Events: the emitter Protocol the allocators call, the event names, and a small
thread-safe ``EventEmitter``.

The names are the spec's, and they are canonical: ``resource:allocated``,
``resource:released``, ``resource:expired``, ``resource:failed`` (each with the
ResourceAllocation) and ``preallocator:reset`` (with ``{"preallocator_id": id}``). The
short names of earlier releases (``allocated``, ``released``, ``expired``, ``failed``,
``reset``) are aliases: ``on``/``off``/``emit`` of the EventEmitter, and the allocators'
``on``/``off``, translate them, so a listener added under either name hears the event.

Any object with ``on``, ``off`` and ``emit`` (the ``EventEmitterProtocol``) can be the
allocator's emitter (``PreallocatorConfig(event_emitter=...)``); the allocator calls only
those three, always with the canonical name. With the EventEmitter below, the allocator
skips building an event's payload when no one listens.

Listeners run on the thread that emits (the caller's, or the engine's worker). A
listener that raises is logged and skipped; it never stops the emitter or the worker.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Listener = Callable[..., Any]

ALLOCATED = "resource:allocated"
RELEASED = "resource:released"
EXPIRED = "resource:expired"
FAILED = "resource:failed"
RESET = "preallocator:reset"
EVENT_NAMES = (ALLOCATED, RELEASED, EXPIRED, FAILED, RESET)
ALIASES = {"allocated": ALLOCATED, "released": RELEASED, "expired": EXPIRED, "failed": FAILED, "reset": RESET}


def canonical_event(name: str) -> str:
    """The canonical name of an event (its own, or an alias's); ValueError otherwise."""
    if name in ALIASES:
        return ALIASES[name]
    if name in EVENT_NAMES:
        return name
    raise ValueError(f"unknown event {name!r}; events are {EVENT_NAMES} (aliases {tuple(ALIASES)})")


@runtime_checkable
class EventEmitterProtocol(Protocol):
    def on(self, event: str, listener: Listener) -> Any: ...

    def off(self, event: str, listener: Listener) -> Any: ...

    def emit(self, event: str, *args: Any) -> Any: ...


class EventEmitter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # copy-on-write tuples: emit reads without taking the lock. The dict itself lives
        # as long as the emitter (the engine's compiled core reads it directly).
        self._listeners: dict[str, tuple[Listener, ...]] = {}

    def on(self, event: str, listener: Listener) -> Listener:
        """Adds listener for event; returns it, so ``on`` works as a decorator too."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, not {type(listener).__name__}")
        if not isinstance(event, str):
            raise TypeError(f"event must be a str, not {type(event).__name__}")
        event = ALIASES.get(event, event)
        with self._lock:
            self._listeners[event] = self._listeners.get(event, ()) + (listener,)
        return listener

    def off(self, event: str, listener: Listener) -> bool:
        """Removes one registration of listener; False if it was not registered."""
        event = ALIASES.get(event, event)
        with self._lock:
            current = self._listeners.get(event, ())
            if listener not in current:
                return False
            index = current.index(listener)
            self._listeners[event] = current[:index] + current[index + 1:]
            return True

    def has_listeners(self, event: str) -> bool:
        return bool(self._listeners.get(ALIASES.get(event, event)))

    def emit(self, event: str, *args: Any) -> int:
        """Calls every listener of event; returns how many ran without raising."""
        ok = 0
        for listener in self._listeners.get(ALIASES.get(event, event), ()):
            try:
                listener(*args)
                ok += 1
            except Exception:
                log.exception("listener %r for %r raised", listener, event)
        return ok
