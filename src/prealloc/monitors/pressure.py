"""Linux pressure stall information (PSI): readings, and triggers that wake a poller.

``/proc/pressure/{cpu,memory,io}`` (kernel 4.20+, ``CONFIG_PSI``) report the share of
wall time in which some (or all) runnable tasks were stalled waiting for that resource::

    some avg10=0.12 avg60=0.40 avg300=0.31 total=1234567
    full avg10=0.00 avg60=0.10 avg300=0.05 total=456789

avg* are percentages over 10 s / 60 s / 300 s windows, total is cumulative stall time
in microseconds. :func:`read_pressure` parses them; the same format is found in the
cgroup v2 files ``<cgroup>/{cpu,memory,io}.pressure``, which ``path`` can name.

A :class:`PressureTrigger` asks the kernel to signal when stall time exceeds
``stall_us`` within any ``window_us``: it writes ``"some <stall_us> <window_us>"``
into the file opened O_RDWR | O_NONBLOCK, and the kernel then raises POLLPRI on that
descriptor (at most once per window). ``selectors`` only knows read/write readiness,
so waiting uses ``select.poll`` with POLLPRI. The kernel's rules, which this module
checks up front so that the error names the cause:

- windows are 500 ms .. 10 s and 0 < stall <= window;
- without CAP_SYS_RESOURCE the window must be a multiple of 2 s (root in a container
  often lacks that capability: the default window here is 2 s so it works there);
- the kernel replaces the last byte written with NUL, so the NUL is written
  explicitly or the last digit of the window would be lost;
- PSI can be compiled out, or disabled at boot (``psi=0``, or
  ``CONFIG_PSI_DEFAULT_DISABLED`` without ``psi=1``): then the files are absent or a
  trigger gets EOPNOTSUPP.

Where a trigger cannot be made, :class:`PressureTriggerUnavailable` says why, and the
monitors fall back to sampling at their ``sample_interval``.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import select
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .base import read_small_file

log = logging.getLogger(__name__)

PROC_PRESSURE = Path("/proc/pressure")
RESOURCES = ("cpu", "memory", "io")
WINDOW_MIN_US = 500_000
WINDOW_MAX_US = 10_000_000
UNPRIVILEGED_WINDOW_MULTIPLE_US = 2_000_000
_CAP_SYS_RESOURCE = 24


@dataclass(frozen=True, slots=True)
class PressureLine:
    """One line of a pressure file: stalled share of time (%) and total stall (µs)."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class PressureReading:
    """A pressure file: ``some`` (at least one task stalled) and ``full`` (all non-idle
    tasks stalled; None where the kernel has no such line, as for cpu before 5.13)."""

    resource: str
    some: PressureLine
    full: PressureLine | None


class PressureTriggerUnavailable(OSError):
    """A PSI trigger could not be set up; the message says why (the errno is kept)."""


def parse_pressure(resource: str, text: str) -> PressureReading:
    """Parses the text of a pressure file; ValueError if it is not in that format."""
    lines: dict[str, PressureLine] = {}
    for raw_line in text.splitlines():
        if not raw_line.strip():
            continue
        kind, *fields = raw_line.split()
        if kind not in ("some", "full"):
            raise ValueError(f"pressure {resource}: unexpected line {raw_line!r}")
        values: dict[str, str] = {}
        for item in fields:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"pressure {resource}: malformed field {item!r} in {raw_line!r}")
            values[key] = value
        try:
            line = PressureLine(avg10=float(values["avg10"]), avg60=float(values["avg60"]),
                                avg300=float(values["avg300"]), total_us=int(values["total"]))
        except (KeyError, ValueError) as error:
            raise ValueError(f"pressure {resource}: bad line {raw_line!r}: {error}") from None
        lines[kind] = line
    if "some" not in lines:
        raise ValueError(f"pressure {resource}: no 'some' line in {text!r}")
    return PressureReading(resource=resource, some=lines["some"], full=lines.get("full"))


def pressure_available() -> bool:
    """Whether this kernel reports PSI at all."""
    return PROC_PRESSURE.is_dir()


def read_pressure(resource: str, *, path: str | os.PathLike[str] | None = None) -> PressureReading | None:
    """The current reading of /proc/pressure/<resource> (or of ``path``, e.g. a cgroup
    v2 ``memory.pressure``); None where the file does not exist or cannot be read
    (no PSI in this kernel, or PSI disabled at boot)."""
    _check_resource(resource)
    file_path = Path(path) if path is not None else PROC_PRESSURE / resource
    try:
        text = read_small_file(file_path)
    except FileNotFoundError:
        return None
    except OSError as error:
        # EOPNOTSUPP: the file exists but PSI was disabled at boot
        log.debug("cannot read %s: %s", file_path, error)
        return None
    return parse_pressure(resource, text)


