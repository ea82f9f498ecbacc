"""GpuMemoryStrategy over the fake libcuda.so.1 and libnvidia-ml.so.1 (tests/fakes).

The strategy's ctypes binding dlopens "libcuda.so.1" and pynvml "libnvidia-ml.so.1";
in each test's subprocess LD_LIBRARY_PATH puts the fakes there. The fake driver backs
device memory with memfds mapped at the reserved addresses, so "device pointers" are
host addresses the tests write and read through, and the fake NVML reports what the fake
driver created as used: NVML's figures move by exactly what the strategy mapped. The
fixture checks afterwards that nothing is left held in any process of the test.
"""
from __future__ import annotations

import importlib.util

import pytest

from fakes import CUDA_ERROR_UNKNOWN, NVML_ERROR_GPU_IS_LOST, MiB
from fakes.fixtures import fake_gpu_factory, fake_gpu_libraries

FIXTURES = (fake_gpu_factory, fake_gpu_libraries)  # used by pytest, by name

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pynvml") is None,
                                reason="nvidia-ml-py (pynvml) is not installed: pip install '.[test]'")

PRELUDE = """
import ctypes, gc, os
import fakes
from prealloc.monitors.nvml import NvmlMonitor
from prealloc.strategies.gpu import GpuMemoryStrategy, GpuBuffer, import_buffer
from prealloc.strategies.base import AllocationError, InsufficientResources
from prealloc.types import ResourceRequest, ResourceType, RequestMetadata
state = fakes.FakeGpuMachine.attach(os.environ["PREALLOC_FAKE_GPU_STATE"]).state
monitor = NvmlMonitor()
def used(device=0):
    return monitor.device(device).used
def request(mib, **properties):
    return ResourceRequest(ResourceType.GPU, mib, metadata=RequestMetadata(custom_properties=properties))
"""


def test_reservation_moves_nvml_used_by_exactly_what_is_mapped(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor, chunk_mib=64)
before = used()
planned = strategy.planned_amount(request(99), 99)
grant = strategy.allocate(request(99), 99, None)
during = used()
details = strategy.describe(grant.handle)
contexts = state.dev[0].primary_ctx_refs
buffer = strategy.claim(grant.handle)
ctypes.memset(buffer.ptr, 0xAB, buffer.size)   # the whole range is mapped read-write
last = ctypes.string_at(buffer.ptr + buffer.size - 1, 1)
del buffer; gc.collect()
assert strategy.release(grant.handle) is None
assert strategy.release(grant.handle) is None   # a second release is harmless
emit({"before": before, "during": during, "after": used(), "planned": planned, "amount": grant.amount,
      "details": details, "contexts": contexts, "contexts_after": state.dev[0].primary_ctx_refs,
      "last": last.hex()})
