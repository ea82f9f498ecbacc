/*
 * test_pq_recycle.c — in the engine's shape (one thread pushes, another pops) the nodes
 * that the consumer's reclamation frees must reach the producer: without the depot (pq.c,
 * "The depot") every push called malloc (2 M pushes, 2 M mallocs), because freed nodes
 * only ever filled the consumer's own cache.
 *
 * The test counts malloc calls made by the queue through a wrapper around glibc's malloc
 * (this executable's malloc is the one the library calls), while a producer thread pushes
 * ROUNDS x BATCH items and a consumer thread pops them. After a warm-up round the producer
 * must get almost all its nodes from the depot. Sanitizer builds replace malloc and turn
 * the node cache off (so ASan sees every reuse): there the test says so and skips.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "pa_test.h"
#include "prealloc/pq.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || defined(PA_UNDER_TSAN)
#define SKIP_REASON "sanitizer build: malloc is the sanitizer's and the node cache is off"
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SKIP_REASON "sanitizer build: malloc is the sanitizer's and the node cache is off"
#endif
#endif

#if !defined(SKIP_REASON) && !defined(__GLIBC__)
#define SKIP_REASON "not glibc (musl): no __libc_malloc to count the allocations through"
#endif

#ifndef SKIP_REASON
static atomic_long mallocs;
static atomic_int counting; /* set by the producer once warmed up */
extern void *__libc_malloc(size_t size);
void *malloc(size_t size) {
    if (atomic_load_explicit(&counting, memory_order_relaxed))
        atomic_fetch_add_explicit(&mallocs, 1, memory_order_relaxed);
    return __libc_malloc(size);
}

enum { BATCH = 5000, ROUNDS = 20 };
static pa_pq_t *pq;
static atomic_long produced, consumed;

static void *producer(void *arg) {
    for (long r = 0; r < ROUNDS; r++) {
        /* lockstep: a batch is pushed once the previous one was consumed, so the nodes
         * alive at once do not depend on how the threads get scheduled */
        while (atomic_load(&consumed) < r * BATCH) sched_yield();
        for (long i = 0; i < BATCH; i++)
            if (pa_pq_push(pq, (uint64_t)(r * BATCH + i), (double)(i % 101), 0.5, NAN) != 0) return NULL;
        atomic_fetch_add(&produced, BATCH);
        if (r + 1 == ROUNDS / 2) atomic_store(&counting, 1); /* warmed up: count the second half */
    }
    return arg;
}

static void *consumer(void *arg) {
    pa_pq_item_t it;
    while (atomic_load(&consumed) < (long)ROUNDS * BATCH) {
        if (pa_pq_pop(pq, &it) == 1) atomic_fetch_add(&consumed, 1);
        else sched_yield();
    }
    return arg;
}
#endif

static void test_split_shape_reuses_nodes(void) {
#ifdef SKIP_REASON
    fprintf(stderr, "skipped: %s\n", SKIP_REASON);
#else
    REQUIRE(pa_pq_create(0, &pq) == 0);
    pthread_t p, c;
    REQUIRE(pthread_create(&p, NULL, producer, &pq) == 0);
    REQUIRE(pthread_create(&c, NULL, consumer, &pq) == 0);
    void *pr = NULL, *cr = NULL;
    pthread_join(p, &pr);
    pthread_join(c, &cr);
    atomic_store(&counting, 0);
    CHECK(pr == &pq && cr == &pq);
    long half = (long)ROUNDS * BATCH / 2, m = atomic_load(&mallocs);
    fprintf(stderr, "last %ld pushes in the split shape: %ld mallocs\n", half, m);
    /* without recycling: one per push. With the depot the producer reuses what the
     * consumer freed; what is left is growth of the nodes alive at once. */
    CHECK(m < half / 10);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    pa_pq_destroy(pq);
#endif
}

int main(void) {
    RUN_TEST(test_split_shape_reuses_nodes);
    TEST_MAIN_END();
}
