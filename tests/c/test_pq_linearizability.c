/*
 * test_pq_linearizability.c — many small concurrent histories of the priority queue, each
 * checked by brute force for linearizability against a sequential model.
 *
 * A round: a fresh queue with 0-3 prefilled items; 3 threads, released together by a
 * barrier, each run 3 random operations, stamping each with an invocation and a response
 * time from one shared atomic counter. The checker tries every order of the 9 operations
 * that respects real time (a before b whenever a responded before b was invoked) and
 * accepts the history when one such order, replayed on the sequential model, gives every
 * operation the answer it got. The model is the queue's specification: highest priority,
 * then confidence, then earliest deadline (none last), then arrival — the sequence number a
 * push takes when it starts (pq.h). So among equal keys: a push that responded before
 * another was invoked must come out first; two pushes that overlap in time may come out in
 * either order (their numbers are taken inside the overlap, and the one that took the
 * smaller number can take effect later). The model encodes exactly that: a pop may return
 * an item only if no present item must come before it.
 *
 * Two families: unindexed push/pop with few distinct keys (ties everywhere, so FIFO is
 * tested under concurrency), and indexed push/pop/cancel over three values (so -EEXIST,
 * cancel and re-push race with pops).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "pa_test.h"
#include "prealloc/pq.h"

#define THREADS 3
#define OPS_PER_THREAD 3
#define MAX_OPS (THREADS * OPS_PER_THREAD)
#define MAX_PREFILL 3

enum { OP_PUSH, OP_POP, OP_CANCEL };

typedef struct op {
    int kind;
    uint64_t value;              /* push, cancel */
    double priority, confidence, deadline;
    /* results */
    int rc;                      /* push, cancel */
    bool got;                    /* pop */
    pa_pq_item_t item;           /* pop */
    uint64_t inv, resp;
} op_t;

typedef struct round {
    pa_pq_t *pq;
    op_t ops[THREADS][OPS_PER_THREAD];
    unsigned spin[THREADS][OPS_PER_THREAD];
    op_t prefill[MAX_PREFILL];
    int nprefill;
} round_t;

static round_t the_round;
static pthread_barrier_t start_barrier, end_barrier;
static atomic_uint_fast64_t clock_ticks;
static atomic_int quit;
static atomic_int ready;

static void run_op(op_t *o) {
    switch (o->kind) {
    case OP_PUSH: o->rc = pa_pq_push(the_round.pq, o->value, o->priority, o->confidence, o->deadline); break;
    case OP_POP: o->got = pa_pq_pop(the_round.pq, &o->item) == 1; break;
    default: o->rc = pa_pq_cancel(the_round.pq, o->value); break;
    }
}

static void *worker_main(void *arg) {
    int t = (int)(intptr_t)arg;
    for (;;) {
        pthread_barrier_wait(&start_barrier);
        if (atomic_load(&quit)) return NULL;
        /* The barrier wakes threads microseconds apart; meet once more, spinning, so the
         * operations really start together. */
        atomic_fetch_add(&ready, 1);
        while (atomic_load(&ready) < THREADS) sched_yield();
        for (int k = 0; k < OPS_PER_THREAD; k++) {
            /* a little random delay so the operations interleave in many ways */
            for (volatile unsigned s = 0; s < the_round.spin[t][k]; s++) {
            }
            op_t *o = &the_round.ops[t][k];
            /* seq_cst RMWs on one counter: resp(a) < inv(b) implies a happens before b */
            o->inv = atomic_fetch_add(&clock_ticks, 1);
            run_op(o);
            o->resp = atomic_fetch_add(&clock_ticks, 1);
        }
        pthread_barrier_wait(&end_barrier);
    }
}

/* ---- the sequential model ---- */

typedef struct model_item {
    uint64_t value;
    double priority, confidence, deadline;
    uint64_t inv, resp; /* of its push */
} model_item_t;

typedef struct model {
    model_item_t items[MAX_OPS + MAX_PREFILL];
    int n;
} model_t;

static bool has_deadline(double d) { return !isnan(d) && !isinf(d); }

/* a must come out before b */
static bool model_before(const model_item_t *a, const model_item_t *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->confidence != b->confidence) return a->confidence > b->confidence;
    bool ha = has_deadline(a->deadline), hb = has_deadline(b->deadline);
    if (ha != hb) return ha;
    if (ha && a->deadline != b->deadline) return a->deadline < b->deadline;
    return a->resp < b->inv; /* equal keys: pushed strictly earlier */
}

static int model_find(const model_t *m, uint64_t value) {
    for (int i = 0; i < m->n; i++)
        if (m->items[i].value == value) return i;
    return -1;
}

