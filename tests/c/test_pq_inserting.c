/*
 * test_pq_inserting.c — white-box test of the "push still in progress" guard: this file
 * compiles src/native/pq.c itself (public functions renamed, as test_pq_retire.c does)
 * with PA_PQ_DEBUG (freed nodes are poisoned, traversals check what they reach) and two
 * hooks: one runs inside an insert just before it links an upper level, one fixes tower
 * heights.
 *
 * The rule it defends (pq.c, delete-min): the prefix cut never passes a node whose insert
 * is still linking upper levels. Deterministic scenario, one thread: a queue of 12 level-1
 * nodes; a push of a higher-priority level-2 node N links level 0, passes its "is n
 * deleted?" check, and — in the hook, right before its level-1 CAS — the queue is drained
 * (one pop claims N from head, then pop_many walks the rest: a cut). With the guard, the
 * cut stops at N; without it, the cut passes N and retires it, and the insert then links
 * the retired N under head at level 1: after the grace period N is freed while reachable.
 * The test walks every level after a barrier and checks that no reachable node is
 * poisoned, then pushes (a search from head) and pops through the whole queue.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdbool.h>

struct pa_pq;
struct pq_node;
static void insert_hook(struct pa_pq *pq, struct pq_node *n, int i);
static unsigned forced_level;
#define PA_PQ_DEBUG 1
#define PQ_INSERT_HOOK(pq, n, i) insert_hook((pq), (n), (i))
#define PQ_TEST_LEVEL(cap) forced_level

#include "pq_whitebox.h"

#include "pa_test.h"

static bool hook_armed;
static pq_node_t *hooked;
static long hook_popped;
static void (*hook_body)(pa_pq_t *pq); /* NULL: the cut scenario below */

static void insert_hook(struct pa_pq *pq, struct pq_node *n, int i) {
    if (!hook_armed || i != 1) return;
    hook_armed = false;
    if (hook_body) {
        hooked = n;
        hook_body(pq);
        return;
    }
    hooked = n;
    pa_pq_item_t it;
    /* claims N from head (head's link is now marked), then a walk over the rest that
     * starts at a marked head link and passes >= PQ_BOUND_OFFSET nodes: it cuts */
    if (wb_pq_pop(pq, &it) == 1) hook_popped++;
    uint64_t vals[64];
    ssize_t got = wb_pq_pop_many(pq, vals, 64);
    if (got > 0) hook_popped += got;
}

/* Nodes reachable from head at level i that EBR has freed (poisoned). Single-threaded. */
static long poisoned_reachable(pa_pq_t *pq, int i) {
    long bad = 0, steps = 0;
    for (pq_node_t *x = unmark(pa__load_acquire(next_at(pq->head, i))); x != pq->tail && steps < 100000;
         x = unmark(pa__load_acquire(next_at(x, i))), steps++) {
        if (pa__load_relaxed(&x->state) == ST_POISON) bad++;
        if (bad) break; /* a poisoned node's links are garbage: do not follow them */
    }
    return bad;
}

static void test_cut_stops_before_a_push_in_progress(void) {
    pa_pq_t *pq;
    REQUIRE(wb_pq_create(0, &pq) == 0);
    forced_level = 1;
    for (int i = 0; i < 12; i++) REQUIRE(wb_pq_push(pq, 100 + (uint64_t)i, 1.0, 0.5, NAN) == 0);
    forced_level = 2;
    hook_armed = true;
    REQUIRE(wb_pq_push(pq, 1, 9.0, 0.5, NAN) == 0); /* N: first in the order */
    forced_level = 0;
    CHECK(!hook_armed);
    CHECK(hooked != NULL);
    CHECK_EQ_INT(hook_popped, 13); /* N and the 12 */
    CHECK_EQ_INT(wb_pq_size(pq), 0);

    pa__ebr_barrier(); /* whatever the cut retired is freed (and poisoned) now */
    for (int i = 0; i < PQ_MAX_LEVEL; i++) CHECK_EQ_INT(poisoned_reachable(pq, i), 0);

    /* the queue still works: a search from head (asserts on every node it reaches) */
    for (int i = 0; i < 20; i++) REQUIRE(wb_pq_push(pq, 200 + (uint64_t)i, (double)i, 0.5, NAN) == 0);
    pa_pq_item_t it;
    for (int i = 19; i >= 0; i--) {
        REQUIRE(wb_pq_pop(pq, &it) == 1);
        CHECK_EQ_INT(it.value, 200 + (uint64_t)i);
    }
    CHECK(wb_pq_pop(pq, &it) == 0);
    wb_pq_destroy(pq);
}

