"""``prealloc serve``: the machine broker. One process owns the machine's reservations
and hands them to client processes over a Unix socket (docs/protocol.md, the contract).

Shape. The main thread accepts (a selector over the listening socket and a wake
eventfd that signals and ``stop()`` write to); each connection gets one thread that owns
its socket: it reads a request, answers it, and sends the events queued for it. The
engine is one ``ResourcePreallocator`` with the default strategies, MEMORY made
shareable (a memfd per reservation). State and its owners:

* a peer's socket, pidfd, token bucket, claims (``Claim`` objects that keep claimed
  allocations alive) and event queue: the peer's thread (the engine's worker only
  appends to the bounded event queue and writes the peer's eventfd);
* which peer holds which allocation and what each uid holds per resource type (the
  quota ledger): ``Broker._lock``, an RLock held only for dictionary updates — never
  across a socket call, a wait or an allocation (``submit`` only queues);
* each allocation's lifecycle: the engine.

Identity. A peer is who SO_PEERCRED says at accept (pid, uid, gid), with a pidfd of that
pid (SO_PEERPIDFD where the kernel has it, else pidfd_open): nothing the client sends
names it. It sees and touches only the allocations its own connection made (another's
id answers KeyError, as an unknown one does), except uid 0 listing with ``all``, and
``status``, which shows it (to look at) every connection's rows of its uid; its
preallocations are matched by ``acquire`` only for itself (the broker files them under
the peer's own application key). A CPU pin targets the peer's process, or a process of
the peer's uid (root: any), checked through a pidfd before and after.

Limits. A message is at most MAX_MESSAGE bytes with no descriptors (no request takes
one: every descriptor that comes is closed and the message is a protocol error); three
protocol errors drop the peer, a wrong version drops it at once. Each peer has a token
bucket (``rate_limit`` per second, ``rate_burst`` at once) and at most
``max_allocations`` live allocations; at most ``max_connections`` peers are served.

End of a peer. When its socket closes (``bye``, exit, kill), its thread releases every
allocation it held, closes the pidfd and the socket. SIGTERM drains: stop accepting,
drop every peer (each releasing its own), close the engine, exit 0. SIGHUP reloads the
config file (quotas, rate limits, sizes; the ``[engine]`` table needs a restart). The
broker's own crash is covered by the strategies' journal (prealloc.journal): the CPU
strategy made at the next start recovers the pins a killed broker left behind.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import grp
import logging
import math
import os
import pwd
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import __version__
from ._threads import start_quiet
from .engine import Claim, PreallocatorConfig, ResourcePreallocator
from .events import EXPIRED, FAILED, RELEASED, ALLOCATED
from .protocol import (
    client_socket_path,
    default_socket_path,
    ERROR_TYPES,
    MAX_FDS,
    MAX_IDS_PER_CALL,
    MAX_MESSAGE,
    MAX_PROTOCOL_ERRORS,
    VERSION,
    VERSIONS,
    ProtocolError,
    VersionError,
    WrongResourceType,
    allocation_to_json,
    check_allocation_id,
    check_id,
    decode_message,
    encode_message,
    feedback_from_json,
    plain,
    prediction_from_json,
    request_from_json,
    resource_type_from_json,
    statistics_to_json,
    status_from_json,
)
from .quotas import QuotaExceeded
from .strategies import AllocationError
from .types import AllocationFeedback, AllocationStatus, ResourceRequest, ResourceType, check_seconds

log = logging.getLogger("prealloc.server")

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 lacks the name
SD_LISTEN_FDS_START = 3
MAX_EVENTS_QUEUED = 1024  # per peer; beyond it events are dropped and counted
SEND_TIMEOUT = 10.0  # a peer that does not read its answers for this long is dropped
SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DRAIN_GRACE = 2.0  # how long a drain lets peers release their own before closing the engine
EVENT_NAMES = (ALLOCATED, RELEASED, EXPIRED, FAILED)
_CLOSE_FEEDBACK = AllocationFeedback(used_successfully=False, reason_for_release="broker peer closed")
_PATH_TYPES = (ResourceType.CACHE_SPACE, ResourceType.DISK_IO)  # their custom_properties name paths
# Errors that mean this process is out of descriptors (or kernel memory for one): accepting
# waits for a peer to end rather than spinning on the listener
_NO_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


# ---------------------------------------------------------------------------------------
# the config file


@dataclass
class BrokerConfig:
    """The broker's own settings (the config file's top level) and the engine's.

    TOML::

        rate_limit = 5000        # requests per second per peer (a token bucket)
        rate_burst = 1000        # requests a peer may send at once
        max_connections = 256
        max_allocations = 4096   # live allocations per peer
        lock_memory = true       # mlock MEMORY where the broker may (best effort)
        [quotas.alice]           # per uid (a number or a user name; "*" for every
        MEMORY = 1024            # uid without its own table): what its live
        CPU = 200                # allocations may hold together, per type
        [engine]                 # the engine's PreallocatorConfig (prealloc.config_file)
        allocation_workers = 2
    """

    rate_limit: float = 5000.0
    rate_burst: float = 1000.0
    max_connections: int = 256
    max_allocations: int = 4096
    lock_memory: bool = True
    quotas: dict[int | str, dict[ResourceType, float]] = field(default_factory=dict)
    engine: PreallocatorConfig | None = None

    def quota_for(self, uid: int) -> dict[ResourceType, float] | None:
        return self.quotas.get(uid, self.quotas.get("*"))


_BROKER_KEYS = ("rate_limit", "rate_burst", "max_connections", "max_allocations", "lock_memory", "quotas",
                "engine")


def broker_config_from_dict(document: Mapping[str, Any], *, source: str = "<broker config>",
                            base_dir: str | os.PathLike[str] | None = None) -> BrokerConfig:
    """A validated BrokerConfig; ConfigError listing every problem, each naming its key."""
    from .config_file import ConfigError, config_from_dict

    errors: list[str] = []
    for unknown in sorted(set(document) - set(_BROKER_KEYS)):
        errors.append(f"{unknown}: unknown key; allowed at the top: {sorted(_BROKER_KEYS)}")
    config = BrokerConfig()
    for key in ("rate_limit", "rate_burst"):
        if key in document:
            value = document[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                errors.append(f"{key}: must be a number > 0, not {value!r}")
            else:
                setattr(config, key, float(value))
    for key in ("max_connections", "max_allocations"):
        if key in document:
            value = document[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
                errors.append(f"{key}: must be an integer in 1..2**20, not {value!r}")
            else:
                setattr(config, key, value)
    if "lock_memory" in document:
        if not isinstance(document["lock_memory"], bool):
            errors.append(f"lock_memory: must be a boolean, not {document['lock_memory']!r}")
        else:
            config.lock_memory = document["lock_memory"]
    raw_quotas = document.get("quotas", {})
    if not isinstance(raw_quotas, dict):
        errors.append("quotas: must be a table of uid or user name = {type = amount}")
    else:
        for who, limits in raw_quotas.items():
            who_key: int | str
            if who == "*":
                who_key = "*"
            elif who.isdigit():
                who_key = int(who)
            else:
                try:
                    who_key = pwd.getpwnam(who).pw_uid
                except KeyError:
                    errors.append(f"quotas.{who}: no such user")
                    continue
            if not isinstance(limits, dict):
                errors.append(f"quotas.{who}: must be a table of resource type = amount")
                continue
            amounts: dict[ResourceType, float] = {}
            for name, amount in limits.items():
                try:
                    rtype = ResourceType.parse(name)
                except ValueError:
                    errors.append(f"quotas.{who}.{name}: unknown resource type; valid types are "
                                  f"{[t.name for t in ResourceType]}")
                    continue
                if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                        or amount < 0:
                    errors.append(f"quotas.{who}.{name}: must be a finite number >= 0, not {amount!r}")
                    continue
                amounts[rtype] = float(amount)
            config.quotas[who_key] = amounts
    if "engine" in document:
        if not isinstance(document["engine"], dict):
            errors.append("engine: must be a table (the prealloc.config_file schema)")
        else:
            try:
                config.engine = config_from_dict(document["engine"], source=f"{source} [engine]", base_dir=base_dir)
            except ConfigError as exc:
                errors.extend(f"engine.{e}" for e in exc.errors)
    if errors:
        raise ConfigError(source, errors)
    return config


def load_broker_config(path: str | os.PathLike[str]) -> BrokerConfig:
    from .config_file import read_toml

    source = os.fspath(path)
    return broker_config_from_dict(read_toml(source), source=source, base_dir=Path(source).resolve().parent)


# ---------------------------------------------------------------------------------------
# the peers


class TokenBucket:
    """rate tokens per second, at most burst at once; owned by one peer's thread."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, max(1.0, burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()[:64]
    except OSError:
        return "?"


