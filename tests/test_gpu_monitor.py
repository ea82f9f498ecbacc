"""NvmlMonitor through the real pynvml, over the fake libnvidia-ml.so.1 (tests/fakes).

Each test writes a fake machine (devices, totals, MIG, faults) and runs the monitor in a
subprocess whose LD_LIBRARY_PATH puts the fake where the driver's library would be, so
pynvml's own CDLL("libnvidia-ml.so.1") loads it: the real binding, the real ABI.
"""
from __future__ import annotations

import ctypes.util
import importlib.util

import pytest

from fakes import NVML_ERROR_GPU_IS_LOST, MiB
from fakes.fixtures import fake_gpu_factory, fake_gpu_libraries

FIXTURES = (fake_gpu_factory, fake_gpu_libraries)  # used by pytest, by name

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pynvml") is None,
                                reason="nvidia-ml-py (pynvml) is not installed: pip install '.[test]'")


def test_v2_memory_per_device_utilisation_and_totals(fake_gpu_factory):
    machine = fake_gpu_factory(devices=2, total_mib=1024, reserved_mib=64, base_used_mib=100)
    machine.device(1).base_used = 300 * MiB
    machine.device(0).util_gpu, machine.device(0).util_memory = 37, 12
    out = machine.run("""
        from prealloc.monitors.nvml import NvmlMonitor
        from prealloc.types import ResourceType
        with NvmlMonitor() as monitor:
            devices = [d.__dict__ | {"key": d.key} for d in monitor.devices()]
            a = monitor.get_resource_availability(ResourceType.GPU)
            emit({"devices": devices, "total": a.total, "available": a.available, "used": a.used})
    """)
    first, second = out["devices"]
    # v2: used is what processes hold; the driver's 64 MiB is "reserved", not used
    assert (first["total"], first["used"], first["reserved"]) == (1024 * MiB, 100 * MiB, 64 * MiB)
    assert first["free"] == (1024 - 64 - 100) * MiB
    assert second["used"] == 300 * MiB and second["free"] == (1024 - 64 - 300) * MiB
    assert (first["utilization_gpu"], first["utilization_memory"]) == (37, 12)
    assert first["key"] == "0" and first["uuid"].startswith("GPU-") and first["name"] == "Fake GPU 0"
    assert out["total"] == 2048 and out["used"] == 400
    assert out["available"] == (1024 - 164) + (1024 - 364)


def test_mig_instances_are_devices_and_the_parent_is_not_counted(fake_gpu_factory):
    machine = fake_gpu_factory(devices=2)
    parent = machine.device(1)
    parent.mig_enabled, parent.mig_count = 1, 2
    parent.mig[0].total, parent.mig[0].used = 512 * MiB, 0
    parent.mig[1].total, parent.mig[1].used = 256 * MiB, 10 * MiB
    out = machine.run("""
        from prealloc.monitors.nvml import NvmlMonitor
        from prealloc.types import ResourceType
        with NvmlMonitor() as monitor:
            devices = [(d.key, d.total, d.used, d.utilization_gpu) for d in monitor.devices()]
            emit({"devices": devices, "total": monitor.get_resource_availability(ResourceType.GPU).total})
    """)
    assert out["devices"] == [["0", 1024 * MiB, 100 * MiB, 0], ["1/mig0", 512 * MiB, 0, None],
                              ["1/mig1", 256 * MiB, 10 * MiB, None]]
    assert out["total"] == 1024 + 512 + 256  # not the parent's 1024 as well


def test_own_process_usage_and_other_processes(fake_gpu_factory):
    machine = fake_gpu_factory()
    other = machine.state.procs[0]
    other.pid, other.used[0] = 1, 50 * MiB  # a process that is not ours
    out = machine.run("""
        import os
        from prealloc.monitors.nvml import NvmlMonitor
        from prealloc.strategies.gpu import GpuMemoryStrategy
        from prealloc.types import ResourceRequest, ResourceType
        with NvmlMonitor() as monitor:
            before = monitor.device(0).process_used
            strategy = GpuMemoryStrategy(monitor=monitor)
            grant = strategy.allocate(ResourceRequest(ResourceType.GPU, 64), 64, None)
            info = monitor.device(0)
            strategy.release(grant.handle)
            emit({"before": before, "during": info.process_used, "processes": info.processes,
                  "pid": os.getpid(), "after": monitor.device(0).process_used})
    """)
    assert out["before"] == 0 and out["during"] == 64 * MiB and out["after"] == 0
    assert sorted(map(tuple, out["processes"])) == sorted([(1, 50 * MiB), (out["pid"], 64 * MiB)])


