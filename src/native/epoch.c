/*
 * epoch.c — epoch-based reclamation (Fraser 2004; Hart et al. 2007). Interface: epoch.h.
 *
 * State
 * -----
 * One global epoch counter. One record per thread, kept on a global push-only list (records
 * are never freed, only reused): its `state` word is `epoch << 1 | ACTIVE`, written only by
 * its owner and read by whoever tries to advance the epoch. A thread finds its record through
 * a thread-local pointer and registers on first use: it claims a record that an exited
 * thread left (CAS on `in_use`) or takes a new one (a static pool first, then malloc). A
 * pthread key destructor, run when the thread exits, leaves any critical section, hands the
 * thread's unfreed garbage to a global orphan list (a Treiber stack, emptied whole by an
 * exchange, so there is no ABA) and marks the record reusable.
 *
 * Each record keeps three limbo lists, indexed by epoch mod 3. retire puts an object on the
 * list of the retiring thread's announced epoch e and stamps it with e; the object is freed
 * once the global epoch is at least e + 3. The epoch goes from g to g + 1 (try_advance) only
 * when every active record announces g. Advances are attempted at section exit after every
 * EBR_ADVANCE_EVERY retires (after a failed attempt, again EBR_RETRY_AFTER retires later, so
 * that garbage does not pile up for a whole period behind a thread that was one epoch
 * behind for a moment), and in flush/barrier; frees happen at section entry when the
 * thread sees a new epoch, after a successful advance, and in flush/barrier.
 *
 * Why e + 3 is safe (C11/C++20 memory model; T = the retiring thread, whose section
 * announced e; U = the store that made X unreachable on some path, which happens before
 * T's retire — T's own store, or another thread's that T observed, e.g. through a node's
 * reference count; R = a thread that reached X along that path, i.e. whose load L of a
 * location U writes read a value older than U — for a chain of nodes cut together, L is
 * the load of the chain's entry; A_k = the advance from e + k - 1 to e + k, which loads the
 * epoch with acquire, then runs the seq_cst fence F_A, then loads each record's state with
 * acquire, then CASes the epoch):
 *   1. enter announces the epoch it loaded, runs the fence F_T, then re-loads the epoch and
 *      announces again if it moved. So T's check load after F_T read e. If A_2 had read
 *      T's record from before T's announcement, F_A2 would precede F_T in the fence order
 *      S, and T's check load (after F_T) could not have read e, which A_2's own epoch load
 *      (before F_A2) had already seen overwritten: contradiction. A_2 cannot have seen T
 *      active at e (it requires e + 1). So A_2 read T's state from T's exit or later; those
 *      stores are release, A_2's load is acquire: U (before the retire, before the exit)
 *      happens before A_2's CAS.
 *   2. A_3 reads R's state. (a) From R's exit or later: R's accesses to X happen before
 *      A_3's CAS, hence before the free (the freeing thread acquire-loads an epoch >= e + 3).
 *      (b) R active: R must announce e + 2, an epoch value only A_2's CAS wrote; R loaded it
 *      with acquire, so U happens before L, and L cannot read a value from before U.
 *      (c) From before R's announcement (or R's record not yet on the list): then F_A3
 *      precedes R's fence F_R in S; U happens before A_3's epoch load, which is sequenced
 *      before F_A3; L follows F_R; by the fence rule L reads U or later. Contradiction.
 *   So by the time any thread sees e + 3, no reader of X remains. (Free at e + 2 would be
 *   unsafe: a reader that announced e + 1 can hold X while A_2 runs.)
 *
 * Fences: the hot path has exactly one seq_cst fence, the store-load fence after the
 * announcement in enter (pa__fence_seq_cst; no acquire/release order keeps a later load
 * from passing an earlier store). try_advance carries its mirror image, which is rare
 * (once per EBR_ADVANCE_EVERY retires). Everything else is release/acquire, each commented.
 *
 * Complexity: enter/exit O(1); retire O(1); try_advance O(threads ever registered
 * concurrently). Progress: exit and retire are wait-free; enter and registration are
 * lock-free (enter announces again only when the epoch moved meanwhile, i.e. when others
 * made progress); reclamation is blocking by nature — a thread parked inside a critical
 * section holds back every free, never anyone's progress.
 *
 * Limits: free functions run in whatever thread reclaims (possibly another thread, for
 * orphans) and must not call back into EBR. A thread whose pthread_setspecific failed (no
 * memory) keeps its record and its garbage when it exits (still reachable, never freed).
 */
