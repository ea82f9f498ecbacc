/*
 * test_wheel.c — the hierarchical timer wheel: unit tests, and a randomized model test
 * against a plain array of (deadline, value) that says which timers must fire on each
 * advance: exactly those whose rounded-up deadline tick has been reached (or whose deadline
 * had already passed when scheduled), each once, never early, in deadline order.
 */
#include "pa_test.h"
#include "prealloc/wheel.h"

#define MS 1000000ull

typedef struct fired {
    pa_timer_id_t timer;
    uint64_t value;
    uint64_t deadline_ns;
} fired_t;

typedef struct fire_log {
    fired_t *items;
    size_t count, cap;
} fire_log_t;

static void record_fire(void *ctx, pa_timer_id_t timer, uint64_t value, uint64_t deadline_ns) {
    fire_log_t *log = ctx;
    if (log->count == log->cap) {
        log->cap = log->cap ? log->cap * 2 : 64;
        log->items = realloc(log->items, log->cap * sizeof(*log->items));
    }
    log->items[log->count++] = (fired_t){timer, value, deadline_ns};
}

static void test_create_validation(void) {
    pa_wheel_t *w;
    CHECK_EQ_INT(pa_wheel_create(0, 0, 10, &w), -EINVAL);
    CHECK_EQ_INT(pa_wheel_create(MS, 0, 0, &w), -EINVAL);
    CHECK_EQ_INT(pa_wheel_create(MS, 0, (1u << 31) + 1, &w), -EINVAL);
    CHECK_EQ_INT(pa_wheel_create(MS, 0, 10, NULL), -EINVAL);
    REQUIRE(pa_wheel_create(MS, 5 * MS + 3, 10, &w) == 0);
    CHECK_EQ_INT(pa_wheel_now(w), 5 * MS + 3);
    CHECK_EQ_INT(pa_wheel_tick_ns(w), MS);
    CHECK_EQ_INT(pa_wheel_pending(w), 0);
    uint64_t wake;
    CHECK_EQ_INT(pa_wheel_next_wakeup(w, &wake), -ENOENT);
    pa_wheel_destroy(w);
    pa_wheel_destroy(NULL);
}

static void test_rounding_and_exact_tick(void) {
    pa_wheel_t *w;
    REQUIRE(pa_wheel_create(MS, 0, 16, &w) == 0);
    fire_log_t log = {0};
    pa_timer_id_t a, b;
    REQUIRE(pa_wheel_schedule(w, 5 * MS + MS / 2, 11, &a) == 0); /* rounds up to 6 ms */
    REQUIRE(pa_wheel_schedule(w, 6 * MS, 12, &b) == 0);           /* exactly on a boundary */
    CHECK(a != 0 && b != 0 && a != b);
    uint64_t wake;
    CHECK_EQ_INT(pa_wheel_next_wakeup(w, &wake), 0);
    CHECK_EQ_INT(wake, 6 * MS);
    CHECK_EQ_INT(pa_wheel_advance(w, 6 * MS - 1, record_fire, &log), 0);
    CHECK_EQ_INT(log.count, 0);
    CHECK_EQ_INT(pa_wheel_advance(w, 6 * MS, record_fire, &log), 2);
    REQUIRE(log.count == 2);
    CHECK(log.items[0].timer == a && log.items[0].value == 11 && log.items[0].deadline_ns == 5 * MS + MS / 2);
    CHECK(log.items[1].timer == b && log.items[1].value == 12);
    CHECK_EQ_INT(pa_wheel_pending(w), 0);
    /* fired timers are gone */
    CHECK_EQ_INT(pa_wheel_cancel(w, a), -ENOENT);
    CHECK_EQ_INT(pa_wheel_cancel(w, b), -ENOENT);
    CHECK_EQ_INT(pa_wheel_advance(w, 100 * MS, record_fire, &log), 0);
    /* time never goes back */
    CHECK_EQ_INT(pa_wheel_now(w), 100 * MS);
    pa_wheel_advance(w, 50 * MS, record_fire, &log);
    CHECK_EQ_INT(pa_wheel_now(w), 100 * MS);
    /* a deadline already passed fires on the next advance, even with the same now */
    pa_timer_id_t past;
    REQUIRE(pa_wheel_schedule(w, 99 * MS + 1, 13, &past) == 0);
    CHECK_EQ_INT(pa_wheel_next_wakeup(w, &wake), 0);
    CHECK(wake <= 100 * MS);
    CHECK_EQ_INT(pa_wheel_advance(w, 100 * MS, record_fire, &log), 1);
    CHECK(log.count == 3 && log.items[2].value == 13);
    free(log.items);
    pa_wheel_destroy(w);
}

