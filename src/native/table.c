/*
 * table.c — the allocation table (design, complexity and limits: prealloc/table.h).
 *
 * Layout
 * ------
 * A directory of ceil(capacity / PA_TABLE_CHUNK_SLOTS) chunk pointers is allocated at
 * create. A chunk is allocated, initialised and then installed with one CAS the first
 * time the bump counter hands out a slot in it (a thread that loses the install race frees
 * its own chunk and uses the winner's); the last chunk holds only the slots the capacity
 * needs, so a small table costs a few records, not a whole chunk. Each slot record is two
 * cache lines (128 bytes, asserted below): the state word and the fields a status change
 * touches share the first line, the caller's keys sit in the second.
 *
 * The state word
 * --------------
 *   bits 63..32  generation (>= 1 once the slot has held a record; 0 = never used)
 *   bit  24      removal pending (see "field writers")
 *   bits 23..8   field writers in progress
 *   bits  7..0   status (pa_status_t), or PA__SLOT_FREE (0xFF) for a free slot
 * Every status change, insert publication and removal is one atomic operation on this word,
 * so "same record" (generation) and "same status" are checked together.
 *
 * Field writers
 * -------------
 * Fields other than the status are plain relaxed atomics. A thread that writes one after
 * checking the state could be preempted, and in that window the record could be finished,
 * removed and its slot reused; the late write would then land in somebody else's record.
 * So every writer of a field on a live record (set_allocated, set_expiry, and transition
 * stamping updated_ns) first registers itself by adding PA__WRITER_ONE to the state word in
 * the same CAS that checks generation and status, and unregisters with a fetch_sub after
 * its stores. pa_table_remove frees the slot at once when no writer is registered;
 * otherwise it sets "removal pending" (the id already answers -ENOENT) and the last writer
 * to leave frees the slot. Nobody waits on anybody: removal stays lock-free.
 *
 * Reading a consistent record (seqlock-style)
 * -------------------------------------------
 * pa_table_get loads the state with acquire (pairs with the release that published the
 * record), loads the fields relaxed, issues an acquire fence and loads the state again.
 * Every writer of a field issues a release fence before its relaxed stores: insert
 * before it fills a reused slot, and set_allocated, set_expiry and the winner of a
 * transition right after registering (writer_enter / the transition CAS, both of which
 * read the state word at the new record's generation, so the removal's bump happens
 * before their fence). If any field load of a reader saw a value written by a later
 * record (by its insert or by any later field writer), that writer's fence synchronises
 * with the reader's acquire fence and the second state load sees the bumped generation,
 * so the snapshot is rejected: a returned snapshot always belongs to the id that was
 * asked for (the ordinary seqlock argument, Boehm, "Can seqlocks get along with
 * programming language memory models?", MSPC 2012).
 *
 * The free list
 * -------------
 * A Treiber stack (Treiber, IBM RJ 5118, 1986) of slot indices linked through each slot's
 * next_free; the head packs (tag << 32) | (index + 1) and every pop and push increments the
 * 32-bit tag, so a head value recycled by an ABA interleaving does not compare equal. Slots
 * are never freed before destroy, so reading a popped-away slot's next_free is safe.
 * Never-used slots come from a bump counter instead, so an empty table touches no memory
 * for slots.
 *
 * Spreading reuse (the generation bound of table.h)
 * -------------------------------------------------
 * A LIFO stack hands the slot freed last to the next insert, so a loop of insert/remove
 * with few records live would cycle one slot's 32-bit generation through every value in
 * minutes. So every PA__COOL_PERIOD-th removal of a slot (when the generation it leaves
 * ends in 16 one bits) sends the slot to the back of a FIFO "cool" list instead of the
 * stack. Inserts take the stack first, then the cool list once it holds PA__COOL_MIN
 * slots, then a never-used slot, then the cool list whatever its length. In the worst
 * churn a slot thus serves 2^16 reuses and then waits behind at least PA__COOL_MIN others
 * that each serve 2^16 (or behind every slot of a small table): the memory kept for
 * spreading is PA__COOL_MIN records (128 KiB) beyond the live ones. The cool list is a
 * linked list through next_free guarded by a spin flag held for O(1); removal only tries
 * it (a busy flag sends the slot to the stack, to cool at its next period), and an insert
 * spins for it only when the stack is empty — so insert and remove stay lock-free
 * except for that O(1) wait on the rare path.
 * Fresh slots start at generation 1 (state FREE, which no id names), so a slot's
 * generation is never 0 and insert uses it as it finds it.
 * fork: the table owns no thread and no lock a child could find held, except the cool
 * flag for the few instructions of a cool-list change; a child forked in that window
 * would spin on its first insert that finds the stack empty and the cool list due.
 */
