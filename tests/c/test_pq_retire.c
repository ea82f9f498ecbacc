/*
 * test_pq_retire.c — white-box test of the queue's memory reclamation: this file compiles
 * src/native/pq.c itself (its public functions renamed, so they cannot clash with the
 * library's) with a hook that runs at every retire and checks that the node is no longer
 * reachable — from head at any level, nor (indexed) from its bucket. A reachable retired
 * node is a use-after-free waiting for the next reader; the sanitizers only see one when a
 * reader happens to arrive after the memory was reused, this check sees every one.
 *
 * It found a window in the paper's restructure (see the design comment in pq.c): with the
 * paper's version, one run of the indexed churn below catches it about one time in five
 * (it is a race; the check makes each occurrence visible, but not every run hits it).
 *
 * Workloads: 4 threads churning (push, all-or-nothing batch push, pop, batch pop, cancel
 * at random) on a small indexed queue
 * of 64 values, and 4 threads pushing and popping on a small unindexed queue. Small
 * queues keep the check (a walk of every level) cheap and the deleted prefix busy.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>

struct pq_op;
struct pq_node;
static void retire_check(struct pq_op *op, struct pq_node *n);
#define PQ_RETIRE_HOOK(op, n) retire_check((op), (n))

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
    if (op->indexed) {
        for (pq_node_t *x = (pq_node_t *)pa__load_acquire(bucket_of(pq, n->value)); x;
             x = unmark(pa__load_acquire(&node_ext(x)->hnext))) {
            if (x == n) {
                if (atomic_fetch_add(&reachable_retires, 1) < 3) fprintf(stderr, "retired node still in its bucket\n");
                return;
            }
        }
    }
}

typedef struct churner {
    pa_pq_t *pq;
    atomic_int *start;
    long ops;
    uint64_t seed;
    bool indexed;
} churner_t;

static void *churner_main(void *arg) {
    churner_t *c = arg;
    while (!atomic_load_explicit(c->start, memory_order_acquire)) sched_yield();
    uint64_t rng = c->seed;
    pa_pq_item_t items[8];
    /* one pop in eight takes a batch: the batch walk makes its own cuts */
    for (long k = 0; k < c->ops; k++) {
        uint64_t r = pa_rand_next(&rng);
        double prio = (double)((r >> 20) % 4);
        size_t batch = (r >> 40) % 8 == 0 ? 1 + (r >> 44) % 8 : 0;
        if (c->indexed) {
            uint64_t v = (r >> 8) % 64;
            switch (r % 3) {
            case 0:
                if (batch) { /* an all-or-nothing batch: its withdrawals retire nodes too */
                    uint64_t vs[8];
                    double ps[8], cs[8], ds[8];
                    for (size_t i = 0; i < batch; i++) {
                        vs[i] = (v + 7 * i) % 64;
                        ps[i] = (double)(i % 3);
                        cs[i] = 0.0;
                        ds[i] = NAN;
                    }
                    (void)pa_pq_push_all(c->pq, batch, vs, ps, cs, ds, NULL, NULL);
                } else {
                    (void)pa_pq_push(c->pq, v, prio, 0.0, NAN);
                }
                break;
            case 1: batch ? (void)pa_pq_pop_items(c->pq, items, batch) : (void)pa_pq_pop(c->pq, &items[0]); break;
            default: (void)pa_pq_cancel(c->pq, v);
            }
        } else if (r % 2 == 0 && pa_pq_size(c->pq) < 200) {
            (void)pa_pq_push(c->pq, r, prio, 0.0, NAN);
        } else if (batch) {
            (void)pa_pq_pop_items(c->pq, items, batch);
        } else {
            (void)pa_pq_pop(c->pq, &items[0]);
        }
    }
    return NULL;
}

static void run_churn(bool indexed, long ops_per_thread) {
    pa_pq_t *pq;
    REQUIRE(pa_pq_create(indexed ? PA_PQ_INDEXED : 0, &pq) == 0);
    atomic_int start = 0;
    enum { T = 4 };
    churner_t cs[T];
    pthread_t th[T];
    for (int t = 0; t < T; t++) {
        cs[t] = (churner_t){.pq = pq, .start = &start, .ops = ops_per_thread, .seed = 99 + (uint64_t)t * 131,
                            .indexed = indexed};
        pthread_create(&th[t], NULL, churner_main, &cs[t]);
    }
    atomic_store_explicit(&start, 1, memory_order_release);
    for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
    pa_pq_destroy(pq);
}

static void test_retired_nodes_unreachable_indexed(void) {
    long checked = atomic_load(&checked_retires), bad = atomic_load(&reachable_retires);
    run_churn(true, pa_stress(1500000));
    CHECK_EQ_INT(atomic_load(&reachable_retires) - bad, 0);
    CHECK(atomic_load(&checked_retires) - checked > 1000); /* the hook really ran */
}

static void test_retired_nodes_unreachable_unindexed(void) {
    long checked = atomic_load(&checked_retires), bad = atomic_load(&reachable_retires);
    run_churn(false, pa_stress(600000));
    CHECK_EQ_INT(atomic_load(&reachable_retires) - bad, 0);
    CHECK(atomic_load(&checked_retires) - checked > 1000);
}

int main(void) {
    RUN_TEST(test_retired_nodes_unreachable_indexed);
    RUN_TEST(test_retired_nodes_unreachable_unindexed);
    TEST_MAIN_END();
}
