/*
 * wheel.c — the hierarchical timer wheel (design and complexity: prealloc/wheel.h).
 *
 * Time in ticks
 * -------------
 * Tick k is the instant k * tick_ns on CLOCK_MONOTONIC (boundaries are absolute, so a
 * deadline rounds the same way whenever it was scheduled). A timer's deadline tick is
 * ceil(deadline_ns / tick_ns); the wheel's current tick is floor(now_ns / tick_ns). A timer
 * fires on the first advance whose current tick reaches its deadline tick, i.e. whose now
 * is at or past the rounded-up deadline: never early.
 *
 * Where a timer lives
 * -------------------
 *   when <= current            the "due" list: fires on the next advance (this happens
 *                              only for deadlines already reached when scheduled; a
 *                              deadline <= now_ns counts as due even if its rounded tick
 *                              is still ahead, since firing it is not early).
 *   highest differing digit L  level L, slot = digit L of the deadline tick (tokio's
 *   of when ^ current, L < 6   level_for / slot_for). Invariant: an occupied slot of level
 *                              L is strictly ahead of the current tick's digit L, and all
 *                              higher digits of its timers equal the current tick's.
 *   when ^ current >= 64^6     the overflow list, beyond the wheel's span, with the
 *                              smallest deadline tick among its timers (exact after each
 *                              re-filing pass, possibly low after a cancel). It is re-filed
 *                              when the wheel enters the top-level rotation (64^6 ticks)
 *                              that holds that smallest deadline: the first instant any of
 *                              its timers can come within range, so far timers never fire
 *                              early or late and empty rotations are skipped in O(1). A
 *                              top level used as a ring (tokio's way with deadlines past
 *                              its span) re-files each far timer once per rotation on the
 *                              way: 2^27 passes for a jump of 2^63 ticks with a 1 ns tick.
 *                              Each pass here costs O(overflow timers) and files at least
 *                              one of them (or drops a stale minimum left by a cancel). With
 *                              a 1 ms tick a rotation is 2.2 years; a near deadline lands
 *                              here only when it lies just past a rotation boundary, and
 *                              is then re-filed at that boundary.
 *
 * Advancing
 * ---------
 * The next event is the start of the first occupied slot of the lowest non-empty level
 * (every event of level L precedes every event of level L+1, because level L's occupied
 * slots all lie in the current level-(L+1) slot), found with one ctz on the level's
 * occupancy word rotated to the current slot; after the levels, the start of the top-level
 * rotation holding the overflow list's smallest deadline. advance() jumps from event to
 * event up to its target: a level-0 event fires its slot; a level-L > 0 event cascades
 * its slot, re-filing each timer at a lower level or firing it when its tick has come.
 * Empty stretches cost nothing, so a jump of days costs O(levels + timers touched).
 *
 * Order: events are visited in increasing tick order and each slot list is FIFO, so
 * timers fire in deadline-tick order, and within one tick in a deterministic order (the
 * order they reached that slot). The due list is sorted by tick (stable) before it fires.
 *
 * Timers are nodes in a pool that grows by doubling up to the capacity (indices are
 * stable, so a realloc is fine); free nodes form a singly linked list. A timer id is
 * (generation << 32) | index with the generation >= 1, bumped when the node is freed.
 * As in the table, reuse is spread so that a schedule/fire loop does not cycle one
 * node's generation: every 2^16th free of a node sends it to the back of a FIFO "cool"
 * list, drawn from once it holds PA__COOL_MIN nodes (or when the pool is full), before
 * the pool grows otherwise. The bound is stated in wheel.h.
 */
#define _GNU_SOURCE
#include "prealloc/wheel.h"

#include <stdlib.h>
#include <string.h>

#define PA__SPAN_BITS (PA_WHEEL_SLOT_BITS * PA_WHEEL_LEVELS) /* 36: the wheel spans 2^36 ticks */
#define PA__SLOT_MASK ((uint64_t)PA_WHEEL_SLOTS - 1)
#define PA__NIL UINT32_MAX
#define PA__WHEEL_MAX_CAPACITY (1u << 31)
#define PA__POOL_INITIAL 256u
#define PA__COOL_PERIOD_MASK 0xFFFFu /* a node cools when the generation it leaves ends so */
#define PA__COOL_MIN 1024u