#define _GNU_SOURCE
#include "prealloc/table.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "atomics.h"
#include "table_debug.h"

#define PA__SLOT_FREE 0xFFu
#define PA__STATUS_MASK 0xFFull
#define PA__WRITER_ONE (1ull << 8)
#define PA__WRITER_MASK (0xFFFFull << 8)
#define PA__REMOVE_PENDING (1ull << 24)
#define PA__CHUNK_MASK (PA_TABLE_CHUNK_SLOTS - 1u)
#define PA__COOL_PERIOD_MASK 0xFFFFu /* a slot cools when the generation it leaves ends so */
#define PA__COOL_MIN 1024u           /* cooled slots waiting before the list is drawn from */

typedef struct pa__slot {
    /* first cache line: what lookups and status changes touch */
    _Atomic uint64_t state;
    _Atomic uint32_t next_free; /* free-stack link: index + 1 of the next free slot, 0 = end */
    _Atomic uint32_t resource_type;
    _Atomic uint64_t requested; /* double bits */
    _Atomic uint64_t allocated; /* double bits */
    _Atomic uint64_t created_ns;
    _Atomic uint64_t updated_ns;
    _Atomic uint64_t expires_ns;
    _Atomic uint64_t timer;
    /* second cache line: the caller's keys */
    PA_CACHE_ALIGNED _Atomic uint64_t request_id;
    _Atomic uint64_t owner;
    _Atomic uint64_t user_data;
    _Atomic uint64_t allocated_ns; /* first entry into ALLOCATED, 0 = never */
    _Atomic uint64_t active_ns;    /* first entry into ACTIVE (claimed), 0 = never */
} pa__slot_t;

/* The engine's budget is <= 256 bytes per tracked allocation in total; the record is half. */
_Static_assert(sizeof(pa__slot_t) == 2 * PA_CACHE_LINE, "a slot record is two cache lines");

/* The live count is sharded by thread: each of the first PA__LIVE_SHARDS threads that
 * touch any table owns one shard and updates it with a plain load + store (no locked
 * instruction: only its owner writes it); later threads share live_shared with a
 * fetch_add. pa_table_live sums them (relaxed: exact once the callers are quiescent). This
 * takes one locked read-modify-write off every insert and remove and keeps the counter's
 * cache line from bouncing between inserting threads. Indices are never recycled, so a
 * process that churns through more than PA__LIVE_SHARDS threads falls back to the shared
 * counter for the newer ones. */
#define PA__LIVE_SHARDS 64
typedef struct pa__live_shard {
    PA_CACHE_ALIGNED _Atomic uint64_t count; /* wraps: a shard may go "negative" */
} pa__live_shard_t;

static _Atomic uint32_t pa__live_threads;       /* thread indices handed out so far */
static _Thread_local uint32_t pa__live_shard_of; /* 0 = none yet, else index + 1 */

struct pa_table {
    /* Written by every insert and remove: each on its own line so they do not slow the
     * read-only line below or each other. */
    PA_CACHE_ALIGNED _Atomic uint64_t free_head; /* (tag << 32) | (index + 1); 0 in low half = empty */
    PA_CACHE_ALIGNED _Atomic uint32_t bump;      /* never-used slots handed out so far */
    /* live count = sum of the shards (see live_add) */
    PA_CACHE_ALIGNED _Atomic uint64_t live_shared;
    pa__live_shard_t live_shards[PA__LIVE_SHARDS];
    /* the cool list (see "Spreading reuse"): head and tail are index + 1, 0 = empty */
    PA_CACHE_ALIGNED atomic_flag cool_busy;
    uint32_t cool_head, cool_tail; /* cool_busy */
    _Atomic uint32_t cool_count;   /* written under cool_busy, read without it */
    /* read-only after create (the chunk pointers themselves are atomics) */
    PA_CACHE_ALIGNED uint32_t capacity;
    uint32_t chunk_count;
    _Atomic(pa__slot_t *) *chunks;
};

/* ---- the live count ---- */

