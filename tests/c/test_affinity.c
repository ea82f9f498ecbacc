/*
 * test_affinity.c — cpu masks, thread and process affinity, and the core reservation
 * registry. Affinity is checked through the operating system (sched_getaffinity,
 * sched_getcpu, Cpus_allowed_list in /proc/<pid>/task/<tid>/status), not through our own
 * records.
 *
 * The other process these tests act on is this same binary run with
 * "--child <command fd> <reply fd>" (fork + exec right away, so a TSan build never runs
 * threads in a forked copy of a threaded process). The child starts two threads, replies
 * 'R', then serves commands: 'T' starts one more thread and replies 'T'; end of input
 * makes it exit.
 *
 * Registry logic is tested on a synthetic allowed set of 8 cpus (the registry does not
 * care whether they exist); everything that applies masks uses this process's real
 * affinity, so the tests work with 1, 2 or many cores.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../src/native/atomics.h"
#include "pa_test.h"
#include "prealloc/affinity.h"

/* ---- helpers ---- */

static pid_t this_tid(void) {
    return (pid_t)syscall(SYS_gettid);
}

static pa_cpumask_t mask_of(const unsigned *cpus, size_t n) {
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    for (size_t i = 0; i < n; i++) pa_cpumask_set(&m, cpus[i]);
    return m;
}

static pa_cpumask_t mask_range(unsigned first, unsigned last) {
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    for (unsigned c = first; c <= last; c++) pa_cpumask_set(&m, c);
    return m;
}

static unsigned lowest_cpu(const pa_cpumask_t *m) {
    for (unsigned c = 0; c < PA_CPU_MAX; c++)
        if (pa_cpumask_test(m, c)) return c;
    return PA_CPU_MAX;
}

static unsigned highest_cpu(const pa_cpumask_t *m) {
    for (unsigned c = PA_CPU_MAX; c-- > 0;)
        if (pa_cpumask_test(m, c)) return c;
    return PA_CPU_MAX;
}

/* This thread's affinity, read with the libc call rather than ours. */
static pa_cpumask_t os_affinity_self(void) {
    cpu_set_t set;
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        for (unsigned c = 0; c < CPU_SETSIZE && c < PA_CPU_MAX; c++)
            if (CPU_ISSET(c, &set)) pa_cpumask_set(&m, c);
    return m;
}

/* Parses a "0-3,5" cpu list; the test's own parser, independent of the library's. */
static pa_cpumask_t parse_list(const char *s) {
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    while (*s >= '0' && *s <= '9') {
        char *end;
        unsigned a = (unsigned)strtoul(s, &end, 10), b = a;
        s = end;
        if (*s == '-') {
            b = (unsigned)strtoul(s + 1, &end, 10);
            s = end;
        }
        for (unsigned c = a; c <= b; c++) pa_cpumask_set(&m, c);
        if (*s == ',') s++;
    }
    return m;
}

/* Cpus_allowed_list of one task, from /proc. false when the task is gone. */
static bool task_mask(pid_t pid, pid_t tid, pa_cpumask_t *out) {
    char path[96], line[512];
    snprintf(path, sizeof(path), "/proc/%d/task/%d/status", (int)pid, (int)tid);
    FILE *f = fopen(path, "re");
    if (!f) return false;
    bool found = false;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "Cpus_allowed_list:", 18) == 0) {
            const char *p = line + 18;
            while (*p == ' ' || *p == '\t') p++;
            *out = parse_list(p);
            found = true;
            break;
        }
    }
    fclose(f);
    return found;
}

/* Number of tasks of pid, and how many of them have exactly `expected` as their mask. */
static void process_masks(pid_t pid, const pa_cpumask_t *expected, int *tasks, int *matching) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    *tasks = *matching = 0;
    DIR *dir = opendir(path);
    if (!dir) return;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        pa_cpumask_t m;
        if (!task_mask(pid, (pid_t)atoi(e->d_name), &m)) continue;
        (*tasks)++;
        if (pa_cpumask_equal(&m, expected)) (*matching)++;
    }
    closedir(dir);
}

/* ---- the helper process ---- */

static void *child_thread(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static int child_main(int command_fd, int reply_fd) {
    pthread_t t;
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t, NULL, child_thread, NULL) != 0) _exit(3);
    char c = 'R';
    if (write(reply_fd, &c, 1) != 1) _exit(4);
    while (read(command_fd, &c, 1) == 1) {
        if (c == 'T' && pthread_create(&t, NULL, child_thread, NULL) != 0) _exit(5);
        if (write(reply_fd, &c, 1) != 1) _exit(4);
    }
    _exit(0);
}

