/*
 * prealloc/wheel.h — the hierarchical timer wheel and the expiry ticker.
 *
 * Design
 * ------
 * The wheel follows the hierarchical timing wheels of Varghese & Lauck ("Hashed and
 * Hierarchical Timing Wheels", SOSP 1987) in the geometry Linux (kernel/time/timer.c) and
 * tokio (tokio/src/runtime/time/wheel) use: PA_WHEEL_LEVELS levels of PA_WHEEL_SLOTS = 64
 * slots each; a slot of level L covers 64^L ticks, so level L spans 64^(L+1) ticks.
 *
 *   level  slot width (1 ms tick)   level span
 *     0        1 ms                   64 ms
 *     1       64 ms                   4.1 s
 *     2      4.1 s                    4.4 min
 *     3      4.4 min                  4.7 h
 *     4      4.7 h                   12.4 days
 *     5     12.4 days                  2.2 years
 *
 * A timer is filed at the level given by the highest 6-bit digit in which its deadline
 * tick differs from the wheel's current tick, in the slot that digit names. Unlike Linux
 * (which never cascades and accepts up to 1/8 lateness on far timers), timers here
 * cascade as tokio's do: when the wheel reaches a slot of level L > 0, each timer in it is
 * re-filed at a lower level, so it is finally fired from level 0 at its own tick. Each
 * timer cascades at most PA_WHEEL_LEVELS - 1 times over its life, so advance is amortized
 * O(1) per timer; empty stretches are skipped in O(levels) using a 64-bit occupancy word
 * per level (a count-trailing-zeros finds the next busy slot). Deadlines beyond the
 * wheel's span wait in an overflow list beside the top level and are re-filed when the
 * wheel enters the top-level rotation that holds the earliest of them (empty rotations
 * are skipped, so even a jump of centuries costs O(levels + timers touched)).
 *
 * Firing guarantee: a timer never fires before its deadline. Deadlines are rounded up to
 * the next tick boundary, and a timer fires on the first advance whose `now` has reached
 * that boundary; a deadline already passed when it is scheduled fires on the next advance. The ticker thread sleeps until exactly that boundary, so a timer's
 * lateness is bounded by one tick (tick_ns) plus the OS's thread wake-up latency.
 *
 * Timers live in a pool owned by the wheel; a pa_timer_id_t is (generation << 32) | index
 * like table ids, so cancelling a timer that already fired (or was cancelled) answers
 * -ENOENT instead of touching another timer. A node's generation wraps (2^32 - 1 -> 1)
 * after 2^32 - 1 reuses; reuse is spread as in the table (a node serves at most 2^16
 * reuses in a row, then waits in FIFO order behind at least 1024 other cooled nodes, or
 * every node of a smaller capacity), so in a schedule/fire loop a timer id aliases only
 * after about min(capacity, 1025) * 2^32 schedules; the pool keeps at most 1024 nodes
 * (40 KiB) beyond the pending ones for it.
 *
 * Complexity and progress
 * -----------------------
 *   pa_wheel_schedule / pa_wheel_cancel:  O(1) (intrusive doubly linked slot lists).
 *   pa_wheel_advance:                     O(levels + fired + cascaded).
 *   pa_wheel_*: single-owner, not thread safe (no atomics, no locks: the fast path).
 *   pa_ticker_*: thread safe; a mutex guards the wheel (critical sections are O(1) for
 *   schedule/cancel); the ticker's thread is the only one that advances it.
 */
#ifndef PREALLOC_WHEEL_H
#define PREALLOC_WHEEL_H

#include "common.h"
#include "table.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_WHEEL_SLOT_BITS 6
#define PA_WHEEL_SLOTS (1u << PA_WHEEL_SLOT_BITS)
#define PA_WHEEL_LEVELS 6
#define PA_WHEEL_DEFAULT_TICK_NS 1000000ull /* 1 ms */

typedef uint64_t pa_timer_id_t; /* 0 is never a valid timer id */

/* Called once for each timer that fires, in deadline order within one advance. */
typedef void (*pa_timer_fire_fn)(void *ctx, pa_timer_id_t timer, uint64_t value, uint64_t deadline_ns);

typedef struct pa_wheel pa_wheel_t; /* opaque */