static void live_add(pa_table_t *t, uint64_t delta) {
    uint32_t shard = pa__live_shard_of;
    if (shard == 0) {
        /* relaxed: only uniqueness of the index matters */
        shard = pa__fetch_add_relaxed(&pa__live_threads, 1) + 1;
        if (shard > PA__LIVE_SHARDS) shard = UINT32_MAX; /* no shard left: share */
        pa__live_shard_of = shard;
    }
    if (shard <= PA__LIVE_SHARDS) {
        _Atomic uint64_t *count = &t->live_shards[shard - 1].count;
        /* relaxed load + store: this thread is the shard's only writer */
        pa__store_relaxed(count, pa__load_relaxed(count) + delta);
    } else {
        pa__fetch_add_relaxed(&t->live_shared, delta);
    }
}

/* ---- ids and state words ---- */

static inline uint32_t id_index(pa_id_t id) { return (uint32_t)id; }
static inline uint32_t id_generation(pa_id_t id) { return (uint32_t)(id >> 32); }
static inline uint32_t state_generation(uint64_t s) { return (uint32_t)(s >> 32); }
static inline uint32_t state_status(uint64_t s) { return (uint32_t)(s & PA__STATUS_MASK); }
static inline uint64_t state_make(uint32_t generation, uint32_t status) {
    return ((uint64_t)generation << 32) | status;
}
/* The generation after a removal; skips 0 on wrap so that an id is never 0. */
static inline uint32_t generation_next(uint32_t g) { return g == UINT32_MAX ? 1u : g + 1u; }

/* Does state s hold the live-or-final record named by id (not freed, not being removed)? */
static inline bool state_names(uint64_t s, pa_id_t id) {
    return state_generation(s) == id_generation(id) && state_status(s) != PA__SLOT_FREE &&
           (s & PA__REMOVE_PENDING) == 0;
}
static inline bool status_is_final(uint32_t status) {
    return status < PA_STATUS_COUNT && (PA_STATUS_BIT(status) & PA_STATUS_FINAL_MASK) != 0;
}

/* ---- slots and chunks ---- */

static inline uint32_t chunk_slots(const pa_table_t *t, uint32_t chunk) {
    uint32_t base = chunk << PA_TABLE_CHUNK_SHIFT;
    uint32_t left = t->capacity - base;
    return left < PA_TABLE_CHUNK_SLOTS ? left : PA_TABLE_CHUNK_SLOTS;
}

/* The slot at index, or NULL if its chunk was never installed (then no id names it). */
static inline pa__slot_t *slot_at(const pa_table_t *t, uint32_t index) {
    /* acquire: pairs with the install CAS in chunk_install, so the chunk's initialised
     * slots are visible before we read them */
    pa__slot_t *chunk = pa__load_acquire(&t->chunks[index >> PA_TABLE_CHUNK_SHIFT]);
    return chunk ? &chunk[index & PA__CHUNK_MASK] : NULL;
}

/* The slot an id names, or NULL when the id cannot name any slot. */
static inline pa__slot_t *slot_for_id(const pa_table_t *t, pa_id_t id) {
    if (id_generation(id) == 0 || id_index(id) >= t->capacity) return NULL;
    return slot_at(t, id_index(id));
}

static int chunk_install(pa_table_t *t, uint32_t chunk_index) {
    _Atomic(pa__slot_t *) *entry = &t->chunks[chunk_index];
    /* acquire: pairs with the install CAS below (another thread's) */
    if (pa__load_acquire(entry) != NULL) return 0;
    uint32_t n = chunk_slots(t, chunk_index);
    pa__slot_t *fresh = aligned_alloc(PA_CACHE_LINE, (size_t)n * sizeof(pa__slot_t));
    if (!fresh) return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        pa__slot_t *s = &fresh[i];
        /* FREE: no id can name a never-used slot; generation 1 is its first record's */
        pa__store_relaxed(&s->state, state_make(1, PA__SLOT_FREE));
        pa__store_relaxed(&s->next_free, 0);
        pa__store_relaxed(&s->resource_type, 0);
        pa__store_relaxed(&s->requested, 0);
        pa__store_relaxed(&s->allocated, 0);
        pa__store_relaxed(&s->created_ns, 0);
        pa__store_relaxed(&s->updated_ns, 0);
        pa__store_relaxed(&s->allocated_ns, 0);
        pa__store_relaxed(&s->active_ns, 0);
        pa__store_relaxed(&s->expires_ns, 0);
        pa__store_relaxed(&s->timer, 0);
        pa__store_relaxed(&s->request_id, 0);
        pa__store_relaxed(&s->owner, 0);
        pa__store_relaxed(&s->user_data, 0);
    }
    pa__slot_t *expected = NULL;
    /* acq_rel: the release publishes the initialised slots to every acquire load of this
     * entry (slot_at); on failure the acquire makes the winner's chunk usable here */
    if (!pa__cas_strong_acq_rel(entry, &expected, fresh)) free(fresh);
    return 0;
}

