/*
 * test_pq_push_all.c — the all-or-nothing indexed batch push (pa_pq_push_all), white-box
 * (this file compiles src/native/pq.c itself, see pq_whitebox.h, so that it can look into
 * the index and run code between the batch's operations through PQ_GROUP_HOOK).
 *
 * What it must do: push every item (popped in key order, equal keys in input order) or,
 * when one value is queued already or given twice, leave nothing of the call queued and
 * nothing of it in the index — except what a pop or a cancel took meanwhile, which it
 * reports in *kept. Bad input changes nothing. And under threads that push batches over
 * a small value space, pop and cancel at random, every item is accounted for: what the
 * calls report as pushed (or kept) equals what was popped, cancelled and left at the end.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>

/* Between two operations of a group: the test's `between` callback, when set. */
static void (*between)(void *pq);
#define PQ_GROUP_HOOK(pq) (between ? between(pq) : (void)0)

#include "pq_whitebox.h"

#include "pa_test.h"

typedef struct batch {
    size_t n;
    uint64_t *v;
    double *p, *c, *d;
} batch_t;

static batch_t batch_new(size_t n, uint64_t seed) {
    batch_t b = {n, calloc(n, 8), calloc(n, 8), calloc(n, 8), calloc(n, 8)};
    if (!b.v || !b.p || !b.c || !b.d) abort();
    uint64_t rng = seed;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = pa_rand_next(&rng);
        b.v[i] = 1 + i;
        b.p[i] = (double)(r % 97); /* ties: equal keys must keep input order */
        b.c[i] = 0.5;
        b.d[i] = (r >> 20) % 4 ? NAN : (double)((r >> 8) % 1000);
    }
    return b;
}

static void batch_free(batch_t *b) {
    free(b->v);
    free(b->p);
    free(b->c);
    free(b->d);
}

static int push_all(pa_pq_t *pq, const batch_t *b, size_t *failed, size_t *kept) {
    return wb_pq_push_all(pq, b->n, b->v, b->p, b->c, b->d, failed, kept);
}

/* Pops everything; checks the order against the input: priority descending, then deadline
 * ascending (none last), then input order. Returns how many came out. */
static size_t drain_in_order(pa_pq_t *pq, const batch_t *b) {
    size_t got = 0;
    pa_pq_item_t prev = {0}, it;
    while (wb_pq_pop(pq, &it) == 1) {
        if (got) {
            bool ordered = prev.priority > it.priority ||
                           (prev.priority == it.priority &&
                            (prev.deadline < it.deadline ||
                             (prev.deadline == it.deadline && prev.value < it.value)));
            CHECK(ordered);
        }
        size_t i = (size_t)it.value - 1;
        if (i < b->n) CHECK(it.priority == b->p[i]);
        prev = it;
        got++;
    }
    return got;
}

static void test_pushes_everything_in_order(void) {
    /* one chunk, several operations, and more than one group (PQ_BATCH_GROUP) */
    const size_t sizes[] = {1, 2, 255, 1000, PQ_BATCH_GROUP + 1234};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        pa_pq_t *pq;
        REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
        batch_t b = batch_new(sizes[s], 11 + s);
        size_t failed = 99, kept = 99;
        CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), 0);
        CHECK_EQ_INT(failed, 0);
        CHECK_EQ_INT(kept, 0);
        CHECK_EQ_INT(wb_pq_size(pq), b.n);
        for (size_t i = 0; i < b.n; i += 97) CHECK(wb_indexed_entry(pq, b.v[i]));
        /* each value is really queued: a second push of it is refused */
        CHECK_EQ_INT(wb_pq_push(pq, b.v[b.n / 2], 1.0, 0.0, NAN), -EEXIST);
        CHECK_EQ_INT(drain_in_order(pq, &b), b.n);
        for (size_t i = 0; i < b.n; i += 97) CHECK(!wb_indexed_entry(pq, b.v[i]));
        CHECK_EQ_INT(wb_pq_size(pq), 0);
        batch_free(&b);
        wb_pq_destroy(pq);
    }
}

