/*
 * test_table_threads.c — threaded validation of the allocation table.
 *
 *   test_release_expire_race  rounds of: every thread inserts records, then each record is
 *                             raced by a releaser (ALLOCATED|ACTIVE -> RELEASING -> RELEASED)
 *                             and an expirer (-> EXPIRED) on two other threads. Exactly one
 *                             wins each record, the record ends in the winner's final state,
 *                             the loser saw the winner's status.
 *   test_churn                threads insert, publish, release, remove and reuse slots while
 *                             the others expire, update fields and read published ids. A
 *                             per-slot claim counter proves no slot is handed out twice while
 *                             live; every snapshot carries only values written for its own
 *                             id; release and expiry wins add up; afterwards the table is
 *                             empty and every slot can be inserted again (free-stack integrity).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>

#include "pa_test.h"
#include "prealloc/table.h"

#define THREADS 4

/* ---------------- release vs expire, in rounds ---------------- */

#define RACE_PER_THREAD 256

typedef struct race_shared {
    pa_table_t *table;
    pthread_barrier_t barrier;
    long rounds;
    pa_id_t ids[THREADS * RACE_PER_THREAD];
    atomic_int release_won[THREADS * RACE_PER_THREAD];
    atomic_int expire_won[THREADS * RACE_PER_THREAD];
    atomic_long failures;
} race_shared_t;

typedef struct race_arg {
    race_shared_t *shared;
    int thread;
} race_arg_t;

static void race_fail(race_shared_t *s, const char *what, long index, int rc) {
    if (atomic_fetch_add(&s->failures, 1) < 10) fprintf(stderr, "race: %s (record %ld, rc %d)\n", what, index, rc);
}

static void *race_main(void *p) {
    race_arg_t *a = p;
    race_shared_t *s = a->shared;
    uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(a->thread + 1);
    for (long round = 0; round < s->rounds; round++) {
        /* insert phase: this thread's share of the records, some made ACTIVE */
        for (int k = 0; k < RACE_PER_THREAD; k++) {
            int i = a->thread * RACE_PER_THREAD + k;
            pa_record_init_t init = {.status = PA_STATUS_ALLOCATED, .request_id = (uint64_t)i};
            int rc = pa_table_insert(s->table, &init, &s->ids[i]);
            if (rc != 0) race_fail(s, "insert", i, rc);
            if (pa_rand_next(&rng) & 1) pa_table_transition(s->table, s->ids[i], PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_ACTIVE, NULL);
            atomic_store(&s->release_won[i], 0);
            atomic_store(&s->expire_won[i], 0);
        }
        pthread_barrier_wait(&s->barrier);
        /* race phase: release the records of thread+1, expire those of thread+2, in
         * opposite directions so the two racers meet in the middle */
        int release_owner = (a->thread + 1) % THREADS, expire_owner = (a->thread + 2) % THREADS;
        for (int k = 0; k < RACE_PER_THREAD; k++) {
            int ri = release_owner * RACE_PER_THREAD + k;
            pa_status_t seen;
            int rc = pa_table_transition(s->table, s->ids[ri], PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE),
                                         PA_STATUS_RELEASING, &seen);
            if (rc == 0) {
                rc = pa_table_transition(s->table, s->ids[ri], PA_STATUS_BIT(PA_STATUS_RELEASING), PA_STATUS_RELEASED, NULL);
                if (rc != 0) race_fail(s, "RELEASING -> RELEASED lost", ri, rc);
                atomic_fetch_add(&s->release_won[ri], 1);
            } else if (rc != -EAGAIN || seen != PA_STATUS_EXPIRED) {
                race_fail(s, "release lost to something other than expiry", ri, rc);
            }

            int ei = expire_owner * RACE_PER_THREAD + (RACE_PER_THREAD - 1 - k);
            rc = pa_table_transition(s->table, s->ids[ei],
                                     PA_STATUS_BIT(PA_STATUS_PENDING) | PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE),
                                     PA_STATUS_EXPIRED, &seen);
            if (rc == 0)
                atomic_fetch_add(&s->expire_won[ei], 1);
            else if (rc != -EAGAIN || (seen != PA_STATUS_RELEASING && seen != PA_STATUS_RELEASED))
                race_fail(s, "expiry lost to something other than a release", ei, rc);
        }
        pthread_barrier_wait(&s->barrier);
        /* check and remove this thread's own records */
        for (int k = 0; k < RACE_PER_THREAD; k++) {
            int i = a->thread * RACE_PER_THREAD + k;
            int released = atomic_load(&s->release_won[i]), expired = atomic_load(&s->expire_won[i]);
            int status = pa_table_status(s->table, s->ids[i]);
            if (released + expired != 1) race_fail(s, "not exactly one winner", i, released * 10 + expired);
            if (released && status != PA_STATUS_RELEASED) race_fail(s, "release won but status differs", i, status);
            if (expired && status != PA_STATUS_EXPIRED) race_fail(s, "expiry won but status differs", i, status);
            int rc = pa_table_remove(s->table, s->ids[i]);
            if (rc != 0) race_fail(s, "remove", i, rc);
        }
        pthread_barrier_wait(&s->barrier);
    }
    return NULL;
}

