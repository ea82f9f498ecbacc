/*
 * test_table.c — unit tests of the allocation table: insert/get/status, the transition
 * matrix against pa_status_transition_legal, stale ids, removal rules, capacity and reuse,
 * input validation that changes nothing, scans.
 */
#include <math.h>

#include "../../src/native/table_debug.h"
#include "pa_test.h"
#include "prealloc/table.h"

static pa_record_init_t make_init(uint32_t status, uint64_t request_id) {
    pa_record_init_t init = {0};
    init.status = status;
    init.resource_type = 3;
    init.requested = 1024.0;
    init.allocated = 512.5;
    init.expires_ns = 777;
    init.request_id = request_id;
    init.owner = 42;
    init.user_data = 0xABCDEF;
    return init;
}

/* Drives a fresh record from PENDING to `status` along legal edges. */
static int drive_to(pa_table_t *t, pa_id_t id, pa_status_t status) {
    static const pa_status_t path_to[PA_STATUS_COUNT][3] = {
        [PA_STATUS_PENDING] = {PA_STATUS_PENDING},
        [PA_STATUS_ALLOCATED] = {PA_STATUS_ALLOCATED},
        [PA_STATUS_ACTIVE] = {PA_STATUS_ALLOCATED, PA_STATUS_ACTIVE},
        [PA_STATUS_RELEASING] = {PA_STATUS_ALLOCATED, PA_STATUS_RELEASING},
        [PA_STATUS_RELEASED] = {PA_STATUS_RELEASED},
        [PA_STATUS_FAILED] = {PA_STATUS_FAILED},
        [PA_STATUS_EXPIRED] = {PA_STATUS_EXPIRED},
    };
    for (int i = 0; i < 3; i++) {
        pa_status_t step = path_to[status][i];
        if (step == PA_STATUS_PENDING) break;
        int rc = pa_table_transition(t, id, 0x7F, step, NULL);
        if (rc != 0) return rc;
        if (step == status) break;
    }
    return pa_table_status(t, id) == (int)status ? 0 : -1;
}

static void test_insert_get_status(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(100, &t) == 0);
    CHECK_EQ_INT(pa_table_capacity(t), 100);
    CHECK_EQ_INT(pa_table_live(t), 0);
    uint64_t before = pa_clock_now_ns();
    pa_record_init_t init = make_init(PA_STATUS_ALLOCATED, 9);
    pa_id_t id = 0;
    CHECK_EQ_INT(pa_table_insert(t, &init, &id), 0);
    CHECK(id != PA_ID_NONE);
    CHECK((id >> 32) >= 1); /* generation never 0 */
    CHECK_EQ_INT(pa_table_live(t), 1);
    pa_record_t r;
    CHECK_EQ_INT(pa_table_get(t, id, &r), 0);
    CHECK(r.id == id);
    CHECK_EQ_INT(r.status, PA_STATUS_ALLOCATED);
    CHECK_EQ_INT(r.resource_type, 3);
    CHECK(r.requested == 1024.0);
    CHECK(r.allocated == 512.5);
    CHECK(r.created_ns >= before && r.created_ns <= pa_clock_now_ns());
    CHECK(r.updated_ns == r.created_ns);
    CHECK_EQ_INT(r.expires_ns, 777);
    CHECK_EQ_INT(r.timer, 0);
    CHECK_EQ_INT(r.request_id, 9);
    CHECK_EQ_INT(r.owner, 42);
    CHECK_EQ_INT(r.user_data, 0xABCDEF);
    CHECK_EQ_INT(pa_table_status(t, id), PA_STATUS_ALLOCATED);

    CHECK_EQ_INT(pa_table_set_allocated(t, id, 2048.0), 0);
    CHECK_EQ_INT(pa_table_set_expiry(t, id, 123456, 99), 0);
    CHECK_EQ_INT(pa_table_get(t, id, &r), 0);
    CHECK(r.allocated == 2048.0);
    CHECK_EQ_INT(r.expires_ns, 123456);
    CHECK_EQ_INT(r.timer, 99);

    /* ids that name nothing */
    pa_record_t untouched;
    memset(&untouched, 0x5A, sizeof(untouched));
    r = untouched;
    CHECK_EQ_INT(pa_table_get(t, 0, &r), -ENOENT);
    CHECK_EQ_INT(pa_table_get(t, (1ull << 32) | 99, &r), -ENOENT);  /* never used slot */
    CHECK_EQ_INT(pa_table_get(t, (1ull << 32) | 100, &r), -ENOENT); /* beyond capacity */
    CHECK_EQ_INT(pa_table_get(t, id & 0xFFFFFFFFull, &r), -ENOENT);  /* generation 0 */
    CHECK_EQ_INT(pa_table_get(t, id + (1ull << 32), &r), -ENOENT);   /* other generation */
    CHECK(memcmp(&r, &untouched, sizeof(r)) == 0);
    CHECK_EQ_INT(pa_table_status(t, id + (1ull << 32)), -ENOENT);
    pa_table_destroy(t);
}

