/*
 * test_epoch_fork.c — the reclamation's fork contract (epoch.c, "fork"): a child gets a
 * fresh working state, whatever the parent's other threads were doing.
 *
 * The case that broke it: a thread of the parent is inside a critical section when another
 * thread forks. The child has no such thread, but its copy of the record still announced
 * "active in epoch e", so no epoch could advance in the child and nothing it retired was
 * ever freed (2 M push+pop held 214 MiB). Here the parent holds a section open on a second
 * thread, forks, and the child churns a queue: what it retired must be freed (counted by
 * the reclaimer itself), and a barrier (which waits for three advances) must return. The
 * child runs under alarm(), so the old behaviour fails the test instead of hanging it.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../src/native/epoch.h"
#include "pa_test.h"
#include "prealloc/pq.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int inside, release_it;

static void *hold_section(void *arg) {
    pa__ebr_thread_t *self = pa__ebr_enter();
    pthread_mutex_lock(&mu);
    inside = self ? 1 : -1;
    pthread_cond_broadcast(&cv);
    while (!release_it) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    if (self) pa__ebr_exit(self);
    return arg;
}

/* In the child: churn a queue, then check what is still held. Exit status 0 = ok. */
static int child_main(pa_pq_t *inherited) {
    alarm(60); /* a child that cannot advance the epoch would wait forever in the barrier */
    enum { N = 20000 };
    pa_pq_t *pq;
    if (pa_pq_create(0, &pq) != 0) return 10;
    pa_pq_item_t it;
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < N; i++)
            if (pa_pq_push(pq, (uint64_t)i, (double)(i % 97), 0.5, NAN) != 0) return 11;
        for (int i = 0; i < N; i++)
            if (pa_pq_pop(pq, &it) != 1) return 12;
    }
    /* the inherited queue works too (nobody was using it at the fork) */
    if (pa_pq_push(inherited, 7, 1.0, 1.0, NAN) != 0 || pa_pq_pop(inherited, &it) != 1 || it.value != 7)
        return 13;
    pa__ebr_flush();
    /* 80 000 nodes retired; with the epoch stuck every one would still be pending. */
    size_t held = pa__ebr_pending_local() + pa__ebr_pending_orphans();
    if (held > 4096) {
        fprintf(stderr, "child: %zu retired nodes still held after flush\n", held);
        return 14;
    }
    pa__ebr_barrier(); /* returns only if the epoch can advance three times */
    pa_pq_destroy(pq);
    return 0;
}

static void test_fork_with_a_thread_inside_a_section(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    REQUIRE(pa_pq_push(pq, 1, 1.0, 1.0, NAN) == 0); /* registers this thread too */
    pa_pq_item_t it;
    REQUIRE(pa_pq_pop(pq, &it) == 1);
    pthread_t th;
    REQUIRE(pthread_create(&th, NULL, hold_section, NULL) == 0);
    pthread_mutex_lock(&mu);
    while (!inside) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    CHECK_EQ_INT(inside, 1);

    fflush(NULL);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) _exit(child_main(pq));
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    if (WIFSIGNALED(status)) fprintf(stderr, "child killed by signal %d\n", WTERMSIG(status));
    CHECK_EQ_INT(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);

    /* the parent's own state is untouched: its section is still open, then closes */
    pthread_mutex_lock(&mu);
    release_it = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(th, NULL);
    pa__ebr_barrier();
    pa_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_fork_with_a_thread_inside_a_section);
    TEST_MAIN_END();
}
