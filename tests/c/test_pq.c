/*
 * test_pq.c — single-threaded tests of the priority queue (prealloc/pq.h): the order
 * against a brute-force reference (ties on every field, NaN/inf deadlines, FIFO among
 * equals), bad input, the index (-EEXIST, cancel, re-push, -ENOTSUP), peek, pop_many,
 * size, and destroy with items still queued (ASan checks that nothing leaks).
 */
#include <math.h>

#include "pa_test.h"
#include "prealloc/pq.h"

/* ---- a brute-force reference queue ---- */

typedef struct ref_item {
    uint64_t value;
    double priority, confidence, deadline; /* deadline: NaN / +inf = none */
    uint64_t arrival;
} ref_item_t;

typedef struct ref_pq {
    ref_item_t *items;
    size_t n, cap;
    uint64_t next_arrival;
} ref_pq_t;

static bool has_deadline(double d) { return !isnan(d) && !isinf(d); }

/* a before b in the queue's order: priority desc, confidence desc, deadline asc (none
 * last), arrival asc */
static bool ref_before(const ref_item_t *a, const ref_item_t *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->confidence != b->confidence) return a->confidence > b->confidence;
    bool ha = has_deadline(a->deadline), hb = has_deadline(b->deadline);
    if (ha != hb) return ha;
    if (ha && a->deadline != b->deadline) return a->deadline < b->deadline;
    return a->arrival < b->arrival;
}

static void ref_push(ref_pq_t *r, uint64_t value, double p, double c, double d) {
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 64;
        r->items = realloc(r->items, r->cap * sizeof *r->items);
    }
    r->items[r->n++] = (ref_item_t){value, p, c, d, r->next_arrival++};
}

static bool ref_pop(ref_pq_t *r, ref_item_t *out) {
    if (!r->n) return false;
    size_t best = 0;
    for (size_t i = 1; i < r->n; i++)
        if (ref_before(&r->items[i], &r->items[best])) best = i;
    *out = r->items[best];
    r->items[best] = r->items[--r->n];
    return true;
}

static bool ref_remove_value(ref_pq_t *r, uint64_t value) {
    for (size_t i = 0; i < r->n; i++) {
        if (r->items[i].value == value) {
            r->items[i] = r->items[--r->n];
            return true;
        }
    }
    return false;
}

/* Small value sets so that ties happen on every field. */
static const double priorities[] = {0.0, -0.0, 1.0, 2.5, -1.0, INFINITY, -INFINITY, 1e300};
static const double confidences[] = {0.0, 0.5, 1.0, 0.25};
static const double deadlines[] = {NAN, INFINITY, 1.0, 2.0, -3.0, 0.0, -0.0, 1e-300};

#define PICK(arr, rng) (arr)[pa_rand_next(rng) % (sizeof(arr) / sizeof((arr)[0]))]

/* The popped item must be the reference's, key fields included (deadline none -> +inf). */
static void check_same(const pa_pq_item_t *got, const ref_item_t *want) {
    CHECK_EQ_INT(got->value, want->value);
    CHECK(got->priority == want->priority);
    CHECK(got->confidence == want->confidence);
    if (has_deadline(want->deadline)) {
        CHECK(got->deadline == want->deadline);
    } else {
        CHECK(isinf(got->deadline) && got->deadline > 0);
    }
    CHECK_EQ_INT(got->arrival, want->arrival);
}

static void order_against_reference(unsigned flags, uint64_t seed, long ops) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(flags, &pq) == 0);
    ref_pq_t ref = {0};
    uint64_t rng = seed, next_value = 1;
    for (long i = 0; i < ops; i++) {
        /* drift between growing and draining so both the cut and the empty path run */
        bool grow = (i / 500) % 2 == 0;
        if (pa_rand_next(&rng) % 100 < (grow ? 65u : 35u)) {
            double p = PICK(priorities, &rng), c = PICK(confidences, &rng), d = PICK(deadlines, &rng);
            uint64_t v = next_value++;
            CHECK_EQ_INT(pa_pq_push(pq, v, p, c, d), 0);
            ref_push(&ref, v, p, c, d);
        } else {
            pa_pq_item_t got;
            ref_item_t want;
            bool g = pa_pq_pop(pq, &got) == 1, w = ref_pop(&ref, &want);
            CHECK_EQ_INT(g, w);
            if (g && w) check_same(&got, &want);
        }
        CHECK_EQ_INT(pa_pq_size(pq), ref.n);
    }
    pa_pq_item_t got;
    ref_item_t want;
    while (ref_pop(&ref, &want)) {
        REQUIRE(pa_pq_pop(pq, &got) == 1);
        check_same(&got, &want);
    }
    CHECK(pa_pq_pop(pq, &got) == 0);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    free(ref.items);
    pa_pq_destroy(pq);
}

