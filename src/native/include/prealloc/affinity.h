/*
 * prealloc/affinity.h — CPU affinity of processes and threads, and the core reservation
 * registry.
 *
 * Design
 * ------
 * Linux keeps an affinity mask per thread (sched_setaffinity acts on one tid), so "the
 * affinity of a process" means the mask of every thread in /proc/<pid>/task. Setting it
 * lists the tasks, sets each, and lists again until no new thread appeared, so a thread
 * created during the call is not missed. The previous mask of each thread is saved so a
 * release can put every thread back as it was; threads that have exited meanwhile are
 * skipped (ESRCH is not an error on restore).
 *
 * The registry hands out cores from an allowed set (by default the calling process's
 * affinity at creation). An exclusive reservation takes cores no other reservation holds;
 * shared reservations may overlap each other but never an exclusive one. A reservation may
 * be applied to targets (a thread or a whole process). A target runs on the mask of the
 * newest live reservation applied to it; when the last one is released it gets back the
 * masks it had before the first apply. Releases may come in any order (or by expiry):
 * each leaves every target on the cores of its newest remaining reservation. A resize
 * re-applies the new mask to the targets whose newest reservation it is.
 * A target is identified by its id and its start time (pa_task_start_time): one that has
 * exited, or whose id was reused by another task, is never touched again.
 * "Exclusive" is among holders of this registry: keeping other processes off the cores
 * needs cpusets/isolcpus, which are the operator's business.
 *
 * The saved masks live in this process: if it dies without releasing, a target that is
 * another process stays pinned. The Python CPU strategy journals such pins to disk first
 * and restores them after a crash (prealloc/journal.py, `prealloc recover`); a C host that
 * pins other processes through this registry has to do the same on its side.
 *
 * NULL: every call returning int answers -EINVAL for a NULL registry or a NULL pointer it
 * needs (a NULL `allowed`/`prefer`/out-mask that the call documents as optional is fine);
 * pa_cores_live(NULL) is 0, pa_cores_destroy(NULL) a no-op.
 *
 * fork: a registry inherited by a child of fork() answers -EOWNERDEAD to every call
 * (pa_cores_live 0), and pa_cores_destroy in the child frees its memory without touching
 * any target: the pins are the parent's, which still holds them.
 *
 * Complexity and progress: affinity calls are O(threads) syscalls. The registry is guarded
 * by one mutex (blocking); reservations are O(cores) under it. Not a hot path.
 */
#ifndef PREALLOC_AFFINITY_H
#define PREALLOC_AFFINITY_H

#include <sys/types.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_CPU_MAX 1024 /* like glibc's cpu_set_t */

typedef struct pa_cpumask {
    uint64_t bits[PA_CPU_MAX / 64];
} pa_cpumask_t;

PA_API void pa_cpumask_zero(pa_cpumask_t *mask);
PA_API void pa_cpumask_set(pa_cpumask_t *mask, unsigned cpu);   /* cpu >= PA_CPU_MAX ignored */
PA_API void pa_cpumask_clear(pa_cpumask_t *mask, unsigned cpu);
PA_API bool pa_cpumask_test(const pa_cpumask_t *mask, unsigned cpu);
PA_API unsigned pa_cpumask_count(const pa_cpumask_t *mask);
PA_API bool pa_cpumask_equal(const pa_cpumask_t *a, const pa_cpumask_t *b);
/* true when every cpu of sub is in super */
PA_API bool pa_cpumask_subset(const pa_cpumask_t *sub, const pa_cpumask_t *super);

/* The cpus the kernel reports online (/sys/devices/system/cpu/online). */
PA_API int pa_cpus_online(pa_cpumask_t *out);

/* Affinity of one thread (tid; 0 = the calling thread). -ESRCH for a dead tid. */
PA_API int pa_affinity_get(pid_t tid, pa_cpumask_t *out);
PA_API int pa_affinity_set_thread(pid_t tid, const pa_cpumask_t *mask);

/* Previous masks of the threads one set touched. */
typedef struct pa_affinity_saved {
    size_t count;
    size_t capacity;
    pid_t *tids;
    pa_cpumask_t *masks;
} pa_affinity_saved_t;