/* List numbers: the level slots, then the due and overflow lists; a free node has none. */
enum {
    PA__LIST_DUE = PA_WHEEL_LEVELS * PA_WHEEL_SLOTS,
    PA__LIST_OVERFLOW,
    PA__LIST_COUNT,
    PA__LIST_NONE = 0xFFFF,
};

typedef struct pa__timer_node {
    uint64_t when;        /* deadline tick */
    uint64_t deadline_ns; /* as asked, reported to fire */
    uint64_t value;
    uint32_t next, prev; /* slot list links (next also links the free list) */
    uint32_t generation;
    uint16_t list;
} pa__timer_node_t;

struct pa_wheel {
    uint64_t tick_ns;
    uint64_t now_ns;  /* the latest time advanced to */
    uint64_t current; /* floor(now_ns / tick_ns), except while advance walks events */
    uint64_t occupied[PA_WHEEL_LEVELS];
    uint64_t due_min; /* <= the smallest tick in the due list when it is non-empty */
    uint64_t overflow_min; /* <= the smallest tick in the overflow list when non-empty */
    bool due_sorted;  /* the due list is in tick order */
    size_t pending;
    uint32_t capacity;
    uint32_t pool_size; /* nodes allocated */
    uint32_t pool_used; /* nodes ever handed out (the rest of the pool is untouched) */
    uint32_t free_head;
    uint32_t cool_head, cool_tail; /* FIFO through next; PA__NIL = empty */
    uint32_t cool_count;
    pa__timer_node_t *nodes;
    uint32_t head[PA__LIST_COUNT];
    uint32_t tail[PA__LIST_COUNT];
};

static inline uint64_t rotr64(uint64_t x, unsigned r) {
    r &= 63u;
    return r ? (x >> r) | (x << (64u - r)) : x;
}

static inline uint64_t deadline_tick(const pa_wheel_t *w, uint64_t deadline_ns) {
    return deadline_ns / w->tick_ns + (deadline_ns % w->tick_ns != 0);
}

static inline uint64_t tick_to_ns(const pa_wheel_t *w, uint64_t tick) {
    return tick > UINT64_MAX / w->tick_ns ? UINT64_MAX : tick * w->tick_ns;
}

/* ---- lists ---- */

static void list_append(pa_wheel_t *w, unsigned list, uint32_t index) {
    pa__timer_node_t *n = &w->nodes[index];
    n->list = (uint16_t)list;
    n->next = PA__NIL;
    n->prev = w->tail[list];
    if (n->prev == PA__NIL)
        w->head[list] = index;
    else
        w->nodes[n->prev].next = index;
    w->tail[list] = index;
    if (list < PA__LIST_DUE) w->occupied[list / PA_WHEEL_SLOTS] |= 1ull << (list % PA_WHEEL_SLOTS);
}

static void list_unlink(pa_wheel_t *w, uint32_t index) {
    pa__timer_node_t *n = &w->nodes[index];
    unsigned list = n->list;
    if (n->prev == PA__NIL)
        w->head[list] = n->next;
    else
        w->nodes[n->prev].next = n->next;
    if (n->next == PA__NIL)
        w->tail[list] = n->prev;
    else
        w->nodes[n->next].prev = n->prev;
    if (list < PA__LIST_DUE && w->head[list] == PA__NIL)
        w->occupied[list / PA_WHEEL_SLOTS] &= ~(1ull << (list % PA_WHEEL_SLOTS));
    n->list = PA__LIST_NONE;
}

/* Detaches a whole list and returns its first node (the rest follow through next). */
static uint32_t list_take(pa_wheel_t *w, unsigned list) {
    uint32_t first = w->head[list];
    w->head[list] = w->tail[list] = PA__NIL;
    if (list < PA__LIST_DUE) w->occupied[list / PA_WHEEL_SLOTS] &= ~(1ull << (list % PA_WHEEL_SLOTS));
    return first;
}