typedef struct helper {
    pid_t pid;
    int command_fd; /* we write */
    int reply_fd;   /* we read */
} helper_t;

static bool helper_start(helper_t *h) {
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0) return false;
    if (pipe(from_child) != 0) return false;
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        /* Only exec after fork: the child image starts clean. */
        char a[16], b[16];
        snprintf(a, sizeof(a), "%d", to_child[0]);
        snprintf(b, sizeof(b), "%d", from_child[1]);
        close(to_child[1]);
        close(from_child[0]);
        execl("/proc/self/exe", "test_affinity", "--child", a, b, (char *)NULL);
        _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    if (pid < 0) return false;
    h->pid = pid;
    h->command_fd = to_child[1];
    h->reply_fd = from_child[0];
    char c = 0;
    return read(h->reply_fd, &c, 1) == 1 && c == 'R';
}

static bool helper_command(helper_t *h, char c) {
    char reply = 0;
    return write(h->command_fd, &c, 1) == 1 && read(h->reply_fd, &reply, 1) == 1 && reply == c;
}

static void helper_stop(helper_t *h) {
    close(h->command_fd); /* end of input: the child exits */
    close(h->reply_fd);
    int status = 0;
    waitpid(h->pid, &status, 0);
}

/* ---- masks and single threads ---- */

static void test_cpumask_helpers(void) {
    pa_cpumask_t a, b;
    pa_cpumask_zero(&a);
    CHECK_EQ_INT(pa_cpumask_count(&a), 0);
    pa_cpumask_set(&a, 0);
    pa_cpumask_set(&a, 63);
    pa_cpumask_set(&a, 64);
    pa_cpumask_set(&a, PA_CPU_MAX - 1);
    pa_cpumask_set(&a, PA_CPU_MAX); /* ignored */
    pa_cpumask_set(&a, 100000);     /* ignored */
    CHECK_EQ_INT(pa_cpumask_count(&a), 4);
    CHECK(pa_cpumask_test(&a, 63) && pa_cpumask_test(&a, 64) && !pa_cpumask_test(&a, 65));
    CHECK(!pa_cpumask_test(&a, PA_CPU_MAX));
    pa_cpumask_clear(&a, 63);
    pa_cpumask_clear(&a, PA_CPU_MAX + 5); /* ignored */
    CHECK(!pa_cpumask_test(&a, 63));
    CHECK_EQ_INT(pa_cpumask_count(&a), 3);
    b = a;
    CHECK(pa_cpumask_equal(&a, &b));
    CHECK(pa_cpumask_subset(&a, &b));
    pa_cpumask_clear(&b, 64);
    CHECK(!pa_cpumask_equal(&a, &b));
    CHECK(pa_cpumask_subset(&b, &a));
    CHECK(!pa_cpumask_subset(&a, &b));
    pa_cpumask_t empty;
    pa_cpumask_zero(&empty);
    CHECK(pa_cpumask_subset(&empty, &b));
}

static void test_cpus_online_matches_sysconf(void) {
    pa_cpumask_t online;
    REQUIRE(pa_cpus_online(&online) == 0);
    CHECK_EQ_INT(pa_cpumask_count(&online), sysconf(_SC_NPROCESSORS_ONLN));
    /* the file itself, parsed by the test's parser */
    FILE *f = fopen("/sys/devices/system/cpu/online", "re");
    if (f) {
        char buf[1024] = {0};
        CHECK(fgets(buf, sizeof(buf), f) != NULL);
        fclose(f);
        pa_cpumask_t expected = parse_list(buf);
        CHECK(pa_cpumask_equal(&online, &expected));
    }
    pa_cpumask_t mine = os_affinity_self();
    CHECK(pa_cpumask_subset(&mine, &online));
}

