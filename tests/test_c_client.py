"""The C client (<prealloc/client.h>) as a C host uses it: compiled against the installed
package's headers and static core, talking to the real broker (``prealloc serve`` in a
process of its own).

What is checked, through the operating system where it can be:
- a MEMORY claim is the broker's own pages, not a copy: the host's mapping is of the same
  memfd inode the broker holds open (/proc/BROKER/fd), the pattern the host writes is read
  back through the broker's descriptor, the pages were resident before the host touched
  them (mincore), the host's RssShmem rises by the size and its RssAnon does not;
- release unmaps (/proc/self/maps of the host), the broker closes its memfd, and the
  host's descriptor table and the broker's are back where they started;
- the broker's errors arrive as -errno with their type (KeyError for another peer's id,
  ValueError), and another client (Python) cannot touch the C host's allocation;
- against a hostile peer (a scripted socket in this test, speaking broken protocol on
  purpose: the real broker never would), every answer that breaks the protocol fails the
  call with the right -errno, the connection is then refused (-ENOTCONN), and no received
  descriptor stays open in the host (its /proc/self/fd before and after).
"""
from __future__ import annotations

import array
import errno
import importlib.util
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from osutil import build_c_host

HOST = r"""
#define _GNU_SOURCE
#include <prealloc/client.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long status_kb(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long value = -1;
    size_t n = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':') value = atol(line + n + 1);
    if (f) fclose(f);
    return value;
}

static int open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own */
}

/* the inode of the mapping at addr in /proc/self/maps (0: not mapped) */
static unsigned long mapping_inode(void *addr) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long inode = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end, ino;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %lu", &start, &end, &ino) == 3 && start == (unsigned long)addr) inode = ino;
    }
    fclose(f);
    return inode;
}

static bool inode_mapped(unsigned long inode) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    bool found = false;
    while (fgets(line, sizeof line, f)) {
        unsigned long ino;
        if (sscanf(line, "%*s %*s %*s %*s %lu", &ino) == 1 && ino == inode) found = true;
    }
    fclose(f);
    return found;
}

static void report(pa_client_t *c, const char *what, int rc) {
    pa_client_error_t e;
    pa_client_last_error(c, &e);
    printf("%s rc=%d type=%s code=%d\n", what, rc, e.type[0] ? e.type : "-", e.code);
}

static int cycle(const char *path, double mib) {
    int fds_before = open_fds();
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    pa_client_hello_t hello;
    if ((rc = pa_client_hello(c, "test_c_client", &hello))) { report(c, "hello", rc); return 3; }
    printf("HELLO peer_pid=%d self=%d server=%s\n", (int)hello.peer_pid, (int)getpid(), hello.server);
    uint64_t id;
    if ((rc = pa_client_request_memory(c, mib, 0, &id))) { report(c, "request", rc); return 4; }
    bool ready = false;
    if ((rc = pa_client_wait_ready(c, &id, 1, 10.0, &ready)) || !ready) { report(c, "wait_ready", rc); return 5; }
    long shmem_before = status_kb("RssShmem"), anon_before = status_kb("RssAnon");
    void *addr;
    size_t size;
    if ((rc = pa_client_claim_memory(c, id, &addr, &size))) { report(c, "claim", rc); return 6; }
    size_t page = (size_t)sysconf(_SC_PAGESIZE), pages = size / page, resident = 0;
    unsigned char *vec = malloc(pages);
    if (mincore(addr, size, vec) == 0)
        for (size_t i = 0; i < pages; i++) resident += vec[i] & 1;
    free(vec);
    long shmem_mapped = status_kb("RssShmem");
    unsigned char *bytes = addr;
    for (size_t i = 0; i < size; i++) bytes[i] = (unsigned char)(i % 251);
    for (size_t p = 0; p < pages; p++) *(uint64_t *)(bytes + p * page) = id * 1000003u + p;
    long shmem_after = status_kb("RssShmem"), anon_after = status_kb("RssAnon");
    unsigned long inode = mapping_inode(addr);
    printf("CLAIMED id=%" PRIu64 " size=%zu inode=%lu pages=%zu resident=%zu shmem_before=%ld shmem_mapped=%ld "
           "shmem_after=%ld anon_before=%ld anon_after=%ld fds=%d\n",
           id, size, inode, pages, resident, shmem_before, shmem_mapped, shmem_after, anon_before, anon_after,
           open_fds());
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 7; /* the test looked through the broker */
    bool released = false;
    rc = pa_client_release(c, id, &released);
    printf("RELEASED rc=%d released=%d mapped=%d shmem=%ld\n", rc, released, inode_mapped(inode),
           status_kb("RssShmem"));
    rc = pa_client_release(c, id, &released);
    report(c, "AGAIN", rc);
    pa_client_close(c);
    printf("FDS before=%d after=%d\n", fds_before, open_fds());
    return 0;
}

static int errors(const char *path) {
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    uint64_t id = 0;
    report(c, "BOGUS_TYPE", pa_client_request(c, "bogus", 1, 0, NULL, &id));
    report(c, "NEGATIVE", pa_client_request_memory(c, -1, 0, &id));
    report(c, "NAN", pa_client_request_memory(c, NAN, 0, &id));
    void *addr;
    size_t size;
    report(c, "UNKNOWN_CLAIM", pa_client_claim_memory(c, 123456789, &addr, &size));
    report(c, "UNKNOWN_RELEASE", pa_client_release(c, 987654321, NULL));
    report(c, "FOREIGN_RELEASE", pa_client_release(c, strtoull(getenv("FOREIGN_ID"), NULL, 10), NULL));
    bool ready = false, released = false;
    rc = pa_client_submit(c, "memory", 1, 0, NULL, &id);
    int ready_rc = rc ? rc : pa_client_wait_ready(c, &id, 1, 10.0, &ready);
    int release_rc = rc ? rc : pa_client_release(c, id, &released);
    printf("SUBMIT rc=%d wait=%d ready=%d release=%d released=%d\n", rc, ready_rc, ready, release_rc, released);
    report(c, "HUGE", pa_client_request_memory(c, 1e12, 0, &id));
    pa_client_error_t e;
    pa_client_last_error(c, &e);
    printf("HUGE_MESSAGE %s\n", e.message);
    report(c, "HELLO", pa_client_hello(c, NULL, NULL));
    pa_client_close(c);
    pa_client_t *none;
    printf("MISSING rc=%d\n", pa_client_connect("/nonexistent/prealloc.sock", &none));
    char longpath[200];
    memset(longpath, 'x', sizeof longpath - 1);
    longpath[sizeof longpath - 1] = '\0';
    printf("TOOLONG rc=%d\n", pa_client_connect(longpath, &none));
    printf("NULLOUT rc=%d\n", pa_client_connect(path, NULL));
    return 0;
}

/* request / wait / claim / release, n cycles of mib MiB: nanoseconds per call */
static int bench(const char *path, int n, double mib) {
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    for (int i = 0; i < n; i++) {
        struct timespec t0, t1, t2, t3, t4;
        uint64_t id;
        bool ready;
        void *addr;
        size_t size;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if ((rc = pa_client_request_memory(c, mib, 0, &id))) { report(c, "request", rc); return 3; }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if ((rc = pa_client_wait_ready(c, &id, 1, 10.0, &ready))) { report(c, "wait", rc); return 4; }
        clock_gettime(CLOCK_MONOTONIC, &t2);
        if ((rc = pa_client_claim_memory(c, id, &addr, &size))) { report(c, "claim", rc); return 5; }
        clock_gettime(CLOCK_MONOTONIC, &t3);
        if ((rc = pa_client_release(c, id, NULL))) { report(c, "release", rc); return 6; }
        clock_gettime(CLOCK_MONOTONIC, &t4);
#define NS(a, b) ((long long)((b).tv_sec - (a).tv_sec) * 1000000000LL + ((b).tv_nsec - (a).tv_nsec))
        printf("%lld %lld %lld %lld\n", NS(t0, t1), NS(t1, t2), NS(t2, t3), NS(t3, t4));
    }
    pa_client_close(c);
    return 0;
}

static void print_affinity(const char *label) {
    cpu_set_t set;
    CPU_ZERO(&set);
    sched_getaffinity(0, sizeof set, &set);
    printf("%s", label);
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &set)) printf(" %d", cpu);
    printf("\n");
}

/* a CPU claim: the broker pins this process; then release */
static int cpu(const char *path) {
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    print_affinity("BEFORE");
    uint64_t id;
    if ((rc = pa_client_request(c, "cpu", 1, 0, NULL, &id))) { report(c, "REQUEST", rc); pa_client_close(c); return 0; }
    int cores[8];
    size_t ncores = 0;
    rc = pa_client_claim_cpu(c, id, cores, 8, &ncores);
    report(c, "CLAIM", rc);
    printf("CORES n=%zu", ncores);
    for (size_t i = 0; i < ncores && i < 8; i++) printf(" %d", cores[i]);
    printf("\n");
    print_affinity("PINNED");
    report(c, "RELEASE", pa_client_release(c, id, NULL));
    print_affinity("AFTER");
    /* a CPU allocation claimed as memory: -EMEDIUMTYPE, and it is left as it was: nothing
     * pinned, still there to be claimed as what it is */
    if ((rc = pa_client_request(c, "cpu", 1, 0, NULL, &id))) { report(c, "REQUEST2", rc); pa_client_close(c); return 0; }
    void *addr;
    size_t size;
    report(c, "AS_MEMORY", pa_client_claim_memory(c, id, &addr, &size));
    print_affinity("AFTER_AS_MEMORY");
    report(c, "CLAIM2", pa_client_claim_cpu(c, id, cores, 8, &ncores));
    print_affinity("PINNED2");
    report(c, "RELEASE2", pa_client_release(c, id, NULL));
    print_affinity("AFTER2");
    pa_client_close(c);
    return 0;
}

/* fork with a live client and mapping: the child is refused and closes its copy quietly */
static int forked(const char *path) {
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    uint64_t id;
    void *addr;
    size_t size;
    bool pre;
    if ((rc = pa_client_acquire_memory(c, 1, &addr, &size, &id, &pre))) { report(c, "acquire", rc); return 3; }
    memset(addr, 0x5a, size);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        pa_client_error_t e;
        int hello = pa_client_hello(c, NULL, NULL), last = pa_client_last_error(c, &e);
        int release = pa_client_release(c, id, NULL);
        ((unsigned char *)addr)[0] = 0x11; /* MAP_SHARED: the same pages as the parent's */
        pa_client_close(c);
        printf("CHILD hello=%d last=%d release=%d\n", hello, last, release);
        fflush(stdout);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    rc = pa_client_hello(c, NULL, NULL);
    printf("PARENT hello=%d first=%d second=%d\n", rc, ((unsigned char *)addr)[0], ((unsigned char *)addr)[1]);
    report(c, "RELEASE", pa_client_release(c, id, NULL));
    pa_client_close(c);
    return 0;
}

/* pa_client_connect(NULL): the protocol's default order */
static int default_path(void) {
    pa_client_t *c;
    int rc = pa_client_connect(NULL, &c);
    printf("DEFAULT rc=%d\n", rc);
    if (rc) return 0;
    pa_client_hello_t hello;
    rc = pa_client_hello(c, NULL, &hello);
    printf("HELLO rc=%d peer_pid=%d self=%d\n", rc, (int)hello.peer_pid, (int)getpid());
    pa_client_close(c);
    return 0;
}

/* threads sharing one client: each does request / claim / write / check / release */
typedef struct shared { pa_client_t *client; int cycles; int failures; int index; } shared_t;

static void *worker(void *arg) {
    shared_t *s = arg;
    for (int i = 0; i < s->cycles; i++) {
        uint64_t id;
        void *addr;
        size_t size;
        int rc = pa_client_request_memory(s->client, 1, 0, &id);
        if (!rc) rc = pa_client_claim_memory(s->client, id, &addr, &size);
        if (rc) { fprintf(stderr, "thread %d: rc %d\n", s->index, rc); s->failures++; continue; }
        memset(addr, s->index + 1, size);
        for (size_t k = 0; k < size; k += 4096)
            if (((unsigned char *)addr)[k] != s->index + 1) s->failures++;
        if (pa_client_release(s->client, id, NULL)) s->failures++;
    }
    return NULL;
}

static int threads(const char *path, int nthreads, int cycles) {
    int fds_before = open_fds();
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    pthread_t tids[16];
    shared_t shared[16];
    for (int t = 0; t < nthreads; t++) {
        shared[t] = (shared_t){c, cycles, 0, t};
        pthread_create(&tids[t], NULL, worker, &shared[t]);
    }
    int failures = 0;
    for (int t = 0; t < nthreads; t++) {
        pthread_join(tids[t], NULL);
        failures += shared[t].failures;
    }
    pa_client_close(c);
    printf("THREADS failures=%d fds_before=%d fds_after=%d\n", failures, fds_before, open_fds());
    return 0;
}

/* one claim against a scripted peer: the result, the next call's, descriptors before/after */
static int hostile(const char *path) {
    int fds_before = open_fds();
    pa_client_t *c;
    int rc = pa_client_connect(path, &c);
    if (rc) { printf("connect rc=%d\n", rc); return 2; }
    void *addr = NULL;
    size_t size = 0;
    rc = pa_client_claim_memory(c, 5, &addr, &size);
    report(c, "CLAIM", rc);
    if (rc == 0) printf("MAPPED size=%zu first=%d\n", size, ((unsigned char *)addr)[0]);
    rc = pa_client_release(c, 5, NULL);
    report(c, "NEXT", rc);
    pa_client_close(c);
    printf("FDS before=%d after=%d\n", fds_before, open_fds());
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 1;
    if (strcmp(argv[2], "cycle") == 0) return cycle(argv[1], atof(argv[3]));
    if (strcmp(argv[2], "errors") == 0) return errors(argv[1]);
    if (strcmp(argv[2], "bench") == 0) return bench(argv[1], atoi(argv[3]), atof(argv[4]));
    if (strcmp(argv[2], "hostile") == 0) return hostile(argv[1]);
    if (strcmp(argv[2], "cpu") == 0) return cpu(argv[1]);
    if (strcmp(argv[2], "fork") == 0) return forked(argv[1]);
    if (strcmp(argv[2], "default") == 0) return default_path();
    if (strcmp(argv[2], "threads") == 0) return threads(argv[1], atoi(argv[3]), atoi(argv[4]));
    return 1;
}
"""