def has_cap_sys_resource() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (which frees PSI triggers from the
    2-second window rule)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


class PressureTrigger:
    """A PSI trigger: POLLPRI on :meth:`fileno` when stall time within any ``window_us``
    exceeds ``stall_us``. Close it (or use ``with``) to remove it from the kernel."""

    def __init__(self, resource: str, stall_us: int, window_us: int = UNPRIVILEGED_WINDOW_MULTIPLE_US,
                 *, kind: str = "some", path: str | os.PathLike[str] | None = None) -> None:
        _check_resource(resource)
        if kind not in ("some", "full"):
            raise ValueError(f"kind must be 'some' or 'full', not {kind!r}")
        for name, value in (("stall_us", stall_us), ("window_us", window_us)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int (microseconds), not {value!r}")
        if not WINDOW_MIN_US <= window_us <= WINDOW_MAX_US:
            raise ValueError(f"window_us must be in [{WINDOW_MIN_US}, {WINDOW_MAX_US}], not {window_us}")
        if not 0 < stall_us <= window_us:
            raise ValueError(f"stall_us must be in (0, window_us={window_us}], not {stall_us}")
        self.resource = resource
        self.kind = kind
        self.stall_us = stall_us
        self.window_us = window_us
        self.path = Path(path) if path is not None else PROC_PRESSURE / resource
        if window_us % UNPRIVILEGED_WINDOW_MULTIPLE_US and not has_cap_sys_resource():
            raise PressureTriggerUnavailable(
                errno.EPERM,
                f"PSI trigger on {self.path}: a window of {window_us} us needs CAP_SYS_RESOURCE, "
                f"which this process lacks; use a multiple of {UNPRIVILEGED_WINDOW_MULTIPLE_US} us")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise PressureTriggerUnavailable(
                error.errno, f"PSI trigger: {self.path} does not exist (kernel without CONFIG_PSI, "
                             "or not Linux)") from None
        except OSError as error:
            raise PressureTriggerUnavailable(
                error.errno, f"PSI trigger: cannot open {self.path} read-write: {error.strerror}") from None
        try:
            # the kernel overwrites the last byte written with NUL: send it ourselves
            os.write(self._fd, f"{kind} {stall_us} {window_us}\0".encode())
        except OSError as error:
            os.close(self._fd)
            raise PressureTriggerUnavailable(error.errno, self._explain(error)) from None
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLPRI)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("PressureTrigger is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Waits up to timeout seconds (None: forever) for the trigger; True if it
        fired. Raises PressureTriggerUnavailable if the kernel tore the trigger down
        (POLLERR: its cgroup was removed)."""
        timeout_ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        for _, events in self._poller.poll(timeout_ms):
            if events & (select.POLLERR | select.POLLNVAL):
                raise PressureTriggerUnavailable(errno.ENODEV, f"PSI trigger on {self.path} was torn down")
            if events & select.POLLPRI:
                return True
        return False

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the descriptor is what removes the trigger

    def __enter__(self) -> PressureTrigger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"PressureTrigger({self.resource!r}, {self.kind} {self.stall_us}/{self.window_us} us, {state})"

    def _explain(self, error: OSError) -> str:
        base = f"PSI trigger '{self.kind} {self.stall_us} {self.window_us}' on {self.path}"
        if error.errno == errno.EOPNOTSUPP:
            return f"{base}: PSI is disabled in this kernel (boot with psi=1)"
        if error.errno in (errno.EPERM, errno.EACCES):
            return f"{base}: not permitted ({error.strerror})"
        if error.errno == errno.EINVAL:
            return f"{base}: the kernel refused the parameters (EINVAL)"
        if error.errno == errno.EBUSY:
            return f"{base}: a trigger already exists on this descriptor"
        return f"{base}: {error.strerror}"


def _check_resource(resource: str) -> None:
    # "irq" exists on newer kernels (CONFIG_IRQ_TIME_ACCOUNTING) and takes only "full"
    if resource not in RESOURCES and resource != "irq":
        raise ValueError(f"unknown pressure resource {resource!r}; expected one of {RESOURCES + ('irq',)}")
