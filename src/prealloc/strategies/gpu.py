"""GPU: device memory reserved through the CUDA driver's virtual memory management,
handed to the consumer zero-copy, on a warm primary context.

Binding: ctypes on the driver API (``libcuda.so.1``), not ``cuda-bindings``. The driver
API is a stable C ABI and this module needs about twenty of its entry points; ctypes
costs no dependency (cuda-bindings is a large wheel tied to one CUDA major version), so
``prealloc[gpu]`` is just ``nvidia-ml-py``, and the library is found the way every CUDA
program finds it: ``dlopen("libcuda.so.1")``. A ctypes call costs about a microsecond,
nothing next to a driver call.

An allocation (mode "vmm"):

1. retains the device's primary context (``cuDevicePrimaryCtxRetain``): creating it
   costs hundreds of milliseconds on first use, so the consumer's first CUDA call on a
   warmed device is fast. Released with the allocation;
2. reserves a virtual address range as large as the device (``cuMemAddressReserve``;
   address space costs nothing), so growth never moves the pointer;
3. creates the physical memory in chunks (``cuMemCreate``, exportable as POSIX file
   descriptors where the device supports it), maps each at the end of what is mapped
   (``cuMemMap``) and makes it read-write for the device (``cuMemSetAccess``);
4. reads NVML's used memory of the device before and after.
Any failure on the way unmaps and frees what was made, so a failed allocation leaves
nothing mapped. ``adjust`` maps or unmaps chunks at the end of the range (no copy, the
pointer stays); ``release`` unmaps and frees — deferred while a consumer still holds the
claimed :class:`GpuBuffer` or a DLPack capsule of it (the host-memory rule).

The claim is a :class:`GpuBuffer`: ``ptr``, ``size``, ``device``,
``__cuda_array_interface__`` (v3) and ``__dlpack__`` / ``__dlpack_device__``, so CuPy,
PyTorch, JAX and Numba take it without a copy, and ``export()``: one POSIX fd per chunk
(with its offset) that another process maps with :func:`import_buffer`.

The stream-ordered pool mode (``cudaMemPoolAttrReleaseThreshold``) is not offered: its
memory is the runtime's and reaches the consumer as a pointer from cudaMallocAsync on
its stream; handing over a VMM mapping is a pointer and no allocation call at all.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from ..monitors.nvml import GpuDeviceInfo, GpuUnavailable, NvmlMonitor
from ..types import ResourceAvailability, ResourceRequest, ResourceType
from .base import AllocationError, AllocationStrategy, DeferredRelease, Grant, InsufficientResources

log = logging.getLogger(__name__)

MiB = 1 << 20

__all__ = ["CudaError", "ExportedChunk", "GpuBuffer", "GpuMemoryStrategy", "GpuReservation",
           "ImportedGpuBuffer", "import_buffer"]

# driver API constants (cuda.h)
CUDA_ERROR_OUT_OF_MEMORY = 2
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_HANDLE_TYPE_NONE = 0
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
KDL_CUDA = 2  # DLPack device type


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _MemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _MemLocation),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _MemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _MemLocation), ("flags", ctypes.c_int)]


class CudaError(OSError):
    """A driver call failed; ``code`` is the CUresult, the message names the call."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call}: {message} (CUresult {code})")
        self.call = call
        self.code = code