static void test_order_unindexed(void) {
    for (uint64_t seed = 1; seed <= 4; seed++) order_against_reference(0, seed * 7919, pa_stress(6000));
}

static void test_order_indexed(void) {
    for (uint64_t seed = 1; seed <= 4; seed++) order_against_reference(PA_PQ_INDEXED, seed * 104729, pa_stress(6000));
}

/* Items equal on priority, confidence and deadline come out first-in first-out. */
static void test_fifo_among_equals(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    const long n = 3000;
    for (long i = 0; i < n; i++) REQUIRE(pa_pq_push(pq, (uint64_t)i, 1.0, 0.5, NAN) == 0);
    pa_pq_item_t it;
    for (long i = 0; i < n; i++) {
        REQUIRE(pa_pq_pop(pq, &it) == 1);
        CHECK_EQ_INT(it.value, i);
    }
    CHECK(pa_pq_pop(pq, &it) == 0);
    pa_pq_destroy(pq);
}

/* A large bulk load then a full drain, against a sort (exercises tall towers and many cuts). */
static int cmp_ref(const void *a, const void *b) {
    const ref_item_t *x = a, *y = b;
    return ref_before(x, y) ? -1 : ref_before(y, x) ? 1 : 0;
}

static void test_bulk_sorted(void) {
    const long n = pa_stress(200000);
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    ref_item_t *want = malloc((size_t)n * sizeof *want);
    uint64_t rng = 42;
    for (long i = 0; i < n; i++) {
        double p = (double)(pa_rand_next(&rng) % 1000), c = (double)(pa_rand_next(&rng) % 3);
        double d = (pa_rand_next(&rng) % 4) ? (double)(pa_rand_next(&rng) % 100) : NAN;
        REQUIRE(pa_pq_push(pq, (uint64_t)i, p, c, d) == 0);
        want[i] = (ref_item_t){(uint64_t)i, p, c, d, (uint64_t)i};
    }
    CHECK_EQ_INT(pa_pq_size(pq), n);
    qsort(want, (size_t)n, sizeof *want, cmp_ref);
    pa_pq_item_t it;
    long bad = 0;
    for (long i = 0; i < n; i++) {
        REQUIRE(pa_pq_pop(pq, &it) == 1);
        if (it.value != want[i].value) bad++;
    }
    CHECK_EQ_INT(bad, 0);
    CHECK(pa_pq_pop(pq, &it) == 0);
    free(want);
    pa_pq_destroy(pq);
}

static void test_bad_input(void) {
    pa_pq_t *pq = NULL;
    CHECK_EQ_INT(pa_pq_create(2u, &pq), -EINVAL);
    CHECK(pq == NULL);
    CHECK_EQ_INT(pa_pq_create(0, NULL), -EINVAL);
    for (int indexed = 0; indexed < 2; indexed++) {
        REQUIRE(pa_pq_create(indexed ? PA_PQ_INDEXED : 0, &pq) == 0);
        REQUIRE(pa_pq_push(pq, 7, 1.0, 1.0, 5.0) == 0);
        CHECK_EQ_INT(pa_pq_push(pq, 8, NAN, 1.0, 5.0), -EINVAL);
        CHECK_EQ_INT(pa_pq_push(pq, 8, 1.0, NAN, 5.0), -EINVAL);
        CHECK_EQ_INT(pa_pq_push(pq, 8, 1.0, 1.0, -INFINITY), -EINVAL);
        CHECK_EQ_INT(pa_pq_push(NULL, 8, 1.0, 1.0, 1.0), -EINVAL);
        /* nothing changed: one item, and value 8 was never indexed */
        CHECK_EQ_INT(pa_pq_size(pq), 1);
        if (indexed) CHECK_EQ_INT(pa_pq_cancel(pq, 8), -ENOENT);
        pa_pq_item_t it;
        REQUIRE(pa_pq_pop(pq, &it) == 1);
        CHECK_EQ_INT(it.value, 7);
        /* the failed pushes spent no arrival number */
        REQUIRE(pa_pq_push(pq, 9, 1.0, 1.0, 5.0) == 0);
        REQUIRE(pa_pq_peek(pq, &it) == 1);
        CHECK_EQ_INT(it.arrival, 1);
        CHECK_EQ_INT(pa_pq_pop(NULL, &it), -EINVAL);
        CHECK_EQ_INT(pa_pq_peek(NULL, &it), -EINVAL);
        CHECK_EQ_INT(pa_pq_cancel(NULL, 9), -EINVAL);
        CHECK_EQ_INT(pa_pq_size(NULL), 0);
        pa_pq_destroy(pq);
    }
    pa_pq_destroy(NULL);
}

