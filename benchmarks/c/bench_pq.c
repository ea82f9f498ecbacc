/*
 * bench_pq.c — throughput of the lock-free priority queue (prealloc/pq.h) against what a
 * user would write instead: a binary heap with the same key under a pthread mutex, and the
 * same heap under a test-and-test-and-set spinlock; and the published alternative to our
 * skiplist, Liu & Spear's mound in its locking variant (mound.h, benchmark code only).
 *
 * Workload: the queue is prefilled with `size` random items; then each of T threads
 * alternates push (a random key) and pop for `ops` operations, so the size stays put.
 * Reported: total operations per second (median of `reps` runs; each run's clock starts
 * when all threads are released and stops when the last finishes) and the median over the
 * repetitions of the ratio to the mutex heap's rate in the same repetition (the
 * implementations take turns, so background load hits both sides of each ratio). Both the unindexed queue (what the engine
 * uses) and the indexed one (values indexed for cancel) are measured.
 *
 * Then, one thread: fill an empty queue with `size` random items and drain it, per item —
 * the mutex heap item by item, our queue item by item and with the batch calls
 * (pa_pq_push_many / pa_pq_pop_many, the path of the Python batch calls), the last also on
 * a queue filled and drained once before (recycled nodes, as in a long-lived queue).
 *
 * Then the engine's shape: one producer thread pushes, one consumer thread pops (split).
 *
 * Usage: bench_pq [--threads 1,2,4] [--sizes 1000,1000000] [--ops N] [--reps R] [--only TEXT]
 *                 [--parts mixed,split,fill]
 * (--only runs the mutex heap and the implementations whose name contains TEXT; --parts
 * picks the workloads, all three by default; --parts profile runs one fill-then-drain of one
 * implementation for valgrind, item by item; --parts profile-batch the same with the batch
 * calls; --parts profile-reused the batch calls twice on one queue, so that the second fill
 * takes recycled nodes — its counts are this run's minus profile-batch's)
 * Defaults: threads 1, 2 and powers of two up to twice the online CPUs; sizes 1e3 and 1e6;
 * ops 200000 per thread; reps 5.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "atomics.h"
#include "bench_util.h"
#include "mound.h"
#include "prealloc/pq.h"

/* Built with -DPA_PQ_STATS (and pq.c with it, see README): after each pq run, the
 * contention counters per operation. */
#ifdef PA_PQ_STATS
void pa__pq_stats(uint64_t *out, bool reset);
static void print_stats(const char *what, double ops) {
    uint64_t s[6];
    pa__pq_stats(s, true);
    printf("    stats %s: per op: level-0 insert CAS failures %.4f, upper-level CAS failures %.4f, lost claims "
           "%.4f, cuts %.4f (failed %.4f), nodes walked by pops %.2f\n",
           what, s[0] / ops, s[1] / ops, s[2] / ops, s[3] / ops, s[4] / ops, s[5] / ops);
}
static void reset_stats(void) {
    uint64_t s[6];
    pa__pq_stats(s, true);
}
#else
static void print_stats(const char *what, double ops) { (void)what, (void)ops; }
static void reset_stats(void) {}
#endif

/* ---- the baselines: a binary heap keyed exactly like the queue ---- */

static inline uint64_t enc_asc(double d) {
    if (d == 0.0) d = 0.0;
    uint64_t u = pa__double_bits(d);
    return (u >> 63) ? ~u : u | (1ull << 63);
}

/* "no deadline" (NaN, +inf) sorts after every deadline */
static inline uint64_t deadline_word(double d) { return (isnan(d) || isinf(d)) ? UINT64_MAX : enc_asc(d); }

typedef struct heap_entry {
    uint64_t k[4];
    uint64_t value;
} heap_entry_t;