/* Files a node by its deadline tick relative to the current tick. */
static void file_timer(pa_wheel_t *w, uint32_t index) {
    uint64_t when = w->nodes[index].when;
    if (when <= w->current) {
        if (w->head[PA__LIST_DUE] == PA__NIL) {
            w->due_min = when;
            w->due_sorted = true;
        } else {
            if (when < w->due_min) w->due_min = when;
            if (when < w->nodes[w->tail[PA__LIST_DUE]].when) w->due_sorted = false;
        }
        list_append(w, PA__LIST_DUE, index);
        return;
    }
    uint64_t differing = w->current ^ when;
    if (differing >> PA__SPAN_BITS) {
        if (w->head[PA__LIST_OVERFLOW] == PA__NIL || when < w->overflow_min) w->overflow_min = when;
        list_append(w, PA__LIST_OVERFLOW, index);
        return;
    }
    /* |63 keeps the digit index >= 0 for differences inside the lowest digit */
    unsigned significant = 63u - (unsigned)__builtin_clzll(differing | PA__SLOT_MASK);
    unsigned level = significant / PA_WHEEL_SLOT_BITS;
    unsigned slot = (unsigned)((when >> (level * PA_WHEEL_SLOT_BITS)) & PA__SLOT_MASK);
    list_append(w, level * PA_WHEEL_SLOTS + slot, index);
}

/* ---- the pool ---- */

static void cool_pop(pa_wheel_t *w, uint32_t *index_out) {
    *index_out = w->cool_head;
    w->cool_head = w->nodes[w->cool_head].next;
    if (w->cool_head == PA__NIL) w->cool_tail = PA__NIL;
    w->cool_count--;
}

static int node_alloc(pa_wheel_t *w, uint32_t *index_out) {
    if (w->free_head != PA__NIL) {
        *index_out = w->free_head;
        w->free_head = w->nodes[w->free_head].next;
        return 0;
    }
    if (w->cool_count >= PA__COOL_MIN || (w->cool_count > 0 && w->pool_used == w->capacity)) {
        cool_pop(w, index_out);
        return 0;
    }
    if (w->pool_used == w->pool_size) {
        if (w->pool_size == w->capacity) return -ENOSPC;
        uint64_t grown = (uint64_t)w->pool_size * 2;
        if (grown > w->capacity) grown = w->capacity;
        pa__timer_node_t *nodes = realloc(w->nodes, (size_t)grown * sizeof(*nodes));
        if (!nodes) return -ENOMEM;
        w->nodes = nodes;
        w->pool_size = (uint32_t)grown;
    }
    uint32_t index = w->pool_used++;
    w->nodes[index].generation = 1;
    w->nodes[index].list = PA__LIST_NONE;
    *index_out = index;
    return 0;
}

static void node_free(pa_wheel_t *w, uint32_t index) {
    pa__timer_node_t *n = &w->nodes[index];
    const uint32_t left = n->generation;
    /* a new generation makes the old id stale; skip 0 so that an id is never 0 */
    n->generation = n->generation == UINT32_MAX ? 1u : n->generation + 1u;
    n->list = PA__LIST_NONE;
    w->pending--;
    if ((left & PA__COOL_PERIOD_MASK) == PA__COOL_PERIOD_MASK) {
        n->next = PA__NIL;
        if (w->cool_tail == PA__NIL)
            w->cool_head = index;
        else
            w->nodes[w->cool_tail].next = index;
        w->cool_tail = index;
        w->cool_count++;
        return;
    }
    n->next = w->free_head;
    w->free_head = index;
}

static inline pa_timer_id_t node_id(const pa_wheel_t *w, uint32_t index) {
    return ((pa_timer_id_t)w->nodes[index].generation << 32) | index;
}

/* Frees the node and reports it; the node is gone before fire runs. */
static void fire_node(pa_wheel_t *w, uint32_t index, pa_timer_fire_fn fire, void *ctx) {
    pa_timer_id_t id = node_id(w, index);
    uint64_t value = w->nodes[index].value;
    uint64_t deadline_ns = w->nodes[index].deadline_ns;
    node_free(w, index);
    if (fire) fire(ctx, id, value, deadline_ns);
}

/* ---- events ---- */

/* The next tick at which advancing does work (fire or cascade) in the levels or the
 * overflow list; *list_out the list to process there. False when both are empty. */
