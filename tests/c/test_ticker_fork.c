/*
 * test_ticker_fork.c — the ticker's lifecycle contract beyond one process and one
 * schedule (prealloc/wheel.h, "fork contract", schedule "REPLACES", pa_ticker_revert).
 *
 *   test_fork_adopts_idle_ticker   a child of a process whose ticker thread sleeps gets a
 *                                  stopped ticker with the parent's timers; start runs a
 *                                  new thread there that expires a record; its eventfd is
 *                                  its own (the parent's stays quiet); stop and destroy
 *                                  return (a 30 s alarm is the hang detector); the
 *                                  parent's ticker still works afterwards.
 *   test_fork_orphans_busy_ticker  forked while the ticker thread is inside on_expired
 *                                  (holding its advance lock): the child's calls answer
 *                                  -EOWNERDEAD, stop 0, destroy returns.
 *   test_thread_blocks_signals     the ticker thread's SigBlk (/proc) holds SIGINT, SIGTERM
 *                                  and SIGUSR1 although the caller blocks none.
 *   test_default_mask_spares_active  on default options an ACTIVE record is not expired;
 *                                  PENDING and ALLOCATED ones are.
 *   test_schedule_twice_replaces   the first deadline does not fire; one timer pending.
 *   test_revert_rearms             a deadline passing while RELEASING fires after
 *                                  pa_ticker_revert; a revert with the timer still pending
 *                                  adds none.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pa_test.h"
#include "prealloc/wheel.h"

#define MS 1000000ull

static bool readable(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

static pa_id_t insert_status(pa_table_t *t, pa_status_t status) {
    pa_record_init_t init = {.status = PA_STATUS_ALLOCATED, .requested = 1, .allocated = 1};
    if (status == PA_STATUS_PENDING) init.status = PA_STATUS_PENDING;
    pa_id_t id = 0;
    if (pa_table_insert(t, &init, &id) != 0) return 0;
    if (status == PA_STATUS_ACTIVE &&
        pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_ACTIVE, NULL) != 0)
        return 0;
    return id;
}

/* A check in a forked child: reports the line, counts into the child's `bad`. */
#define CHILD_CHECK(cond)                                                         \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "%s:%d: child CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            bad++;                                                                \
        }                                                                         \
    } while (0)

/* Waits for a child; true when it exited with status 0 (a hang is killed by its alarm). */
static bool child_ok(pid_t pid) {
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return false;
    if (!WIFEXITED(status)) fprintf(stderr, "child died: signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void test_fork_adopts_idle_ticker(void) {
    pa_table_t *table;
    REQUIRE(pa_table_create(64, &table) == 0);
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, NULL, &ticker) == 0);
    pa_id_t far = insert_status(table, PA_STATUS_ALLOCATED);
    REQUIRE(far != 0);
    REQUIRE(pa_ticker_schedule(ticker, far, pa_clock_now_ns() + 3600 * 1000 * MS, NULL) == 0);
    REQUIRE(pa_ticker_start(ticker) == 0);
    struct timespec settle = {0, 20 * 1000 * 1000}; /* let the thread fall asleep */
    nanosleep(&settle, NULL);
    int parent_fd = pa_ticker_eventfd(ticker);

    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        alarm(30); /* the hang detector: a hung child dies of SIGALRM */
        int bad = 0;
        CHILD_CHECK(pa_ticker_pending(ticker) == 1); /* the parent's timer came along */
        int fd = pa_ticker_eventfd(ticker);
        CHILD_CHECK(fd == parent_fd); /* same number, a fresh eventfd behind it */
        pa_id_t now_id = insert_status(table, PA_STATUS_ALLOCATED);
        CHILD_CHECK(pa_ticker_schedule(ticker, now_id, pa_clock_now_ns(), NULL) == 0);
#ifndef PA_UNDER_TSAN /* TSan does not support starting threads in a forked child */
        CHILD_CHECK(pa_ticker_start(ticker) == 0);
        CHILD_CHECK(readable(fd, 20000));
        pa_id_t got[4];
        CHILD_CHECK(pa_ticker_drain(ticker, got, 4) == 1 && got[0] == now_id);
#else
        CHILD_CHECK(pa_ticker_advance(ticker, pa_clock_now_ns() + 2 * MS) == 1);
#endif
        CHILD_CHECK(pa_table_status(table, now_id) == PA_STATUS_EXPIRED);
        CHILD_CHECK(pa_ticker_stop(ticker) == 0);
        pa_ticker_destroy(ticker);
        pa_table_destroy(table);
        _exit(bad ? 1 : 0);
    }
    CHECK(child_ok(pid));
    /* the child's expiry signalled its own eventfd, not ours */
    CHECK(!readable(parent_fd, 0));
    CHECK_EQ_INT(pa_ticker_pending(ticker), 1);
    pa_id_t mine = insert_status(table, PA_STATUS_ALLOCATED);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, mine, pa_clock_now_ns(), NULL), 0);
    CHECK(readable(parent_fd, 20000));
    pa_id_t got[4];
    CHECK_EQ_INT(pa_ticker_drain(ticker, got, 4), 1);
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
}