static inline bool entry_less(const heap_entry_t *a, const heap_entry_t *b) {
    if (a->k[0] != b->k[0]) return a->k[0] < b->k[0];
    if (a->k[1] != b->k[1]) return a->k[1] < b->k[1];
    if (a->k[2] != b->k[2]) return a->k[2] < b->k[2];
    return a->k[3] < b->k[3];
}

typedef struct heap {
    heap_entry_t *a;
    size_t n, cap;
    uint64_t arrival;
} heap_t;

static int heap_push(heap_t *h, uint64_t value, double p, double c, double d) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 1024;
        heap_entry_t *a = realloc(h->a, cap * sizeof *a);
        if (!a) return -ENOMEM;
        h->a = a;
        h->cap = cap;
    }
    heap_entry_t e = {{~enc_asc(p), ~enc_asc(c), deadline_word(d), h->arrival++}, value};
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!entry_less(&e, &h->a[parent])) break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = e;
    return 0;
}

static bool heap_pop(heap_t *h, uint64_t *value) {
    if (!h->n) return false;
    *value = h->a[0].value;
    heap_entry_t last = h->a[--h->n];
    size_t i = 0, n = h->n;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= n) break;
        size_t m = (l + 1 < n && entry_less(&h->a[l + 1], &h->a[l])) ? l + 1 : l;
        if (!entry_less(&h->a[m], &last)) break;
        h->a[i] = h->a[m];
        i = m;
    }
    if (n) h->a[i] = last;
    return true;
}

typedef struct mutex_heap {
    pthread_mutex_t mu;
    heap_t h;
} mutex_heap_t;

typedef struct spin_heap {
    PA_CACHE_ALIGNED _Atomic uint32_t locked;
    heap_t h;
} spin_heap_t;

static void spin_lock(spin_heap_t *s) {
    for (;;) {
        /* acq_rel exchange: acquire pairs with spin_unlock's release */
        if (!pa__exchange_acq_rel(&s->locked, 1)) return;
        while (pa__load_relaxed(&s->locked)) pa__cpu_relax(); /* test before test-and-set */
    }
}
static void spin_unlock(spin_heap_t *s) { pa__store_release(&s->locked, 0); /* pairs with spin_lock */ }

/* ---- the implementations behind one interface ---- */

typedef struct impl {
    const char *name;
    void *(*create)(void);
    void (*destroy)(void *);
    int (*push)(void *, uint64_t, double, double, double);
    bool (*pop)(void *, uint64_t *);
} impl_t;

static void *pq_create_plain(void) {
    pa_pq_t *q;
    return pa_pq_create(0, &q) == 0 ? q : NULL;
}
static void *pq_create_indexed(void) {
    pa_pq_t *q;
    return pa_pq_create(PA_PQ_INDEXED, &q) == 0 ? q : NULL;
}
static void pq_destroy_any(void *q) { pa_pq_destroy(q); }
static int pq_push_any(void *q, uint64_t v, double p, double c, double d) { return pa_pq_push(q, v, p, c, d); }
static bool pq_pop_any(void *q, uint64_t *v) {
    pa_pq_item_t it;
    if (!pa_pq_pop(q, &it)) return false;
    *v = it.value;
    return true;
}