/* ---- the free stack ---- */

static bool free_pop(pa_table_t *t, uint32_t *index_out) {
    /* acquire: pairs with free_push's release CAS (and the release sequence of later pops),
     * so the popped slot's next_free and its freed state are visible */
    uint64_t head = pa__load_acquire(&t->free_head);
    for (;;) {
        uint32_t top = (uint32_t)head;
        if (top == 0) return false;
        pa__slot_t *s = slot_at(t, top - 1);
        /* may be stale if another thread pops and re-pushes top meanwhile: then the tag
         * has moved on and the CAS below fails */
        uint32_t next = pa__load_relaxed(&s->next_free);
        uint64_t desired = (((head >> 32) + 1) << 32) | next;
        /* acq_rel: acquire as above; release keeps the release sequence intact for the
         * next popper */
        if (pa__cas_weak_acq_rel(&t->free_head, &head, desired)) {
            *index_out = top - 1;
            return true;
        }
    }
}

static void free_push(pa_table_t *t, uint32_t index) {
    pa__slot_t *s = slot_at(t, index);
    uint64_t head = pa__load_relaxed(&t->free_head);
    for (;;) {
        pa__store_relaxed(&s->next_free, (uint32_t)head);
        uint64_t desired = (((head >> 32) + 1) << 32) | (uint64_t)(index + 1);
        /* release: publishes next_free and the slot's freed state word to free_pop */
        if (pa__cas_weak_release(&t->free_head, &head, desired)) return;
    }
}

/* ---- the cool list ---- */

static void cool_lock(pa_table_t *t) {
    /* acquire: pairs with cool_unlock's release, so the list is seen as the last holder
     * left it */
    while (atomic_flag_test_and_set_explicit(&t->cool_busy, memory_order_acquire)) pa__cpu_relax();
}

static void cool_unlock(pa_table_t *t) {
    atomic_flag_clear_explicit(&t->cool_busy, memory_order_release);
}

/* Appends a freed slot; false (nothing done) when another thread holds the list. */
static bool cool_try_push(pa_table_t *t, uint32_t index) {
    if (atomic_flag_test_and_set_explicit(&t->cool_busy, memory_order_acquire)) return false;
    pa__slot_t *s = slot_at(t, index);
    pa__store_relaxed(&s->next_free, 0);
    if (t->cool_tail == 0)
        t->cool_head = index + 1;
    else
        pa__store_relaxed(&slot_at(t, t->cool_tail - 1)->next_free, index + 1);
    t->cool_tail = index + 1;
    pa__store_relaxed(&t->cool_count, pa__load_relaxed(&t->cool_count) + 1);
    cool_unlock(t);
    return true;
}

/* Takes the oldest cooled slot when at least `least` are waiting. */
static bool cool_pop(pa_table_t *t, uint32_t least, uint32_t *index_out) {
    if (pa__load_relaxed(&t->cool_count) < (least ? least : 1)) return false;
    cool_lock(t);
    bool got = t->cool_head != 0 && pa__load_relaxed(&t->cool_count) >= least;
    if (got) {
        *index_out = t->cool_head - 1;
        t->cool_head = pa__load_relaxed(&slot_at(t, *index_out)->next_free);
        if (t->cool_head == 0) t->cool_tail = 0;
        pa__store_relaxed(&t->cool_count, pa__load_relaxed(&t->cool_count) - 1);
    }
    cool_unlock(t);
    return got;
}

/* Gives a freed slot back: to the cool list once a period, else to the stack. `left` is
 * the generation the removed record had. */
static void slot_recycle(pa_table_t *t, uint32_t index, uint32_t left) {
    if ((left & PA__COOL_PERIOD_MASK) == PA__COOL_PERIOD_MASK && cool_try_push(t, index)) return;
    free_push(t, index);
}