static void test_indexed_cancel(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(PA_PQ_INDEXED, &pq) == 0);
    pa_pq_item_t it;
    CHECK_EQ_INT(pa_pq_push(pq, 5, 1.0, 1.0, NAN), 0);
    CHECK_EQ_INT(pa_pq_push(pq, 5, 9.0, 1.0, NAN), -EEXIST);
    CHECK_EQ_INT(pa_pq_size(pq), 1);
    CHECK_EQ_INT(pa_pq_cancel(pq, 5), 0);
    CHECK_EQ_INT(pa_pq_cancel(pq, 5), -ENOENT);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    CHECK(pa_pq_peek(pq, &it) == 0);
    CHECK(pa_pq_pop(pq, &it) == 0);
    /* re-push after cancel, then after pop */
    CHECK_EQ_INT(pa_pq_push(pq, 5, 2.0, 1.0, NAN), 0);
    REQUIRE(pa_pq_pop(pq, &it) == 1);
    CHECK_EQ_INT(it.value, 5);
    CHECK(it.priority == 2.0);
    CHECK_EQ_INT(pa_pq_cancel(pq, 5), -ENOENT);
    CHECK_EQ_INT(pa_pq_push(pq, 5, 3.0, 1.0, NAN), 0);
    CHECK_EQ_INT(pa_pq_push(pq, 5, 3.0, 1.0, NAN), -EEXIST);
    CHECK_EQ_INT(pa_pq_cancel(pq, 6), -ENOENT);
    REQUIRE(pa_pq_pop(pq, &it) == 1);
    CHECK(it.value == 5 && it.priority == 3.0);

    /* cancel every third of many items spread over the order; the rest pop in order */
    const long n = pa_stress(20000);
    ref_pq_t ref = {0};
    uint64_t rng = 99;
    for (long i = 0; i < n; i++) {
        double p = (double)(pa_rand_next(&rng) % 50);
        REQUIRE(pa_pq_push(pq, 1000 + (uint64_t)i, p, 0.0, NAN) == 0);
        ref_push(&ref, 1000 + (uint64_t)i, p, 0.0, NAN);
    }
    /* the reference's arrival numbers continue after the 3 successful pushes above */
    for (size_t i = 0; i < ref.n; i++) ref.items[i].arrival += 3;
    for (long i = 0; i < n; i += 3) {
        CHECK_EQ_INT(pa_pq_cancel(pq, 1000 + (uint64_t)i), 0);
        CHECK(ref_remove_value(&ref, 1000 + (uint64_t)i));
    }
    CHECK_EQ_INT(pa_pq_size(pq), ref.n);
    /* a cancelled value can be queued again at once */
    CHECK_EQ_INT(pa_pq_push(pq, 1000, -100.0, 0.0, NAN), 0);
    ref_push(&ref, 1000, -100.0, 0.0, NAN);
    ref.items[ref.n - 1].arrival = 3 + (uint64_t)n;
    ref_item_t want;
    while (ref_pop(&ref, &want)) {
        REQUIRE(pa_pq_pop(pq, &it) == 1);
        check_same(&it, &want);
    }
    CHECK(pa_pq_pop(pq, &it) == 0);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    free(ref.items);
    pa_pq_destroy(pq);
}

static void test_unindexed_duplicates_and_enotsup(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    CHECK_EQ_INT(pa_pq_push(pq, 3, 1.0, 1.0, NAN), 0);
    CHECK_EQ_INT(pa_pq_push(pq, 3, 1.0, 1.0, NAN), 0);
    CHECK_EQ_INT(pa_pq_cancel(pq, 3), -ENOTSUP);
    CHECK_EQ_INT(pa_pq_size(pq), 2);
    pa_pq_item_t a, b;
    REQUIRE(pa_pq_pop(pq, &a) == 1);
    REQUIRE(pa_pq_pop(pq, &b) == 1);
    CHECK(a.value == 3 && b.value == 3 && a.arrival < b.arrival);
    pa_pq_destroy(pq);
}

