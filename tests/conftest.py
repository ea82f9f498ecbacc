"""Fixtures shared by the test modules."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_affinity_journal(tmp_path_factory):
    """The CPU strategy journals pins of other processes (prealloc.journal); the tests
    (and the subprocesses they start) keep theirs in a directory of their own rather than
    the machine's /run/prealloc. Afterwards it must be empty: every pin was released."""
    directory = tmp_path_factory.mktemp("affinity-journal")
    os.environ["PREALLOC_JOURNAL_DIR"] = str(directory)
    yield directory
    del os.environ["PREALLOC_JOURNAL_DIR"]
    left = sorted(p.name for p in directory.iterdir())
    assert left == [], f"pins left in the affinity journal: {left}"

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