def _process_uids(pid: int) -> tuple[int, ...] | None:
    """(real, effective, saved, fs) uids of pid, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return tuple(int(v) for v in line.split()[1:5])
    except OSError:
        return None
    return None


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, just not ours to signal


class Peer:
    """One connection: who SO_PEERCRED says it is, and what it holds."""

    def __init__(self, serial: int, sock: socket.socket, pid: int, uid: int, gid: int, pidfd: int,
                 config: BrokerConfig) -> None:
        self.serial = serial
        self.sock = sock
        self.pid, self.uid, self.gid = pid, uid, gid
        self.pidfd = pidfd
        self.comm = _read_comm(pid)
        self.connected_at = time.monotonic()
        self.bucket = TokenBucket(config.rate_limit, config.rate_burst)
        self.protocol_errors = 0
        # what the broker registry says it holds (Broker._lock): id -> (type, booked amount)
        self.held: dict[int, tuple[ResourceType, float]] = {}
        self.claims: dict[int, Claim] = {}  # the peer's thread only
        self.handed_memory: set[int] = set()  # MEMORY ids whose memfd went to the peer
        self.subscribed: frozenset[str] = frozenset()
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self.events_dropped = 0
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.application_key = f"broker-peer-{serial}"
        self.thread: threading.Thread | None = None

    def application(self, name: str | None) -> str:
        """The engine's application key for this peer's name: acquire matches only the
        peer's own preallocations."""
        return self.application_key if name is None else f"{self.application_key}/{name}"

    def __repr__(self) -> str:
        return f"<Peer {self.serial} pid={self.pid} uid={self.uid} {self.comm}>"


class _Answer:
    __slots__ = ("result", "fds")

    def __init__(self, result: Any, fds: Iterable[int] = ()) -> None:
        self.result = result
        self.fds = list(fds)


class _Drop(Exception):
    """Close the peer after this answer."""


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "Timeout"
    if isinstance(exc, RuntimeError):
        return "Closed"  # the engine is closing
    for cls in type(exc).__mro__:
        if cls.__name__ in ERROR_TYPES:
            return cls.__name__
    return "AllocationError"


# ---------------------------------------------------------------------------------------
# the broker


