/*
 * prealloc/table.h — the allocation table.
 *
 * Design
 * ------
 * A generational slot array (the "slot map" of game engines; Linux's pid/idr allocator
 * uses the same idea to keep stale handles from aliasing new objects). Every record lives
 * in a slot that never moves; an id is (generation << 32) | slot. Removing a record bumps
 * the slot's generation, so an id held after removal never names the record that reuses
 * the slot: every call with it answers -ENOENT.
 *
 * The generation and the status share one 64-bit atomic word per record
 * ((generation << 32) | status). Every status change is a single compare-and-swap on that
 * word, so it checks "still the same record" and "still in the status I saw" at once:
 * when a release (ALLOCATED -> RELEASING) races an expiry (ALLOCATED -> EXPIRED), exactly
 * one CAS succeeds and the other sees the winner's status. Only legal edges of the status
 * machine (pa_status_transition_legal) are accepted.
 *
 * Slots are stored in fixed-size chunks reached through a directory that is allocated
 * once at init (capacity / PA_TABLE_CHUNK_SLOTS pointers); a chunk is allocated the first
 * time one of its slots is handed out and is never freed or moved before destroy. Free
 * slots form a Treiber stack whose head carries a 32-bit tag against ABA; every 2^16th
 * reuse of a slot sends it to the back of a FIFO "cool" list instead, so that a churn
 * of few records spreads over many slots (see Limits).
 *
 * Complexity and progress
 * -----------------------
 *   lookup (get / status):        O(1), wait-free (two dependent loads + a re-check).
 *   transition / set_*:           O(1), lock-free (CAS retry only when another thread
 *                                 changed the same record).
 *   insert / remove:              O(1), lock-free (Treiber stack CAS; a chunk allocation
 *                                 calls malloc once per PA_TABLE_CHUNK_SLOTS inserts;
 *                                 the cool list is a spin flag held for O(1), which
 *                                 remove only tries and insert waits for only when the
 *                                 stack is empty).
 *   collect / count:              O(capacity touched so far); a scan, not a snapshot.
 *
 * Limits
 * ------
 *   capacity <= PA_TABLE_MAX_CAPACITY live records; insert answers -ENOSPC beyond it.
 *   Generations: a slot's generation wraps (2^32 - 1 -> 1, never 0) after 2^32 - 1
 *   reuses of that slot, and an id held across that many reuses of its own slot would
 *   alias. Reuse is spread: a slot serves at most 2^16 reuses in a row and then waits in
 *   FIFO order behind at least 1024 other cooled slots (or every other slot, in a table
 *   of capacity < 1025), each of which serves up to 2^16 before it comes back. So in the
 *   worst case, a single-record insert/remove loop, a slot's generation wraps only after
 *   about min(capacity, 1025) * 2^32 inserts in the whole table: 4.4e12, about 3.4 days at
 *   15 M inserts/s (capacity 1 wraps after 2^32, about 5 minutes: nothing to spread
 *   over). Spreading keeps at most 1024 records (128 KiB) in the cool list beyond the
 *   live ones. An id kept that long after its record was removed is a caller bug the
 *   table cannot detect.
 *   Fields other than the status are individually atomic; a snapshot (pa_table_get) is
 *   guaranteed to belong to the id asked for, and each field is a value the record held.
 */
#ifndef PREALLOC_TABLE_H
#define PREALLOC_TABLE_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_TABLE_CHUNK_SHIFT 12
#define PA_TABLE_CHUNK_SLOTS (1u << PA_TABLE_CHUNK_SHIFT)
#define PA_TABLE_MAX_CAPACITY (1u << 30)

/* A consistent copy of one record. */
typedef struct pa_record {
    pa_id_t id;
    uint32_t status;        /* pa_status_t */
    uint32_t resource_type; /* opaque to the core; prealloc.ResourceType in Python */
    double requested;       /* amount asked for, in the resource type's unit */
    double allocated;       /* amount actually reserved */
    uint64_t created_ns;    /* when inserted */
    uint64_t updated_ns;    /* when the status last changed */
    uint64_t allocated_ns;  /* when it first became ALLOCATED, 0 = never */
    uint64_t active_ns;     /* when it first became ACTIVE (claimed), 0 = never */
    uint64_t expires_ns;    /* 0 = no expiry */
    uint64_t timer;         /* the expiry timer's handle (pa_timer_id_t), 0 = none */
    uint64_t request_id;    /* the caller's request id */
    uint64_t owner;         /* the caller's owner / target key */
    uint64_t user_data;     /* free for the caller */
} pa_record_t;

