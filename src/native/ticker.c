/*
 * ticker.c — the expiry ticker: a timer wheel, a thread and an eventfd bound to an
 * allocation table (contract: prealloc/wheel.h).
 *
 * Locks (always taken in this order; none is held while on_expired runs)
 * -----------------------------------------------------------------------
 *   control_lock  start/stop: one lifecycle change at a time.
 *   advance_lock  one advancer at a time (the thread or pa_ticker_advance callers); held
 *                 across the whole fire-and-publish of an advance, so published ids keep
 *                 their firing order.
 *   wheel_lock    the wheel, the thread's sleep target and stop flag; the condvar's mutex.
 *                 Schedule and cancel hold it for O(1).
 *   queue_lock    the expired queue.
 *
 * Firing
 * ------
 * An advance takes wheel_lock and queue_lock and advances the wheel; for each timer that
 * fires, the record goes to EXPIRED by CAS from expire_from_mask (pa_table_transition).
 * Only when that CAS wins (a release that won the race means the ticker does nothing) is
 * the (record, deadline) pair appended to the queue ring, past the consumers' end
 * ("published"). After both locks are released, on_expired runs for those entries in
 * batches copied out under queue_lock, then they are published and the eventfd written.
 * So on_expired never runs under the wheel or queue lock, schedule/cancel/drain are never
 * blocked by it, and a consumer never sees an id before on_expired saw it.
 *
 * The queue never drops ids and never allocates while firing: every schedule reserves a
 * ring entry first (capacity >= ids not yet drained + timers pending), and a firing timer
 * turns one pending timer into at most one entry. The ring is a power-of-two array indexed
 * by 64-bit sequence numbers head <= published <= tail, and grows by doubling.
 *
 * Wakeups, with no polling
 * ------------------------
 * The thread asks the wheel for its next wakeup and sleeps in pthread_cond_timedwait on a
 * CLOCK_MONOTONIC condvar until exactly then (or in pthread_cond_wait when nothing is
 * pending). While it sleeps, sleep_until holds that instant; a schedule whose wheel wakeup
 * is earlier signals the condvar. Both happen under wheel_lock, and the thread computes
 * its target and starts waiting without releasing it, so no earlier schedule is missed.
 * While the thread is awake sleep_until is 0 (no signals needed: it re-reads the wheel
 * before sleeping again).
 *
 * Consumers and the eventfd
 * -------------------------
 * Publishing is: under queue_lock advance `published`; unlock; write 1 to the eventfd.
 * pa_ticker_drain: under queue_lock take ids; if that leaves the queue empty, read the
 * eventfd (clearing it) before unlocking. A publish is therefore either entirely before a
 * drain's critical section (the drain takes its ids; its eventfd write may land after the
 * clear and cause one spurious wakeup that finds nothing) or its ids are published after
 * it, and its write follows the clear: whenever ids are queued the eventfd is readable or
 * about to be. Protocol for consumers: wait for readability, then drain until drain
 * returns fewer than asked; never rely on one wakeup per id.
 *
 * fork
 * ----
 * The ticker records the fork generation (fork.h) at create. The first call in a child
 * "adopts" the inherited ticker: it try-locks the four locks; if all were free, no thread
 * of the parent was inside the ticker at the fork, so its state is whole. Then it
 * re-initialises the condvar (the parent's sleeping thread is a phantom waiter on it),
 * marks the thread not running (there is none here) and puts a fresh eventfd on the same
 * descriptor number with dup3 (the inherited descriptor names the parent's eventfd, so a
 * drain here would swallow the parent's wakeups). The child then has a stopped ticker
 * with the parent's timers and queue. If a lock was held, the state may be torn: the
 * ticker is "orphaned" and every call answers -EOWNERDEAD (size_t calls 0), and destroy
 * closes the descriptor and frees the struct but leaks the wheel and ring, which a
 * half-done change may have left inconsistent. Adoption is claimed by a CAS on fork_gen,
 * so concurrent first calls in the child do it once.
 *
 * Signals: the thread starts with every signal blocked (pthread_sigmask around
 * pthread_create), so a process-directed signal is never delivered on it: a host's
 * handler (and Python's, which must run on the main thread) never runs there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "atomics.h"
#include "fork.h"
#include "prealloc/wheel.h"

#define PA__QUEUE_INITIAL 64u
#define PA__PUBLISH_BATCH 64u
/* Not ACTIVE: a claimed resource is the consumer's until it releases it (the engine's
 * rule too); a host that wants claimed records to expire says so. */