static bool next_event(const pa_wheel_t *w, uint64_t *tick_out, unsigned *list_out) {
    for (unsigned level = 0; level < PA_WHEEL_LEVELS; level++) {
        uint64_t occupied = w->occupied[level];
        if (!occupied) continue;
        unsigned shift = level * PA_WHEEL_SLOT_BITS;
        uint64_t current_slot_number = w->current >> shift; /* slots since tick 0 */
        unsigned now_slot = (unsigned)(current_slot_number & PA__SLOT_MASK);
        /* distance (in slots) from the current slot to the next occupied one */
        unsigned distance = (unsigned)__builtin_ctzll(rotr64(occupied, now_slot));
        uint64_t tick = (current_slot_number + distance) << shift;
        /* distance is >= 1 by the invariant; never step back if it were not */
        *tick_out = tick > w->current ? tick : w->current;
        *list_out = level * PA_WHEEL_SLOTS + ((now_slot + distance) & PA__SLOT_MASK);
        return true;
    }
    if (w->head[PA__LIST_OVERFLOW] != PA__NIL) {
        /* the rotation holding the smallest overflow deadline, and never the current one
         * (a minimum left stale by a cancel may lie behind); no overflow of the shift: a
         * rotation after the current one exists, since an overflow timer lies in it */
        uint64_t rotation = w->overflow_min >> PA__SPAN_BITS;
        uint64_t next_rotation = (w->current >> PA__SPAN_BITS) + 1;
        *tick_out = (rotation > next_rotation ? rotation : next_rotation) << PA__SPAN_BITS;
        *list_out = PA__LIST_OVERFLOW;
        return true;
    }
    return false;
}

/* Bottom-up merge sort of a next-linked list by tick (Tatham's list mergesort); stable,
 * so ties keep their list order. O(n log n), and only run when the due list is unsorted. */
static uint32_t sort_by_tick(pa_wheel_t *w, uint32_t first) {
    pa__timer_node_t *nodes = w->nodes;
    for (size_t width = 1;; width *= 2) {
        uint32_t left = first, out_head = PA__NIL, out_tail = PA__NIL;
        size_t merges = 0;
        while (left != PA__NIL) {
            merges++;
            uint32_t right = left;
            size_t left_len = 0, right_len = width;
            while (left_len < width && right != PA__NIL) {
                left_len++;
                right = nodes[right].next;
            }
            while (left_len > 0 || (right_len > 0 && right != PA__NIL)) {
                uint32_t take;
                bool from_left = left_len > 0 &&
                                 (right_len == 0 || right == PA__NIL || nodes[left].when <= nodes[right].when);
                if (from_left) {
                    take = left;
                    left = nodes[left].next;
                    left_len--;
                } else {
                    take = right;
                    right = nodes[right].next;
                    right_len--;
                }
                if (out_tail == PA__NIL)
                    out_head = take;
                else
                    nodes[out_tail].next = take;
                out_tail = take;
            }
            left = right;
        }
        if (out_tail != PA__NIL) nodes[out_tail].next = PA__NIL;
        first = out_head;
        if (merges <= 1) return first;
    }
}

/* ---- public ---- */

int pa_wheel_create(uint64_t tick_ns, uint64_t start_ns, uint32_t capacity, pa_wheel_t **out) {
    if (!out || tick_ns == 0 || capacity == 0 || capacity > PA__WHEEL_MAX_CAPACITY) return -EINVAL;
    pa_wheel_t *w = calloc(1, sizeof(*w));
    if (!w) return -ENOMEM;
    w->pool_size = capacity < PA__POOL_INITIAL ? capacity : PA__POOL_INITIAL;
    w->nodes = malloc((size_t)w->pool_size * sizeof(*w->nodes));
    if (!w->nodes) {
        free(w);
        return -ENOMEM;
    }
    w->tick_ns = tick_ns;
    w->now_ns = start_ns;
    w->current = start_ns / tick_ns;
    w->capacity = capacity;
    w->free_head = PA__NIL;
    w->cool_head = w->cool_tail = PA__NIL;
    for (unsigned i = 0; i < PA__LIST_COUNT; i++) w->head[i] = w->tail[i] = PA__NIL;
    *out = w;
    return 0;
}

void pa_wheel_destroy(pa_wheel_t *wheel) {
    if (!wheel) return;
    free(wheel->nodes);
    free(wheel);
}