/* A never-used slot from the bump counter. Its chunk is installed before the index is
 * taken, so an allocation failure leaves the counter untouched and loses no capacity. */
static int bump_take(pa_table_t *t, uint32_t *index_out) {
    uint32_t n = pa__load_relaxed(&t->bump);
    for (;;) {
        if (n >= t->capacity) return -ENOSPC;
        int rc = chunk_install(t, n >> PA_TABLE_CHUNK_SHIFT);
        if (rc != 0) return rc;
        /* relaxed: the counter only hands out distinct indices; the slot memory is
         * ordered by the chunk install (acquire in slot_at) */
        if (pa__cas_strong_relaxed(&t->bump, &n, n + 1)) break;
    }
    *index_out = n;
    return 0;
}

/* Frees a slot whose state is `s` (final, no writers). Only one thread can be here for a
 * given record: remove with no writers, or the last writer after a pending removal. */
static void slot_release(pa_table_t *t, pa__slot_t *s, uint32_t index, uint64_t state) {
    /* release: pairs with acquire loads of the state (get/status); the bumped generation
     * makes every old id stale */
    pa__store_release(&s->state, state_make(generation_next(state_generation(state)), PA__SLOT_FREE));
    slot_recycle(t, index, state_generation(state));
    live_add(t, (uint64_t)-1);
}

/* ---- field writers ---- */

/* Registers a field writer on the live (non-final) record id names. */
static int writer_enter(pa__slot_t *s, pa_id_t id) {
    /* acquire: pairs with the release that published the record */
    uint64_t state = pa__load_acquire(&s->state);
    for (;;) {
        if (!state_names(state, id) || status_is_final(state_status(state))) return -ENOENT;
        if ((state & PA__WRITER_MASK) == PA__WRITER_MASK) {
            /* 65535 writers on one record at once: wait for one to leave */
            pa__cpu_relax();
            state = pa__load_acquire(&s->state);
            continue;
        }
        /* acq_rel: fails if anything changed the record; on success no removal can free
         * the slot until writer_exit */
        if (pa__cas_weak_acq_rel(&s->state, &state, state + PA__WRITER_ONE)) return 0;
    }
}

static void writer_exit(pa_table_t *t, pa__slot_t *s, uint32_t index) {
    /* acq_rel: release orders this writer's field stores before a removal that follows;
     * acquire (when this is the last writer of a pending removal) orders every other
     * writer's stores before the slot is freed and reused */
    uint64_t old = pa__fetch_sub_acq_rel(&s->state, PA__WRITER_ONE);
    if ((old & PA__REMOVE_PENDING) && (old & PA__WRITER_MASK) == PA__WRITER_ONE)
        slot_release(t, s, index, old - PA__WRITER_ONE);
}

/* ---- public ---- */

int pa_table_create(uint32_t capacity, pa_table_t **out) {
    if (!out || capacity == 0 || capacity > PA_TABLE_MAX_CAPACITY) return -EINVAL;
    size_t size = (sizeof(pa_table_t) + PA_CACHE_LINE - 1) & ~(size_t)(PA_CACHE_LINE - 1);
    pa_table_t *t = aligned_alloc(PA_CACHE_LINE, size);
    if (!t) return -ENOMEM;
    memset(t, 0, size);
    t->capacity = capacity;
    t->chunk_count = (capacity + PA_TABLE_CHUNK_SLOTS - 1) >> PA_TABLE_CHUNK_SHIFT;
    t->chunks = malloc(sizeof(*t->chunks) * t->chunk_count);
    if (!t->chunks) {
        free(t);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < t->chunk_count; i++) pa__store_relaxed(&t->chunks[i], NULL);
    pa__store_relaxed(&t->free_head, 0);
    pa__store_relaxed(&t->bump, 0);
    atomic_flag_clear_explicit(&t->cool_busy, memory_order_relaxed);
    t->cool_head = t->cool_tail = 0;
    pa__store_relaxed(&t->cool_count, 0);
    pa__store_relaxed(&t->live_shared, 0);
    for (unsigned i = 0; i < PA__LIVE_SHARDS; i++) pa__store_relaxed(&t->live_shards[i].count, 0);
    *out = t;
    return 0;
}

