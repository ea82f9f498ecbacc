/*
 * test_memory.c — memory reservation, checked through the operating system: VmRSS and
 * VmLck in /proc/self/status, mincore, AnonHugePages in /proc/self/smaps, a second
 * process mapping the memfd. Our own bookkeeping (effective_flags, ...) is checked against
 * what those say, never on its own.
 *
 * Tests that change process-wide limits or capabilities (the lock-refused case) run in a
 * forked child, which reports its failure count through its exit status. The children do
 * plain system calls only, so they are also fine under TSan (the parent has no threads).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/capability.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pa_test.h"
#include "prealloc/memory.h"

#define KiB ((size_t)1024)
#define MiB ((size_t)1024 * 1024)
/* Slack for VmRSS: the kernel's per-cpu RSS counters are approximate by a few hundred
 * KiB, and the test's own stdio and malloc use memory too. Every check that uses it
 * compares against a region many times larger, so it cannot hide a missing populate. */
#define RSS_SLACK (2 * MiB)

/* A "Key:  123 kB" field of /proc/self/status, in bytes; -1 when absent. */
static long long status_bytes(const char *key) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return -1;
    char line[256];
    long long value = -1;
    size_t key_len = strlen(key);
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, key_len) == 0 && line[key_len] == ':') {
            value = atoll(line + key_len + 1) * 1024;
            break;
        }
    }
    fclose(f);
    return value;
}

/* Pages of [addr, addr + len) that mincore reports resident. */
static size_t resident_pages(void *addr, size_t len) {
    size_t page = pa_page_size(), pages = len / page, count = 0;
    unsigned char *vec = malloc(pages ? pages : 1);
    if (!vec) return 0;
    if (mincore(addr, len, vec) == 0)
        for (size_t i = 0; i < pages; i++) count += vec[i] & 1u;
    free(vec);
    return count;
}

/* Sum of a smaps field (e.g. "AnonHugePages") over the VMAs overlapping [addr, addr+len). */
static long long smaps_bytes(void *addr, size_t len, const char *key) {
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) return -1;
    char line[512];
    uintptr_t lo = (uintptr_t)addr, hi = lo + len;
    bool inside = false;
    long long total = 0;
    size_t key_len = strlen(key);
    while (fgets(line, sizeof(line), f)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            inside = start < hi && end > lo;
            continue;
        }
        if (inside && strncmp(line, key, key_len) == 0 && line[key_len] == ':') total += atoll(line + key_len + 1) * 1024;
    }
    fclose(f);
    return total;
}

/* The selected value of a THP policy file ("always", "madvise", "never", ...). */
static void thp_mode(const char *path, char *out, size_t out_len) {
    snprintf(out, out_len, "unknown");
    FILE *f = fopen(path, "re");
    if (!f) return;
    char buf[256];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *open = strchr(buf, '['), *close = open ? strchr(open, ']') : NULL;
    if (open && close) snprintf(out, out_len, "%.*s", (int)(close - open - 1), open + 1);
}

/* The 2 MiB THP policy for anonymous memory, resolving the per-size "inherit". */
static void thp_anon_mode(char *out, size_t out_len) {
    thp_mode("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled", out, out_len);
    if (strcmp(out, "inherit") == 0 || strcmp(out, "unknown") == 0)
        thp_mode("/sys/kernel/mm/transparent_hugepage/enabled", out, out_len);
}

static void fill_pattern(unsigned char *p, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i += 512) p[i] = (unsigned char)(i / 512 * 31 + seed);
}

static bool check_pattern(const unsigned char *p, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i += 512)
        if (p[i] != (unsigned char)(i / 512 * 31 + seed)) return false;
    return true;
}

static bool is_empty(const pa_memory_t *mem) {
    return mem->addr == NULL && mem->fd == -1 && mem->size == 0;
}

/* Field by field: struct assignment need not copy padding, so no memcmp. */
static bool same_reservation(const pa_memory_t *a, const pa_memory_t *b) {
    return a->addr == b->addr && a->size == b->size && a->requested_size == b->requested_size && a->fd == b->fd &&
           a->requested_flags == b->requested_flags && a->effective_flags == b->effective_flags &&
           a->populate_method == b->populate_method && a->lock_error == b->lock_error &&
           a->huge_pages_error == b->huge_pages_error && a->populate_error == b->populate_error &&
           a->map_base == b->map_base && a->map_size == b->map_size;
}