monitor.close()
""")
    assert out["planned"] == out["amount"] == 100  # 99 MiB rounded up to the 2 MiB granularity
    assert out["during"] - out["before"] == 100 * MiB
    assert out["after"] == out["before"]
    assert out["contexts"] == 1 and out["contexts_after"] == 0
    assert out["last"] == "ab"
    details = out["details"]
    assert details["mode"] == "vmm" and details["device"] == 0 and details["exportable"] is True
    assert details["requested_bytes"] == 99 * MiB and details["bytes"] == 100 * MiB
    assert details["chunks"] == 2 and details["chunk_bytes"] == 64 * MiB
    assert details["context_warmed"] is True
    assert details["nvml_used_after"] - details["nvml_used_before"] == 100 * MiB
    assert details["reserved_address_bytes"] == 1024 * MiB  # the device: growth never moves it


def test_adjust_keeps_the_pointer_and_the_data(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor, chunk_mib=32)
grant = strategy.allocate(request(64), 64, None)
handle = grant.handle
buffer = strategy.claim(handle)
ptr = buffer.ptr
ctypes.memmove(ptr, b"kept", 4)
base = used()
grown = strategy.adjust(handle, 200)
grown_used = used() - base
ctypes.memset(ptr + 199 * (1 << 20), 1, 1 << 20)   # the new end is mapped
try:
    strategy.adjust(handle, 64)
    refused = None
except AllocationError as exc:
    refused = str(exc)
del buffer; gc.collect()
shrunk = strategy.adjust(handle, 70)
shrunk_used = used() - base
again = strategy.claim(handle)
emit({"grown": grown, "grown_used": grown_used, "refused": refused, "shrunk": shrunk,
      "shrunk_used": shrunk_used, "same_ptr": again.ptr == ptr, "data": ctypes.string_at(ptr, 4).decode(),
      "too_big": str(pytest_raises(lambda: strategy.adjust(handle, 4096)))})
del again; gc.collect()
strategy.release(handle)
monitor.close()
""".replace("pytest_raises", "(lambda f: (lambda: None) and _catch(f))")
                      .replace("emit({", "def _catch(f):\n    try:\n        f()\n    except Exception as e:\n"
                                         "        return type(e).__name__\nemit({", 1))
    assert out["grown"] == 200 and out["grown_used"] == 136 * MiB
    assert out["refused"] == "GPU: cannot shrink while a consumer holds a view of the buffer"
    # 64 + 32 + 32 + 32 + 32 + 8: shrinking to 70 keeps the chunks up to 96 MiB
    assert out["shrunk"] == 96 and out["shrunk_used"] == 32 * MiB
    assert out["same_ptr"] and out["data"] == "kept"
    assert out["too_big"] == "InsufficientResources"  # beyond the device's address range


def test_claim_is_a_cuda_array_interface_and_dlpack_buffer(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
from prealloc.strategies import gpu as gpu_module
strategy = GpuMemoryStrategy(monitor=monitor)
grant = strategy.allocate(request(16), 16, None)
buffer = strategy.claim(grant.handle)
cai = buffer.__cuda_array_interface__
capsule = buffer.__dlpack__(stream=1)
get = ctypes.pythonapi.PyCapsule_GetPointer
get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
managed = gpu_module._DLManagedTensor.from_address(get(capsule, b"dltensor"))
tensor = managed.dl_tensor
dl = {"data": tensor.data, "device": [tensor.device.device_type, tensor.device.device_id], "ndim": tensor.ndim,
      "dtype": [tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes], "shape": tensor.shape[0],
      "strides": bool(tensor.strides), "offset": tensor.byte_offset}
ptr, size = buffer.ptr, buffer.size
del buffer, tensor, managed; gc.collect()
# released while the capsule (a consumer's tensor) lives: the memory stays mapped
deferred = strategy.release(grant.handle)
held = [deferred is not None and not deferred.is_done, used()]
# a consumer renames the capsule and calls the deleter when its tensor dies
rename = ctypes.pythonapi.PyCapsule_SetName
rename.argtypes = [ctypes.py_object, ctypes.c_char_p]
rename(capsule, b"used_dltensor")
get.argtypes = [ctypes.py_object, ctypes.c_char_p]
address = get(capsule, b"used_dltensor")
gpu_module._DLManagedTensor.from_address(address).deleter(address)
gc.collect()
emit({"cai": cai, "ptr": ptr, "size": size, "dl": dl, "held": held, "done": deferred.is_done, "after": used(),
      "device": [2, 0]})
del capsule; gc.collect()
monitor.close()
""")
    assert out["cai"] == {"shape": [16 * MiB], "typestr": "|u1", "data": [out["ptr"], False], "strides": None,
                          "version": 3, "stream": None}
    assert out["dl"] == {"data": out["ptr"], "device": [2, 0], "ndim": 1, "dtype": [1, 8, 1],
                         "shape": 16 * MiB, "strides": False, "offset": 0}
    assert out["held"] == [True, 116 * MiB]
    assert out["done"] is True and out["after"] == 100 * MiB


def test_unconsumed_dlpack_capsule_releases_its_view(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor)
grant = strategy.allocate(request(8), 8, None)
capsule = strategy.claim(grant.handle).__dlpack__()
gc.collect()
deferred = strategy.release(grant.handle)
still = used()
del capsule; gc.collect()   # never consumed: its destructor calls the deleter
emit([deferred is not None, still, deferred.is_done, used()])
monitor.close()
""")
    assert out == [True, 108 * MiB, True, 100 * MiB]