static void test_get_and_set_this_thread(void) {
    pa_cpumask_t original, got;
    REQUIRE(pa_affinity_get(0, &original) == 0);
    pa_cpumask_t os = os_affinity_self();
    CHECK(pa_cpumask_equal(&original, &os));
    CHECK(pa_affinity_get(this_tid(), &got) == 0 && pa_cpumask_equal(&got, &original));

    /* Pin to each allowed cpu in turn: the kernel moves us there before returning. */
    for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++) {
        if (!pa_cpumask_test(&original, cpu)) continue;
        pa_cpumask_t one = mask_of(&cpu, 1);
        REQUIRE(pa_affinity_set_thread(0, &one) == 0);
        os = os_affinity_self();
        CHECK(pa_cpumask_equal(&os, &one));
        CHECK_EQ_INT(sched_getcpu(), cpu);
        pa_cpumask_t from_proc;
        CHECK(task_mask(getpid(), this_tid(), &from_proc) && pa_cpumask_equal(&from_proc, &one));
    }
    REQUIRE(pa_affinity_set_thread(0, &original) == 0);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &original));

    /* Bad masks change nothing. */
    pa_cpumask_t empty;
    pa_cpumask_zero(&empty);
    CHECK_EQ_INT(pa_affinity_set_thread(0, &empty), -EINVAL);
    unsigned offline_cpu = PA_CPU_MAX - 1; /* no test machine has 1024 cpus online */
    pa_cpumask_t offline = mask_of(&offline_cpu, 1);
    CHECK_EQ_INT(pa_affinity_set_thread(0, &offline), -EINVAL);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &original));
}

static pid_t dead_pid(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0); /* reaped: the pid names nothing now */
    return pid;
}

static void test_dead_targets_answer_esrch(void) {
    pid_t pid = dead_pid();
    pa_cpumask_t m = os_affinity_self();
    CHECK_EQ_INT(pa_affinity_get(pid, &m), -ESRCH);
    CHECK_EQ_INT(pa_affinity_set_thread(pid, &m), -ESRCH);
    CHECK_EQ_INT(pa_affinity_set_process(pid, &m, NULL), -ESRCH);
    pa_affinity_saved_t saved;
    pa_affinity_saved_init(&saved);
    CHECK_EQ_INT(pa_affinity_set_process(pid, &m, &saved), -ESRCH);
    CHECK_EQ_INT(saved.count, 0);
    pa_affinity_saved_free(&saved);
}

static void test_set_process_follows_every_thread(void) {
    pa_cpumask_t original = os_affinity_self();
    helper_t h;
    REQUIRE(helper_start(&h));
    /* The main thread and two started ones, plus any the runtime starts (TSan has a
     * background thread): base counts them all. */
    int base, tasks, matching;
    process_masks(h.pid, &original, &base, &matching);
    CHECK(base >= 3);
    CHECK_EQ_INT(matching, base);

    /* The highest allowed cpu alone: a change whenever more than one cpu is allowed. */
    unsigned cpu = highest_cpu(&original);
    pa_cpumask_t one = mask_of(&cpu, 1);
    if (pa_cpumask_count(&original) == 1) fprintf(stderr, "  (one cpu allowed: the mask cannot visibly change)\n");

    /* Bad masks first: nothing changes. */
    pa_cpumask_t empty;
    pa_cpumask_zero(&empty);
    pa_affinity_saved_t saved;
    pa_affinity_saved_init(&saved);
    CHECK_EQ_INT(pa_affinity_set_process(h.pid, &empty, &saved), -EINVAL);
    unsigned offline_cpu = PA_CPU_MAX - 1;
    pa_cpumask_t offline = mask_of(&offline_cpu, 1);
    CHECK_EQ_INT(pa_affinity_set_process(h.pid, &offline, &saved), -EINVAL);
    CHECK_EQ_INT(saved.count, 0);
    process_masks(h.pid, &original, &tasks, &matching);
    CHECK_EQ_INT(matching, base);

    REQUIRE(pa_affinity_set_process(h.pid, &one, &saved) == 0);
    CHECK_EQ_INT(saved.count, base);
    for (size_t i = 0; i < saved.count; i++) CHECK(pa_cpumask_equal(&saved.masks[i], &original));
    process_masks(h.pid, &one, &tasks, &matching);
    CHECK_EQ_INT(tasks, base);
    CHECK_EQ_INT(matching, base);

    /* A thread started now inherits the new mask from its creator. */
    REQUIRE(helper_command(&h, 'T'));
    process_masks(h.pid, &one, &tasks, &matching);
    CHECK_EQ_INT(tasks, base + 1);
    CHECK_EQ_INT(matching, base + 1);

    CHECK_EQ_INT(pa_affinity_restore(&saved), 0);
    CHECK_EQ_INT(saved.count, 0);
    process_masks(h.pid, &original, &tasks, &matching);
    /* the saved threads are back; the new one was never saved and keeps `one` */
    CHECK_EQ_INT(matching, pa_cpumask_equal(&one, &original) ? base + 1 : base);

    /* Restore skips threads that have exited. */
    REQUIRE(pa_affinity_set_process(h.pid, &one, &saved) == 0);
    CHECK_EQ_INT(saved.count, base + 1);
    helper_stop(&h);
    CHECK_EQ_INT(pa_affinity_restore(&saved), 0);
    pa_affinity_saved_free(&saved);
    CHECK_EQ_INT(pa_affinity_set_process(h.pid, &one, NULL), -ESRCH);
}