#define PA__DEFAULT_EXPIRE_FROM (PA_STATUS_BIT(PA_STATUS_PENDING) | PA_STATUS_BIT(PA_STATUS_ALLOCATED))
#define PA__ADOPTING UINT32_MAX /* fork_gen while a child adopts the ticker */
#define PA__ORPHANED (UINT32_MAX - 1) /* fork_gen of a ticker a child could not adopt */

typedef struct pa__expired {
    pa_id_t record;
    uint64_t deadline_ns;
} pa__expired_t;

struct pa_ticker {
    pa_table_t *table;
    uint32_t expire_from_mask;
    pa_expiry_fn on_expired;
    void *on_expired_ctx;
    uint64_t tick_ns;
    int event_fd;
    _Atomic uint32_t fork_gen; /* the fork generation it belongs to, or ADOPTING/ORPHANED */

    pthread_mutex_t control_lock;
    pthread_t thread; /* control_lock */
    bool running;     /* control_lock */

    pthread_mutex_t advance_lock;

    pthread_mutex_t wheel_lock;
    pthread_cond_t wake;  /* CLOCK_MONOTONIC; waits under wheel_lock */
    pa_wheel_t *wheel;    /* wheel_lock */
    uint64_t sleep_until; /* wheel_lock: the instant the sleeping thread wakes; 0 = awake */
    bool stop_requested;  /* wheel_lock */

    pthread_mutex_t queue_lock;
    pa__expired_t *ring; /* queue_lock */
    size_t ring_size;    /* power of two */
    uint64_t head;       /* next id to drain */
    uint64_t published;  /* consumers see [head, published) */
    uint64_t tail;       /* [published, tail): fired, on_expired not yet run */
};

static inline pa__expired_t *ring_at(pa_ticker_t *t, uint64_t seq) {
    return &t->ring[seq & (t->ring_size - 1)];
}

/* Grows the ring to hold at least `need` entries. queue_lock held. */
static int ring_reserve(pa_ticker_t *t, uint64_t need) {
    if (need <= t->ring_size) return 0;
    size_t size = t->ring_size;
    while (size < need) {
        if (size > SIZE_MAX / 2 / sizeof(pa__expired_t)) return -ENOMEM;
        size *= 2;
    }
    pa__expired_t *ring = malloc(size * sizeof(*ring));
    if (!ring) return -ENOMEM;
    for (uint64_t seq = t->head; seq != t->tail; seq++) ring[seq & (size - 1)] = *ring_at(t, seq);
    free(t->ring);
    t->ring = ring;
    t->ring_size = size;
    return 0;
}

/* Fire callback, under wheel_lock and queue_lock. */
static void on_timer_fired(void *ctx, pa_timer_id_t timer, uint64_t record, uint64_t deadline_ns) {
    (void)timer;
    pa_ticker_t *t = ctx;
    /* Loses (-EAGAIN/-ENOENT/-EINVAL) when a release, another expiry or a removal came
     * first: the record is theirs and nothing is published. */
    if (pa_table_transition(t->table, record, t->expire_from_mask, PA_STATUS_EXPIRED, NULL) != 0) return;
    /* Room is guaranteed: this timer's schedule reserved it (see the file comment). */
    pa__expired_t *entry = ring_at(t, t->tail++);
    entry->record = record;
    entry->deadline_ns = deadline_ns;
}