#define _GNU_SOURCE
#include "epoch.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "atomics.h"

/* <linux/membarrier.h> is missing from old kernel headers (manylinux2014's are 3.10) and
 * lacks the expedited commands before 4.14. The command numbers are kernel ABI, so they
 * are spelled out where the header does not give them; the runtime query below decides
 * whether the running kernel has them. */
#if defined(__has_include)
#if __has_include(<linux/membarrier.h>)
#include <linux/membarrier.h>
#endif
#endif
#ifndef MEMBARRIER_CMD_QUERY
#define MEMBARRIER_CMD_QUERY 0
#endif
#ifndef MEMBARRIER_CMD_PRIVATE_EXPEDITED
#define MEMBARRIER_CMD_PRIVATE_EXPEDITED (1 << 3)
#define MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED (1 << 4)
#endif

/* Test hooks (tests/c/test_epoch.c compiles this file with them defined): one runs in
 * enter between the first load of the epoch and the announcement. */
#ifndef EBR_ENTER_HOOK
#define EBR_ENTER_HOOK() ((void)0)
#endif

/* ---- asymmetric fences ----
 *
 * The store-load fence F_T in enter runs on every operation; F_A in try_advance runs
 * rarely. Where the kernel offers membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) (Linux
 * 4.14+), F_A becomes that system call — it makes every running thread of the process
 * execute a full barrier (and a thread not running has passed one at its context
 * switch) — and F_T shrinks to a compiler barrier: the userspace-RCU "membarrier" flavour
 * (Desnoyers et al., "User-Level Implementations of Read-Copy Update", IEEE TPDS 2012).
 * The proof above holds with F_T placed, for each reader, at the point where the
 * membarrier's barrier ran on its thread. ThreadSanitizer cannot see that pairing, so
 * TSan builds keep the symmetric fences. */
/* Written once inside ebr_once_init (pthread_once), read by every thread only after it
 * passed that pthread_once itself (ebr_init: registration, flush, barrier), which orders the
 * write before the read; relaxed atomic, so a read is never a data race either. Every reader
 * must agree: an advancer that used a plain fence while readers use compiler barriers only
 * would let a free through early. */
static _Atomic int ebr_asymmetric;