class _Driver:
    """libcuda.so.1 through ctypes, initialised once per process."""

    _instance: _Driver | None = None
    _instance_error: str | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise GpuUnavailable(f"CUDA driver library not found (libcuda.so.1): {exc}") from exc
        c_ull = ctypes.c_ulonglong
        signatures: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
            "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
            "cuDeviceGetUuid_v2": [ctypes.c_char_p, ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
            "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
            "cuCtxPushCurrent_v2": [ctypes.c_void_p],
            "cuCtxPopCurrent_v2": [ctypes.POINTER(ctypes.c_void_p)],
            "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_MemAllocationProp),
                                              ctypes.c_int],
            "cuMemCreate": [ctypes.POINTER(c_ull), ctypes.c_size_t, ctypes.POINTER(_MemAllocationProp), c_ull],
            "cuMemRelease": [c_ull],
            "cuMemAddressReserve": [ctypes.POINTER(c_ull), ctypes.c_size_t, ctypes.c_size_t, c_ull, c_ull],
            "cuMemAddressFree": [c_ull, ctypes.c_size_t],
            "cuMemMap": [c_ull, ctypes.c_size_t, ctypes.c_size_t, c_ull, c_ull],
            "cuMemUnmap": [c_ull, ctypes.c_size_t],
            "cuMemSetAccess": [c_ull, ctypes.c_size_t, ctypes.POINTER(_MemAccessDesc), ctypes.c_size_t],
            "cuMemExportToShareableHandle": [ctypes.c_void_p, c_ull, ctypes.c_int, c_ull],
            "cuMemImportFromShareableHandle": [ctypes.POINTER(c_ull), ctypes.c_void_p, ctypes.c_int],
        }
        self.fn: dict[str, Any] = {}
        for name, argtypes in signatures.items():
            try:
                fn = getattr(self.lib, name)
            except AttributeError as exc:
                raise GpuUnavailable(f"libcuda.so.1 has no {name}: the driver is too old for "
                                     "virtual memory management (CUDA 10.2+)") from exc
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            self.fn[name.removesuffix("_v2")] = fn
        rc = self.fn["cuInit"](0)
        if rc != 0:
            raise GpuUnavailable(f"cuInit: {self.error_string(rc)} (CUresult {rc})")
        version = ctypes.c_int()
        self.fn["cuDriverGetVersion"](ctypes.byref(version))
        self.version = version.value

    @classmethod
    def get(cls) -> _Driver:
        with cls._lock:
            if cls._instance is None:
                if cls._instance_error is not None:
                    raise GpuUnavailable(cls._instance_error)
                try:
                    cls._instance = cls()
                except GpuUnavailable as exc:
                    cls._instance_error = exc.reason  # dlopen and cuInit are not retried
                    raise
            return cls._instance

    def error_string(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.fn["cuGetErrorString"](code, ctypes.byref(text)) == 0 and text.value:
            return text.value.decode(errors="replace")
        return "unknown error"

    def call(self, name: str, *args: Any) -> None:
        rc = self.fn[name](*args)
        if rc != 0:
            raise CudaError(name, rc, self.error_string(rc))

    def device_count(self) -> int:
        count = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(count))
        return count.value

    def attribute(self, attribute: int, device: int) -> int:
        value = ctypes.c_int()
        self.call("cuDeviceGetAttribute", ctypes.byref(value), attribute, device)
        return value.value

    def uuid(self, device: int) -> str:
        raw = ctypes.create_string_buffer(16)
        self.call("cuDeviceGetUuid", raw, device)
        text = raw.raw.hex()
        return f"GPU-{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def granularity(self, device: int, handle_types: int) -> int:
        prop = _allocation_prop(device, handle_types)
        value = ctypes.c_size_t()
        self.call("cuMemGetAllocationGranularity", ctypes.byref(value), ctypes.byref(prop),
                  CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        return value.value

    def retain_primary_context(self, device: int) -> int:
        context = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        return context.value or 0

    def release_primary_context(self, device: int) -> None:
        self.call("cuDevicePrimaryCtxRelease", device)


def _handle_types(exportable: bool) -> int:
    return CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR if exportable else CU_MEM_HANDLE_TYPE_NONE


def _allocation_prop(device: int, handle_types: int) -> _MemAllocationProp:
    prop = _MemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = handle_types
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


class _Current:
    """The context current on this thread for the driver calls inside the block."""

    def __init__(self, driver: _Driver, context: int) -> None:
        self._driver = driver
        self._context = context

    def __enter__(self) -> None:
        self._driver.call("cuCtxPushCurrent", ctypes.c_void_p(self._context))

    def __exit__(self, *exc_info: object) -> None:
        popped = ctypes.c_void_p()
        self._driver.fn["cuCtxPopCurrent"](ctypes.byref(popped))


@dataclass(frozen=True)
class ExportedChunk:
    """One piece of an exported buffer: a POSIX fd the receiver owns (close it, or pass
    it to :func:`import_buffer`), where the piece sits in the buffer, and its size."""

    fd: int
    offset: int
    size: int


@dataclass
class _Chunk:
    handle: int
    offset: int
    size: int


class GpuReservation:
    """The strategy's handle: one reserved address range with chunks mapped from its
    start. Its methods are the strategy's; consumers get a GpuBuffer."""

    def __init__(self, driver: _Driver, device: int, uuid: str, context: int, address: int,
                 address_size: int, granularity: int, chunk_size: int, exportable: bool) -> None:
        self.driver = driver
        self.device = device
        self.uuid = uuid
        self.context = context
        self.address = address
        self.address_size = address_size
        self.granularity = granularity
        self.chunk_size = chunk_size
        self.exportable = exportable
        self.chunks: list[_Chunk] = []
        self.lock = threading.RLock()
        self.views = 0  # live GpuBuffers (each DLPack capsule holds one)
        self.deferred: DeferredRelease | None = None
        self.released = False
        self.requested_bytes = 0
        self.details: dict[str, Any] = {}

    @property
    def size(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    # -- mapping (caller holds self.lock) --------------------------------------------------

    def map_to(self, target: int) -> None:
        """Maps chunks at the end until ``target`` bytes are mapped; on failure the
        chunks this call made are gone again and CudaError propagates."""
        made = len(self.chunks)
        prop = _allocation_prop(self.device, _handle_types(self.exportable))
        access = _MemAccessDesc()
        access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device
        access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        driver = self.driver
        try:
            with _Current(driver, self.context):
                while self.size < target:
                    offset = self.size
                    size = min(self.chunk_size, _round_up(target - offset, self.granularity))
                    handle = ctypes.c_ulonglong()
                    driver.call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(prop), 0)
                    try:
                        driver.call("cuMemMap", self.address + offset, size, 0, handle.value, 0)
                    except BaseException:
                        driver.fn["cuMemRelease"](handle.value)
                        raise
                    self.chunks.append(_Chunk(handle.value, offset, size))
                    driver.call("cuMemSetAccess", self.address + offset, size, ctypes.byref(access), 1)
        except BaseException:
            self.unmap_to_count(made)
            raise

    def unmap_to_count(self, count: int) -> None:
        """Unmaps and frees the chunks after the first ``count`` (from the end)."""
        driver = self.driver
        with _Current(driver, self.context):
            while len(self.chunks) > count:
                chunk = self.chunks.pop()
                for name, args in (("cuMemUnmap", (self.address + chunk.offset, chunk.size)),
                                   ("cuMemRelease", (chunk.handle,))):
                    rc = driver.fn[name](*args)
                    if rc != 0:
                        log.error("%s failed while freeing GPU memory: %s", name, driver.error_string(rc))

    def free(self) -> None:
        """Unmaps everything, frees the range, releases the primary context. Once."""
        with self.lock:
            if self.address == 0:
                return
            self.unmap_to_count(0)
            rc = self.driver.fn["cuMemAddressFree"](self.address, self.address_size)
            if rc != 0:
                log.error("cuMemAddressFree failed: %s", self.driver.error_string(rc))
            self.address = 0
            try:
                self.driver.release_primary_context(self.device)
            except CudaError as exc:
                log.error("releasing the primary context of GPU %d failed: %s", self.device, exc)

    def export(self) -> list[ExportedChunk]:
        with self.lock:
            if not self.exportable:
                raise AllocationError(f"this GPU reservation is not exportable: {self.details.get('export_error')}")
            exported: list[ExportedChunk] = []
            try:
                for chunk in self.chunks:
                    fd = ctypes.c_int(-1)
                    self.driver.call("cuMemExportToShareableHandle", ctypes.byref(fd), chunk.handle,
                                     CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)
                    exported.append(ExportedChunk(fd.value, chunk.offset, chunk.size))
            except BaseException:
                for piece in exported:
                    os.close(piece.fd)
                raise
            return exported

    # -- views ---------------------------------------------------------------------------

    def _view_gone(self) -> None:
        # runs in GpuBuffer's finalizer (any thread, maybe inside GC): the driver calls
        # are thread-safe, and DeferredRelease.done only queues the engine's work
        with self.lock:
            self.views -= 1
            if self.views or self.deferred is None:
                return
            deferred, self.deferred = self.deferred, None
        self.free()
        deferred.done()


class GpuBuffer:
    """A consumer's zero-copy view of reserved device memory.

    ``torch.as_tensor(buf, device="cuda")``, ``cupy.asarray(buf)``, ``numba.cuda.as_cuda_array(buf)``
    take it through ``__cuda_array_interface__``; ``torch.from_dlpack(buf)`` and
    ``jax.dlpack.from_dlpack(buf)`` through DLPack. It is a 1-D uint8 array of ``size``
    bytes; view it as another dtype on the consumer's side. The memory stays mapped while
    this object (or a capsule made from it) lives, even after the allocation's release.
    """

    __slots__ = ("_reservation", "ptr", "size", "device", "uuid", "__weakref__")

    def __init__(self, reservation: GpuReservation) -> None:
        with reservation.lock:
            if reservation.released or reservation.address == 0:
                raise AllocationError("the GPU reservation was released")
            reservation.views += 1
            self.ptr = reservation.address
            self.size = reservation.size
        self._reservation = reservation
        self.device = reservation.device
        self.uuid = reservation.uuid
        weakref.finalize(self, reservation._view_gone)

    def __repr__(self) -> str:
        return f"GpuBuffer(ptr={self.ptr:#x}, size={self.size}, device={self.device})"

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # stream None: nothing of ours is pending on the memory, so no synchronisation
        return {"shape": (self.size,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 3, "stream": None}

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDL_CUDA, self.device)

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: tuple[int, int] | None = None, copy: bool | None = None) -> Any:
        """A "dltensor" capsule (DLPack 0.x layout, which every consumer takes; a 1.x
        consumer falls back to it). ``stream`` needs no synchronisation: no work of ours
        is pending on this memory."""
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"dl_device {dl_device!r}: the buffer is on {self.__dlpack_device__()}; no copies")
        if copy:
            raise BufferError("copy=True: a GpuBuffer is handed over without a copy")
        return _dlpack_capsule(self)

    def export(self) -> list[ExportedChunk]:
        """POSIX fds (owned by the caller) another process maps with import_buffer."""
        return self._reservation.export()

    @property
    def fd(self) -> int:
        """One exported fd, for a buffer of one chunk (``export()`` for any buffer)."""
        pieces = self.export()
        if len(pieces) != 1:
            for piece in pieces:
                os.close(piece.fd)
            raise ValueError(f"the buffer has {len(pieces)} chunks; use export() for one fd per chunk")
        return pieces[0].fd