/* Whether this process may lock `bytes` more now (root, CAP_IPC_LOCK, or room under
 * RLIMIT_MEMLOCK): the tests that check VmLck after a lock need it; an unprivileged user
 * under the usual 8 MiB limit runs the rest. Probed with the real system call. */
static bool lock_allowed(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    bool ok = syscall(SYS_mlock, p, bytes) == 0;
    munmap(p, bytes);
    return ok;
}

/* Runs fn in a forked child; the child's exit status is its failure count. */
static void run_in_child(void (*fn)(void)) {
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        pa_test_failures = 0; /* the child reports its own failures, not the parent's */
        fn();
        fflush(stderr);
        _exit(pa_test_failures > 100 ? 100 : pa_test_failures);
    }
    REQUIRE(pid > 0);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ_INT(WEXITSTATUS(status), 0);
}

/* ---- tests ---- */

static void test_bad_input_changes_nothing(void) {
    pa_memory_t mem;
    long long vm_before = status_bytes("VmSize");
    CHECK_EQ_INT(pa_memory_reserve(&mem, 0, PA_MEM_POPULATE), -EINVAL);
    CHECK(is_empty(&mem));
    CHECK_EQ_INT(pa_memory_reserve(&mem, SIZE_MAX, 0), -EINVAL); /* rounding overflows */
    CHECK(is_empty(&mem));
    CHECK_EQ_INT(pa_memory_reserve(&mem, SIZE_MAX - 3 * MiB, PA_MEM_HUGE_PAGES), -EINVAL);
    CHECK(is_empty(&mem));
    CHECK_EQ_INT(pa_memory_reserve(&mem, (size_t)PTRDIFF_MAX + 1, 0), -EINVAL);
    CHECK(is_empty(&mem));
    CHECK_EQ_INT(pa_memory_reserve(&mem, 4096, 1u << 7), -EINVAL);
    CHECK(is_empty(&mem));
    CHECK_EQ_INT(pa_memory_reserve(&mem, 4096, PA_MEM_ALL_FLAGS + 1), -EINVAL);
    CHECK(is_empty(&mem));
    /* More than the machine can commit: mmap says no, nothing stays mapped. 64 TiB is far
     * beyond RAM + swap under the default overcommit heuristic. */
    int rc = pa_memory_reserve(&mem, (size_t)64 << 40, PA_MEM_POPULATE);
    CHECK(rc == -ENOMEM);
    CHECK(is_empty(&mem));
    long long vm_after = status_bytes("VmSize");
    CHECK(vm_after - vm_before < (long long)(64 * MiB));
    /* Releasing an empty reservation is a no-op; resize and resident refuse it. */
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK_EQ_INT(pa_memory_resize(&mem, 4096, true), -EINVAL);
    size_t resident = 0;
    CHECK_EQ_INT(pa_memory_resident(&mem, &resident), -EINVAL);
}

static void test_plain_reservation_is_not_resident(void) {
    const size_t size = 64 * MiB;
    long long rss_before = status_bytes("VmRSS");
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, size, 0) == 0);
    CHECK(mem.addr != NULL);
    CHECK_EQ_INT(mem.size, size);
    CHECK_EQ_INT(mem.requested_size, size);
    CHECK_EQ_INT(mem.fd, -1);
    CHECK_EQ_INT(mem.effective_flags, 0);
    CHECK_EQ_INT(mem.populate_method, PA_POPULATE_NONE);
    CHECK(resident_pages(mem.addr, mem.size) < 16);
    CHECK(status_bytes("VmRSS") - rss_before < (long long)RSS_SLACK);
    ((volatile char *)mem.addr)[5 * pa_page_size()] = 1;
    size_t resident = 0;
    CHECK_EQ_INT(pa_memory_resident(&mem, &resident), 0);
    CHECK(resident >= pa_page_size() && resident < 16 * pa_page_size());
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK(is_empty(&mem));
}