/* Every (from, to) pair: the transition succeeds exactly when the edge is legal. */
static void test_transition_matrix(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(PA_STATUS_COUNT * PA_STATUS_COUNT * 2, &t) == 0);
    int legal_edges = 0;
    for (unsigned from = 0; from < PA_STATUS_COUNT; from++) {
        for (unsigned to = 0; to < PA_STATUS_COUNT; to++) {
            pa_record_init_t init = make_init(PA_STATUS_PENDING, from * 10 + to);
            pa_id_t id;
            REQUIRE(pa_table_insert(t, &init, &id) == 0);
            REQUIRE(drive_to(t, id, (pa_status_t)from) == 0);
            pa_record_t before;
            REQUIRE(pa_table_get(t, id, &before) == 0);
            pa_status_t prev = (pa_status_t)99;
            int rc = pa_table_transition(t, id, PA_STATUS_BIT(from), (pa_status_t)to, &prev);
            bool legal = pa_status_transition_legal(from, to);
            legal_edges += legal;
            CHECK_EQ_INT(prev, from);
            if (legal) {
                CHECK_EQ_INT(rc, 0);
                CHECK_EQ_INT(pa_table_status(t, id), to);
                pa_record_t after;
                CHECK_EQ_INT(pa_table_get(t, id, &after), 0);
                CHECK(after.updated_ns >= before.updated_ns);
            } else {
                CHECK_EQ_INT(rc, -EINVAL);
                CHECK_EQ_INT(pa_table_status(t, id), from);
            }
            /* from_mask not containing the current status: -EAGAIN, no change */
            unsigned now_status = (unsigned)pa_table_status(t, id);
            prev = (pa_status_t)99;
            CHECK_EQ_INT(pa_table_transition(t, id, 0x7F & ~PA_STATUS_BIT(now_status), (pa_status_t)to, &prev),
                         -EAGAIN);
            CHECK_EQ_INT(prev, now_status);
            CHECK_EQ_INT(pa_table_status(t, id), now_status);
        }
    }
    CHECK_EQ_INT(legal_edges, 4 + 4 + 2 + 4); /* the edges common.h lists */
    /* `to` outside the status range */
    pa_record_init_t init = make_init(PA_STATUS_PENDING, 1);
    pa_id_t id;
    REQUIRE(pa_table_insert(t, &init, &id) == 0);
    CHECK_EQ_INT(pa_table_transition(t, id, 0x7F, (pa_status_t)7, NULL), -EINVAL);
    CHECK_EQ_INT(pa_table_transition(t, id, 0x7F, (pa_status_t)0xFF, NULL), -EINVAL);
    CHECK_EQ_INT(pa_table_status(t, id), PA_STATUS_PENDING);
    pa_table_destroy(t);
}

