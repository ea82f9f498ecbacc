/*
 * test_pq_fork.c — white-box test of the queue's per-thread size stripes across fork():
 * this file compiles src/native/pq.c itself (public functions renamed, as
 * test_pq_retire.c does).
 *
 * Each live thread owns one of PQ_SIZE_SHARDS size stripes (its size updates are then
 * plain stores). The parent here keeps every stripe owned by live threads and forks: in
 * the child those threads do not exist, so their stripes must be free again — its thread
 * gets one of its own at its first call (without the atfork handler it would share the
 * locked stripe forever) and the child's queue still counts exactly.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pq_whitebox.h"

#include "pa_test.h"

static pa_pq_t *the_pq;
static pthread_barrier_t started, release_them;

static void *holder(void *arg) {
    (void)wb_pq_push(the_pq, (uint64_t)(uintptr_t)arg, 1.0, 1.0, NAN); /* claims a stripe */
    pthread_barrier_wait(&started);
    pthread_barrier_wait(&release_them);
    return NULL;
}


static void test_child_gets_the_stripes_of_threads_it_does_not_have(void) {
    enum { HOLDERS = PQ_SIZE_SHARDS };
    REQUIRE(wb_pq_create(0, &the_pq) == 0);
    pthread_barrier_init(&started, NULL, HOLDERS + 1);
    pthread_barrier_init(&release_them, NULL, HOLDERS + 1);
    pthread_t th[HOLDERS];
    for (int i = 0; i < HOLDERS; i++) REQUIRE(pthread_create(&th[i], NULL, holder, (void *)(uintptr_t)(i + 1)) == 0);
    pthread_barrier_wait(&started);
    CHECK_EQ_INT(pa__load_relaxed(&pq_stripes_owned), (1u << PQ_SIZE_SHARDS) - 1); /* all taken */
    CHECK_EQ_INT(wb_pq_size(the_pq), HOLDERS);

    fflush(NULL);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        /* This thread made no queue call before the fork, so its first one claims a
         * stripe now (no new thread here: ThreadSanitizer cannot follow one). */
        alarm(30);
        int code = 0;
        pa_pq_item_t it;
        for (int i = 0; i < 100; i++) (void)wb_pq_push(the_pq, 1000 + (uint64_t)i, 2.0, 1.0, NAN);
        for (int i = 0; i < 50; i++) (void)wb_pq_pop(the_pq, &it);
        if (!tls_pq.exclusive) code |= 1;                 /* got a stripe of its own */
        if (wb_pq_size(the_pq) != HOLDERS + 50) code |= 2; /* and the count is exact */
        _exit(code);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ_INT(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);

    pthread_barrier_wait(&release_them);
    for (int i = 0; i < HOLDERS; i++) pthread_join(th[i], NULL);
    /* the holders exited: their stripes are free again here too (this thread never made
     * a queue call here, so it holds none) */
    CHECK_EQ_INT(pa__load_relaxed(&pq_stripes_owned), 0);
    CHECK_EQ_INT(wb_pq_size(the_pq), HOLDERS);
    wb_pq_destroy(the_pq);
}

int main(void) {
    RUN_TEST(test_child_gets_the_stripes_of_threads_it_does_not_have);
    TEST_MAIN_END();
}