static void test_populate_faults_every_page_in(void) {
    const size_t size = 64 * MiB + 123; /* rounds up to a page */
    const size_t rounded = 64 * MiB + pa_page_size();
    long long rss_before = status_bytes("VmRSS");
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, size, PA_MEM_POPULATE) == 0);
    CHECK_EQ_INT(mem.size, rounded);
    CHECK_EQ_INT(mem.requested_size, size);
    CHECK(mem.effective_flags == PA_MEM_POPULATE);
    /* Linux >= 5.14 has MADV_POPULATE_WRITE; older kernels use the touch fallback. */
    CHECK(mem.populate_method == PA_POPULATE_MADVISE || mem.populate_method == PA_POPULATE_TOUCH);
    CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / pa_page_size());
    size_t resident = 0;
    CHECK_EQ_INT(pa_memory_resident(&mem, &resident), 0);
    CHECK_EQ_INT(resident, mem.size);
    long long rss_delta = status_bytes("VmRSS") - rss_before;
    CHECK(rss_delta >= (long long)(rounded - RSS_SLACK));
    CHECK(rss_delta <= (long long)(rounded + RSS_SLACK));
    fill_pattern(mem.addr, mem.size, 7);
    CHECK(check_pattern(mem.addr, mem.size, 7));
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK(status_bytes("VmRSS") - rss_before < (long long)RSS_SLACK);
}

static void test_lock_shows_in_vmlck(void) {
    const size_t size = 64 * MiB;
    if (!lock_allowed(size + MiB)) {
        fprintf(stderr, "  skipped: this process may not lock 65 MiB (RLIMIT_MEMLOCK, no CAP_IPC_LOCK)\n");
        return;
    }
    static const unsigned flag_sets[] = {PA_MEM_LOCK, PA_MEM_LOCK | PA_MEM_POPULATE, PA_MEM_LOCK_REQUIRED};
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        long long lck_before = status_bytes("VmLck");
        long long rss_before = status_bytes("VmRSS");
        pa_memory_t mem;
        REQUIRE(pa_memory_reserve(&mem, size, flag_sets[i]) == 0);
        CHECK(mem.effective_flags & PA_MEM_LOCK);
        CHECK_EQ_INT(mem.lock_error, 0);
        long long lck_delta = status_bytes("VmLck") - lck_before;
        CHECK(lck_delta >= (long long)size && lck_delta <= (long long)(size + MiB));
        /* mlock faults the pages in even without POPULATE */
        CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / pa_page_size());
        CHECK(status_bytes("VmRSS") - rss_before >= (long long)(size - RSS_SLACK));
        CHECK_EQ_INT(pa_memory_release(&mem), 0);
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
        CHECK(status_bytes("VmRSS") - rss_before < (long long)RSS_SLACK);
    }
}

/* Every combination of flags: what the OS shows matches what the reservation claims. */
static void test_every_flag_combination(void) {
    const size_t size = 6 * MiB; /* a multiple of the huge page, so spans are equal */
    char anon_mode[32], shmem_mode[32];
    thp_anon_mode(anon_mode, sizeof(anon_mode));
    thp_mode("/sys/kernel/mm/transparent_hugepage/shmem_enabled", shmem_mode, sizeof(shmem_mode));
    for (unsigned flags = 0; flags <= PA_MEM_ALL_FLAGS; flags++) {
        long long lck_before = status_bytes("VmLck");
        pa_memory_t mem;
        int rc = pa_memory_reserve(&mem, size, flags);
        CHECK_EQ_INT(rc, 0);
        if (rc != 0) continue;
        unsigned asked = flags | ((flags & PA_MEM_LOCK_REQUIRED) ? PA_MEM_LOCK : 0);
        CHECK_EQ_INT(mem.requested_flags, asked);
        /* effective is a subset of asked, and only LOCK_REQUIRED is never "effective" */
        CHECK((mem.effective_flags & ~asked) == 0);
        CHECK((mem.effective_flags & PA_MEM_LOCK_REQUIRED) == 0);
        CHECK_EQ_INT(mem.size, size);
        bool shareable = (flags & PA_MEM_SHAREABLE) != 0;
        CHECK_EQ_INT(mem.fd >= 0, shareable);
        CHECK_EQ_INT((mem.effective_flags & PA_MEM_SHAREABLE) != 0, shareable);
        if (shareable) {
            struct stat st;
            CHECK(fstat(mem.fd, &st) == 0 && (size_t)st.st_size == mem.map_size);
        }
        if (flags & PA_MEM_POPULATE) CHECK(mem.effective_flags & PA_MEM_POPULATE);
        if (asked & PA_MEM_LOCK) {
            CHECK(mem.effective_flags & PA_MEM_LOCK); /* root with CAP_IPC_LOCK */
            CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)size);
        } else {
            CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
        }
        size_t resident = resident_pages(mem.addr, mem.size) * pa_page_size();
        if (asked & (PA_MEM_POPULATE | PA_MEM_LOCK)) CHECK_EQ_INT(resident, size);
        else CHECK(resident < 16 * pa_page_size());
        if (flags & PA_MEM_HUGE_PAGES) {
            CHECK((uintptr_t)mem.addr % PA_HUGE_PAGE_SIZE == 0);
            const char *mode = shareable ? shmem_mode : anon_mode;
            bool policy_never = strcmp(mode, "never") == 0 || strcmp(mode, "deny") == 0;
            CHECK_EQ_INT((mem.effective_flags & PA_MEM_HUGE_PAGES) != 0, !policy_never);
            if (policy_never) CHECK_EQ_INT(mem.huge_pages_error, EOPNOTSUPP);
            else CHECK_EQ_INT(mem.huge_pages_error, 0);
        } else {
            CHECK_EQ_INT(mem.huge_pages_error, 0);
        }
        fill_pattern(mem.addr, mem.size, flags);
        CHECK(check_pattern(mem.addr, mem.size, flags));
        CHECK_EQ_INT(pa_memory_release(&mem), 0);
        CHECK(is_empty(&mem));
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
    }
}

