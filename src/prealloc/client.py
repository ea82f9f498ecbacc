"""The machine broker's Python client: the allocator's methods, served by ``prealloc
serve`` over its Unix socket (docs/protocol.md).

    from prealloc.client import Client
    from prealloc import ResourceRequest, ResourceType

    with Client() as broker:
        aid = broker.request_preallocation(ResourceRequest(ResourceType.MEMORY, 64))
        broker.wait_ready([aid], timeout=5)
        with broker.claim(aid) as claim:
            view = memoryview(claim.resource)   # the broker's pages, mapped here: no copy
            view[:5] = b"hello"

The answers are the in-process types (``ResourceAllocation``, ``PreallocatorStatistics``;
``allocation.details`` adds ``owner_pid`` and ``owner_uid``). A MEMORY claim's
``resource`` is an ``mmap`` of the broker's memfd (MAP_SHARED, read-write): the pages
the broker reserved, populated and locked. Releasing the claim tells the broker, unmaps
and closes the fd; a claim dropped without release is released at the next call (or at
``close``). Closing the client (or the process ending, however it ends) releases every
allocation this connection holds.

Thread-safe: one lock around each send and its answer; once a listener is added with
``on``, a reader thread takes the answers and the events (listeners run on it).
"""
from __future__ import annotations

import collections
import itertools
import mmap
import os
import socket
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable

from ._threads import start_quiet
from .protocol import (
    MAX_FDS,
    MAX_MESSAGE,
    VERSION,
    Closed,
    ProtocolError,
    RateLimited,
    VersionError,
    WrongResourceType,
    allocation_from_json,
    check_allocation_id,
    client_socket_path,
    decode_message,
    encode_message,
    feedback_to_json,
    prediction_to_json,
    request_to_json,
    statistics_from_json,
)
from .quotas import QuotaExceeded
from .strategies.base import AllocationError, InsufficientResources
from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    PreallocatorStatistics,
    ResourceAllocation,
    ResourceRequest,
    ResourceType,
)

_ERRORS: dict[str, Callable[[str], BaseException]] = {
    "ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "PermissionError": PermissionError,
    "AllocationError": AllocationError, "InsufficientResources": InsufficientResources,
    "QuotaExceeded": QuotaExceeded, "Timeout": TimeoutError, "RateLimited": RateLimited,
    "ProtocolError": ProtocolError, "VersionError": VersionError, "Closed": Closed,
    "WrongResourceType": WrongResourceType,
}


def _raise(error: Any) -> None:
    if not isinstance(error, dict):
        raise ProtocolError(f"bad error from the broker: {error!r}"[:200])
    kind = _ERRORS.get(str(error.get("type")), ProtocolError)
    raise kind(str(error.get("message", "")))


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i:i + 4], "little", signed=True) for i in range(0, usable, 4))
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class RemoteClaim:
    """A resource the broker handed to this process. ``resource``: for MEMORY a
    writable ``mmap`` of the broker's pages (no copy), for CPU the frozenset of cores
    this process is now pinned to, else None. ``allocation``: the snapshot at the
    claim. ``release()`` gives it back (also the end of a with-block)."""

    __slots__ = ("allocation_id", "resource_type", "resource", "preallocated", "allocation", "fd",
                 "_client_ref", "_finalizer", "__weakref__")

    def __init__(self, client: Client, allocation: ResourceAllocation, resource: Any, preallocated: bool,
                 fd: int | None) -> None:
        self.allocation_id = allocation.allocation_id
        self.resource_type = allocation.resource_type
        self.allocation = allocation
        self.resource = resource
        self.preallocated = preallocated
        self.fd = fd
        self._client_ref = weakref.ref(client)
        self._finalizer = weakref.finalize(self, _drop_claim, self._client_ref, self.allocation_id, fd)

    def release(self, feedback: AllocationFeedback | None = None) -> bool:
        """Tells the broker, then unmaps and closes the fd; False if it was released
        already (or the client is closed, which released it)."""
        if not self._finalizer.alive:
            return False
        self._finalizer.detach()
        client = self._client_ref()
        released = False
        try:
            if client is not None and not client.closed:
                released = client._release(self.allocation_id, feedback)
        finally:
            self._unmap()
        return released

    def _unmap(self) -> None:
        if isinstance(self.resource, mmap.mmap):
            try:
                self.resource.close()
            except BufferError:
                pass  # a view is still alive: the mapping goes with the last one
        if self.fd is not None:
            _close_all([self.fd])
            self.fd = None

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RemoteClaim:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.release(AllocationFeedback(used_successfully=exc_type is None, reason_for_release="claim closed"))

    def __repr__(self) -> str:
        return (f"<RemoteClaim {self.resource_type.name} allocation={self.allocation_id}"
                f"{' released' if self.released else ''}>")