static void test_peek(void) {
    for (int indexed = 0; indexed < 2; indexed++) {
        pa_pq_t *pq;
        REQUIRE(pa_pq_create(indexed ? PA_PQ_INDEXED : 0, &pq) == 0);
        pa_pq_item_t p, q;
        CHECK(pa_pq_peek(pq, &p) == 0);
        CHECK(pa_pq_peek(pq, NULL) == 0);
        uint64_t rng = 5;
        for (int i = 0; i < 500; i++) {
            REQUIRE(pa_pq_push(pq, (uint64_t)i, (double)(pa_rand_next(&rng) % 10), 0.5, 1.0) == 0);
        }
        for (int i = 0; i < 500; i++) {
            REQUIRE(pa_pq_peek(pq, &p) == 1);
            CHECK(pa_pq_peek(pq, NULL) == 1);
            CHECK_EQ_INT(pa_pq_size(pq), 500 - i); /* peek removes nothing */
            if (indexed && i % 7 == 0 && i + 1 < 500) {
                /* cancelling the front makes peek show the next one */
                CHECK_EQ_INT(pa_pq_cancel(pq, p.value), 0);
                CHECK_EQ_INT(pa_pq_push(pq, p.value, p.priority, p.confidence, p.deadline), 0);
                REQUIRE(pa_pq_peek(pq, &p) == 1); /* the re-push is behind its equals now */
            }
            REQUIRE(pa_pq_pop(pq, &q) == 1);
            CHECK_EQ_INT(p.value, q.value);
            CHECK_EQ_INT(p.arrival, q.arrival);
        }
        CHECK(pa_pq_peek(pq, &p) == 0);
        pa_pq_destroy(pq);
    }
}

static void test_pop_many(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    for (int i = 0; i < 10; i++) REQUIRE(pa_pq_push(pq, (uint64_t)(100 + i), (double)i, 0.0, NAN) == 0);
    uint64_t vals[16];
    CHECK_EQ_INT(pa_pq_pop_many(pq, vals, 0), 0);
    CHECK_EQ_INT(pa_pq_pop_many(pq, vals, 4), 4);
    for (int i = 0; i < 4; i++) CHECK_EQ_INT(vals[i], 109 - i); /* highest priority first */
    CHECK_EQ_INT(pa_pq_size(pq), 6);
    CHECK_EQ_INT(pa_pq_pop_many(pq, vals, 16), 6);
    for (int i = 0; i < 6; i++) CHECK_EQ_INT(vals[i], 105 - i);
    CHECK_EQ_INT(pa_pq_pop_many(pq, vals, 16), 0);
    CHECK_EQ_INT(pa_pq_pop_many(NULL, vals, 16), -EINVAL);
    CHECK_EQ_INT(pa_pq_pop_many(pq, NULL, 16), -EINVAL);
    pa_pq_destroy(pq);
}

/* push_many: bad keys anywhere push nothing; equal keys keep input order across chunks;
 * an indexed duplicate stops the batch and says how many went in. */
static void test_push_many(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    enum { N = 700 }; /* more than one chunk */
    static uint64_t values[N];
    static double prio[N], conf[N], dead[N];
    for (int i = 0; i < N; i++) {
        values[i] = 1000 + (uint64_t)i;
        prio[i] = (double)(i % 3);
        conf[i] = 0.5;
        dead[i] = NAN;
    }
    size_t pushed = 99;
    prio[N - 1] = NAN;
    CHECK_EQ_INT(pa_pq_push_many(pq, N, values, prio, conf, dead, &pushed), -EINVAL);
    CHECK_EQ_INT(pushed, 0);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    prio[N - 1] = (double)((N - 1) % 3);
    dead[5] = -INFINITY;
    CHECK_EQ_INT(pa_pq_push_many(pq, N, values, prio, conf, dead, NULL), -EINVAL);
    CHECK_EQ_INT(pa_pq_size(pq), 0);
    dead[5] = NAN;
    CHECK_EQ_INT(pa_pq_push_many(pq, N, NULL, prio, conf, dead, NULL), -EINVAL);
    CHECK_EQ_INT(pa_pq_push_many(NULL, N, values, prio, conf, dead, NULL), -EINVAL);
    CHECK_EQ_INT(pa_pq_push_many(pq, 0, NULL, NULL, NULL, NULL, &pushed), 0);
    CHECK_EQ_INT(pushed, 0);
    CHECK_EQ_INT(pa_pq_push_many(pq, N, values, prio, conf, dead, &pushed), 0);
    CHECK_EQ_INT(pushed, N);
    CHECK_EQ_INT(pa_pq_size(pq), N);
    /* priority 2 first, then 1, then 0; within a priority, input order */
    static uint64_t out[N];
    CHECK_EQ_INT(pa_pq_pop_many(pq, out, N), N);
    size_t k = 0;
    for (int p = 2; p >= 0; p--)
        for (int i = 0; i < N; i++)
            if (i % 3 == p) CHECK_EQ_INT(out[k++], values[i]);
    pa_pq_destroy(pq);

    REQUIRE(pa_pq_create(PA_PQ_INDEXED, &pq) == 0);
    REQUIRE(pa_pq_push(pq, 1000 + 400, 0.0, 0.0, NAN) == 0);
    CHECK_EQ_INT(pa_pq_push_many(pq, N, values, prio, conf, dead, &pushed), -EEXIST);
    CHECK_EQ_INT(pushed, 400); /* values[400] is the duplicate */
    CHECK_EQ_INT(pa_pq_size(pq), 401);
    CHECK_EQ_INT(pa_pq_cancel(pq, values[399]), 0);  /* queued by the batch */
    CHECK_EQ_INT(pa_pq_cancel(pq, values[401]), -ENOENT); /* after the stop: not queued */
    pa_pq_destroy(pq);
}