# -- DLPack -----------------------------------------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

# address of a live DLManagedTensor -> (the struct, its shape, the buffer it keeps alive)
_dlpack_live: dict[int, tuple[_DLManagedTensor, Any, GpuBuffer]] = {}
_dlpack_lock = threading.Lock()
_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")


@_DELETER
def _dlpack_deleter(address: int | None) -> None:
    # the consumer is done with the tensor (or the capsule died unconsumed)
    with _dlpack_lock:
        _dlpack_live.pop(address or 0, None)


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_capsule_is_valid.restype = ctypes.c_int
_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_capsule_new.restype = ctypes.py_object


@_CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule: int | None) -> None:
    # a consumer renames the capsule "used_dltensor" and calls the deleter itself; a
    # capsule still named "dltensor" was never consumed, so the deleter is ours to call
    if capsule and _capsule_is_valid(capsule, b"dltensor"):
        _dlpack_deleter(_capsule_get_pointer(capsule, b"dltensor"))


def _dlpack_capsule(buffer: GpuBuffer) -> Any:
    shape = (ctypes.c_int64 * 1)(buffer.size)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = buffer.ptr
    managed.dl_tensor.device = _DLDevice(KDL_CUDA, buffer.device)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(1, 8, 1)  # kDLUInt, 8 bits, 1 lane
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # compact
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _dlpack_deleter
    address = ctypes.addressof(managed)
    with _dlpack_lock:
        _dlpack_live[address] = (managed, shape, buffer)
    try:
        return _capsule_new(address, ctypes.addressof(_CAPSULE_NAME),
                            ctypes.cast(_capsule_destructor, ctypes.c_void_p))
    except BaseException:
        with _dlpack_lock:
            _dlpack_live.pop(address, None)
        raise