static void test_set_process_self(void) {
    pa_cpumask_t original = os_affinity_self();
    unsigned cpu = lowest_cpu(&original);
    pa_cpumask_t one = mask_of(&cpu, 1);
    pa_affinity_saved_t saved;
    pa_affinity_saved_init(&saved);
    REQUIRE(pa_affinity_set_process(0, &one, &saved) == 0);
    CHECK(saved.count >= 1);
    pa_cpumask_t os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &one));
    int tasks, matching;
    process_masks(getpid(), &one, &tasks, &matching);
    CHECK(tasks >= 1 && matching == tasks);
    CHECK_EQ_INT(pa_affinity_restore(&saved), 0);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &original));
    pa_affinity_saved_free(&saved);
}

/* ---- the registry: logic on a synthetic 8-cpu set ---- */

static void test_registry_exclusive_and_shared_rules(void) {
    pa_cpumask_t allowed = mask_range(0, 7);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(&allowed, &cores) == 0);
    pa_core_reservation_t a, b, c, d;
    pa_cpumask_t m, free_ex, got_allowed;
    bool exclusive;

    CHECK_EQ_INT(pa_cores_reserve(cores, 0, true, NULL, &a), -EINVAL);
    CHECK_EQ_INT(pa_cores_reserve(cores, 9, false, NULL, &a), -EINVAL);
    CHECK_EQ_INT(a, 0);

    /* exclusive takes the lowest free cores */
    REQUIRE(pa_cores_reserve(cores, 3, true, NULL, &a) == 0);
    CHECK(a != 0);
    CHECK(pa_cores_get(cores, a, &m, &exclusive) == 0 && exclusive);
    pa_cpumask_t expect = mask_range(0, 2);
    CHECK(pa_cpumask_equal(&m, &expect));

    /* shared avoids exclusive cores and, while it can, cores already shared */
    REQUIRE(pa_cores_reserve(cores, 2, false, NULL, &b) == 0);
    CHECK(pa_cores_get(cores, b, &m, &exclusive) == 0 && !exclusive);
    expect = mask_range(3, 4);
    CHECK(pa_cpumask_equal(&m, &expect));
    REQUIRE(pa_cores_reserve(cores, 4, false, NULL, &c) == 0);
    CHECK(pa_cores_get(cores, c, &m, NULL) == 0);
    unsigned c_cpus[] = {3, 5, 6, 7}; /* idle 5,6,7 first, then the lowest shared one */
    expect = mask_of(c_cpus, 4);
    CHECK(pa_cpumask_equal(&m, &expect));

    /* everything is held: exclusive can have nothing, shared only the shared cores */
    CHECK_EQ_INT(pa_cores_reserve(cores, 1, true, NULL, &d), -EBUSY);
    CHECK_EQ_INT(d, 0);
    CHECK_EQ_INT(pa_cores_reserve(cores, 6, false, NULL, &d), -EBUSY);
    REQUIRE(pa_cores_reserve(cores, 5, false, NULL, &d) == 0);
    CHECK(pa_cores_get(cores, d, &m, NULL) == 0);
    expect = mask_range(3, 7);
    CHECK(pa_cpumask_equal(&m, &expect));
    CHECK(pa_cores_available(cores, &free_ex, &got_allowed) == 0);
    CHECK_EQ_INT(pa_cpumask_count(&free_ex), 0);
    CHECK(pa_cpumask_equal(&got_allowed, &allowed));
    CHECK_EQ_INT(pa_cores_live(cores), 4);

    /* reserve_mask: exact cores, same rules */
    unsigned two = 2, four = 4, nine = 9;
    pa_cpumask_t m2 = mask_of(&two, 1), m4 = mask_of(&four, 1), m9 = mask_of(&nine, 1), empty;
    pa_cpumask_zero(&empty);
    pa_core_reservation_t e;
    CHECK_EQ_INT(pa_cores_reserve_mask(cores, &empty, false, &e), -EINVAL);
    CHECK_EQ_INT(pa_cores_reserve_mask(cores, &m9, false, &e), -EINVAL); /* outside allowed */
    CHECK_EQ_INT(pa_cores_reserve_mask(cores, &m2, false, &e), -EBUSY);  /* exclusive holds 2 */
    CHECK_EQ_INT(pa_cores_reserve_mask(cores, &m4, true, &e), -EBUSY);   /* shared hold 4 */
    REQUIRE(pa_cores_reserve_mask(cores, &m4, false, &e) == 0);          /* shared on shared */
    CHECK_EQ_INT(pa_cores_release(cores, e), 0);

    /* once the shared holders of 3..7 are gone, an exclusive reservation can take them */
    CHECK_EQ_INT(pa_cores_release(cores, b), 0);
    CHECK_EQ_INT(pa_cores_release(cores, c), 0);
    CHECK_EQ_INT(pa_cores_reserve(cores, 1, true, NULL, &e), -EBUSY);
    CHECK_EQ_INT(pa_cores_release(cores, d), 0);
    CHECK(pa_cores_available(cores, &free_ex, NULL) == 0);
    expect = mask_range(3, 7);
    CHECK(pa_cpumask_equal(&free_ex, &expect));

    /* prefer: cpus in prefer first, then the lowest others */
    unsigned pref_cpus[] = {6, 7};
    pa_cpumask_t prefer = mask_of(pref_cpus, 2);
    REQUIRE(pa_cores_reserve(cores, 3, true, &prefer, &e) == 0);
    CHECK(pa_cores_get(cores, e, &m, NULL) == 0);
    unsigned e_cpus[] = {3, 6, 7};
    expect = mask_of(e_cpus, 3);
    CHECK(pa_cpumask_equal(&m, &expect));
    CHECK_EQ_INT(pa_cores_release(cores, e), 0);
    CHECK_EQ_INT(pa_cores_release(cores, a), 0);
    CHECK_EQ_INT(pa_cores_live(cores), 0);
    CHECK(pa_cores_available(cores, &free_ex, NULL) == 0 && pa_cpumask_equal(&free_ex, &allowed));
    pa_cores_destroy(cores);
}

