/*
 * test_pq_shape.c — white-box test of the skiplist's shape: this file compiles
 * src/native/pq.c itself (public functions renamed, as test_pq_retire.c does) so it can
 * count towers.
 *
 * The regression it guards: with Lindén-Jonsson's rule "stop raising a tower when the
 * successor at a level is the last deleted node", a queue emptied by delete-min keeps a
 * deleted node with a stale key at the front of its upper levels, and every tower built
 * by the pushes that follow stops at level 1 until the next cut — the skiplist turns into
 * a linked list and each push costs O(n). A healthy skiplist with p = 1/4 has about a
 * quarter of its nodes at level 2 or higher; the degenerate one has none.
 */
#define _GNU_SOURCE
#include <math.h>

#include "pq_whitebox.h"

#include "pa_test.h"

/* nodes linked at level 1 (the first upper level), walking from head; single-threaded */
static long linked_at_level_one(pa_pq_t *pq) {
    long n = 0;
    for (pq_node_t *x = unmark(pa__load_acquire(&pq->head->up[0])); x != pq->tail;
         x = unmark(pa__load_acquire(&x->up[0])))
        n++;
    return n;
}

static void fill(pa_pq_t *pq, int n, int round, bool ascending_key) {
    for (int i = 0; i < n; i++) {
        /* a higher priority sorts first: descending priorities append at the end */
        double priority = ascending_key ? (double)(n - i) : (double)((i * 7919) % n);
        REQUIRE(wb_pq_push(pq, (uint64_t)round * n + i + 1, priority, 0.0, NAN) == 0);
    }
}

static void test_towers_survive_an_emptied_queue(void) {
    const int n = 4096;
    for (int pattern = 0; pattern < 2; pattern++) {
        pa_pq_t *pq = NULL;
        REQUIRE(wb_pq_create(0, &pq) == 0);
        uint64_t *out = malloc(sizeof(uint64_t) * n);
        REQUIRE(out != NULL);
        for (int round = 0; round < 8; round++) {
            fill(pq, n, round, pattern == 0);
            long upper = linked_at_level_one(pq);
            /* expected n/4 = 1024 (binomial, sd ~28); the degenerate list has ~0 */
            if (upper < n / 8)
                fprintf(stderr, "pattern %d round %d: %ld of %d nodes at level >= 2\n", pattern, round, upper, n);
            CHECK(upper >= n / 8);
            CHECK_EQ_INT(wb_pq_pop_many(pq, out, n), n);
            CHECK_EQ_INT(wb_pq_size(pq), 0);
        }
        free(out);
        wb_pq_destroy(pq);
    }
}

/* nodes linked at level i (0-based), walking from head; single-threaded */
static long linked_at_level(pa_pq_t *pq, int i) {
    long n = 0;
    for (pq_node_t *x = unmark(pa__load_acquire(next_at(pq->head, i))); x != pq->tail;
         x = unmark(pa__load_acquire(next_at(x, i))))
        n++;
    return n;
}

/* A batch push draws every height of its chunk before linking any node: with Pugh's cap
 * taken from the queue as it was (one level above those in use), one chunk pushed into an
 * empty queue was all height 1 or 2 — a near-linked list. Expected at level >= 3 (index 2)
 * with p = 1/4: 256 / 16 = 16 nodes (sd ~4); the stunted chunk has none. */
static void test_batch_chunk_into_an_empty_queue_grows_towers(void) {
    enum { N = 256 };
    pa_pq_t *pq = NULL;
    REQUIRE(wb_pq_create(0, &pq) == 0);
    static uint64_t values[N];
    static double p[N], c[N], d[N];
    for (int i = 0; i < N; i++) {
        values[i] = (uint64_t)i + 1;
        p[i] = (double)((i * 7919) % N);
        c[i] = 0.0;
        d[i] = NAN;
    }
    size_t pushed = 0;
    REQUIRE(wb_pq_push_many(pq, N, values, p, c, d, &pushed) == 0);
    CHECK_EQ_INT(pushed, N);
    CHECK_EQ_INT(linked_at_level(pq, 0), N);
    long third = linked_at_level(pq, 2);
    if (third < 4) fprintf(stderr, "%ld of %d nodes at level >= 3\n", third, N);
    CHECK(third >= 4);
    wb_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_towers_survive_an_emptied_queue);
    RUN_TEST(test_batch_chunk_into_an_empty_queue_grows_towers);
    TEST_MAIN_END();
}