typedef struct gate {
    atomic_int inside;
    atomic_int release;
} gate_t;

static void block_in_callback(void *ctx, pa_id_t record, uint64_t deadline_ns) {
    gate_t *g = ctx;
    atomic_store(&g->inside, 1);
    while (!atomic_load(&g->release)) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
}

static void test_fork_orphans_busy_ticker(void) {
    pa_table_t *table;
    REQUIRE(pa_table_create(64, &table) == 0);
    gate_t gate = {0, 0};
    pa_ticker_options_t opts = {.on_expired = block_in_callback, .on_expired_ctx = &gate};
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, &opts, &ticker) == 0);
    pa_id_t id = insert_status(table, PA_STATUS_ALLOCATED);
    REQUIRE(pa_ticker_schedule(ticker, id, pa_clock_now_ns(), NULL) == 0);
    REQUIRE(pa_ticker_start(ticker) == 0);
    for (int i = 0; i < 20000 && !atomic_load(&gate.inside); i++) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    REQUIRE(atomic_load(&gate.inside));
    pid_t pid = fork();
    if (pid == 0) {
        alarm(30);
        int bad = 0;
        CHILD_CHECK(pa_ticker_start(ticker) == -EOWNERDEAD);
        CHILD_CHECK(pa_ticker_schedule(ticker, id, 0, NULL) == -EOWNERDEAD);
        CHILD_CHECK(pa_ticker_eventfd(ticker) == -EOWNERDEAD);
        CHILD_CHECK(pa_ticker_pending(ticker) == 0);
        CHILD_CHECK(pa_ticker_stop(ticker) == 0);
        pa_ticker_destroy(ticker);
        _exit(bad ? 1 : 0);
    }
    atomic_store(&gate.release, 1);
    REQUIRE(pid > 0);
    CHECK(child_ok(pid));
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
}

/* The tids of this process (up to max); returns how many. */
static int list_tids(pid_t *out, int max) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < max)
        if (e->d_name[0] != '.') out[n++] = (pid_t)atoi(e->d_name);
    closedir(d);
    return n;
}

/* A thread that is not in before[0..count): the one just started. (Not merely "another
 * thread": a thread of an earlier test may still be listed while it exits, and an
 * exiting thread has every signal blocked.) */
static pid_t new_thread(const pid_t *before, int count) {
    pid_t now[256];
    int n = list_tids(now, 256);
    for (int i = 0; i < n; i++) {
        bool known = false;
        for (int j = 0; j < count && !known; j++) known = now[i] == before[j];
        if (!known) return now[i];
    }
    return 0;
}

static unsigned long long sigblk_of(pid_t tid) {
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)tid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    unsigned long long mask = 0;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "SigBlk:", 7) == 0) mask = strtoull(line + 7, NULL, 16);
    fclose(f);
    return mask;
}

static void test_thread_blocks_signals(void) {
    sigset_t none, saved;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, &saved);
    pa_table_t *table;
    REQUIRE(pa_table_create(8, &table) == 0);
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, NULL, &ticker) == 0);
    pid_t before[256];
    int count = list_tids(before, 256);
    REQUIRE(pa_ticker_start(ticker) == 0);
    pid_t tid = 0;
    for (int i = 0; i < 2000 && tid == 0; i++) {
        tid = new_thread(before, count);
        if (tid == 0) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    REQUIRE(tid != 0);
    /* Read the mask only once the thread runs the ticker's loop: pthread_create blocks
     * every signal around clone itself, and the new thread sets its own mask a moment
     * later. An expiry the thread publishes proves it is past that point. */
    pa_id_t id = insert_status(table, PA_STATUS_ALLOCATED);
    REQUIRE(pa_ticker_schedule(ticker, id, pa_clock_now_ns(), NULL) == 0);
    REQUIRE(readable(pa_ticker_eventfd(ticker), 20000));
    unsigned long long blk = sigblk_of(tid);
    CHECK(blk & (1ull << (SIGINT - 1)));
    CHECK(blk & (1ull << (SIGTERM - 1)));
    CHECK(blk & (1ull << (SIGUSR1 - 1)));
    CHECK_EQ_INT(sigblk_of((pid_t)gettid()) & (1ull << (SIGTERM - 1)), 0); /* ours untouched */
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

static void test_default_mask_spares_active(void) {
    pa_table_t *table;
    REQUIRE(pa_table_create(8, &table) == 0);
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, NULL, &ticker) == 0);
    pa_id_t pending = insert_status(table, PA_STATUS_PENDING);
    pa_id_t allocated = insert_status(table, PA_STATUS_ALLOCATED);
    pa_id_t active = insert_status(table, PA_STATUS_ACTIVE);
    REQUIRE(pending && allocated && active);
    uint64_t now = pa_clock_now_ns();
    CHECK_EQ_INT(pa_ticker_schedule(ticker, pending, now, NULL), 0);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, allocated, now, NULL), 0);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, active, now, NULL), 0);
    CHECK_EQ_INT(pa_ticker_advance(ticker, now + 10 * MS), 2);
    CHECK_EQ_INT(pa_table_status(table, pending), PA_STATUS_EXPIRED);
    CHECK_EQ_INT(pa_table_status(table, allocated), PA_STATUS_EXPIRED);
    CHECK_EQ_INT(pa_table_status(table, active), PA_STATUS_ACTIVE);
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
}

