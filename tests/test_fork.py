"""fork() and the native core, from Python (prealloc.core, no engine).

Each case runs in a fresh interpreter (subprocess), so the fork happens in a process whose
threads are known: the script forks (os.fork, or multiprocessing with the fork start
method) while it holds a running ExpiryTicker or a populated memory reservation, and
reports what it saw on stdout as JSON.

- A forked child that uses, stops and closes an inherited ticker, and then exits
  normally, terminates (the subprocess timeout of 60 s is the hang detector, not a
  timing assertion); a child can start the ticker again and it expires a record there.
- The parent's populated private reservation is not copy-on-write after a fork: its
  write pass afterwards takes far fewer minor faults than it has pages (getrusage), the
  child sees the range zero-filled, and a shareable reservation stays shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

HANG_DETECTOR_S = 60


def run_script(source: str) -> dict:
    # A session of its own, so that a hang kills the forked grandchildren too (a plain
    # timeout kills only the direct child and leaves a hung grandchild behind).
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(source)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG_DETECTOR_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the script hung for {HANG_DETECTOR_S} s")
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


TICKER_PRELUDE = """
    import json, os, sys, time
    from prealloc import core
    table = core.AllocationTable(64)
    ticker = core.ExpiryTicker(table)          # started
    far = table.insert(0, 1.0, status=core.ALLOCATED)
    ticker.schedule_ns(far, core.monotonic_ns() + 3600 * 10**9)
    time.sleep(0.05)                            # the thread asleep in its timed wait

    def child_uses_ticker():
        # an inherited ticker: stopped here, holding the parent's timer; start works
        ok = ticker.pending == 1
        ticker.start()
        rid = table.insert(0, 1.0, status=core.ALLOCATED)
        ticker.schedule_ns(rid, core.monotonic_ns())
        got = ticker.wait(timeout=20)
        ok = ok and list(got) == [rid] and table.status(rid) == core.EXPIRED
        ticker.stop()
        ticker.close()
        return ok
"""


def test_os_fork_child_with_running_ticker_exits():
    result = run_script(TICKER_PRELUDE + """
    pid = os.fork()
    if pid == 0:
        ok = child_uses_ticker()
        # a normal exit (interpreter shutdown, atexit), not os._exit
        sys.exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    # the parent's ticker still fires, and the child's wakeup was not ours
    rid = table.insert(0, 1.0, status=core.ALLOCATED)
    ticker.schedule_ns(rid, core.monotonic_ns())
    got = ticker.wait(timeout=20)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "parent_got": [int(x) for x in got],
                      "rid": rid, "pending": ticker.pending}))
    """)
    assert result["child"] == 0
    assert result["parent_got"] == [result["rid"]]
    assert result["pending"] == 1


def test_fork_child_exits_without_closing_the_ticker():
    # the ticker is only torn down by interpreter shutdown in the child
    result = run_script(TICKER_PRELUDE + """
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status)}))
    """)
    assert result["child"] == 0


def test_multiprocessing_fork_child_with_running_ticker_exits():
    result = run_script(TICKER_PRELUDE + """
    import multiprocessing
    def target():
        sys.exit(0 if child_uses_ticker() else 3)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=target)
    p.start()
    p.join(timeout=50)
    alive = p.is_alive()
    if alive:
        p.kill()
    print(json.dumps({"alive": alive, "exitcode": p.exitcode}))
    """)
    assert not result["alive"], "the forked child hung"
    assert result["exitcode"] == 0


def test_fork_does_not_make_private_reservation_copy_on_write():
    result = run_script("""
    import json, os, resource
    import numpy as np
    from prealloc import core
    size = 64 << 20
    page = core.page_size()
    region = core.reserve_memory(size, populate=True)
    view = np.frombuffer(region, dtype=np.uint8)
    view[::page] = 7
    pid = os.fork()
    if pid == 0:
        # the child's copy of the range is its own and empty
        os._exit(0 if int(view[::page].max()) == 0 else 3)
    _, status = os.waitpid(pid, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    view[::page] = 9
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "faults": faults,
                      "pages": size // page, "value": int(view[page])}))
    """)
    assert result["child"] == 0
    assert result["value"] == 9
    # copy-on-write would fault once per page (16384 for 64 MiB of 4 KiB pages)
    assert result["faults"] < result["pages"] // 16, result


def test_fork_keeps_shareable_reservation_shared():
    result = run_script("""
    import json, os
    import numpy as np
    from prealloc import core
    region = core.reserve_memory(1 << 20, populate=True, shareable=True)
    view = np.frombuffer(region, dtype=np.uint8)
    pid = os.fork()
    if pid == 0:
        view[123] = 42
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "seen": int(view[123])}))
    """)
    assert result["child"] == 0
    assert result["seen"] == 42
