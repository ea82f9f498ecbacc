/*
 * test_epoch.c — white-box tests of epoch-based reclamation: this file compiles
 * src/native/epoch.c itself (its functions renamed, as test_pq_retire.c does with pq.c) so
 * it can drive the epoch one advance at a time and run code inside enter.
 *
 * What they defend, each deterministically (one thread, no timing):
 *   - the grace period: an object retired in epoch e is freed when the global epoch reaches
 *     e + 3, not one advance earlier (freeing at e + 2 lets a reader that announced e + 1
 *     keep a pointer to freed memory; see the proof in epoch.c) — for a thread's own
 *     garbage and for the orphans of an exited thread;
 *   - the re-check on entry: when the epoch moves between enter's load and its
 *     announcement, the thread announces the new epoch, so what it retires is stamped with
 *     the epoch it really runs in (a stale stamp e - 2 would be freed one advance later);
 *   - nesting: an inner section neither re-announces nor ends the outer one.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

static void enter_hook(void);
#define EBR_ENTER_HOOK() enter_hook()

#define pa__ebr_enter wb_ebr_enter
#define pa__ebr_exit wb_ebr_exit
#define pa__ebr_retire wb_ebr_retire
#define pa__ebr_flush wb_ebr_flush
#define pa__ebr_barrier wb_ebr_barrier
#define pa__ebr_pending_local wb_ebr_pending_local
#define pa__ebr_pending_orphans wb_ebr_pending_orphans
#include "../../src/native/epoch.c"

#include "pa_test.h"

/* advances the hook makes inside the next enter (then it disarms itself) */
static int hook_advances;

static void enter_hook(void) {
    while (hook_advances > 0) {
        uint64_t g;
        hook_advances--;
        if (!try_advance(&g)) fprintf(stderr, "hook: advance refused\n");
    }
}

typedef struct counted {
    pa__ebr_link_t link;
    int freed;
} counted_t;

static void counted_free(pa__ebr_link_t *link) { ((counted_t *)(void *)link)->freed++; }

static uint64_t epoch_now(void) { return pa__load_acquire(&ebr.epoch); }

/* One advance (this test's threads are all outside their sections, so it must succeed),
 * then an empty section: enter frees what the new epoch lets go. */
static bool advance_and_touch(void) {
    uint64_t g;
    if (!try_advance(&g)) return false;
    pa__ebr_thread_t *self = wb_ebr_enter();
    if (!self) return false;
    wb_ebr_exit(self);
    orphan_reclaim(epoch_now());
    return true;
}

/* Counts the advances after the retire until c is freed (at most 10). */
static int advances_until_freed(counted_t *c) {
    int k = 0;
    while (!c->freed && k < 10) {
        if (!advance_and_touch()) return -1;
        k++;
    }
    return c->freed ? k : -1;
}

static void test_grace_period_is_three_epochs(void) {
    counted_t c = {.freed = 0};
    pa__ebr_thread_t *self = wb_ebr_enter();
    REQUIRE(self != NULL);
    uint64_t e = epoch_now();
    wb_ebr_retire(self, &c.link, counted_free);
    CHECK_EQ_INT(c.link.epoch, e);
    wb_ebr_exit(self);
    for (int k = 1; k <= 3; k++) {
        CHECK_EQ_INT(c.freed, 0); /* epoch e + k - 1 < e + 3: a reader may still hold it */
        REQUIRE(advance_and_touch());
        CHECK_EQ_INT(epoch_now(), e + (uint64_t)k);
    }
    CHECK_EQ_INT(c.freed, 1); /* epoch e + 3 */
    CHECK_EQ_INT(wb_ebr_pending_local(), 0);
}

static counted_t orphan_obj;
static uint64_t orphan_epoch;

static void *retire_and_exit(void *arg) {
    pa__ebr_thread_t *self = wb_ebr_enter();
    if (!self) return NULL;
    orphan_epoch = epoch_now();
    wb_ebr_retire(self, &orphan_obj.link, counted_free);
    wb_ebr_exit(self);
    return arg; /* the key destructor hands the garbage to the orphan list */
}

static void test_orphans_wait_three_epochs(void) {
    pthread_t th;
    void *ret = NULL;
    REQUIRE(pthread_create(&th, NULL, retire_and_exit, &orphan_obj) == 0);
    pthread_join(th, &ret);
    REQUIRE(ret == &orphan_obj);
    CHECK_EQ_INT(wb_ebr_pending_orphans(), 1);
    uint64_t e = orphan_epoch;
    while (epoch_now() < e + 2) REQUIRE(advance_and_touch());
    CHECK_EQ_INT(orphan_obj.freed, 0); /* e + 2: not yet */
    REQUIRE(advance_and_touch());
    CHECK_EQ_INT(epoch_now(), e + 3);
    CHECK_EQ_INT(orphan_obj.freed, 1);
    CHECK_EQ_INT(wb_ebr_pending_orphans(), 0);
}

static void test_enter_announces_the_epoch_it_runs_in(void) {
    counted_t c = {.freed = 0};
    uint64_t before = epoch_now();
    hook_advances = 2; /* the epoch moves twice between enter's load and its announcement */
    pa__ebr_thread_t *self = wb_ebr_enter();
    REQUIRE(self != NULL);
    CHECK_EQ_INT(hook_advances, 0);
    CHECK_EQ_INT(epoch_now(), before + 2);
    CHECK_EQ_INT(pa__load_relaxed(&self->state) >> 1, before + 2); /* not the stale one */
    wb_ebr_retire(self, &c.link, counted_free);
    CHECK_EQ_INT(c.link.epoch, before + 2);
    wb_ebr_exit(self);
    CHECK_EQ_INT(advances_until_freed(&c), 3);
}

static void test_nested_sections(void) {
    counted_t c = {.freed = 0};
    pa__ebr_thread_t *outer = wb_ebr_enter();
    REQUIRE(outer != NULL);
    uint64_t e = epoch_now();
    pa__ebr_thread_t *inner = wb_ebr_enter();
    CHECK(inner == outer);
    wb_ebr_retire(inner, &c.link, counted_free);
    wb_ebr_exit(inner);
    /* still inside the outer section, announcing e: the epoch may reach e + 1, no further */
    uint64_t g;
    CHECK(try_advance(&g));
    CHECK(!try_advance(&g) || epoch_now() == e + 1);
    CHECK_EQ_INT(epoch_now(), e + 1);
    wb_ebr_exit(outer);
    CHECK(c.freed == 0);
    while (!c.freed && epoch_now() < e + 3) REQUIRE(advance_and_touch());
    CHECK_EQ_INT(c.freed, 1);
    CHECK_EQ_INT(epoch_now(), e + 3);
}

int main(void) {
    RUN_TEST(test_grace_period_is_three_epochs);
    RUN_TEST(test_orphans_wait_three_epochs);
    RUN_TEST(test_enter_announces_the_epoch_it_runs_in);
    RUN_TEST(test_nested_sections);
    TEST_MAIN_END();
}