# -- the receiving side -------------------------------------------------------------------

class ImportedGpuBuffer:
    """Another process's exported buffer, mapped here at one address (same layout):
    ``ptr``, ``size``, ``device`` and ``__cuda_array_interface__`` as GpuBuffer has.
    ``close()`` unmaps it; a context manager."""

    def __init__(self, pieces: list[ExportedChunk], device: int = 0) -> None:
        if not pieces:
            raise ValueError("pieces must name at least one exported chunk")
        driver = _Driver.get()
        self.device = device
        self.size = max(piece.offset + piece.size for piece in pieces)
        self._driver = driver
        self._context = driver.retain_primary_context(device)
        self._handles: list[tuple[int, int, int]] = []  # (handle, offset, size)
        self.ptr = 0
        try:
            with _Current(driver, self._context):
                address = ctypes.c_ulonglong()
                driver.call("cuMemAddressReserve", ctypes.byref(address), self.size, 0, 0, 0)
                self.ptr = address.value
                access = _MemAccessDesc()
                access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
                access.location.id = device
                access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                for piece in sorted(pieces, key=lambda p: p.offset):
                    handle = ctypes.c_ulonglong()
                    driver.call("cuMemImportFromShareableHandle", ctypes.byref(handle), ctypes.c_void_p(piece.fd),
                                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
                    try:
                        driver.call("cuMemMap", self.ptr + piece.offset, piece.size, 0, handle.value, 0)
                    except BaseException:
                        driver.fn["cuMemRelease"](handle.value)
                        raise
                    self._handles.append((handle.value, piece.offset, piece.size))
                    driver.call("cuMemSetAccess", self.ptr + piece.offset, piece.size, ctypes.byref(access), 1)
        except BaseException:
            self.close()
            raise

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.size,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 3, "stream": None}

    def close(self) -> None:
        driver = self._driver
        with _Current(driver, self._context):
            while self._handles:
                handle, offset, size = self._handles.pop()
                driver.fn["cuMemUnmap"](self.ptr + offset, size)
                driver.fn["cuMemRelease"](handle)
            if self.ptr:
                driver.fn["cuMemAddressFree"](self.ptr, self.size)
                self.ptr = 0
        if self._context:
            self._context = 0
            driver.fn["cuDevicePrimaryCtxRelease"](self.device)

    def __enter__(self) -> ImportedGpuBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def import_buffer(pieces: list[ExportedChunk], device: int = 0) -> ImportedGpuBuffer:
    """Maps what another process's ``GpuBuffer.export()`` sent (fds received over a Unix
    socket, say) into this process. The fds stay the caller's to close."""
    return ImportedGpuBuffer(pieces, device)