static void test_registry_resize(void) {
    pa_cpumask_t allowed = mask_range(0, 7);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(&allowed, &cores) == 0);
    pa_core_reservation_t a, other;
    pa_cpumask_t m, expect;
    REQUIRE(pa_cores_reserve(cores, 2, true, NULL, &a) == 0);
    unsigned two = 2;
    pa_cpumask_t m2 = mask_of(&two, 1);
    REQUIRE(pa_cores_reserve_mask(cores, &m2, true, &other) == 0);

    /* grow: lowest free cores, skipping the one held */
    REQUIRE(pa_cores_resize(cores, a, 4) == 0);
    CHECK(pa_cores_get(cores, a, &m, NULL) == 0);
    unsigned grown[] = {0, 1, 3, 4};
    expect = mask_of(grown, 4);
    CHECK(pa_cpumask_equal(&m, &expect));
    /* growth beyond what is free: -EBUSY and unchanged */
    CHECK_EQ_INT(pa_cores_resize(cores, a, 8), -EBUSY);
    CHECK(pa_cores_get(cores, a, &m, NULL) == 0 && pa_cpumask_equal(&m, &expect));
    CHECK_EQ_INT(pa_cores_resize(cores, a, 0), -EINVAL);
    CHECK_EQ_INT(pa_cores_resize(cores, a, 9), -EINVAL);
    /* shrink: highest first, and the cores given back are free again */
    REQUIRE(pa_cores_resize(cores, a, 1) == 0);
    CHECK(pa_cores_get(cores, a, &m, NULL) == 0);
    unsigned zero = 0;
    expect = mask_of(&zero, 1);
    CHECK(pa_cpumask_equal(&m, &expect));
    pa_cpumask_t free_ex;
    CHECK(pa_cores_available(cores, &free_ex, NULL) == 0);
    unsigned free_cpus[] = {1, 3, 4, 5, 6, 7};
    expect = mask_of(free_cpus, 6);
    CHECK(pa_cpumask_equal(&free_ex, &expect));
    /* same size: nothing to do */
    CHECK_EQ_INT(pa_cores_resize(cores, a, 1), 0);
    /* a shared reservation grows over shared cores but never over exclusive ones */
    pa_core_reservation_t s1, s2;
    REQUIRE(pa_cores_reserve(cores, 5, false, NULL, &s1) == 0); /* 1,3,4,5,6 */
    REQUIRE(pa_cores_reserve(cores, 1, false, NULL, &s2) == 0); /* 7 */
    REQUIRE(pa_cores_resize(cores, s2, 6) == 0);
    CHECK(pa_cores_get(cores, s2, &m, NULL) == 0);
    expect = mask_range(1, 7);
    pa_cpumask_clear(&expect, 2);
    CHECK(pa_cpumask_equal(&m, &expect));
    CHECK_EQ_INT(pa_cores_resize(cores, s2, 7), -EBUSY);
    pa_cores_destroy(cores); /* frees the live reservations too */
}

