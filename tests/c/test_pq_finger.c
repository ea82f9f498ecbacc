/*
 * test_pq_finger.c — white-box test of the sorted batch push and its finger search (pq.c,
 * "Finger search"): this file compiles src/native/pq.c itself (public functions renamed,
 * as test_pq_retire.c does) with PA_PQ_DEBUG (freed nodes poisoned, every node a search
 * reaches checked; a finger run out of key order aborts) and a hook that checks, at every
 * retire, that the node is unreachable from head at every level.
 *
 * After each phase the queue is quiescent and its shape is checked against the invariants
 * the insert's safety argument rests on: every upper level is a subsequence of level 0 in
 * level-0 order, a node linked at level i + 1 is linked at level i, the deleted nodes are a
 * prefix of level 0 and come before every live node at every level, and the live nodes are
 * in key order. Values are unique, and every pushed value is popped exactly once.
 *
 * Workloads: two threads pushing batches of 1..700 items (both the chunk path, <= 256, and
 * the sorted group path, > 256) while two threads pop (one by one and in batches), with the
 * queue kept small so that the deleted prefix, cuts and restructures run under the
 * pushes; and a sequential case where a batch lands behind a deleted prefix whose last node
 * holds a stale, large key (the case of the insert's `del` rule).
 */
#define _GNU_SOURCE
#define PA_PQ_DEBUG 1
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>

struct pq_op;
struct pq_node;
static void retire_check(struct pq_op *op, struct pq_node *n);
#define PQ_RETIRE_HOOK(op, n) retire_check((op), (n))
struct pa_pq;
static void group_hook(struct pa_pq *pq);
#define PQ_GROUP_HOOK(pq) group_hook(pq)

#include "pq_whitebox.h"

#include "pa_test.h"

static atomic_long reachable_retires, checked_retires;

static void retire_check(struct pq_op *op, struct pq_node *n) {
    pa_pq_t *pq = op->pq;
    atomic_fetch_add_explicit(&checked_retires, 1, memory_order_relaxed);
    for (int i = 0; i < PQ_MAX_LEVEL; i++) {
        long steps = 0;
        /* acquire: as in the queue's own traversals */
        for (pq_node_t *x = unmark(pa__load_acquire(next_at(pq->head, i))); x != pq->tail && steps < 1000000;
             x = unmark(pa__load_acquire(next_at(x, i))), steps++) {
            if (x == n) {
                if (atomic_fetch_add(&reachable_retires, 1) < 3)
                    fprintf(stderr, "retired node reachable from head at level %d after %ld steps\n", i, steps);
                return;
            }
        }
    }
}

/* The shape invariants (quiescent queue, one thread). Returns the number of violations. */
static long shape_violations(pa_pq_t *pq) {
    enum { MAXN = 1 << 16 };
    static pq_node_t *order[MAXN];
    static bool deleted[MAXN];
    static uint32_t at_level[MAXN]; /* bit i: reached at level i */
    long bad = 0, n = 0;
    bool live_seen = false;
    for (pq_node_t *x = pq->head;;) {
        uintptr_t raw = pa__load_acquire(&x->next0);
        pq_node_t *y = unmark(raw);
        if (y == pq->tail) break;
        if (n == MAXN) return bad + 1;
        order[n] = y;
        deleted[n] = is_marked(raw);
        at_level[n] = 1;
        if (deleted[n] && live_seen) {
            if (bad++ < 3) fprintf(stderr, "level 0: deleted node %ld after a live one\n", n);
        }
        if (!deleted[n]) {
            if (live_seen && !key_less(order[n - 1]->key, y->key)) {
                if (bad++ < 3) fprintf(stderr, "level 0: live node %ld out of key order\n", n);
            }
            live_seen = true;
        }
        n++;
        x = y;
    }
    int top = (int)pa__load_relaxed(&pq->top);
    for (int i = 1; i < top && i < PQ_MAX_LEVEL; i++) {
        long pos = 0;
        bool live = false;
        for (pq_node_t *x = unmark(pa__load_acquire(&pq->head->up[i - 1])); x != pq->tail;
             x = unmark(pa__load_acquire(&x->up[i - 1]))) {
            while (pos < n && order[pos] != x) pos++; /* level-0 order: only forward */
            if (pos == n) {
                if (bad++ < 3) fprintf(stderr, "level %d: node not at level 0 or out of level-0 order\n", i);
                break;
            }
            if (!(at_level[pos] & (1u << (i - 1)))) {
                if (bad++ < 3) fprintf(stderr, "level %d: node %ld not linked at level %d\n", i, pos, i - 1);
            }
            at_level[pos] |= 1u << i;
            if (deleted[pos] && live) {
                if (bad++ < 3) fprintf(stderr, "level %d: deleted node %ld after a live one\n", i, pos);
            }
            if (!deleted[pos]) live = true;
            pos++;
        }
    }
    return bad;
}

