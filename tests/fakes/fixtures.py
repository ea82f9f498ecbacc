"""TEST CODE: pytest fixtures for the fake GPU libraries (import them into a test module)."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import FakeGpuMachine, build_fake_libraries


@pytest.fixture(scope="session")
def fake_gpu_libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fakes compiled once per session into a directory for LD_LIBRARY_PATH."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the fake GPU libraries")
    directory = tmp_path_factory.mktemp("fake-gpu-libs")
    build_fake_libraries(directory)
    directory.chmod(0o755)
    return directory


@pytest.fixture
def fake_gpu_factory(fake_gpu_libraries: Path, tmp_path: Path) -> Iterator[Callable[..., FakeGpuMachine]]:
    """fake_gpu_factory(devices=..., total_mib=...) -> a FakeGpuMachine of this test.
    Afterwards nothing may be left held: no allocation handle, reserved range, mapping,
    retained primary context or NVML initialisation — in any process of the test."""
    machines: list[FakeGpuMachine] = []

    def make(**options: Any) -> FakeGpuMachine:
        machine = FakeGpuMachine(fake_gpu_libraries, tmp_path / f"gpu-state-{len(machines)}", **options)
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        state = machine.state
        left = {"handles": state.live_handles, "reservations": state.live_reservations,
                "mapped_bytes": state.mapped_bytes, "nvml_inits": state.nvml_inits,
                "allocated": [state.dev[i].allocated for i in range(state.device_count)],
                "primary_contexts": [state.dev[i].primary_ctx_refs for i in range(state.device_count)]}
        machine.close()
        assert left == {"handles": 0, "reservations": 0, "mapped_bytes": 0, "nvml_inits": 0,
                        "allocated": [0] * len(left["allocated"]),
                        "primary_contexts": [0] * len(left["allocated"])}, f"left held: {left}"