static void signal_eventfd(pa_ticker_t *t) {
    uint64_t one = 1;
    /* Cannot block (EFD_NONBLOCK) and cannot reach the counter's limit in practice; a
     * failed write still leaves the ids queued for the next drain. */
    ssize_t written = write(t->event_fd, &one, sizeof(one));
    (void)written;
}

/* Runs on_expired for [from, to) and publishes them. advance_lock held, no other lock. */
static void publish(pa_ticker_t *t, uint64_t from, uint64_t to) {
    while (from != to) {
        uint64_t end = to;
        if (t->on_expired) {
            pa__expired_t batch[PA__PUBLISH_BATCH];
            size_t n = to - from < PA__PUBLISH_BATCH ? (size_t)(to - from) : PA__PUBLISH_BATCH;
            /* copy under the lock: a concurrent schedule may grow (move) the ring */
            pthread_mutex_lock(&t->queue_lock);
            for (size_t i = 0; i < n; i++) batch[i] = *ring_at(t, from + i);
            pthread_mutex_unlock(&t->queue_lock);
            for (size_t i = 0; i < n; i++) t->on_expired(t->on_expired_ctx, batch[i].record, batch[i].deadline_ns);
            end = from + n;
        }
        pthread_mutex_lock(&t->queue_lock);
        t->published = end;
        pthread_mutex_unlock(&t->queue_lock);
        signal_eventfd(t);
        from = end;
    }
}

/* Advances to now_ns and publishes what expired; returns the records expired. */
static size_t advance_to(pa_ticker_t *t, uint64_t now_ns) {
    pthread_mutex_lock(&t->advance_lock);
    pthread_mutex_lock(&t->wheel_lock);
    pthread_mutex_lock(&t->queue_lock);
    uint64_t from = t->tail;
    pa_wheel_advance(t->wheel, now_ns, on_timer_fired, t);
    uint64_t to = t->tail;
    pthread_mutex_unlock(&t->queue_lock);
    pthread_mutex_unlock(&t->wheel_lock);
    publish(t, from, to);
    pthread_mutex_unlock(&t->advance_lock);
    return (size_t)(to - from);
}

static struct timespec timespec_from_ns(uint64_t ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000ull);
    ts.tv_nsec = (long)(ns % 1000000000ull);
    return ts;
}

/* The ticker's state in this process: 0 (usable), or -EOWNERDEAD (orphaned by a fork,
 * see "fork" above). Adopts an inherited ticker on first use in a child. */
static int ticker_usable(pa_ticker_t *t) {
    uint32_t now = pa__fork_generation();
    /* acquire: pairs with the release store that ends an adoption, so its writes are seen */
    uint32_t gen = pa__load_acquire(&t->fork_gen);
    for (;;) {
        if (gen == now) return 0;
        if (gen == PA__ORPHANED) return -EOWNERDEAD;
        if (gen == PA__ADOPTING) {
            pa__cpu_relax();
            gen = pa__load_acquire(&t->fork_gen);
            continue;
        }
        /* acq_rel: one adopter; the losers wait for its release store above */
        if (pa__cas_strong_acq_rel(&t->fork_gen, &gen, PA__ADOPTING)) break;
    }
    pthread_mutex_t *locks[] = {&t->control_lock, &t->advance_lock, &t->wheel_lock, &t->queue_lock};
    size_t held = 0;
    while (held < 4 && pthread_mutex_trylock(locks[held]) == 0) held++;
    int fresh = -1;
    if (held == 4) fresh = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    bool adopted = fresh >= 0 && dup3(fresh, t->event_fd, O_CLOEXEC) >= 0;
    if (fresh >= 0) close(fresh);
    if (adopted) {
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        /* over the inherited one: its waiter (the parent's thread) does not exist here */
        pthread_cond_init(&t->wake, &attr);
        pthread_condattr_destroy(&attr);
        t->running = false;
        t->sleep_until = 0;
        t->stop_requested = false;
        if (t->published != t->head) signal_eventfd(t); /* queued ids keep it readable */
    }
    while (held > 0) pthread_mutex_unlock(locks[--held]);
    /* release: publishes the adopted state to the waiting callers */
    pa__store_release(&t->fork_gen, adopted ? now : PA__ORPHANED);
    return adopted ? 0 : -EOWNERDEAD;
}