typedef struct shared {
    pa_pq_t *pq;
    atomic_int start;
    atomic_int pushers_left;
    long batches;
} shared_t;

typedef struct worker {
    shared_t *sh;
    int id;
    uint64_t seed;
    uint64_t *got; /* popper: values popped */
    size_t ngot, capgot;
    uint64_t pushed;
    long failures; /* pusher: push_many calls that failed (CHECK is not thread-safe) */
} worker_t;

static void *pusher_main(void *arg) {
    worker_t *w = arg;
    shared_t *sh = w->sh;
    while (!atomic_load_explicit(&sh->start, memory_order_acquire)) sched_yield();
    uint64_t rng = w->seed, seq = 0;
    enum { MAXB = 700 };
    static _Thread_local uint64_t v[MAXB];
    static _Thread_local double p[MAXB], c[MAXB], d[MAXB];
    for (long b = 0; b < sh->batches; b++) {
        while (pa_pq_size(sh->pq) > 300) sched_yield();
        uint64_t r = pa_rand_next(&rng);
        size_t n = 1 + (size_t)(r % MAXB);
        for (size_t k = 0; k < n; k++) {
            uint64_t q = pa_rand_next(&rng);
            v[k] = ((uint64_t)(w->id + 1) << 40) | seq++;
            p[k] = (double)(q % 4);                      /* few priorities: ties everywhere */
            c[k] = (q >> 8) % 3 == 0 ? 0.5 : (double)((q >> 16) % 1000) / 1000.0;
            d[k] = (q >> 32) % 2 ? NAN : (double)((q >> 40) % 100);
        }
        size_t pushed = 0;
        if (pa_pq_push_many(sh->pq, n, v, p, c, d, &pushed) != 0 || pushed != n) w->failures++;
    }
    w->pushed = seq;
    atomic_fetch_sub_explicit(&sh->pushers_left, 1, memory_order_release);
    return NULL;
}

static void record(worker_t *w, uint64_t v) {
    if (w->ngot == w->capgot) {
        w->capgot = w->capgot ? 2 * w->capgot : 4096;
        w->got = realloc(w->got, w->capgot * sizeof *w->got);
        REQUIRE(w->got != NULL);
    }
    w->got[w->ngot++] = v;
}