@pytest.mark.parametrize("call, after", [("cuMemMap", 2), ("cuMemSetAccess", 1), ("cuMemCreate", 3)])
def test_driver_error_mid_allocation_leaves_nothing_mapped(fake_gpu_factory, call, after):
    machine = fake_gpu_factory()
    machine.fault(call, CUDA_ERROR_UNKNOWN, after=after)
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor, chunk_mib=16)
try:
    strategy.allocate(request(100), 100, None)
except AllocationError as exc:
    reason = str(exc)
emit([reason, used(), state.live_handles, state.live_reservations, state.mapped_bytes,
      state.dev[0].primary_ctx_refs])
monitor.close()
""")
    reason, *left = out
    assert reason == f"GPU: {call}: unknown error (CUresult 999)"
    assert left == [100 * MiB, 0, 0, 0, 0]
    assert machine.state.faults[0].hits == 1


def test_nvml_error_mid_allocation_leaves_nothing_mapped(fake_gpu_factory):
    machine = fake_gpu_factory()
    # the read before mapping succeeds, the read after (the effective figures) fails
    machine.fault("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_GPU_IS_LOST, after=1, count=1)
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor)
try:
    strategy.allocate(request(64), 64, None)
except AllocationError as exc:
    reason = str(exc)
emit([reason, used(), state.live_handles, state.live_reservations, state.mapped_bytes,
      state.dev[0].primary_ctx_refs])
monitor.close()
""")
    assert out == ["GPU: nvmlDeviceGetMemoryInfo: GPU is lost", 100 * MiB, 0, 0, 0, 0]


def test_over_free_or_headroom_fails_with_the_reason_and_maps_nothing(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
reasons = []
for strategy, mib in ((GpuMemoryStrategy(monitor=monitor), 900), (GpuMemoryStrategy(monitor=monitor, headroom_mib=500), 400)):
    try:
        strategy.allocate(request(mib), mib, None)
    except InsufficientResources as exc:
        reasons.append(str(exc))
emit([reasons, state.live_handles, state.live_reservations, state.dev[0].primary_ctx_refs])
monitor.close()
""")
    assert out == [["GPU 0: 900 MiB requested, 860 MiB free",
                    "GPU 0: 400 MiB requested, 860 MiB free with 500 MiB headroom"], 0, 0, 0]


def test_device_choice_most_free_or_named(fake_gpu_factory):
    machine = fake_gpu_factory(devices=3)
    machine.device(0).base_used = 500 * MiB
    machine.device(2).base_used = 300 * MiB
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor)
chosen = strategy.allocate(request(8), 8, None).handle
named = strategy.allocate(request(8, device=2), 8, None).handle
try:
    strategy.allocate(request(8, device=7), 8, None)
except AllocationError as exc:
    bad = str(exc)
result = [chosen.device, named.device, used(1), used(2), bad]
strategy.release(chosen); strategy.release(named)
emit(result)
monitor.close()
""")
    assert out == [1, 2, 108 * MiB, 308 * MiB, "GPU: device 7 is not a CUDA device ordinal in 0..2"]


