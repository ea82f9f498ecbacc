"""Core reservations applied to one target and released in any order (prealloc.core,
checked with os.sched_getaffinity): the target always runs on its newest live
reservation's cores, and on its original mask once none is left."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from prealloc import core

ALLOWED = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 cpus in this process's affinity")


@pytest.fixture
def sleeper():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("release_order", list(itertools.permutations(range(3))))
def test_any_release_order_leaves_the_newest_live_mask(sleeper, release_order):
    c0, c1 = ALLOWED[:2]
    masks = [{c0}, {c1}, {c0, c1}]
    original = os.sched_getaffinity(sleeper.pid)
    registry = core.CoreReservations()
    held = [registry.reserve_cores(m, exclusive=False) for m in masks]
    for reservation in held:
        reservation.apply(sleeper.pid, whole_process=True)
    assert os.sched_getaffinity(sleeper.pid) == masks[2]
    live = [0, 1, 2]
    for index in release_order:
        held[index].release()
        live.remove(index)
        expected = masks[live[-1]] if live else original
        assert os.sched_getaffinity(sleeper.pid) == expected, (release_order, index)


def test_fork_child_does_not_unpin_the_parent():
    # a child exits normally with the registry alive: its teardown must not restore the
    # parent's pins (the parent still holds the reservation)
    script = """
import os, sys, json
from prealloc import core
registry = core.CoreReservations()
mine = registry.reserve(1, exclusive=True)
mine.apply(0, whole_process=True)
pinned = set(mine.cores)
pid = os.fork()
if pid == 0:
    del mine
    del registry          # pa_cores_destroy in the child
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status),
                  "ok": os.sched_getaffinity(0) == pinned}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith('"ok": true}'), done.stdout
