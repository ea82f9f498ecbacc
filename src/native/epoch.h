/*
 * epoch.h (private) — epoch-based memory reclamation (EBR) for the core's lock-free
 * structures.
 *
 * A thread reads shared nodes only between pa__ebr_enter() and pa__ebr_exit() (a
 * "critical section"; sections nest). A node that has been unlinked from every path a
 * reader could follow is handed to pa__ebr_retire() from inside a critical section; its
 * free function runs once no thread can still hold a pointer to it, i.e. once every thread
 * that was inside a critical section when the node was unlinked has left it.
 *
 * The scheme is Fraser's (K. Fraser, "Practical lock-freedom", PhD thesis, Cambridge
 * 2004, section 5.2.3) as measured by Hart, McKenney, Demke Brown and Walpole ("Performance
 * of memory reclamation for lockless synchronization", JPDC 2007); the proof and the choice
 * of fences are in epoch.c.
 *
 * Costs: enter is one load of the global epoch, one store and one store-load fence; exit
 * one store; retire a push on a thread-private list. Garbage is freed in batches, three
 * epochs after it was retired; a thread that stalls inside a critical section delays every
 * free (never correctness) — the known limit of EBR.
 *
 * fork: the child starts with fresh reclamation state. An atfork child handler (installed
 * at the first registration) releases the records of the parent's other threads: they do
 * not exist in the child, and one caught inside a section would otherwise block every free
 * there forever. Their garbage moves to the orphan list, freed by the usual e + 3 rule.
 * The forking thread keeps its record. Test: tests/c/test_epoch_fork.c.
 */
#ifndef PA_EPOCH_H
#define PA_EPOCH_H

#include <stddef.h>
#include <stdint.h>

/* Embedded in every object that can be retired, so retiring never allocates. */
typedef struct pa__ebr_link {
    struct pa__ebr_link *next;
    void (*free_fn)(struct pa__ebr_link *link);
    uint64_t epoch; /* the retiring thread's epoch; free once the global epoch is 3 past it */
} pa__ebr_link_t;

typedef void (*pa__ebr_free_fn)(pa__ebr_link_t *link);

/* The calling thread's record; enter returns it so that a hot path looks up its
 * thread-local state once (in a shared object every TLS access is a call). */
typedef struct pa__ebr_thread pa__ebr_thread_t;

/* Enters a critical section and returns the thread's record, or NULL when this thread
 * cannot register (more live threads than the static records and malloc failed); then
 * the caller must not touch shared nodes and must not call pa__ebr_exit. */
pa__ebr_thread_t *pa__ebr_enter(void);
void pa__ebr_exit(pa__ebr_thread_t *self);

/* Schedules free_fn(link) for after every current reader is gone. Call inside a critical
 * section with the record enter returned, after the object was unlinked from every shared
 * path. (self NULL: from outside any section; slower, still safe.) */
void pa__ebr_retire(pa__ebr_thread_t *self, pa__ebr_link_t *link, pa__ebr_free_fn free_fn);

/* Best effort, never blocks: tries to advance the epoch a few times and frees the calling
 * thread's garbage and the orphaned garbage of exited threads that has become safe. Call
 * outside a critical section (pa_pq_destroy does). */
void pa__ebr_flush(void);

/* For tests: waits (yielding) until the epoch has advanced three times, then frees what
 * the calling thread and exited threads retired before the call. Every other thread must
 * leave its critical sections meanwhile, or this waits for it. Call outside a critical
 * section. */
void pa__ebr_barrier(void);

/* For tests: garbage retired by the calling thread and not yet freed, and the number of
 * objects sitting on the orphan list (retired by threads that have exited). */
size_t pa__ebr_pending_local(void);
size_t pa__ebr_pending_orphans(void);

#endif /* PA_EPOCH_H */