static void test_remove_and_stale_ids(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(8, &t) == 0);
    pa_record_init_t init = make_init(PA_STATUS_ALLOCATED, 5);
    pa_id_t id;
    REQUIRE(pa_table_insert(t, &init, &id) == 0);
    /* not final: cannot be removed */
    CHECK_EQ_INT(pa_table_remove(t, id), -EBUSY);
    REQUIRE(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_ACTIVE, NULL) == 0);
    CHECK_EQ_INT(pa_table_remove(t, id), -EBUSY);
    REQUIRE(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ACTIVE), PA_STATUS_RELEASING, NULL) == 0);
    CHECK_EQ_INT(pa_table_remove(t, id), -EBUSY);
    REQUIRE(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_RELEASING), PA_STATUS_RELEASED, NULL) == 0);
    /* final: field updates refused */
    CHECK_EQ_INT(pa_table_set_allocated(t, id, 1.0), -ENOENT);
    CHECK_EQ_INT(pa_table_set_expiry(t, id, 1, 1), -ENOENT);
    CHECK_EQ_INT(pa_table_live(t), 1);
    CHECK_EQ_INT(pa_table_remove(t, id), 0);
    CHECK_EQ_INT(pa_table_live(t), 0);

    /* every call with the stale id answers -ENOENT */
    pa_record_t r;
    CHECK_EQ_INT(pa_table_get(t, id, &r), -ENOENT);
    CHECK_EQ_INT(pa_table_status(t, id), -ENOENT);
    CHECK_EQ_INT(pa_table_transition(t, id, 0x7F, PA_STATUS_EXPIRED, NULL), -ENOENT);
    CHECK_EQ_INT(pa_table_set_allocated(t, id, 1.0), -ENOENT);
    CHECK_EQ_INT(pa_table_set_expiry(t, id, 1, 1), -ENOENT);
    CHECK_EQ_INT(pa_table_remove(t, id), -ENOENT);

    /* the slot is reused with another generation; the old id still names nothing */
    pa_id_t again;
    REQUIRE(pa_table_insert(t, &init, &again) == 0);
    CHECK_EQ_INT(again & 0xFFFFFFFFull, id & 0xFFFFFFFFull);
    CHECK((again >> 32) != (id >> 32));
    CHECK_EQ_INT(pa_table_status(t, id), -ENOENT);
    CHECK_EQ_INT(pa_table_transition(t, id, 0x7F, PA_STATUS_EXPIRED, NULL), -ENOENT);
    CHECK_EQ_INT(pa_table_remove(t, id), -ENOENT);
    CHECK_EQ_INT(pa_table_status(t, again), PA_STATUS_ALLOCATED);
    pa_table_destroy(t);
}

static void test_capacity_and_reuse(void) {
    enum { CAP = PA_TABLE_CHUNK_SLOTS + 3 }; /* two chunks, the second partial */
    pa_table_t *t;
    REQUIRE(pa_table_create(CAP, &t) == 0);
    static pa_id_t ids[CAP];
    pa_record_init_t init = make_init(PA_STATUS_PENDING, 0);
    for (uint32_t i = 0; i < CAP; i++) {
        init.request_id = i;
        REQUIRE(pa_table_insert(t, &init, &ids[i]) == 0);
    }
    CHECK_EQ_INT(pa_table_live(t), CAP);
    pa_id_t extra;
    CHECK_EQ_INT(pa_table_insert(t, &init, &extra), -ENOSPC);
    CHECK_EQ_INT(pa_table_live(t), CAP);
    /* each record still holds its own request id */
    int wrong = 0;
    for (uint32_t i = 0; i < CAP; i++) {
        pa_record_t r;
        if (pa_table_get(t, ids[i], &r) != 0 || r.request_id != i) wrong++;
    }
    CHECK_EQ_INT(wrong, 0);
    /* free three, get exactly three back, each with a new generation */
    uint32_t freed[3] = {0, PA_TABLE_CHUNK_SLOTS, CAP - 1};
    for (int k = 0; k < 3; k++) {
        REQUIRE(pa_table_transition(t, ids[freed[k]], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_FAILED, NULL) == 0);
        REQUIRE(pa_table_remove(t, ids[freed[k]]) == 0);
    }
    CHECK_EQ_INT(pa_table_live(t), CAP - 3);
    for (int k = 0; k < 3; k++) {
        pa_id_t id;
        CHECK_EQ_INT(pa_table_insert(t, &init, &id), 0);
        bool reused_freed = false;
        for (int j = 0; j < 3; j++)
            if ((id & 0xFFFFFFFFull) == freed[j] && (id >> 32) == (ids[freed[j]] >> 32) + 1) reused_freed = true;
        CHECK(reused_freed);
    }
    CHECK_EQ_INT(pa_table_insert(t, &init, &extra), -ENOSPC);
    pa_table_destroy(t);
}

