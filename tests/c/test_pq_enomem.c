/*
 * test_pq_enomem.c — a thread that cannot get a memory-reclamation record gets -ENOMEM
 * from every queue call, never "empty" (issue: pop/peek/pop_many used to answer false/0,
 * i.e. "the queue is empty", while it held items).
 *
 * This file compiles src/native/epoch.c itself, with its record allocation routed through
 * a function the test can make fail; the library's pq.c calls these definitions (the
 * archive's own epoch object is then never linked). A fresh thread finds every static
 * record taken (the counter is set to the pool size) and the allocation failing.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

static _Atomic int fail_alloc;
static void *wb_aligned_alloc(size_t align, size_t size) {
    if (fail_alloc) return NULL;
    void *p = NULL;
    return posix_memalign(&p, align, size) == 0 ? p : NULL;
}
#define aligned_alloc wb_aligned_alloc
#include "../../src/native/epoch.c"
#undef aligned_alloc

#include "pa_test.h"
#include "prealloc/pq.h"

static pa_pq_t *the_pq;

static void *starved_thread(void *arg) {
    int *failures_before = arg;
    (void)failures_before;
    pa__store_relaxed(&ebr.static_used, EBR_STATIC_RECORDS);
    fail_alloc = 1;
    pa_pq_item_t it;
    uint64_t vals[4];
    double p = 1.0, c = 1.0, d = NAN;
    uint64_t v = 9;
    size_t pushed = 99;
    CHECK_EQ_INT(pa_pq_pop(the_pq, &it), -ENOMEM);
    CHECK_EQ_INT(pa_pq_peek(the_pq, &it), -ENOMEM);
    CHECK_EQ_INT(pa_pq_pop_many(the_pq, vals, 4), -ENOMEM);
    CHECK_EQ_INT(pa_pq_pop_items(the_pq, &it, 1), -ENOMEM);
    CHECK_EQ_INT(pa_pq_push(the_pq, 5, 1.0, 1.0, NAN), -ENOMEM);
    CHECK_EQ_INT(pa_pq_push_many(the_pq, 1, &v, &p, &c, &d, &pushed), -ENOMEM);
    CHECK_EQ_INT(pushed, 0);
    /* a batch large enough for the sorted group path */
    enum { BIG = 300 };
    static uint64_t bv[BIG];
    static double bp[BIG], bc[BIG], bd[BIG];
    for (int i = 0; i < BIG; i++) bv[i] = 100 + (uint64_t)i, bp[i] = i % 3, bc[i] = 0.5, bd[i] = NAN;
    pushed = 99;
    CHECK_EQ_INT(pa_pq_push_many(the_pq, BIG, bv, bp, bc, bd, &pushed), -ENOMEM);
    CHECK_EQ_INT(pushed, 0);
    CHECK_EQ_INT(pa_pq_size(the_pq), 1); /* nothing changed */
    /* memory back: the same thread registers and works */
    fail_alloc = 0;
    CHECK_EQ_INT(pa_pq_peek(the_pq, &it), 1);
    CHECK_EQ_INT(it.value, 1);
    CHECK_EQ_INT(pa_pq_pop(the_pq, &it), 1);
    CHECK_EQ_INT(it.value, 1);
    CHECK_EQ_INT(pa_pq_pop(the_pq, &it), 0); /* now it is empty */
    CHECK_EQ_INT(pa_pq_pop_many(the_pq, vals, 4), 0);
    return NULL;
}

static void test_no_record_is_enomem_not_empty(void) {
    REQUIRE(pa_pq_create(0, &the_pq) == 0);
    REQUIRE(pa_pq_push(the_pq, 1, 1.0, 1.0, NAN) == 0);
    pthread_t th;
    REQUIRE(pthread_create(&th, NULL, starved_thread, NULL) == 0);
    pthread_join(th, NULL);
    pa_pq_destroy(the_pq);
}

int main(void) {
    RUN_TEST(test_no_record_is_enomem_not_empty);
    TEST_MAIN_END();
}