static void test_release_expire_race(void) {
    static race_shared_t s;
    memset(&s, 0, sizeof(s));
    REQUIRE(pa_table_create(THREADS * RACE_PER_THREAD, &s.table) == 0);
    pthread_barrier_init(&s.barrier, NULL, THREADS);
    s.rounds = pa_stress(1000);
    pthread_t threads[THREADS];
    race_arg_t args[THREADS];
    for (int i = 0; i < THREADS; i++) {
        args[i] = (race_arg_t){&s, i};
        REQUIRE(pthread_create(&threads[i], NULL, race_main, &args[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    CHECK_EQ_INT(atomic_load(&s.failures), 0);
    CHECK_EQ_INT(pa_table_live(s.table), 0);
    pthread_barrier_destroy(&s.barrier);
    pa_table_destroy(s.table);
}

/* ---------------- churn ---------------- */

#define CHURN_OWN 32 /* records each thread keeps live at most */
#define CHURN_CAPACITY (THREADS * CHURN_OWN * 2)

typedef struct churn_shared {
    pa_table_t *table;
    long iterations;
    _Atomic pa_id_t published[THREADS * CHURN_OWN]; /* 0 = empty */
    atomic_int claims[CHURN_CAPACITY];              /* live records per slot index */
    atomic_long expire_wins, found_expired, release_wins, found_released;
    atomic_long inserted, snapshots, failures;
} churn_shared_t;

typedef struct churn_arg {
    churn_shared_t *shared;
    int thread;
} churn_arg_t;

static void churn_fail(churn_shared_t *s, const char *what, pa_id_t id, long detail) {
    if (atomic_fetch_add(&s->failures, 1) < 10)
        fprintf(stderr, "churn: %s (id %#" PRIx64 ", %ld)\n", what, id, detail);
}

/* What the owner writes into a record's fields: a function of its id, so a snapshot
 * that mixed in another record's fields would show. */
static double allocated_for(pa_id_t id) { return (double)(uint32_t)(id ^ (id >> 32)); }

/* The owner releases its record (a PENDING one is cancelled: PENDING -> RELEASED), racing
 * the expirers, then checks the final state, unpublishes, unclaims and removes it. */
static void churn_finish(churn_shared_t *s, int slot, pa_id_t id) {
    for (;;) {
        pa_status_t seen;
        int rc = pa_table_transition(s->table, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE),
                                     PA_STATUS_RELEASING, &seen);
        if (rc == 0) {
            atomic_fetch_add(&s->release_wins, 1);
            rc = pa_table_transition(s->table, id, PA_STATUS_BIT(PA_STATUS_RELEASING), PA_STATUS_RELEASED, NULL);
            if (rc != 0) churn_fail(s, "RELEASING -> RELEASED", id, rc);
            break;
        }
        if (rc != -EAGAIN) {
            churn_fail(s, "release", id, rc);
            break;
        }
        if (seen != PA_STATUS_PENDING) break; /* an expirer won */
        rc = pa_table_transition(s->table, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED, &seen);
        if (rc == 0) {
            atomic_fetch_add(&s->release_wins, 1);
            break;
        }
        if (rc != -EAGAIN) {
            churn_fail(s, "cancel", id, rc);
            break;
        }
    }
    /* Expiry is a single step, so whichever side won, the record is final now. */
    int status = pa_table_status(s->table, id);
    if (status == PA_STATUS_RELEASED)
        atomic_fetch_add(&s->found_released, 1);
    else if (status == PA_STATUS_EXPIRED)
        atomic_fetch_add(&s->found_expired, 1);
    else
        churn_fail(s, "not final after the race", id, status);
    atomic_store(&s->published[slot], 0);
    /* unclaim before removing: after the removal the slot may be handed out at once */
    if (atomic_fetch_sub(&s->claims[(uint32_t)id], 1) != 1) churn_fail(s, "claim count", id, 0);
    int rc = pa_table_remove(s->table, id);
    if (rc != 0) churn_fail(s, "remove", id, rc);
}

static void *churn_main(void *p) {
    churn_arg_t *a = p;
    churn_shared_t *s = a->shared;
    uint64_t rng = 0xD1B54A32D192ED03ull * (uint64_t)(a->thread + 7);
    pa_id_t own[CHURN_OWN] = {0};
    for (long it = 0; it < s->iterations; it++) {
        uint64_t r = pa_rand_next(&rng);
        int k = (int)(r % CHURN_OWN);
        int slot = a->thread * CHURN_OWN + k;
        switch ((r >> 8) % 8) {
        case 0:
        case 1: /* insert into an empty own slot, or finish the record there */
            if (own[k] == 0) {
                pa_record_init_t init = {.status = (r >> 16) & 1 ? PA_STATUS_ALLOCATED : PA_STATUS_PENDING,
                                         .owner = (uint64_t)a->thread};
                pa_id_t id;
                int rc = pa_table_insert(s->table, &init, &id);
                if (rc != 0) {
                    churn_fail(s, "insert", 0, rc);
                    break;
                }
                atomic_fetch_add(&s->inserted, 1);
                if (atomic_fetch_add(&s->claims[(uint32_t)id], 1) != 0) churn_fail(s, "slot handed out twice", id, 0);
                if (pa_table_set_expiry(s->table, id, id, id) != 0) churn_fail(s, "set_expiry on own live record", id, 0);
                if (pa_table_set_allocated(s->table, id, allocated_for(id)) != 0) churn_fail(s, "set_allocated", id, 0);
                if (init.status == PA_STATUS_PENDING && ((r >> 17) & 1))
                    pa_table_transition(s->table, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_ALLOCATED, NULL);
                own[k] = id;
                atomic_store(&s->published[slot], id);
            } else {
                churn_finish(s, slot, own[k]);
                own[k] = 0;
            }
            break;
        case 2: { /* expire somebody's published record */
            pa_id_t id = atomic_load(&s->published[r % (THREADS * CHURN_OWN)]);
            if (!id) break;
            int rc = pa_table_transition(s->table, id,
                                         PA_STATUS_BIT(PA_STATUS_PENDING) | PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE),
                                         PA_STATUS_EXPIRED, NULL);
            if (rc == 0)
                atomic_fetch_add(&s->expire_wins, 1);
            else if (rc != -EAGAIN && rc != -ENOENT)
                churn_fail(s, "expire", id, rc);
            break;
        }
        case 3: { /* field writer on somebody's record: may race the owner's removal */
            pa_id_t id = atomic_load(&s->published[r % (THREADS * CHURN_OWN)]);
            if (!id) break;
            int rc = pa_table_set_allocated(s->table, id, allocated_for(id));
            if (rc != 0 && rc != -ENOENT) churn_fail(s, "set_allocated (other)", id, rc);
            break;
        }
        default: { /* read somebody's record */
            pa_id_t id = atomic_load(&s->published[r % (THREADS * CHURN_OWN)]);
            if (!id) break;
            pa_record_t rec;
            int rc = pa_table_get(s->table, id, &rec);
            if (rc == -ENOENT) break;
            if (rc != 0) {
                churn_fail(s, "get", id, rc);
                break;
            }
            atomic_fetch_add(&s->snapshots, 1);
            if (rec.id != id) churn_fail(s, "snapshot of another id", id, 0);
            if (rec.expires_ns != 0 && rec.expires_ns != id) churn_fail(s, "expires_ns of another record", id, 0);
            if (rec.timer != 0 && rec.timer != id) churn_fail(s, "timer of another record", id, 0);
            if (rec.allocated != 0 && rec.allocated != allocated_for(id)) churn_fail(s, "allocated of another record", id, 0);
            if (rec.owner >= THREADS) churn_fail(s, "owner out of range", id, (long)rec.owner);
            if (rec.status >= PA_STATUS_COUNT) churn_fail(s, "status out of range", id, rec.status);
            break;
        }
        }
    }
    for (int k = 0; k < CHURN_OWN; k++)
        if (own[k]) churn_finish(s, a->thread * CHURN_OWN + k, own[k]);
    return NULL;
}

static void test_churn(void) {
    static churn_shared_t s;
    memset(&s, 0, sizeof(s));
    REQUIRE(pa_table_create(CHURN_CAPACITY, &s.table) == 0);
    s.iterations = pa_stress(2000000);
    pthread_t threads[THREADS];
    churn_arg_t args[THREADS];
    for (int i = 0; i < THREADS; i++) {
        args[i] = (churn_arg_t){&s, i};
        REQUIRE(pthread_create(&threads[i], NULL, churn_main, &args[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    CHECK_EQ_INT(atomic_load(&s.failures), 0);
    long inserted = atomic_load(&s.inserted);
    CHECK(inserted > 0);
    CHECK(atomic_load(&s.snapshots) > 0);
    /* every record ended in exactly one final state, won by exactly one side */
    CHECK_EQ_INT(atomic_load(&s.found_released) + atomic_load(&s.found_expired), inserted);
    CHECK_EQ_INT(atomic_load(&s.release_wins), atomic_load(&s.found_released));
    CHECK_EQ_INT(atomic_load(&s.expire_wins), atomic_load(&s.found_expired));
    fprintf(stderr, "  churn: %ld records, %ld released, %ld expired, %ld snapshots\n", inserted,
            atomic_load(&s.found_released), atomic_load(&s.found_expired), atomic_load(&s.snapshots));
    CHECK_EQ_INT(pa_table_live(s.table), 0);
    size_t counts[PA_STATUS_COUNT];
    pa_table_count_by_status(s.table, counts);
    for (int i = 0; i < PA_STATUS_COUNT; i++) CHECK_EQ_INT(counts[i], 0);
    /* the free stack still holds every slot exactly once: fill the table completely */
    static pa_id_t ids[CHURN_CAPACITY];
    static unsigned char seen[CHURN_CAPACITY];
    memset(seen, 0, sizeof(seen));
    pa_record_init_t init = {.status = PA_STATUS_PENDING};
    int duplicates = 0;
    for (int i = 0; i < CHURN_CAPACITY; i++) {
        REQUIRE(pa_table_insert(s.table, &init, &ids[i]) == 0);
        if (seen[(uint32_t)ids[i]]++) duplicates++;
    }
    CHECK_EQ_INT(duplicates, 0);
    pa_id_t extra;
    CHECK_EQ_INT(pa_table_insert(s.table, &init, &extra), -ENOSPC);
    pa_table_destroy(s.table);
}

int main(void) {
    RUN_TEST(test_release_expire_race);
    RUN_TEST(test_churn);
    TEST_MAIN_END();
}