static void test_huge_pages(void) {
    char mode[32];
    thp_anon_mode(mode, sizeof(mode));
    const size_t size = 64 * MiB;
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, size, PA_MEM_HUGE_PAGES | PA_MEM_POPULATE) == 0);
    CHECK((uintptr_t)mem.addr % PA_HUGE_PAGE_SIZE == 0);
    CHECK_EQ_INT(mem.map_size, size);
    CHECK_EQ_INT(resident_pages(mem.addr, mem.size), size / pa_page_size());
    if (strcmp(mode, "never") == 0) {
        fprintf(stderr, "  (THP policy is 'never': AnonHugePages check skipped)\n");
        CHECK(!(mem.effective_flags & PA_MEM_HUGE_PAGES));
    } else {
        CHECK(mem.effective_flags & PA_MEM_HUGE_PAGES);
        long long huge = smaps_bytes(mem.addr, mem.map_size, "AnonHugePages");
        fprintf(stderr, "  THP '%s': AnonHugePages %lld MiB of %zu MiB\n", mode, huge / (long long)MiB, size / MiB);
        /* Half, not all: a fragmented machine may serve some blocks with small pages. */
        CHECK(huge >= (long long)(size / 2));
    }
    CHECK_EQ_INT(pa_memory_release(&mem), 0);

    /* A size that is not a multiple of 2 MiB: size is the page-rounded request, the
     * mapping (populated and locked whole) ends on a huge-page boundary. */
    long long lck_before = status_bytes("VmLck");
    REQUIRE(pa_memory_reserve(&mem, 3 * MiB + 1, PA_MEM_HUGE_PAGES | PA_MEM_LOCK) == 0);
    CHECK_EQ_INT(mem.size, 3 * MiB + pa_page_size());
    CHECK_EQ_INT(mem.map_size, 4 * MiB);
    CHECK((uintptr_t)mem.addr % PA_HUGE_PAGE_SIZE == 0);
    CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(4 * MiB));
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
}

/* capset(2) through the raw system call with the v3 structures (no libcap). */
static int drop_effective_capability(int cap) {
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &header, data) != 0) return -errno;
    data[cap / 32].effective &= ~(1u << (cap % 32));
    if (syscall(SYS_capset, &header, data) != 0) return -errno;
    return 0;
}