/* Applies o to m if the model agrees with o's recorded answer; false otherwise. */
static bool model_apply(model_t *m, const op_t *o, bool indexed) {
    switch (o->kind) {
    case OP_PUSH:
        if (indexed && model_find(m, o->value) >= 0) return o->rc == -EEXIST;
        if (o->rc != 0) return false;
        m->items[m->n++] = (model_item_t){o->value, o->priority, o->confidence, o->deadline, o->inv, o->resp};
        return true;
    case OP_POP: {
        if (m->n == 0) return !o->got;
        if (!o->got) return false;
        /* unindexed histories use unique values, indexed ones hold a value at most once */
        int got = model_find(m, o->item.value);
        if (got < 0) return false;
        for (int i = 0; i < m->n; i++)
            if (model_before(&m->items[i], &m->items[got])) return false;
        m->items[got] = m->items[--m->n];
        return true;
    }
    default: {
        int i = model_find(m, o->value);
        if (i < 0) return o->rc == -ENOENT;
        if (o->rc != 0) return false;
        m->items[i] = m->items[--m->n];
        return true;
    }
    }
}

typedef struct history {
    const op_t *ops[MAX_OPS];
    int n;
    bool indexed;
    uint64_t explored;
} history_t;

static bool search(history_t *h, const model_t *m, unsigned done) {
    if (done == (1u << h->n) - 1) return true;
    h->explored++;
    for (int i = 0; i < h->n; i++) {
        if (done & (1u << i)) continue;
        /* i may go next only if nothing pending responded before i was invoked */
        bool minimal = true;
        for (int j = 0; j < h->n && minimal; j++)
            if (j != i && !(done & (1u << j)) && h->ops[j]->resp < h->ops[i]->inv) minimal = false;
        if (!minimal) continue;
        model_t next = *m;
        if (model_apply(&next, h->ops[i], h->indexed) && search(h, &next, done | (1u << i))) return true;
    }
    return false;
}

static void print_history(const round_t *r) {
    for (int i = 0; i < r->nprefill; i++)
        fprintf(stderr, "  prefill push v=%" PRIu64 " p=%g c=%g d=%g\n", r->prefill[i].value,
                r->prefill[i].priority, r->prefill[i].confidence, r->prefill[i].deadline);
    for (int t = 0; t < THREADS; t++) {
        for (int k = 0; k < OPS_PER_THREAD; k++) {
            const op_t *o = &r->ops[t][k];
            fprintf(stderr, "  T%d [%3" PRIu64 ",%3" PRIu64 "] ", t, o->inv, o->resp);
            if (o->kind == OP_PUSH)
                fprintf(stderr, "push v=%" PRIu64 " p=%g c=%g d=%g -> %d\n", o->value, o->priority,
                        o->confidence, o->deadline, o->rc);
            else if (o->kind == OP_CANCEL)
                fprintf(stderr, "cancel v=%" PRIu64 " -> %d\n", o->value, o->rc);
            else if (o->got)
                fprintf(stderr, "pop -> v=%" PRIu64 " (arrival %" PRIu64 ")\n", o->item.value, o->item.arrival);
            else
                fprintf(stderr, "pop -> empty\n");
        }
    }
}

static const double prios[] = {0.0, 1.0};
static const double confs[] = {0.0, 0.5};
static const double deads[] = {NAN, 1.0, INFINITY};
#define PICK(arr, r) (arr)[(r) % (sizeof(arr) / sizeof((arr)[0]))]

static void fill_push(op_t *o, uint64_t value, uint64_t *rng) {
    o->kind = OP_PUSH;
    o->value = value;
    o->priority = PICK(prios, pa_rand_next(rng));
    o->confidence = PICK(confs, pa_rand_next(rng));
    o->deadline = PICK(deads, pa_rand_next(rng));
}

/* Runs `rounds` histories; returns how many were not linearizable. The count is fixed (no
 * time budget), so what the test checks does not depend on how busy the machine is. */
