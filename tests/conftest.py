"""Fixtures shared by the test modules."""
from __future__ import annotations

import subprocess
import sys

import pytest

# A child with a few threads, so "every thread of the process" is tested, not just one.
CHILD_WITH_THREADS = (
    "import threading, time\n"
    "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def child():
    """A live process with four threads; killed after the test."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD_WITH_THREADS], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()
