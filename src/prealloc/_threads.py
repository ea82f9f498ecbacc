"""Threads the library starts never take the process's signals.

The kernel hands a process-directed signal (``kill``, Ctrl-C, systemd's SIGTERM) to any
thread that does not block it, usually the main one. When it lands on another thread,
CPython's C handler runs there and marks the signal tripped, but it only tells the
evaluation loop when the receiving thread is the main one (``_Py_ThreadCanHandleSignals``
is checked on the receiving thread): the Python-level handler then waits until something
else wakes the main thread. Seen here: ``prealloc serve`` blocked in ``select()`` never
drained at SIGTERM, and ``prealloc status --watch`` never ended at SIGINT, whenever the
signal went to an OpenBLAS pool thread (numpy starts one per core at import) or to a peer
thread. So every thread the library makes starts with the asynchronous signals blocked
(the native ticker does the same around ``pthread_create``; executors' threads are born
inside ``submit``, which runs with them blocked), and numpy's pool is created inside such a
window at ``import prealloc``. The main thread's mask is restored at once each time.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

# Signals the kernel raises on the faulting thread itself: blocking them would turn a
# crash into a hang (or be ignored), so they are never blocked.
_SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}

ASYNC_SIGNALS = frozenset(set(signal.valid_signals()) - _SYNCHRONOUS - {signal.SIGKILL, signal.SIGSTOP})


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Blocks the asynchronous signals on this thread for the block: threads created
    inside (by Python or by native code) inherit the mask; this thread's mask is
    restored on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_quiet(thread: threading.Thread) -> threading.Thread:
    """Starts thread with the asynchronous signals blocked on it, for its whole life."""
    with signals_blocked():
        thread.start()
    return thread


class QuietThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor whose threads block the asynchronous signals: it starts them
    inside submit(), so each submit runs with the signals blocked on the caller's thread
    (restored before it returns) and a thread it starts inherits that mask."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        with signals_blocked():
            return super().submit(fn, *args, **kwargs)


def import_numpy_quietly() -> None:
    """Imports numpy with the signals blocked, so the BLAS pool threads it starts never
    take one. Nothing to do where numpy is imported already (its pool is the host's)."""
    if "numpy" in sys.modules:
        return
    with signals_blocked():
        import numpy  # noqa: F401  (its side effect: the pool threads, signals blocked)


__all__ = ["ASYNC_SIGNALS", "QuietThreadPoolExecutor", "import_numpy_quietly", "signals_blocked", "start_quiet"]
