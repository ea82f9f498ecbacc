"""A process's signals reach the thread that acts on them.

The kernel hands a process-directed signal to any thread that does not block it, and
CPython acts on one that lands off the main thread only once the main thread is woken
otherwise (prealloc._threads). Seen in CI: ``prealloc serve`` never drained at SIGTERM and
``prealloc status --watch`` never ended at Ctrl-C when the signal went to numpy's BLAS
thread. Checked through /proc/PID/task/TID/status (SigBlk) of real processes: every thread
but the main one blocks SIGTERM, SIGINT and SIGHUP; and an in-process ``Broker.serve()``
drains at a SIGTERM delivered on a host thread that does not block it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

from osutil import FOREGROUND_PREALLOC, signal_and_wait
from prealloc.client import Client
from test_server import BrokerProcess

PROCESS_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _mask(pid: int, tid: int) -> int:
    """The thread's blocked-signal mask (SigBlk)."""
    with open(f"/proc/{pid}/task/{tid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("SigBlk:")), 16)


def _blocked(pid: int, tid: int) -> set[int]:
    mask = _mask(pid, tid)
    return {signum for signum in PROCESS_SIGNALS if mask >> (signum - 1) & 1}


def _threads_taking_signals(pid: int) -> dict[int, set[int]]:
    """Each thread of pid other than the main one, with the process signals it does NOT
    block (empty for a thread that blocks them all)."""
    result = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        if tid != pid:
            try:
                result[tid] = set(PROCESS_SIGNALS) - _blocked(pid, tid)
            except FileNotFoundError:
                pass  # ended meanwhile
    return result


def _run_python(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_library_threads_and_numpys_pool_block_process_signals():
    # a fresh process (numpy's BLAS pool is started by `import prealloc`) holding an
    # engine and the asyncio face, looked at from here while all their threads live
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import asyncio, sys
        from prealloc import ResourcePreallocator, ResourceType
        from prealloc.aio import AsyncPreallocator

        async def main():
            with ResourcePreallocator() as pre:
                with pre.acquire(ResourceType.MEMORY, 1):
                    pass
                async with AsyncPreallocator(pre, own=False) as apre:
                    async with apre.acquire(ResourceType.MEMORY, 1):
                        pass  # a miss: allocated on the face's executor thread
                    print("ready", flush=True)
                    sys.stdin.readline()

        asyncio.run(main())
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline() == "ready\n", host.stderr.read()
        threads = _threads_taking_signals(host.pid)
        assert len(threads) >= 3  # the workers, the ticker, a monitor, the executor (and numpy's pool)
        assert all(not taking for taking in threads.values()), f"threads that take process signals: {threads}"
        # the host's main thread keeps the mask it was started with (this thread's)
        assert _mask(host.pid, host.pid) == _mask(os.getpid(), threading.get_native_id())
    finally:
        _, err = host.communicate("\n", timeout=120)
    assert host.returncode == 0, err


def test_every_broker_thread_but_the_main_one_blocks_process_signals(tmp_path):
    broker = BrokerProcess(tmp_path)
    with Client(broker.socket_path) as client:
        client.acquire("memory", 1).release()
        client.acquire("cpu", 1).release()
        threads = _threads_taking_signals(broker.pid)
        assert len(threads) >= 3  # this peer's, the engine's workers and ticker, ...
        assert all(not taking for taking in threads.values()), threads
        assert _blocked(broker.pid, broker.pid) == set()  # the main thread takes them
    assert broker.stop() == 0, broker.log()


def test_serve_drains_at_a_sigterm_that_lands_on_a_host_thread(tmp_path):
    # A host thread that does not block signals (as a host's own may not) receives the
    # SIGTERM itself (pthread_kill: directed at that thread): serve() still drains
    socket_path = tmp_path / "b.sock"
    done = _run_python(f"""
        import signal, threading, time
        from prealloc.server import Broker

        def deliver():
            # once serve() has its handler (before, SIGTERM would end the process)
            while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                time.sleep(0.05)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        host = threading.Thread(target=deliver, daemon=True)
        host.start()
        print("serve returned", Broker({str(socket_path)!r}).serve(), flush=True)
    """)
    assert done.returncode == 0 and "serve returned 0" in done.stdout, done.stdout + done.stderr
    assert not socket_path.exists()  # drained: the listener is gone with its path


def test_status_watch_threads_block_signals_and_ctrl_c_ends_it(tmp_path):
    proc = subprocess.Popen([*FOREGROUND_PREALLOC, "status", "--dir", str(tmp_path / "journal"),
                             "--socket", str(tmp_path / "none.sock"), "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("source: ")
        threads = _threads_taking_signals(proc.pid)
        assert all(not taking for taking in threads.values()), threads
        _, err = signal_and_wait(proc, signal.SIGINT)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