static void test_bad_input_changes_nothing(void) {
    pa_table_t *t;
    CHECK_EQ_INT(pa_table_create(0, &t), -EINVAL);
    CHECK_EQ_INT(pa_table_create(PA_TABLE_MAX_CAPACITY + 1, &t), -EINVAL);
    CHECK_EQ_INT(pa_table_create(4, NULL), -EINVAL);
    REQUIRE(pa_table_create(4, &t) == 0);
    pa_record_init_t good = make_init(PA_STATUS_PENDING, 1);
    pa_id_t keep;
    REQUIRE(pa_table_insert(t, &good, &keep) == 0);

    pa_record_init_t bad[8];
    for (int i = 0; i < 8; i++) bad[i] = good;
    bad[0].status = PA_STATUS_ACTIVE;
    bad[1].status = PA_STATUS_RELEASED;
    bad[2].status = 99;
    bad[3].requested = NAN;
    bad[4].requested = -1.0;
    bad[5].allocated = INFINITY;
    bad[6].allocated = -0.5;
    bad[7].requested = -INFINITY;
    for (int i = 0; i < 8; i++) {
        pa_id_t id = 12345;
        CHECK_EQ_INT(pa_table_insert(t, &bad[i], &id), -EINVAL);
        CHECK_EQ_INT(id, 12345);
    }
    pa_id_t id;
    CHECK_EQ_INT(pa_table_insert(t, NULL, &id), -EINVAL);
    CHECK_EQ_INT(pa_table_insert(t, &good, NULL), -EINVAL);
    CHECK_EQ_INT(pa_table_set_allocated(t, keep, NAN), -EINVAL);
    CHECK_EQ_INT(pa_table_set_allocated(t, keep, -3.0), -EINVAL);
    CHECK_EQ_INT(pa_table_live(t), 1);
    size_t counts[PA_STATUS_COUNT];
    pa_table_count_by_status(t, counts);
    CHECK_EQ_INT(counts[PA_STATUS_PENDING], 1);
    pa_record_t r;
    REQUIRE(pa_table_get(t, keep, &r) == 0);
    CHECK(r.allocated == good.allocated);
    /* capacity still 4: three more fit (no slot was consumed by the rejected inserts) */
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(pa_table_insert(t, &good, &id), 0);
    CHECK_EQ_INT(pa_table_insert(t, &good, &id), -ENOSPC);
    pa_table_destroy(t);
    pa_table_destroy(NULL);
}

static void test_collect_and_count(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(64, &t) == 0);
    pa_id_t ids[20];
    for (int i = 0; i < 20; i++) {
        pa_record_init_t init = make_init(PA_STATUS_PENDING, (uint64_t)i);
        REQUIRE(pa_table_insert(t, &init, &ids[i]) == 0);
        REQUIRE(drive_to(t, ids[i], (pa_status_t)(i % PA_STATUS_COUNT)) == 0);
    }
    size_t counts[PA_STATUS_COUNT];
    pa_table_count_by_status(t, counts);
    for (unsigned s = 0; s < PA_STATUS_COUNT; s++) {
        size_t expect = 0;
        for (int i = 0; i < 20; i++) expect += (unsigned)(i % PA_STATUS_COUNT) == s;
        CHECK_EQ_INT(counts[s], expect);
    }
    /* removed records vanish from scans */
    REQUIRE(pa_table_remove(t, ids[4]) == 0); /* i = 4: RELEASED */
    pa_id_t out[64];
    size_t n = 99;
    CHECK_EQ_INT(pa_table_collect(t, PA_STATUS_FINAL_MASK, out, 64, &n), 0);
    size_t expect_final = 0;
    for (int i = 0; i < 20; i++) expect_final += (i % PA_STATUS_COUNT) >= PA_STATUS_RELEASED && i != 4;
    CHECK_EQ_INT(n, expect_final);
    for (size_t k = 0; k < n; k++) {
        int st = pa_table_status(t, out[k]);
        CHECK(st >= PA_STATUS_RELEASED);
        CHECK(out[k] != ids[4]);
    }
    /* max bounds the output */
    CHECK_EQ_INT(pa_table_collect(t, 0x7F, out, 3, &n), 0);
    CHECK_EQ_INT(n, 3);
    CHECK_EQ_INT(pa_table_collect(t, 0x7F, NULL, 0, &n), 0);
    CHECK_EQ_INT(n, 0);
    CHECK_EQ_INT(pa_table_collect(t, 0x7F, NULL, 5, &n), -EINVAL);
    CHECK_EQ_INT(pa_table_collect(t, PA_STATUS_BIT(PA_STATUS_ACTIVE), out, 64, &n), 0);
    CHECK_EQ_INT(n, 3); /* i = 2, 9, 16 */
    pa_table_destroy(t);
}