def _drop_claim(client_ref: Callable[[], Client | None], allocation_id: int, fd: int | None) -> None:
    # a finalizer: no lock, no socket (it may run inside a call of this client)
    if fd is not None:
        _close_all([fd])
    client = client_ref()
    if client is not None:
        client._dropped.append(allocation_id)


_open_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _forget_inherited_clients() -> None:
    """In a child of fork(): the connections are the parent's (the broker knows the
    parent by SO_PEERCRED), so the child's copies are closed, unused; its own Client
    makes a connection of its own."""
    for client in list(_open_clients):
        client._closed = True
        try:
            client._sock.close()  # the child's copy only: the parent's connection stays
        except OSError:
            pass
        for claim in list(client._claims.values()):
            claim._finalizer.detach()
    _open_clients.clear()


os.register_at_fork(after_in_child=_forget_inherited_clients)


class Client:
    """A connection to the machine broker (``socket_path``: see docs/protocol.md for
    the default). The allocator's methods, answered by the broker. Not inherited
    across fork(): a child makes its own."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, client_name: str | None = None,
                 timeout: float | None = None) -> None:
        path = os.fspath(socket_path) if socket_path is not None else os.fspath(client_socket_path())
        self.socket_path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._dropped: collections.deque[int] = collections.deque()
        self._claims: weakref.WeakValueDictionary[int, RemoteClaim] = weakref.WeakValueDictionary()
        self._listeners: dict[str, list[Callable[..., Any]]] = {}
        self._listeners_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._pending: dict[int, Future[tuple[Any, list[int]]]] = {}
        self.server = self._call("hello", {"client": f"prealloc.client pid {os.getpid()}"})[0]
        _open_clients.add(self)

    # ------------------------------------------------------------------ the wire
    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        data, ancdata, flags, _ = self._sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4),
                                                     socket.MSG_CMSG_CLOEXEC)
        fds = _received_fds(ancdata)
        if not data and not fds:
            raise Closed("the broker closed the connection")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(fds)
            raise ProtocolError("the broker's message was truncated")
        try:
            return decode_message(data), fds
        except ProtocolError:
            _close_all(fds)
            raise

    def _call(self, op: str, args: dict[str, Any]) -> tuple[Any, list[int]]:
        if self._closed:
            raise Closed("the client is closed")
        while self._dropped and op != "hello":
            allocation_id = self._dropped.popleft()
            try:
                self._exchange("release_allocation", {"allocation_id": allocation_id})
            except (KeyError, ValueError):
                pass
        return self._exchange(op, args)

    def _exchange(self, op: str, args: dict[str, Any]) -> tuple[Any, list[int]]:
        future: Future[tuple[Any, list[int]]] | None = None
        early_events: list[dict[str, Any]] = []
        with self._lock:
            request_id = next(self._ids)
            data = encode_message({"v": VERSION, "id": request_id, "op": op, "args": args})
            if self._reader is not None:
                future = Future()
                self._pending[request_id] = future
            try:
                self._sock.send(data)
            except OSError as exc:
                if future is not None:
                    self._pending.pop(request_id, None)
                raise Closed(f"cannot send to the broker: {exc}") from exc
            if future is None:
                while True:
                    message, fds = self._recv()
                    if "event" in message:  # subscribed, the reader not started yet
                        _close_all(fds)
                        early_events.append(message)
                        continue
                    if message.get("id") == request_id or message.get("id") is None:
                        break
                    _close_all(fds)
        for event in early_events:  # outside the lock: a listener may call the client
            self._dispatch(event)
        if future is not None:
            message, fds = future.result()
        if not message.get("ok"):
            _close_all(fds)
            _raise(message.get("error"))
        return message.get("result"), fds

    def _read_loop(self) -> None:
        error: BaseException = Closed("the broker closed the connection")
        try:
            while not self._closed:
                message, fds = self._recv()
                if "event" in message:
                    _close_all(fds)
                    self._dispatch(message)
                    continue
                answer_id = message.get("id")
                with self._lock:
                    if type(answer_id) is int:
                        future = self._pending.pop(answer_id, None)
                    else:  # an error the broker could not tie to a request: the oldest waits for it
                        future = self._pending.pop(min(self._pending)) if self._pending else None
                if future is None:
                    _close_all(fds)
                else:
                    future.set_result((message, fds))
        except (OSError, ProtocolError) as exc:
            error = exc if isinstance(exc, Closed) else Closed(f"the connection failed: {exc}")
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)

    def _dispatch(self, message: dict[str, Any]) -> None:
        name = message.get("event")
        with self._listeners_lock:
            listeners = list(self._listeners.get(str(name), ()))
        if not listeners:
            return
        try:
            payload: Any = allocation_from_json(message.get("data"))
        except ProtocolError:
            payload = message.get("data")
        for listener in listeners:
            try:
                listener(payload)
            except Exception:  # a listener's failure must not stop the reader
                import logging

                logging.getLogger(__name__).exception("event listener for %s failed", name)

    # ------------------------------------------------------------------ events
    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Listens to the broker's events for this connection's allocations
        ('resource:allocated', 'resource:released', 'resource:expired',
        'resource:failed', or their short names), each with a ResourceAllocation; the
        listener runs on the client's reader thread. Returns the listener."""
        from .events import canonical_event

        if not callable(listener):
            raise TypeError(f"listener must be callable, not {type(listener).__name__}")
        name = canonical_event(event)
        with self._listeners_lock:  # before the subscription: its first event finds it
            self._listeners.setdefault(name, []).append(listener)
        try:
            self._call("subscribe", {"events": [name]})
        except BaseException:
            self.off(name, listener)
            raise
        with self._lock:
            if self._reader is None:
                self._reader = start_quiet(threading.Thread(target=self._read_loop, name="prealloc-client-reader",
                                                            daemon=True))
        return listener

    subscribe = on

    def off(self, event: str, listener: Callable[..., Any]) -> bool:
        from .events import canonical_event

        with self._listeners_lock:
            listeners = self._listeners.get(canonical_event(event), [])
            if listener in listeners:
                listeners.remove(listener)
                return True
        return False

    # ------------------------------------------------------------------ the allocator's methods
    def hello(self) -> dict[str, Any]:
        return dict(self._call("hello", {})[0])

    def request_preallocation(self, request: ResourceRequest) -> ResourceAllocation:
        """As in-process: the broker allocates now and answers the allocation —
        ALLOCATED, or FAILED with failure_reason."""
        if not isinstance(request, ResourceRequest):
            raise TypeError(f"request must be a ResourceRequest, not {type(request).__name__}")
        request.validate()
        return allocation_from_json(self._call("request_preallocation", request_to_json(request))[0])

    def submit(self, request: ResourceRequest) -> int:
        """Queues one request for the broker's worker; its allocation id (PENDING):
        ``wait_ready`` then ``claim``."""
        if not isinstance(request, ResourceRequest):
            raise TypeError(f"request must be a ResourceRequest, not {type(request).__name__}")
        request.validate()
        return int(self._call("submit", request_to_json(request))[0]["allocation_id"])

    def handle_prediction(self, prediction: Prediction) -> list[int]:
        if not isinstance(prediction, Prediction):
            raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
        prediction.validate()
        return [int(i) for i in self._call("handle_prediction", prediction_to_json(prediction))[0]["allocation_ids"]]

    def wait_ready(self, allocation_ids: int | Iterable[int], timeout: float | None = None) -> bool:
        ids = [allocation_ids] if isinstance(allocation_ids, int) else list(allocation_ids)
        for allocation_id in ids:
            check_allocation_id(allocation_id)
        return bool(self._call("wait_ready", {"allocation_ids": ids, "timeout": timeout})[0]["ready"])

    def claim(self, allocation_id: int, *, target_process_id: int | None = None,
              resource_type: ResourceType | str | None = None) -> RemoteClaim:
        """Takes a ready allocation: MEMORY maps the broker's pages here, CPU pins this
        process (or target_process_id, one of this uid's). KeyError for an id that is
        not this connection's; with resource_type, WrongResourceType (a TypeError) for an
        allocation of another type, which is then left as it was (not claimed)."""
        check_allocation_id(allocation_id)
        args: dict[str, Any] = {"allocation_id": allocation_id, "target_process_id": target_process_id}
        if resource_type is not None:
            args["resource_type"] = ResourceType.parse(resource_type).name.lower()
        result, fds = self._call("claim", args)
        return self._take(result, fds)

    def acquire(self, resource_type: ResourceType | str, amount: float, *, target_application: str | None = None,
                target_process_id: int | None = None) -> RemoteClaim:
        """The moment of need: this connection's ready preallocation, or one made now."""
        rtype = ResourceType.parse(resource_type)
        result, fds = self._call("acquire", {"resource_type": rtype.name.lower(), "amount": amount,
                                             "target_application": target_application,
                                             "target_process_id": target_process_id})
        return self._take(result, fds)

    def _take(self, result: dict[str, Any], fds: list[int]) -> RemoteClaim:
        try:
            allocation = allocation_from_json(result)
            resource: Any = None
            fd = None
            if allocation.resource_type is ResourceType.MEMORY:
                memory = result.get("memory") or {}
                size = memory.get("size")
                if len(fds) != 1 or type(size) is not int or size <= 0:
                    raise ProtocolError(f"a MEMORY claim must bring one fd and a size, not {len(fds)} fds, {size!r}")
                fd = fds.pop()
                resource = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            elif allocation.resource_type is ResourceType.CPU:
                resource = frozenset(int(c) for c in (result.get("cpu") or {}).get("cores", ()))
        except BaseException:
            _close_all(fds)
            if "fd" in locals() and fd is not None:
                _close_all([fd])
            try:
                self._exchange("release_allocation", {"allocation_id": result.get("allocation_id")})
            except Exception:
                pass
            raise
        _close_all(fds)  # anything beyond what the claim uses
        claim = RemoteClaim(self, allocation, resource, bool(result.get("preallocated", False)), fd)
        self._claims[allocation.allocation_id] = claim
        return claim

    def adjust_allocation(self, allocation_id: int, new_amount: float) -> bool:
        check_allocation_id(allocation_id)
        return bool(self._call("adjust_allocation", {"allocation_id": allocation_id,
                                                     "new_amount": new_amount})[0]["adjusted"])

    def release_allocation(self, allocation_id: int, feedback: AllocationFeedback | None = None) -> bool:
        """Gives an allocation back (a claim of it is unmapped here)."""
        check_allocation_id(allocation_id)
        claim = self._claims.pop(allocation_id, None)
        if claim is not None and not claim.released:
            return claim.release(feedback)
        return self._release(allocation_id, feedback)

    def _release(self, allocation_id: int, feedback: AllocationFeedback | None) -> bool:
        self._claims.pop(allocation_id, None)
        if feedback is not None:
            feedback.validate()
        return bool(self._call("release_allocation", {"allocation_id": allocation_id,
                                                      "feedback": feedback_to_json(feedback)})[0]["released"])

    def cancel_request(self, allocation_id: int) -> bool:
        check_allocation_id(allocation_id)
        return bool(self._call("cancel_request", {"allocation_id": allocation_id})[0]["cancelled"])

    def get_allocation(self, allocation_id: int) -> ResourceAllocation | None:
        check_allocation_id(allocation_id)
        result = self._call("get_allocation", {"allocation_id": allocation_id})[0]
        return None if result is None else allocation_from_json(result)

    def allocations(self, *statuses: AllocationStatus, all: bool = False) -> list[ResourceAllocation]:
        """This connection's live allocations (uid 0 with all=True: every peer's)."""
        args: dict[str, Any] = {"all": all}
        if statuses:
            args["statuses"] = [AllocationStatus(s).name.lower() for s in statuses]
        return [allocation_from_json(a) for a in self._call("allocations", args)[0]["allocations"]]

    def get_statistics(self) -> PreallocatorStatistics:
        return statistics_from_json(self._call("get_statistics", {})[0])

    def status(self) -> dict[str, Any]:
        """Live reservations (this peer's; every peer's for root), per-uid quota use, the
        journal's entries."""
        return dict(self._call("status", {})[0])

    # ------------------------------------------------------------------ the end
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Says bye (the broker releases everything this connection holds), unmaps what
        is still mapped here and closes the socket. Idempotent."""
        if self._closed:
            return
        try:
            self._exchange("bye", {})
        except Exception:  # closed, refused, or gone: the socket's end releases all the same
            pass
        self._closed = True
        for claim in list(self._claims.values()):
            claim._finalizer.detach()
            claim._unmap()
        self._claims.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.socket_path}{' closed' if self._closed else ''}>"


__all__ = ["Client", "RemoteClaim"]