void pa_table_destroy(pa_table_t *table) {
    if (!table) return;
    for (uint32_t i = 0; i < table->chunk_count; i++) free(pa__load_relaxed(&table->chunks[i]));
    free(table->chunks);
    free(table);
}

int pa_table_insert(pa_table_t *t, const pa_record_init_t *init, pa_id_t *out_id) {
    return pa_table_insert_at(t, init, pa_clock_now_ns(), out_id);
}

int pa_table_insert_at(pa_table_t *t, const pa_record_init_t *init, uint64_t now, pa_id_t *out_id) {
    if (!t || !init || !out_id) return -EINVAL;
    if (init->status != PA_STATUS_PENDING && init->status != PA_STATUS_ALLOCATED) return -EINVAL;
    if (!isfinite(init->requested) || init->requested < 0) return -EINVAL;
    if (!isfinite(init->allocated) || init->allocated < 0) return -EINVAL;

    uint32_t index;
    if (!free_pop(t, &index) && !cool_pop(t, PA__COOL_MIN, &index)) {
        int rc = bump_take(t, &index);
        if (rc == -ENOSPC && cool_pop(t, 0, &index)) rc = 0;
        if (rc != 0) return rc;
    }
    pa__slot_t *s = slot_at(t, index);
    /* The slot is ours alone: the stack pop (or the bump) gave it to this thread only. */
    uint32_t generation = state_generation(pa__load_relaxed(&s->state));

    /* release fence (seqlock writer side): pairs with the acquire fence in pa_table_get.
     * A reader whose field loads see the stores below also sees, on its re-check, the
     * bumped generation of the removal that preceded this reuse. */
    pa__fence_release();
    pa__store_relaxed(&s->resource_type, init->resource_type);
    pa__store_relaxed(&s->requested, pa__double_bits(init->requested));
    pa__store_relaxed(&s->allocated, pa__double_bits(init->allocated));
    pa__store_relaxed(&s->created_ns, now);
    pa__store_relaxed(&s->updated_ns, now);
    pa__store_relaxed(&s->allocated_ns, init->status == PA_STATUS_ALLOCATED ? now : 0);
    pa__store_relaxed(&s->active_ns, 0);
    pa__store_relaxed(&s->expires_ns, init->expires_ns);
    pa__store_relaxed(&s->timer, 0);
    pa__store_relaxed(&s->request_id, init->request_id);
    pa__store_relaxed(&s->owner, init->owner);
    pa__store_relaxed(&s->user_data, init->user_data);
    live_add(t, 1);
    /* release: publishes the fields to every acquire load of the state */
    pa__store_release(&s->state, state_make(generation, init->status));
    *out_id = ((pa_id_t)generation << 32) | index;
    return 0;
}

int pa_table_remove(pa_table_t *t, pa_id_t id) {
    if (!t) return -EINVAL;
    pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    /* acquire: pairs with the transition that made the record final */
    uint64_t state = pa__load_acquire(&s->state);
    for (;;) {
        if (!state_names(state, id)) return -ENOENT;
        if (!status_is_final(state_status(state))) return -EBUSY;
        if ((state & PA__WRITER_MASK) == 0) {
            uint64_t freed = state_make(generation_next(state_generation(state)), PA__SLOT_FREE);
            /* acq_rel: acquire orders the last writer's stores (its acq_rel fetch_sub)
             * before the reuse; release publishes the bumped generation to readers */
            if (pa__cas_weak_acq_rel(&s->state, &state, freed)) {
                slot_recycle(t, id_index(id), state_generation(state));
                live_add(t, (uint64_t)-1);
                return 0;
            }
        } else {
            /* acq_rel: a writer is between its stores; the last one out frees the slot */
            if (pa__cas_weak_acq_rel(&s->state, &state, state | PA__REMOVE_PENDING)) return 0;
        }
    }
}