/* tick_ns: the wheel's resolution (> 0). start_ns: the wheel's current time.
 * capacity: the most timers pending at once (1 .. 2^31). -EINVAL, -ENOMEM. */
PA_API int pa_wheel_create(uint64_t tick_ns, uint64_t start_ns, uint32_t capacity, pa_wheel_t **out);
PA_API void pa_wheel_destroy(pa_wheel_t *wheel);

/* Schedules `value` to fire at deadline_ns (a deadline at or before the wheel's current
 * time fires on the next advance). -ENOSPC when capacity timers are pending. */
PA_API int pa_wheel_schedule(pa_wheel_t *wheel, uint64_t deadline_ns, uint64_t value, pa_timer_id_t *out);

/* Cancels a pending timer. -ENOENT if it already fired, was cancelled, or never existed. */
PA_API int pa_wheel_cancel(pa_wheel_t *wheel, pa_timer_id_t timer);

/* The value of a pending timer. -ENOENT if it already fired, was cancelled, or never
 * existed. */
PA_API int pa_wheel_timer_value(const pa_wheel_t *wheel, pa_timer_id_t timer, uint64_t *value);

/* Advances the wheel to now_ns (a now_ns before the current time is treated as the
 * current time) and calls fire for every timer whose deadline tick has been reached.
 * fire must not call back into this wheel. Returns the number of timers fired. */
PA_API size_t pa_wheel_advance(pa_wheel_t *wheel, uint64_t now_ns, pa_timer_fire_fn fire, void *ctx);

/* The earliest instant at which an advance would fire something: the deadline tick
 * boundary of the earliest pending timer, or a cascade point before it. -ENOENT when no
 * timer is pending. Never later than the earliest pending deadline (rounded to a tick). */
PA_API int pa_wheel_next_wakeup(const pa_wheel_t *wheel, uint64_t *wakeup_ns);

PA_API size_t pa_wheel_pending(const pa_wheel_t *wheel);
PA_API uint64_t pa_wheel_now(const pa_wheel_t *wheel);
PA_API uint64_t pa_wheel_tick_ns(const pa_wheel_t *wheel);

/*
 * The expiry ticker: a wheel, a mutex, a native thread and an eventfd, bound to an
 * allocation table. Each timer's value is a record id. When a timer fires, the ticker
 * moves the record to EXPIRED by CAS from any status in expire_from_mask; only when it
 * wins does it publish the id: on_expired (if set) is called on the ticker thread, the id
 * is appended to the expired queue, and the eventfd is signalled. A Python or C consumer
 * waits on the eventfd (poll/select/epoll/asyncio) and drains the queue — no polling.
 *
 * The ticker thread sleeps (pthread_cond_timedwait on CLOCK_MONOTONIC) until the next
 * wakeup the wheel reports; a schedule earlier than that wakes it. It runs with every
 * signal blocked, so no signal handler of the host ever runs on it.
 *
 * NULL: every pa_ticker_* call given a NULL ticker answers -EINVAL (size_t calls 0;
 * destroy is a no-op), as every module of the core does.
 *
 * fork contract
 * -------------
 * A child of fork() never hangs on a ticker it inherited, and never shares its wakeups:
 *   - If no thread of the parent was inside the ticker at the fork (the usual case: its
 *     thread asleep), the child's first call adopts it: the child has a STOPPED ticker
 *     holding the parent's timers and queue as of the fork, with a fresh eventfd of its
 *     own at the same descriptor number. pa_ticker_stop answers 0 (nothing runs here),
 *     pa_ticker_destroy frees it, pa_ticker_start starts a new thread in the child.
 *   - If a thread of the parent held one of its locks at the fork (mid-advance,
 *     mid-schedule), its state may be torn: every call answers -EOWNERDEAD (size_t calls
 *     0); pa_ticker_stop answers 0 and pa_ticker_destroy frees what is safe to free and
 *     never blocks.
 * The parent's ticker is untouched by its children.
 */
typedef void (*pa_expiry_fn)(void *ctx, pa_id_t record, uint64_t deadline_ns);