static void test_bad_input_changes_nothing(void) {
    pa_pq_t *pq, *plain;
    REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
    REQUIRE(wb_pq_create(0, &plain) == 0);
    batch_t b = batch_new(300, 5);
    size_t failed = 0, kept = 0;
    b.c[217] = NAN;
    CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), -EINVAL);
    CHECK_EQ_INT(failed, 217);
    b.c[217] = 0.5;
    b.d[3] = -INFINITY;
    CHECK_EQ_INT(push_all(pq, &b, &failed, NULL), -EINVAL);
    CHECK_EQ_INT(failed, 3);
    b.d[3] = NAN;
    CHECK_EQ_INT(wb_pq_size(pq), 0);
    CHECK(!wb_indexed_entry(pq, b.v[0]));
    CHECK_EQ_INT(wb_pq_push_all(NULL, b.n, b.v, b.p, b.c, b.d, NULL, NULL), -EINVAL);
    CHECK_EQ_INT(wb_pq_push_all(pq, b.n, NULL, b.p, b.c, b.d, NULL, NULL), -EINVAL);
    CHECK_EQ_INT(wb_pq_push_all(pq, 0, NULL, NULL, NULL, NULL, NULL, NULL), 0);
    CHECK_EQ_INT(push_all(plain, &b, NULL, NULL), -ENOTSUP);
    CHECK_EQ_INT(wb_pq_size(plain), 0);
    /* the arrival numbers were not spent either: the next push is the queue's first */
    REQUIRE(wb_pq_push(pq, 7, 1.0, 0.0, NAN) == 0);
    pa_pq_item_t it;
    REQUIRE(wb_pq_pop(pq, &it) == 1);
    CHECK_EQ_INT(it.arrival, 0);
    batch_free(&b);
    wb_pq_destroy(pq);
    wb_pq_destroy(plain);
}

/* After a failed call: only `queued` (value -> still queued by someone else) is left. */
static void check_nothing_left(pa_pq_t *pq, const batch_t *b, uint64_t queued) {
    for (size_t i = 0; i < b->n; i++)
        if (b->v[i] != queued) CHECK(!wb_indexed_entry(pq, b->v[i]));
    CHECK_EQ_INT(wb_pq_size(pq), queued ? 1 : 0);
}

static void test_value_queued_already_withdraws_all(void) {
    const size_t sizes[] = {1000, PQ_BATCH_GROUP + 500};
    for (size_t s = 0; s < 2; s++) {
        pa_pq_t *pq;
        REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
        batch_t b = batch_new(sizes[s], 21);
        size_t at = b.n - 7; /* in the last group: the groups before it are complete */
        REQUIRE(wb_pq_push(pq, b.v[at], 1234.0, 0.0, NAN) == 0);
        size_t failed = 0, kept = 99;
        CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), -EEXIST);
        CHECK_EQ_INT(failed, at);
        CHECK_EQ_INT(kept, 0);
        check_nothing_left(pq, &b, b.v[at]);
        /* the earlier push is untouched */
        pa_pq_item_t it;
        REQUIRE(wb_pq_pop(pq, &it) == 1);
        CHECK(it.value == b.v[at] && it.priority == 1234.0);
        /* and every value can be pushed again */
        CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), 0);
        CHECK_EQ_INT(drain_in_order(pq, &b), b.n);
        batch_free(&b);
        wb_pq_destroy(pq);
    }
}

static void test_value_given_twice_withdraws_all(void) {
    /* the copies at both ends, in one group and across groups */
    const size_t sizes[] = {1000, PQ_BATCH_GROUP + 500};
    for (size_t s = 0; s < 2; s++) {
        pa_pq_t *pq;
        REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
        batch_t b = batch_new(sizes[s], 31);
        b.v[b.n - 3] = b.v[4];
        size_t failed = 0, kept = 99;
        CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), -EEXIST);
        CHECK(failed == 4 || failed == b.n - 3);
        CHECK_EQ_INT(kept, 0);
        check_nothing_left(pq, &b, 0);
        /* the same value three times, next to each other in the input */
        b.v[5] = b.v[6] = b.v[4];
        CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), -EEXIST);
        CHECK(b.v[failed] == b.v[4]);
        check_nothing_left(pq, &b, 0);
        batch_free(&b);
        wb_pq_destroy(pq);
    }
}

/* A pop and a cancel between the batch's operations take items the withdrawal then
 * cannot: they are reported in *kept, and the rest is withdrawn. */
static int hook_calls;
static uint64_t hook_popped, hook_cancel_value;
static int hook_cancel_rc;
static void pop_then_cancel(void *q) {
    pa_pq_t *pq = q;
    pa_pq_item_t it;
    if (hook_calls == 0) {
        CHECK(wb_pq_pop(pq, &it) == 1);
        hook_popped = it.value;
    } else if (hook_calls == 1) {
        hook_cancel_rc = wb_pq_cancel(pq, hook_cancel_value);
    }
    hook_calls++;
}

static void test_taken_items_are_kept(void) {
    pa_pq_t *pq;
    REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
    batch_t b = batch_new(1000, 41);
    /* The failure must come after both hook calls: a value given twice fails where its
     * later copy (in key order) is met, so both copies get the lowest priority. The two
     * highest are linked and completed in the first operation: the hook pops the first
     * and cancels the second. */
    b.v[999] = b.v[998];
    b.p[998] = b.p[999] = -1.0;
    b.p[500] = 1000.0;
    b.p[501] = 999.0;
    hook_cancel_value = b.v[501];
    hook_calls = 0;
    between = pop_then_cancel;
    size_t failed = 0, kept = 0;
    CHECK_EQ_INT(push_all(pq, &b, &failed, &kept), -EEXIST);
    between = NULL;
    CHECK(hook_calls >= 2);
    CHECK_EQ_INT(hook_popped, b.v[500]);
    CHECK_EQ_INT(hook_cancel_rc, 0);
    CHECK(failed == 998 || failed == 999);
    CHECK_EQ_INT(kept, 2);
    check_nothing_left(pq, &b, 0);
    batch_free(&b);
    wb_pq_destroy(pq);
}