static void test_schedule_twice_replaces(void) {
    pa_table_t *table;
    REQUIRE(pa_table_create(8, &table) == 0);
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, NULL, &ticker) == 0);
    pa_id_t id = insert_status(table, PA_STATUS_ALLOCATED);
    uint64_t base = pa_clock_now_ns() + 1000 * MS;
    pa_timer_id_t first, second;
    CHECK_EQ_INT(pa_ticker_schedule(ticker, id, base + 10 * MS, &first), 0);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, id, base + 100 * MS, &second), 0);
    CHECK(first != second);
    CHECK_EQ_INT(pa_ticker_pending(ticker), 1);
    CHECK_EQ_INT(pa_ticker_cancel(ticker, first), -ENOENT);
    CHECK_EQ_INT(pa_ticker_advance(ticker, base + 50 * MS), 0);
    CHECK_EQ_INT(pa_table_status(table, id), PA_STATUS_ALLOCATED);
    CHECK_EQ_INT(pa_ticker_advance(ticker, base + 101 * MS), 1);
    CHECK_EQ_INT(pa_table_status(table, id), PA_STATUS_EXPIRED);
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
}

static void test_revert_rearms(void) {
    pa_table_t *table;
    REQUIRE(pa_table_create(8, &table) == 0);
    pa_ticker_t *ticker;
    REQUIRE(pa_ticker_create(table, NULL, &ticker) == 0);
    uint64_t base = pa_clock_now_ns() + 1000 * MS;
    const uint32_t from = PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE);

    /* the deadline passes while RELEASING: the timer fires and does nothing */
    pa_id_t id = insert_status(table, PA_STATUS_ACTIVE);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, id, base + 10 * MS, NULL), 0);
    CHECK_EQ_INT(pa_table_transition(table, id, from, PA_STATUS_RELEASING, NULL), 0);
    CHECK_EQ_INT(pa_ticker_advance(ticker, base + 20 * MS), 0);
    CHECK_EQ_INT(pa_table_status(table, id), PA_STATUS_RELEASING);
    CHECK_EQ_INT(pa_ticker_pending(ticker), 0);
    CHECK_EQ_INT(pa_ticker_revert(ticker, id, PA_STATUS_ALLOCATED), 0);
    CHECK_EQ_INT(pa_ticker_pending(ticker), 1);
    CHECK_EQ_INT(pa_ticker_advance(ticker, base + 21 * MS), 1);
    CHECK_EQ_INT(pa_table_status(table, id), PA_STATUS_EXPIRED);

    /* reverted before the deadline: the pending timer stays the only one */
    pa_id_t early = insert_status(table, PA_STATUS_ALLOCATED);
    CHECK_EQ_INT(pa_ticker_schedule(ticker, early, base + 40 * MS, NULL), 0);
    CHECK_EQ_INT(pa_table_transition(table, early, from, PA_STATUS_RELEASING, NULL), 0);
    CHECK_EQ_INT(pa_ticker_revert(ticker, early, PA_STATUS_ALLOCATED), 0);
    CHECK_EQ_INT(pa_ticker_pending(ticker), 1);
    CHECK_EQ_INT(pa_ticker_advance(ticker, base + 41 * MS), 1);

    /* not RELEASING / bad target */
    pa_id_t other = insert_status(table, PA_STATUS_ALLOCATED);
    CHECK_EQ_INT(pa_ticker_revert(ticker, other, PA_STATUS_ALLOCATED), -EAGAIN);
    CHECK_EQ_INT(pa_ticker_revert(ticker, other, PA_STATUS_EXPIRED), -EINVAL);
    CHECK_EQ_INT(pa_ticker_revert(NULL, other, PA_STATUS_ALLOCATED), -EINVAL);
    pa_ticker_destroy(ticker);
    pa_table_destroy(table);
}

int main(void) {
    RUN_TEST(test_fork_adopts_idle_ticker);
    RUN_TEST(test_fork_orphans_busy_ticker);
    RUN_TEST(test_thread_blocks_signals);
    RUN_TEST(test_default_mask_spares_active);
    RUN_TEST(test_schedule_twice_replaces);
    RUN_TEST(test_revert_rearms);
    TEST_MAIN_END();
}