int pa_wheel_schedule(pa_wheel_t *w, uint64_t deadline_ns, uint64_t value, pa_timer_id_t *out) {
    if (!w) return -EINVAL;
    if (w->pending == w->capacity) return -ENOSPC;
    uint32_t index;
    int rc = node_alloc(w, &index);
    if (rc != 0) return rc;
    pa__timer_node_t *n = &w->nodes[index];
    n->when = deadline_tick(w, deadline_ns);
    /* A deadline the wheel's time has already reached is due now, even if its rounded-up
     * tick is still ahead: firing it on the next advance is not early. */
    if (deadline_ns <= w->now_ns && n->when > w->current) n->when = w->current;
    n->deadline_ns = deadline_ns;
    n->value = value;
    w->pending++;
    file_timer(w, index);
    if (out) *out = node_id(w, index);
    return 0;
}

int pa_wheel_cancel(pa_wheel_t *w, pa_timer_id_t timer) {
    if (!w) return -EINVAL;
    uint32_t index = (uint32_t)timer;
    uint32_t generation = (uint32_t)(timer >> 32);
    if (index >= w->pool_used || generation == 0) return -ENOENT;
    pa__timer_node_t *n = &w->nodes[index];
    if (n->generation != generation || n->list == PA__LIST_NONE) return -ENOENT;
    /* A cancelled due timer may leave due_min too low: next_wakeup is then early, which
     * its contract allows, never late. */
    list_unlink(w, index);
    node_free(w, index);
    return 0;
}

size_t pa_wheel_advance(pa_wheel_t *w, uint64_t now_ns, pa_timer_fire_fn fire, void *ctx) {
    if (!w) return 0;
    if (now_ns < w->now_ns) now_ns = w->now_ns;
    uint64_t target = now_ns / w->tick_ns;
    size_t fired = 0;

    /* Timers that were due when scheduled: all precede every event in the levels. */
    if (w->head[PA__LIST_DUE] != PA__NIL) {
        bool sorted = w->due_sorted;
        uint32_t index = list_take(w, PA__LIST_DUE);
        if (!sorted) index = sort_by_tick(w, index);
        while (index != PA__NIL) {
            uint32_t next = w->nodes[index].next;
            fire_node(w, index, fire, ctx);
            fired++;
            index = next;
        }
    }

    uint64_t tick;
    unsigned list;
    while (next_event(w, &tick, &list) && tick <= target) {
        w->current = tick;
        uint32_t index = list_take(w, list);
        while (index != PA__NIL) {
            uint32_t next = w->nodes[index].next;
            if (w->nodes[index].when <= tick) {
                fire_node(w, index, fire, ctx);
                fired++;
            } else {
                file_timer(w, index); /* cascade: lands at a lower level (or overflow again) */
            }
            index = next;
        }
    }
    /* No event lies in (current, target]: every occupied slot stays ahead of target's
     * digits, so moving the current tick keeps the filing invariant. */
    if (target > w->current) w->current = target;
    w->now_ns = now_ns;
    return fired;
}

int pa_wheel_next_wakeup(const pa_wheel_t *w, uint64_t *wakeup_ns) {
    if (!w || !wakeup_ns) return -EINVAL;
    if (w->head[PA__LIST_DUE] != PA__NIL) {
        *wakeup_ns = tick_to_ns(w, w->due_min);
        return 0;
    }
    uint64_t tick;
    unsigned list;
    if (!next_event(w, &tick, &list)) return -ENOENT;
    *wakeup_ns = tick_to_ns(w, tick);
    return 0;
}

int pa_wheel_timer_value(const pa_wheel_t *w, pa_timer_id_t timer, uint64_t *value) {
    if (!w || !value) return -EINVAL;
    uint32_t index = (uint32_t)timer;
    uint32_t generation = (uint32_t)(timer >> 32);
    if (index >= w->pool_used || generation == 0) return -ENOENT;
    const pa__timer_node_t *n = &w->nodes[index];
    if (n->generation != generation || n->list == PA__LIST_NONE) return -ENOENT;
    *value = n->value;
    return 0;
}

size_t pa_wheel_pending(const pa_wheel_t *w) { return w ? w->pending : 0; }
uint64_t pa_wheel_now(const pa_wheel_t *w) { return w ? w->now_ns : 0; }
uint64_t pa_wheel_tick_ns(const pa_wheel_t *w) { return w ? w->tick_ns : 0; }