static void *mh_create(void) {
    mutex_heap_t *m = calloc(1, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    return m;
}
static void mh_destroy(void *p) {
    mutex_heap_t *m = p;
    pthread_mutex_destroy(&m->mu);
    free(m->h.a);
    free(m);
}
static int mh_push(void *p, uint64_t v, double pr, double c, double d) {
    mutex_heap_t *m = p;
    pthread_mutex_lock(&m->mu);
    int rc = heap_push(&m->h, v, pr, c, d);
    pthread_mutex_unlock(&m->mu);
    return rc;
}
static bool mh_pop(void *p, uint64_t *v) {
    mutex_heap_t *m = p;
    pthread_mutex_lock(&m->mu);
    bool ok = heap_pop(&m->h, v);
    pthread_mutex_unlock(&m->mu);
    return ok;
}

static void *sh_create(void) {
    spin_heap_t *s = aligned_alloc(PA_CACHE_LINE, sizeof *s);
    memset(s, 0, sizeof *s);
    return s;
}
static void sh_destroy(void *p) {
    spin_heap_t *s = p;
    free(s->h.a);
    free(s);
}
static int sh_push(void *p, uint64_t v, double pr, double c, double d) {
    spin_heap_t *s = p;
    spin_lock(s);
    int rc = heap_push(&s->h, v, pr, c, d);
    spin_unlock(s);
    return rc;
}
static bool sh_pop(void *p, uint64_t *v) {
    spin_heap_t *s = p;
    spin_lock(s);
    bool ok = heap_pop(&s->h, v);
    spin_unlock(s);
    return ok;
}

static void *mound_create_any(void) { return mound_create(); }
static void mound_destroy_any(void *m) { mound_destroy(m); }
static int mound_push_any(void *m, uint64_t v, double p, double c, double d) {
    const uint64_t key3[3] = {~enc_asc(p), ~enc_asc(c), deadline_word(d)};
    return mound_push(m, v, key3);
}
static bool mound_pop_any(void *m, uint64_t *v) { return mound_pop(m, v); }

static const impl_t impls[] = {
    {"mutex heap", mh_create, mh_destroy, mh_push, mh_pop},
    {"spinlock heap", sh_create, sh_destroy, sh_push, sh_pop},
    {"pq (unindexed)", pq_create_plain, pq_destroy_any, pq_push_any, pq_pop_any},
    {"pq (indexed)", pq_create_indexed, pq_destroy_any, pq_push_any, pq_pop_any},
    /* Liu & Spear's mound (mound.h), the published alternative, locking variant */
    {"mound (locks)", mound_create_any, mound_destroy_any, mound_push_any, mound_pop_any},
};
#define IMPL_MOUND 4
#define NIMPL (sizeof impls / sizeof impls[0])

/* ---- the workload ---- */

/* Random keys: a continuous priority (few ties), a coarse confidence, a deadline for 3 of 4. */
static inline void random_key(uint64_t *rng, double *p, double *c, double *d) {
    uint64_t r = bench_rand(rng);
    *p = (double)(r >> 11) * (1.0 / 9007199254740992.0);
    *c = (double)(r & 3) * 0.25;
    *d = (r & 0x30) ? (double)((r >> 8) & 0xffff) : NAN;
}

typedef struct run {
    const impl_t *impl;
    void *q;
    long ops;
    int threads;
    _Atomic int ready;
    _Atomic int go;
} run_t;

typedef struct worker {
    run_t *run;
    int id;
    uint64_t next_value;
    long failures;
} worker_t;

static void *worker_main(void *arg) {
    worker_t *w = arg;
    run_t *r = w->run;
    uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(w->id + 1) + w->next_value;
    pa__fetch_add_acq_rel(&r->ready, 1);
    while (!pa__load_acquire(&r->go)) pa__cpu_relax(); /* pairs with the release in run_once */
    const impl_t *im = r->impl;
    void *q = r->q;
    for (long i = 0; i < r->ops; i += 2) {
        double p, c, d;
        random_key(&rng, &p, &c, &d);
        /* values unique per thread (the indexed queue requires unique queued values) */
        if (im->push(q, ((uint64_t)(w->id + 1) << 40) | w->next_value++, p, c, d) != 0) w->failures++;
        uint64_t v;
        if (!im->pop(q, &v)) w->failures++;
    }
    return NULL;
}

static uint64_t value_epoch = 1; /* keeps values unique across runs on one queue */

static double run_once(const impl_t *im, void *q, int threads, long ops, long *failures) {
    run_t r = {.impl = im, .q = q, .ops = ops, .threads = threads};
    pthread_t th[threads];
    worker_t ws[threads];
    for (int t = 0; t < threads; t++) {
        ws[t] = (worker_t){.run = &r, .id = t, .next_value = value_epoch};
        pthread_create(&th[t], NULL, worker_main, &ws[t]);
    }
    while (pa__load_acquire(&r.ready) < threads) sched_yield(); /* pairs with the workers' fetch_add */
    double t0 = now_s();
    pa__store_release(&r.go, 1);
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
    double dt = now_s() - t0;
    value_epoch += (uint64_t)ops;
    for (int t = 0; t < threads; t++) *failures += ws[t].failures;
    return (double)ops * threads / dt / 1e6;
}

/* ---- the engine's shape: one thread pushes, another pops ---- */

typedef struct split_run {
    const impl_t *impl;
    void *q;
    long items;
    _Atomic int ready;
    _Atomic int go;
    long empty_pops; /* consumer polls that found the queue empty */
    long failures;
} split_run_t;

static void split_wait_go(split_run_t *r) {
    pa__fetch_add_acq_rel(&r->ready, 1);
    while (!pa__load_acquire(&r->go)) pa__cpu_relax(); /* pairs with the release in split_once */
}

static void *split_producer(void *arg) {
    split_run_t *r = arg;
    uint64_t rng = 0xC0FFEEull ^ (uint64_t)r->items;
    split_wait_go(r);
    for (long i = 0; i < r->items; i++) {
        double p, c, d;
        random_key(&rng, &p, &c, &d);
        if (r->impl->push(r->q, (uint64_t)i | (1ull << 62), p, c, d) != 0) r->failures++;
    }
    return NULL;
}

static void *split_consumer(void *arg) {
    split_run_t *r = arg;
    split_wait_go(r);
    long got = 0, empty = 0;
    while (got < r->items) {
        uint64_t v;
        if (r->impl->pop(r->q, &v)) got++;
        else empty++;
    }
    r->empty_pops = empty;
    return NULL;
}

/* Million items moved per second from the producer to the consumer (the queue holds its
 * prefill throughout, plus whatever the producer is ahead). */
static double split_once(const impl_t *im, void *q, long items, long *failures, long *empty) {
    split_run_t r = {.impl = im, .q = q, .items = items};
    pthread_t prod, cons;
    pthread_create(&prod, NULL, split_producer, &r);
    pthread_create(&cons, NULL, split_consumer, &r);
    while (pa__load_acquire(&r.ready) < 2) sched_yield(); /* pairs with split_wait_go */
    double t0 = now_s();
    pa__store_release(&r.go, 1);
    pthread_join(prod, NULL);
    pthread_join(cons, NULL);
    double dt = now_s() - t0;
    *failures += r.failures;
    *empty += r.empty_pops;
    return (double)items / dt / 1e6;
}

static void bench_split(const long *sizes, int nsizes, long ops, long reps, long *failures) {
    printf("\nproducer/consumer split (the engine's shape): one thread pushes ops random items, another pops\n"
           "ops items, on a queue prefilled with N; million items moved per second\n");
    printf("%-9s %-16s %9s %9s %12s\n", "N", "implementation", "Mitems/s", "vs mutex", "empty polls");
    static const int kinds[] = {0, 1, 2, IMPL_MOUND};
    enum { KINDS = 4, MAX_REPS = 64 };
    for (int si = 0; si < nsizes; si++) {
        void *qs[KINDS];
        for (int k = 0; k < KINDS; k++) {
            qs[k] = impls[kinds[k]].create();
            if (!qs[k]) exit(1);
            uint64_t rng = 4242;
            for (long i = 0; i < sizes[si]; i++) {
                double p, c, d;
                random_key(&rng, &p, &c, &d);
                if (impls[kinds[k]].push(qs[k], (uint64_t)i, p, c, d) != 0) (*failures)++;
            }
        }
        long nr = reps < MAX_REPS ? reps : MAX_REPS;
        double rate[KINDS][MAX_REPS], ratio[KINDS][MAX_REPS];
        long empty[KINDS] = {0};
        for (long r = 0; r < nr; r++)
            for (int k = 0; k < KINDS; k++) {
                if (r == nr - 1) reset_stats(); /* the stats cover the last repetition */
                rate[k][r] = split_once(&impls[kinds[k]], qs[k], ops, failures, &empty[k]);
                if (kinds[k] == 2 && r == nr - 1) print_stats("split", 2.0 * (double)ops);
                ratio[k][r] = rate[k][r] / rate[0][r];
            }
        for (int k = 0; k < KINDS; k++) {
            qsort(rate[k], (size_t)nr, sizeof(double), compare_double);
            qsort(ratio[k], (size_t)nr, sizeof(double), compare_double);
            printf("%-9ld %-16s %9.2f %8.2fx %12ld\n", sizes[si], impls[kinds[k]].name, rate[k][nr / 2],
                   ratio[k][nr / 2], empty[k] / nr);
            impls[kinds[k]].destroy(qs[k]);
        }
        fflush(stdout);
    }
}

/* ---- fill then drain, one thread ---- */

typedef struct batch_items {
    uint64_t *values;
    double *p, *c, *d;
} batch_items_t;

/* ns per item to push all n items and pop them again: mode 0 = im item by item, mode 1 =
 * our batch calls (im must be a pq), mode 2 = the batch calls on a queue filled and
 * drained once before (untimed: its nodes are then recycled ones, as in a long-lived
 * queue), mode 3 = pa_pq_push_all and pa_pq_pop_many (im must be an indexed pq) */
static double fill_drain_ns(const impl_t *im, const batch_items_t *it, long n, int mode, long *failures) {
    void *q = im->create();
    uint64_t *out = malloc((size_t)n * sizeof *out);
    if (!q || !out) exit(1);
    if (mode == 2) {
        size_t pushed = 0;
        if (pa_pq_push_many(q, (size_t)n, it->values, it->p, it->c, it->d, &pushed) != 0) (*failures)++;
        if (pa_pq_pop_many(q, out, (size_t)n) != (size_t)n) (*failures)++;
    }
    double t0 = now_s();
    if (mode == 0) {
        for (long i = 0; i < n; i++)
            if (im->push(q, it->values[i], it->p[i], it->c[i], it->d[i]) != 0) (*failures)++;
        for (long i = 0; i < n; i++)
            if (!im->pop(q, &out[i])) (*failures)++;
    } else if (mode == 3) {
        if (pa_pq_push_all(q, (size_t)n, it->values, it->p, it->c, it->d, NULL, NULL) != 0) (*failures)++;
        if (pa_pq_pop_many(q, out, (size_t)n) != (size_t)n) (*failures)++;
    } else {
        size_t pushed = 0;
        if (pa_pq_push_many(q, (size_t)n, it->values, it->p, it->c, it->d, &pushed) != 0) (*failures)++;
        if (pa_pq_pop_many(q, out, (size_t)n) != (size_t)n) (*failures)++;
    }
    double dt = now_s() - t0;
    im->destroy(q);
    free(out);
    return dt * 1e9 / (double)n;
}

/* For valgrind (cachegrind / callgrind): one fill-then-drain, item by item, of the first
 * implementation whose name contains `only` (default the unindexed pq), per size; nothing
 * else runs, so the counts divide by 2N into per-operation figures. */
static void profile_fill_drain(const long *sizes, int nsizes, const char *only, int mode, long *failures) {
    const impl_t *im = &impls[2];
    for (size_t k = 0; only && k < NIMPL; k++)
        if (strstr(impls[k].name, only)) {
            im = &impls[k];
            break;
        }
    for (int si = 0; si < nsizes; si++) {
        long n = sizes[si];
        batch_items_t it = {malloc((size_t)n * 8), malloc((size_t)n * 8), malloc((size_t)n * 8), malloc((size_t)n * 8)};
        if (!it.values || !it.p || !it.c || !it.d) exit(1);
        uint64_t rng = 777;
        for (long i = 0; i < n; i++) {
            it.values[i] = (uint64_t)i + 1;
            random_key(&rng, &it.p[i], &it.c[i], &it.d[i]);
        }
        printf("profile: %s%s, fill then drain %ld items: %.1f ns/item\n", im->name,
               mode == 2 ? ", batch calls, filled and drained once before" : mode ? ", batch calls" : "", n,
               fill_drain_ns(im, &it, n, mode, failures));
        free(it.values);
        free(it.p);
        free(it.c);
        free(it.d);
    }
}

static void bench_fill_drain(const long *sizes, int nsizes, long reps, long *failures) {
    printf("\nfill an empty queue with N random items, then drain it; one thread, ns per item (push + pop)\n");
    printf("%-9s %-34s %9s %9s\n", "N", "implementation", "ns/item", "vs mutex");
    static const struct {
        const char *name;
        int impl, mode;
    } kinds[] = {{"mutex heap, per item", 0, 0}, {"pq (unindexed), per item", 2, 0},
                 {"pq (unindexed), batch calls", 2, 1}, {"pq (indexed), push_many, pop_many", 3, 1},
                 {"pq (indexed), push_all, pop_many", 3, 3},
                 {"pq (unindexed), batch, refill", 2, 2}, {"mound (locks), per item", IMPL_MOUND, 0}};
    enum { KINDS = sizeof kinds / sizeof kinds[0], MAX_REPS = 64 };
    for (int si = 0; si < nsizes; si++) {
        long n = sizes[si];
        batch_items_t it = {malloc((size_t)n * 8), malloc((size_t)n * 8), malloc((size_t)n * 8), malloc((size_t)n * 8)};
        if (!it.values || !it.p || !it.c || !it.d) exit(1);
        uint64_t rng = 777;
        for (long i = 0; i < n; i++) {
            it.values[i] = (uint64_t)i + 1;
            random_key(&rng, &it.p[i], &it.c[i], &it.d[i]);
        }
        long nr = reps < MAX_REPS ? reps : MAX_REPS;
        double ns[KINDS][MAX_REPS], ratio[KINDS][MAX_REPS];
        for (long r = 0; r < nr; r++) /* the kinds take turns: load hits all of them alike */
            for (int k = 0; k < KINDS; k++) {
                ns[k][r] = fill_drain_ns(&impls[kinds[k].impl], &it, n, kinds[k].mode, failures);
                ratio[k][r] = ns[0][r] / ns[k][r];
            }
        for (int k = 0; k < KINDS; k++) {
            qsort(ns[k], (size_t)nr, sizeof(double), compare_double);
            qsort(ratio[k], (size_t)nr, sizeof(double), compare_double);
            printf("%-9ld %-34s %9.1f %8.2fx\n", n, kinds[k].name, ns[k][nr / 2], ratio[k][nr / 2]);
        }
        free(it.values);
        free(it.p);
        free(it.c);
        free(it.d);
    }
}

static int parse_list(const char *s, long *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        double v = strtod(s, &end); /* accepts 1e6 */
        if (end == s) break;
        out[n++] = (long)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

int main(int argc, char **argv) {
    long threads[16], sizes[8];
    int nthreads = 0, nsizes = 0;
    long ops = 200000, reps = 5;
    const char *only = NULL, *parts = "mixed,split,fill";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) nthreads = parse_list(argv[i + 1], threads, 16);
        else if (!strcmp(argv[i], "--sizes")) nsizes = parse_list(argv[i + 1], sizes, 8);
        else if (!strcmp(argv[i], "--ops")) ops = (long)strtod(argv[i + 1], NULL);
        else if (!strcmp(argv[i], "--reps")) reps = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--only")) only = argv[i + 1];
        else if (!strcmp(argv[i], "--parts")) parts = argv[i + 1];
        else {
            fprintf(stderr, "usage: %s [--threads 1,2,4] [--sizes 1000,1e6] [--ops N] [--reps R] [--only TEXT] [--parts mixed,split,fill]\n",
                    argv[0]);
            return 2;
        }
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (!nthreads) {
        threads[nthreads++] = 1;
        threads[nthreads++] = 2;
        for (long t = 4; t <= 2 * cpus && nthreads < 16; t *= 2) threads[nthreads++] = t;
    }
    if (!nsizes) {
        sizes[nsizes++] = 1000;
        sizes[nsizes++] = 1000000;
    }
    if (ops < 2) ops = 2;
    if (reps < 1) reps = 1;
    printf("bench_pq: each thread alternates push(random key) / pop on a prefilled queue\n");
    printf("%ld ops per thread, median of %ld runs (ratio: median of per-run ratios), %ld online CPUs\n\n", ops,
           reps, cpus);
    printf("%-9s %-7s %-16s %9s %9s\n", "size", "threads", "implementation", "Mops/s", "vs mutex");
    long failures = 0;
    for (int si = 0; si < nsizes && strstr(parts, "mixed"); si++) {
        void *qs[NIMPL];
        for (size_t k = 0; k < NIMPL; k++) {
            qs[k] = impls[k].create();
            if (!qs[k]) {
                fprintf(stderr, "cannot create %s\n", impls[k].name);
                return 1;
            }
            uint64_t rng = 12345;
            for (long i = 0; i < sizes[si]; i++) {
                double p, c, d;
                random_key(&rng, &p, &c, &d);
                if (impls[k].push(qs[k], (uint64_t)i, p, c, d) != 0) failures++;
            }
        }
        for (int ti = 0; ti < nthreads; ti++) {
            /* The implementations take turns within each repetition, and each ratio is
             * taken within one repetition: load from elsewhere on the machine then shifts
             * both sides of a ratio alike. */
            enum { MAX_REPS = 64 };
            double rates[NIMPL][MAX_REPS], ratios[NIMPL][MAX_REPS];
            long n = reps < MAX_REPS ? reps : MAX_REPS;
            for (long r = 0; r < n; r++) {
                for (size_t k = 0; k < NIMPL; k++) {
                    if (k > 0 && only && !strstr(impls[k].name, only)) continue;
                    if (r == n - 1) reset_stats(); /* the stats cover the last repetition */
                    rates[k][r] = run_once(&impls[k], qs[k], (int)threads[ti], ops, &failures);
                    if ((k == 2 || k == 3) && r == n - 1) print_stats(impls[k].name, (double)ops * (double)threads[ti]);
                    ratios[k][r] = rates[k][r] / rates[0][r];
                }
            }
            for (size_t k = 0; k < NIMPL; k++) {
                if (k > 0 && only && !strstr(impls[k].name, only)) continue;
                qsort(rates[k], (size_t)n, sizeof(double), compare_double);
                qsort(ratios[k], (size_t)n, sizeof(double), compare_double);
                printf("%-9ld %-7ld %-16s %9.2f %8.2fx\n", sizes[si], threads[ti], impls[k].name, rates[k][n / 2],
                       ratios[k][n / 2]);
            }
            fflush(stdout);
        }
        for (size_t k = 0; k < NIMPL; k++) impls[k].destroy(qs[k]);
    }
    if (strstr(parts, "profile"))
        profile_fill_drain(sizes, nsizes, only,
                           strstr(parts, "profile-reused") ? 2 : strstr(parts, "profile-batch") ? 1 : 0, &failures);
    if (strstr(parts, "split")) bench_split(sizes, nsizes, ops, reps, &failures);
    if (strstr(parts, "fill")) bench_fill_drain(sizes, nsizes, reps, &failures);
    if (failures) printf("\n%ld operations failed (pop found the queue empty or push errored)\n", failures);
    printf("\ntargets: pq >= 1.0x the mutex heap at 2 threads, >= 0.6x at 1 thread\n");
    return failures ? 1 : 0;
}