PA_API void pa_affinity_saved_init(pa_affinity_saved_t *saved);
PA_API void pa_affinity_saved_free(pa_affinity_saved_t *saved);

/* Sets the mask on every thread of process pid (0 = this process). saved (nullable)
 * receives each thread's previous mask, appended. -ESRCH (no such process), -EINVAL (mask
 * empty or holds no online cpu), -EPERM. On failure threads already changed are put back. */
PA_API int pa_affinity_set_process(pid_t pid, const pa_cpumask_t *mask, pa_affinity_saved_t *saved);

/* Puts every saved thread back to its saved mask, skipping threads that have exited, and
 * empties saved. Returns 0 or the first error other than ESRCH. */
PA_API int pa_affinity_restore(pa_affinity_saved_t *saved);

/* The task's start time in clock ticks since boot (field 22 of /proc/<tid>/stat; tid 0 =
 * the calling thread). (id, start time) names one task for its whole life: the identity
 * rule of the registry below and of prealloc/journal.py. -ESRCH when no such task. */
PA_API int pa_task_start_time(pid_t tid, uint64_t *start_ticks);

/* ---- core reservation registry ---- */

typedef struct pa_cores pa_cores_t; /* opaque: holds a mutex */
typedef uint64_t pa_core_reservation_t; /* (generation << 32) | index; 0 = none */

/* allowed: the cores this registry may hand out (NULL = the calling thread's affinity).
 * -EINVAL when allowed is empty. */
PA_API int pa_cores_create(const pa_cpumask_t *allowed, pa_cores_t **out);
/* Puts every target back to its original masks, then frees. */
PA_API void pa_cores_destroy(pa_cores_t *cores);

/* Reserves `count` cores (lowest free first, preferring cpus in prefer when given).
 * -EINVAL (count 0 or more than allowed), -EBUSY (not enough free cores now). */
PA_API int pa_cores_reserve(pa_cores_t *cores, unsigned count, bool exclusive, const pa_cpumask_t *prefer,
                            pa_core_reservation_t *out);
/* Reserves exactly the cores in mask. -EINVAL (empty, or outside the allowed set),
 * -EBUSY (a core is held in a conflicting way). */
PA_API int pa_cores_reserve_mask(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive,
                                 pa_core_reservation_t *out);

/* The cores a reservation holds. -ENOENT for a stale reservation. */
PA_API int pa_cores_get(pa_cores_t *cores, pa_core_reservation_t reservation, pa_cpumask_t *out, bool *exclusive);

/* Applies the reservation's mask to a target: one thread (whole_process false; tid 0 =
 * the calling thread) or every thread of a process (whole_process true; pid 0 = this
 * process), saving previous masks for release. On release, threads of a whole-process
 * target that were born after apply (they inherited the reserved mask) get the mask the
 * process's main thread had before apply. -ENOENT, -ESRCH, -EPERM, -EINVAL. */
PA_API int pa_cores_apply(pa_cores_t *cores, pa_core_reservation_t reservation, pid_t target, bool whole_process);

/* Grows or shrinks the reservation to new_count cores (taking lowest free cores, giving
 * back highest first) and re-applies the mask to its targets (skipping targets that have
 * exited). -EBUSY when growth is not possible (nothing changes), -EINVAL for 0 or more
 * than the allowed set, -ENOENT; when re-applying fails, the targets and the reservation
 * are put back as they were and the error is returned. */
PA_API int pa_cores_resize(pa_cores_t *cores, pa_core_reservation_t reservation, unsigned new_count);

/* Takes the reservation off its targets (each moves to its newest remaining reservation's
 * mask, or back to its original masks when none remains; targets that have exited or
 * whose id was reused are skipped) and frees the cores. -ENOENT for stale. The
 * reservation is gone even when a restore fails; the first such error (other than
 * ESRCH) is then returned. */
PA_API int pa_cores_release(pa_cores_t *cores, pa_core_reservation_t reservation);

/* Cores free for an exclusive reservation now / the allowed set. */
PA_API int pa_cores_available(pa_cores_t *cores, pa_cpumask_t *free_exclusive, pa_cpumask_t *allowed);
PA_API size_t pa_cores_live(pa_cores_t *cores);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_AFFINITY_H */