def _uuid_body(uuid: str) -> str:
    """The UUID without NVML's "GPU-" / "MIG-" prefix: the driver gives a MIG instance's
    UUID as bare bytes, NVML names it "MIG-..."."""
    return uuid.split("-", 1)[1] if uuid[:4] in ("GPU-", "MIG-") else uuid


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# -- the strategy ----------------------------------------------------------------------------

class GpuMemoryStrategy(AllocationStrategy):
    """Reserves ``amount`` MiB of device memory (see the module docstring).

    device: the CUDA ordinal to use, or None for the device with the most free memory
    (per NVML); a request's ``metadata.custom_properties["device"]`` overrides it.
    chunk_mib: the size of one cuMemCreate, the step of shrinking and one exported fd
    (growth adds chunks of at most this size). exportable: create the memory exportable
    as POSIX fds (falls back to not exportable, saying why, where the device cannot).
    headroom_mib: free memory a reservation must leave on its device.
    monitor: the NvmlMonitor to read free and used memory with (one of its own when None,
    closed by close()).
    """

    resource_type = ResourceType.GPU

    def __init__(self, *, monitor: NvmlMonitor | None = None, device: int | None = None,
                 chunk_mib: float = 256, exportable: bool = True, headroom_mib: float = 0) -> None:
        if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
            raise ValueError(f"device must be a CUDA device ordinal >= 0 or None, not {device!r}")
        if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not 0 < chunk_mib < math.inf:
            raise ValueError(f"chunk_mib must be a number of MiB > 0, not {chunk_mib!r}")
        if isinstance(headroom_mib, bool) or not isinstance(headroom_mib, (int, float)) \
                or not 0 <= headroom_mib < math.inf:
            raise ValueError(f"headroom_mib must be a number of MiB >= 0, not {headroom_mib!r}")
        if monitor is not None and not isinstance(monitor, NvmlMonitor):
            raise TypeError(f"monitor must be an NvmlMonitor or None, not {type(monitor).__name__}")
        self.device = device
        self.chunk_bytes = int(chunk_mib * MiB)
        self.exportable = bool(exportable)
        self.headroom_bytes = int(headroom_mib * MiB)
        self._monitor = monitor
        self._own_monitor = monitor is None
        self._lock = threading.Lock()
        self._granularity: dict[tuple[int, int], int] = {}
        self._ids = itertools.count(1)

    # -- helpers -------------------------------------------------------------------------

    def _driver(self) -> _Driver:
        try:
            return _Driver.get()
        except GpuUnavailable as exc:
            raise AllocationError(f"GPU: {exc.reason}") from exc

    def _nvml(self) -> NvmlMonitor | None:
        with self._lock:
            if self._monitor is None and self._own_monitor:
                try:
                    self._monitor = NvmlMonitor()
                except GpuUnavailable as exc:
                    log.info("GPU strategy without NVML (%s): no free-memory check, device 0 by default", exc)
                    self._own_monitor = False  # not retried
            return self._monitor

    def _granularity_of(self, driver: _Driver, device: int, handle_types: int) -> int:
        key = (device, handle_types)
        with self._lock:
            cached = self._granularity.get(key)
        if cached is None:
            cached = driver.granularity(device, handle_types)
            with self._lock:
                self._granularity[key] = cached
        return cached

    def _nvml_info(self, driver: _Driver, device: int) -> GpuDeviceInfo | None:
        """NVML's view of a CUDA device (matched by UUID: the orders may differ)."""
        monitor = self._nvml()
        if monitor is None:
            return None
        uuid = _uuid_body(driver.uuid(device))
        for info in monitor.devices():
            if _uuid_body(info.uuid) == uuid:
                return info
        return None

    def _exportable_on(self, driver: _Driver, device: int) -> tuple[bool, str | None]:
        """(exportable, why not) for memory created on device."""
        if not self.exportable:
            return False, "exportable=False"
        if not driver.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, device):
            return False, "the device does not support POSIX fd handles"
        return True, None

    def _choose_device(self, driver: _Driver, request: ResourceRequest) -> int:
        wanted = request.metadata.custom_properties.get("device", self.device)
        count = driver.device_count()
        if wanted is not None:
            if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted < count:
                raise AllocationError(f"GPU: device {wanted!r} is not a CUDA device ordinal in 0..{count - 1}")
            return wanted
        monitor = self._nvml()
        if monitor is None or count == 1:
            return 0
        free_by_uuid = {_uuid_body(info.uuid): info.free for info in monitor.devices()}
        return max(range(count), key=lambda d: (free_by_uuid.get(_uuid_body(driver.uuid(d)), -1), -d))

    # -- the interface ---------------------------------------------------------------------

    def planned_amount(self, request: ResourceRequest, amount: float) -> float:
        """amount rounded up to the allocation granularity (2 MiB on current GPUs)."""
        try:
            driver = _Driver.get()
            device = self._choose_device(driver, request)
            exportable, _ = self._exportable_on(driver, device)
            granularity = self._granularity_of(driver, device, _handle_types(exportable))
        except (GpuUnavailable, CudaError, AllocationError):
            return amount  # allocate will fail with the reason
        return _round_up(max(1, math.ceil(amount * MiB)), granularity) / MiB

    def allocate(self, request: ResourceRequest, amount: float,
                 availability: ResourceAvailability | None) -> Grant:
        driver = self._driver()
        try:
            device = self._choose_device(driver, request)
            return Grant(*self._allocate_on(driver, device, amount))
        except GpuUnavailable as exc:
            raise AllocationError(f"GPU: {exc.reason}") from exc
        except CudaError as exc:
            if exc.code == CUDA_ERROR_OUT_OF_MEMORY:
                raise InsufficientResources(f"GPU: {exc}") from exc
            raise AllocationError(f"GPU: {exc}") from exc

    def _allocate_on(self, driver: _Driver, device: int, amount: float) -> tuple[float, GpuReservation]:
        if not driver.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device):
            raise AllocationError(f"GPU {device} does not support virtual memory management")
        exportable, export_error = self._exportable_on(driver, device)
        granularity = self._granularity_of(driver, device, _handle_types(exportable))
        requested = max(1, math.ceil(amount * MiB))
        nbytes = _round_up(requested, granularity)
        before = self._nvml_info(driver, device)
        if before is not None and nbytes > before.free - self.headroom_bytes:
            raise InsufficientResources(
                f"GPU {device}: {nbytes / MiB:g} MiB requested, {before.free / MiB:g} MiB free"
                + (f" with {self.headroom_bytes / MiB:g} MiB headroom" if self.headroom_bytes else ""))
        address_size = _round_up(max(nbytes, before.total if before is not None else nbytes), granularity)
        chunk_size = max(granularity, _round_up(self.chunk_bytes, granularity))
        context = driver.retain_primary_context(device)
        reservation: GpuReservation | None = None
        try:
            with _Current(driver, context):
                address = ctypes.c_ulonglong()
                driver.call("cuMemAddressReserve", ctypes.byref(address), address_size, granularity, 0, 0)
            reservation = GpuReservation(driver, device, driver.uuid(device), context, address.value,
                                         address_size, granularity, chunk_size, exportable)
            with reservation.lock:
                reservation.map_to(nbytes)
            after = self._nvml_info(driver, device)
        except BaseException:
            if reservation is not None:
                reservation.free()  # unmaps, frees the range and releases the context
            else:
                driver.release_primary_context(device)
            raise
        reservation.requested_bytes = requested
        reservation.details = {
            "mode": "vmm",
            "device": device,
            "uuid": reservation.uuid,
            "requested_bytes": requested,
            "granularity": granularity,
            "chunk_bytes": chunk_size,
            "reserved_address_bytes": address_size,
            "exportable_requested": self.exportable,
            "exportable": exportable,
            "export_error": export_error,
            "context_warmed": True,
            "nvml_used_before": None if before is None else before.used,
            "nvml_used_after": None if after is None else after.used,
            "driver_version": driver.version,
        }
        return reservation.size / MiB, reservation

    def claim(self, handle: Any, target_process_id: int | None = None) -> GpuBuffer:
        """A GpuBuffer over the reservation. For another process, send it ``export()``'s
        fds (it maps them with import_buffer); the memory is the same either way."""
        return GpuBuffer(handle)

    def release(self, handle: Any) -> DeferredRelease | None:
        reservation: GpuReservation = handle
        with reservation.lock:
            if reservation.released:
                return None
            reservation.released = True
            if reservation.views:
                reservation.deferred = DeferredRelease()
                return reservation.deferred
        reservation.free()
        return None

    def adjust(self, handle: Any, new_amount: float) -> float:
        reservation: GpuReservation = handle
        target = _round_up(max(1, math.ceil(new_amount * MiB)), reservation.granularity)
        with reservation.lock:
            if reservation.released:
                raise AllocationError("GPU: the reservation was released")
            if target > reservation.address_size:
                raise InsufficientResources(f"GPU {reservation.device}: {target / MiB:g} MiB is more than the "
                                            f"{reservation.address_size / MiB:g} MiB address range (the device)")
            if target > reservation.size:
                try:
                    reservation.map_to(target)
                except CudaError as exc:
                    if exc.code == CUDA_ERROR_OUT_OF_MEMORY:
                        raise InsufficientResources(f"GPU: cannot grow: {exc}") from exc
                    raise AllocationError(f"GPU: cannot grow: {exc}") from exc
            else:
                keep = len(reservation.chunks)
                while keep > 1 and reservation.chunks[keep - 1].offset >= target:
                    keep -= 1
                if keep < len(reservation.chunks) and reservation.views:
                    raise AllocationError("GPU: cannot shrink while a consumer holds a view of the buffer")
                reservation.unmap_to_count(keep)
            reservation.requested_bytes = max(1, math.ceil(new_amount * MiB))
            reservation.details["requested_bytes"] = reservation.requested_bytes
            return reservation.size / MiB

    def describe(self, handle: Any) -> dict[str, Any]:
        reservation: GpuReservation = handle
        with reservation.lock:
            return {**reservation.details, "bytes": reservation.size, "chunks": len(reservation.chunks),
                    "consumer_views": reservation.views}

    def close(self) -> None:
        with self._lock:
            monitor, own = self._monitor, self._own_monitor
            if own:
                self._monitor = None
                self._own_monitor = False
        if own and monitor is not None:
            monitor.close()