/* A generation survives many reuses of one slot and ids stay distinct. */
/* allocated_ns / active_ns: stamped on the first entry into ALLOCATED / ACTIVE and kept
 * when a failed release reverts into them. */
static void test_lifecycle_stamps(void) {
    pa_table_t *t = NULL;
    REQUIRE(pa_table_create(8, &t) == 0);
    pa_record_init_t init = {.status = PA_STATUS_PENDING, .requested = 1.0};
    pa_id_t id = 0;
    REQUIRE(pa_table_insert(t, &init, &id) == 0);
    pa_record_t r;
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.allocated_ns == 0 && r.active_ns == 0);
    uint64_t before = pa_clock_now_ns();
    CHECK_EQ_INT(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_ALLOCATED, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.allocated_ns >= before && r.allocated_ns >= r.created_ns && r.active_ns == 0);
    uint64_t allocated_at = r.allocated_ns;
    CHECK_EQ_INT(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_ACTIVE, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.active_ns >= allocated_at && r.allocated_ns == allocated_at);
    uint64_t active_at = r.active_ns;
    CHECK_EQ_INT(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ACTIVE), PA_STATUS_RELEASING, NULL), 0);
    CHECK_EQ_INT(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_RELEASING), PA_STATUS_ACTIVE, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.active_ns == active_at && r.allocated_ns == allocated_at);
    /* a record inserted ALLOCATED is stamped at insert */
    init.status = PA_STATUS_ALLOCATED;
    pa_id_t id2 = 0;
    REQUIRE(pa_table_insert(t, &init, &id2) == 0);
    REQUIRE(pa_table_get(t, id2, &r) == 0);
    CHECK(r.allocated_ns == r.created_ns && r.allocated_ns != 0);
    /* a reused slot starts clean */
    CHECK_EQ_INT(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_ACTIVE), PA_STATUS_EXPIRED, NULL), 0);
    CHECK_EQ_INT(pa_table_remove(t, id), 0);
    init.status = PA_STATUS_PENDING;
    pa_id_t id3 = 0;
    REQUIRE(pa_table_insert(t, &init, &id3) == 0);
    REQUIRE(pa_table_get(t, id3, &r) == 0);
    CHECK(r.allocated_ns == 0 && r.active_ns == 0);
    pa_table_destroy(t);
}

/* The _at variants stamp the caller's time, never earlier than the record's creation. */
static void test_caller_timestamps(void) {
    pa_table_t *t = NULL;
    REQUIRE(pa_table_create(8, &t) == 0);
    pa_record_init_t init = {.status = PA_STATUS_PENDING, .requested = 1.0};
    pa_id_t id = 0;
    REQUIRE(pa_table_insert_at(t, &init, 1000, &id) == 0);
    pa_record_t r;
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.created_ns == 1000 && r.updated_ns == 1000 && r.allocated_ns == 0);
    CHECK_EQ_INT(pa_table_transition_at(t, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_ALLOCATED, 5000, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.allocated_ns == 5000 && r.updated_ns == 5000);
    /* a time before the creation is raised to it */
    CHECK_EQ_INT(pa_table_transition_at(t, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_ACTIVE, 10, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.active_ns == 1000 && r.updated_ns == 1000);
    /* 0 reads the clock */
    uint64_t before = pa_clock_now_ns();
    CHECK_EQ_INT(pa_table_transition_at(t, id, PA_STATUS_BIT(PA_STATUS_ACTIVE), PA_STATUS_RELEASING, 0, NULL), 0);
    REQUIRE(pa_table_get(t, id, &r) == 0);
    CHECK(r.updated_ns >= before);
    CHECK_EQ_INT(pa_table_insert_at(t, NULL, 5, &id), -EINVAL);
    pa_table_destroy(t);
}

static void test_generation_cycles(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(1, &t) == 0);
    pa_record_init_t init = make_init(PA_STATUS_PENDING, 0);
    pa_id_t previous = 0;
    int repeats = 0;
    for (int i = 0; i < 1000; i++) {
        pa_id_t id;
        REQUIRE(pa_table_insert(t, &init, &id) == 0);
        if (id == previous) repeats++;
        if (previous) CHECK_EQ_INT(pa_table_status(t, previous), -ENOENT);
        REQUIRE(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_EXPIRED, NULL) == 0);
        REQUIRE(pa_table_remove(t, id) == 0);
        previous = id;
    }
    CHECK_EQ_INT(repeats, 0);
    CHECK_EQ_INT(previous >> 32, 1000);
    pa_table_destroy(t);
}