def test_subscription_hears_a_change_by_sampling(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run(f"""
        import os, threading, time
        from prealloc.monitors.nvml import NvmlMonitor
        from prealloc.types import ResourceType
        import fakes
        heard = []
        got = threading.Event()
        machine = fakes.FakeGpuMachine.attach(os.environ["PREALLOC_FAKE_GPU_STATE"])
        # a fault that never fires, as a call counter: the watcher's baseline sample is
        # the first memory read after subscribing; after the second it is surely taken
        counter = machine.fault("nvmlDeviceGetMemoryInfo_v2", 999, after=1 << 30)
        with NvmlMonitor(sample_interval=0.02) as monitor:
            monitor.subscribe_to_resource_changes(ResourceType.GPU, lambda a: (heard.append(a.available), got.set()))
            deadline = time.monotonic() + 10
            while counter.after > (1 << 30) - 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            # another process takes 500 MiB: written into the shared state the fake NVML reads
            machine.device(0).base_used += 500 * {MiB}
            assert got.wait(10), "no callback within 10 s"
            emit(heard[0])
    """)
    assert out == 1024 - 64 - 100 - 500


def test_nvml_error_is_unavailable_with_the_reason(fake_gpu_factory):
    machine = fake_gpu_factory()
    machine.fault("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_GPU_IS_LOST)
    out = machine.run("""
        from prealloc.monitors.nvml import NvmlMonitor, GpuUnavailable
        with NvmlMonitor() as monitor:
            try:
                monitor.devices()
            except GpuUnavailable as exc:
                emit(exc.reason)
    """)
    assert out == "nvmlDeviceGetMemoryInfo: GPU is lost"


def test_a_refused_process_list_leaves_memory_figures_standing(fake_gpu_factory):
    machine = fake_gpu_factory()
    machine.fault("nvmlDeviceGetComputeRunningProcesses", 4)  # NVML_ERROR_NO_PERMISSION (a container)
    out = machine.run("""
        from prealloc.monitors.nvml import NvmlMonitor
        with NvmlMonitor() as monitor:
            info = monitor.device(0)
            emit([info.used, info.processes, info.process_used])
    """)
    assert out == [100 * MiB, [], 0]
    assert machine.state.faults[0].hits == 1


def test_close_shuts_nvml_down_and_reads_still_work(fake_gpu_factory):
    machine = fake_gpu_factory()
    out = machine.run("""
        import os
        import fakes
        from prealloc.monitors.nvml import NvmlMonitor
        from prealloc.types import ResourceType
        state = fakes.FakeGpuMachine.attach(os.environ["PREALLOC_FAKE_GPU_STATE"]).state
        monitor = NvmlMonitor()
        open_inits = state.nvml_inits
        monitor.close()
        closed_inits = state.nvml_inits
        total = monitor.get_resource_availability(ResourceType.GPU).total
        emit([open_inits, closed_inits, total, state.nvml_inits])
    """)
    assert out == [1, 0, 1024, 0]


def test_no_device_and_driver_not_loaded_are_unavailable(fake_gpu_factory):
    machine = fake_gpu_factory(devices=0)
    code = """
        from prealloc.monitors.nvml import nvml_unavailable_reason
        emit(nvml_unavailable_reason())
    """
    assert machine.run(code) == "no GPU: NVML reports 0 devices"
    # the library is there, its driver is not (the fake without a state file)
    env = machine.env(PREALLOC_FAKE_GPU_STATE="/nonexistent")
    assert machine.run(code, env=env) == "nvmlInit: NVIDIA driver not loaded"


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="this machine has a real libnvidia-ml: 'library not found' cannot happen here")
def test_no_library_is_unavailable_and_the_engine_still_starts(fake_gpu_factory):
    machine = fake_gpu_factory()
    env = machine.env(LD_LIBRARY_PATH="", PREALLOC_FAKE_GPU_STATE="")
    out = machine.run("""
        from prealloc import ResourcePreallocator
        from prealloc.monitors.nvml import NvmlMonitor, GpuUnavailable, nvml_unavailable_reason
        from prealloc.strategies.gpu import GpuMemoryStrategy
        from prealloc.strategies.base import AllocationError
        from prealloc.types import ResourceRequest, ResourceType
        try:
            NvmlMonitor()
        except GpuUnavailable as exc:
            reason = exc.reason
        try:
            GpuMemoryStrategy().allocate(ResourceRequest(ResourceType.GPU, 8), 8, None)
        except AllocationError as exc:
            strategy_reason = str(exc)
        with ResourcePreallocator() as pre:
            started = not pre.closed
        emit([reason, nvml_unavailable_reason(), strategy_reason, started])
    """, env=env)
    reason, probed, strategy_reason, started = out
    assert reason == probed == "nvmlInit: NVML library not found (libnvidia-ml.so.1: no NVIDIA driver installed)"
    assert strategy_reason.startswith("GPU: CUDA driver library not found (libcuda.so.1")
    assert started


def test_bad_arguments():
    from prealloc.monitors.nvml import NvmlMonitor

    with pytest.raises(ValueError, match="sample_interval"):
        NvmlMonitor(sample_interval=0)