def test_exported_fds_map_in_another_process(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
import json, subprocess, sys
strategy = GpuMemoryStrategy(monitor=monitor, chunk_mib=4)
grant = strategy.allocate(request(10), 10, None)
buffer = strategy.claim(grant.handle)
ctypes.memmove(buffer.ptr, b"from-owner", 10)
ctypes.memmove(buffer.ptr + 9 * (1 << 20), b"tail", 4)
pieces = buffer.export()
child = '''
import ctypes, json, sys
from prealloc.strategies.gpu import ExportedChunk, import_buffer
pieces = [ExportedChunk(*p) for p in json.loads(sys.argv[1])]
with import_buffer(pieces) as imported:
    seen = [ctypes.string_at(imported.ptr, 10).decode(), ctypes.string_at(imported.ptr + 9 * (1 << 20), 4).decode()]
    ctypes.memmove(imported.ptr + 100, b"from-child", 10)
    print(json.dumps([seen, imported.size]))
'''
proc = subprocess.run([sys.executable, "-c", child, json.dumps([[p.fd, p.offset, p.size] for p in pieces])],
                      pass_fds=[p.fd for p in pieces], capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr
for p in pieces:
    os.close(p.fd)
seen, size = json.loads(proc.stdout)
back = ctypes.string_at(buffer.ptr + 100, 10).decode()
result = [seen, size, back, len(pieces), used()]
del buffer; gc.collect()
strategy.release(grant.handle)
emit(result)
monitor.close()
""")
    # the importer adds no usage: it maps the same memory
    assert out == [["from-owner", "tail"], 10 * MiB, "from-child", 3, 110 * MiB]


def test_not_exportable_where_the_device_cannot(fake_gpu_factory):
    machine = fake_gpu_factory()
    machine.device(0).posix_fd_supported = 0
    out = machine.run(PRELUDE + """
strategy = GpuMemoryStrategy(monitor=monitor)
grant = strategy.allocate(request(8), 8, None)
details = strategy.describe(grant.handle)
buffer = strategy.claim(grant.handle)
try:
    buffer.export()
except AllocationError as exc:
    reason = str(exc)
del buffer; gc.collect()
strategy.release(grant.handle)
emit([details["exportable_requested"], details["exportable"], details["export_error"], reason])
monitor.close()
""")
    assert out == [True, False, "the device does not support POSIX fd handles",
                   "this GPU reservation is not exportable: the device does not support POSIX fd handles"]


def test_through_the_preallocator(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(PRELUDE + """
from prealloc import ResourcePreallocator
strategy = GpuMemoryStrategy(monitor=monitor)
with ResourcePreallocator(allocation_strategies={ResourceType.GPU: strategy},
                          resource_monitors={ResourceType.GPU: monitor}) as pre:
    # allocates now, on this thread: the allocation comes back ALLOCATED (or FAILED, saying why)
    allocation = pre.request_preallocation(ResourceRequest(ResourceType.GPU, 32))
    assert allocation.status.name == "ALLOCATED", allocation.failure_reason
    allocation_id = allocation.allocation_id
    during = used()
    with pre.claim(allocation_id) as claim:
        cai = claim.resource.__cuda_array_interface__
        ctypes.memset(claim.resource.ptr, 1, claim.resource.size)
    del claim  # the consumer's last view: the deferred release completes
    gc.collect()
    result = [allocation.allocated_amount, allocation.details["bytes"], during, cai["version"], cai["shape"]]
emit(result + [used(), monitor.closed])  # the caller's monitor stays open: it is the caller's
strategy.close()
monitor.close()
""")
    assert out == [32, 32 * MiB, 132 * MiB, 3, [32 * MiB], 100 * MiB, False]


def test_bad_arguments_change_nothing():
    from prealloc.strategies.gpu import GpuMemoryStrategy

    with pytest.raises(ValueError, match="device"):
        GpuMemoryStrategy(device=-1)
    with pytest.raises(ValueError, match="chunk_mib"):
        GpuMemoryStrategy(chunk_mib=0)
    with pytest.raises(ValueError, match="headroom_mib"):
        GpuMemoryStrategy(headroom_mib=-1)
    with pytest.raises(TypeError, match="monitor"):
        GpuMemoryStrategy(monitor=object())  # type: ignore[arg-type]