/* One record churned in a loop: reuse is spread, so no slot's generation runs ahead
 * (a LIFO free list gives the one hot slot every cycle: generation 300000 here). */
static void test_generation_spread(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(4096, &t) == 0);
    pa_record_init_t init = make_init(PA_STATUS_PENDING, 0);
    uint32_t highest = 0;
    const int cycles = 300000;
    for (int i = 0; i < cycles; i++) {
        pa_id_t id;
        REQUIRE(pa_table_insert(t, &init, &id) == 0);
        if ((uint32_t)(id >> 32) > highest) highest = (uint32_t)(id >> 32);
        REQUIRE(pa_table_transition(t, id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_EXPIRED, NULL) == 0);
        REQUIRE(pa_table_remove(t, id) == 0);
    }
    CHECK(highest <= 65536u);
    if (highest > 65536u) fprintf(stderr, "  highest generation %u after %d cycles\n", highest, cycles);
    pa_table_destroy(t);
}

/* The generation wraps from 2^32 - 1 to 1, never 0: the new record is reachable, its id is
 * not PA_ID_NONE, and the id from before the wrap is stale. */
static void test_generation_wrap(void) {
    pa_table_t *t;
    REQUIRE(pa_table_create(1, &t) == 0);
    REQUIRE(pa__table_set_generation(t, 0, UINT32_MAX) == 0);
    CHECK_EQ_INT(pa__table_set_generation(t, 0, 0), -EINVAL);
    pa_record_init_t init = make_init(PA_STATUS_PENDING, 0);
    pa_id_t old_id, new_id;
    REQUIRE(pa_table_insert(t, &init, &old_id) == 0);
    CHECK_EQ_INT(old_id >> 32, UINT32_MAX);
    CHECK_EQ_INT(pa__table_set_generation(t, 0, 5), -EBUSY);
    REQUIRE(pa_table_transition(t, old_id, PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_EXPIRED, NULL) == 0);
    REQUIRE(pa_table_remove(t, old_id) == 0);
    REQUIRE(pa_table_insert(t, &init, &new_id) == 0);
    CHECK(new_id != PA_ID_NONE);
    CHECK_EQ_INT(new_id >> 32, 1);
    pa_record_t r;
    CHECK_EQ_INT(pa_table_get(t, new_id, &r), 0);
    CHECK_EQ_INT(pa_table_status(t, new_id), PA_STATUS_PENDING);
    CHECK_EQ_INT(pa_table_get(t, old_id, &r), -ENOENT);
    pa_table_destroy(t);
}

int main(void) {
    RUN_TEST(test_insert_get_status);
    RUN_TEST(test_transition_matrix);
    RUN_TEST(test_remove_and_stale_ids);
    RUN_TEST(test_capacity_and_reuse);
    RUN_TEST(test_bad_input_changes_nothing);
    RUN_TEST(test_collect_and_count);
    RUN_TEST(test_generation_cycles);
    RUN_TEST(test_generation_spread);
    RUN_TEST(test_generation_wrap);
    RUN_TEST(test_lifecycle_stamps);
    RUN_TEST(test_caller_timestamps);
    TEST_MAIN_END();
}
