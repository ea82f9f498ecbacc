/*
 * prealloc/pq.h — the request queue: a lock-free multi-producer multi-consumer priority
 * queue.
 *
 * Order
 * -----
 * pop returns the item with the highest priority, then the highest confidence, then the
 * earliest deadline (a missing deadline — NaN or +inf — sorts after every real one), then
 * the earliest arrival. Arrival is a 64-bit sequence number taken at push, so no two items
 * compare equal and the order is total (FIFO among otherwise equal items).
 *
 * Algorithm: see the design comment at the top of src/native/pq.c (it names the
 * published algorithm, its memory reclamation, complexity and progress guarantee).
 *
 * Cancellation: a queue created with PA_PQ_INDEXED keeps an index from value to queued
 * item, so pa_pq_cancel(value) can withdraw a queued item (values must then be unique
 * among queued items; a second push of a queued value answers -EEXIST). Without the index
 * the queue carries any values, duplicates included, and cancellation is the caller's
 * business — prealloc's engine queues allocation-table ids and cancels lazily through the
 * record's status.
 *
 * Capacity: unbounded (nodes are malloc'ed); push answers -ENOMEM only when malloc does.
 *
 * Fork: a child may keep using a queue it inherited, provided no other thread of the parent
 * was inside a call on that queue at the fork (a push caught half-linked would stay half
 * linked: the node stays reachable and poppable, but the prefix cut stops before it, so
 * pops there walk a growing deleted prefix). Memory reclamation itself restarts clean in
 * the child whatever the parent's threads were doing (src/native/epoch.c, "fork").
 */
#ifndef PREALLOC_PQ_H
#define PREALLOC_PQ_H

#include <sys/types.h> /* ssize_t */

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_PQ_INDEXED (1u << 0)

typedef struct pa_pq pa_pq_t; /* opaque */

typedef struct pa_pq_item {
    uint64_t value;
    double priority;
    double confidence;
    double deadline; /* NaN or +inf when none (pop and peek report +inf) */
    uint64_t arrival; /* sequence number assigned at push (a ticket taken as it starts) */
} pa_pq_item_t;

/* flags: 0 or PA_PQ_INDEXED. -EINVAL for unknown flags, -ENOMEM. */
PA_API int pa_pq_create(unsigned flags, pa_pq_t **out);
/* Frees the queue and every queued item. No other thread may use it during or after. */
PA_API void pa_pq_destroy(pa_pq_t *pq);

/* -EINVAL (priority or confidence NaN, deadline -inf), -EEXIST (indexed queue, value
 * already queued), -ENOMEM. */
PA_API int pa_pq_push(pa_pq_t *pq, uint64_t value, double priority, double confidence, double deadline);

/* Pushes n items: values[i] with priorities[i], confidences[i], deadlines[i] (NaN or +inf:
 * none). Every key is checked first: -EINVAL pushes nothing. Then the items are pushed
 * (equal keys come out in input order: arrival numbers follow the input) until one fails
 * (-EEXIST on an indexed queue, -ENOMEM); *pushed (nullable) receives how many were pushed
 * — the first *pushed items are queued, and withdrawing them is the caller's choice. Each
 * item is a separate push; the batch shares the per-operation costs (reclamation epoch,
 * arrival numbers). On an unindexed queue the items are linked in key order, a group at a
 * time (up to 65 536 items, sorted first; a group that cannot be allocated pushes none of
 * itself), each insert searching from the one before it. */
PA_API int pa_pq_push_many(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                           const double *confidences, const double *deadlines, size_t *pushed);

/* Indexed queues: pushes n items all or none. Every key is checked first (-EINVAL pushes
 * nothing; *failed, nullable, receives the first bad item's index). Then the items are
 * pushed; when one cannot be — -EEXIST: its value is queued already, or appears twice in
 * the input; -ENOMEM — every item this call queued is withdrawn again before it returns,
 * and *failed receives the index of the item that failed. An item that a pop (or a
 * cancel) took before the withdrawal stays taken: *kept (nullable) receives how many did
 * (0 when the call succeeds, and whenever no other thread pops or cancels meanwhile).
 * Each item is a separate push and each withdrawal a separate cancel, all overlapping the
 * call; equal keys come out in input order. Unlike pa_pq_push_many on an indexed queue,
 * the items are linked in key order with finger searches, as an unindexed batch is (what
 * the prefix contract does not allow: see pq.c). -ENOTSUP on an unindexed queue (no
 * withdrawal without the index: use pa_pq_push_many). */
PA_API int pa_pq_push_all(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                          const double *confidences, const double *deadlines, size_t *failed, size_t *kept);

/* Removes the first item in the order: 1 when an item was removed (item, nullable,
 * receives its key), 0 when the queue is empty, -EINVAL (pq NULL), -ENOMEM (this thread
 * could not get its memory-reclamation record: more live threads than the static records
 * and malloc failed; the queue is unchanged, and "empty" would be a lie). Test with
 * `== 1`, not as a truth value. */
PA_API int pa_pq_pop(pa_pq_t *pq, pa_pq_item_t *item);

/* Pops up to max items into values (in order); returns how many (fewer when the queue ran
 * empty), -EINVAL (pq NULL, values NULL with max > 0, max > SSIZE_MAX) or -ENOMEM (as
 * pa_pq_pop, nothing popped). Each item is a separate pop (linearizable on its own), but
 * the batch walks the front of the queue once instead of once per item. */
PA_API ssize_t pa_pq_pop_many(pa_pq_t *pq, uint64_t *values, size_t max);
/* As pa_pq_pop_many, with each item's key. */
PA_API ssize_t pa_pq_pop_items(pa_pq_t *pq, pa_pq_item_t *items, size_t max);

/* Copies the first item without removing it: 1 found, 0 empty, -EINVAL, -ENOMEM (as
 * pa_pq_pop). Under concurrent pops the item may be gone by the time the caller looks at
 * it. */
PA_API int pa_pq_peek(pa_pq_t *pq, pa_pq_item_t *item);

/* Withdraws a queued value (indexed queues). 0 done, -ENOENT not queued (never pushed,
 * already popped or cancelled), -ENOTSUP (queue not indexed). Exactly one of a racing
 * pop and cancel gets the item. */
PA_API int pa_pq_cancel(pa_pq_t *pq, uint64_t value);

/* Items queued, exact when no operation is in flight. */
PA_API size_t pa_pq_size(const pa_pq_t *pq);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_PQ_H */