static void lock_refused_child(void) {
    /* As root, CAP_IPC_LOCK lets mlock ignore RLIMIT_MEMLOCK: drop it first. */
    REQUIRE(drop_effective_capability(CAP_IPC_LOCK) == 0);
    /* Growth of a locked region past the limit: the error, and the region as it was.
     * First, while the limit is highest: without CAP_SYS_RESOURCE it can only go down. */
    struct rlimit grow_limit = {8 * MiB, 8 * MiB};
    REQUIRE(setrlimit(RLIMIT_MEMLOCK, &grow_limit) == 0);
    long long lck_start = status_bytes("VmLck");
    pa_memory_t grow;
    REQUIRE(pa_memory_reserve(&grow, 4 * MiB, PA_MEM_POPULATE | PA_MEM_LOCK) == 0);
    CHECK(grow.effective_flags & PA_MEM_LOCK);
    CHECK_EQ_INT(status_bytes("VmLck") - lck_start, (long long)(4 * MiB));
    /* Shrinking leaves room right after the region, so in-place growth can only fail on
     * the lock (the successful growth at the end shows the room is there). */
    REQUIRE(pa_memory_resize(&grow, 2 * MiB, false) == 0);
    CHECK_EQ_INT(status_bytes("VmLck") - lck_start, (long long)(2 * MiB));
    pa_memory_t before_grow = grow;
    for (int may_move = 0; may_move <= 1; may_move++) {
        CHECK_EQ_INT(pa_memory_resize(&grow, 16 * MiB, may_move), -ENOMEM);
        CHECK(same_reservation(&before_grow, &grow));
        CHECK_EQ_INT(status_bytes("VmLck") - lck_start, (long long)(2 * MiB));
    }
    CHECK_EQ_INT(pa_memory_resize(&grow, 4 * MiB, false), 0); /* within the limit */
    CHECK(grow.addr == before_grow.addr);
    CHECK_EQ_INT(status_bytes("VmLck") - lck_start, (long long)(4 * MiB));
    CHECK_EQ_INT(pa_memory_release(&grow), 0);
    CHECK_EQ_INT(status_bytes("VmLck"), lck_start);

    const size_t size = 16 * MiB;
    struct {
        rlim_t limit;
        int expected_errno;
    } cases[] = {{1 * MiB, ENOMEM}, {0, EPERM}};
    for (size_t i = 0; i < 2; i++) {
        struct rlimit lim = {cases[i].limit, cases[i].limit};
        REQUIRE(setrlimit(RLIMIT_MEMLOCK, &lim) == 0);
        long long lck_before = status_bytes("VmLck");
        long long rss_before = status_bytes("VmRSS");

        /* best effort: the reservation stands, unlocked, and says why */
        pa_memory_t mem;
        REQUIRE(pa_memory_reserve(&mem, size, PA_MEM_POPULATE | PA_MEM_LOCK) == 0);
        CHECK(!(mem.effective_flags & PA_MEM_LOCK));
        CHECK(mem.effective_flags & PA_MEM_POPULATE);
        CHECK_EQ_INT(mem.lock_error, cases[i].expected_errno);
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
        CHECK_EQ_INT(resident_pages(mem.addr, mem.size), size / pa_page_size());
        CHECK_EQ_INT(pa_memory_release(&mem), 0);

        /* required: an error, and nothing stays mapped or resident */
        int rc = pa_memory_reserve(&mem, size, PA_MEM_POPULATE | PA_MEM_LOCK_REQUIRED);
        CHECK_EQ_INT(rc, -cases[i].expected_errno);
        CHECK(is_empty(&mem));
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
        CHECK(status_bytes("VmRSS") - rss_before < (long long)RSS_SLACK);
    }
}

static void test_lock_refused_without_capability(void) {
    run_in_child(lock_refused_child);
}

static void test_shareable_memfd_seen_by_another_process(void) {
    const size_t size = 8 * MiB;
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, size, PA_MEM_SHAREABLE | PA_MEM_POPULATE) == 0);
    REQUIRE(mem.fd >= 0);
    char link[64], target[128] = {0};
    snprintf(link, sizeof(link), "/proc/self/fd/%d", mem.fd);
    CHECK(readlink(link, target, sizeof(target) - 1) > 0 && strstr(target, "memfd:prealloc") != NULL);
    CHECK(fcntl(mem.fd, F_GETFD) & FD_CLOEXEC);
    fill_pattern(mem.addr, size, 42);

    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        /* A fresh mapping of the fd, not the inherited one: what another process gets. */
        unsigned char *view = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mem.fd, 0);
        if (view == MAP_FAILED) _exit(2);
        if (!check_pattern(view, size, 42)) _exit(3);
        view[size - 1] = 0xA5; /* a reply the parent must see */
        _exit(0);
    }
    REQUIRE(pid > 0);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_EQ_INT(((unsigned char *)mem.addr)[size - 1], 0xA5);
    int fd = mem.fd;
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
    CHECK(fcntl(fd, F_GETFD) == -1 && errno == EBADF); /* closed by release */
}

