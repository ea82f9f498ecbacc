/*
 * test_pq_threads.c — threaded validation of the priority queue and of the epoch-based
 * reclamation under it.
 *
 *   conservation      P producers + C consumers on random keys: every pushed value is
 *                     popped exactly once, with the key it was pushed with; none invented.
 *                     Half the producers and consumers work one item per call, half in
 *                     batches of random size (pa_pq_push_many, pa_pq_pop_items), here and
 *                     in the ordered phase.
 *   ordered_phase     pushes finish first, then C consumers pop concurrently. Each
 *                     consumer's own sequence must be strictly increasing in the queue's
 *                     order. Why: with no push in flight the content only shrinks; pops
 *                     are linearizable, so each takes the minimum of what is left at its
 *                     linearization point; one consumer's later pop linearizes later,
 *                     i.e. takes the minimum of a subset, which is >= the earlier
 *                     minimum — and keys are unique (arrival), so strictly greater.
 *   cancel_vs_pop     indexed: poppers and cancellers race over the same values; each
 *                     value is either popped or cancelled, exactly once.
 *   index_churn       indexed, a small value space, every thread pushes/pops/cancels at
 *                     random (same-value pushes race): per value, successful pushes =
 *                     pops + successful cancels + what is left, and at most one is left.
 *   ebr_*             retired objects are not freed while a reader is inside a critical
 *                     section, are freed after it leaves, and the garbage of exited threads
 *                     (orphans) is freed too — also with more live threads than static
 *                     records, and when retired from outside a critical section.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "../../src/native/epoch.h"
#include "pa_test.h"
#include "prealloc/pq.h"

/* ---- keys derived from the value, so a popped item can be checked ---- */

static double prio_of(uint64_t v) { return (double)((v * 2654435761u) % 97) - 48.0; }
static double conf_of(uint64_t v) { return (double)((v >> 3) % 3); }
static double dead_of(uint64_t v) { return (v % 5 == 0) ? NAN : (double)(v % 41); }

static bool key_matches(const pa_pq_item_t *it) {
    double d = dead_of(it->value);
    bool dl_ok = isnan(d) ? (isinf(it->deadline) && it->deadline > 0) : it->deadline == d;
    return it->priority == prio_of(it->value) && it->confidence == conf_of(it->value) && dl_ok;
}

/* strict "a comes before b" in the queue's order */
static bool item_before(const pa_pq_item_t *a, const pa_pq_item_t *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->confidence != b->confidence) return a->confidence > b->confidence;
    bool ha = !isinf(a->deadline), hb = !isinf(b->deadline);
    if (ha != hb) return ha;
    if (ha && a->deadline != b->deadline) return a->deadline < b->deadline;
    return a->arrival < b->arrival;
}

#define PQ_TEST_BATCH 40

#define VALUE(producer, i) (((uint64_t)(producer) << 32) | (uint64_t)(i))

/* ---- conservation ---- */

typedef struct shared {
    pa_pq_t *pq;
    long per_producer;
    int producers;
    atomic_int producers_done;
    atomic_int start;
} shared_t;

typedef struct consumer {
    shared_t *sh;
    uint64_t *got;
    long n;
    long bad_keys;
    long out_of_order;
    bool batches; /* pop with pa_pq_pop_items in batches of 1..PQ_TEST_BATCH */
} consumer_t;

/* Pops one batch into items (one item unless c->batches); returns how many. */
static size_t consumer_pop(consumer_t *c, pa_pq_item_t *items, uint64_t *rng) {
    if (!c->batches) return pa_pq_pop(c->sh->pq, &items[0]) == 1 ? 1 : 0;
    ssize_t n = pa_pq_pop_items(c->sh->pq, items, 1 + pa_rand_next(rng) % PQ_TEST_BATCH);
    return n > 0 ? (size_t)n : 0;
}

typedef struct producer {
    shared_t *sh;
    int id;
    long failures;
    bool batches; /* push with pa_pq_push_many in batches of 1..PQ_TEST_BATCH */
} producer_t;

