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
 * quarter of its nodes at level 2 or higher; the degenerate one has none. Also the tower
 * shape's two regimes (p = 1/4 and 1/2, tower_wide) and batch towers.
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

/* Of the nodes holding values first..last, how many have a tower of 2 levels or more
 * (walks level 0; single-threaded). */
static long tall_among(pa_pq_t *pq, uint64_t first, uint64_t last, long *seen) {
    long tall = 0;
    *seen = 0;
    for (pq_node_t *x = unmark(pa__load_acquire(&pq->head->next0)); x != pq->tail;
         x = unmark(pa__load_acquire(&x->next0))) {
        if (x->value < first || x->value > last) continue;
        ++*seen;
        if (x->level >= 2) tall++;
    }
    return tall;
}

static void push_single(pa_pq_t *pq, uint64_t first, int n, uint64_t *rng) {
    for (int i = 0; i < n; i++) {
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
        REQUIRE(wb_pq_push(pq, first + (uint64_t)i, (double)(*rng >> 11), 0.0, NAN) == 0);
    }
}

/* Tower shape (tower_wide): single pushes into a queue of PQ_WIDE_SIZE items or more
 * draw towers with p = 1/2, into a smaller one with p = 1/4, and batches with 1/4 at any
 * size. Of 4096 new nodes, 2048 (sd 32) are tall with p = 1/2, 1024 (sd 28) with 1/4;
 * the line between is 1536. */
static void test_single_pushes_into_a_large_queue_grow_wider_towers(void) {
    enum { PROBE = 4096 };
    pa_pq_t *pq = NULL;
    REQUIRE(wb_pq_create(0, &pq) == 0);
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    push_single(pq, 1, PQ_WIDE_SIZE + PQ_WIDE_SAMPLE, &rng); /* one sample past the line */
    CHECK_EQ_INT(pa__load_relaxed(&pq->wide), 1);
    const uint64_t probe = 1u << 30;
    push_single(pq, probe, PROBE, &rng);
    long seen = 0, tall = tall_among(pq, probe, probe + PROBE - 1, &seen);
    CHECK_EQ_INT(seen, PROBE);
    if (tall < 1536) fprintf(stderr, "wide queue: %ld of %d single pushes tall\n", tall, PROBE);
    CHECK(tall >= 1536);

    /* a batch into the same large queue stays narrow */
    static uint64_t values[PROBE];
    static double p[PROBE], c[PROBE], d[PROBE];
    for (int i = 0; i < PROBE; i++) {
        values[i] = 2 * probe + (uint64_t)i;
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        p[i] = (double)(rng >> 11);
        c[i] = 0.0;
        d[i] = NAN;
    }
    size_t pushed = 0;
    REQUIRE(wb_pq_push_many(pq, PROBE, values, p, c, d, &pushed) == 0);
    tall = tall_among(pq, 2 * probe, 2 * probe + PROBE - 1, &seen);
    CHECK_EQ_INT(seen, PROBE);
    if (tall >= 1536) fprintf(stderr, "wide queue: %ld of %d batch items tall\n", tall, PROBE);
    CHECK(tall < 1536);

    /* shrunk below the line, the next sample turns it narrow again */
    size_t left = wb_pq_size(pq);
    uint64_t *out = malloc(sizeof(uint64_t) * left);
    REQUIRE(out != NULL);
    CHECK_EQ_INT(wb_pq_pop_many(pq, out, left - 1000), left - 1000);
    free(out);
    push_single(pq, 3 * probe, PQ_WIDE_SAMPLE, &rng);
    CHECK_EQ_INT(pa__load_relaxed(&pq->wide), 0);
    push_single(pq, 4 * probe, PROBE, &rng);
    tall = tall_among(pq, 4 * probe, 4 * probe + PROBE - 1, &seen);
    CHECK_EQ_INT(seen, PROBE);
    if (tall >= 1536) fprintf(stderr, "small queue: %ld of %d single pushes tall\n", tall, PROBE);
    CHECK(tall < 1536);
    CHECK(tall >= 512);
    wb_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_towers_survive_an_emptied_queue);
    RUN_TEST(test_batch_chunk_into_an_empty_queue_grows_towers);
    RUN_TEST(test_single_pushes_into_a_large_queue_grow_wider_towers);
    TEST_MAIN_END();
}