static void test_registry_stale_ids(void) {
    pa_cpumask_t allowed = mask_range(0, 3);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(&allowed, &cores) == 0);
    pa_core_reservation_t a, b;
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &a) == 0);
    CHECK_EQ_INT(pa_cores_release(cores, a), 0);
    CHECK_EQ_INT(pa_cores_release(cores, a), -ENOENT);
    pa_cpumask_t m;
    CHECK_EQ_INT(pa_cores_get(cores, a, &m, NULL), -ENOENT);
    CHECK_EQ_INT(pa_cores_resize(cores, a, 2), -ENOENT);
    CHECK_EQ_INT(pa_cores_apply(cores, a, 0, false), -ENOENT);
    /* the slot is reused under a new generation: the old id still names nothing */
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &b) == 0);
    CHECK(b != a);
    CHECK_EQ_INT((uint32_t)b, (uint32_t)a); /* same slot */
    CHECK_EQ_INT(pa_cores_get(cores, a, &m, NULL), -ENOENT);
    CHECK_EQ_INT(pa_cores_release(cores, a), -ENOENT);
    CHECK_EQ_INT(pa_cores_get(cores, b, &m, NULL), 0);
    CHECK_EQ_INT(pa_cores_get(cores, 0, &m, NULL), -ENOENT);
    CHECK_EQ_INT(pa_cores_get(cores, ((uint64_t)1 << 32) | 999, &m, NULL), -ENOENT);
    CHECK_EQ_INT(pa_cores_live(cores), 1);
    pa_cpumask_t empty;
    pa_cpumask_zero(&empty);
    pa_cores_t *bad = (pa_cores_t *)(uintptr_t)1; /* must come back NULL */
    CHECK_EQ_INT(pa_cores_create(&empty, &bad), -EINVAL);
    CHECK(bad == NULL);
    pa_cores_destroy(cores);
    pa_cores_destroy(NULL);
}

/* ---- the registry applied to real threads and processes ---- */

static void test_registry_apply_resize_release_self(void) {
    pa_cpumask_t original = os_affinity_self();
    unsigned n = pa_cpumask_count(&original);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    pa_cpumask_t allowed;
    CHECK(pa_cores_available(cores, NULL, &allowed) == 0 && pa_cpumask_equal(&allowed, &original));
    pa_core_reservation_t r;
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &r) == 0);
    pa_cpumask_t m;
    REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
    REQUIRE(pa_cores_apply(cores, r, 0, false) == 0);
    pa_cpumask_t os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &m));
    CHECK_EQ_INT(sched_getcpu(), lowest_cpu(&m));
    if (n >= 2) {
        REQUIRE(pa_cores_resize(cores, r, 2) == 0);
        REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
        CHECK_EQ_INT(pa_cpumask_count(&m), 2);
        os = os_affinity_self();
        CHECK(pa_cpumask_equal(&os, &m)); /* re-applied */
        REQUIRE(pa_cores_resize(cores, r, 1) == 0);
        REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
        os = os_affinity_self();
        CHECK(pa_cpumask_equal(&os, &m));
    }
    CHECK_EQ_INT(pa_cores_release(cores, r), 0);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &original));

    /* applied twice (two reservations): released in any order, the thread ends where
     * it started when the last one goes, and destroy restores what is left */
    pa_core_reservation_t r1, r2;
    REQUIRE(pa_cores_reserve(cores, 1, false, NULL, &r1) == 0);
    REQUIRE(pa_cores_reserve(cores, n, false, NULL, &r2) == 0);
    REQUIRE(pa_cores_apply(cores, r1, 0, false) == 0);
    REQUIRE(pa_cores_apply(cores, r2, 0, false) == 0);
    REQUIRE(pa_cores_apply(cores, r2, 0, false) == 0);
    CHECK_EQ_INT(pa_cores_release(cores, r2), 0);
    REQUIRE(pa_cores_get(cores, r1, &m, NULL) == 0);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &m));
    pa_cores_destroy(cores);
    os = os_affinity_self();
    CHECK(pa_cpumask_equal(&os, &original));
}

