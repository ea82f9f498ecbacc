"""GPU memory through NVML (``pynvml``, from the ``nvidia-ml-py`` distribution).

Figures are NVML's own, read at each sample:

- memory from ``nvmlDeviceGetMemoryInfo`` with the **v2** struct: v1's ``used`` counts
  the memory the driver reserves for itself (about 900 MB on an idle A100), so v1 says a
  GPU nobody uses is partly used; v2 reports that as ``reserved`` and ``used`` is what
  processes hold. ``free`` is the same in both;
- utilisation (``nvmlDeviceGetUtilizationRates``; None where the device does not report
  it, as MIG instances do not);
- this process's own usage, from the compute processes NVML lists (by pid: in a container
  whose PID namespace is not the host's NVML's pids differ and this reads 0);
- a GPU in MIG mode is reported as its MIG instances, each a device of its own (that is
  what CUDA sees), and the parent is left out of the totals so nothing counts twice.

The monitor's ResourceAvailability for GPU is in MiB over every device: total and
available are the sums of total and free, used the sum of v2 used. An allocation lives on
one device, so the GPU strategy checks the chosen device's own free memory as well.

No NVML (``nvidia-ml-py`` not installed, ``NVMLError_LibraryNotFound``: no driver
installed, ``NVMLError_DriverNotLoaded``) or no device makes the constructor raise
:class:`GpuUnavailable` with the reason — never a crash later, never a made-up figure.
:func:`nvml_unavailable_reason` asks the same question without keeping anything.

Change delivery is the base class's sampling watcher (NVML has no event for "free memory
moved"): every ``sample_interval`` seconds, plus at once on ``notify_changed``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..types import ResourceAvailability, ResourceType
from .base import ResourceMonitor, availability_from

MiB = 1 << 20

__all__ = ["GpuDeviceInfo", "GpuUnavailable", "NvmlMonitor", "nvml_unavailable_reason"]


class GpuUnavailable(RuntimeError):
    """NVML cannot report GPUs here (or stopped reporting one); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GpuDeviceInfo:
    """One device as NVML sees it now. Bytes throughout."""

    index: int  # NVML index of the GPU (of the parent GPU, for a MIG instance)
    mig_index: int | None  # the MIG instance's slot on its parent, None for a whole GPU
    uuid: str  # "GPU-..." or "MIG-..."; CUDA_VISIBLE_DEVICES takes it
    name: str
    total: int
    free: int
    used: int  # v2: what processes hold, without the driver's reservation
    reserved: int  # the driver's own reservation (in v1's used)
    utilization_gpu: int | None  # percent of time a kernel ran, None where not reported
    utilization_memory: int | None
    process_used: int  # this process's usage, as NVML lists it
    processes: tuple[tuple[int, int], ...]  # (pid, bytes) of the compute processes

    @property
    def key(self) -> str:
        """"0" for a GPU, "0/mig1" for a MIG instance."""
        return str(self.index) if self.mig_index is None else f"{self.index}/mig{self.mig_index}"


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuUnavailable(f"pynvml is not installed (pip install 'prealloc[gpu]'): {exc}") from exc
    return pynvml


def _describe_nvml_error(pynvml: ModuleType, error: Exception, call: str) -> str:
    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        return f"{call}: NVML library not found (libnvidia-ml.so.1: no NVIDIA driver installed)"
    if isinstance(error, pynvml.NVMLError_DriverNotLoaded):
        return f"{call}: NVIDIA driver not loaded"
    return f"{call}: {error}"


def nvml_unavailable_reason() -> str | None:
    """None where NVML reports at least one device; otherwise why not. Holds nothing."""
    try:
        NvmlMonitor().close()
    except GpuUnavailable as exc:
        return exc.reason
    return None