/* What a new record starts with. status must be PENDING or ALLOCATED. */
typedef struct pa_record_init {
    uint32_t status;
    uint32_t resource_type;
    double requested;
    double allocated;
    uint64_t expires_ns;
    uint64_t request_id;
    uint64_t owner;
    uint64_t user_data;
} pa_record_init_t;

/* Opaque: the table's internals are C11 atomics, which a C++ host cannot see portably,
 * so unlike the plain-data structs of this library (pa_memory_t, pa_cpumask_t) the table
 * is created and destroyed by the library. */
typedef struct pa_table pa_table_t;

/* capacity: the most records live at once (1 .. PA_TABLE_MAX_CAPACITY); memory for
 * slots is taken chunk by chunk as they are first used. -EINVAL, -ENOMEM. */
PA_API int pa_table_create(uint32_t capacity, pa_table_t **out);
/* Frees everything. No other thread may use the table during or after. NULL is a no-op.
 * NULL rule (every module): a call given a NULL object or a NULL pointer it needs answers
 * -EINVAL (size_t/uint32_t answers 0; destroy does nothing). */
PA_API void pa_table_destroy(pa_table_t *table);

/* Inserts a record; *out_id receives its id. -EINVAL (bad initial status, NaN or
 * negative amount), -ENOSPC (capacity live records), -ENOMEM. */
PA_API int pa_table_insert(pa_table_t *table, const pa_record_init_t *init, pa_id_t *out_id);

/* pa_table_insert with the caller's timestamp (CLOCK_MONOTONIC ns) instead of a clock
 * read: a batch can stamp many records with one reading (the clock is the larger part of
 * an insert's cost on machines whose clocksource is not the TSC). */
PA_API int pa_table_insert_at(pa_table_t *table, const pa_record_init_t *init, uint64_t now_ns,
                              pa_id_t *out_id);

/* Removes a record that is in a final state, making its id stale. -ENOENT (unknown or
 * stale id), -EBUSY (the record is not in a final state). */
PA_API int pa_table_remove(pa_table_t *table, pa_id_t id);

/* Copies a record. -ENOENT for an unknown or stale id. Wait-free. */
PA_API int pa_table_get(const pa_table_t *table, pa_id_t id, pa_record_t *out);

/* The record's status (>= 0), or -ENOENT. Wait-free. */
PA_API int pa_table_status(const pa_table_t *table, pa_id_t id);

/* Moves the record to `to` if its status is one of from_mask (PA_STATUS_BIT(...) ORed)
 * and the edge is legal. *prev_out (nullable) receives the status seen.
 *   0        this call made the transition (it won any race)
 *   -ENOENT  unknown or stale id
 *   -EAGAIN  the record's status is not in from_mask (another transition won first)
 *   -EINVAL  `to` is not a status, or the edge from the status seen to `to` is illegal
 * Also stamps updated_ns. */
PA_API int pa_table_transition(pa_table_t *table, pa_id_t id, uint32_t from_mask, pa_status_t to,
                               pa_status_t *prev_out);

/* pa_table_transition with the caller's timestamp for updated_ns (and allocated_ns /
 * active_ns); now_ns 0 reads the clock (after winning, as pa_table_transition does). */
PA_API int pa_table_transition_at(pa_table_t *table, pa_id_t id, uint32_t from_mask, pa_status_t to,
                                  uint64_t now_ns, pa_status_t *prev_out);

/* Field updates on a live record (any non-final status). -ENOENT (stale or final),
 * -EINVAL (allocated NaN or negative). */
PA_API int pa_table_set_allocated(pa_table_t *table, pa_id_t id, double allocated);
PA_API int pa_table_set_expiry(pa_table_t *table, pa_id_t id, uint64_t expires_ns, uint64_t timer);

/* Number of records inserted and not yet removed. */
PA_API size_t pa_table_live(const pa_table_t *table);
PA_API uint32_t pa_table_capacity(const pa_table_t *table);

/* Writes up to max ids of records whose status is in status_mask into out; *count_out
 * receives how many were written. A scan, not an atomic snapshot: records changing during
 * the scan may or may not be included. Returns 0 (-EINVAL for out NULL with max > 0). */
PA_API int pa_table_collect(const pa_table_t *table, uint32_t status_mask, pa_id_t *out, size_t max,
                            size_t *count_out);

/* counts[s] = number of records in status s (same scan semantics). */
PA_API void pa_table_count_by_status(const pa_table_t *table, size_t counts[PA_STATUS_COUNT]);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_TABLE_H */