static void wait_start(shared_t *sh) {
    while (!atomic_load_explicit(&sh->start, memory_order_acquire)) sched_yield();
}

static void *producer_main(void *arg) {
    producer_t *p = arg;
    shared_t *sh = p->sh;
    wait_start(sh);
    uint64_t rng = (uint64_t)(uintptr_t)p | 1;
    for (long i = 0; i < sh->per_producer;) {
        if (!p->batches) {
            uint64_t v = VALUE(p->id, i);
            if (pa_pq_push(sh->pq, v, prio_of(v), conf_of(v), dead_of(v)) != 0) p->failures++;
            i++;
            continue;
        }
        uint64_t vs[PQ_TEST_BATCH];
        double ps[PQ_TEST_BATCH], cs[PQ_TEST_BATCH], ds[PQ_TEST_BATCH];
        size_t n = 1 + pa_rand_next(&rng) % PQ_TEST_BATCH, pushed = 0;
        if ((long)n > sh->per_producer - i) n = (size_t)(sh->per_producer - i);
        for (size_t k = 0; k < n; k++) {
            vs[k] = VALUE(p->id, i + (long)k);
            ps[k] = prio_of(vs[k]);
            cs[k] = conf_of(vs[k]);
            ds[k] = dead_of(vs[k]);
        }
        if (pa_pq_push_many(sh->pq, n, vs, ps, cs, ds, &pushed) != 0 || pushed != n) p->failures++;
        i += (long)n;
    }
    atomic_fetch_add_explicit(&sh->producers_done, 1, memory_order_release);
    return NULL;
}

static void *consumer_main(void *arg) {
    consumer_t *c = arg;
    shared_t *sh = c->sh;
    wait_start(sh);
    pa_pq_item_t items[PQ_TEST_BATCH];
    uint64_t rng = (uint64_t)(uintptr_t)c | 1;
    for (;;) {
        /* acquire: pairs with the producers' release; an empty pop that starts after
         * every push has completed means everything was taken */
        bool all_pushed = atomic_load_explicit(&sh->producers_done, memory_order_acquire) == sh->producers;
        size_t n = consumer_pop(c, items, &rng);
        for (size_t k = 0; k < n; k++) {
            if (!key_matches(&items[k])) c->bad_keys++;
            c->got[c->n++] = items[k].value;
        }
        if (n > 0) continue;
        if (all_pushed) break;
        sched_yield();
    }
    return NULL;
}

/* Every value VALUE(p, i) must appear exactly once across the consumers. */
static void check_exactly_once(consumer_t *cons, int nc, int producers, long per) {
    unsigned char *seen = calloc((size_t)producers * (size_t)per, 1);
    long dup = 0, invented = 0, missing = 0;
    for (int c = 0; c < nc; c++) {
        for (long k = 0; k < cons[c].n; k++) {
            uint64_t v = cons[c].got[k];
            uint64_t p = v >> 32, i = v & 0xffffffffu;
            if (p >= (uint64_t)producers || i >= (uint64_t)per) {
                invented++;
                continue;
            }
            if (seen[p * (uint64_t)per + i]++) dup++;
        }
    }
    for (long k = 0; k < producers * per; k++)
        if (!seen[k]) missing++;
    CHECK_EQ_INT(dup, 0);
    CHECK_EQ_INT(invented, 0);
    CHECK_EQ_INT(missing, 0);
    free(seen);
}

/* Start the threads of a run; the odd-numbered ones of each kind work in batches.
 * Producers push VALUE(p, 0 .. per-1); each consumer has room for every value. */
static void start_producers(shared_t *sh, producer_t *prods, pthread_t *pt, int np) {
    for (int p = 0; p < np; p++) {
        prods[p] = (producer_t){.sh = sh, .id = p, .batches = p % 2 == 1};
        pthread_create(&pt[p], NULL, producer_main, &prods[p]);
    }
}