class NvmlMonitor(ResourceMonitor):
    """GPU memory of this machine through NVML; see the module docstring.

    Thread-safe: NVML itself is, and the monitor keeps no mutable state but its NVML
    initialisation, which close ends (samples after close initialise NVML for the call).
    """

    def __init__(self, *, sample_interval: float = 1.0, change_threshold: float = 0.01) -> None:
        super().__init__(sample_interval=sample_interval, change_threshold=change_threshold)
        pynvml = _import_pynvml()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(_describe_nvml_error(pynvml, exc, "nvmlInit")) from exc
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise GpuUnavailable(_describe_nvml_error(pynvml, exc, "nvmlDeviceGetCount")) from exc
        if count == 0:
            pynvml.nvmlShutdown()
            raise GpuUnavailable("no GPU: NVML reports 0 devices")
        self._nvml = pynvml
        self._initialised = True
        self._init_lock = threading.Lock()

    @property
    def supported_types(self) -> frozenset[ResourceType]:
        return frozenset({ResourceType.GPU})

    # -- per device ----------------------------------------------------------------------

    def devices(self) -> list[GpuDeviceInfo]:
        """Every device now: whole GPUs, and the MIG instances of a GPU in MIG mode (in
        place of that GPU). Raises GpuUnavailable when NVML fails (a GPU is lost, say)."""
        with self._session():
            return self._read_devices()

    def device(self, key: int | str) -> GpuDeviceInfo:
        """One device by NVML index (int) or key ("0", "1/mig0"); ValueError if absent."""
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"key must be an NVML index or a device key, not {type(key).__name__}")
        wanted = str(key)
        devices = self.devices()
        for info in devices:
            if info.key == wanted or info.uuid == wanted:
                return info
        raise ValueError(f"no GPU device {key!r}; devices are {[d.key for d in devices]}")

    def driver_version(self) -> str:
        with self._session():
            version = self._call("nvmlSystemGetDriverVersion")
        return version.decode() if isinstance(version, bytes) else str(version)

    # -- the contract --------------------------------------------------------------------

    def _sample(self, resource_type: ResourceType) -> ResourceAvailability:
        devices = self.devices()
        return availability_from(
            resource_type,
            sum(d.total for d in devices) / MiB,
            sum(d.free for d in devices) / MiB,
            used=sum(d.used for d in devices) / MiB,
        )

    def _close_resources(self) -> None:
        with self._init_lock:
            if self._initialised:
                self._initialised = False
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass  # the driver went away: nothing left to shut down

    # -- internals -----------------------------------------------------------------------

    def _session(self) -> _NvmlSession:
        return _NvmlSession(self)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        pynvml = self._nvml
        try:
            return getattr(pynvml, name)(*args, **kwargs)
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(_describe_nvml_error(pynvml, exc, name)) from exc

    def _optional(self, name: str, *args: Any) -> Any:
        """The call's result, or None where the device (not supported), the container
        (no permission) or an older driver (no such function) does not give it."""
        pynvml = self._nvml
        try:
            return getattr(pynvml, name)(*args)
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission, pynvml.NVMLError_FunctionNotFound,
                getattr(pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError_FunctionNotFound)):
            return None
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(_describe_nvml_error(pynvml, exc, name)) from exc

    def _read_devices(self) -> list[GpuDeviceInfo]:
        own_pid = os.getpid()
        devices: list[GpuDeviceInfo] = []
        for index in range(self._call("nvmlDeviceGetCount")):
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            mig_handles = self._mig_handles(handle)
            if mig_handles:
                for slot, mig_handle in mig_handles:
                    devices.append(self._read_one(mig_handle, index, slot, own_pid))
            else:
                devices.append(self._read_one(handle, index, None, own_pid))
        return devices

    def _mig_handles(self, handle: Any) -> list[tuple[int, Any]]:
        pynvml = self._nvml
        mode = self._optional("nvmlDeviceGetMigMode", handle)
        if mode is None or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
            return []
        handles = []
        for slot in range(self._call("nvmlDeviceGetMaxMigDeviceCount", handle)):
            try:
                handles.append((slot, pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)))
            except pynvml.NVMLError_NotFound:
                continue  # an empty slot
            except pynvml.NVMLError as exc:
                raise GpuUnavailable(_describe_nvml_error(pynvml, exc, "nvmlDeviceGetMigDeviceHandleByIndex")) from exc
        return handles

    def _read_one(self, handle: Any, index: int, mig_index: int | None, own_pid: int) -> GpuDeviceInfo:
        pynvml = self._nvml
        memory = self._call("nvmlDeviceGetMemoryInfo", handle, version=pynvml.nvmlMemory_v2)
        utilization = self._optional("nvmlDeviceGetUtilizationRates", handle)
        processes = self._optional("nvmlDeviceGetComputeRunningProcesses", handle) or []
        listed = tuple((int(p.pid), int(p.usedGpuMemory or 0)) for p in processes)
        name = self._call("nvmlDeviceGetName", handle)
        uuid = self._call("nvmlDeviceGetUUID", handle)
        return GpuDeviceInfo(
            index=index,
            mig_index=mig_index,
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            name=name.decode() if isinstance(name, bytes) else str(name),
            total=int(memory.total),
            free=int(memory.free),
            used=int(memory.used),
            reserved=int(memory.reserved),
            utilization_gpu=None if utilization is None else int(utilization.gpu),
            utilization_memory=None if utilization is None else int(utilization.memory),
            process_used=sum(used for pid, used in listed if pid == own_pid),
            processes=listed,
        )


class _NvmlSession:
    """NVML initialised for the duration of a read: the monitor's own initialisation
    while it is open, a temporary one after close (the contract: reads work after close).
    Reads hold the monitor's lock, so close never shuts NVML down under a read (NVML
    reads take microseconds; serialising them costs nothing that matters)."""

    __slots__ = ("_monitor", "_temporary")

    def __init__(self, monitor: NvmlMonitor) -> None:
        self._monitor = monitor
        self._temporary = False

    def __enter__(self) -> None:
        monitor = self._monitor
        monitor._init_lock.acquire()
        if monitor._initialised:
            return
        try:
            monitor._nvml.nvmlInit()
        except monitor._nvml.NVMLError as exc:
            monitor._init_lock.release()
            raise GpuUnavailable(_describe_nvml_error(monitor._nvml, exc, "nvmlInit")) from exc
        self._temporary = True

    def __exit__(self, *exc_info: object) -> None:
        monitor = self._monitor
        try:
            if self._temporary:
                self._temporary = False
                try:
                    monitor._nvml.nvmlShutdown()
                except monitor._nvml.NVMLError:
                    pass
        finally:
            monitor._init_lock.release()