static void test_resize_in_place(void) {
    static const unsigned flag_sets[] = {PA_MEM_POPULATE | PA_MEM_LOCK,
                                         PA_MEM_POPULATE | PA_MEM_LOCK | PA_MEM_SHAREABLE,
                                         PA_MEM_POPULATE | PA_MEM_HUGE_PAGES};
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        /* without the right to lock 64 MiB the lock is left out (the rest still runs):
         * lock refusal has its own test */
        const bool may_lock = lock_allowed(64 * MiB + MiB);
        const unsigned flags = may_lock ? flag_sets[i] : flag_sets[i] & ~PA_MEM_LOCK;
        const bool locked = (flags & PA_MEM_LOCK) != 0;
        long long lck_before = status_bytes("VmLck");
        pa_memory_t mem;
        REQUIRE(pa_memory_reserve(&mem, 64 * MiB, flags) == 0);
        void *addr = mem.addr;
        fill_pattern(mem.addr, mem.size, 3);

        /* Shrink: the address stays, the lock and the pages of the tail go. */
        REQUIRE(pa_memory_resize(&mem, 32 * MiB, false) == 0);
        CHECK(mem.addr == addr);
        CHECK_EQ_INT(mem.size, 32 * MiB);
        CHECK_EQ_INT(mem.requested_size, 32 * MiB);
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(32 * MiB));
        CHECK(check_pattern(mem.addr, mem.size, 3));
        if (mem.fd >= 0) {
            struct stat st;
            CHECK(fstat(mem.fd, &st) == 0 && st.st_size == (off_t)(32 * MiB));
        }

        /* Grow back into the room the shrink left: in place, populated and locked. */
        int rc = pa_memory_resize(&mem, 64 * MiB, false);
        CHECK_EQ_INT(rc, 0);
        CHECK(mem.addr == addr);
        CHECK_EQ_INT(mem.size, 64 * MiB);
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(64 * MiB));
        CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / pa_page_size());
        CHECK(check_pattern(mem.addr, 32 * MiB, 3));
        if (mem.fd >= 0) {
            struct stat st;
            CHECK(fstat(mem.fd, &st) == 0 && st.st_size == (off_t)(64 * MiB));
        }
        /* The same size again is a no-op. */
        CHECK_EQ_INT(pa_memory_resize(&mem, 64 * MiB, false), 0);
        CHECK(mem.addr == addr);
        CHECK_EQ_INT(pa_memory_release(&mem), 0);
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
    }
}

/* A page mapped right after the region blocks growth in place: -ENOMEM and nothing
 * changes; allowed to move, the region grows elsewhere with its contents. */