int pa_table_get(const pa_table_t *t, pa_id_t id, pa_record_t *out) {
    if (!t || !out) return -EINVAL;
    const pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    /* acquire: pairs with the release store in insert and the transition CASes, so the
     * fields read below are at least as new as this state */
    uint64_t first = pa__load_acquire(&s->state);
    if (!state_names(first, id)) return -ENOENT;
    pa_record_t r;
    r.id = id;
    r.status = state_status(first);
    r.resource_type = pa__load_relaxed(&s->resource_type);
    r.requested = pa__bits_double(pa__load_relaxed(&s->requested));
    r.allocated = pa__bits_double(pa__load_relaxed(&s->allocated));
    r.created_ns = pa__load_relaxed(&s->created_ns);
    r.updated_ns = pa__load_relaxed(&s->updated_ns);
    r.allocated_ns = pa__load_relaxed(&s->allocated_ns);
    r.active_ns = pa__load_relaxed(&s->active_ns);
    r.expires_ns = pa__load_relaxed(&s->expires_ns);
    r.timer = pa__load_relaxed(&s->timer);
    r.request_id = pa__load_relaxed(&s->request_id);
    r.owner = pa__load_relaxed(&s->owner);
    r.user_data = pa__load_relaxed(&s->user_data);
    /* acquire fence (seqlock reader side): pairs with the release fence in insert; keeps
     * the field loads above before the re-check below */
    pa__fence_acquire();
    uint64_t second = pa__load_relaxed(&s->state);
    /* Same generation and not freed: no reuse happened, every field belongs to this id.
     * A removal merely pending still leaves the fields untouched. */
    if (state_generation(second) != id_generation(id) || state_status(second) == PA__SLOT_FREE)
        return -ENOENT;
    *out = r;
    return 0;
}

int pa_table_status(const pa_table_t *t, pa_id_t id) {
    if (!t) return -EINVAL;
    const pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    /* acquire: pairs with the transition CAS that set this status */
    uint64_t state = pa__load_acquire(&s->state);
    return state_names(state, id) ? (int)state_status(state) : -ENOENT;
}

int pa_table_transition(pa_table_t *t, pa_id_t id, uint32_t from_mask, pa_status_t to,
                        pa_status_t *prev_out) {
    return pa_table_transition_at(t, id, from_mask, to, 0, prev_out);
}

int pa_table_transition_at(pa_table_t *t, pa_id_t id, uint32_t from_mask, pa_status_t to, uint64_t now,
                           pa_status_t *prev_out) {
    if (!t) return -EINVAL;
    if ((unsigned)to >= PA_STATUS_COUNT) return -EINVAL;
    pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    /* acquire: pairs with the CAS of whoever set the current status */
    uint64_t state = pa__load_acquire(&s->state);
    for (;;) {
        if (!state_names(state, id)) return -ENOENT;
        uint32_t from = state_status(state);
        if (prev_out) *prev_out = (pa_status_t)from;
        if ((PA_STATUS_BIT(from) & from_mask) == 0) return -EAGAIN;
        if (!pa_status_transition_legal(from, (unsigned)to)) return -EINVAL;
        if ((state & PA__WRITER_MASK) == PA__WRITER_MASK) {
            pa__cpu_relax();
            state = pa__load_acquire(&s->state);
            continue;
        }
        /* The winner also registers as a field writer so that stamping updated_ns cannot
         * land in a later record of this slot (see "Field writers" above). */
        uint64_t desired = ((state & ~PA__STATUS_MASK) | (uint64_t)to) + PA__WRITER_ONE;
        /* acq_rel: exactly one of racing transitions succeeds; release publishes the new
         * status, acquire (also on failure) lets the loser see the winner's status */
        if (pa__cas_weak_acq_rel(&s->state, &state, desired)) break;
    }
    /* the clock is read only by the winner, and only when the caller gave no time; a
     * caller's time taken before this record was created moves up to its creation, so
     * the stamps never run backwards */
    if (now == 0) now = pa_clock_now_ns();
    /* release fence (seqlock writer side): pairs with the acquire fence in pa_table_get,
     * as for the other field writers */
    pa__fence_release();
    uint64_t created = pa__load_relaxed(&s->created_ns);
    if (now < created) now = created;
    pa__store_relaxed(&s->updated_ns, now);
    /* The first entry into ALLOCATED / ACTIVE is kept (a reverted release re-enters them
     * and must not move the stamp): the engine's allocation time and waste need it. Only
     * the transition's winner, registered as a writer, stores these, so load + store is
     * enough. */
    if (to == PA_STATUS_ALLOCATED && pa__load_relaxed(&s->allocated_ns) == 0)
        pa__store_relaxed(&s->allocated_ns, now);
    else if (to == PA_STATUS_ACTIVE && pa__load_relaxed(&s->active_ns) == 0)
        pa__store_relaxed(&s->active_ns, now);
    writer_exit(t, s, id_index(id));
    return 0;
}