static void test_registry_whole_process_target(void) {
    pa_cpumask_t original = os_affinity_self();
    unsigned n = pa_cpumask_count(&original);
    helper_t h;
    REQUIRE(helper_start(&h));
    int base, tasks, matching;
    process_masks(h.pid, &original, &base, &matching);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    pa_core_reservation_t r;
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &r) == 0);
    pa_cpumask_t m;
    REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
    REQUIRE(pa_cores_apply(cores, r, h.pid, true) == 0);
    process_masks(h.pid, &m, &tasks, &matching);
    CHECK_EQ_INT(tasks, base);
    CHECK_EQ_INT(matching, base);

    /* born after apply: inherits the reserved mask */
    REQUIRE(helper_command(&h, 'T'));
    process_masks(h.pid, &m, &tasks, &matching);
    CHECK_EQ_INT(tasks, base + 1);
    CHECK_EQ_INT(matching, base + 1);

    if (n >= 2) {
        REQUIRE(pa_cores_resize(cores, r, n) == 0);
        REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
        CHECK(pa_cpumask_equal(&m, &original));
        process_masks(h.pid, &m, &tasks, &matching);
        CHECK_EQ_INT(matching, base + 1);
        REQUIRE(pa_cores_resize(cores, r, 1) == 0);
        REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
        process_masks(h.pid, &m, &tasks, &matching);
        CHECK_EQ_INT(matching, base + 1);
    }

    /* release: every thread, the one born since apply included, is back */
    CHECK_EQ_INT(pa_cores_release(cores, r), 0);
    process_masks(h.pid, &original, &tasks, &matching);
    CHECK_EQ_INT(tasks, base + 1);
    CHECK_EQ_INT(matching, base + 1);

    /* a target that exits is skipped by resize and release */
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &r) == 0);
    REQUIRE(pa_cores_apply(cores, r, h.pid, true) == 0);
    helper_stop(&h);
    if (n >= 2) CHECK_EQ_INT(pa_cores_resize(cores, r, 2), 0);
    CHECK_EQ_INT(pa_cores_release(cores, r), 0);
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &r) == 0);
    CHECK_EQ_INT(pa_cores_apply(cores, r, h.pid, true), -ESRCH);
    CHECK_EQ_INT(pa_cores_apply(cores, r, h.pid, false), -ESRCH);
    pa_cores_destroy(cores);
}

/* ---- the registry under concurrency ---- */

#define STRESS_THREADS 4

typedef struct stress_shared {
    pa_cores_t *cores;
    pa_cpumask_t original;
    long iterations;
    _Atomic uint32_t exclusive_holders[PA_CPU_MAX];
    _Atomic uint32_t shared_holders[PA_CPU_MAX];
    _Atomic uint32_t violations;
    _Atomic uint32_t exclusive_grants;
} stress_shared_t;

typedef struct stress_arg {
    stress_shared_t *shared;
    bool exclusive;
} stress_arg_t;

/* Each holder counter is raised only after reserve returned and lowered before release
 * is called, so with a correct registry the intervals of two conflicting holders are
 * ordered by the registry's mutex and never overlap; any overlap seen is a double grant.
 * The acq_rel read-modify-writes pair with each other across threads. */