static void test_cancel_and_capacity(void) {
    pa_wheel_t *w;
    REQUIRE(pa_wheel_create(MS, 0, 300, &w) == 0); /* > the initial pool: exercises growth */
    pa_timer_id_t ids[300];
    for (int i = 0; i < 300; i++) REQUIRE(pa_wheel_schedule(w, (uint64_t)(i + 1) * 10 * MS, (uint64_t)i, &ids[i]) == 0);
    pa_timer_id_t extra;
    CHECK_EQ_INT(pa_wheel_schedule(w, MS, 999, &extra), -ENOSPC);
    CHECK_EQ_INT(pa_wheel_pending(w), 300);
    for (int i = 0; i < 300; i += 2) CHECK_EQ_INT(pa_wheel_cancel(w, ids[i]), 0);
    for (int i = 0; i < 300; i += 2) CHECK_EQ_INT(pa_wheel_cancel(w, ids[i]), -ENOENT);
    CHECK_EQ_INT(pa_wheel_cancel(w, 0), -ENOENT);
    CHECK_EQ_INT(pa_wheel_cancel(w, ids[1] + (1ull << 32)), -ENOENT);
    CHECK_EQ_INT(pa_wheel_cancel(w, ((pa_timer_id_t)1 << 32) | 5000), -ENOENT);
    CHECK_EQ_INT(pa_wheel_pending(w), 150);
    /* a reused node gets a new id; the cancelled id stays stale */
    pa_timer_id_t reused;
    REQUIRE(pa_wheel_schedule(w, 5 * MS, 1000, &reused) == 0);
    CHECK((uint32_t)reused == (uint32_t)ids[298]); /* the last freed node is reused first */
    CHECK(reused != ids[298]);
    CHECK_EQ_INT(pa_wheel_cancel(w, ids[298]), -ENOENT);
    fire_log_t log = {0};
    CHECK_EQ_INT(pa_wheel_advance(w, 10000 * MS, record_fire, &log), 151);
    bool only_odd = true;
    for (size_t i = 0; i < log.count; i++)
        if (log.items[i].value != 1000 && log.items[i].value % 2 == 0) only_odd = false;
    CHECK(only_odd);
    free(log.items);
    pa_wheel_destroy(w);
}

/* A far timer cascades down level by level, and next_wakeup leads there with no fire
 * before the deadline. */
static void test_cascade_walk(void) {
    pa_wheel_t *w;
    const uint64_t start = 123456789ull * MS;
    REQUIRE(pa_wheel_create(MS, start, 4, &w) == 0);
    const uint64_t deadline = start + 3ull * 24 * 3600 * 1000 * MS + 777 * MS + 1; /* ~3 days: level 4 */
    REQUIRE(pa_wheel_schedule(w, deadline, 1, NULL) == 0);
    fire_log_t log = {0};
    int wakeups = 0;
    uint64_t wake;
    while (pa_wheel_next_wakeup(w, &wake) == 0) {
        CHECK(wake <= deadline + MS);
        CHECK(wake > pa_wheel_now(w));
        pa_wheel_advance(w, wake - 1, record_fire, &log);
        CHECK_EQ_INT(log.count, 0);
        pa_wheel_advance(w, wake, record_fire, &log);
        if (++wakeups > 20) break;
    }
    CHECK(wakeups >= 2 && wakeups <= PA_WHEEL_LEVELS);
    REQUIRE(log.count == 1);
    CHECK_EQ_INT(pa_wheel_now(w), (deadline / MS + 1) * MS);
    free(log.items);
    pa_wheel_destroy(w);
}

/* ---------------- the model test ---------------- */

typedef struct model_timer {
    pa_timer_id_t id;
    uint64_t deadline_ns;
    uint64_t value;
    uint64_t fire_tick; /* the tick from which it must fire */
    bool due_at_schedule; /* deadline <= now when scheduled: fires on the next advance */
    bool live;
} model_timer_t;