static void start_consumers(shared_t *sh, consumer_t *cons, pthread_t *ct, int nc, void *(*consumer_fn)(void *)) {
    for (int c = 0; c < nc; c++) {
        cons[c] = (consumer_t){.sh = sh, .got = malloc((size_t)sh->producers * (size_t)sh->per_producer * sizeof(uint64_t)),
                               .batches = c % 2 == 1};
        pthread_create(&ct[c], NULL, consumer_fn, &cons[c]);
    }
}

static void run_conservation(unsigned flags, int np, int nc, long per) {
    shared_t sh = {.per_producer = per, .producers = np};
    REQUIRE(pa_pq_create(flags, &sh.pq) == 0);
    producer_t prods[8];
    consumer_t cons[8];
    pthread_t pt[8], ct[8];
    start_consumers(&sh, cons, ct, nc, consumer_main);
    start_producers(&sh, prods, pt, np);
    atomic_store_explicit(&sh.start, 1, memory_order_release);
    for (int p = 0; p < np; p++) pthread_join(pt[p], NULL);
    for (int c = 0; c < nc; c++) pthread_join(ct[c], NULL);
    long failures = 0, bad = 0;
    for (int p = 0; p < np; p++) failures += prods[p].failures;
    for (int c = 0; c < nc; c++) bad += cons[c].bad_keys;
    CHECK_EQ_INT(failures, 0);
    CHECK_EQ_INT(bad, 0);
    check_exactly_once(cons, nc, np, per);
    CHECK_EQ_INT(pa_pq_size(sh.pq), 0);
    pa_pq_item_t it;
    CHECK(pa_pq_pop(sh.pq, &it) == 0);
    for (int c = 0; c < nc; c++) free(cons[c].got);
    pa_pq_destroy(sh.pq);
}

static void test_conservation_2x2(void) { run_conservation(0, 2, 2, pa_stress(200000)); }
static void test_conservation_4x4(void) { run_conservation(0, 4, 4, pa_stress(100000)); }
static void test_conservation_indexed_2x2(void) { run_conservation(PA_PQ_INDEXED, 2, 2, pa_stress(150000)); }
static void test_conservation_indexed_4x4(void) { run_conservation(PA_PQ_INDEXED, 4, 4, pa_stress(75000)); }

/* ---- ordered phase ---- */

static void *ordered_consumer_main(void *arg) {
    consumer_t *c = arg;
    shared_t *sh = c->sh;
    wait_start(sh);
    pa_pq_item_t prev, items[PQ_TEST_BATCH];
    uint64_t rng = (uint64_t)(uintptr_t)c | 1;
    bool have_prev = false;
    size_t n;
    while ((n = consumer_pop(c, items, &rng)) > 0) {
        for (size_t k = 0; k < n; k++) {
            if (!key_matches(&items[k])) c->bad_keys++;
            if (have_prev && !item_before(&prev, &items[k])) c->out_of_order++;
            prev = items[k];
            have_prev = true;
            c->got[c->n++] = items[k].value;
        }
    }
    return NULL;
}

static void run_ordered_phase(unsigned flags, int np, int nc, long per) {
    shared_t sh = {.per_producer = per, .producers = np};
    REQUIRE(pa_pq_create(flags, &sh.pq) == 0);
    producer_t prods[8];
    consumer_t cons[8];
    pthread_t pt[8], ct[8];
    /* phase 1: concurrent pushes, all finished (joined) before any pop */
    start_producers(&sh, prods, pt, np);
    atomic_store_explicit(&sh.start, 1, memory_order_release);
    for (int p = 0; p < np; p++) pthread_join(pt[p], NULL);
    CHECK_EQ_INT(pa_pq_size(sh.pq), np * per);
    atomic_store_explicit(&sh.start, 0, memory_order_relaxed);
    /* phase 2: concurrent pops */
    start_consumers(&sh, cons, ct, nc, ordered_consumer_main);
    atomic_store_explicit(&sh.start, 1, memory_order_release);
    long ooo = 0, bad = 0;
    for (int c = 0; c < nc; c++) {
        pthread_join(ct[c], NULL);
        ooo += cons[c].out_of_order;
        bad += cons[c].bad_keys;
    }
    CHECK_EQ_INT(ooo, 0);
    CHECK_EQ_INT(bad, 0);
    check_exactly_once(cons, nc, np, per);
    for (int c = 0; c < nc; c++) free(cons[c].got);
    pa_pq_destroy(sh.pq);
}