static void *ticker_main(void *arg) {
    pa_ticker_t *t = arg;
    pthread_mutex_lock(&t->wheel_lock);
    while (!t->stop_requested) {
        uint64_t wakeup;
        bool has_timer = pa_wheel_next_wakeup(t->wheel, &wakeup) == 0;
        if (has_timer) {
            uint64_t now = pa_clock_now_ns();
            if (wakeup <= now) {
                pthread_mutex_unlock(&t->wheel_lock);
                advance_to(t, now);
                pthread_mutex_lock(&t->wheel_lock);
                continue;
            }
            t->sleep_until = wakeup;
            struct timespec until = timespec_from_ns(wakeup);
            /* ETIMEDOUT or a signal: either way the loop re-reads the wheel and the clock */
            pthread_cond_timedwait(&t->wake, &t->wheel_lock, &until);
        } else {
            t->sleep_until = UINT64_MAX;
            pthread_cond_wait(&t->wake, &t->wheel_lock);
        }
        t->sleep_until = 0;
    }
    pthread_mutex_unlock(&t->wheel_lock);
    return NULL;
}

int pa_ticker_create(pa_table_t *table, const pa_ticker_options_t *options, pa_ticker_t **out) {
    if (!table || !out) return -EINVAL;
    pa_ticker_options_t opts = {0};
    if (options) opts = *options;
    if (opts.tick_ns == 0) opts.tick_ns = PA_WHEEL_DEFAULT_TICK_NS;
    if (opts.timer_capacity == 0) opts.timer_capacity = pa_table_capacity(table);
    if (opts.expire_from_mask == 0) opts.expire_from_mask = PA__DEFAULT_EXPIRE_FROM;
    if (opts.expire_from_mask >> PA_STATUS_COUNT) return -EINVAL;

    pa_ticker_t *t = calloc(1, sizeof(*t));
    if (!t) return -ENOMEM;
    t->table = table;
    t->expire_from_mask = opts.expire_from_mask;
    t->on_expired = opts.on_expired;
    t->on_expired_ctx = opts.on_expired_ctx;
    t->tick_ns = opts.tick_ns;
    t->event_fd = -1;
    pa__store_relaxed(&t->fork_gen, pa__fork_generation());

    int rc = pa_wheel_create(opts.tick_ns, pa_clock_now_ns(), opts.timer_capacity, &t->wheel);
    if (rc != 0) goto fail_wheel;
    t->ring_size = PA__QUEUE_INITIAL;
    t->ring = malloc(t->ring_size * sizeof(*t->ring));
    if (!t->ring) {
        rc = -ENOMEM;
        goto fail_ring;
    }
    t->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (t->event_fd < 0) {
        rc = -errno;
        goto fail_eventfd;
    }
    pthread_condattr_t attr;
    rc = -pthread_condattr_init(&attr);
    if (rc != 0) goto fail_cond;
    /* the deadlines are CLOCK_MONOTONIC instants; a wall-clock jump must not move them */
    rc = -pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) rc = -pthread_cond_init(&t->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) goto fail_cond;
    pthread_mutex_init(&t->control_lock, NULL);
    pthread_mutex_init(&t->advance_lock, NULL);
    pthread_mutex_init(&t->wheel_lock, NULL);
    pthread_mutex_init(&t->queue_lock, NULL);
    *out = t;
    return 0;

fail_cond:
    close(t->event_fd);
fail_eventfd:
    free(t->ring);
fail_ring:
    pa_wheel_destroy(t->wheel);
fail_wheel:
    free(t);
    return rc;
}

