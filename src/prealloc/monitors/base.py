"""The monitor contract (the spec's IResourceMonitor) and its subscription machinery.

A :class:`ResourceMonitor` answers "how much of this resource is there, and how much
is free" synchronously (reading /proc or calling psutil takes microseconds, so the
spec's promise buys nothing), and tells subscribers when the answer changes.

Change delivery. One background watcher thread per monitor, started by the first
subscription and stopped by the last unsubscribe or by close. It sleeps in one
``select.poll`` on

- the kernel event sources the subclass offers for the subscribed types (PSI
  triggers in :mod:`.pressure`: POLLPRI when stall time crosses a threshold);
- a wake-up pipe, written by :meth:`ResourceMonitor.notify_changed` (the engine's own
  allocations and releases change availability, and it says so instead of waiting
  for the next sample) and by stop;
- a timeout of ``sample_interval`` (1 s by default): the kernel has no event for
  "free memory moved by 1 %", so periodic sampling is the fallback that catches
  what no event reports, and the only path where no event source exists.

A timed sample calls back only when ``available`` moved by more than
``change_threshold x total`` (or ``total`` itself changed) since the last
availability delivered for that type, so slow drift is reported once it adds up and
noise is not. A notification or a kernel event calls back unconditionally: someone
said something happened, and the availability carries the current pressure.

Subscribers get no initial callback; they can call ``get_resource_availability``.
Callbacks run on the watcher thread, one at a time, and should be quick; one that
raises is logged and the others still run.

Cached availability. A fresh sample costs what the subclass's ``_sample`` costs (the
system monitor's MEMORY: psutil's /proc/meminfo parse plus the cgroup files, hundreds
of microseconds), too much for a check made at every need. Every sample taken — by the
watcher (baseline, timed, forced by an event or a notification) or by a caller — is
kept with the instant it was started, and :meth:`ResourceMonitor.cached_availability`
answers from it while it is young enough (see there for how stale that can be).
"""
from __future__ import annotations

import abc
import errno
import itertools
import logging
import math
import os
import select
import threading
import time
from types import TracebackType
from typing import Callable, Protocol, TypeVar

from .._threads import start_quiet
from ..types import ResourceAvailability, ResourceType, SubscriptionHandle

log = logging.getLogger(__name__)

AvailabilityCallback = Callable[[ResourceAvailability], None]

MonitorT = TypeVar("MonitorT", bound="ResourceMonitor")

_ERROR_EVENTS = select.POLLERR | select.POLLHUP | select.POLLNVAL