class Broker:
    """The machine broker. ``serve()`` runs it on this thread until SIGTERM (or
    ``stop()``) and returns 0; ``start()`` runs it on a thread of its own (no signal
    handlers then: for embedding and tests)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 config: BrokerConfig | None = None, config_path: str | os.PathLike[str] | None = None,
                 group: str | int | None = None, metrics_address: str | None = None,
                 listen_fd: int | None = None, allocator: ResourcePreallocator | None = None) -> None:
        self.config_path = os.fspath(config_path) if config_path is not None else None
        if config is None:
            config = load_broker_config(self.config_path) if self.config_path else BrokerConfig()
        self.config = config
        self._lock = threading.RLock()
        self._peers: dict[int, Peer] = {}
        self._owners: dict[int, Peer] = {}  # allocation id -> its peer
        self._usage: dict[int, collections.defaultdict[ResourceType, float]] = {}  # uid -> type -> booked
        self._serials = iter(range(1, 1 << 62))
        self._stopping = False
        self._stopped = threading.Event()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signals: collections.deque[int] = collections.deque()
        self.counters: collections.Counter[str] = collections.Counter()
        # the socket first: a second broker on a live socket is refused before it builds
        # an engine (and its recovery would touch what the live one holds)
        self._created_path: Path | None = None
        self.socket_path: Path | None = None
        if listen_fd is None:
            listen_fd = inherited_listen_fd()
        if listen_fd is not None:
            self._listener = _adopt_listener(listen_fd)
            name = self._listener.getsockname()
            self.socket_path = Path(name) if isinstance(name, str) and name else None
        else:
            path = Path(socket_path) if socket_path is not None else default_socket_path()
            self._listener = _bind_listener(path, group, default=socket_path is None)
            self.socket_path = self._created_path = path
        self._owns_allocator = allocator is None
        self._metrics_server: Any = None
        try:
            self.allocator = allocator if allocator is not None else self._make_allocator(config)
            for event_name in EVENT_NAMES:
                self.allocator.on(event_name, self._make_listener(event_name))
            if metrics_address:
                self._metrics_server = self._start_metrics(metrics_address)
        except BaseException:
            self._close_listener()
            if self._owns_allocator and hasattr(self, "allocator"):
                self.allocator.close()
            os.close(self._wake_fd)
            raise
        log.info("listening on %s%s", self.socket_path,
                 f" (inherited fd {listen_fd})" if listen_fd is not None else "")
        self._thread: threading.Thread | None = None

    @staticmethod
    def _make_allocator(config: BrokerConfig) -> ResourcePreallocator:
        engine = replace(config.engine) if config.engine is not None else PreallocatorConfig()
        engine.name = engine.name or "prealloc-broker"
        return _BrokerPreallocator(engine, lock_memory=config.lock_memory)

    # ------------------------------------------------------------------ running
    def start(self) -> Broker:
        self._thread = start_quiet(threading.Thread(target=self._serve, name="prealloc-broker", daemon=True))
        return self

    def serve(self) -> int:
        """Runs until SIGTERM / SIGINT (drains, then returns 0); SIGHUP reloads. Call it
        on the main thread (signal handlers can only be set there)."""
        _raise_fd_limit()
        # The loop learns of signals from a pipe that CPython's C-level handler writes
        # each signal's number to, on whichever thread the kernel chose: a Python-level
        # handler would run only once the main thread is told, and it is not told when
        # the signal lands on another thread (a host's, which may not block signals as
        # ours do; see prealloc._threads) while it sleeps in select().
        signal_read, signal_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {}
        try:
            previous_wakeup = signal.set_wakeup_fd(signal_write, warn_on_full_buffer=False)
            try:
                for signum in SERVE_SIGNALS:
                    previous[signum] = signal.signal(signum, _noted_by_the_wakeup_fd)
                self._serve(signal_read)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                signal.set_wakeup_fd(previous_wakeup)
        finally:
            os.close(signal_read)
            os.close(signal_write)
        return 0

    def stop(self, timeout: float | None = 30.0) -> None:
        """Drains (as SIGTERM) and waits for the loop to finish."""
        self._signals.append(signal.SIGTERM)
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        else:
            self._stopped.wait(timeout)

    def reload(self) -> None:
        """Reads the config file again (as SIGHUP)."""
        self._signals.append(signal.SIGHUP)
        os.eventfd_write(self._wake_fd, 1)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, signal_fd: int | None = None) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_fd, selectors.EVENT_READ)
        if signal_fd is not None:
            selector.register(signal_fd, selectors.EVENT_READ)
        try:
            accepting = True
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj == signal_fd:
                        self._signals.extend(_read_signal_numbers(signal_fd))
                    elif key.fileobj is self._listener:
                        if not self._accept():
                            # out of descriptors: a listener left registered would wake
                            # us at once, forever; a peer's end (which frees some) wakes
                            # us through the wake fd instead
                            selector.unregister(self._listener)
                            accepting = False
                    else:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                        if not accepting:
                            selector.register(self._listener, selectors.EVENT_READ)
                            accepting = True
                while self._signals:
                    signum = self._signals.popleft()
                    if signum == signal.SIGHUP:
                        self._reload()
                    else:
                        log.info("draining (%s)", signal.Signals(signum).name)
                        self._stopping = True
        finally:
            selector.close()
            self._drain()

    def _accept(self) -> bool:
        """Takes every pending connection; False when the process is out of
        descriptors (EMFILE / ENFILE: accepting waits for a peer to end)."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:  # keep serving the others
                log.warning("accept failed: %s", exc)
                self.counters["accept_errors"] += 1
                return exc.errno not in _NO_DESCRIPTORS
            try:
                self._admit_peer(sock)
            except OSError as exc:
                sock.close()
                if exc.errno in _NO_DESCRIPTORS:  # its pidfd or eventfd: as accept's EMFILE
                    log.warning("connection dropped: %s", exc)
                    self.counters["accept_errors"] += 1
                    return False
                log.exception("could not take a connection")
            except Exception:
                log.exception("could not take a connection")
                sock.close()

    def _admit_peer(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        pidfd = -1
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError as exc:
            if exc.errno in _NO_DESCRIPTORS:
                raise
            # older kernels: the pid SO_PEERCRED names, opened now (the peer is blocked
            # in connect's answer or alive: a reused pid would need it dead already)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno in _NO_DESCRIPTORS:
                    raise
                pidfd = -1
        if pidfd < 0:
            log.info("peer pid %d is gone before accept", pid)
            sock.close()
            return
        os.set_inheritable(pidfd, False)
        with self._lock:
            full = len(self._peers) >= self.config.max_connections
        if full:
            self.counters["refused_connections"] += 1
            try:
                sock.send(encode_message(_error(None, "PermissionError",
                                                f"the broker serves at most {self.config.max_connections} "
                                                "connections")), socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            os.close(pidfd)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))
        try:
            peer = Peer(next(self._serials), sock, pid, uid, gid, pidfd, self.config)
        except BaseException:  # its eventfd (EMFILE): the pidfd is not left behind
            os.close(pidfd)
            raise
        with self._lock:
            self._peers[peer.serial] = peer
        self.counters["connections"] += 1
        log.debug("peer %r connected", peer)
        peer.thread = threading.Thread(target=self._run_peer, args=(peer,), name=f"prealloc-peer-{peer.serial}",
                                       daemon=True)
        start_quiet(peer.thread)

    def _reload(self) -> None:
        if self.config_path is None:
            log.info("SIGHUP: no config file to reload")
            return
        try:
            config = load_broker_config(self.config_path)
        except (ValueError, OSError) as exc:
            log.error("SIGHUP: keeping the old config: %s", exc)
            self.counters["reload_errors"] += 1
            return
        with self._lock:
            old, self.config = self.config, config
            for peer in self._peers.values():
                peer.bucket.rate, peer.bucket.burst = config.rate_limit, max(1.0, config.rate_burst)
        if (config.engine is None) != (old.engine is None) or config.lock_memory != old.lock_memory:
            log.warning("SIGHUP: [engine] and lock_memory changes take effect at the next start")
        self.counters["reloads"] += 1
        log.info("SIGHUP: reloaded %s", self.config_path)

    @staticmethod
    def _join_peers(peers: list[Peer], limit: float) -> None:
        deadline = time.monotonic() + limit
        for peer in peers:
            if peer.thread is not None:
                peer.thread.join(max(0.0, deadline - time.monotonic()))

    def _close_listener(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass
        if self._created_path is not None:
            try:
                os.unlink(self._created_path)
            except OSError:
                pass
            self._created_path = None

    def _drain(self) -> None:
        self._stopping = True
        self._close_listener()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)  # its thread wakes, releases, closes
            except OSError:
                pass
        # A peer that is reading ends at once and releases its own; one blocked in the
        # engine (a wait_ready without timeout, a long populate) is woken by the engine's
        # close, which releases whatever is left.
        self._join_peers(peers, DRAIN_GRACE)
        if self._owns_allocator:
            try:
                self.allocator.close()
            except Exception:
                log.exception("closing the engine failed")
        self._join_peers(peers, 30.0)
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
            except Exception:
                pass
        if all(p.thread is None or not p.thread.is_alive() for p in peers):
            os.close(self._wake_fd)  # else a peer still blocked would write to a reused number
        log.info("drained: %d connections served", self.counters["connections"])
        self._stopped.set()

    # ------------------------------------------------------------------ one peer
    def _run_peer(self, peer: Peer) -> None:
        poller = selectors.DefaultSelector()
        poller.register(peer.sock, selectors.EVENT_READ)
        poller.register(peer.event_fd, selectors.EVENT_READ)
        try:
            while not self._stopping:
                ready = {key.fd for key, _ in poller.select()}
                if peer.event_fd in ready:
                    try:
                        os.eventfd_read(peer.event_fd)
                    except BlockingIOError:
                        pass
                    self._send_events(peer)
                if peer.sock.fileno() in ready and not self._serve_one(peer):
                    break
        except OSError as exc:
            log.debug("peer %r: %s", peer, exc)
        except Exception:
            log.exception("peer %r failed", peer)
        finally:
            poller.close()
            self._close_peer(peer)

    def _serve_one(self, peer: Peer) -> bool:
        """Reads and answers one message; False when the peer is to be dropped."""
        try:
            data, ancdata, flags, _ = peer.sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4),
                                                        socket.MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, BrokenPipeError):
            return False
        closed_fds = _close_received_fds(ancdata)
        if not data and not ancdata:
            return False  # end of stream (a zero-length message reads the same)
        request_id = None
        try:
            if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
                raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
            if flags & socket.MSG_CTRUNC or ancdata:
                raise ProtocolError(f"no request takes file descriptors ({closed_fds} received and closed)")
            message = decode_message(data)
            raw_id = message.get("id")
            if type(raw_id) is int and 0 <= raw_id < 2**53:
                request_id = raw_id
            version = message.get("v")
            if version != VERSION or isinstance(version, bool):
                raise VersionError(f"protocol version {version!r} is not spoken here; versions {list(VERSIONS)}")
            check_id(message.get("id"))
            op = message.get("op")
            if not isinstance(op, str):
                raise ProtocolError("op must be a string")
            args = message.get("args", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise ProtocolError("args must be an object")
        except VersionError as exc:
            self.counters["protocol_errors"] += 1
            self._send(peer, {**_error(request_id, "VersionError", str(exc)), "versions": list(VERSIONS)})
            return False
        except (ProtocolError, TypeError) as exc:
            self.counters["protocol_errors"] += 1
            peer.protocol_errors += 1
            self._send(peer, _error(request_id, "ProtocolError", str(exc)))
            if peer.protocol_errors >= MAX_PROTOCOL_ERRORS:
                log.info("peer %r dropped after %d protocol errors", peer, peer.protocol_errors)
                return False
            return True
        if op != "bye" and not peer.bucket.take():  # leaving is never refused
            self.counters["rate_limited"] += 1
            self._send(peer, _error(request_id, "RateLimited",
                                    f"more than {self.config.rate_limit:g} requests per second"))
            return True
        handler = self._ops.get(op)
        if handler is None:
            self.counters["protocol_errors"] += 1
            peer.protocol_errors += 1
            self._send(peer, _error(request_id, "ProtocolError", f"unknown op {op[:40]!r}"))
            return peer.protocol_errors < MAX_PROTOCOL_ERRORS
        self.counters["requests"] += 1
        drop = False
        fds: list[int] = []
        try:
            answer = handler(self, peer, args)
            if isinstance(answer, _Answer):
                result, fds = answer.result, answer.fds
            else:
                result = answer
            reply: dict[str, Any] = {"v": VERSION, "id": request_id, "ok": True, "result": result}
            if fds:
                reply["fds"] = len(fds)
        except _Drop:
            reply, drop = {"v": VERSION, "id": request_id, "ok": True, "result": {}}, True
        except Exception as exc:  # every failure is the peer's answer, never the broker's end
            kind = _error_type(exc)
            if kind == "AllocationError" and not isinstance(exc, (AllocationError, OSError)):
                log.exception("op %s of %r failed", op, peer)
            message_text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            reply = _error(request_id, kind, str(message_text))
        self._send(peer, reply, fds)
        return not drop

    def _send(self, peer: Peer, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            data = encode_message(message)
        except ValueError:
            data = encode_message(_error(message.get("id"), "ProtocolError",
                                         f"the answer is larger than {MAX_MESSAGE} bytes"))
            fds = None
        if fds:
            socket.send_fds(peer.sock, [data], fds)
        else:
            peer.sock.send(data)

    def _send_events(self, peer: Peer) -> None:
        while peer.events:
            event = peer.events.popleft()
            if peer.events_dropped:
                event["dropped"] = peer.events_dropped
                peer.events_dropped = 0
            self._send(peer, event)

    def _close_peer(self, peer: Peer) -> None:
        with self._lock:
            held = list(peer.held)
        for allocation_id in held:
            claim = peer.claims.pop(allocation_id, None)
            try:
                if claim is not None:
                    claim.release(_CLOSE_FEEDBACK)
                else:
                    self.allocator.release_allocation(allocation_id, _CLOSE_FEEDBACK)
            except (KeyError, RuntimeError):
                pass  # ended meanwhile, or the engine closed (which released it)
            except Exception:
                log.exception("releasing %d of %r failed", allocation_id, peer)
            self._forget(allocation_id)
        for close in (peer.sock.close, lambda: os.close(peer.pidfd)):
            try:
                close()
            except OSError:
                pass
        with self._lock:
            # under the lock: a listener that found this peer before its allocations were
            # forgotten writes its eventfd under the lock too, so it never writes to the
            # number after close (another connection may have been given it by then)
            try:
                os.close(peer.event_fd)
            except OSError:
                pass
            peer.event_fd = -1
            # gone from the peers only once its descriptors are: status's connection count
            # never runs ahead of the fd table
            self._peers.pop(peer.serial, None)
        try:
            os.eventfd_write(self._wake_fd, 1)  # descriptors were freed: accepting may resume
        except OSError:
            pass  # drained and closed meanwhile
        log.debug("peer %r closed; %d allocations released", peer, len(held))

    # ------------------------------------------------------------------ the registry
    def _register(self, peer: Peer, allocation_id: int, rtype: ResourceType, booked: float) -> None:
        """Files allocation_id under peer (called with self._lock held)."""
        self._owners[allocation_id] = peer
        peer.held[allocation_id] = (rtype, booked)

    def _forget(self, allocation_id: int) -> None:
        """allocation_id ended: out of the registry, its booking refunded. Idempotent."""
        with self._lock:
            peer = self._owners.pop(allocation_id, None)
            if peer is None:
                return
            rtype, booked = peer.held.pop(allocation_id, (None, 0.0))
            if rtype is not None:
                usage = self._usage.get(peer.uid)
                if usage is not None:
                    usage[rtype] = max(0.0, usage[rtype] - booked)
                    if usage[rtype] <= 1e-9:
                        del usage[rtype]
                    if not usage:
                        del self._usage[peer.uid]
        if threading.current_thread() is peer.thread:  # the claims are the peer thread's
            peer.claims.pop(allocation_id, None)
            peer.handed_memory.discard(allocation_id)

    def _book(self, peer: Peer, amounts: list[tuple[ResourceType, float]]) -> None:
        """Checks the peer's uid quota and its allocation count for amounts, and books
        them (called with self._lock held); QuotaExceeded / PermissionError books
        nothing."""
        if len(peer.held) + len(amounts) > self.config.max_allocations:
            raise PermissionError(f"a connection may hold at most {self.config.max_allocations} allocations")
        quota = self.config.quota_for(peer.uid)
        usage = self._usage.setdefault(peer.uid, collections.defaultdict(float))
        if quota is not None:
            wanted: collections.defaultdict[ResourceType, float] = collections.defaultdict(float)
            for rtype, amount in amounts:
                wanted[rtype] += amount
            for rtype, amount in wanted.items():
                limit = quota.get(rtype, math.inf)
                if usage[rtype] + amount > limit + 1e-9:
                    if not usage:
                        del self._usage[peer.uid]
                    raise QuotaExceeded(f"quota of uid {peer.uid}: {rtype.name} allocations may hold at most "
                                        f"{limit:g} together; {usage[rtype]:g} held, {amount:g} asked")
        for rtype, amount in amounts:
            usage[rtype] += amount

    def _unbook(self, peer: Peer, amounts: list[tuple[ResourceType, float]]) -> None:
        with self._lock:
            usage = self._usage.get(peer.uid)
            if usage is None:
                return
            for rtype, amount in amounts:
                usage[rtype] = max(0.0, usage[rtype] - amount)
                if usage[rtype] <= 1e-9:
                    del usage[rtype]
            if not usage:
                del self._usage[peer.uid]

    def _planned(self, request: ResourceRequest) -> float:
        strategy = self.allocator.strategies.get(request.resource_type)
        planned = getattr(strategy, "planned_amount", None)
        if planned is None:
            return request.predicted_need
        return float(planned(request, request.predicted_need))

    def _own(self, peer: Peer, allocation_id: Any) -> int:
        """allocation_id if it is the peer's; KeyError (the same as for an unknown id)."""
        allocation_id = check_allocation_id(allocation_id)
        with self._lock:
            if self._owners.get(allocation_id) is not peer:
                raise KeyError(f"unknown allocation {allocation_id}")
        return allocation_id

    def _make_listener(self, name: str) -> Callable[[Any], None]:
        ended = name != ALLOCATED

        def listener(snapshot: Any) -> None:
            # on the engine's worker (or the peer's own thread): dictionary work only
            allocation_id = getattr(snapshot, "allocation_id", None)
            if allocation_id is None:
                return
            with self._lock:
                peer = self._owners.get(allocation_id)
            if peer is None:
                return
            if name in peer.subscribed:
                if len(peer.events) >= MAX_EVENTS_QUEUED:
                    peer.events_dropped += 1
                    self.counters["events_dropped"] += 1
                else:
                    peer.events.append({"v": VERSION, "event": name,
                                        "data": allocation_to_json(snapshot, owner_pid=peer.pid,
                                                                   owner_uid=peer.uid)})
                    with self._lock:  # see _close_peer: the fd is closed under this lock
                        if peer.event_fd >= 0:
                            try:
                                os.eventfd_write(peer.event_fd, 1)  # non-blocking: never waits
                            except OSError:
                                pass  # a counter at its maximum: the peer is woken already
            if ended:
                self._forget(allocation_id)

        return listener

    # ------------------------------------------------------------------ checks on what peers say
    def _check_target(self, peer: Peer, target: Any) -> int:
        """The pid a CPU pin may touch for peer: the peer itself (None), or a process of
        its uid (root: any), checked through a pidfd; PermissionError / ValueError."""
        if target is None or target == peer.pid:
            if not _pidfd_alive(peer.pidfd):
                raise ProcessLookupError(f"the peer's process {peer.pid} is gone")
            return peer.pid
        if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < 1 << 31:
            raise ValueError(f"target_process_id must be a positive int, not {target!r}"[:200])
        try:
            pidfd = os.pidfd_open(target)
        except ProcessLookupError:
            raise ValueError(f"target_process_id {target}: no such process") from None
        try:
            uids = _process_uids(target)
            if uids is None or not _pidfd_alive(pidfd):
                raise ValueError(f"target_process_id {target}: no such process")
            if peer.uid != 0 and any(u != peer.uid for u in uids):
                raise PermissionError(f"target_process_id {target} does not belong to uid {peer.uid}")
        finally:
            os.close(pidfd)
        return target

    def _check_request(self, peer: Peer, request: ResourceRequest) -> ResourceRequest:
        m = request.metadata
        m.user_id = str(peer.uid)  # never the client's word
        m.target_application = peer.application(m.target_application)
        if m.target_process_id is not None:
            m.target_process_id = self._check_target(peer, m.target_process_id)
        if request.resource_type in _PATH_TYPES and m.custom_properties and peer.uid not in (0, os.geteuid()):
            raise PermissionError(f"{request.resource_type.name} requests naming paths are served only to uid "
                                  f"{os.geteuid()} and root: the broker would open them with its own rights")
        return request

    # ------------------------------------------------------------------ the operations
    def _op_hello(self, peer: Peer, args: dict[str, Any]) -> Any:
        client = args.get("client")
        if client is not None and isinstance(client, str):
            log.debug("peer %r is %s", peer, client[:80])
        return {"versions": list(VERSIONS), "server": f"prealloc {__version__}", "pid": os.getpid(),
                "uid": os.geteuid(), "peer": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}}

    def _op_request_preallocation(self, peer: Peer, args: dict[str, Any]) -> Any:
        """As in-process: allocates now (on the peer's thread) and answers the
        allocation — ALLOCATED, or FAILED with its reason."""
        request = self._check_request(peer, request_from_json(args))
        booked = [(request.resource_type, self._planned(request))]
        with self._lock:
            self._book(peer, booked)
        try:
            snapshot = self.allocator.request_preallocation(request)
        except BaseException:
            self._unbook(peer, booked)
            raise
        live = snapshot.status in (AllocationStatus.ALLOCATED, AllocationStatus.ACTIVE)
        with self._lock:
            if live:
                self._register(peer, snapshot.allocation_id, request.resource_type, booked[0][1])
        if not live:
            self._unbook(peer, booked)
        else:
            self._forget_if_ended(snapshot.allocation_id)
            if ALLOCATED in peer.subscribed:  # its event was emitted before the id was filed
                self._make_listener(ALLOCATED)(snapshot)
        return allocation_to_json(snapshot, owner_pid=peer.pid, owner_uid=peer.uid)

    def _op_submit(self, peer: Peer, args: dict[str, Any]) -> Any:
        """Queues the request for the engine's worker; answers its id (PENDING)."""
        request = self._check_request(peer, request_from_json(args))
        booked = [(request.resource_type, self._planned(request))]
        with self._lock:  # submit only queues: the lock is never held across a wait
            self._book(peer, booked)
            try:
                allocation_id = self.allocator.submit(request)
            except BaseException:
                self._unbook_locked(peer, booked)
                raise
            self._register(peer, allocation_id, request.resource_type, booked[0][1])
        self._forget_if_ended(allocation_id)
        return {"allocation_id": allocation_id}

    def _unbook_locked(self, peer: Peer, amounts: list[tuple[ResourceType, float]]) -> None:
        self._unbook(peer, amounts)

    def _forget_if_ended(self, allocation_id: int) -> None:
        # failed or dropped before it was filed (its event found no owner): the record
        # is gone from the engine, so it must go from the registry too
        if self.allocator.get_allocation(allocation_id) is None:
            self._forget(allocation_id)

    def _op_handle_prediction(self, peer: Peer, args: dict[str, Any]) -> Any:
        prediction = prediction_from_json(args)
        pre = self.allocator
        if prediction.confidence < pre.config.min_confidence:
            return {"allocation_ids": []}
        translator = pre.config.translator
        if translator is None:
            raise ValueError("the broker has no translator configured ([engine.translator] in its config)")
        if prediction.target_process_id is not None:
            prediction.target_process_id = self._check_target(peer, prediction.target_process_id)
        requests = [self._check_request(peer, r.validate()) for r in translator.translate(prediction)]
        booked = [(r.resource_type, self._planned(r)) for r in requests]
        ids: list[int] = []
        with self._lock:
            self._book(peer, booked)
            try:
                for request, (rtype, amount) in zip(requests, booked):
                    allocation_id = pre.submit(request)
                    self._register(peer, allocation_id, rtype, amount)
                    ids.append(allocation_id)
            except BaseException:
                self._unbook(peer, booked[len(ids):])
                raise
        for allocation_id in ids:
            self._forget_if_ended(allocation_id)
        return {"allocation_ids": ids}

    def _op_wait_ready(self, peer: Peer, args: dict[str, Any]) -> Any:
        ids = args.get("allocation_ids")
        if not isinstance(ids, list) or len(ids) > MAX_IDS_PER_CALL:
            raise TypeError(f"allocation_ids must be a list of at most {MAX_IDS_PER_CALL} ids")
        own = [self._own(peer, i) for i in ids]
        timeout = args.get("timeout")
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        return {"ready": self.allocator.wait_ready(own, timeout)}

    def _hand_over(self, peer: Peer, claim: Claim, extra: dict[str, Any] | None = None) -> _Answer:
        allocation_id = claim.allocation_id
        peer.claims[allocation_id] = claim
        snapshot = self.allocator.get_allocation(allocation_id)
        result: dict[str, Any] = allocation_to_json(snapshot, owner_pid=peer.pid, owner_uid=peer.uid) \
            if snapshot is not None else {"allocation_id": allocation_id}
        result["preallocated"] = claim.preallocated
        if extra:
            result.update(extra)
        fds: list[int] = []
        if claim.resource_type is ResourceType.MEMORY:
            region = claim.resource
            fd = getattr(region, "fd", None)
            if fd is None:
                raise AllocationError("memory: the broker's reservation has no memfd to hand over")
            # the client's mapping must never run past the file's end (SIGBUS): no shrink,
            # and no one may lift that
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            peer.handed_memory.add(allocation_id)
            result["memory"] = {"size": region.size, "offset": 0}
            fds.append(fd)
        elif claim.resource_type is ResourceType.CPU:
            result["cpu"] = {"cores": sorted(claim.resource)}
        return _Answer(result, fds)

    def _op_claim(self, peer: Peer, args: dict[str, Any]) -> Any:
        allocation_id = self._own(peer, args.get("allocation_id"))
        expected = args.get("resource_type")
        expected_type = None if expected is None else resource_type_from_json(expected)
        with self._lock:
            rtype = peer.held[allocation_id][0] if allocation_id in peer.held else None
        if expected_type is not None and rtype is not None and rtype is not expected_type:
            # checked before anything is claimed: a CPU claim would pin the peer already
            raise WrongResourceType(f"allocation {allocation_id} is {rtype.name.lower()}, "
                                    f"not {expected_type.name.lower()}")
        target = None
        if rtype is ResourceType.CPU:
            target = self._check_target(peer, args.get("target_process_id"))
        claim = self.allocator.claim(allocation_id, target_process_id=target)
        return self._hand_over_or_release(peer, claim)

    def _hand_over_or_release(self, peer: Peer, claim: Claim) -> Any:
        """The claim's answer; a claim that cannot be handed over (the peer gone, no fd
        left) is released at once rather than held for nobody."""
        try:
            return self._hand_over(peer, claim)
        except BaseException:
            peer.claims.pop(claim.allocation_id, None)
            claim.release(_CLOSE_FEEDBACK)
            self._forget(claim.allocation_id)
            raise

    def _op_acquire(self, peer: Peer, args: dict[str, Any]) -> Any:
        rtype = resource_type_from_json(args.get("resource_type"))
        amount = args.get("amount")
        application = args.get("target_application")
        if application is not None and not isinstance(application, str):
            raise TypeError("target_application must be a string or null")
        target = self._check_target(peer, args.get("target_process_id")) if rtype is ResourceType.CPU else None
        if rtype in _PATH_TYPES and peer.uid not in (0, os.geteuid()):
            raise PermissionError(f"{rtype.name} is served only to uid {os.geteuid()} and root")
        probe = ResourceRequest(rtype, amount).validate()  # type: ignore[arg-type]  # checked here
        booked = [(rtype, self._planned(probe))]
        with self._lock:
            self._book(peer, booked)
        try:
            claim = self.allocator.acquire(rtype, probe.predicted_need, target_application=peer.application(
                application), target_process_id=target)
        except BaseException:
            self._unbook(peer, booked)
            raise
        allocation_id = claim.allocation_id
        with self._lock:
            if allocation_id in self._owners:  # a preallocation of the peer's own: booked already
                self._unbook_locked(peer, booked)
            else:
                self._register(peer, allocation_id, rtype, booked[0][1])
        return self._hand_over_or_release(peer, claim)

    def _op_adjust_allocation(self, peer: Peer, args: dict[str, Any]) -> Any:
        allocation_id = self._own(peer, args.get("allocation_id"))
        new_amount = args.get("new_amount")
        if allocation_id in peer.handed_memory:
            raise ValueError("a claimed MEMORY allocation is mapped by the client (its memfd is sealed against "
                             "shrinking); release it and acquire anew to change its size")
        with self._lock:
            rtype, booked = peer.held[allocation_id]
        snapshot = self.allocator.get_allocation(allocation_id)
        if snapshot is None:
            self._forget(allocation_id)
            raise KeyError(f"unknown allocation {allocation_id}")
        probe = ResourceRequest(rtype, new_amount).validate()  # type: ignore[arg-type]  # checked here
        planned = self._planned(probe)
        growth = max(0.0, planned - booked)
        if growth:
            with self._lock:
                self._book(peer, [(rtype, growth)])
        try:
            adjusted = self.allocator.adjust_allocation(allocation_id, probe.predicted_need)
        except BaseException:
            self._unbook(peer, [(rtype, growth)])
            raise
        if not adjusted:
            self._unbook(peer, [(rtype, growth)])
            return {"adjusted": False}
        snapshot = self.allocator.get_allocation(allocation_id)
        held = snapshot.allocated_amount if snapshot is not None else planned
        with self._lock:
            if allocation_id in peer.held:
                usage = self._usage.setdefault(peer.uid, collections.defaultdict(float))
                usage[rtype] += held - (booked + growth)
                peer.held[allocation_id] = (rtype, held)
        return {"adjusted": True}

    def _op_release_allocation(self, peer: Peer, args: dict[str, Any]) -> Any:
        allocation_id = self._own(peer, args.get("allocation_id"))
        feedback = feedback_from_json(args.get("feedback"))
        claim = peer.claims.pop(allocation_id, None)
        try:
            if claim is not None:
                released = claim.release(feedback)
            else:
                released = self.allocator.release_allocation(allocation_id, feedback)
        finally:
            self._forget(allocation_id)
        return {"released": bool(released)}

    def _op_cancel_request(self, peer: Peer, args: dict[str, Any]) -> Any:
        allocation_id = self._own(peer, args.get("allocation_id"))
        cancelled = self.allocator.cancel_request(allocation_id)
        if cancelled:
            self._forget(allocation_id)
        return {"cancelled": cancelled}

    def _op_get_allocation(self, peer: Peer, args: dict[str, Any]) -> Any:
        allocation_id = self._own(peer, args.get("allocation_id"))
        snapshot = self.allocator.get_allocation(allocation_id)
        if snapshot is None:
            self._forget(allocation_id)
            return None
        return allocation_to_json(snapshot, owner_pid=peer.pid, owner_uid=peer.uid)

    def _op_allocations(self, peer: Peer, args: dict[str, Any]) -> Any:
        statuses = args.get("statuses")
        wanted: set[AllocationStatus] | None = None
        if statuses is not None:
            if not isinstance(statuses, list) or len(statuses) > 16:
                raise TypeError("statuses must be a list of status names")
            wanted = {status_from_json(s) for s in statuses}
        everyone = args.get("all", False)
        if not isinstance(everyone, bool):
            raise TypeError("all must be a boolean")
        if everyone and peer.uid != 0:
            raise PermissionError("only root may list every peer's allocations")
        with self._lock:
            owned = [(aid, p) for aid, p in self._owners.items() if everyone or p is peer]
        out = []
        for allocation_id, owner in owned:
            snapshot = self.allocator.get_allocation(allocation_id)
            if snapshot is None or (wanted is not None and snapshot.status not in wanted):
                continue
            out.append(allocation_to_json(snapshot, owner_pid=owner.pid, owner_uid=owner.uid))
        return {"allocations": out}

    def _op_get_statistics(self, peer: Peer, args: dict[str, Any]) -> Any:
        return statistics_to_json(self.allocator.get_statistics())

    def _op_status(self, peer: Peer, args: dict[str, Any]) -> Any:
        return self.status(None if peer.uid == 0 else peer)

    def status(self, peer: Peer | None = None) -> dict[str, Any]:
        """The status op's answer: every peer's rows (peer None), or the rows of every
        connection of the peer's uid (a `prealloc status` run beside a host is a
        connection of its own; it may look at its uid's holdings, not touch them)."""
        now = time.monotonic()
        with self._lock:
            owned = [(aid, p) for aid, p in self._owners.items() if peer is None or p.uid == peer.uid]
            usage = {str(uid): {t.name.lower(): v for t, v in u.items()}
                     for uid, u in self._usage.items() if peer is None or uid == peer.uid}
            # a user learns how many connections its own uid has, not how busy others are
            connections = sum(1 for p in self._peers.values() if peer is None or p.uid == peer.uid)
        rows = []
        for allocation_id, owner in owned:
            snapshot = self.allocator.get_allocation(allocation_id)
            if snapshot is None:
                continue
            started = snapshot.allocated_at
            rows.append({"allocation_id": allocation_id, "owner_pid": owner.pid, "owner_uid": owner.uid,
                         "command": owner.comm, "resource_type": snapshot.resource_type.name.lower(),
                         "requested": plain(snapshot.requested_amount), "effective": plain(snapshot.allocated_amount),
                         "status": snapshot.status.name.lower(),
                         "age_s": plain(now - started) if started is not None else None,
                         "expires_in_s": plain(snapshot.expires_at - now) if snapshot.expires_at is not None
                         else None})
        return {"reservations": rows, "quotas": usage, "journal": _journal_entries(peer.uid if peer else None),
                "connections": connections}

    def _op_subscribe(self, peer: Peer, args: dict[str, Any]) -> Any:
        from .events import canonical_event

        names = args.get("events")
        if names is None:
            wanted = frozenset(EVENT_NAMES)
        else:
            if not isinstance(names, list) or len(names) > 16 or not all(isinstance(n, str) for n in names):
                raise TypeError("events must be a list of event names")
            wanted = frozenset(canonical_event(n) for n in names)
            unknown = sorted(wanted - set(EVENT_NAMES))
            if unknown:
                raise ValueError(f"events {unknown} are not sent; valid: {list(EVENT_NAMES)}")
        peer.subscribed = peer.subscribed | wanted
        return {"subscribed": sorted(peer.subscribed)}

    def _op_bye(self, peer: Peer, args: dict[str, Any]) -> Any:
        raise _Drop()

    _ops: dict[str, Callable[[Broker, Peer, dict[str, Any]], Any]] = {
        "hello": _op_hello, "request_preallocation": _op_request_preallocation, "submit": _op_submit,
        "handle_prediction": _op_handle_prediction, "wait_ready": _op_wait_ready, "claim": _op_claim,
        "acquire": _op_acquire, "adjust_allocation": _op_adjust_allocation,
        "release_allocation": _op_release_allocation, "cancel_request": _op_cancel_request,
        "get_allocation": _op_get_allocation, "allocations": _op_allocations,
        "get_statistics": _op_get_statistics, "status": _op_status, "subscribe": _op_subscribe, "bye": _op_bye,
    }

    # ------------------------------------------------------------------ introspection
    def peers(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    def held(self) -> dict[int, int]:
        """allocation id -> the pid of the peer holding it."""
        with self._lock:
            return {aid: p.pid for aid, p in self._owners.items()}

    def usage(self) -> dict[int, dict[ResourceType, float]]:
        with self._lock:
            return {uid: dict(u) for uid, u in self._usage.items()}

    def claim_of(self, allocation_id: int) -> Claim | None:
        """The broker's own Claim of a handed-over allocation (tests look at its pages)."""
        with self._lock:
            peer = self._owners.get(allocation_id)
        return None if peer is None else peer.claims.get(allocation_id)

    # ------------------------------------------------------------------ metrics
    def _start_metrics(self, address: str) -> Any:
        try:
            from prometheus_client import start_http_server
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
            from prometheus_client.registry import CollectorRegistry

            from .prometheus import PreallocCollector
        except ImportError as exc:
            raise RuntimeError(f"--metrics needs the prometheus extra (pip install 'prealloc[prometheus]'): {exc}") \
                from None
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"metrics address must be HOST:PORT, not {address!r}") from None
        registry = CollectorRegistry()
        PreallocCollector(self.allocator).register(registry)
        broker = self

        class BrokerCollector:
            def collect(self) -> Any:
                gauge = GaugeMetricFamily("prealloc_broker_connections", "peers connected now")
                gauge.add_metric([], len(broker.peers()))
                yield gauge
                gauge = GaugeMetricFamily("prealloc_broker_allocations", "allocations held by peers now")
                gauge.add_metric([], len(broker.held()))
                yield gauge
                for name in ("connections", "requests", "protocol_errors", "rate_limited", "events_dropped",
                             "refused_connections", "reloads"):
                    counter = CounterMetricFamily(f"prealloc_broker_{name}", f"broker {name.replace('_', ' ')}")
                    counter.add_metric([], broker.counters[name])
                    yield counter

        registry.register(BrokerCollector())  # type: ignore[arg-type]
        started = start_http_server(port, addr=host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return started[0] if isinstance(started, tuple) else None


def _noted_by_the_wakeup_fd(signum: int, frame: Any) -> None:
    """The Python-level handler of the serve signals: the C-level one has written the
    number to the wakeup pipe already, which is what the loop acts on (once)."""


def _read_signal_numbers(fd: int) -> list[int]:
    """The signal numbers waiting in the wakeup pipe (one byte each), in order."""
    numbers: list[int] = []
    while True:
        try:
            data = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            return numbers
        if not data:
            return numbers
        numbers.extend(n for n in data if n in SERVE_SIGNALS)


def _raise_fd_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one: the broker keeps a memfd per MEMORY
    allocation and three descriptors per peer, more than the usual 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.info("RLIMIT_NOFILE stays %d: %s", soft, exc)


def _error(request_id: int | None, kind: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": request_id, "ok": False, "error": {"type": kind, "message": message[:1024]}}


def _close_received_fds(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Closes every descriptor a control message brought; how many."""
    count = 0
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            for (fd,) in struct.iter_unpack("i", data[:usable]):
                try:
                    os.close(fd)
                except OSError:
                    pass
                count += 1
    return count


def _journal_entries(uid: int | None) -> list[dict[str, Any]]:
    """The journal's entries (their kind, owner, target), at most 256; for a uid, only
    those whose target is a process of that uid (another user's pins are not its
    business)."""
    from . import journal

    try:
        directory = journal.default_directory()
        names = sorted(p for p in os.listdir(directory) if p.endswith(".json"))[:256]
    except OSError:
        return []
    import json

    out = []
    for name in names:
        try:
            with open(directory / name, "rb") as entry_file:
                data = json.loads(entry_file.read(65536))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        target = data.get("target")
        if uid is not None:
            pid = target.get("pid") if isinstance(target, dict) else None
            uids = _process_uids(pid) if type(pid) is int and pid > 0 else None
            if uids is None or uids[0] != uid:
                continue
        out.append({"name": name, "kind": data.get("kind", "affinity"), "owner": data.get("owner"),
                    "target": target})
    return out


# ---------------------------------------------------------------------------------------
# the listening socket


def inherited_listen_fd() -> int | None:
    """The listening socket systemd passed (LISTEN_PID is us, LISTEN_FDS >= 1), else
    None. The variables are removed so a child never takes them for its own."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if not pid or not count:
        return None
    try:
        if int(pid) != os.getpid() or int(count) < 1:
            return None
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return SD_LISTEN_FDS_START


def _adopt_listener(fd: int) -> socket.socket:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"inherited fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise ValueError(f"inherited fd {fd} is not a SOCK_SEQPACKET Unix socket (ListenSequentialPacket=)")
    os.set_inheritable(fd, False)
    return sock


def _bind_listener(path: Path, group: str | int | None, *, default: bool) -> socket.socket:
    directory = path.parent
    if default:
        # our own directory: 0755 for root's (anyone may reach the socket; its mode
        # decides), else 0700 and checked like the journal's
        private = os.geteuid() != 0
        try:
            directory.mkdir(mode=0o700 if private else 0o755, parents=False, exist_ok=True)
        except FileNotFoundError:
            directory.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or \
                (private and info.st_mode & 0o077):
            raise PermissionError(f"{directory} is not a private directory of uid {os.geteuid()}: refusing "
                                  "to listen there")
    if path.exists() or path.is_symlink():
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            os.unlink(path)  # a dead broker's socket
        else:
            raise RuntimeError(f"another broker is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o117)  # the socket is born 0660: no window where it is wider
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    if group is not None:
        gid = group if isinstance(group, int) else (int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid)
        os.chown(path, -1, gid)
    sock.listen(128)
    return sock


class _BrokerPreallocator(ResourcePreallocator):
    """The broker's engine: the default strategies, MEMORY on memfds (shareable) and
    locked where the broker may."""

    DEFAULT_NAME = "prealloc-broker"

    def __init__(self, config: PreallocatorConfig, *, lock_memory: bool) -> None:
        self._lock_memory = lock_memory
        super().__init__(config)

    def _default_strategies(self) -> dict[ResourceType, Any]:
        from .strategies import MemoryAllocationStrategy

        strategies = super()._default_strategies()
        strategies[ResourceType.MEMORY] = MemoryAllocationStrategy(shareable=True, lock=self._lock_memory)
        return strategies


def serve(socket_path: str | os.PathLike[str] | None = None, *, config_path: str | os.PathLike[str] | None = None,
          group: str | None = None, metrics_address: str | None = None) -> int:
    """``prealloc serve``: runs the broker in the foreground until SIGTERM; 0."""
    broker = Broker(socket_path, config_path=config_path, group=group, metrics_address=metrics_address)
    return broker.serve()


__all__ = ["Broker", "BrokerConfig", "broker_config_from_dict", "client_socket_path", "default_socket_path",
           "inherited_listen_fd", "load_broker_config", "serve"]