/* Threads race batches (mostly distinct values, sometimes one given twice), single pushes,
 * batch pops and cancels over 64 values: most batches fail on a value another thread has
 * queued, and their withdrawals race the pops and cancels. Every item is accounted for. */
enum { RACERS = 4, SPACE = 64, MAX_BATCH = 24 };

typedef struct racer {
    pa_pq_t *pq;
    long ops;
    uint64_t seed;
    long pushed, popped, cancelled, failed_calls;
} racer_t;

static void *racer_main(void *arg) {
    racer_t *r = arg;
    uint64_t rng = r->seed;
    uint64_t vals[MAX_BATCH], out[16];
    double p[MAX_BATCH], c[MAX_BATCH], d[MAX_BATCH];
    for (long k = 0; k < r->ops; k++) {
        uint64_t x = pa_rand_next(&rng);
        switch (x % 5) {
        case 0:
        case 1: {
            size_t n = 1 + (size_t)((x >> 8) % MAX_BATCH);
            uint64_t start = (x >> 16) % SPACE, stride = 1 + 2 * ((x >> 24) % 16); /* odd: distinct */
            for (size_t i = 0; i < n; i++) {
                vals[i] = (start + i * stride) % SPACE;
                p[i] = (double)((x >> (i % 32)) % 5);
                c[i] = 0.0;
                d[i] = NAN;
            }
            if ((x >> 40) % 8 == 0 && n > 1) vals[n - 1] = vals[0]; /* given twice */
            size_t failed = 0, kept = 0;
            int rc = wb_pq_push_all(r->pq, n, vals, p, c, d, &failed, &kept);
            if (rc == 0) {
                r->pushed += (long)n;
            } else {
                if (rc != -EEXIST || failed >= n) abort();
                r->pushed += (long)kept;
                r->failed_calls++;
            }
            break;
        }
        case 2:
            if (wb_pq_push(r->pq, (x >> 8) % SPACE, 1.0, 0.0, NAN) == 0) r->pushed++;
            break;
        case 3:
            r->popped += wb_pq_pop_many(r->pq, out, 1 + (size_t)((x >> 8) % 16));
            break;
        default:
            if (wb_pq_cancel(r->pq, (x >> 8) % SPACE) == 0) r->cancelled++;
        }
    }
    return NULL;
}

static void test_racing_batches_account_for_every_item(void) {
    pa_pq_t *pq;
    REQUIRE(wb_pq_create(PA_PQ_INDEXED, &pq) == 0);
    racer_t rs[RACERS];
    pthread_t th[RACERS];
    for (int t = 0; t < RACERS; t++) {
        rs[t] = (racer_t){.pq = pq, .ops = pa_stress(60000), .seed = 7 + 1000 * (uint64_t)t};
        REQUIRE(pthread_create(&th[t], NULL, racer_main, &rs[t]) == 0);
    }
    long pushed = 0, popped = 0, cancelled = 0, failed_calls = 0;
    for (int t = 0; t < RACERS; t++) {
        pthread_join(th[t], NULL);
        pushed += rs[t].pushed;
        popped += rs[t].popped;
        cancelled += rs[t].cancelled;
        failed_calls += rs[t].failed_calls;
    }
    /* what is left: each value at most once */
    int copies[SPACE] = {0};
    long left = 0;
    pa_pq_item_t it;
    while (wb_pq_pop(pq, &it) == 1) {
        REQUIRE(it.value < SPACE);
        copies[it.value]++;
        left++;
    }
    for (int v = 0; v < SPACE; v++) {
        CHECK(copies[v] <= 1);
        CHECK(!wb_indexed_entry(pq, (uint64_t)v));
    }
    fprintf(stderr, "  pushed %ld (calls failed: %ld), popped %ld, cancelled %ld, left %ld\n", pushed,
            failed_calls, popped, cancelled, left);
    CHECK_EQ_INT(pushed, popped + cancelled + left);
    CHECK(failed_calls > 0 && pushed > 0); /* both outcomes were exercised */
    CHECK_EQ_INT(wb_pq_size(pq), 0);
    wb_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_pushes_everything_in_order);
    RUN_TEST(test_bad_input_changes_nothing);
    RUN_TEST(test_value_queued_already_withdraws_all);
    RUN_TEST(test_value_given_twice_withdraws_all);
    RUN_TEST(test_taken_items_are_kept);
    RUN_TEST(test_racing_batches_account_for_every_item);
    TEST_MAIN_END();
}