static bool ebr_register_membarrier(void) {
#if !defined(PA_UNDER_TSAN) && defined(SYS_membarrier)
    long commands = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    return commands > 0 && (commands & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
           syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
#else
    return false;
#endif
}

static inline bool asymmetric(void) { return pa__load_relaxed(&ebr_asymmetric) != 0; }

/* F_T: the readers' half. */
static inline void fence_reader(void) {
    if (asymmetric())
        atomic_signal_fence(memory_order_seq_cst); /* the compiler may not move loads up */
    else
        pa__fence_seq_cst();
}

/* F_A: the advancer's half. False when the barrier could not be issued (then the advance
 * must not happen). */
static inline bool fence_advancer(void) {
#if defined(SYS_membarrier)
    if (asymmetric())
        return syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0;
#endif
    pa__fence_seq_cst();
    return true;
}

#define EBR_ACTIVE 1u
#define EBR_STATIC_RECORDS 64    /* records available without malloc */
#define EBR_ADVANCE_EVERY 32     /* retires between two advance attempts of one thread */
#define EBR_RETRY_AFTER 4        /* retires before a failed attempt is repeated */
/* With membarrier (see "Asymmetric fences") an advance attempt costs a system call that
 * interrupts the process's running threads, so it is attempted 32x less often; the
 * garbage a thread holds grows by as much (a few thousand nodes at most). */
#define EBR_ADVANCE_EVERY_ASYMMETRIC 256
#define EBR_RETRY_AFTER_ASYMMETRIC 32
#define EBR_FLUSH_ATTEMPTS 3     /* advances a non-blocking flush tries */

typedef struct limbo {
    pa__ebr_link_t *head;
    uint64_t epoch; /* of every object on the list (meaningful while head != NULL) */
    size_t count;
} limbo_t;

struct pa__ebr_thread {
    /* First line: read by every advancer; written by the owner at enter/exit. */
    PA_CACHE_ALIGNED _Atomic uint64_t state; /* epoch << 1 | EBR_ACTIVE */
    _Atomic uint32_t in_use;
    struct pa__ebr_thread *next; /* set before the record is published, never changed after */
    /* Second line: private to the owner. */
    PA_CACHE_ALIGNED unsigned nesting;
    unsigned retires_since_advance;
    uint64_t seen_epoch; /* the global epoch at the last scan of the limbo lists */
    limbo_t limbo[3];
};
typedef struct pa__ebr_thread ebr_record_t;

static struct {
    PA_CACHE_ALIGNED _Atomic uint64_t epoch;
    PA_CACHE_ALIGNED _Atomic(ebr_record_t *) records;
    _Atomic uint32_t static_used;
    PA_CACHE_ALIGNED _Atomic(pa__ebr_link_t *) orphans;
    _Atomic size_t orphan_count;
} ebr;

static ebr_record_t ebr_static_records[EBR_STATIC_RECORDS];

static pthread_once_t ebr_once = PTHREAD_ONCE_INIT;
static pthread_key_t ebr_key;
static bool ebr_key_ok;
static _Thread_local ebr_record_t *tls_record;

/* ---- freeing ---- */

static size_t free_chain(pa__ebr_link_t *link) {
    size_t n = 0;
    while (link) {
        pa__ebr_link_t *next = link->next; /* read before free_fn frees the object */
        link->free_fn(link);
        link = next;
        n++;
    }
    return n;
}

/* g was loaded with acquire from the global epoch (or returned by a successful CAS on it). */
static void reclaim_local(ebr_record_t *rec, uint64_t g) {
    for (int i = 0; i < 3; i++) {
        limbo_t *l = &rec->limbo[i];
        if (l->head && l->epoch + 3 <= g) {
            pa__ebr_link_t *chain = l->head;
            l->head = NULL;
            l->count = 0;
            free_chain(chain);
        }
    }
    rec->seen_epoch = g;
}

static void orphan_push(pa__ebr_link_t *first, pa__ebr_link_t *last, size_t n) {
    pa__ebr_link_t *head = pa__load_relaxed(&ebr.orphans);
    do {
        last->next = head;
        /* release: publishes the links' next/free_fn/epoch to orphan_reclaim's acquire
         * exchange */
    } while (!pa__cas_weak_release(&ebr.orphans, &head, first));
    if (n) pa__fetch_add_relaxed(&ebr.orphan_count, n);
}

static void orphan_reclaim(uint64_t g) {
    if (!pa__load_relaxed(&ebr.orphans)) return;
    /* acquire: pairs with orphan_push's release CAS. Taking the whole stack makes this
     * thread the only one walking these links. */
    pa__ebr_link_t *link = pa__exchange_acq_rel(&ebr.orphans, NULL);
    pa__ebr_link_t *keep_first = NULL, *keep_last = NULL;
    size_t freed = 0;
    while (link) {
        pa__ebr_link_t *next = link->next;
        if (link->epoch + 3 <= g) {
            link->free_fn(link);
            freed++;
        } else {
            link->next = keep_first;
            keep_first = link;
            if (!keep_last) keep_last = link;
        }
        link = next;
    }
    if (freed) pa__fetch_sub_relaxed(&ebr.orphan_count, freed);
    if (keep_first) orphan_push(keep_first, keep_last, 0);
}

/* ---- the epoch ---- */

/* Advances the global epoch by one if every active thread announces the current one.
 * *now receives the epoch after the attempt. True when the epoch moved (by us or by a
 * concurrent advancer). */
static bool try_advance(uint64_t *now) {
    /* acquire: pairs with the CAS of the previous advance (step 1 of the proof needs this
     * load to come before F_A) */
    uint64_t g = pa__load_acquire(&ebr.epoch);
    /* F_A: the mirror of the fence in enter. Either a thread's announcement is visible to
     * the loads below, or that thread's later loads see everything before this point. */
    if (!fence_advancer()) {
        *now = g;
        return false;
    }
    /* acquire: pairs with register's release CAS that publishes a record */
    for (ebr_record_t *r = pa__load_acquire(&ebr.records); r; r = r->next) {
        /* acquire: pairs with the owner's release stores in enter/exit/thread exit, so a
         * thread seen outside a section (or in a later one) has finished its reads */
        uint64_t s = pa__load_acquire(&r->state);
        if ((s & EBR_ACTIVE) && (s >> 1) != g) {
            *now = g;
            return false;
        }
    }
    uint64_t expected = g;
    /* acq_rel: release publishes our acquire observations above to whoever loads the new
     * epoch (the freeing thread); acquire chains the previous advance */
    if (pa__cas_strong_acq_rel(&ebr.epoch, &expected, g + 1)) {
        *now = g + 1;
    } else {
        *now = expected;
    }
    return true;
}

/* ---- thread records ---- */

static void ebr_thread_exit(void *arg) {
    ebr_record_t *rec = arg;
    rec->nesting = 0;
    /* release: pairs with try_advance's acquire load; a thread that dies inside a
     * section (a bug of the caller) must not hold the epoch forever */
    pa__store_release(&rec->state, pa__load_relaxed(&rec->state) & ~(uint64_t)EBR_ACTIVE);
    for (int i = 0; i < 3; i++) {
        limbo_t *l = &rec->limbo[i];
        if (!l->head) continue;
        pa__ebr_link_t *last = l->head;
        while (last->next) last = last->next;
        orphan_push(l->head, last, l->count);
        l->head = NULL;
        l->count = 0;
    }
    rec->retires_since_advance = 0;
    tls_record = NULL;
    /* release: pairs with the claiming CAS in ebr_register, so the next owner sees the
     * emptied limbo lists and everything this thread did */
    pa__store_release(&rec->in_use, 0);
}

/* ---- fork ----
 *
 * Contract: the child gets a fresh working state. fork() copies the records but only the
 * calling thread; a thread of the parent that was inside a critical section at the fork
 * would stay "active" in the child forever and no epoch would ever advance there again
 * (nothing freed: 2 M push+pop held 214 MiB). This handler runs in the child before fork()
 * returns, on the only thread there is, so plain accesses are safe; it does only what an
 * async-signal-safe context allows (memory writes and one system call). Every record
 * except the forking thread's is made free: its announcement is cleared and its garbage
 * goes to the orphan list, to be freed by the usual epoch rule (e + 3). The forking thread
 * keeps its record (it may even be inside a section: fork from a free function).
 * What the child does not get back: the pq node caches of the parent's other threads
 * (their thread-local storage; bounded, see pq.c) and any garbage a thread was moving
 * at the moment of the fork (a list it had detached but not yet freed). Data structures
 * that another thread was modifying at the fork are that structure's contract (pq.h). */
static void ebr_fork_child(void) {
    ebr_record_t *self = tls_record;
    for (ebr_record_t *r = pa__load_relaxed(&ebr.records); r; r = r->next) {
        if (r == self) continue;
        pa__store_relaxed(&r->state, pa__load_relaxed(&r->state) & ~(uint64_t)EBR_ACTIVE);
        r->nesting = 0;
        for (int i = 0; i < 3; i++) {
            limbo_t *l = &r->limbo[i];
            if (!l->head) continue;
            pa__ebr_link_t *last = l->head;
            while (last->next) last = last->next;
            orphan_push(l->head, last, l->count);
            l->head = NULL;
            l->count = 0;
        }
        r->retires_since_advance = 0;
        pa__store_relaxed(&r->in_use, 0);
    }
    /* The kernel drops a membarrier registration with the old address space (the child
     * gets a new mm); register again so that the advancer's barrier keeps working. If that
     * fails, fall back to symmetric fences: no thread is inside a section but (maybe) this
     * one, whose compiler-barrier announcement is ordered before its own later fences. */
    if (asymmetric() && !ebr_register_membarrier()) pa__store_relaxed(&ebr_asymmetric, 0);
}

static void ebr_once_init(void) {
    ebr_key_ok = pthread_key_create(&ebr_key, ebr_thread_exit) == 0;
    if (ebr_register_membarrier()) pa__store_relaxed(&ebr_asymmetric, 1);
    /* Failure (ENOMEM) leaves a child as before this handler existed: a thread that was in
     * a section at the fork holds back reclamation there. */
    (void)pthread_atfork(NULL, NULL, ebr_fork_child);
}

/* Every entry point that may reach a fence passes this first: ebr_asymmetric is settled
 * (and the process registered for membarrier) before anyone relies on it, and the
 * pthread_once orders its write before this thread's reads. */
static inline void ebr_init(void) { pthread_once(&ebr_once, ebr_once_init); }

static ebr_record_t *ebr_register(void) {
    ebr_init();
    ebr_record_t *rec;
    /* acquire: pairs with the release CAS below (another thread's registration) */
    for (rec = pa__load_acquire(&ebr.records); rec; rec = rec->next) {
        uint32_t free_flag = 0;
        /* acq_rel: acquire pairs with ebr_thread_exit's release store of in_use */
        if (pa__load_relaxed(&rec->in_use) == 0 && pa__cas_strong_acq_rel(&rec->in_use, &free_flag, 1))
            goto claimed;
    }
    uint32_t idx = pa__fetch_add_relaxed(&ebr.static_used, 1);
    if (idx < EBR_STATIC_RECORDS) {
        rec = &ebr_static_records[idx];
    } else {
        rec = aligned_alloc(PA_CACHE_LINE, sizeof *rec);
        if (!rec) return NULL;
        memset(rec, 0, sizeof *rec);
    }
    pa__store_relaxed(&rec->state, 0);
    pa__store_relaxed(&rec->in_use, 1);
    {
        ebr_record_t *head = pa__load_relaxed(&ebr.records);
        do {
            rec->next = head;
            /* release: publishes the record's initial fields to advancers' acquire walk */
        } while (!pa__cas_weak_release(&ebr.records, &head, rec));
    }
claimed:
    rec->nesting = 0;
    rec->retires_since_advance = 0;
    rec->seen_epoch = 0;
    if (ebr_key_ok) (void)pthread_setspecific(ebr_key, rec);
    tls_record = rec;
    return rec;
}

/* ---- the interface ---- */

pa__ebr_thread_t *pa__ebr_enter(void) {
    ebr_record_t *rec = tls_record;
    if (!rec) {
        rec = ebr_register();
        if (!rec) return NULL;
    }
    if (rec->nesting++ > 0) return rec;
    /* acquire: pairs with try_advance's CAS; needed by step 2(b) of the proof and so that
     * frees triggered by this value come after the readers the advancer saw leave */
    uint64_t g = pa__load_acquire(&ebr.epoch);
    EBR_ENTER_HOOK();
    for (;;) {
        if (g != rec->seen_epoch) reclaim_local(rec, g);
        /* release: pairs with try_advance's acquire load (the previous section's reads
         * happen before any free that this announcement lets through) */
        pa__store_release(&rec->state, g << 1 | EBR_ACTIVE);
        /* F_T: the store-load fence. Without it the loads of shared pointers that follow
         * could be satisfied before the announcement is visible, and an advancer could
         * miss us while we read a node it is about to let free. */
        fence_reader();
        uint64_t check = pa__load_acquire(&ebr.epoch);
        if (check == g) return rec;
        /* The epoch moved between our load and the fence: the announcement may be stale
         * by more than one epoch, which breaks step 1. Announce the newer one. */
        g = check;
    }
}

void pa__ebr_exit(pa__ebr_thread_t *rec) {
    if (--rec->nesting > 0) return;
    /* release: pairs with try_advance's acquire load; our reads of shared nodes happen
     * before any free an advancer enables after seeing us outside */
    pa__store_release(&rec->state, pa__load_relaxed(&rec->state) & ~(uint64_t)EBR_ACTIVE);
    const bool asym = asymmetric();
    unsigned every = asym ? EBR_ADVANCE_EVERY_ASYMMETRIC : EBR_ADVANCE_EVERY;
    if (rec->retires_since_advance >= every) {
        uint64_t g;
        if (try_advance(&g)) {
            rec->retires_since_advance = 0;
            reclaim_local(rec, g);
            orphan_reclaim(g);
        } else {
            /* a thread lags one epoch behind, typically only for the rest of its current
             * operation: try again soon rather than let garbage pile up for a whole period */
            rec->retires_since_advance =
                every - (asym ? EBR_RETRY_AFTER_ASYMMETRIC : EBR_RETRY_AFTER);
        }
    }
}

void pa__ebr_retire(pa__ebr_thread_t *rec, pa__ebr_link_t *link, pa__ebr_free_fn free_fn) {
    link->free_fn = free_fn;
    if (!rec || rec->nesting == 0) {
        /* Outside a section: open one for the retire. When even that is impossible (no
         * record, no memory), stamp the object with the epoch read after a full fence —
         * every reader that could hold it announced at most that epoch — and orphan it. */
        ebr_record_t *self = pa__ebr_enter();
        if (self) {
            pa__ebr_retire(self, link, free_fn);
            pa__ebr_exit(self);
            return;
        }
        pa__fence_seq_cst();
        link->epoch = pa__load_acquire(&ebr.epoch);
        orphan_push(link, link, 1);
        return;
    }
    uint64_t e = pa__load_relaxed(&rec->state) >> 1; /* our own announcement */
    limbo_t *l = &rec->limbo[e % 3];
    /* enter freed any older list in this slot (its epoch is <= e - 3), so the slot is
     * empty or already holds epoch e */
    link->epoch = e;
    link->next = l->head;
    l->head = link;
    l->epoch = e;
    l->count++;
    rec->retires_since_advance++;
}

void pa__ebr_flush(void) {
    ebr_init(); /* a thread that never entered a section may call this (pa_pq_destroy) */
    uint64_t g = 0;
    for (int i = 0; i < EBR_FLUSH_ATTEMPTS; i++) {
        if (!try_advance(&g)) break;
    }
    g = pa__load_acquire(&ebr.epoch); /* acquire: pairs with try_advance's CAS */
    ebr_record_t *rec = tls_record;
    if (rec && rec->nesting == 0) reclaim_local(rec, g);
    orphan_reclaim(g);
}

void pa__ebr_barrier(void) {
    ebr_init();
    uint64_t start = pa__load_acquire(&ebr.epoch); /* acquire: pairs with try_advance's CAS */
    uint64_t g = start;
    while (g < start + 3) {
        if (!try_advance(&g)) sched_yield();
    }
    ebr_record_t *rec = tls_record;
    if (rec && rec->nesting == 0) reclaim_local(rec, g);
    orphan_reclaim(g);
}

size_t pa__ebr_pending_local(void) {
    ebr_record_t *rec = tls_record;
    if (!rec) return 0;
    return rec->limbo[0].count + rec->limbo[1].count + rec->limbo[2].count;
}

size_t pa__ebr_pending_orphans(void) {
    return pa__load_relaxed(&ebr.orphan_count);
}
