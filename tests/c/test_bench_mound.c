/*
 * test_bench_mound.c — the mound that bench_pq measures against our queue
 * (benchmarks/c/mound.h, benchmark code only) must be a correct strict priority queue, or
 * its figures mean nothing: one thread against a sorted reference (keys with many ties,
 * so the arrival order among equals is checked too), then producers and consumers on
 * every core, each item delivered exactly once. Runs under the sanitizer lanes as well.
 */
#define _GNU_SOURCE
#include "../../benchmarks/c/mound.h"

#include "pa_test.h"

typedef struct ref_item {
    uint64_t k[4];
    uint64_t value;
} ref_item_t;

static int ref_compare(const void *a, const void *b) {
    const ref_item_t *x = a, *y = b;
    return mound_key_less(x->k, y->k) ? -1 : mound_key_less(y->k, x->k) ? 1 : 0;
}

/* n items; every `pop_every`-th push is followed by a pop (0: fill, then drain) */
static void one_thread_against_reference(long n, long pop_every) {
    mound_t *m = mound_create();
    ref_item_t *ref = calloc((size_t)n, sizeof *ref);
    REQUIRE(m && ref);
    uint64_t rng = 7;
    for (long i = 0; i < n; i++) {
        uint64_t r = bench_rand(&rng);
        uint64_t key3[3] = {r >> 58, (r >> 20) & 3, (r >> 8) & 1}; /* 256 distinct keys */
        CHECK_EQ_INT(mound_push(m, (uint64_t)i, key3), 0);
        memcpy(ref[i].k, key3, sizeof key3);
        ref[i].k[3] = (uint64_t)i; /* one thread: the arrival tickets are 0, 1, 2, ... */
        ref[i].value = (uint64_t)i;
        if (pop_every && i % pop_every == pop_every - 1) { /* interleave pops with the pushes: the reference pops its minimum */
            qsort(ref, (size_t)(i + 1), sizeof *ref, ref_compare);
            uint64_t v = UINT64_MAX;
            REQUIRE(mound_pop(m, &v));
            CHECK_EQ_INT(v, ref[0].value);
            ref[0].k[0] = UINT64_MAX; /* taken: sorts last from now on */
            ref[0].k[3] = UINT64_MAX - (uint64_t)i;
        }
    }
    qsort(ref, (size_t)n, sizeof *ref, ref_compare);
    long left = n - (pop_every ? n / pop_every : 0);
    for (long i = 0; i < left; i++) {
        uint64_t v = UINT64_MAX;
        REQUIRE(mound_pop(m, &v));
        CHECK_EQ_INT(v, ref[i].value);
    }
    uint64_t v;
    CHECK(!mound_pop(m, &v));
    mound_destroy(m);
    free(ref);
}

static void test_one_thread_matches_sorted_reference(void) {
    one_thread_against_reference(6000, 3); /* the reference sorts at every pop: kept small */
    one_thread_against_reference(pa_stress(100000), 0);
}

enum { PRODUCERS = 2, CONSUMERS = 2 };

typedef struct mt_run {
    mound_t *m;
    long per_producer;
    _Atomic long popped;
    _Atomic int producers_done;
    _Atomic uint8_t *seen; /* per value: times delivered */
} mt_run_t;

typedef struct mt_arg {
    mt_run_t *run;
    int id;
} mt_arg_t;

static void *producer(void *p) {
    mt_arg_t *a = p;
    uint64_t rng = 1000 + (uint64_t)a->id;
    for (long i = 0; i < a->run->per_producer; i++) {
        uint64_t r = bench_rand(&rng);
        uint64_t key3[3] = {r >> 60, 0, 0};
        if (mound_push(a->run->m, (uint64_t)a->id * (uint64_t)a->run->per_producer + (uint64_t)i, key3) != 0) abort();
    }
    return NULL;
}

static void *consumer(void *p) {
    mt_arg_t *a = p;
    const long total = PRODUCERS * a->run->per_producer;
    while (pa__load_relaxed(&a->run->popped) < total) {
        /* acquire: pairs with the release that says every push has returned; after it an
         * empty pop means the mound claims to be empty, and the check below says if it is */
        bool done = pa__load_acquire(&a->run->producers_done) == PRODUCERS;
        uint64_t v;
        if (!mound_pop(a->run->m, &v)) {
            if (done) break;
            continue;
        }
        if (v >= (uint64_t)total) abort();
        pa__fetch_add_relaxed(&a->run->seen[v], 1);
        pa__fetch_add_relaxed(&a->run->popped, 1);
    }
    return NULL;
}

static void test_threads_deliver_each_item_once(void) {
    mt_run_t run = {.per_producer = pa_stress(100000)};
    const long total = PRODUCERS * run.per_producer;
    run.m = mound_create();
    run.seen = calloc((size_t)total, sizeof *run.seen);
    REQUIRE(run.m && run.seen);
    pthread_t t[PRODUCERS + CONSUMERS];
    mt_arg_t args[PRODUCERS + CONSUMERS];
    for (int i = 0; i < PRODUCERS + CONSUMERS; i++) {
        args[i] = (mt_arg_t){&run, i < PRODUCERS ? i : i - PRODUCERS};
        REQUIRE(pthread_create(&t[i], NULL, i < PRODUCERS ? producer : consumer, &args[i]) == 0);
    }
    for (int i = 0; i < PRODUCERS; i++) {
        pthread_join(t[i], NULL);
        pa__fetch_add_acq_rel(&run.producers_done, 1); /* pairs with the consumers' acquire */
    }
    for (int i = PRODUCERS; i < PRODUCERS + CONSUMERS; i++) pthread_join(t[i], NULL);
    long once = 0;
    for (long v = 0; v < total; v++) once += pa__load_relaxed(&run.seen[v]) == 1;
    CHECK_EQ_INT(once, total);
    uint64_t v;
    CHECK(!mound_pop(run.m, &v));
    mound_destroy(run.m);
    free(run.seen);
}

int main(void) {
    RUN_TEST(test_one_thread_matches_sorted_reference);
    RUN_TEST(test_threads_deliver_each_item_once);
    TEST_MAIN_END();
}