void pa_ticker_destroy(pa_ticker_t *t) {
    if (!t) return;
    if (ticker_usable(t) != 0) {
        /* orphaned by a fork: its locks are held by threads that do not exist here and
         * its wheel and ring may be half changed; free only what is known whole */
        close(t->event_fd);
        free(t);
        return;
    }
    pa_ticker_stop(t);
    pthread_cond_destroy(&t->wake);
    pthread_mutex_destroy(&t->control_lock);
    pthread_mutex_destroy(&t->advance_lock);
    pthread_mutex_destroy(&t->wheel_lock);
    pthread_mutex_destroy(&t->queue_lock);
    close(t->event_fd);
    free(t->ring);
    pa_wheel_destroy(t->wheel);
    free(t);
}

int pa_ticker_start(pa_ticker_t *t) {
    if (!t) return -EINVAL;
    int rc = ticker_usable(t);
    if (rc != 0) return rc;
    pthread_mutex_lock(&t->control_lock);
    if (t->running) {
        rc = -EALREADY;
    } else {
        pthread_mutex_lock(&t->wheel_lock);
        t->stop_requested = false;
        pthread_mutex_unlock(&t->wheel_lock);
        /* the thread inherits the caller's signal mask: block everything for it */
        sigset_t all, previous;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &previous);
        rc = -pthread_create(&t->thread, NULL, ticker_main, t);
        pthread_sigmask(SIG_SETMASK, &previous, NULL);
        t->running = rc == 0;
    }
    pthread_mutex_unlock(&t->control_lock);
    return rc;
}

int pa_ticker_stop(pa_ticker_t *t) {
    if (!t) return -EINVAL;
    /* orphaned: there is no thread here to stop */
    if (ticker_usable(t) != 0) return 0;
    pthread_mutex_lock(&t->control_lock);
    if (t->running) {
        pthread_mutex_lock(&t->wheel_lock);
        t->stop_requested = true;
        pthread_cond_signal(&t->wake);
        pthread_mutex_unlock(&t->wheel_lock);
        pthread_join(t->thread, NULL);
        t->running = false;
    }
    pthread_mutex_unlock(&t->control_lock);
    return 0;
}

/* Files a timer for record at deadline_ns and stores it in the record, replacing the
 * record's earlier timer if one is still pending. wheel_lock held. */
static int schedule_locked(pa_ticker_t *t, pa_id_t record, uint64_t deadline_ns, pa_timer_id_t *out) {
    pa_record_t current;
    int rc = pa_table_get(t->table, record, &current);
    if (rc != 0) return rc;
    /* Reserve the queue entry this timer may become (see the file comment). */
    pthread_mutex_lock(&t->queue_lock);
    rc = ring_reserve(t, (t->tail - t->head) + pa_wheel_pending(t->wheel) + 1);
    pthread_mutex_unlock(&t->queue_lock);
    pa_timer_id_t timer = 0;
    if (rc == 0) rc = pa_wheel_schedule(t->wheel, deadline_ns, record, &timer);
    if (rc != 0) return rc;
    /* Inside wheel_lock, so the record names its timer before the timer can fire. */
    rc = pa_table_set_expiry(t->table, record, deadline_ns, timer);
    if (rc != 0) {
        pa_wheel_cancel(t->wheel, timer);
        return rc;
    }
    /* Replace: the old deadline must not fire too. Only a timer that is still pending
     * and still carries this record is ours to cancel (the value check keeps a stale
     * handle from cancelling another record's timer). */
    uint64_t value;
    if (current.timer != 0 && pa_wheel_timer_value(t->wheel, current.timer, &value) == 0 && value == record)
        pa_wheel_cancel(t->wheel, current.timer);
    uint64_t wakeup;
    if (pa_wheel_next_wakeup(t->wheel, &wakeup) == 0 && wakeup < t->sleep_until) pthread_cond_signal(&t->wake);
    *out = timer;
    return 0;
}

int pa_ticker_schedule(pa_ticker_t *t, pa_id_t record, uint64_t deadline_ns, pa_timer_id_t *out) {
    if (!t) return -EINVAL;
    int rc = ticker_usable(t);
    if (rc != 0) return rc;
    pa_timer_id_t timer = 0;
    pthread_mutex_lock(&t->wheel_lock);
    rc = schedule_locked(t, record, deadline_ns, &timer);
    pthread_mutex_unlock(&t->wheel_lock);
    if (rc == 0 && out) *out = timer;
    return rc;
}