static void test_resize_blocked_then_moved(void) {
    static const unsigned flag_sets[] = {PA_MEM_POPULATE | PA_MEM_LOCK,
                                         PA_MEM_POPULATE | PA_MEM_LOCK | PA_MEM_SHAREABLE,
                                         PA_MEM_POPULATE | PA_MEM_HUGE_PAGES, PA_MEM_POPULATE};
    const size_t page = pa_page_size();
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        /* without the right to lock 64 MiB the lock is left out (the rest still runs):
         * lock refusal has its own test */
        const bool may_lock = lock_allowed(64 * MiB + MiB);
        const unsigned flags = may_lock ? flag_sets[i] : flag_sets[i] & ~PA_MEM_LOCK;
        const bool locked = (flags & PA_MEM_LOCK) != 0;
        long long lck_before = status_bytes("VmLck");
        pa_memory_t mem;
        REQUIRE(pa_memory_reserve(&mem, 16 * MiB, flags) == 0);
        fill_pattern(mem.addr, mem.size, 9);
        void *guard = (char *)mem.map_base + mem.map_size;
        void *g = mmap(guard, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        bool own_guard = g == guard;
        if (g != MAP_FAILED && g != guard) munmap(g, page);
        /* EEXIST: something is already there, which blocks growth just as well. */
        CHECK(own_guard || (g == MAP_FAILED && errno == EEXIST));

        pa_memory_t before = mem;
        CHECK_EQ_INT(pa_memory_resize(&mem, 32 * MiB, false), -ENOMEM);
        CHECK(same_reservation(&before, &mem));
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(16 * MiB));
        if (mem.fd >= 0) {
            struct stat st;
            CHECK(fstat(mem.fd, &st) == 0 && st.st_size == (off_t)(16 * MiB));
        }
        CHECK(check_pattern(mem.addr, mem.size, 9));

        REQUIRE(pa_memory_resize(&mem, 32 * MiB, true) == 0);
        CHECK(mem.addr != before.addr);
        CHECK_EQ_INT(mem.size, 32 * MiB);
        CHECK_EQ_INT(mem.fd, before.fd);
        if (flags & PA_MEM_HUGE_PAGES) CHECK((uintptr_t)mem.addr % PA_HUGE_PAGE_SIZE == 0);
        CHECK(check_pattern(mem.addr, 16 * MiB, 9));
        CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / page);
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(32 * MiB));
        /* The old range is gone: mincore on it fails with ENOMEM (unmapped). */
        unsigned char vec;
        CHECK(mincore(before.addr, page, &vec) == -1 && errno == ENOMEM);

        /* Block again and move again: the region may now span several VMAs (the moved
         * head and the grown tail), which a single mremap cannot move. */
        fill_pattern(mem.addr, mem.size, 11);
        void *guard2 = (char *)mem.map_base + mem.map_size;
        void *g2 = mmap(guard2, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        bool own_guard2 = g2 == guard2;
        if (g2 != MAP_FAILED && g2 != guard2) munmap(g2, page);
        REQUIRE(pa_memory_resize(&mem, 48 * MiB, true) == 0);
        CHECK(check_pattern(mem.addr, 32 * MiB, 11));
        CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / page);
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(48 * MiB));
        /* Shrink across the VMAs, then release. */
        REQUIRE(pa_memory_resize(&mem, 8 * MiB, false) == 0);
        CHECK(check_pattern(mem.addr, 8 * MiB, 11));
        if (locked) CHECK_EQ_INT(status_bytes("VmLck") - lck_before, (long long)(8 * MiB));
        CHECK_EQ_INT(pa_memory_release(&mem), 0);
        CHECK_EQ_INT(status_bytes("VmLck"), lck_before);
        if (own_guard) munmap(guard, page);
        if (own_guard2) munmap(guard2, page);
    }
}

static void test_resize_bad_input_changes_nothing(void) {
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, 4 * MiB, PA_MEM_POPULATE) == 0);
    pa_memory_t before = mem;
    CHECK_EQ_INT(pa_memory_resize(&mem, 0, true), -EINVAL);
    CHECK_EQ_INT(pa_memory_resize(&mem, SIZE_MAX, true), -EINVAL);
    CHECK(same_reservation(&before, &mem));
    /* Growth the machine cannot commit: -ENOMEM, unchanged. */
    CHECK_EQ_INT(pa_memory_resize(&mem, (size_t)64 << 40, true), -ENOMEM);
    CHECK(same_reservation(&before, &mem));
    CHECK_EQ_INT(resident_pages(mem.addr, mem.size), mem.size / pa_page_size());
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
}

static void test_physical_memory(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    REQUIRE(f != NULL);
    long long total_kb = 0;
    char line[256];
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemTotal: %lld kB", &total_kb) == 1) break;
    fclose(f);
    uint64_t phys = pa_physical_memory();
    CHECK(phys > 0);
    /* sysconf and /proc/meminfo both read the kernel's totalram */
    CHECK_EQ_INT((long long)(phys / 1024), total_kb);
    CHECK(pa_page_size() >= 4096 && (pa_page_size() & (pa_page_size() - 1)) == 0);
}

/* Minor faults of this process so far (getrusage). */
static long minor_faults(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt;
}

/* After a fork, a populated private reservation must not have turned copy-on-write:
 * the parent's write pass over it takes (almost) no fault — 16 MiB is 4096 pages, so a
 * CoW reservation faults 4096 times here. The child sees the range as its own, zeroed. */
static void test_fork_keeps_private_pages(void) {
    const size_t size = 16 * MiB, page = pa_page_size();
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, size, PA_MEM_POPULATE) == 0);
    memset(mem.addr, 0x5a, size);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        /* the child's range: mapped, zero (WIPEONFORK), and releasable */
        volatile unsigned char *p = mem.addr;
        int bad = p[0] != 0 || p[size - 1] != 0;
        bad |= pa_memory_release(&mem) != 0;
        _exit(bad);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    long before = minor_faults();
    volatile unsigned char *p = mem.addr;
    for (size_t off = 0; off < size; off += page) p[off] = (unsigned char)off;
    long faults = minor_faults() - before;