static void *stress_worker(void *p) {
    stress_arg_t *arg = p;
    stress_shared_t *s = arg->shared;
    for (long i = 0; i < s->iterations; i++) {
        pa_core_reservation_t r;
        int rc = pa_cores_reserve(s->cores, 1, arg->exclusive, NULL, &r);
        if (rc == -EBUSY) {
            sched_yield();
            continue;
        }
        if (rc != 0) {
            pa__fetch_add_relaxed(&s->violations, 1);
            break;
        }
        pa_cpumask_t m;
        bool exclusive = !arg->exclusive;
        if (pa_cores_get(s->cores, r, &m, &exclusive) != 0 || exclusive != arg->exclusive ||
            pa_cpumask_count(&m) != 1)
            pa__fetch_add_relaxed(&s->violations, 1);
        unsigned cpu = lowest_cpu(&m);
        if (cpu >= PA_CPU_MAX) break;
        if (arg->exclusive) {
            if (pa__fetch_add_acq_rel(&s->exclusive_holders[cpu], 1) != 0) pa__fetch_add_relaxed(&s->violations, 1);
            if (pa__load_acquire(&s->shared_holders[cpu]) != 0) pa__fetch_add_relaxed(&s->violations, 1);
            pa__fetch_add_relaxed(&s->exclusive_grants, 1);
        } else {
            pa__fetch_add_acq_rel(&s->shared_holders[cpu], 1);
            if (pa__load_acquire(&s->exclusive_holders[cpu]) != 0) pa__fetch_add_relaxed(&s->violations, 1);
        }
        /* Every few rounds, pin ourselves to the core and check with the OS. */
        if ((i & 7) == 0) {
            if (pa_cores_apply(s->cores, r, 0, false) != 0) pa__fetch_add_relaxed(&s->violations, 1);
            pa_cpumask_t os = os_affinity_self();
            if (!pa_cpumask_equal(&os, &m)) pa__fetch_add_relaxed(&s->violations, 1);
        }
        if (arg->exclusive) pa__fetch_sub_acq_rel(&s->exclusive_holders[cpu], 1);
        else pa__fetch_sub_acq_rel(&s->shared_holders[cpu], 1);
        if (pa_cores_release(s->cores, r) != 0) pa__fetch_add_relaxed(&s->violations, 1);
        pa_cpumask_t os = os_affinity_self();
        if (!pa_cpumask_equal(&os, &s->original)) pa__fetch_add_relaxed(&s->violations, 1);
    }
    return NULL;
}

static void test_registry_exclusive_never_given_twice(void) {
    static stress_shared_t s; /* large: not on the stack */
    memset(&s, 0, sizeof(s));
    s.original = os_affinity_self();
    s.iterations = pa_stress(3000);
    REQUIRE(pa_cores_create(NULL, &s.cores) == 0);
    pthread_t threads[STRESS_THREADS];
    stress_arg_t args[STRESS_THREADS];
    for (int t = 0; t < STRESS_THREADS; t++) {
        args[t].shared = &s;
        args[t].exclusive = t != 0; /* one shared reserver among exclusive ones */
        REQUIRE(pthread_create(&threads[t], NULL, stress_worker, &args[t]) == 0);
    }
    for (int t = 0; t < STRESS_THREADS; t++) pthread_join(threads[t], NULL);
    fprintf(stderr, "  %u exclusive grants over %u allowed cpus, %u violations\n",
            (unsigned)pa__load_relaxed(&s.exclusive_grants), pa_cpumask_count(&s.original),
            (unsigned)pa__load_relaxed(&s.violations));
    CHECK_EQ_INT(pa__load_relaxed(&s.violations), 0);
    CHECK(pa__load_relaxed(&s.exclusive_grants) > 0);
    CHECK_EQ_INT(pa_cores_live(s.cores), 0);
    pa_cpumask_t free_ex;
    CHECK(pa_cores_available(s.cores, &free_ex, NULL) == 0 && pa_cpumask_equal(&free_ex, &s.original));
    pa_cores_destroy(s.cores);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--child") == 0) return child_main(atoi(argv[2]), atoi(argv[3]));
    RUN_TEST(test_cpumask_helpers);
    RUN_TEST(test_cpus_online_matches_sysconf);
    RUN_TEST(test_get_and_set_this_thread);
    RUN_TEST(test_dead_targets_answer_esrch);
    RUN_TEST(test_set_process_follows_every_thread);
    RUN_TEST(test_set_process_self);
    RUN_TEST(test_registry_exclusive_and_shared_rules);
    RUN_TEST(test_registry_resize);
    RUN_TEST(test_registry_stale_ids);
    RUN_TEST(test_registry_apply_resize_release_self);
    RUN_TEST(test_registry_whole_process_target);
    RUN_TEST(test_registry_exclusive_never_given_twice);
    TEST_MAIN_END();
}
