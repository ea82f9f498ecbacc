#!/usr/bin/env bash
# The GPU check on a real CUDA machine (one short run, under 5 minutes; installs nothing
# from the network). It reserves 8 GiB on device 0 with GpuMemoryStrategy, reads NVML
# before and after, hands the memory to PyTorch (or CuPy) through
# __cuda_array_interface__ and DLPack and runs a kernel over it, adjusts to 12 GiB and
# back (the pointer must stay), hands the exported fds to a second process that maps
# them and reads a value, releases, and then measures, side by side in fresh processes:
#   need -> usable: prealloc claim + first kernel | cold cudaMalloc + first kernel |
#                   PyTorch's warm caching allocator + kernel
#   first CUDA call: cold context | context warmed by a GPU allocation
# and prints one table. Every timed process imports torch/cupy before its clock starts and
# pays that library's own lazy CUDA initialisation inside it, in every row alike; what
# differs is the context (created, or already retained by prealloc) and the memory
# (cudaMalloc now, mapped ahead, or cached by the library's allocator).
#
# Usage:  benchmarks/gpu/check.sh            (from the repository root, prealloc importable)
# Env:    PREALLOC_PYTHON   the interpreter (default: python3)
#         PREALLOC_WHEELS   a directory of wheels carried to the machine (prealloc,
#                           nvidia-ml-py, ...): installed with --no-index, never fetched
#         RESERVE_MIB / GROW_MIB / REPEATS   8192 / 12288 / 3
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PREALLOC_PYTHON:-python3}"
if [[ -n "${PREALLOC_WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$PREALLOC_WHEELS" prealloc nvidia-ml-py
fi
export RESERVE_MIB="${RESERVE_MIB:-8192}" GROW_MIB="${GROW_MIB:-12288}" REPEATS="${REPEATS:-3}"
exec timeout 290 "$PY" - <<'PYTHON'
import gc, json, os, statistics, subprocess, sys, time

RESERVE, GROW, REPEATS = int(os.environ["RESERVE_MIB"]), int(os.environ["GROW_MIB"]), int(os.environ["REPEATS"])
MiB = 1 << 20

from prealloc.monitors.nvml import NvmlMonitor, GpuUnavailable
from prealloc.strategies.gpu import GpuMemoryStrategy, ExportedChunk
from prealloc.types import ResourceRequest, ResourceType

try:
    import torch
    LIB = "torch" if torch.cuda.is_available() else None
except ImportError:
    LIB = None
if LIB is None:
    try:
        import cupy
        LIB = "cupy"
    except ImportError:
        LIB = None
rows = []  # (what, value, note)

def note(what, value, detail=""):
    rows.append((what, value, detail))

def kernel_sum(cai_owner, nbytes):
    """fill the buffer as float32 ones and sum it on the GPU: one kernel each, zero-copy"""
    if LIB == "torch":
        t = torch.as_tensor(cai_owner, device="cuda:0").view(torch.float32)
        assert t.data_ptr() == cai_owner.__cuda_array_interface__["data"][0], "torch copied the buffer"
        t.fill_(1.0)
        return float(t.sum(dtype=torch.float64).item())  # exact: float32 sums stop counting at 2**24
    if LIB == "cupy":
        a = cupy.asarray(cai_owner).view(cupy.float32)
        assert a.data.ptr == cai_owner.__cuda_array_interface__["data"][0], "cupy copied the buffer"
        a.fill(1.0)
        return float(a.sum(dtype=cupy.float64).item())
    return None

try:
    monitor = NvmlMonitor()
except GpuUnavailable as exc:
    sys.exit(f"no GPU here: {exc.reason}")
strategy = GpuMemoryStrategy(monitor=monitor, device=0)
print(f"driver {monitor.driver_version()}, kernels through {LIB or 'nothing (no torch/cupy: kernel rows skipped)'}",
      file=sys.stderr)

# ---- correctness: reserve, hand over, adjust, share, release --------------------------------
grant = strategy.allocate(ResourceRequest(ResourceType.GPU, RESERVE), RESERVE, None)
handle = grant.handle
details = strategy.describe(handle)
def used():
    return monitor.device(details["uuid"]).used
note("reserved MiB (effective)", grant.amount, f"mode {details['mode']}, {details['chunks']} chunks, exportable {details['exportable']}")
note("NVML used before/after MiB", f"{details['nvml_used_before'] / MiB:.0f} -> {details['nvml_used_after'] / MiB:.0f}",
     f"delta {(details['nvml_used_after'] - details['nvml_used_before']) / MiB:.0f} (other processes may move it)")
buffer = strategy.claim(handle)
ptr = buffer.ptr
if LIB:
    total = kernel_sum(buffer, buffer.size)
    note("kernel over the claim (CAI)", total == buffer.size / 4, f"sum {total:.0f} of {buffer.size // 4} ones")
    if LIB == "torch":
        d = torch.from_dlpack(buffer)
        note("DLPack zero-copy (torch.from_dlpack)", d.data_ptr() == ptr, f"device {d.device}")
        first = torch.as_tensor(buffer, device="cuda:0").view(torch.float32)
        first[0] = 42.0
        torch.cuda.synchronize()
        del d, first
    else:
        d = cupy.from_dlpack(buffer)
        note("DLPack zero-copy (cupy.from_dlpack)", d.data.ptr == ptr, "")
        cupy.asarray(buffer).view(cupy.float32)[0] = 42.0
        cupy.cuda.Device(0).synchronize()
        del d
pieces = buffer.export()
child = r'''
import ctypes, json, sys
from prealloc.strategies.gpu import ExportedChunk, import_buffer
pieces = [ExportedChunk(*p) for p in json.loads(sys.argv[1])]
with import_buffer(pieces) as imported:
    try:
        import torch
        value = float(torch.as_tensor(imported, device="cuda:0").view(torch.float32)[0].item())
    except ImportError:
        import cupy
        value = float(cupy.asarray(imported).view(cupy.float32)[0].item())
    print(json.dumps([value, imported.size]))
'''
if LIB:
    proc = subprocess.run([sys.executable, "-c", child, json.dumps([[p.fd, p.offset, p.size] for p in pieces])],
                          pass_fds=[p.fd for p in pieces], capture_output=True, text=True, timeout=120)
    seen = json.loads(proc.stdout)[0] if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]
    note("second process maps the fds, reads [0]", seen == 42.0, f"read {seen!r} via {len(pieces)} fds")
for p in pieces:
    os.close(p.fd)
del buffer
gc.collect()
if LIB == "torch":
    torch.cuda.synchronize()
t0 = time.perf_counter()
grown = strategy.adjust(handle, GROW)
t1 = time.perf_counter()
same_ptr = handle.address == ptr
buffer = strategy.claim(handle)
if LIB:
    kernel_sum(buffer, buffer.size)
del buffer
gc.collect()
if LIB == "torch":
    torch.cuda.synchronize()
t2 = time.perf_counter()
back = strategy.adjust(handle, RESERVE)
t3 = time.perf_counter()
note(f"adjust {RESERVE}->{GROW}->{RESERVE} MiB, pointer kept", same_ptr and handle.address == ptr,
     f"grow {1e3 * (t1 - t0):.1f} ms, shrink {1e3 * (t3 - t2):.1f} ms, sizes {grown:.0f}/{back:.0f}")
before_release = used()
strategy.release(handle)
note("release returns MiB (NVML)", f"{(before_release - used()) / MiB:.0f}", "")

# ---- timings, each in a fresh process ----------------------------------------------------------------
timed = r'''
import gc, os, sys, time
mode, mib = sys.argv[1], int(sys.argv[2])
lib = sys.argv[3]
if lib == "torch":
    import torch
else:
    import cupy
from prealloc.strategies.gpu import GpuMemoryStrategy
from prealloc.types import ResourceRequest, ResourceType
n = mib * (1 << 20)
def sync():
    torch.cuda.synchronize() if lib == "torch" else cupy.cuda.Device(0).synchronize()
def kernel(obj_or_tensor):
    if lib == "torch":
        t = torch.as_tensor(obj_or_tensor, device="cuda:0") if not torch.is_tensor(obj_or_tensor) else obj_or_tensor
        t.view(torch.float32).fill_(1.0)
    else:
        a = cupy.asarray(obj_or_tensor) if not isinstance(obj_or_tensor, cupy.ndarray) else obj_or_tensor
        a.view(cupy.float32).fill(1.0)
    sync()
if mode in ("prealloc", "ctx_warm"):
    strategy = GpuMemoryStrategy(device=0)
    grant = strategy.allocate(ResourceRequest(ResourceType.GPU, mib), mib, None)  # ahead of the need
if mode == "torch_cached":
    if lib == "torch":
        x = torch.empty(n, dtype=torch.uint8, device="cuda:0"); kernel(x); del x   # cached, not freed
    else:
        x = cupy.empty(n, dtype=cupy.uint8); kernel(x); del x                   # cupy's pool keeps it
t0 = time.perf_counter()
if mode == "prealloc":
    kernel(strategy.claim(grant.handle))
elif mode in ("cold", "torch_cached"):
    kernel(torch.empty(n, dtype=torch.uint8, device="cuda:0") if lib == "torch" else cupy.empty(n, dtype=cupy.uint8))
elif mode in ("ctx_cold", "ctx_warm"):
    (torch.zeros(1, device="cuda:0") if lib == "torch" else cupy.zeros(1)).sum()
    sync()
t1 = time.perf_counter()
print(1e3 * (t1 - t0))
'''
def measure(mode, mib):
    values = []
    for _ in range(REPEATS):
        proc = subprocess.run([sys.executable, "-c", timed, mode, str(mib), LIB], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            return None, proc.stderr.strip().splitlines()[-1]
        values.append(float(proc.stdout.split()[-1]))
    return statistics.median(values), f"min {min(values):.2f} of {REPEATS} fresh processes"

if LIB:
    cold, cold_note = measure("cold", RESERVE)
    for mode, label in (("cold", f"need->usable {RESERVE} MiB: cold cudaMalloc + first kernel"),
                        ("prealloc", f"need->usable {RESERVE} MiB: prealloc claim + first kernel"),
                        ("torch_cached", f"need->usable {RESERVE} MiB: {LIB} warm caching allocator + kernel")):
        value, detail = (cold, cold_note) if mode == "cold" else measure(mode, RESERVE)
        ratio = f", {cold / value:.1f}x faster than cold" if value and cold and mode != "cold" else ""
        note(label + " (ms)", None if value is None else round(value, 2), detail + ratio)
    ctx_cold, detail = measure("ctx_cold", 2)
    note("first CUDA call, cold context (ms)", None if ctx_cold is None else round(ctx_cold, 2), detail)
    ctx_warm, detail = measure("ctx_warm", 2)
    ratio = f", {ctx_cold / ctx_warm:.1f}x faster" if ctx_cold and ctx_warm else ""
    note("first CUDA call, context warmed by prealloc (ms)", None if ctx_warm is None else round(ctx_warm, 2),
         detail + ratio)

strategy.close()
monitor.close()
width = max(len(r[0]) for r in rows)
print(f"{'check':<{width}}  {'result':>14}  notes")
for what, value, detail in rows:
    print(f"{what:<{width}}  {str(value):>14}  {detail}")
PYTHON