/* Nodes of the deleted prefix: marked level-0 links from head. Single-threaded. */
static long prefix_length(pa_pq_t *pq) {
    long n = 0;
    for (uintptr_t l = pa__load_acquire(&pq->head->next0); is_marked(l); l = pa__load_acquire(&unmark(l)->next0))
        n++;
    return n;
}

/* The real limit (pq.c, "Limits"): a producer stalled between linking level 0 and
 * finishing its tower holds the prefix cut before its node once that node is popped, so
 * every later pop walks every node popped since — O(pops since the stall), not
 * O(PQ_BOUND_OFFSET). Measured as the prefix length (nodes), not as time. */
static long STALL_POPS; /* pa_stress(20000): fewer under TSan (the walks are quadratic) */
static long prefix_during_stall, prefix_without_stall;

static void stalled_body(pa_pq_t *pq) {
    pa_pq_item_t it;
    if (wb_pq_pop(pq, &it) == 1) hook_popped++; /* the stalled push's node, claimed */
    for (long i = 0; i < STALL_POPS; i++) {
        if (wb_pq_push(pq, 1000 + (uint64_t)i, 1.0, 0.5, NAN) != 0) return;
        if (wb_pq_pop(pq, &it) == 1) hook_popped++;
    }
    prefix_during_stall = prefix_length(pq);
}

static void test_stalled_push_holds_the_prefix(void) {
    pa_pq_t *pq;
    REQUIRE(wb_pq_create(0, &pq) == 0);
    pa_pq_item_t it;
    STALL_POPS = pa_stress(20000);
    /* the same churn without a stall: the cut keeps the prefix within PQ_BOUND_OFFSET */
    for (long i = 0; i < STALL_POPS; i++) {
        REQUIRE(wb_pq_push(pq, 1000 + (uint64_t)i, 1.0, 0.5, NAN) == 0);
        REQUIRE(wb_pq_pop(pq, &it) == 1);
    }
    prefix_without_stall = prefix_length(pq);
    CHECK(prefix_without_stall <= PQ_BOUND_OFFSET);

    hook_body = stalled_body;
    hook_popped = 0;
    forced_level = 2;
    hook_armed = true;
    REQUIRE(wb_pq_push(pq, 1, 9.0, 0.5, NAN) == 0);
    forced_level = 0;
    hook_body = NULL;
    CHECK(!hook_armed);
    CHECK_EQ_INT(hook_popped, STALL_POPS + 1);
    fprintf(stderr, "deleted prefix after %ld pops: %ld nodes with a push stalled, %ld without\n", STALL_POPS,
            prefix_during_stall, prefix_without_stall);
    /* every pop during the stall walked this far; the cut could not pass the stalled node */
    CHECK(prefix_during_stall >= STALL_POPS);
    CHECK(prefix_during_stall <= STALL_POPS + 1 + PQ_BOUND_OFFSET);

    /* the push finished: the next pop that walks far enough cuts the whole prefix */
    REQUIRE(wb_pq_push(pq, 2, 1.0, 0.5, NAN) == 0);
    REQUIRE(wb_pq_pop(pq, &it) == 1);
    CHECK(prefix_length(pq) <= PQ_BOUND_OFFSET);
    pa__ebr_barrier();
    for (int i = 0; i < PQ_MAX_LEVEL; i++) CHECK_EQ_INT(poisoned_reachable(pq, i), 0);
    wb_pq_destroy(pq);
}

int main(void) {
    RUN_TEST(test_cut_stops_before_a_push_in_progress);
    RUN_TEST(test_stalled_push_holds_the_prefix);
    TEST_MAIN_END();
}