static void test_ordered_phase(void) {
    run_ordered_phase(0, 2, 2, pa_stress(50000));
    run_ordered_phase(0, 4, 4, pa_stress(20000));
    run_ordered_phase(PA_PQ_INDEXED, 4, 4, pa_stress(20000));
}

/* ---- cancel racing pop ---- */

typedef struct racer {
    pa_pq_t *pq;
    atomic_int *start;
    long n;
    int mode; /* 0 pop, 1 cancel ascending, 2 cancel descending */
    unsigned char *mark; /* per value: how this thread got it */
    long ok;
} racer_t;

static void *racer_main(void *arg) {
    racer_t *r = arg;
    while (!atomic_load_explicit(r->start, memory_order_acquire)) sched_yield();
    if (r->mode == 0) {
        pa_pq_item_t it;
        while (pa_pq_pop(r->pq, &it) == 1) {
            if (it.value < (uint64_t)r->n) r->mark[it.value]++;
            r->ok++;
        }
    } else {
        for (long k = 0; k < r->n; k++) {
            long v = r->mode == 1 ? k : r->n - 1 - k;
            int rc = pa_pq_cancel(r->pq, (uint64_t)v);
            if (rc == 0) {
                r->mark[v]++;
                r->ok++;
            } else if (rc != -ENOENT) {
                r->mark[v] += 100; /* an impossible answer */
            }
        }
    }
    return NULL;
}

static void test_cancel_vs_pop(void) {
    const long n = pa_stress(100000);
    for (int round = 0; round < 3; round++) {
        pa_pq_t *pq;
        REQUIRE(pa_pq_create(PA_PQ_INDEXED, &pq) == 0);
        uint64_t rng = 17 + (uint64_t)round;
        for (long v = 0; v < n; v++) REQUIRE(pa_pq_push(pq, (uint64_t)v, (double)(pa_rand_next(&rng) % 1000), 0, NAN) == 0);
        atomic_int start = 0;
        racer_t rs[4];
        pthread_t th[4];
        for (int t = 0; t < 4; t++) {
            rs[t] = (racer_t){.pq = pq, .start = &start, .n = n, .mode = t < 2 ? 0 : t - 1,
                              .mark = calloc((size_t)n, 1)};
            pthread_create(&th[t], NULL, racer_main, &rs[t]);
        }
        atomic_store_explicit(&start, 1, memory_order_release);
        long total = 0;
        for (int t = 0; t < 4; t++) {
            pthread_join(th[t], NULL);
            total += rs[t].ok;
        }
        long wrong = 0;
        for (long v = 0; v < n; v++) {
            int sum = 0;
            for (int t = 0; t < 4; t++) sum += rs[t].mark[v];
            if (sum != 1) wrong++;
        }
        CHECK_EQ_INT(wrong, 0);
        CHECK_EQ_INT(total, n);
        CHECK_EQ_INT(pa_pq_size(pq), 0);
        pa_pq_item_t it;
        CHECK(pa_pq_pop(pq, &it) == 0);
        for (int t = 0; t < 4; t++) free(rs[t].mark);
        pa_pq_destroy(pq);
    }
}

/* ---- index churn: same values pushed, popped and cancelled by everyone ---- */

#define CHURN_VALUES 64

typedef struct churner {
    pa_pq_t *pq;
    atomic_int *start;
    long ops;
    uint64_t seed;
    long push_ok[CHURN_VALUES], popped[CHURN_VALUES], cancelled[CHURN_VALUES];
    long weird;
} churner_t;