typedef struct pa_ticker_options {
    uint64_t tick_ns;          /* 0 = PA_WHEEL_DEFAULT_TICK_NS */
    uint32_t timer_capacity;   /* 0 = the table's capacity */
    uint32_t expire_from_mask; /* 0 = PENDING | ALLOCATED (a claimed, ACTIVE resource is
                                  the consumer's: add ACTIVE to expire it too);
                                  bits >= PA_STATUS_COUNT: -EINVAL */
    /* nullable; runs on the advancing thread (the ticker's, or pa_ticker_advance's caller)
     * with no ticker lock held, before the id is queued; must not block long and must not
     * call pa_ticker_advance, pa_ticker_stop or pa_ticker_destroy (schedule, cancel,
     * drain and the table are fine) */
    pa_expiry_fn on_expired;
    void *on_expired_ctx;
} pa_ticker_options_t;

typedef struct pa_ticker pa_ticker_t; /* opaque */

/* The table must outlive the ticker. options may be NULL (defaults). Does not start the
 * thread: until pa_ticker_start, time moves only by pa_ticker_advance. */
PA_API int pa_ticker_create(pa_table_t *table, const pa_ticker_options_t *options, pa_ticker_t **out);
/* Stops the thread if running and frees everything; ids still queued are dropped. */
PA_API void pa_ticker_destroy(pa_ticker_t *ticker);

/* Starts the native thread. -EALREADY if running, or the pthread error. */
PA_API int pa_ticker_start(pa_ticker_t *ticker);
/* Stops and joins the thread. 0 also when it was not running. */
PA_API int pa_ticker_stop(pa_ticker_t *ticker);

/* Schedules the record's expiry and stores the timer handle and deadline in the record
 * (pa_table_set_expiry). -ENOENT if the record is stale or final, -ENOSPC, -ENOMEM (the
 * expired queue reserves room for every pending timer, so an expiry is never dropped).
 * out is nullable.
 * Scheduling a record twice REPLACES: the record's earlier timer, if still pending, is
 * cancelled, so only the latest deadline fires. */
PA_API int pa_ticker_schedule(pa_ticker_t *ticker, pa_id_t record, uint64_t deadline_ns, pa_timer_id_t *out);

/* Reverts a failed release: moves the record RELEASING -> to (ALLOCATED or ACTIVE) and,
 * when it has an expiry whose timer is no longer pending (it fired while the record was
 * RELEASING and so did nothing), re-arms it at the same deadline (already passed: it
 * fires on the next advance). Hosts revert through this call, not pa_table_transition,
 * or a deadline that passed during the release is lost. Returns what
 * pa_table_transition returns (-EAGAIN when the record is not RELEASING), -EINVAL for
 * another `to`, or the re-arm's -ENOSPC/-ENOMEM (the revert itself then stands). */
PA_API int pa_ticker_revert(pa_ticker_t *ticker, pa_id_t record, pa_status_t to);
/* -ENOENT if the timer already fired or was cancelled. */
PA_API int pa_ticker_cancel(pa_ticker_t *ticker, pa_timer_id_t timer);

/* Advances to now_ns on the calling thread (expiring as the thread would). Returns the
 * number of records this call expired. For hosts that drive time themselves and tests. */
PA_API size_t pa_ticker_advance(pa_ticker_t *ticker, uint64_t now_ns);

/* The eventfd (EFD_NONBLOCK | EFD_CLOEXEC) that becomes readable when ids are queued.
 * Owned by the ticker; do not close it. */
PA_API int pa_ticker_eventfd(const pa_ticker_t *ticker);

/* Moves up to max expired ids (oldest first) into out; returns how many. Also clears the
 * eventfd's counter when it empties the queue, so a later wait blocks until new ids.
 * Consumer protocol: after each wakeup, drain until a call returns fewer than max; a
 * wakeup may find nothing (harmless), an id is never left queued without the eventfd
 * readable. */
PA_API size_t pa_ticker_drain(pa_ticker_t *ticker, pa_id_t *out, size_t max);

PA_API size_t pa_ticker_pending(pa_ticker_t *ticker);  /* timers not yet fired */
PA_API size_t pa_ticker_queued(pa_ticker_t *ticker);   /* expired ids not yet drained */
PA_API uint64_t pa_ticker_tick_ns(const pa_ticker_t *ticker);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_WHEEL_H */