/* Batches larger than one walk (PQ_TAKE_CHUNK) and item keys; indexed batches skip
 * cancelled items without counting them. */
static void test_pop_items(void) {
    for (unsigned flags = 0; flags <= PA_PQ_INDEXED; flags += PA_PQ_INDEXED) {
        pa_pq_t *pq;
        REQUIRE(pa_pq_create(flags, &pq) == 0);
        enum { N = 1000 };
        for (int i = 0; i < N; i++)
            REQUIRE(pa_pq_push(pq, (uint64_t)(1 + i), (double)(i % 7), 0.25, i % 2 ? NAN : (double)i) == 0);
        size_t cancelled = 0;
        if (flags) {
            for (uint64_t v = 1; v <= N; v += 10) cancelled += pa_pq_cancel(pq, v) == 0;
            CHECK_EQ_INT(cancelled, N / 10);
        }
        static pa_pq_item_t items[N];
        size_t got = pa_pq_pop_items(pq, items, N);
        CHECK_EQ_INT(got, N - cancelled);
        for (size_t k = 0; k < got; k++) {
            uint64_t i = items[k].value - 1;
            CHECK(!flags || i % 10 != 0);
            CHECK(items[k].priority == (double)(i % 7) && items[k].confidence == 0.25);
            CHECK(i % 2 ? isinf(items[k].deadline) : items[k].deadline == (double)i);
            if (k > 0) {
                /* priority descending, then deadline ascending (none last), then arrival */
                const pa_pq_item_t *a = &items[k - 1], *b = &items[k];
                bool ordered = a->priority > b->priority ||
                               (a->priority == b->priority &&
                                (a->deadline < b->deadline || (a->deadline == b->deadline && a->arrival < b->arrival)));
                CHECK(ordered);
            }
        }
        CHECK_EQ_INT(pa_pq_size(pq), 0);
        CHECK_EQ_INT(pa_pq_pop_items(pq, items, N), 0);
        CHECK_EQ_INT(pa_pq_pop_items(NULL, items, N), -EINVAL);
        CHECK_EQ_INT(pa_pq_pop_items(pq, NULL, N), -EINVAL);
        pa_pq_destroy(pq);
    }
}

/* Destroy with items queued, some popped (an uncut deleted prefix), some cancelled:
 * under ASan a leaked or double-freed node fails the run. */
static void test_destroy_with_items(void) {
    for (int indexed = 0; indexed < 2; indexed++) {
        for (int pops = 0; pops < 100; pops += 9) {
            pa_pq_t *pq;
            REQUIRE(pa_pq_create(indexed ? PA_PQ_INDEXED : 0, &pq) == 0);
            for (int i = 0; i < 200; i++) REQUIRE(pa_pq_push(pq, (uint64_t)i, (double)(i % 13), 0.0, NAN) == 0);
            pa_pq_item_t it;
            for (int i = 0; i < pops; i++) REQUIRE(pa_pq_pop(pq, &it) == 1);
            if (indexed)
                for (int i = 0; i < 200; i += 5) (void)pa_pq_cancel(pq, (uint64_t)i);
            pa_pq_destroy(pq);
        }
    }
}

int main(void) {
    RUN_TEST(test_order_unindexed);
    RUN_TEST(test_order_indexed);
    RUN_TEST(test_fifo_among_equals);
    RUN_TEST(test_bulk_sorted);
    RUN_TEST(test_bad_input);
    RUN_TEST(test_indexed_cancel);
    RUN_TEST(test_unindexed_duplicates_and_enotsup);
    RUN_TEST(test_peek);
    RUN_TEST(test_pop_many);
    RUN_TEST(test_push_many);
    RUN_TEST(test_pop_items);
    RUN_TEST(test_destroy_with_items);
    TEST_MAIN_END();
}
