"""A small thread-safe event emitter: ``on`` / ``off`` / ``emit``.

Listeners run on the thread that emits (the caller's, or the engine's worker). A
listener that raises is logged and skipped; it never stops the emitter or the worker.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

Listener = Callable[..., Any]


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
        with self._lock:
            self._listeners[event] = self._listeners.get(event, ()) + (listener,)
        return listener

    def off(self, event: str, listener: Listener) -> bool:
        """Removes one registration of listener; False if it was not registered."""
        with self._lock:
            current = self._listeners.get(event, ())
            if listener not in current:
                return False
            index = current.index(listener)
            self._listeners[event] = current[:index] + current[index + 1:]
            return True

    def has_listeners(self, event: str) -> bool:
        return bool(self._listeners.get(event))

    def emit(self, event: str, *args: Any) -> int:
        """Calls every listener of event; returns how many ran without raising."""
        ok = 0
        for listener in self._listeners.get(event, ()):
            try:
                listener(*args)
                ok += 1
            except Exception:
                log.exception("listener %r for %r raised", listener, event)
        return ok