static void *churner_main(void *arg) {
    churner_t *c = arg;
    while (!atomic_load_explicit(c->start, memory_order_acquire)) sched_yield();
    uint64_t rng = c->seed;
    for (long k = 0; k < c->ops; k++) {
        uint64_t r = pa_rand_next(&rng);
        uint64_t v = (r >> 8) % CHURN_VALUES;
        int rc;
        pa_pq_item_t it;
        switch (r % 3) {
        case 0:
            rc = pa_pq_push(c->pq, v, (double)((r >> 20) % 4), 0.0, NAN);
            if (rc == 0) c->push_ok[v]++;
            else if (rc != -EEXIST) c->weird++;
            break;
        case 1:
            if (pa_pq_pop(c->pq, &it) == 1) {
                if (it.value < CHURN_VALUES) c->popped[it.value]++;
                else c->weird++;
            }
            break;
        default:
            rc = pa_pq_cancel(c->pq, v);
            if (rc == 0) c->cancelled[v]++;
            else if (rc != -ENOENT) c->weird++;
        }
    }
    return NULL;
}

static void test_index_churn(void) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(PA_PQ_INDEXED, &pq) == 0);
    atomic_int start = 0;
    enum { T = 4 };
    churner_t *cs = calloc(T, sizeof *cs);
    pthread_t th[T];
    for (int t = 0; t < T; t++) {
        cs[t].pq = pq;
        cs[t].start = &start;
        cs[t].ops = pa_stress(400000);
        cs[t].seed = 1234567 + (uint64_t)t * 7777;
        pthread_create(&th[t], NULL, churner_main, &cs[t]);
    }
    atomic_store_explicit(&start, 1, memory_order_release);
    for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
    long left[CHURN_VALUES] = {0};
    size_t size_before = pa_pq_size(pq);
    size_t drained = 0;
    pa_pq_item_t it;
    while (pa_pq_pop(pq, &it) == 1) {
        REQUIRE(it.value < CHURN_VALUES);
        left[it.value]++;
        drained++;
    }
    CHECK_EQ_INT(size_before, drained);
    long unbalanced = 0, dup = 0, weird = 0;
    for (int v = 0; v < CHURN_VALUES; v++) {
        long pushes = 0, outs = 0;
        for (int t = 0; t < T; t++) {
            pushes += cs[t].push_ok[v];
            outs += cs[t].popped[v] + cs[t].cancelled[v];
        }
        if (pushes != outs + left[v]) unbalanced++;
        if (left[v] > 1) dup++;
    }
    for (int t = 0; t < T; t++) weird += cs[t].weird;
    CHECK_EQ_INT(unbalanced, 0);
    CHECK_EQ_INT(dup, 0);
    CHECK_EQ_INT(weird, 0);
    free(cs);
    pa_pq_destroy(pq);
}

/* ---- epoch-based reclamation ---- */

static atomic_long ebr_freed;

typedef struct garbage {
    pa__ebr_link_t link;
    long payload;
} garbage_t;

static void garbage_free(pa__ebr_link_t *link) {
    atomic_fetch_add_explicit(&ebr_freed, 1, memory_order_relaxed);
    free(link); /* link is the first member */
}

static void retire_new_garbage(long n) {
    pa__ebr_thread_t *self = pa__ebr_enter();
    REQUIRE(self != NULL);
    for (long i = 0; i < n; i++) {
        garbage_t *g = malloc(sizeof *g);
        g->payload = i;
        pa__ebr_retire(self, &g->link, garbage_free);
    }
    pa__ebr_exit(self);
}

typedef struct reader {
    atomic_int entered, release, done;
} reader_t;

static void *reader_main(void *arg) {
    reader_t *r = arg;
    pa__ebr_thread_t *self = pa__ebr_enter();
    if (!self) return NULL;
    atomic_store_explicit(&r->entered, 1, memory_order_release);
    while (!atomic_load_explicit(&r->release, memory_order_acquire)) sched_yield();
    pa__ebr_exit(self);
    atomic_store_explicit(&r->done, 1, memory_order_release);
    return NULL;
}