static void *popper_main(void *arg) {
    worker_t *w = arg;
    shared_t *sh = w->sh;
    while (!atomic_load_explicit(&sh->start, memory_order_acquire)) sched_yield();
    uint64_t rng = w->seed, buf[64];
    for (;;) {
        bool done = atomic_load_explicit(&sh->pushers_left, memory_order_acquire) == 0;
        uint64_t r = pa_rand_next(&rng);
        ssize_t got;
        if (r % 2) {
            pa_pq_item_t it;
            got = pa_pq_pop(sh->pq, &it);
            if (got == 1) record(w, it.value);
        } else {
            got = pa_pq_pop_many(sh->pq, buf, 1 + (size_t)((r >> 8) % 64));
            for (ssize_t k = 0; k < got; k++) record(w, buf[k]);
        }
        if (got == 0 && done) break;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_batches_under_concurrent_pops(void) {
    long checked = atomic_load(&checked_retires), bad = atomic_load(&reachable_retires);
    for (int phase = 0; phase < 4; phase++) {
        shared_t sh = {.batches = pa_stress(150)};
        REQUIRE(pa_pq_create(0, &sh.pq) == 0);
        atomic_init(&sh.start, 0);
        atomic_init(&sh.pushers_left, 2);
        worker_t w[4] = {0};
        pthread_t th[4];
        for (int t = 0; t < 4; t++) {
            w[t] = (worker_t){.sh = &sh, .id = t, .seed = 1234 + (uint64_t)phase * 77 + (uint64_t)t * 131};
            REQUIRE(pthread_create(&th[t], NULL, t < 2 ? pusher_main : popper_main, &w[t]) == 0);
        }
        atomic_store_explicit(&sh.start, 1, memory_order_release);
        for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
        CHECK_EQ_INT(w[0].failures + w[1].failures, 0);
        CHECK_EQ_INT(shape_violations(sh.pq), 0);
        CHECK_EQ_INT(pa_pq_size(sh.pq), 0);
        /* conservation: every pushed value exactly once */
        size_t total = w[2].ngot + w[3].ngot;
        CHECK_EQ_INT(total, w[0].pushed + w[1].pushed);
        uint64_t *all = malloc((total + 1) * sizeof *all);
        REQUIRE(all != NULL);
        memcpy(all, w[2].got, w[2].ngot * sizeof *all);
        if (w[3].ngot) memcpy(all + w[2].ngot, w[3].got, w[3].ngot * sizeof *all);
        qsort(all, total, sizeof *all, cmp_u64);
        long dup = 0;
        for (size_t k = 1; k < total; k++) dup += all[k] == all[k - 1];
        CHECK_EQ_INT(dup, 0);
        free(all);
        free(w[2].got);
        free(w[3].got);
        pa_pq_destroy(sh.pq);
    }
    CHECK_EQ_INT(atomic_load(&reachable_retires) - bad, 0);
    CHECK(atomic_load(&checked_retires) - checked > 1000); /* the hook really ran */
}

/* A batch behind a deleted prefix whose last node holds a large (stale) key: items of the
 * lowest priority are popped (fewer than a cut needs, so they stay linked, their keys
 * larger than most of what follows), then batches of both sizes are pushed; the shape
 * must hold and the pops must come out in key order. */
static void test_batch_behind_a_stale_prefix(void) {
    enum { FIRST = 40, BATCH = 1500 };
    for (int popped = 1; popped < PQ_BOUND_OFFSET; popped += 3) {
        for (int size = 0; size < 2; size++) {
            pa_pq_t *pq;
            REQUIRE(pa_pq_create(0, &pq) == 0);
            for (int i = 0; i < FIRST; i++) REQUIRE(pa_pq_push(pq, 1000000 + (uint64_t)i, -1.0, 0.0, NAN) == 0);
            pa_pq_item_t it;
            for (int i = 0; i < popped; i++) REQUIRE(pa_pq_pop(pq, &it) == 1);
            static uint64_t v[BATCH];
            static double p[BATCH], c[BATCH], d[BATCH];
            size_t n = size ? BATCH : 200;
            uint64_t rng = 42 + (uint64_t)popped;
            for (size_t k = 0; k < n; k++) {
                uint64_t q = pa_rand_next(&rng);
                v[k] = k + 1;
                p[k] = (double)(q % 5) - 1.0; /* -1 .. 3: some after the stale prefix's keys */
                c[k] = (double)((q >> 8) % 1000) / 1000.0;
                d[k] = NAN;
            }
            size_t pushed = 0;
            REQUIRE(pa_pq_push_many(pq, n, v, p, c, d, &pushed) == 0);
            CHECK_EQ_INT(shape_violations(pq), 0);
            /* pops come out in key order: priority descending, then confidence descending */
            double lp = INFINITY, lc = INFINITY;
            long out_of_order = 0, count = 0;
            while (pa_pq_pop(pq, &it) == 1) {
                if (it.priority > lp || (it.priority == lp && it.confidence > lc)) out_of_order++;
                lp = it.priority;
                lc = it.confidence;
                count++;
            }
            CHECK_EQ_INT(out_of_order, 0);
            CHECK_EQ_INT(count, (long)n + FIRST - popped);
            pa_pq_destroy(pq);
        }
    }
}

/* Between two operations of one group push, everything pushed so far is popped and this
 * thread's garbage freed (poisoned by PA_PQ_DEBUG): a finger carried from one operation
 * into the next would now point at freed nodes, and the next search reaching one aborts. */
static bool pop_between_ops;
static long popped_between_ops;

static void group_hook(struct pa_pq *pq) {
    if (!pop_between_ops) return;
    static uint64_t buf[4096];
    ssize_t got = wb_pq_pop_many(pq, buf, 4096);
    if (got > 0) popped_between_ops += got;
    pa__ebr_barrier();
}

static void test_no_finger_survives_its_operation(void) {
    enum { N = 3000 };
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(0, &pq) == 0);
    static uint64_t v[N];
    static double p[N], c[N], d[N];
    uint64_t rng = 7;
    for (size_t k = 0; k < N; k++) {
        uint64_t q = pa_rand_next(&rng);
        v[k] = k + 1;
        p[k] = (double)(q % 3);
        c[k] = (double)((q >> 8) % 1000) / 1000.0;
        d[k] = NAN;
    }
    pop_between_ops = true;
    popped_between_ops = 0;
    size_t pushed = 0;
    REQUIRE(pa_pq_push_many(pq, N, v, p, c, d, &pushed) == 0);
    pop_between_ops = false;
    CHECK(popped_between_ops > 0); /* the hook ran between operations */
    CHECK_EQ_INT(shape_violations(pq), 0);
    static uint64_t out[N];
    CHECK_EQ_INT(pa_pq_pop_many(pq, out, N) + popped_between_ops, N);
    pa_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_no_finger_survives_its_operation);
    RUN_TEST(test_batch_behind_a_stale_prefix);
    RUN_TEST(test_batches_under_concurrent_pops);
    TEST_MAIN_END();
}