static uint64_t ceil_div(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/* A random offset whose size lands in a random level, or beyond the span. */
static uint64_t random_span(uint64_t *rng, uint64_t tick_ns) {
    unsigned level = (unsigned)(pa_rand_next(rng) % 9); /* 0..5 levels, 6..8 beyond */
    unsigned bits = 6 * (level + 1);
    if (bits > 48) bits = 48;
    uint64_t ticks = pa_rand_next(rng) & ((1ull << bits) - 1);
    if (ticks > UINT64_MAX / 4 / tick_ns) ticks = UINT64_MAX / 4 / tick_ns;
    return ticks * tick_ns + pa_rand_next(rng) % tick_ns;
}

/* Model time stays below this, so deadlines near the end of time never come due. */
#define TIME_CAP (UINT64_MAX / 2)
static uint64_t later(uint64_t now, uint64_t by) { return by > TIME_CAP - now ? TIME_CAP : now + by; }

static void run_model(uint64_t seed, uint64_t tick_ns, long steps) {
    enum { CAP = 1024 };
    uint64_t rng = seed;
    uint64_t now = (pa_rand_next(&rng) % (1ull << 50)) * (tick_ns > 1000 ? 1 : 1000) + pa_rand_next(&rng) % 1000;
    pa_wheel_t *w;
    REQUIRE(pa_wheel_create(tick_ns, now, CAP, &w) == 0);
    /* indexed by the timer id's node index: a node holds at most one live timer */
    static model_timer_t model[CAP];
    memset(model, 0, sizeof(model));
    const size_t model_count = CAP;
    size_t live = 0;
    fire_log_t log = {0};
    long fired_total = 0, failures_before = pa_test_failures;
    uint64_t next_value = 1;

    for (long step = 0; step < steps && pa_test_failures - failures_before < 5; step++) {
        uint64_t r = pa_rand_next(&rng) % 100;
        if (r < 50 && live < CAP) {
            /* schedule: mostly ahead, some already due, a few at the far end of time */
            uint64_t deadline;
            uint64_t kind = pa_rand_next(&rng) % 20;
            if (kind == 0)
                deadline = now - (pa_rand_next(&rng) % (now + 1)) / 2;
            else if (kind == 1)
                deadline = now;
            else if (kind == 2)
                deadline = UINT64_MAX - pa_rand_next(&rng) % 1000;
            else
                deadline = later(now, random_span(&rng, tick_ns));
            pa_timer_id_t id;
            int rc = pa_wheel_schedule(w, deadline, next_value, &id);
            CHECK_EQ_INT(rc, 0);
            if (rc != 0) continue;
            CHECK(id != 0);
            REQUIRE((uint32_t)id < CAP);
            model_timer_t *m = &model[(uint32_t)id];
            CHECK(!m->live);
            m->id = id;
            m->deadline_ns = deadline;
            m->value = next_value++;
            m->due_at_schedule = deadline <= now;
            m->fire_tick = ceil_div(deadline, tick_ns);
            if (m->due_at_schedule && m->fire_tick > now / tick_ns) m->fire_tick = now / tick_ns;
            m->live = true;
            live++;
        } else if (r < 65 && live > 0) {
            /* cancel a random live timer, then again (stale) */
            size_t pick = pa_rand_next(&rng) % model_count;
            while (!model[pick].live) pick = (pick + 1) % model_count;
            CHECK_EQ_INT(pa_wheel_cancel(w, model[pick].id), 0);
            CHECK_EQ_INT(pa_wheel_cancel(w, model[pick].id), -ENOENT);
            model[pick].live = false;
            live--;
        } else {
            /* advance: small steps, jumps to the next wakeup, huge jumps */
            uint64_t target;
            uint64_t wake = 0;
            int wrc = pa_wheel_next_wakeup(w, &wake);
            CHECK_EQ_INT(wrc, live ? 0 : -ENOENT);
            if (wrc == 0) {
                /* never later than the earliest pending rounded deadline */
                uint64_t earliest = UINT64_MAX;
                for (size_t i = 0; i < model_count; i++)
                    if (model[i].live && model[i].fire_tick < earliest) earliest = model[i].fire_tick;
                uint64_t earliest_ns = earliest > UINT64_MAX / tick_ns ? UINT64_MAX : earliest * tick_ns;
                CHECK(wake <= earliest_ns);
            }
            uint64_t how = pa_rand_next(&rng) % 10;
            if (how < 3 && wrc == 0)
                target = wake > now ? wake - (pa_rand_next(&rng) & 1) : now; /* just before, or at */
            else if (how < 7)
                target = later(now, pa_rand_next(&rng) % (tick_ns * 200));
            else if (how < 9)
                target = later(now, random_span(&rng, tick_ns));
            else
                target = now; /* same time again */
            if (target > TIME_CAP) target = TIME_CAP > now ? TIME_CAP : now;
            if (target < now) target = now;

            uint64_t target_tick = target / tick_ns;
            size_t expect = 0;
            for (size_t i = 0; i < model_count; i++)
                if (model[i].live && (model[i].due_at_schedule || model[i].fire_tick <= target_tick)) expect++;
            log.count = 0;
            size_t n = pa_wheel_advance(w, target, record_fire, &log);
            CHECK_EQ_INT(n, expect);
            CHECK_EQ_INT(log.count, expect);
            CHECK_EQ_INT(pa_wheel_now(w), target);
            uint64_t previous_tick = 0;
            for (size_t k = 0; k < log.count; k++) {
                /* find it in the model: it must be live (fires once) and due */
                model_timer_t *m = &model[(uint32_t)log.items[k].timer % CAP];
                CHECK(m->live && m->id == log.items[k].timer);
                if (!m->live || m->id != log.items[k].timer) continue;
                CHECK_EQ_INT(m->value, log.items[k].value);
                CHECK_EQ_INT(m->deadline_ns, log.items[k].deadline_ns);
                CHECK(m->deadline_ns <= target); /* never early */
                CHECK(m->due_at_schedule || m->fire_tick <= target_tick);
                CHECK(m->fire_tick >= previous_tick); /* deadline order */
                previous_tick = m->fire_tick;
                CHECK_EQ_INT(pa_wheel_cancel(w, m->id), -ENOENT);
                m->live = false;
                live--;
            }
            fired_total += (long)log.count;
            now = target;
        }
        CHECK_EQ_INT(pa_wheel_pending(w), live);
    }
    /* drain everything that can still fire; the rest (deadlines near the end of time) stays */
    log.count = 0;
    pa_wheel_advance(w, UINT64_MAX - 2000, record_fire, &log);
    for (size_t k = 0; k < log.count; k++) CHECK(log.items[k].deadline_ns <= UINT64_MAX - 2000);
    fired_total += (long)log.count;
    CHECK(fired_total > 0);
    free(log.items);
    pa_wheel_destroy(w);
}

static void test_model_random(void) {
    const uint64_t ticks[] = {1, 3, 1000, MS, 7 * MS + 13};
    long steps = pa_stress(50000);
    for (unsigned i = 0; i < sizeof(ticks) / sizeof(ticks[0]); i++)
        for (uint64_t seed = 1; seed <= 4; seed++) run_model(seed * 0x9E3779B97F4A7C15ull + i, ticks[i], steps);
}

/* Many timers in one tick and across ticks: exact counts, deterministic order. */
static void test_same_tick_determinism(void) {
    fire_log_t logs[2] = {{0}, {0}};
    for (int run = 0; run < 2; run++) {
        pa_wheel_t *w;
        REQUIRE(pa_wheel_create(MS, 0, 5000, &w) == 0);
        uint64_t rng = 77;
        for (uint64_t i = 0; i < 5000; i++) pa_wheel_schedule(w, (pa_rand_next(&rng) % 300) * MS / 3, i, NULL);
        pa_wheel_advance(w, 40 * MS, record_fire, &logs[run]);
        pa_wheel_advance(w, 200 * MS, record_fire, &logs[run]);
        CHECK_EQ_INT(pa_wheel_pending(w), 0);
        pa_wheel_destroy(w);
    }
    CHECK_EQ_INT(logs[0].count, 5000);
    REQUIRE(logs[0].count == logs[1].count);
    bool same = true;
    for (size_t i = 0; i < logs[0].count; i++)
        if (logs[0].items[i].value != logs[1].items[i].value) same = false;
    CHECK(same);
    free(logs[0].items);
    free(logs[1].items);
}

/* A schedule/fire loop with one timer pending spreads over nodes: no timer id's
 * generation runs ahead (a LIFO free list gives one node every cycle). */
static void test_generation_spread(void) {
    pa_wheel_t *w;
    REQUIRE(pa_wheel_create(1000, 0, 1u << 20, &w) == 0);
    uint32_t highest = 0;
    uint64_t now = 0;
    for (int i = 0; i < 300000; i++) {
        pa_timer_id_t id;
        REQUIRE(pa_wheel_schedule(w, now + 1000, (uint64_t)i, &id) == 0);
        if ((uint32_t)(id >> 32) > highest) highest = (uint32_t)(id >> 32);
        if (i % 2) {
            now += 1000;
            REQUIRE(pa_wheel_advance(w, now, NULL, NULL) == 1);
        } else {
            REQUIRE(pa_wheel_cancel(w, id) == 0);
        }
    }
    CHECK(highest <= 65536u);
    if (highest > 65536u) fprintf(stderr, "  highest generation %u\n", highest);
    CHECK_EQ_INT(pa_wheel_pending(w), 0);
    pa_wheel_destroy(w);
}

int main(void) {
    RUN_TEST(test_create_validation);
    RUN_TEST(test_rounding_and_exact_tick);
    RUN_TEST(test_cancel_and_capacity);
    RUN_TEST(test_cascade_walk);
    RUN_TEST(test_same_tick_determinism);
    RUN_TEST(test_model_random);
    RUN_TEST(test_generation_spread);
    TEST_MAIN_END();
}