int pa_ticker_revert(pa_ticker_t *t, pa_id_t record, pa_status_t to) {
    if (!t) return -EINVAL;
    if (to != PA_STATUS_ALLOCATED && to != PA_STATUS_ACTIVE) return -EINVAL;
    int rc = ticker_usable(t);
    if (rc != 0) return rc;
    /* Under wheel_lock, which every firing holds: the timer either fired before this
     * (it found RELEASING and did nothing, so it is gone and is re-armed below) or fires
     * after (it finds the reverted status). */
    pthread_mutex_lock(&t->wheel_lock);
    rc = pa_table_transition(t->table, record, PA_STATUS_BIT(PA_STATUS_RELEASING), to, NULL);
    pa_record_t r;
    if (rc == 0 && pa_table_get(t->table, record, &r) == 0 && r.expires_ns != 0) {
        uint64_t value;
        bool pending = r.timer != 0 && pa_wheel_timer_value(t->wheel, r.timer, &value) == 0 && value == record;
        pa_timer_id_t timer;
        /* A failure to re-arm (-ENOSPC/-ENOMEM) is reported; the revert itself stands. */
        if (!pending) rc = schedule_locked(t, record, r.expires_ns, &timer);
    }
    pthread_mutex_unlock(&t->wheel_lock);
    return rc;
}

int pa_ticker_cancel(pa_ticker_t *t, pa_timer_id_t timer) {
    if (!t) return -EINVAL;
    int usable = ticker_usable(t);
    if (usable != 0) return usable;
    pthread_mutex_lock(&t->wheel_lock);
    int rc = pa_wheel_cancel(t->wheel, timer);
    pthread_mutex_unlock(&t->wheel_lock);
    return rc;
}

size_t pa_ticker_advance(pa_ticker_t *t, uint64_t now_ns) {
    return t && ticker_usable(t) == 0 ? advance_to(t, now_ns) : 0;
}

int pa_ticker_eventfd(const pa_ticker_t *t) {
    if (!t) return -EINVAL;
    /* adoption replaces the descriptor (same number) but never mutates the answer */
    int usable = ticker_usable((pa_ticker_t *)t);
    return usable != 0 ? usable : t->event_fd;
}

size_t pa_ticker_drain(pa_ticker_t *t, pa_id_t *out, size_t max) {
    if (!t || (!out && max > 0) || ticker_usable(t) != 0) return 0;
    pthread_mutex_lock(&t->queue_lock);
    size_t n = 0;
    while (n < max && t->head != t->published) out[n++] = ring_at(t, t->head++)->record;
    if (t->head == t->published) {
        /* Empty: clear the eventfd while still holding the lock, so a publish lands either
         * before (its ids were just taken) or after (its write follows this read). */
        uint64_t counter;
        ssize_t got = read(t->event_fd, &counter, sizeof(counter));
        (void)got; /* EAGAIN: already clear */
    }
    pthread_mutex_unlock(&t->queue_lock);
    return n;
}

size_t pa_ticker_pending(pa_ticker_t *t) {
    if (!t || ticker_usable(t) != 0) return 0;
    pthread_mutex_lock(&t->wheel_lock);
    size_t n = pa_wheel_pending(t->wheel);
    pthread_mutex_unlock(&t->wheel_lock);
    return n;
}

size_t pa_ticker_queued(pa_ticker_t *t) {
    if (!t || ticker_usable(t) != 0) return 0;
    pthread_mutex_lock(&t->queue_lock);
    size_t n = (size_t)(t->published - t->head);
    pthread_mutex_unlock(&t->queue_lock);
    return n;
}

uint64_t pa_ticker_tick_ns(const pa_ticker_t *t) { return t ? t->tick_ns : 0; }