class EventSource(Protocol):
    """A descriptor the kernel makes POLLPRI-ready when something changed."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


# one counter for every monitor: a handle from one monitor never names a
# subscription of another
_subscription_ids = itertools.count(1)


class ResourceMonitor(abc.ABC):
    """Availability of some resource types, read on demand and pushed on change.

    Subclasses implement :attr:`supported_types` and :meth:`_sample`; they may offer
    kernel event sources through :meth:`_event_source_name` and
    :meth:`_open_event_source`, and release their own resources in
    :meth:`_close_resources`.
    """

    def __init__(self, *, sample_interval: float = 1.0, change_threshold: float = 0.01) -> None:
        if isinstance(sample_interval, bool) or not isinstance(sample_interval, (int, float)) \
                or not 0.0 < sample_interval < math.inf:
            raise ValueError(f"sample_interval must be a finite number of seconds > 0, not {sample_interval!r}")
        if isinstance(change_threshold, bool) or not isinstance(change_threshold, (int, float)) \
                or not 0.0 <= change_threshold <= 1.0:
            raise ValueError(f"change_threshold must be a fraction of total in [0, 1], not {change_threshold!r}")
        self.sample_interval = float(sample_interval)
        self.change_threshold = float(change_threshold)
        self._lock = threading.Lock()
        self._subscriptions: dict[int, tuple[SubscriptionHandle, AvailabilityCallback]] = {}
        self._generation = 0  # bumped on every subscribe / unsubscribe; the watcher reconciles
        self._watcher: _Watcher | None = None
        self._closed = False
        self._event_source_status: dict[str, str] = {}
        # the types the watcher samples (a frozenset replaced whole under _lock, read
        # without it: cached_availability's fast path takes no lock)
        self._watched_types: frozenset[ResourceType] = frozenset()
        # type -> (monotonic instant the sample was started, the sample); replaced whole
        # under _cache_lock, read without it (a dict lookup is atomic)
        self._latest: dict[ResourceType, tuple[float, ResourceAvailability]] = {}
        self._refreshing: set[ResourceType] = set()  # types a caller is sampling now
        self._cache_lock = threading.Lock()  # guards _latest's writers and _refreshing; never held while sampling

    # -- the contract ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def supported_types(self) -> frozenset[ResourceType]:
        """The resource types this monitor can report."""

    def get_resource_availability(self, resource_type: ResourceType | str | int) -> ResourceAvailability:
        """The availability of resource_type now: a fresh sample (which also refreshes
        what cached_availability answers). Works after close (it holds nothing)."""
        checked = self._check_type(resource_type)
        started = time.monotonic()
        availability = self._sample(checked)
        self._keep_sample(checked, started, availability)
        return availability

    def cached_availability(self, resource_type: ResourceType | str | int, *,
                            max_age: float | None = None) -> ResourceAvailability:
        """The latest sample of resource_type if it is at most max_age seconds old, else
        a fresh one — for checks made so often that a sample per call would cost more
        than the check (the engine's headroom check at every need).

        How stale it can be. With max_age given: at most max_age seconds plus the
        duration of one sample (a sample's age counts from its start), except that while
        another thread is already taking a fresh sample the previous one is returned
        instead of sampling twice (stale by up to that sample's duration more).
        With max_age None (the default): while resource_type is subscribed, the
        watcher's latest sample, up to 2 x sample_interval old — the watcher re-samples
        every sample_interval, and at once after notify_changed or a kernel event, so a
        caller samples only when the watcher is late; unsubscribed, at most
        sample_interval old (a caller samples at most once per sample_interval).
        Either way a change the caller itself made (an allocation) shows only from the
        next sample: after notify_changed, typically within a millisecond, when the
        watcher's forced re-sample lands; the caller must count what it allocated since.

        Thread-safe; no lock is held while sampling. ValueError for an unsupported type
        or a max_age that is not a number of seconds >= 0."""
        if type(resource_type) is ResourceType and resource_type in self._latest:
            checked = resource_type  # known and supported: skip the parse
        else:
            checked = self._check_type(resource_type)
        if max_age is None:
            limit = 2.0 * self.sample_interval if checked in self._watched_types else self.sample_interval
        else:
            if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age >= 0:
                raise ValueError(f"max_age must be a number of seconds >= 0, not {max_age!r}")
            limit = float(max_age)
        entry = self._latest.get(checked)
        if entry is not None and time.monotonic() - entry[0] <= limit:
            return entry[1]
        with self._cache_lock:
            someone_else = checked in self._refreshing
            if not someone_else:
                self._refreshing.add(checked)
        if someone_else and entry is not None:
            return entry[1]  # one fresh sample at a time: it lands in the cache shortly
        try:
            started = time.monotonic()
            availability = self._sample(checked)
        finally:
            if not someone_else:
                with self._cache_lock:
                    self._refreshing.discard(checked)
        self._keep_sample(checked, started, availability)
        return availability

    def subscribe_to_resource_changes(self, resource_type: ResourceType | str | int,
                                      callback: AvailabilityCallback) -> SubscriptionHandle:
        """Calls callback(availability) on the watcher thread when resource_type changes."""
        checked = self._check_type(resource_type)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            handle = SubscriptionHandle(id=next(_subscription_ids), resource_type=checked)
            if self._watcher is None:
                watcher = _Watcher(self)
                try:
                    watcher.start()
                except BaseException:
                    watcher.discard()  # no thread: nothing was subscribed
                    raise
                self._watcher = watcher
            self._subscriptions[handle.id] = (handle, callback)
            self._generation += 1
            self._watched_types = self._watched_types | {checked}
            # a running watcher opens event sources for a newly watched type now, not
            # after its current sleep (a new one blocks on self._lock until we are done)
            self._watcher.wake()
        return handle

    def unsubscribe(self, handle: SubscriptionHandle) -> bool:
        """Stops callbacks for handle; False if it was not subscribed (or already gone).
        The last unsubscribe stops the watcher thread."""
        with self._lock:
            entry = self._subscriptions.get(handle.id)
            if entry is None or entry[0] != handle:
                return False
            del self._subscriptions[handle.id]
            self._generation += 1
            self._watched_types = frozenset(h.resource_type for h, _ in self._subscriptions.values())
            watcher = self._detach_watcher_if_idle()
        if watcher is not None:
            watcher.stop_and_join()
        return True

    def notify_changed(self, resource_type: ResourceType | str | int) -> None:
        """Tells subscribers of resource_type that it changed (the caller allocated or
        released some): the watcher re-samples it and calls back right away, whatever
        the change threshold says. Nothing happens without subscribers."""
        checked = self._check_type(resource_type)
        with self._lock:
            if self._watcher is not None and any(
                    handle.resource_type == checked for handle, _ in self._subscriptions.values()):
                self._watcher.force(checked)

    def event_source_status(self) -> dict[str, str]:
        """For each kernel event source tried so far: "active", or why it is not (then
        that resource's changes are found by sampling every sample_interval)."""
        with self._lock:
            return dict(self._event_source_status)

    def close(self) -> None:
        """Drops every subscription, stops the watcher thread, releases what the
        monitor holds. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._subscriptions.clear()
            self._generation += 1
            self._watched_types = frozenset()
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop_and_join()
        self._close_resources()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self: MonitorT) -> MonitorT:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- for subclasses ----------------------------------------------------------------

    @abc.abstractmethod
    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        """Reads the availability of a supported resource_type now. May be called from
        the watcher thread and the caller's threads at once."""

    def _event_source_name(self, resource_type: ResourceType) -> str | None:
        """The name of the kernel event source that signals changes of resource_type
        (several types may share one), or None where there is none."""
        return None

    def _open_event_source(self, name: str) -> EventSource:
        """Opens the event source called name; raises OSError saying why it cannot."""
        raise OSError(errno.ENOTSUP, f"{type(self).__name__} has no event source {name!r}")

    def _close_resources(self) -> None:
        """Releases what the subclass holds; called once, by close."""

    # -- internals ---------------------------------------------------------------------

    def _check_type(self, resource_type: ResourceType | str | int) -> ResourceType:
        supported = self.supported_types
        try:
            checked = ResourceType.parse(resource_type)
        except ValueError:
            checked = None
        if checked is None or checked not in supported:
            names = sorted(t.name for t in supported)
            raise ValueError(f"{type(self).__name__} does not monitor {resource_type!r}; "
                             f"supported types are {names}")
        return checked

    def _detach_watcher_if_idle(self) -> _Watcher | None:
        # caller holds self._lock
        if self._subscriptions or self._watcher is None:
            return None
        watcher, self._watcher = self._watcher, None
        return watcher

    def _subscriptions_snapshot(self) -> tuple[int, dict[ResourceType, list[AvailabilityCallback]]]:
        with self._lock:
            by_type: dict[ResourceType, list[AvailabilityCallback]] = {}
            for handle, callback in self._subscriptions.values():
                by_type.setdefault(handle.resource_type, []).append(callback)
            return self._generation, by_type

    def _callbacks_for(self, resource_type: ResourceType) -> list[AvailabilityCallback]:
        with self._lock:
            return [callback for handle, callback in self._subscriptions.values()
                    if handle.resource_type == resource_type]

    def _keep_sample(self, resource_type: ResourceType, started: float,
                     availability: ResourceAvailability) -> None:
        """Keeps availability (sampled from started on) for cached_availability, unless
        a sample started later is kept already."""
        with self._cache_lock:
            kept = self._latest.get(resource_type)
            if kept is None or kept[0] <= started:
                self._latest[resource_type] = (started, availability)

    def _record_event_source_status(self, name: str, status: str) -> None:
        with self._lock:
            self._event_source_status[name] = status

    def _changed_enough(self, before: ResourceAvailability, after: ResourceAvailability) -> bool:
        if after.total != before.total:
            return True
        return abs(after.available - before.available) > self.change_threshold * after.total


class _Watcher:
    """The one background thread of a monitor; see the module docstring."""

    _names = itertools.count(1)

    def __init__(self, monitor: ResourceMonitor) -> None:
        self._monitor = monitor
        self._stop = False
        self._forced: set[ResourceType] = set()
        # guards _stop, _forced and the pipe's lifetime: writers never write to a
        # descriptor the thread has closed (and whose number may be reused)
        self._state_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        self._pipe_open = True
        # the rest is touched by the watcher thread only
        self._poller = select.poll()
        self._sources: dict[str, EventSource] = {}
        self._source_by_fd: dict[int, str] = {}
        self._source_types: dict[str, set[ResourceType]] = {}
        self._failed_sources: set[str] = set()  # not retried while this watcher lives
        self._last_delivered: dict[ResourceType, ResourceAvailability] = {}
        self._seen_generation = -1
        self._thread = threading.Thread(
            target=self._run, name=f"prealloc-monitor-{type(monitor).__name__}-{next(self._names)}", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        start_quiet(self._thread)

    def discard(self) -> None:
        """Releases the pipe of a watcher whose thread never started."""
        with self._state_lock:
            if self._pipe_open:
                self._pipe_open = False
                os.close(self._wake_read)
                os.close(self._wake_write)

    def wake(self) -> None:
        with self._state_lock:
            self._write_wake_byte()

    def force(self, resource_type: ResourceType) -> None:
        with self._state_lock:
            self._forced.add(resource_type)
            self._write_wake_byte()

    def stop_and_join(self) -> None:
        with self._state_lock:
            self._stop = True
            self._write_wake_byte()
        if threading.current_thread() is self._thread:
            return  # a callback unsubscribed the last subscription: the loop ends on its own
        # a callback that never returns would block forever; bound the wait and say so
        self._thread.join(timeout=max(5.0, 4 * self._monitor.sample_interval))
        if self._thread.is_alive():
            log.warning("%s did not stop: a subscriber callback may be blocked", self._thread.name)

    def _write_wake_byte(self) -> None:
        # caller holds _state_lock
        if not self._pipe_open:
            return
        try:
            os.write(self._wake_write, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def _run(self) -> None:
        monitor = self._monitor
        self._poller.register(self._wake_read, select.POLLIN)
        next_periodic = time.monotonic() + monitor.sample_interval
        try:
            self._refresh_subscriptions()
            while True:
                timeout_ms = max(0, math.ceil((next_periodic - time.monotonic()) * 1000))
                events = self._poller.poll(timeout_ms)

                forced: set[ResourceType] = set()
                for fd, mask in events:
                    if fd == self._wake_read:
                        self._drain_wake_pipe()
                        continue
                    name = self._source_by_fd.get(fd)
                    if name is None:
                        continue
                    if mask & _ERROR_EVENTS:
                        log.warning("event source %s failed (poll mask %#x); sampling instead", name, mask)
                        monitor._record_event_source_status(name, f"failed: poll mask {mask:#x}")
                        self._failed_sources.add(name)
                        self._close_source(name)
                    elif mask & select.POLLPRI:
                        forced |= self._source_types.get(name, set())
                with self._state_lock:
                    if self._stop:
                        return
                    forced |= self._forced
                    self._forced.clear()
                # after the sleep, so a subscription made while asleep is seen now
                self._refresh_subscriptions()

                now = time.monotonic()
                periodic = now >= next_periodic
                if periodic:
                    next_periodic = now + monitor.sample_interval
                to_sample = set(self._last_delivered) if periodic else set()
                to_sample |= forced & set(self._last_delivered)
                for resource_type in sorted(to_sample):
                    availability = self._sample(resource_type)
                    if availability is None:
                        continue
                    before = self._last_delivered.get(resource_type)
                    if resource_type in forced or before is None \
                            or monitor._changed_enough(before, availability):
                        self._last_delivered[resource_type] = availability
                        if not self._deliver(resource_type, availability):
                            return
        except Exception:
            log.exception("%s stopped by an unexpected error", self._thread.name)
        finally:
            for name in list(self._sources):
                self._close_source(name)
            with self._state_lock:
                self._pipe_open = False
                os.close(self._wake_read)
                os.close(self._wake_write)

    def _refresh_subscriptions(self) -> None:
        """Opens / closes event sources and takes baselines when subscriptions changed."""
        generation, callbacks_by_type = self._monitor._subscriptions_snapshot()
        if generation == self._seen_generation:
            return
        self._seen_generation = generation
        watched = set(callbacks_by_type)
        self._reconcile_sources(watched)
        for resource_type in watched - set(self._last_delivered):
            # a baseline, not a callback: subscribers hear about changes from here on.
            # A type whose baseline sample failed stays out and is retried next refresh.
            baseline = self._sample(resource_type)
            if baseline is not None:
                self._last_delivered[resource_type] = baseline
            else:
                self._seen_generation = -1
        for resource_type in set(self._last_delivered) - watched:
            del self._last_delivered[resource_type]

    def _deliver(self, resource_type: ResourceType, availability: ResourceAvailability) -> bool:
        """Calls the callbacks of resource_type; False once a stop was asked for."""
        for callback in self._monitor._callbacks_for(resource_type):
            with self._state_lock:
                if self._stop:
                    return False
            try:
                callback(availability)
            except Exception:
                log.exception("subscriber callback for %s raised; the others still run", resource_type.name)
        return True

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability | None:
        started = time.monotonic()
        try:
            availability = self._monitor._sample(resource_type)
        except Exception:
            log.exception("sampling %s failed; trying again at the next wake-up", resource_type.name)
            return None
        self._monitor._keep_sample(resource_type, started, availability)
        return availability

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _reconcile_sources(self, watched: set[ResourceType]) -> None:
        monitor = self._monitor
        wanted: dict[str, set[ResourceType]] = {}
        for resource_type in watched:
            name = monitor._event_source_name(resource_type)
            if name is not None:
                wanted.setdefault(name, set()).add(resource_type)
        for name in set(self._sources) - set(wanted):
            self._close_source(name)
        for name, resource_types in wanted.items():
            self._source_types[name] = resource_types
            if name in self._sources or name in self._failed_sources:
                continue
            try:
                source = monitor._open_event_source(name)
            except Exception as error:  # an event source is an optimisation: never fatal
                self._failed_sources.add(name)
                reason = str(error) or repr(error)
                monitor._record_event_source_status(name, reason)
                log.info("no kernel event for %s (%s); sampling every %.3g s", name, reason,
                         monitor.sample_interval)
                continue
            self._sources[name] = source
            self._source_by_fd[source.fileno()] = name
            self._poller.register(source.fileno(), select.POLLPRI)
            monitor._record_event_source_status(name, "active")

    def _close_source(self, name: str) -> None:
        source = self._sources.pop(name, None)
        self._source_types.pop(name, None)
        if source is None:
            return
        for fd, fd_name in list(self._source_by_fd.items()):
            if fd_name == name:
                del self._source_by_fd[fd]
                try:
                    self._poller.unregister(fd)
                except KeyError:
                    pass
        try:
            source.close()
        except OSError:
            log.debug("closing event source %s failed", name, exc_info=True)


def read_small_file(path: str | os.PathLike[str]) -> str:
    """The text of a small kernel file (/proc, /sys, cgroup files) through os.open /
    os.read: about a fifth of pathlib's read_text cost (no io stack, no encoding lookup),
    which adds up in a sample that reads a handful of them. Raises OSError as open does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def availability_from(resource_type: ResourceType, total: float, available: float, *,
                      used: float | None = None, pressure: float | None = None) -> ResourceAvailability:
    """A ResourceAvailability with available clamped into [0, total] and, unless given,
    used = total - available."""
    total = max(0.0, float(total))
    available = min(max(0.0, float(available)), total)
    return ResourceAvailability(
        resource_type=resource_type,
        total=total,
        available=available,
        used=total - available if used is None else max(0.0, float(used)),
        pressure=pressure,
    )