HAVE_BROKER = importlib.util.find_spec("prealloc.server") is not None
needs_broker = pytest.mark.skipif(not HAVE_BROKER, reason="prealloc.server (the broker) is not in this build")


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


def _lines(out: str) -> dict[str, dict[str, str]]:
    return {line.split()[0]: _fields(line) for line in out.splitlines() if line.strip()}


SOURCE_ROOT = Path(__file__).resolve().parent.parent
CLIENT_SOURCES = [SOURCE_ROOT / "src" / "native" / name for name in ("client.c", "client_json.c")]


def _sanitized_host(tmp_path_factory: pytest.TempPathFactory, sanitizers: str) -> Path:
    """The same host built from the checkout's client sources under the sanitizers (ASan +
    UBSan: an overread, a leak or a double close aborts; TSan: a race between threads
    sharing a client is reported)."""
    if not all(path.is_file() for path in CLIENT_SOURCES):
        pytest.skip("the client's C sources are not beside the tests (an installed-package run)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    directory = tmp_path_factory.mktemp("c_client_" + sanitizers.replace(",", "_"))
    (directory / "host.c").write_text(HOST)
    exe = directory / "host"
    flags = [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-g"]
    if "undefined" in sanitizers:
        flags.append("-fno-sanitize-recover=undefined")
    build = subprocess.run([cc, "-std=c11", "-O1", "-Wall", "-Werror", *flags, "-o", str(exe),
                            str(directory / "host.c"), *map(str, CLIENT_SOURCES),
                            f"-I{SOURCE_ROOT / 'src' / 'native' / 'include'}", f"-I{SOURCE_ROOT / 'src' / 'native'}",
                            "-lpthread", "-lm"], capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr and "unrecognized" in build.stderr:
        pytest.skip(f"{cc} has no -fsanitize={sanitizers}: {build.stderr[-200:]}")
    assert build.returncode == 0, build.stderr
    probe = subprocess.run([str(exe)], capture_output=True, text=True)
    if "Sanitizer" in probe.stderr and probe.returncode != 1:
        pytest.skip(f"-fsanitize={sanitizers} cannot run here: {probe.stderr[-200:]}")
    return exe


@pytest.fixture(scope="module")
def sanitized_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sanitized_host(tmp_path_factory, "address,undefined")


@pytest.fixture(scope="module")
def tsan_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sanitized_host(tmp_path_factory, "thread")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c_host(HOST, tmp_path_factory.mktemp("c_client"), header="client.h")


def _serve_command(path: Path) -> list[str]:
    """`python -m prealloc serve --socket PATH`; prealloc.server.serve directly where the
    command line does not have the subcommand yet."""
    from prealloc import cli

    try:
        cli.build_parser().parse_args(["serve", "--socket", str(path)])
    except SystemExit:
        return [sys.executable, "-c", "import sys; from prealloc.server import serve; sys.exit(serve(sys.argv[1]))",
                str(path)]
    return [sys.executable, "-m", "prealloc", "serve", "--socket", str(path)]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """One broker for the module (it takes seconds to start on a busy box); each test
    measures from its own baseline."""
    tmp_path = tmp_path_factory.mktemp("broker")
    path = tmp_path / "broker.sock"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PREALLOC_SOCKET", None)
    log = open(tmp_path / "broker.log", "w+")
    proc = subprocess.Popen(_serve_command(path), stdout=log, stderr=subprocess.STDOUT, env=env)
    # generous: an editable install rebuilds the extension on import (minutes on a busy box)
    deadline = time.monotonic() + 300
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the broker did not start: {log.read()[-2000:]}")
        time.sleep(0.05)
    try:
        yield proc, path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _fd_targets(pid: int) -> dict[str, str]:
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return targets


def _broker_fd_of_inode(pid: int, inode: int) -> str | None:
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.stat(f"/proc/{pid}/fd/{name}").st_ino == inode and \
                    os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
                return name
        except OSError:
            pass
    return None


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@needs_broker
def test_memory_claim_is_the_brokers_pages_and_release_leaves_nothing(host: Path, broker):
    proc, path = broker
    from prealloc.client import Client
    from prealloc.types import ResourceRequest, ResourceType

    mib = 8
    with Client(path) as observer:  # a second peer: connects like any client
        # one cycle first, so what the broker opens once (engine threads' descriptors)
        # is in the baseline
        observer.claim(observer.request_preallocation(ResourceRequest(ResourceType.MEMORY, 1)).allocation_id).release()
        baseline = len(_fd_targets(proc.pid))
        run = subprocess.Popen([str(host), str(path), "cycle", str(mib)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            hello = run.stdout.readline()
            claimed_line = run.stdout.readline()
            assert claimed_line.startswith("CLAIMED"), (hello, claimed_line, run.stderr.read() if run.poll() else "")
            assert _fields(hello)["peer_pid"] == _fields(hello)["self"]  # SO_PEERCRED names the host
            c = {k: int(v) for k, v in _fields(claimed_line).items()}
            size, page = c["size"], mmap.PAGESIZE
            assert size == mib << 20
            assert c["pages"] == size // page
            # the broker's pages, populated before the host touched one
            assert c["resident"] == c["pages"]
            # touched through the mapping: shared pages, no private copy
            assert c["shmem_after"] - c["shmem_before"] >= size // 1024
            assert c["anon_after"] - c["anon_before"] < size // 1024 // 4
            # the same memfd inode is open in the broker; read the host's pattern through it
            fd_name = _broker_fd_of_inode(proc.pid, c["inode"])
            assert fd_name is not None, "the host's mapping is not of a memfd the broker holds"
            fd = os.open(f"/proc/{proc.pid}/fd/{fd_name}", os.O_RDONLY)
            try:
                with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
                    for p in (0, 1, c["pages"] // 2, c["pages"] - 1):
                        word = int.from_bytes(view[p * page:p * page + 8], sys.byteorder)
                        assert word == (c["id"] * 1000003 + p) & (2**64 - 1), p
                    offset = 3 * page + 123
                    assert view[offset] == offset % 251
            finally:
                os.close(fd)
            # another peer (same uid) cannot touch it: the broker answers KeyError
            with pytest.raises(KeyError):
                observer.release_allocation(c["id"])
            with pytest.raises(KeyError):
                observer.get_allocation(c["id"])
            out, err = run.communicate("release\n", timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == 0, (out, err)
        lines = _lines(out)
        assert lines["RELEASED"]["rc"] == "0" and lines["RELEASED"]["released"] == "1"
        assert lines["RELEASED"]["mapped"] == "0"  # unmapped by pa_client_release
        assert int(lines["RELEASED"]["shmem"]) <= c["shmem_before"] + 64
        assert lines["AGAIN"]["rc"] == str(-errno.ENOENT) and lines["AGAIN"]["type"] == "KeyError"
        assert lines["FDS"]["before"] == lines["FDS"]["after"]
        # the broker let go: its memfd closed, its descriptor table back to the baseline
        assert _wait_for(lambda: _broker_fd_of_inode(proc.pid, c["inode"]) is None)
        assert _wait_for(lambda: len(_fd_targets(proc.pid)) == baseline), (baseline, _fd_targets(proc.pid))
        assert observer.allocations() == []
        if os.geteuid() == 0:
            assert _wait_for(lambda: observer.allocations(all=True) == [])


@needs_broker
def test_broker_errors_arrive_as_errno_with_their_type(host: Path, broker):
    proc, path = broker
    from prealloc.client import Client
    from prealloc.types import ResourceRequest, ResourceType

    with Client(path) as other:
        foreign = other.request_preallocation(ResourceRequest(ResourceType.MEMORY, 1)).allocation_id
        out = subprocess.run([str(host), str(path), "errors"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, FOREIGN_ID=str(foreign)))
        assert out.returncode == 0, out
        lines = _lines(out.stdout)
        assert lines["BOGUS_TYPE"]["rc"] == str(-errno.EINVAL) and lines["BOGUS_TYPE"]["type"] == "ValueError"
        assert lines["NEGATIVE"]["rc"] == str(-errno.EINVAL) and lines["NEGATIVE"]["type"] == "ValueError"
        assert lines["NAN"]["rc"] == str(-errno.EINVAL) and lines["NAN"]["type"] == "-"  # refused before sending
        assert lines["UNKNOWN_CLAIM"]["rc"] == str(-errno.ENOENT) and lines["UNKNOWN_CLAIM"]["type"] == "KeyError"
        assert lines["UNKNOWN_RELEASE"]["type"] == "KeyError"
        assert lines["FOREIGN_RELEASE"]["rc"] == str(-errno.ENOENT)  # another peer's: as unknown
        assert lines["SUBMIT"] == {"rc": "0", "wait": "0", "ready": "1", "release": "0", "released": "1"}
        # a million TiB: refused by an error answer or answered "failed" (-EIO with the reason)
        assert int(lines["HUGE"]["rc"]) in (-errno.EIO, -errno.ENOMEM, -errno.EINVAL, -errno.EDQUOT), out.stdout
        assert "HUGE_MESSAGE" in out.stdout and out.stdout.split("HUGE_MESSAGE", 1)[1].split("\n")[0].strip()
        assert lines["HELLO"]["rc"] == "0" and lines["HELLO"]["code"] == "0"  # errors do not break the connection
        assert lines["MISSING"]["rc"] == str(-errno.ENOENT)
        assert lines["TOOLONG"]["rc"] == str(-errno.ENAMETOOLONG)
        assert lines["NULLOUT"]["rc"] == str(-errno.EINVAL)
        # the foreign allocation is untouched
        assert other.get_allocation(foreign) is not None


@needs_broker
def test_cpu_claim_pins_the_host_and_release_restores_it(host: Path, broker):
    proc, path = broker
    out = subprocess.run([str(host), str(path), "cpu"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    if "REQUEST" in lines:
        pytest.skip(f"the broker could not reserve a core here: {out.stdout}")
    before = set(map(int, lines["BEFORE"]))

    def rc(name: str) -> str:
        return _fields("x " + " ".join(lines[name]))["rc"]

    assert rc("CLAIM") == "0", out.stdout
    count, cores = int(lines["CORES"][0].split("=")[1]), set(map(int, lines["CORES"][1:]))
    assert count == len(cores) == 1 and cores <= before
    assert set(map(int, lines["PINNED"])) == cores  # sched_getaffinity of the host itself
    assert rc("RELEASE") == "0"
    assert set(map(int, lines["AFTER"])) == before  # restored on release
    assert rc("AS_MEMORY") == str(-errno.EMEDIUMTYPE), out.stdout
    assert set(map(int, lines["AFTER_AS_MEMORY"])) == before  # refused before the pin
    assert rc("CLAIM2") == "0", out.stdout  # not claimed by the refused call
    assert len(set(map(int, lines["PINNED2"]))) == 1
    assert rc("RELEASE2") == "0"
    assert set(map(int, lines["AFTER2"])) == before


@needs_broker
def test_forked_child_is_refused_and_leaves_the_parents_connection(host: Path, broker):
    proc, path = broker
    out = subprocess.run([str(host), str(path), "fork"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    lines = _lines(out.stdout)
    assert lines["CHILD"] == {"hello": str(-errno.ECHILD), "last": str(-errno.ECHILD),
                              "release": str(-errno.ECHILD)}
    # the child's close said nothing to the broker: the parent's connection and claim stand
    assert lines["PARENT"] == {"hello": "0", "first": str(0x11), "second": str(0x5a)}
    assert lines["RELEASE"]["rc"] == "0"


@needs_broker
def test_connect_null_follows_the_protocols_order(host: Path, broker, tmp_path: Path):
    proc, path = broker
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PREALLOC_SOCKET")}
    out = subprocess.run([str(host), "-", "default"], capture_output=True, text=True, timeout=60,
                         env=dict(env, PREALLOC_SOCKET=str(path)))
    lines = _lines(out.stdout)
    assert lines["DEFAULT"]["rc"] == "0", out.stdout
    assert lines["HELLO"]["peer_pid"] == lines["HELLO"]["self"]
    # $PREALLOC_SOCKET naming nothing is an error, not a reason to try another broker
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (runtime / "prealloc-broker.sock").symlink_to(path)
    out = subprocess.run([str(host), "-", "default"], capture_output=True, text=True, timeout=60,
                         env=dict(env, PREALLOC_SOCKET=str(tmp_path / "absent.sock"),
                                  XDG_RUNTIME_DIR=str(runtime)))
    assert _lines(out.stdout)["DEFAULT"]["rc"] == str(-errno.ENOENT), out.stdout
    # without it, $XDG_RUNTIME_DIR/prealloc-broker.sock
    if not Path("/run/prealloc-broker/broker.sock").exists():
        out = subprocess.run([str(host), "-", "default"], capture_output=True, text=True, timeout=60,
                             env=dict(env, XDG_RUNTIME_DIR=str(runtime)))
        assert _lines(out.stdout)["DEFAULT"]["rc"] == "0", out.stdout
    # a /tmp directory for this uid that others may write is refused, not trusted
    squat = Path(f"/tmp/prealloc-broker-{os.geteuid()}")
    if squat.exists() or Path("/run/prealloc-broker/broker.sock").exists():
        return  # a real broker's (or this machine's root broker's): leave it alone
    squat.mkdir()
    try:
        squat.chmod(0o777)
        (squat / "broker.sock").symlink_to(path)
        out = subprocess.run([str(host), "-", "default"], capture_output=True, text=True, timeout=60, env=env)
        assert _lines(out.stdout)["DEFAULT"]["rc"] == str(-errno.EPERM), out.stdout
    finally:
        (squat / "broker.sock").unlink(missing_ok=True)
        squat.rmdir()


@needs_broker
@pytest.mark.parametrize("build", ["installed", "tsan"])
def test_threads_share_one_client(request: pytest.FixtureRequest, broker, build: str):
    """4 threads on one client, each claiming, writing and checking its own MEMORY: the
    mutex keeps requests and answers paired (TSan build: and no data race)."""
    proc, path = broker
    host = request.getfixturevalue("host" if build == "installed" else "tsan_host")
    out = subprocess.run([str(host), str(path), "threads", "4", "10"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1"))
    assert out.returncode == 0, out
    fields = _lines(out.stdout)["THREADS"]
    assert fields["failures"] == "0", out
    assert fields["fds_before"] == fields["fds_after"]
    assert "WARNING: ThreadSanitizer" not in out.stderr, out.stderr


# ---- a hostile peer: answers that break the protocol on purpose ----

def _memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"\x07", 0)
    if seal:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def _answer(request: dict, **fields) -> bytes:
    return json.dumps({"v": 1, "id": request["id"], **fields}).encode()


def _claim_result(size: int, allocation_id: int = 5) -> dict:
    return {"allocation_id": allocation_id, "resource_type": "memory", "amount": 1, "status": "active",
            "memory": {"size": size, "offset": 0}}


def _cpu_claim_result() -> dict:
    """What a broker that ignores the claim's resource_type answers for a CPU allocation."""
    return {"allocation_id": 5, "resource_type": "cpu", "amount": 1, "status": "active", "cpu": {"cores": [0]}}


def _ok(request: dict) -> bytes:
    return _answer(request, ok=True, result={"released": True})


def _send(conn: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    if fds:
        conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
    else:
        conn.send(data)


# each script: given the claim request, what the peer sends (then it answers the next
# request, if any comes, with a plain success)
SCRIPTS = {
    "not_json": lambda r, c: _send(c, b"{\"v\":1,\"id\":" + str(r["id"]).encode() + b",oops}"),
    "wrong_id": lambda r, c: _send(c, json.dumps({"v": 1, "id": r["id"] + 7, "ok": True, "result": {}}).encode()),
    "wrong_version": lambda r, c: _send(c, json.dumps({"v": 2, "id": r["id"], "ok": True}).encode()),
    "undeclared_fd": lambda r, c: _send(c, _answer(r, ok=True, result=_claim_result(4096)), [_memfd(4096)]),
    "too_many_fds": lambda r, c: _send(c, _answer(r, ok=True, fds=6, result=_claim_result(4096)),
                                       [_memfd(4096) for _ in range(6)]),
    "two_fds": lambda r, c: _send(c, _answer(r, ok=True, fds=2, result=_claim_result(4096)),
                                  [_memfd(4096), _memfd(4096)]),
    "oversized": lambda r, c: _send(c, _answer(r, ok=True, result={"pad": "x" * 70000})),
    "unsealed": lambda r, c: _send(c, _answer(r, ok=True, fds=1, result=_claim_result(4096)),
                                   [_memfd(4096, seal=False)]),
    "size_past_end": lambda r, c: _send(c, _answer(r, ok=True, fds=1, result=_claim_result(1 << 20)),
                                        [_memfd(4096)]),
    "not_a_memfd": lambda r, c: _send(c, _answer(r, ok=True, fds=1, result=_claim_result(4096)),
                                      [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)]),
    "deep": lambda r, c: _send(c, _answer(r, ok=True, result=json.loads("[" * 100 + "]" * 100))),
    "error_with_fd": lambda r, c: _send(c, _answer(r, ok=False, fds=1,
                                                   error={"type": "QuotaExceeded", "message": "over"}),
                                        [_memfd(4096)]),
    "closed": lambda r, c: None,
    # a broker that does not check the claim's type: the client's own check answers
    "ignores_type": lambda r, c: _send(c, _answer(r, ok=True, result=_cpu_claim_result())),
    # another allocation than the one claimed: refused before it is mapped
    "other_allocation": lambda r, c: _send(c, _answer(r, ok=True, fds=1, result=_claim_result(4096, 6)),
                                           [_memfd(4096)]),
    "event_then_answer": lambda r, c: (
        _send(c, json.dumps({"v": 1, "event": "resource:allocated", "data": {}}).encode(), [_memfd(4096)]),
        _send(c, _answer(r, ok=True, fds=1, result=_claim_result(4096)), [_memfd(4096)])),
}

EXPECTED = {  # (claim rc, next call rc)
    "not_json": (-errno.EPROTO, -errno.ENOTCONN),
    "wrong_id": (-errno.EPROTO, -errno.ENOTCONN),
    "wrong_version": (-errno.EPROTO, -errno.ENOTCONN),
    "undeclared_fd": (-errno.EPROTO, -errno.ENOTCONN),
    "too_many_fds": (-errno.EPROTO, -errno.ENOTCONN),
    "two_fds": (-errno.EPROTO, 0),  # in step, but more than a claim takes
    "oversized": (-errno.EMSGSIZE, -errno.ENOTCONN),
    "unsealed": (-errno.EPROTO, 0),
    "size_past_end": (-errno.EPROTO, 0),
    "not_a_memfd": (-errno.EPROTO, 0),
    "deep": (-errno.EPROTO, -errno.ENOTCONN),
    "error_with_fd": (-errno.EDQUOT, 0),
    "closed": (-errno.ECONNRESET, -errno.ENOTCONN),
    "ignores_type": (-errno.EMEDIUMTYPE, 0),
    "other_allocation": (-errno.EPROTO, 0),
    "event_then_answer": (0, 0),
}


@pytest.mark.parametrize("build", ["installed", "sanitized"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_hostile_answers_fail_cleanly_and_leak_no_descriptor(request: pytest.FixtureRequest, tmp_path: Path,
                                                             script: str, build: str):
    host = request.getfixturevalue("host" if build == "installed" else "sanitized_host")
    path = tmp_path / "hostile.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    failures: list[BaseException] = []

    def peer() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                request = json.loads(conn.recv(65536))
                assert request["op"] == "claim" and request["args"] == {"allocation_id": 5, "resource_type": "memory"}
                SCRIPTS[script](request, conn)
                if script == "closed":
                    return
                while True:  # answer whatever follows (release, bye) until the host hangs up
                    data = conn.recv(65536)
                    if not data:
                        return
                    _send(conn, _ok(json.loads(data)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    out = subprocess.run([str(host), str(path), "hostile"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"))
    thread.join(30)
    listener.close()
    assert not failures, failures
    assert out.returncode == 0, out
    lines = _lines(out.stdout)
    claim_rc, next_rc = EXPECTED[script]
    assert int(lines["CLAIM"]["rc"]) == claim_rc, out.stdout
    assert int(lines["NEXT"]["rc"]) == next_rc, out.stdout
    if claim_rc == 0:
        assert lines["MAPPED"]["first"] == "7"
    assert lines["FDS"]["before"] == lines["FDS"]["after"], out.stdout


# ---- per-call latency: the C client against the Python client, same broker, same run ----

@needs_broker
def test_bench_c_client_against_python_client(host: Path, broker, capsys):
    """request / wait_ready / claim / release of 1 MiB MEMORY, C and Python clients in
    turn (interleaved rounds) on one broker; medians per call. PA_BENCH_CYCLES sets the
    cycles per round (default 50: a smoke run)."""
    proc, path = broker
    from prealloc.client import Client
    from prealloc.types import ResourceRequest, ResourceType

    cycles = int(os.environ.get("PA_BENCH_CYCLES", "50"))
    rounds = int(os.environ.get("PA_BENCH_ROUNDS", "3"))
    ops = ("request", "wait_ready", "claim", "release")
    c_ns: dict[str, list[int]] = {op: [] for op in ops}
    py_ns: dict[str, list[int]] = {op: [] for op in ops}
    for _ in range(rounds):
        out = subprocess.run([str(host), str(path), "bench", str(cycles), "1"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out
        for line in out.stdout.splitlines():
            for op, value in zip(ops, map(int, line.split())):
                c_ns[op].append(value)
        with Client(path) as client:
            for _ in range(cycles):
                t0 = time.perf_counter_ns()
                allocation_id = client.request_preallocation(ResourceRequest(ResourceType.MEMORY, 1)).allocation_id
                t1 = time.perf_counter_ns()
                assert client.wait_ready([allocation_id], timeout=120)
                t2 = time.perf_counter_ns()
                claim = client.claim(allocation_id)
                t3 = time.perf_counter_ns()
                claim.release()
                t4 = time.perf_counter_ns()
                for op, value in zip(ops, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    py_ns[op].append(value)
    assert all(len(c_ns[op]) == cycles * rounds for op in ops)
    rows = []
    for op in ops + ("cycle",):
        if op == "cycle":
            c_values = [sum(v) for v in zip(*(c_ns[o] for o in ops))]
            py_values = [sum(v) for v in zip(*(py_ns[o] for o in ops))]
        else:
            c_values, py_values = c_ns[op], py_ns[op]
        c_med, py_med = statistics.median(c_values), statistics.median(py_values)
        c_p99 = sorted(c_values)[int(len(c_values) * 0.99) - 1]
        py_p99 = sorted(py_values)[int(len(py_values) * 0.99) - 1]
        rows.append(f"| {op} | {c_med / 1e3:.1f} | {c_p99 / 1e3:.1f} | {py_med / 1e3:.1f} | {py_p99 / 1e3:.1f} "
                    f"| {py_med / c_med:.2f} |")
    with capsys.disabled():
        print(f"\nC client vs Python client, {rounds} x {cycles} cycles of 1 MiB MEMORY (µs)")
        print("| call | C p50 | C p99 | Python p50 | Python p99 | Python/C p50 |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