static long run_family(bool indexed, long rounds, uint64_t seed) {
    uint64_t rng = seed;
    long failures = 0, concurrent = 0, r;
    for (r = 0; r < rounds; r++) {
        round_t *rd = &the_round;
        memset(rd, 0, sizeof *rd);
        if (pa_pq_create(indexed ? PA_PQ_INDEXED : 0, &rd->pq) != 0) return rounds;
        model_t initial = {0};
        rd->nprefill = (int)(pa_rand_next(&rng) % (MAX_PREFILL + 1));
        uint64_t next_value = 100;
        for (int i = 0; i < rd->nprefill; i++) {
            op_t *o = &rd->prefill[i];
            fill_push(o, indexed ? 1 + (uint64_t)i : next_value++, &rng);
            o->inv = atomic_fetch_add(&clock_ticks, 1);
            o->rc = pa_pq_push(rd->pq, o->value, o->priority, o->confidence, o->deadline);
            o->resp = atomic_fetch_add(&clock_ticks, 1);
            if (o->rc != 0 || !model_apply(&initial, o, indexed)) return rounds;
        }
        for (int t = 0; t < THREADS; t++) {
            for (int k = 0; k < OPS_PER_THREAD; k++) {
                op_t *o = &rd->ops[t][k];
                uint64_t x = pa_rand_next(&rng);
                unsigned kind = (unsigned)(x % (indexed ? 3 : 2));
                if (kind == 0) {
                    fill_push(o, indexed ? 1 + (x >> 8) % 3 : next_value++, &rng);
                } else if (kind == 1) {
                    o->kind = OP_POP;
                } else {
                    o->kind = OP_CANCEL;
                    o->value = 1 + (x >> 8) % 3;
                }
                rd->spin[t][k] = (unsigned)((x >> 16) % 400);
            }
        }
        atomic_store(&ready, 0);
        pthread_barrier_wait(&start_barrier);
        pthread_barrier_wait(&end_barrier);

        history_t h = {.indexed = indexed};
        for (int t = 0; t < THREADS; t++)
            for (int k = 0; k < OPS_PER_THREAD; k++) h.ops[h.n++] = &rd->ops[t][k];
        /* a popped item must carry the key it was pushed with */
        bool keys_ok = true;
        for (int i = 0; i < h.n; i++) {
            const op_t *o = h.ops[i];
            if (o->kind != OP_POP || !o->got) continue;
            bool found = false;
            for (int j = 0; j < h.n + rd->nprefill && !found; j++) {
                const op_t *p = j < h.n ? h.ops[j] : &rd->prefill[j - h.n];
                if (p->kind != OP_PUSH || p->rc != 0 || p->value != o->item.value) continue;
                if (p->priority == o->item.priority && p->confidence == o->item.confidence &&
                    (has_deadline(p->deadline) ? p->deadline == o->item.deadline : isinf(o->item.deadline)))
                    found = true;
            }
            if (!found) keys_ok = false;
        }
        bool overlap = false;
        for (int i = 0; i < h.n; i++)
            for (int j = 0; j < h.n; j++)
                if (i != j && h.ops[i]->inv < h.ops[j]->inv && h.ops[j]->inv < h.ops[i]->resp) overlap = true;
        concurrent += overlap;
        if (!keys_ok || !search(&h, &initial, 0)) {
            if (failures < 3) {
                fprintf(stderr, "%s history %ld is not linearizable%s:\n", indexed ? "indexed" : "unindexed", r,
                        keys_ok ? "" : " (wrong key)");
                print_history(rd);
            }
            failures++;
        }
        pa_pq_destroy(rd->pq);
    }
    /* the test means nothing if the operations never overlapped */
    fprintf(stderr, "  %s: %ld of %ld histories had overlapping operations\n", indexed ? "indexed" : "unindexed",
            concurrent, r);
    CHECK(concurrent > r / 10);
    return failures;
}

static void test_unindexed_histories(void) {
    CHECK_EQ_INT(run_family(false, pa_stress(6000), 0x5eed1), 0);
}

static void test_indexed_histories(void) {
    /* Fewer than unindexed: each indexed queue calloc's its 2 MiB bucket array, which
     * under TSan means shadow memory mapped and cleared every round. */
    CHECK_EQ_INT(run_family(true, pa_stress(3000), 0x5eed2), 0);
}

/* The checker itself must reject a wrong history: a pop that returns the worse of two
 * items pushed sequentially before it. */
static void test_checker_rejects(void) {
    op_t a = {.kind = OP_PUSH, .value = 1, .priority = 1.0, .deadline = NAN, .inv = 0, .resp = 1};
    op_t b = {.kind = OP_PUSH, .value = 2, .priority = 2.0, .deadline = NAN, .inv = 2, .resp = 3};
    op_t p = {.kind = OP_POP, .got = true, .item = {.value = 1}, .inv = 4, .resp = 5};
    history_t h = {.ops = {&a, &b, &p}, .n = 3};
    model_t m = {0};
    CHECK(!search(&h, &m, 0));
    p.item.value = 2;
    CHECK(search(&h, &m, 0));
    /* FIFO among equals: the earlier push must come out first */
    b.priority = 1.0;
    CHECK(!search(&h, &m, 0));
    p.item.value = 1;
    CHECK(search(&h, &m, 0));
    /* ... unless the pushes overlap: then either order is a linearization */
    b.inv = 0;
    p.item.value = 2;
    CHECK(search(&h, &m, 0));
    /* overlapping pushes never excuse the priority order */
    b.priority = 2.0;
    p.item.value = 1;
    CHECK(!search(&h, &m, 0));
}

int main(void) {
    pthread_barrier_init(&start_barrier, NULL, THREADS + 1);
    pthread_barrier_init(&end_barrier, NULL, THREADS + 1);
    pthread_t th[THREADS];
    /* Spread the workers over the CPUs we may use; left to itself the scheduler often
     * stacks such short-lived work on one core and nothing overlaps. */
    cpu_set_t allowed;
    int cpus[CPU_SETSIZE], ncpus = 0;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, &allowed)) cpus[ncpus++] = c;
    for (int t = 0; t < THREADS; t++) {
        pthread_create(&th[t], NULL, worker_main, (void *)(intptr_t)t);
        if (ncpus > 1) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(cpus[t % ncpus], &one);
            (void)pthread_setaffinity_np(th[t], sizeof one, &one);
        }
    }
    RUN_TEST(test_checker_rejects);
    RUN_TEST(test_unindexed_histories);
    RUN_TEST(test_indexed_histories);
    atomic_store(&quit, 1);
    pthread_barrier_wait(&start_barrier);
    for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&start_barrier);
    pthread_barrier_destroy(&end_barrier);
    TEST_MAIN_END();
}