/* Nothing retired while a reader sits in a critical section is freed before it leaves. */
static void test_ebr_reader_blocks_free(void) {
    pa__ebr_barrier();
    reader_t r = {0};
    pthread_t th;
    pthread_create(&th, NULL, reader_main, &r);
    while (!atomic_load_explicit(&r.entered, memory_order_acquire)) sched_yield();
    long before = atomic_load(&ebr_freed);
    retire_new_garbage(100);
    for (int i = 0; i < 50; i++) {
        pa__ebr_flush(); /* never blocks; must not free past the reader */
        retire_new_garbage(1);
    }
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, 0);
    CHECK(pa__ebr_pending_local() >= 150);
    atomic_store_explicit(&r.release, 1, memory_order_release);
    pthread_join(th, NULL);
    pa__ebr_barrier();
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, 150);
    CHECK_EQ_INT(pa__ebr_pending_local(), 0);
}

static void *retiring_thread_main(void *arg) {
    retire_new_garbage((long)(intptr_t)arg);
    return NULL; /* exits with its garbage still in limbo: it becomes orphaned */
}

/* Threads that exit hand their garbage over; none of it is lost. More threads than the
 * static records, one after the other, so records get reused. */
static void test_ebr_orphans(void) {
    pa__ebr_barrier();
    long before = atomic_load(&ebr_freed);
    long total = 0;
    for (int round = 0; round < 100; round++) {
        pthread_t th[2];
        for (int t = 0; t < 2; t++) pthread_create(&th[t], NULL, retiring_thread_main, (void *)(intptr_t)(10 + t));
        for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
        total += 21;
    }
    pa__ebr_barrier();
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, total);
    CHECK_EQ_INT(pa__ebr_pending_orphans(), 0);
}

/* More live threads than the reclaimer's static records (64): the rest are malloc'ed,
 * and everything they retire is still freed after they exit. */
typedef struct crowd {
    atomic_int registered, release;
} crowd_t;

static void *crowd_member_main(void *arg) {
    crowd_t *c = arg;
    pa__ebr_thread_t *self = pa__ebr_enter();
    if (!self) return NULL;
    garbage_t *g = malloc(sizeof *g);
    pa__ebr_retire(self, &g->link, garbage_free);
    pa__ebr_exit(self);
    atomic_fetch_add_explicit(&c->registered, 1, memory_order_release);
    while (!atomic_load_explicit(&c->release, memory_order_acquire)) sched_yield();
    return NULL;
}

static void test_ebr_many_threads(void) {
    enum { N = 80 };
    pa__ebr_barrier();
    long before = atomic_load(&ebr_freed);
    crowd_t c = {0};
    pthread_t th[N];
    int started = 0;
    for (int t = 0; t < N; t++)
        if (pthread_create(&th[t], NULL, crowd_member_main, &c) == 0) started++;
    while (atomic_load_explicit(&c.registered, memory_order_acquire) < started) sched_yield();
    atomic_store_explicit(&c.release, 1, memory_order_release);
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    CHECK(started > 64);
    pa__ebr_barrier();
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, started);
}

/* Retiring from outside a critical section opens one for the occasion. */
static void test_ebr_retire_outside_section(void) {
    pa__ebr_barrier();
    long before = atomic_load(&ebr_freed);
    for (int i = 0; i < 10; i++) {
        garbage_t *g = malloc(sizeof *g);
        pa__ebr_retire(NULL, &g->link, garbage_free);
    }
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, 0); /* not freed on the spot */
    pa__ebr_barrier();
    CHECK_EQ_INT(atomic_load(&ebr_freed) - before, 10);
}

int main(void) {
    RUN_TEST(test_conservation_2x2);
    RUN_TEST(test_conservation_4x4);
    RUN_TEST(test_conservation_indexed_2x2);
    RUN_TEST(test_conservation_indexed_4x4);
    RUN_TEST(test_ordered_phase);
    RUN_TEST(test_cancel_vs_pop);
    RUN_TEST(test_index_churn);
    RUN_TEST(test_ebr_reader_blocks_free);
    RUN_TEST(test_ebr_orphans);
    RUN_TEST(test_ebr_many_threads);
    RUN_TEST(test_ebr_retire_outside_section);
    TEST_MAIN_END();
}
