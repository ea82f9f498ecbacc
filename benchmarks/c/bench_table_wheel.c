/*
 * bench_table_wheel.c — the allocation table, the timer wheel and the ticker against what a
 * C programmer would write instead, in the same run.
 *
 * (1) Table, one thread: insert, get (wait-free lookup), transition (one CAS), remove, and
 *     the whole cycle insert+get+transition+remove on a small working set, against a slab
 *     (array + free list + generations) guarded by a pthread mutex doing the same
 *     operations with the same checks. Inserts take slots from the free stack (a warm-up
 *     pass touched every slot first), as they do in a long-running engine.
 * (2) Wheel, one thread: schedule + cancel, and schedule + fire (advance in 1-tick steps
 *     over the deadlines), against a binary min-heap with a position array (cancel by
 *     handle in O(log n)) guarded by a pthread mutex, and the same heap without the lock.
 *     The wheel itself has no lock (single owner); (3) shows the locked ticker path.
 * (3) Ticker: pa_ticker_schedule + pa_ticker_cancel (mutex, wheel, table set_expiry,
 *     queue reservation), against the mutex heap's push + cancel.
 * (4) Table, 2 threads: each thread runs the insert+get+transition+remove cycle on the
 *     shared table, against the mutex slab shared the same way.
 *
 * ops/s counts each public call as one op; a "cycle" is the calls it names. Each figure is
 * the best of --runs runs (the median is printed too). ratio = ours / baseline (higher is
 * better for us). Issue target: table and wheel operations >= 20 M/s single-threaded.
 *
 * Usage: bench_table_wheel [--records N] [--timers N] [--runs N] [--cycles N]
 * Defaults: 262144 records, 262144 timers, 5 runs, 2000000 cycles per thread.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "prealloc/table.h"
#include "prealloc/wheel.h"

#define MAX_RUNS 51
#define MS 1000000ull

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void die(const char *what, int rc) {
    fprintf(stderr, "%s failed: %d\n", what, rc);
    exit(1);
}

/* Keeps a value alive so the compiler cannot drop the loop that made it. */
static volatile uint64_t sink;

/* ------------------------------------------------------------------ */
/* The baseline table: a mutex-guarded slab with a free list.          */
/* ------------------------------------------------------------------ */

typedef struct slab_slot {
    uint32_t generation;
    uint32_t status; /* 0xFF = free */
    uint32_t next_free;
    uint32_t resource_type;
    double requested, allocated;
    uint64_t created_ns, updated_ns, expires_ns, timer, request_id, owner, user_data;
} slab_slot_t;

typedef struct slab {
    pthread_mutex_t lock;
    slab_slot_t *slots;
    uint32_t capacity, used, free_head; /* free_head: index + 1, 0 = empty */
    size_t live;
} slab_t;

static void slab_init(slab_t *s, uint32_t capacity) {
    pthread_mutex_init(&s->lock, NULL);
    s->slots = calloc(capacity, sizeof(*s->slots));
    if (!s->slots) die("calloc", -ENOMEM);
    s->capacity = capacity;
    s->used = 0;
    s->free_head = 0;
    s->live = 0;
}

static void slab_destroy(slab_t *s) {
    pthread_mutex_destroy(&s->lock);
    free(s->slots);
}