int pa_table_set_allocated(pa_table_t *t, pa_id_t id, double allocated) {
    if (!t) return -EINVAL;
    if (!isfinite(allocated) || allocated < 0) return -EINVAL;
    pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    int rc = writer_enter(s, id);
    if (rc != 0) return rc;
    /* release fence (seqlock writer side): pairs with the acquire fence in pa_table_get */
    pa__fence_release();
    pa__store_relaxed(&s->allocated, pa__double_bits(allocated));
    writer_exit(t, s, id_index(id));
    return 0;
}

int pa_table_set_expiry(pa_table_t *t, pa_id_t id, uint64_t expires_ns, uint64_t timer) {
    if (!t) return -EINVAL;
    pa__slot_t *s = slot_for_id(t, id);
    if (!s) return -ENOENT;
    int rc = writer_enter(s, id);
    if (rc != 0) return rc;
    /* release fence (seqlock writer side): pairs with the acquire fence in pa_table_get */
    pa__fence_release();
    pa__store_relaxed(&s->expires_ns, expires_ns);
    pa__store_relaxed(&s->timer, timer);
    writer_exit(t, s, id_index(id));
    return 0;
}

size_t pa_table_live(const pa_table_t *t) {
    if (!t) return 0;
    uint64_t sum = pa__load_relaxed(&t->live_shared);
    for (unsigned i = 0; i < PA__LIVE_SHARDS; i++) sum += pa__load_relaxed(&t->live_shards[i].count);
    /* a scan racing inserts and removes can see a removal before its insert */
    return (int64_t)sum < 0 ? 0 : (size_t)sum;
}

uint32_t pa_table_capacity(const pa_table_t *t) { return t ? t->capacity : 0; }

/* Scan cursor: the next record at or after *index that is live or final (not free, not
 * being removed). Slots past the bump counter were never used. */
static bool scan_next(const pa_table_t *t, uint32_t *index, pa_id_t *id_out, uint32_t *status_out) {
    uint32_t used = pa__load_relaxed(&t->bump);
    if (used > t->capacity) used = t->capacity;
    while (*index < used) {
        uint32_t i = (*index)++;
        const pa__slot_t *s = slot_at(t, i);
        if (!s) {
            /* chunk still being installed: none of its slots holds a record yet */
            *index = (i | PA__CHUNK_MASK) + 1;
            continue;
        }
        /* acquire: pairs with the release that published the record or its status */
        uint64_t state = pa__load_acquire(&s->state);
        uint32_t status = state_status(state);
        if (status == PA__SLOT_FREE || (state & PA__REMOVE_PENDING)) continue;
        *id_out = ((pa_id_t)state_generation(state) << 32) | i;
        *status_out = status;
        return true;
    }
    return false;
}

int pa_table_collect(const pa_table_t *t, uint32_t status_mask, pa_id_t *out, size_t max,
                     size_t *count_out) {
    if (count_out) *count_out = 0;
    if (!t || (!out && max > 0)) return -EINVAL;
    size_t n = 0;
    uint32_t cursor = 0, status;
    pa_id_t id;
    while (n < max && scan_next(t, &cursor, &id, &status))
        if (PA_STATUS_BIT(status) & status_mask) out[n++] = id;
    if (count_out) *count_out = n;
    return 0;
}

void pa_table_count_by_status(const pa_table_t *t, size_t counts[PA_STATUS_COUNT]) {
    if (!counts) return;
    for (unsigned i = 0; i < PA_STATUS_COUNT; i++) counts[i] = 0;
    if (!t) return;
    uint32_t cursor = 0, status;
    pa_id_t id;
    while (scan_next(t, &cursor, &id, &status))
        if (status < PA_STATUS_COUNT) counts[status]++;
}

/* ---- test hook (table_debug.h) ---- */

int pa__table_set_generation(pa_table_t *t, uint32_t index, uint32_t generation) {
    if (!t || generation == 0 || index >= t->capacity) return -EINVAL;
    int rc = chunk_install(t, index >> PA_TABLE_CHUNK_SHIFT);
    if (rc != 0) return rc;
    pa__slot_t *s = slot_at(t, index);
    uint64_t state = pa__load_acquire(&s->state);
    if (state_status(state) != PA__SLOT_FREE) return -EBUSY;
    pa__store_release(&s->state, state_make(generation, PA__SLOT_FREE));
    return 0;
}
