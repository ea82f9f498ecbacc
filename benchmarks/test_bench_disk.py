"""DISK_IO space, side by side in one run (the I/O priority benchmark, which needs two
processes and a device, is the script benchmarks/bench_disk.py).

  reserve  make 64 MiB of disk space certainly there: DiskStrategy allocate + claim
           (the fallocate syscall, a file handed over) vs writing 64 MiB of zeros and
           fsync (what posix_fallocate's emulation, or dd, does) vs ftruncate (the
           "instant" file that reserves nothing: a sparse file, ENOSPC still possible)
"""
from __future__ import annotations

import itertools
import os

import pytest

from conftest import per_item
from prealloc.strategies.disk import DiskStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

MIB = 1 << 20
SIZE_MIB = 64


@pytest.fixture
def directory(tmp_path):
    return tmp_path


@pytest.mark.benchmark(group="disk-reserve")
def test_strategy_fallocate(benchmark, directory):
    strategy = DiskStrategy(headroom_mib=0, journal=None)
    names = itertools.count()

    def reserve():
        request = ResourceRequest(ResourceType.DISK_IO, SIZE_MIB, metadata=RequestMetadata(
            custom_properties={"directory": str(directory), "keep_size": False, "name": f"reserved-{next(names)}"}))
        grant = strategy.allocate(request, SIZE_MIB, None)
        claim = strategy.claim(grant.handle)
        return grant, claim

    def teardown(grant, claim):
        assert os.fstat(claim.fd).st_blocks * 512 >= SIZE_MIB * MIB
        os.close(claim.fd)
        os.unlink(claim.path)
        strategy.release(grant.handle)

    results = []
    benchmark.pedantic(lambda: results.append(reserve()), rounds=5, iterations=1)
    for grant, claim in results:
        teardown(grant, claim)
    per_item(benchmark, 1)


@pytest.mark.benchmark(group="disk-reserve")
def test_write_zeros_and_fsync(benchmark, directory):
    path = directory / "written"
    chunk = bytes(MIB)

    def write():
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        for _ in range(SIZE_MIB):
            os.write(fd, chunk)
        os.fsync(fd)
        os.close(fd)

    benchmark.pedantic(write, setup=lambda: path.unlink(missing_ok=True), rounds=5, iterations=1)
    assert os.stat(path).st_blocks * 512 >= SIZE_MIB * MIB
    per_item(benchmark, 1, baseline=True)


@pytest.mark.benchmark(group="disk-reserve")
def test_ftruncate_reserves_nothing(benchmark, directory):
    path = directory / "sparse"

    def truncate():
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, SIZE_MIB * MIB)
        os.close(fd)

    benchmark.pedantic(truncate, setup=lambda: path.unlink(missing_ok=True), rounds=5, iterations=1)
    assert os.stat(path).st_blocks == 0  # fast because it holds no space at all
    per_item(benchmark, 1)