static int slab_insert(slab_t *s, const pa_record_init_t *init, pa_id_t *out) {
    if (init->status > PA_STATUS_ALLOCATED || !isfinite(init->requested) || init->requested < 0 ||
        !isfinite(init->allocated) || init->allocated < 0)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    uint32_t index;
    if (s->free_head) {
        index = s->free_head - 1;
        s->free_head = s->slots[index].next_free;
    } else if (s->used < s->capacity) {
        index = s->used++;
        s->slots[index].generation = 0;
    } else {
        pthread_mutex_unlock(&s->lock);
        return -ENOSPC;
    }
    slab_slot_t *r = &s->slots[index];
    if (r->generation == 0) r->generation = 1;
    r->status = init->status;
    r->resource_type = init->resource_type;
    r->requested = init->requested;
    r->allocated = init->allocated;
    r->created_ns = r->updated_ns = pa_clock_now_ns();
    r->expires_ns = init->expires_ns;
    r->timer = 0;
    r->request_id = init->request_id;
    r->owner = init->owner;
    r->user_data = init->user_data;
    s->live++;
    *out = ((pa_id_t)r->generation << 32) | index;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static slab_slot_t *slab_find(slab_t *s, pa_id_t id) {
    uint32_t index = (uint32_t)id;
    if (index >= s->used) return NULL;
    slab_slot_t *r = &s->slots[index];
    return r->generation == (uint32_t)(id >> 32) && r->status != 0xFF ? r : NULL;
}

static int slab_get(slab_t *s, pa_id_t id, pa_record_t *out) {
    pthread_mutex_lock(&s->lock);
    slab_slot_t *r = slab_find(s, id);
    if (r) {
        out->id = id;
        out->status = r->status;
        out->resource_type = r->resource_type;
        out->requested = r->requested;
        out->allocated = r->allocated;
        out->created_ns = r->created_ns;
        out->updated_ns = r->updated_ns;
        out->expires_ns = r->expires_ns;
        out->timer = r->timer;
        out->request_id = r->request_id;
        out->owner = r->owner;
        out->user_data = r->user_data;
    }
    pthread_mutex_unlock(&s->lock);
    return r ? 0 : -ENOENT;
}

static int slab_transition(slab_t *s, pa_id_t id, uint32_t from_mask, pa_status_t to) {
    pthread_mutex_lock(&s->lock);
    slab_slot_t *r = slab_find(s, id);
    int rc = 0;
    if (!r)
        rc = -ENOENT;
    else if (!(PA_STATUS_BIT(r->status) & from_mask))
        rc = -EAGAIN;
    else if (!pa_status_transition_legal(r->status, to))
        rc = -EINVAL;
    else {
        r->status = to;
        r->updated_ns = pa_clock_now_ns();
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

static int slab_remove(slab_t *s, pa_id_t id) {
    pthread_mutex_lock(&s->lock);
    slab_slot_t *r = slab_find(s, id);
    int rc = 0;
    if (!r)
        rc = -ENOENT;
    else if (!(PA_STATUS_BIT(r->status) & PA_STATUS_FINAL_MASK))
        rc = -EBUSY;
    else {
        uint32_t index = (uint32_t)id;
        r->generation = r->generation == UINT32_MAX ? 1 : r->generation + 1;
        r->status = 0xFF;
        r->next_free = s->free_head;
        s->free_head = index + 1;
        s->live--;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* ------------------------------------------------------------------ */
/* The baseline timers: a binary min-heap with positions, optional lock. */
/* ------------------------------------------------------------------ */

typedef struct heap_entry {
    uint64_t deadline;
    uint32_t handle;
} heap_entry_t;

typedef struct heap {
    pthread_mutex_t lock;
    bool locked;
    heap_entry_t *entries;
    uint32_t *position; /* handle -> index in entries, UINT32_MAX = not queued */
    uint64_t *value;    /* handle -> value */
    uint32_t *free_handles;
    uint32_t size, capacity, free_count;
} heap_t;

static void heap_init(heap_t *h, uint32_t capacity, bool locked) {
    pthread_mutex_init(&h->lock, NULL);
    h->locked = locked;
    h->entries = malloc(sizeof(*h->entries) * capacity);
    h->position = malloc(sizeof(*h->position) * capacity);
    h->value = malloc(sizeof(*h->value) * capacity);
    h->free_handles = malloc(sizeof(*h->free_handles) * capacity);
    if (!h->entries || !h->position || !h->value || !h->free_handles) die("malloc", -ENOMEM);
    for (uint32_t i = 0; i < capacity; i++) {
        h->position[i] = UINT32_MAX;
        h->free_handles[i] = capacity - 1 - i;
    }
    h->size = 0;
    h->capacity = capacity;
    h->free_count = capacity;
}

static void heap_destroy(heap_t *h) {
    pthread_mutex_destroy(&h->lock);
    free(h->entries);
    free(h->position);
    free(h->value);
    free(h->free_handles);
}

static inline void heap_place(heap_t *h, uint32_t i, heap_entry_t e) {
    h->entries[i] = e;
    h->position[e.handle] = i;
}

static void heap_sift_up(heap_t *h, uint32_t i) {
    heap_entry_t e = h->entries[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (h->entries[parent].deadline <= e.deadline) break;
        heap_place(h, i, h->entries[parent]);
        i = parent;
    }
    heap_place(h, i, e);
}

static void heap_sift_down(heap_t *h, uint32_t i) {
    heap_entry_t e = h->entries[i];
    for (;;) {
        uint32_t child = 2 * i + 1;
        if (child >= h->size) break;
        if (child + 1 < h->size && h->entries[child + 1].deadline < h->entries[child].deadline) child++;
        if (h->entries[child].deadline >= e.deadline) break;
        heap_place(h, i, h->entries[child]);
        i = child;
    }
    heap_place(h, i, e);
}

static int heap_push(heap_t *h, uint64_t deadline, uint64_t value, uint32_t *handle_out) {
    if (h->locked) pthread_mutex_lock(&h->lock);
    int rc = 0;
    if (h->free_count == 0) {
        rc = -ENOSPC;
    } else {
        uint32_t handle = h->free_handles[--h->free_count];
        h->value[handle] = value;
        uint32_t i = h->size++;
        heap_place(h, i, (heap_entry_t){deadline, handle});
        heap_sift_up(h, i);
        *handle_out = handle;
    }
    if (h->locked) pthread_mutex_unlock(&h->lock);
    return rc;
}

static void heap_remove_at(heap_t *h, uint32_t i) {
    uint32_t handle = h->entries[i].handle;
    h->position[handle] = UINT32_MAX;
    h->free_handles[h->free_count++] = handle;
    uint32_t last = --h->size;
    if (i != last) {
        heap_place(h, i, h->entries[last]);
        if (i > 0 && h->entries[(i - 1) / 2].deadline > h->entries[i].deadline)
            heap_sift_up(h, i);
        else
            heap_sift_down(h, i);
    }
}

static int heap_cancel(heap_t *h, uint32_t handle) {
    if (h->locked) pthread_mutex_lock(&h->lock);
    int rc = 0;
    if (handle >= h->capacity || h->position[handle] == UINT32_MAX)
        rc = -ENOENT;
    else
        heap_remove_at(h, h->position[handle]);
    if (h->locked) pthread_mutex_unlock(&h->lock);
    return rc;
}

static size_t heap_advance(heap_t *h, uint64_t now) {
    if (h->locked) pthread_mutex_lock(&h->lock);
    size_t fired = 0;
    while (h->size > 0 && h->entries[0].deadline <= now) {
        sink += h->value[h->entries[0].handle];
        heap_remove_at(h, 0);
        fired++;
    }
    if (h->locked) pthread_mutex_unlock(&h->lock);
    return fired;
}

/* ------------------------------------------------------------------ */
/* Measurement plumbing                                                 */
/* ------------------------------------------------------------------ */

typedef struct figure {
    double best_ops, median_ops;
} figure_t;

static figure_t summarize(double *ops, int runs) {
    double sorted[MAX_RUNS];
    memcpy(sorted, ops, sizeof(double) * (size_t)runs);
    qsort(sorted, (size_t)runs, sizeof(double), compare_double);
    figure_t f = {sorted[runs - 1], runs % 2 ? sorted[runs / 2] : (sorted[runs / 2 - 1] + sorted[runs / 2]) / 2};
    return f;
}

static void print_header(const char *title) {
    printf("\n%s\n", title);
    printf("  %-34s %14s %14s %14s %8s\n", "operation", "ours (M/s)", "baseline (M/s)", "ours median", "ratio");
}

static void print_row(const char *name, figure_t ours, figure_t base) {
    printf("  %-34s %14.2f %14.2f %14.2f %8.2f\n", name, ours.best_ops / 1e6, base.best_ops / 1e6, ours.median_ops / 1e6,
           ours.best_ops / base.best_ops);
}

/* ------------------------------------------------------------------ */
/* (1) table, one thread                                                 */
/* ------------------------------------------------------------------ */

enum { T_INSERT, T_GET, T_TRANSITION, T_REMOVE, T_CYCLE, T_COUNT };
static const char *const table_names[T_COUNT] = {
    "table insert",
    "table get",
    "table transition (1 CAS)",
    "table remove",
    "cycle ins+get+trans+remove (op)",
};

#define WORKING_SET 1024

static void table_run_ours(uint32_t n, long cycles, double ops[T_COUNT]) {
    pa_table_t *t;
    int rc = pa_table_create(n, &t);
    if (rc) die("pa_table_create", rc);
    pa_id_t *ids = malloc(sizeof(*ids) * n);
    pa_record_init_t init = {.status = PA_STATUS_PENDING, .requested = 4096, .allocated = 4096, .owner = 7};
    /* warm-up: touch every slot so that the measured inserts come from the free stack */
    for (uint32_t i = 0; i < n; i++)
        if ((rc = pa_table_insert(t, &init, &ids[i]))) die("insert", rc);
    for (uint32_t i = 0; i < n; i++) {
        pa_table_transition(t, ids[i], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED, NULL);
        pa_table_remove(t, ids[i]);
    }
    double t0 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_table_insert(t, &init, &ids[i]);
    double t1 = now_s();
    pa_record_t r;
    uint64_t acc = 0;
    for (uint32_t i = 0; i < n; i++) {
        pa_table_get(t, ids[i], &r);
        acc += r.owner;
    }
    double t2 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_table_transition(t, ids[i], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED, NULL);
    double t3 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_table_remove(t, ids[i]);
    double t4 = now_s();
    if (pa_table_live(t) != 0) die("live after remove", -1);
    /* cycle on a small working set: the steady state of an engine */
    for (uint32_t i = 0; i < WORKING_SET; i++) pa_table_insert(t, &init, &ids[i]);
    double t5 = now_s();
    for (long c = 0; c < cycles; c++) {
        uint32_t k = (uint32_t)c & (WORKING_SET - 1);
        pa_table_get(t, ids[k], &r);
        acc += r.owner;
        pa_table_transition(t, ids[k], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED, NULL);
        pa_table_remove(t, ids[k]);
        pa_table_insert(t, &init, &ids[k]);
    }
    double t6 = now_s();
    sink += acc;
    ops[T_INSERT] = n / (t1 - t0);
    ops[T_GET] = n / (t2 - t1);
    ops[T_TRANSITION] = n / (t3 - t2);
    ops[T_REMOVE] = n / (t4 - t3);
    ops[T_CYCLE] = 4.0 * (double)cycles / (t6 - t5);
    free(ids);
    pa_table_destroy(t);
}

static void table_run_slab(uint32_t n, long cycles, double ops[T_COUNT]) {
    slab_t s;
    slab_init(&s, n);
    pa_id_t *ids = malloc(sizeof(*ids) * n);
    pa_record_init_t init = {.status = PA_STATUS_PENDING, .requested = 4096, .allocated = 4096, .owner = 7};
    for (uint32_t i = 0; i < n; i++) slab_insert(&s, &init, &ids[i]);
    for (uint32_t i = 0; i < n; i++) {
        slab_transition(&s, ids[i], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED);
        slab_remove(&s, ids[i]);
    }
    double t0 = now_s();
    for (uint32_t i = 0; i < n; i++) slab_insert(&s, &init, &ids[i]);
    double t1 = now_s();
    pa_record_t r;
    uint64_t acc = 0;
    for (uint32_t i = 0; i < n; i++) {
        slab_get(&s, ids[i], &r);
        acc += r.owner;
    }
    double t2 = now_s();
    for (uint32_t i = 0; i < n; i++) slab_transition(&s, ids[i], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED);
    double t3 = now_s();
    for (uint32_t i = 0; i < n; i++) slab_remove(&s, ids[i]);
    double t4 = now_s();
    for (uint32_t i = 0; i < WORKING_SET; i++) slab_insert(&s, &init, &ids[i]);
    double t5 = now_s();
    for (long c = 0; c < cycles; c++) {
        uint32_t k = (uint32_t)c & (WORKING_SET - 1);
        slab_get(&s, ids[k], &r);
        acc += r.owner;
        slab_transition(&s, ids[k], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED);
        slab_remove(&s, ids[k]);
        slab_insert(&s, &init, &ids[k]);
    }
    double t6 = now_s();
    sink += acc;
    ops[T_INSERT] = n / (t1 - t0);
    ops[T_GET] = n / (t2 - t1);
    ops[T_TRANSITION] = n / (t3 - t2);
    ops[T_REMOVE] = n / (t4 - t3);
    ops[T_CYCLE] = 4.0 * (double)cycles / (t6 - t5);
    free(ids);
    slab_destroy(&s);
}

/* ------------------------------------------------------------------ */
/* (2) wheel vs heap                                                     */
/* ------------------------------------------------------------------ */

enum { W_SCHEDULE, W_CANCEL, W_SCHED_CANCEL, W_SCHED_FIRE, W_COUNT };

/* deadlines spread over 10 s on a 1 ms tick (levels 0..2), start at an arbitrary instant */
static void make_deadlines(uint64_t *deadlines, uint32_t n, uint64_t start, uint64_t spread_ns) {
    uint64_t rng = 12345;
    for (uint32_t i = 0; i < n; i++) deadlines[i] = start + 1 + xorshift(&rng) % spread_ns;
}

static void count_fire(void *ctx, pa_timer_id_t timer, uint64_t value, uint64_t deadline_ns) {
    (void)timer;
    (void)deadline_ns;
    *(uint64_t *)ctx += value;
}

static void wheel_run(uint32_t n, const uint64_t *deadlines, uint64_t start, uint64_t spread_ns, double ops[W_COUNT]) {
    pa_wheel_t *w;
    int rc = pa_wheel_create(MS, start, n, &w);
    if (rc) die("pa_wheel_create", rc);
    pa_timer_id_t *ids = malloc(sizeof(*ids) * n);
    /* warm-up: grow the pool */
    for (uint32_t i = 0; i < n; i++) pa_wheel_schedule(w, deadlines[i], i, &ids[i]);
    for (uint32_t i = 0; i < n; i++) pa_wheel_cancel(w, ids[i]);
    double t0 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_wheel_schedule(w, deadlines[i], i, &ids[i]);
    double t1 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_wheel_cancel(w, ids[i]);
    double t2 = now_s();
    /* schedule + fire: advance one tick at a time across the whole spread */
    uint64_t total = 0;
    double t3 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_wheel_schedule(w, deadlines[i], i, &ids[i]);
    size_t fired = 0;
    for (uint64_t now = start; now <= start + spread_ns + MS; now += MS) fired += pa_wheel_advance(w, now, count_fire, &total);
    double t4 = now_s();
    if (fired != n) die("wheel fired count", (int)fired);
    sink += total;
    ops[W_SCHEDULE] = n / (t1 - t0);
    ops[W_CANCEL] = n / (t2 - t1);
    ops[W_SCHED_CANCEL] = 2.0 * n / (t2 - t0);
    ops[W_SCHED_FIRE] = 2.0 * n / (t4 - t3);
    free(ids);
    pa_wheel_destroy(w);
}

static void heap_run(uint32_t n, bool locked, const uint64_t *deadlines, uint64_t start, uint64_t spread_ns, double ops[W_COUNT]) {
    heap_t h;
    heap_init(&h, n, locked);
    uint32_t *handles = malloc(sizeof(*handles) * n);
    for (uint32_t i = 0; i < n; i++) heap_push(&h, deadlines[i], i, &handles[i]);
    for (uint32_t i = 0; i < n; i++) heap_cancel(&h, handles[i]);
    double t0 = now_s();
    for (uint32_t i = 0; i < n; i++) heap_push(&h, deadlines[i], i, &handles[i]);
    double t1 = now_s();
    for (uint32_t i = 0; i < n; i++) heap_cancel(&h, handles[i]);
    double t2 = now_s();
    double t3 = now_s();
    for (uint32_t i = 0; i < n; i++) heap_push(&h, deadlines[i], i, &handles[i]);
    size_t fired = 0;
    for (uint64_t now = start; now <= start + spread_ns + MS; now += MS) fired += heap_advance(&h, now);
    double t4 = now_s();
    if (fired != n) die("heap fired count", (int)fired);
    ops[W_SCHEDULE] = n / (t1 - t0);
    ops[W_CANCEL] = n / (t2 - t1);
    ops[W_SCHED_CANCEL] = 2.0 * n / (t2 - t0);
    ops[W_SCHED_FIRE] = 2.0 * n / (t4 - t3);
    free(handles);
    heap_destroy(&h);
}

/* (3) the locked ticker path: schedule + cancel on live records */
static double ticker_run(uint32_t n, const uint64_t *offsets) {
    pa_table_t *t;
    pa_ticker_t *ticker;
    int rc = pa_table_create(n, &t);
    if (rc) die("pa_table_create", rc);
    if ((rc = pa_ticker_create(t, NULL, &ticker))) die("pa_ticker_create", rc);
    pa_id_t *records = malloc(sizeof(*records) * n);
    pa_timer_id_t *timers = malloc(sizeof(*timers) * n);
    pa_record_init_t init = {.status = PA_STATUS_ALLOCATED};
    for (uint32_t i = 0; i < n; i++) pa_table_insert(t, &init, &records[i]);
    uint64_t base = pa_clock_now_ns() + 3600 * 1000 * MS; /* nothing fires during the run */
    for (uint32_t i = 0; i < n; i++) pa_ticker_schedule(ticker, records[i], base + offsets[i], &timers[i]);
    for (uint32_t i = 0; i < n; i++) pa_ticker_cancel(ticker, timers[i]);
    double t0 = now_s();
    for (uint32_t i = 0; i < n; i++) pa_ticker_schedule(ticker, records[i], base + offsets[i], &timers[i]);
    for (uint32_t i = 0; i < n; i++) pa_ticker_cancel(ticker, timers[i]);
    double t1 = now_s();
    free(records);
    free(timers);
    pa_ticker_destroy(ticker);
    pa_table_destroy(t);
    return 2.0 * n / (t1 - t0);
}

/* ------------------------------------------------------------------ */
/* (4) table, 2 threads                                                  */
/* ------------------------------------------------------------------ */

typedef struct mt_arg {
    pa_table_t *table;
    slab_t *slab;
    long cycles;
    int thread;
    pthread_barrier_t *barrier;
    double seconds;
} mt_arg_t;

static void *mt_main(void *p) {
    mt_arg_t *a = p;
    pa_id_t ids[WORKING_SET / 2];
    pa_record_init_t init = {.status = PA_STATUS_PENDING, .owner = (uint64_t)a->thread};
    pa_record_t r;
    uint64_t acc = 0;
    const uint32_t set = WORKING_SET / 2;
    for (uint32_t i = 0; i < set; i++) {
        if (a->table) pa_table_insert(a->table, &init, &ids[i]);
        else slab_insert(a->slab, &init, &ids[i]);
    }
    pthread_barrier_wait(a->barrier);
    double t0 = now_s();
    for (long c = 0; c < a->cycles; c++) {
        uint32_t k = (uint32_t)c & (set - 1);
        if (a->table) {
            pa_table_get(a->table, ids[k], &r);
            pa_table_transition(a->table, ids[k], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED, NULL);
            pa_table_remove(a->table, ids[k]);
            pa_table_insert(a->table, &init, &ids[k]);
        } else {
            slab_get(a->slab, ids[k], &r);
            slab_transition(a->slab, ids[k], PA_STATUS_BIT(PA_STATUS_PENDING), PA_STATUS_RELEASED);
            slab_remove(a->slab, ids[k]);
            slab_insert(a->slab, &init, &ids[k]);
        }
        acc += r.owner;
    }
    a->seconds = now_s() - t0;
    sink += acc;
    return NULL;
}

static double mt_run(int threads, long cycles, bool ours) {
    pa_table_t *t = NULL;
    slab_t slab;
    if (ours) {
        int rc = pa_table_create(WORKING_SET * 2, &t);
        if (rc) die("pa_table_create", rc);
    } else {
        slab_init(&slab, WORKING_SET * 2);
    }
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    pthread_t tids[8];
    mt_arg_t args[8];
    for (int i = 0; i < threads; i++) {
        args[i] = (mt_arg_t){t, ours ? NULL : &slab, cycles, i, &barrier, 0};
        pthread_create(&tids[i], NULL, mt_main, &args[i]);
    }
    double slowest = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        if (args[i].seconds > slowest) slowest = args[i].seconds;
    }
    pthread_barrier_destroy(&barrier);
    if (ours)
        pa_table_destroy(t);
    else
        slab_destroy(&slab);
    return 4.0 * (double)cycles * threads / slowest;
}

int main(int argc, char **argv) {
    uint32_t records = 1u << 18, timers = 1u << 18;
    int runs = 5;
    long cycles = 2000000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--records")) records = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--timers")) timers = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cycles")) cycles = atol(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [--records N] [--timers N] [--runs N] [--cycles N]\n", argv[0]);
            return 2;
        }
    }
    if (runs < 1) runs = 1;
    if (runs > MAX_RUNS) runs = MAX_RUNS;
    if (records < WORKING_SET) records = WORKING_SET;
    printf("bench_table_wheel: %u records, %u timers, %ld cycles, best of %d runs (CLOCK_MONOTONIC)\n", records, timers,
           cycles, runs);

    /* (1) */
    double ours_t[T_COUNT][MAX_RUNS], base_t[T_COUNT][MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        double o[T_COUNT], b[T_COUNT];
        /* alternate which side runs first, so drift in the machine hits both alike */
        if (r % 2) {
            table_run_slab(records, cycles, b);
            table_run_ours(records, cycles, o);
        } else {
            table_run_ours(records, cycles, o);
            table_run_slab(records, cycles, b);
        }
        for (int k = 0; k < T_COUNT; k++) {
            ours_t[k][r] = o[k];
            base_t[k][r] = b[k];
        }
    }
    print_header("(1) allocation table, 1 thread — baseline: mutex-guarded slab + free list");
    for (int k = 0; k < T_COUNT; k++) print_row(table_names[k], summarize(ours_t[k], runs), summarize(base_t[k], runs));
    {
        figure_t o = summarize(ours_t[T_CYCLE], runs), b = summarize(base_t[T_CYCLE], runs);
        printf("  %-34s %14.2f %14.2f %14.2f %8.2f\n", "cycle (4 calls) per second", o.best_ops / 4e6, b.best_ops / 4e6,
               o.median_ops / 4e6, o.best_ops / b.best_ops);
    }

    /* (2) */
    uint64_t start = 1000ull * 3600 * 1000 * MS + 123456; /* an arbitrary monotonic instant */
    uint64_t spread = 10000 * MS;
    uint64_t *deadlines = malloc(sizeof(*deadlines) * timers);
    make_deadlines(deadlines, timers, start, spread);
    double ours_w[W_COUNT][MAX_RUNS], heap_w[W_COUNT][MAX_RUNS], heap_nl[W_COUNT][MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        double o[W_COUNT], h[W_COUNT], hn[W_COUNT];
        wheel_run(timers, deadlines, start, spread, o);
        heap_run(timers, true, deadlines, start, spread, h);
        heap_run(timers, false, deadlines, start, spread, hn);
        for (int k = 0; k < W_COUNT; k++) {
            ours_w[k][r] = o[k];
            heap_w[k][r] = h[k];
            heap_nl[k][r] = hn[k];
        }
    }
    static const char *const wheel_names[W_COUNT] = {"wheel schedule", "wheel cancel", "wheel schedule+cancel (op)",
                                                     "wheel schedule+fire (op)"};
    print_header("(2) timer wheel, 1 thread, 10 s spread on a 1 ms tick — baseline: mutex-guarded binary heap");
    for (int k = 0; k < W_COUNT; k++) print_row(wheel_names[k], summarize(ours_w[k], runs), summarize(heap_w[k], runs));
    print_header("    same, baseline: binary heap without a lock");
    for (int k = 0; k < W_COUNT; k++) print_row(wheel_names[k], summarize(ours_w[k], runs), summarize(heap_nl[k], runs));

    /* (3) */
    double ours_k[MAX_RUNS];
    uint64_t *offsets = malloc(sizeof(*offsets) * timers);
    for (uint32_t i = 0; i < timers; i++) offsets[i] = deadlines[i] - start;
    for (int r = 0; r < runs; r++) ours_k[r] = ticker_run(timers, offsets);
    print_header("(3) ticker (locked) — baseline: mutex-guarded binary heap");
    print_row("ticker schedule+cancel (op)", summarize(ours_k, runs), summarize(heap_w[W_SCHED_CANCEL], runs));

    /* (4) */
    double ours_m[MAX_RUNS], base_m[MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        ours_m[r] = mt_run(2, cycles / 2, true);
        base_m[r] = mt_run(2, cycles / 2, false);
    }
    print_header("(4) allocation table, 2 threads, ins+get+trans+remove — baseline: mutex slab");
    print_row("cycle ops, both threads (op)", summarize(ours_m, runs), summarize(base_m, runs));

    free(deadlines);
    free(offsets);
    return 0;
}
