/*
 * test_pq_unindex.c — white-box test of the index after batch pops (this file compiles
 * src/native/pq.c itself, see pq_whitebox.h). An indexed batch pop removes the index
 * entries of the items it took after its walk, all of them requested first so that their
 * cache misses overlap (index_remove_all). An entry left behind would still answer
 * correctly (state TAKEN: a push of the value helps it out, a cancel passes over it), so
 * only the index itself shows it: the node keeps its index reference and is never
 * retired — a leak per popped item. Checked here by walking each value's bucket.
 */
#define _GNU_SOURCE
#include <math.h>

#include "pq_whitebox.h"

#include "pa_test.h"

enum { N = 1000 };

static void test_batch_pops_leave_no_entry(bool items_too) {
    pa_pq_t *pq;
    REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
    uint64_t values[N];
    double prio[N], conf[N], dl[N];
    for (int i = 0; i < N; i++) {
        values[i] = 1 + (uint64_t)i * 7919; /* spread over many buckets */
        prio[i] = (double)((i * 37) % 101);
        conf[i] = 0.5;
        dl[i] = NAN;
    }
    size_t pushed = 0;
    REQUIRE(wb_pq_push_many(pq, N, values, prio, conf, dl, &pushed) == 0 && pushed == N);
    for (int i = 0; i < N; i++) CHECK(wb_indexed_entry(pq, values[i]));
    /* pop in batches of every size up to a chunk and beyond (several operations) */
    uint64_t out[N];
    pa_pq_item_t items[N];
    size_t got = 0, max = 1;
    while (got < N) {
        ssize_t k = items_too ? wb_pq_pop_items(pq, items, max) : wb_pq_pop_many(pq, out, max);
        REQUIRE(k > 0);
        for (ssize_t j = 0; j < k; j++) {
            uint64_t v = items_too ? items[j].value : out[j];
            CHECK(!wb_indexed_entry(pq, v));
            CHECK_EQ_INT(wb_pq_cancel(pq, v), -ENOENT);
        }
        got += (size_t)k;
        max = max * 3 + 1; /* 1, 4, 13, 40, 121, 364, 1093 */
        CHECK_EQ_INT(wb_pq_size(pq), N - got);
    }
    for (int i = 0; i < N; i++) CHECK(!wb_indexed_entry(pq, values[i]));
    /* the values can be queued again, and these entries are live */
    for (int i = 0; i < N; i += 10) CHECK_EQ_INT(wb_pq_push(pq, values[i], 1.0, 0.0, NAN), 0);
    for (int i = 0; i < N; i += 10) CHECK(wb_indexed_entry(pq, values[i]));
    CHECK_EQ_INT(wb_pq_size(pq), N / 10);
    wb_pq_destroy(pq);
}

static void test_pop_many_leaves_no_entry(void) { test_batch_pops_leave_no_entry(false); }
static void test_pop_items_leaves_no_entry(void) { test_batch_pops_leave_no_entry(true); }

int main(void) {
    RUN_TEST(test_pop_many_leaves_no_entry);
    RUN_TEST(test_pop_items_leaves_no_entry);
    TEST_MAIN_END();
}