#ifndef PA_UNDER_TSAN
    /* a handful for the test's own stack and stdio; never one per page (TSan's own
     * shadow memory turns copy-on-write at the fork and faults on these writes: there
     * the child's zeroed view above is the check) */
    CHECK(faults < (long)(size / page) / 16);
    if (faults >= (long)(size / page) / 16) fprintf(stderr, "  %ld faults on %zu pages\n", faults, size / page);
#endif
    CHECK(((unsigned char *)mem.addr)[page] == (unsigned char)page);
    CHECK_EQ_INT(pa_memory_release(&mem), 0);

    /* grown in place: the tail is advised too */
    REQUIRE(pa_memory_reserve(&mem, size / 2, PA_MEM_POPULATE) == 0);
    if (pa_memory_resize(&mem, size, false) == 0) {
        memset(mem.addr, 1, size);
        pid = fork();
        REQUIRE(pid >= 0);
        if (pid == 0) _exit(((volatile unsigned char *)mem.addr)[size - 1] != 0); /* wiped */
        waitpid(pid, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        before = minor_faults();
        p = mem.addr;
        for (size_t off = 0; off < size; off += page) p[off] = 2;
#ifndef PA_UNDER_TSAN
        CHECK(minor_faults() - before < (long)(size / page) / 16);
#endif
    }
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
}

/* A shareable reservation stays shared across fork: the child's write is the parent's. */
static void test_fork_shares_memfd_pages(void) {
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, 1 * MiB, PA_MEM_POPULATE | PA_MEM_SHAREABLE) == 0);
    ((volatile unsigned char *)mem.addr)[100] = 1;
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ((volatile unsigned char *)mem.addr)[100] = 42;
        _exit(0);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK_EQ_INT(((volatile unsigned char *)mem.addr)[100], 42);
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
}

/* The huge page size is the kernel's, and huge-page reservations align to it. */
static void test_huge_page_size_from_sysfs(void) {
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "re");
    unsigned long long expected = 2 * MiB;
    if (f) {
        if (fscanf(f, "%llu", &expected) != 1) expected = 2 * MiB;
        fclose(f);
    }
    CHECK_EQ_INT(pa_huge_page_size(), expected);
    CHECK_EQ_INT(PA_HUGE_PAGE_SIZE, expected);
    pa_memory_t mem;
    REQUIRE(pa_memory_reserve(&mem, 3 * pa_page_size(), PA_MEM_HUGE_PAGES) == 0);
    CHECK((uintptr_t)mem.addr % expected == 0);
    CHECK(mem.map_size % expected == 0);
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
}

/* NULL is -EINVAL everywhere, never a crash. */
static void test_null_arguments(void) {
    size_t n;
    pa_memory_t mem;
    pa_memory_init_empty(&mem);
    CHECK_EQ_INT(pa_memory_reserve(NULL, 4096, 0), -EINVAL);
    CHECK_EQ_INT(pa_memory_resize(NULL, 4096, true), -EINVAL);
    CHECK_EQ_INT(pa_memory_release(NULL), -EINVAL);
    CHECK_EQ_INT(pa_memory_resident(NULL, &n), -EINVAL);
    REQUIRE(pa_memory_reserve(&mem, 4096, 0) == 0);
    CHECK_EQ_INT(pa_memory_resident(&mem, NULL), -EINVAL);
    pa_memory_init_empty(NULL);
    CHECK_EQ_INT(pa_memory_release(&mem), 0);
}

int main(void) {
    RUN_TEST(test_bad_input_changes_nothing);
    RUN_TEST(test_plain_reservation_is_not_resident);
    RUN_TEST(test_populate_faults_every_page_in);
    RUN_TEST(test_lock_shows_in_vmlck);
    RUN_TEST(test_every_flag_combination);
    RUN_TEST(test_huge_pages);
    RUN_TEST(test_lock_refused_without_capability);
    RUN_TEST(test_shareable_memfd_seen_by_another_process);
    RUN_TEST(test_resize_in_place);
    RUN_TEST(test_resize_blocked_then_moved);
    RUN_TEST(test_resize_bad_input_changes_nothing);
    RUN_TEST(test_physical_memory);
    RUN_TEST(test_fork_keeps_private_pages);
    RUN_TEST(test_fork_shares_memfd_pages);
    RUN_TEST(test_huge_page_size_from_sysfs);
    RUN_TEST(test_null_arguments);
    TEST_MAIN_END();
}
