"""TEST CODE, never shipped: fake NVIDIA driver libraries for machines without a GPU.

``fake_nvml.c`` builds a ``libnvidia-ml.so.1`` and ``fake_cuda.c`` a ``libcuda.so.1``
(host memory standing in for device memory); both map one state file
(``fake_gpu_state.h``, mirrored here with ctypes) named by ``$PREALLOC_FAKE_GPU_STATE``.
A test builds them once with gcc (:func:`build_fake_libraries`), writes a
:class:`FakeGpuMachine` (devices, totals, injected faults) and runs the code under test
in a subprocess whose ``LD_LIBRARY_PATH`` puts the fakes where the driver's libraries
would be: the real ``pynvml`` and prealloc's ctypes binding load them through the
dynamic loader exactly as they load NVIDIA's. Subprocesses keep the fakes out of the
pytest process, where another test's "is there a GPU?" would otherwise find one.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MAGIC = 0x50414750
VERSION = 1
MAX_DEVICES = 4
MAX_MIG = 4
MAX_PROCS = 16
MAX_FAULTS = 4
MiB = 1 << 20

NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_DRIVER_NOT_LOADED = 9
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_UNKNOWN = 999


class Fault(ctypes.Structure):
    _fields_ = [("call", ctypes.c_char * 48), ("after", ctypes.c_int32), ("count", ctypes.c_int32),
                ("code", ctypes.c_int32), ("hits", ctypes.c_uint32)]


class Mig(ctypes.Structure):
    _fields_ = [("total", ctypes.c_uint64), ("used", ctypes.c_uint64)]


class Device(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 64), ("uuid", ctypes.c_char * 96),
                ("total", ctypes.c_uint64), ("reserved", ctypes.c_uint64), ("base_used", ctypes.c_uint64),
                ("allocated", ctypes.c_uint64), ("util_gpu", ctypes.c_uint32), ("util_memory", ctypes.c_uint32),
                ("mig_enabled", ctypes.c_uint32), ("mig_count", ctypes.c_uint32), ("mig", Mig * MAX_MIG),
                ("primary_ctx_refs", ctypes.c_int32), ("vmm_supported", ctypes.c_uint32),
                ("posix_fd_supported", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Proc(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("used", ctypes.c_uint64 * MAX_DEVICES)]


class State(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32),
                ("nvml_init_error", ctypes.c_int32), ("cuda_init_error", ctypes.c_int32),
                ("device_count", ctypes.c_uint32), ("driver_version", ctypes.c_uint32),
                ("granularity", ctypes.c_uint64),
                ("live_handles", ctypes.c_int64), ("live_reservations", ctypes.c_int64),
                ("mapped_bytes", ctypes.c_int64), ("nvml_inits", ctypes.c_int64),
                ("faults", Fault * MAX_FAULTS), ("dev", Device * MAX_DEVICES), ("procs", Proc * MAX_PROCS)]


def build_fake_libraries(directory: Path) -> Path:
    """Compiles both fakes into directory (a LD_LIBRARY_PATH entry); returns it."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc/cc) to build the fake GPU libraries")
    directory.mkdir(parents=True, exist_ok=True)
    for source, soname, libs in (("fake_nvml.c", "libnvidia-ml.so.1", ["-lpthread"]),
                                 ("fake_cuda.c", "libcuda.so.1", ["-lpthread", "-ldl"])):
        subprocess.run([gcc, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                        f"-Wl,-soname,{soname}", "-o", str(directory / soname), str(HERE / source), *libs],
                       check=True, capture_output=True, text=True)
    return directory


def uuid_for(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-44445555{index:04x}"


class FakeGpuMachine:
    """One fake machine: the state file both fakes map, and a view of it here."""

    def __init__(self, library_dir: Path, state_path: Path, *, devices: int = 1, total_mib: int = 1024,
                 reserved_mib: int = 64, base_used_mib: int = 100, granularity: int = 2 * MiB) -> None:
        with open(state_path, "wb") as file:
            file.write(b"\0" * ctypes.sizeof(State))
        self._open(library_dir, state_path)
        self.state.magic, self.state.version = MAGIC, VERSION
        self.state.device_count = devices
        self.state.driver_version = 12040
        self.state.granularity = granularity
        for index in range(devices):
            device = self.state.dev[index]
            device.name = f"Fake GPU {index}".encode()
            device.uuid = uuid_for(index).encode()
            device.total = total_mib * MiB
            device.reserved = reserved_mib * MiB
            device.base_used = base_used_mib * MiB
            device.vmm_supported = 1
            device.posix_fd_supported = 1

    def _open(self, library_dir: Path, state_path: Path) -> None:
        self.library_dir = library_dir
        self.state_path = state_path
        self._file = open(state_path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), ctypes.sizeof(State))
        self.state = State.from_buffer(self._map)

    @classmethod
    def attach(cls, state_path: str | Path) -> FakeGpuMachine:
        """The machine another process set up (a test's subprocess changing it)."""
        machine = cls.__new__(cls)
        machine._open(Path(), Path(state_path))
        return machine

    def device(self, index: int) -> Device:
        return self.state.dev[index]

    def fault(self, call: str, code: int, *, after: int = 0, count: int = 0) -> Fault:
        """Makes call fail with code after `after` successes, `count` times (0: for ever)."""
        for slot in self.state.faults:
            if slot.code == 0:
                slot.call, slot.after, slot.count, slot.code = call.encode(), after, count, code
                return slot
        raise RuntimeError("all fault slots are taken")

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(self.library_dir)
        env["PREALLOC_FAKE_GPU_STATE"] = str(self.state_path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def run(self, code: str, *, timeout: float = 60.0, env: dict[str, str] | None = None) -> Any:
        """Runs code in a fresh interpreter on this machine; the JSON it prints last
        (``emit(value)``) comes back. Its failure fails the test, with its stderr."""
        prelude = "import json, sys\ndef emit(value):\n    print('@@' + json.dumps(value), flush=True)\n"
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                              env=self.env() if env is None else env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
        return json.loads(lines[-1][2:]) if lines else None

    def close(self) -> None:
        del self.state
        try:
            self._map.close()
        except BufferError:
            pass  # a test still holds a ctypes view of the state; the map goes with it
        self._file.close()
