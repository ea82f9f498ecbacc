/*
 * affinity.c — CPU affinity of threads and processes, and the core reservation registry.
 *
 * The design lives in prealloc/affinity.h; this comment adds what the implementation
 * decides.
 *
 * Masks. pa_cpumask_t is PA_CPU_MAX bits in 64-bit words; glibc's cpu_set_t has the same
 * size (1024 bits) but its word type is unsigned long, so we convert bit by bit (skipping
 * zero words) rather than memcpy, which would be wrong on a 32-bit big-endian ABI.
 *
 * A whole process (pa_affinity_set_process). Rounds of: list /proc/<pid>/task, sort the
 * tids, and for each tid not seen in an earlier round save its mask and set the new one.
 * The call ends after a round finds no new thread (normally the second). A thread created
 * after it was listed by a thread we had already changed inherits the new mask at clone;
 * one created by a thread not yet changed shows up in the next listing. The rounds are
 * capped (PA__SET_ROUNDS) so a process spawning threads faster than we can list them
 * cannot keep us here; past the cap the threads we have not seen keep their masks. A tid
 * that exits between listing and setting answers ESRCH and is skipped. Any other failure
 * puts back, in reverse order, every thread this call changed. Sorting makes the "seen"
 * test a binary search: O(T log T) per round for T threads, plus 2 system calls a thread.
 *
 * The registry (pa_cores_*). One pthread mutex guards everything (blocking; not a hot
 * path). Per core: the slot of its exclusive holder (0 = none) and the number of shared
 * holders. Reservations live in a growable slot array reused through a free list; an id is
 * (generation << 32) | (index + 1), and the generation is bumped when a slot is freed, so
 * a stale id answers -ENOENT instead of reaching a new reservation (the table's scheme).
 * Picking cores: lowest index first, cores in `prefer` before the rest, and for a shared
 * reservation cores nobody holds before cores already shared, so shared reservations
 * spread out before they stack. Shrinking gives back the highest cores first.
 *
 * Targets. Each apply records its target and the previous mask of every thread it
 * changed; release restores targets in the reverse order of apply (so a thread targeted
 * twice ends at the mask it had before the first). For a whole process we also keep the
 * main thread's previous mask as a fallback: on release every thread of the process is
 * first set to it (threads born after apply inherited the reserved mask and have no saved
 * mask of their own), then the saved threads get back exactly what they had. A resize
 * re-applies the new mask to every target in apply order; if one fails (other than
 * ESRCH: a target that is gone is skipped), the targets already re-applied get the old
 * mask back and the reservation keeps its old cores.
 *
 * Affinity system calls are made while holding the registry mutex, so a resize and a
 * release of the same reservation cannot interleave their masks on a target.
 */
#define _GNU_SOURCE
#include "prealloc/affinity.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PA__WORDS (PA_CPU_MAX / 64)
/* Rounds of listing /proc/<pid>/task before set_process stops chasing new threads. */
#define PA__SET_ROUNDS 64

_Static_assert(CPU_SETSIZE >= PA_CPU_MAX, "cpu_set_t must hold PA_CPU_MAX cpus");

/* ---- masks ---- */

void pa_cpumask_zero(pa_cpumask_t *mask) {
    memset(mask, 0, sizeof(*mask));
}

void pa_cpumask_set(pa_cpumask_t *mask, unsigned cpu) {
    if (cpu < PA_CPU_MAX) mask->bits[cpu / 64] |= (uint64_t)1 << (cpu % 64);
}

void pa_cpumask_clear(pa_cpumask_t *mask, unsigned cpu) {
    if (cpu < PA_CPU_MAX) mask->bits[cpu / 64] &= ~((uint64_t)1 << (cpu % 64));
}

bool pa_cpumask_test(const pa_cpumask_t *mask, unsigned cpu) {
    return cpu < PA_CPU_MAX && (mask->bits[cpu / 64] >> (cpu % 64) & 1u) != 0;
}

unsigned pa_cpumask_count(const pa_cpumask_t *mask) {
    unsigned n = 0;
    for (unsigned w = 0; w < PA__WORDS; w++) n += (unsigned)__builtin_popcountll(mask->bits[w]);
    return n;
}

bool pa_cpumask_equal(const pa_cpumask_t *a, const pa_cpumask_t *b) {
    return memcmp(a->bits, b->bits, sizeof(a->bits)) == 0;
}

bool pa_cpumask_subset(const pa_cpumask_t *sub, const pa_cpumask_t *super) {
    for (unsigned w = 0; w < PA__WORDS; w++)
        if (sub->bits[w] & ~super->bits[w]) return false;
    return true;
}

static bool pa__cpumask_intersects(const pa_cpumask_t *a, const pa_cpumask_t *b) {
    for (unsigned w = 0; w < PA__WORDS; w++)
        if (a->bits[w] & b->bits[w]) return true;
    return false;
}

static void pa__to_cpuset(const pa_cpumask_t *mask, cpu_set_t *set) {
    CPU_ZERO(set);
    for (unsigned w = 0; w < PA__WORDS; w++) {
        uint64_t bits = mask->bits[w];
        while (bits) {
            unsigned bit = (unsigned)__builtin_ctzll(bits);
            CPU_SET(w * 64 + bit, set);
            bits &= bits - 1;
        }
    }
}

static void pa__from_cpuset(const cpu_set_t *set, pa_cpumask_t *mask) {
    pa_cpumask_zero(mask);
    for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++)
        if (CPU_ISSET(cpu, set)) pa_cpumask_set(mask, cpu);
}

/* Parses a kernel cpu list ("0-3,8,10-11\n") into mask; false when malformed or empty. */
static bool pa__parse_cpu_list(const char *text, pa_cpumask_t *mask) {
    pa_cpumask_zero(mask);
    const char *p = text;
    while (*p && *p != '\n') {
        char *end;
        unsigned long first = strtoul(p, &end, 10);
        if (end == p) return false;
        unsigned long last = first;
        p = end;
        if (*p == '-') {
            p++;
            last = strtoul(p, &end, 10);
            if (end == p || last < first) return false;
            p = end;
        }
        for (unsigned long cpu = first; cpu <= last && cpu < PA_CPU_MAX; cpu++) pa_cpumask_set(mask, (unsigned)cpu);
        if (*p == ',') p++;
        else if (*p && *p != '\n') return false;
    }
    return pa_cpumask_count(mask) > 0;
}

int pa_cpus_online(pa_cpumask_t *out) {
    char buf[4096];
    FILE *f = fopen("/sys/devices/system/cpu/online", "re");
    if (f) {
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = '\0';
        if (pa__parse_cpu_list(buf, out)) return 0;
    }
    /* No sysfs (a container without /sys): assume cpus 0..n-1, which is what sysconf
     * counts on a machine without holes in its numbering. */
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 0) return -ENOSYS;
    pa_cpumask_zero(out);
    for (long cpu = 0; cpu < n && cpu < PA_CPU_MAX; cpu++) pa_cpumask_set(out, (unsigned)cpu);
    return 0;
}

/* ---- one thread ---- */

int pa_affinity_get(pid_t tid, pa_cpumask_t *out) {
    cpu_set_t set;
    if (sched_getaffinity(tid, sizeof(set), &set) != 0) return -errno;
    pa__from_cpuset(&set, out);
    return 0;
}

int pa_affinity_set_thread(pid_t tid, const pa_cpumask_t *mask) {
    if (pa_cpumask_count(mask) == 0) return -EINVAL;
    cpu_set_t set;
    pa__to_cpuset(mask, &set);
    if (sched_setaffinity(tid, sizeof(set), &set) != 0) return -errno;
    return 0;
}

/* ---- saved masks ---- */

void pa_affinity_saved_init(pa_affinity_saved_t *saved) {
    memset(saved, 0, sizeof(*saved));
}

void pa_affinity_saved_free(pa_affinity_saved_t *saved) {
    free(saved->tids);
    free(saved->masks);
    pa_affinity_saved_init(saved);
}

static int pa__saved_push(pa_affinity_saved_t *saved, pid_t tid, const pa_cpumask_t *mask) {
    if (saved->count == saved->capacity) {
        size_t capacity = saved->capacity ? saved->capacity * 2 : 8;
        /* Two reallocs: if the second fails, the first only left a larger tids array,
         * and capacity still describes both truthfully. */
        pid_t *tids = realloc(saved->tids, capacity * sizeof(*tids));
        if (!tids) return -ENOMEM;
        saved->tids = tids;
        pa_cpumask_t *masks = realloc(saved->masks, capacity * sizeof(*masks));
        if (!masks) return -ENOMEM;
        saved->masks = masks;
        saved->capacity = capacity;
    }
    saved->tids[saved->count] = tid;
    saved->masks[saved->count] = *mask;
    saved->count++;
    return 0;
}

/* Restores entries [from, count) in reverse order and truncates saved to from. Returns
 * the first error other than ESRCH (a thread that exited needs nothing back). */
static int pa__saved_unwind(pa_affinity_saved_t *saved, size_t from) {
    int first_error = 0;
    while (saved->count > from) {
        saved->count--;
        int rc = pa_affinity_set_thread(saved->tids[saved->count], &saved->masks[saved->count]);
        if (rc != 0 && rc != -ESRCH && first_error == 0) first_error = rc;
    }
    return first_error;
}

int pa_affinity_restore(pa_affinity_saved_t *saved) {
    return pa__saved_unwind(saved, 0);
}

/* ---- a whole process ---- */

typedef struct pa__tid_list {
    pid_t *tids;
    size_t count;
    size_t capacity;
} pa__tid_list_t;

static int pa__tid_list_push(pa__tid_list_t *list, pid_t tid) {
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 16;
        pid_t *tids = realloc(list->tids, capacity * sizeof(*tids));
        if (!tids) return -ENOMEM;
        list->tids = tids;
        list->capacity = capacity;
    }
    list->tids[list->count++] = tid;
    return 0;
}

static int pa__tid_compare(const void *a, const void *b) {
    pid_t x = *(const pid_t *)a, y = *(const pid_t *)b;
    return (x > y) - (x < y);
}

/* Lists the threads of pid into list (replacing its contents), sorted. -ESRCH when the
 * process does not exist. */
static int pa__list_tasks(pid_t pid, pa__tid_list_t *list) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *dir = opendir(path);
    if (!dir) return errno == ENOENT ? -ESRCH : -errno;
    list->count = 0;
    int rc = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        char *end;
        long tid = strtol(entry->d_name, &end, 10);
        if (end == entry->d_name || *end != '\0' || tid <= 0) continue; /* ".", ".." */
        rc = pa__tid_list_push(list, (pid_t)tid);
        if (rc != 0) break;
    }
    closedir(dir);
    if (rc == 0 && list->count > 1) qsort(list->tids, list->count, sizeof(*list->tids), pa__tid_compare);
    return rc;
}

/* -EINVAL unless mask holds at least one online cpu. */
static int pa__validate_mask(const pa_cpumask_t *mask) {
    if (pa_cpumask_count(mask) == 0) return -EINVAL;
    pa_cpumask_t online;
    if (pa_cpus_online(&online) == 0 && !pa__cpumask_intersects(mask, &online)) return -EINVAL;
    return 0;
}

int pa_affinity_set_process(pid_t pid, const pa_cpumask_t *mask, pa_affinity_saved_t *saved) {
    int rc = pa__validate_mask(mask);
    if (rc != 0) return rc;
    if (pid < 0) return -ESRCH;
    if (pid == 0) pid = getpid();

    pa_affinity_saved_t local;
    pa_affinity_saved_init(&local);
    pa_affinity_saved_t *record = saved ? saved : &local; /* rollback needs a record */
    const size_t base = record->count;
    pa__tid_list_t listing = {0}, seen = {0};

    for (int round = 0; round < PA__SET_ROUNDS; round++) {
        rc = pa__list_tasks(pid, &listing);
        if (rc != 0) break;
        bool found_new = false;
        for (size_t i = 0; i < listing.count && rc == 0; i++) {
            pid_t tid = listing.tids[i];
            if (seen.count && bsearch(&tid, seen.tids, seen.count, sizeof(pid_t), pa__tid_compare)) continue;
            found_new = true;
            pa_cpumask_t previous;
            int get_rc = pa_affinity_get(tid, &previous);
            if (get_rc == -ESRCH) continue; /* exited since the listing */
            if (get_rc != 0) {
                rc = get_rc;
                break;
            }
            rc = pa__saved_push(record, tid, &previous);
            if (rc != 0) break;
            int set_rc = pa_affinity_set_thread(tid, mask);
            if (set_rc != 0) {
                record->count--; /* not changed: nothing to put back */
                if (set_rc != -ESRCH) rc = set_rc;
            }
        }
        if (rc != 0 || !found_new) break;
        for (size_t i = 0; i < listing.count && rc == 0; i++) rc = pa__tid_list_push(&seen, listing.tids[i]);
        if (rc != 0) break;
        if (seen.count > 1) qsort(seen.tids, seen.count, sizeof(*seen.tids), pa__tid_compare);
    }
    /* Every thread gone before we could set it: the process exited during the call —
     * as much "no such process" as a missing pid. (A zombie is not caught here: the
     * kernel still accepts its mask, and a process whose main thread alone has exited
     * shows the same state while it lives on.) */
    if (rc == 0 && record->count == base) rc = -ESRCH;

    if (rc != 0) (void)pa__saved_unwind(record, base);
    pa_affinity_saved_free(&local);
    free(listing.tids);
    free(seen.tids);
    return rc;
}

/* ---- the core reservation registry ---- */

typedef struct pa__target {
    pid_t id;           /* the tid, or the pid when whole_process */
    bool whole_process;
    pa_cpumask_t fallback; /* whole process: the main thread's mask before apply */
    pa_affinity_saved_t saved;
} pa__target_t;

typedef struct pa__reservation {
    uint32_t generation; /* never 0; bumped when the slot is freed */
    bool live;
    bool exclusive;
    uint32_t next_free; /* free list link: index + 1 of the next free slot, 0 = end */
    pa_cpumask_t mask;
    pa__target_t *targets; /* in apply order */
    size_t target_count;
    size_t target_capacity;
} pa__reservation_t;

struct pa_cores {
    pthread_mutex_t lock;
    pa_cpumask_t allowed;
    uint32_t exclusive_holder[PA_CPU_MAX]; /* slot index + 1, 0 = no exclusive holder */
    uint32_t shared_count[PA_CPU_MAX];     /* shared reservations holding the core */
    pa__reservation_t *slots;
    size_t slot_count;
    size_t slot_capacity;
    uint32_t free_head; /* index + 1 of the first free slot, 0 = none */
    size_t live;
};

static inline pa_core_reservation_t pa__make_id(uint32_t generation, size_t index) {
    return ((uint64_t)generation << 32) | (uint64_t)(index + 1);
}

/* The live reservation an id names, or NULL (stale, never issued, or 0). Under lock. */
static pa__reservation_t *pa__lookup(pa_cores_t *cores, pa_core_reservation_t id) {
    uint64_t low = id & 0xffffffffu;
    if (low == 0 || low > cores->slot_count) return NULL;
    pa__reservation_t *r = &cores->slots[low - 1];
    if (!r->live || r->generation != (uint32_t)(id >> 32)) return NULL;
    return r;
}

int pa_cores_create(const pa_cpumask_t *allowed, pa_cores_t **out) {
    *out = NULL;
    pa_cpumask_t set;
    if (allowed) {
        set = *allowed;
    } else {
        int rc = pa_affinity_get(0, &set);
        if (rc != 0) return rc;
    }
    if (pa_cpumask_count(&set) == 0) return -EINVAL;
    pa_cores_t *cores = calloc(1, sizeof(*cores));
    if (!cores) return -ENOMEM;
    int rc = pthread_mutex_init(&cores->lock, NULL);
    if (rc != 0) {
        free(cores);
        return -rc;
    }
    cores->allowed = set;
    *out = cores;
    return 0;
}

/* Whether a core may join a reservation: allowed, no exclusive holder, and for an
 * exclusive reservation (or when only idle cores are wanted) no shared holder either. */
static bool pa__core_usable(const pa_cores_t *cores, unsigned cpu, bool exclusive, bool idle_only) {
    if (!pa_cpumask_test(&cores->allowed, cpu) || cores->exclusive_holder[cpu] != 0) return false;
    if (exclusive || idle_only) return cores->shared_count[cpu] == 0;
    return true;
}

/* Picks count cores not in `taken` (see "Picking cores" in the design comment) into
 * picked. -EBUSY when there are not enough. Under lock. */
static int pa__pick(const pa_cores_t *cores, unsigned count, bool exclusive, const pa_cpumask_t *prefer,
                    const pa_cpumask_t *taken, pa_cpumask_t *picked) {
    pa_cpumask_zero(picked);
    unsigned got = 0;
    for (int preferred_pass = prefer ? 1 : 0; preferred_pass >= 0; preferred_pass--) {
        for (int idle_pass = 1; idle_pass >= (exclusive ? 1 : 0); idle_pass--) {
            for (unsigned cpu = 0; cpu < PA_CPU_MAX && got < count; cpu++) {
                if (preferred_pass && !pa_cpumask_test(prefer, cpu)) continue;
                if (pa_cpumask_test(picked, cpu) || (taken && pa_cpumask_test(taken, cpu))) continue;
                if (!pa__core_usable(cores, cpu, exclusive, idle_pass)) continue;
                pa_cpumask_set(picked, cpu);
                got++;
            }
        }
    }
    return got == count ? 0 : -EBUSY;
}

static void pa__hold(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive, size_t index) {
    for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++) {
        if (!pa_cpumask_test(mask, cpu)) continue;
        if (exclusive) cores->exclusive_holder[cpu] = (uint32_t)(index + 1);
        else cores->shared_count[cpu]++;
    }
}

static void pa__unhold(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive) {
    for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++) {
        if (!pa_cpumask_test(mask, cpu)) continue;
        if (exclusive) cores->exclusive_holder[cpu] = 0;
        else cores->shared_count[cpu]--;
    }
}

/* Takes a slot (from the free list or by growing the array) and makes it live with mask.
 * Under lock. */
static int pa__new_reservation(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive,
                               pa_core_reservation_t *out) {
    size_t index;
    if (cores->free_head != 0) {
        index = cores->free_head - 1;
        cores->free_head = cores->slots[index].next_free;
    } else {
        if (cores->slot_count == UINT32_MAX - 1) return -ENOMEM; /* ids hold index + 1 in 32 bits */
        if (cores->slot_count == cores->slot_capacity) {
            size_t capacity = cores->slot_capacity ? cores->slot_capacity * 2 : 8;
            pa__reservation_t *slots = realloc(cores->slots, capacity * sizeof(*slots));
            if (!slots) return -ENOMEM;
            cores->slots = slots;
            cores->slot_capacity = capacity;
        }
        index = cores->slot_count++;
        memset(&cores->slots[index], 0, sizeof(cores->slots[index]));
        cores->slots[index].generation = 1;
    }
    pa__reservation_t *r = &cores->slots[index];
    r->live = true;
    r->exclusive = exclusive;
    r->mask = *mask;
    r->next_free = 0;
    r->targets = NULL;
    r->target_count = r->target_capacity = 0;
    pa__hold(cores, mask, exclusive, index);
    cores->live++;
    *out = pa__make_id(r->generation, index);
    return 0;
}

int pa_cores_reserve(pa_cores_t *cores, unsigned count, bool exclusive, const pa_cpumask_t *prefer,
                     pa_core_reservation_t *out) {
    *out = 0;
    pthread_mutex_lock(&cores->lock);
    int rc;
    pa_cpumask_t picked;
    if (count == 0 || count > pa_cpumask_count(&cores->allowed)) rc = -EINVAL;
    else rc = pa__pick(cores, count, exclusive, prefer, NULL, &picked);
    if (rc == 0) rc = pa__new_reservation(cores, &picked, exclusive, out);
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_reserve_mask(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive,
                          pa_core_reservation_t *out) {
    *out = 0;
    pthread_mutex_lock(&cores->lock);
    int rc = 0;
    if (pa_cpumask_count(mask) == 0 || !pa_cpumask_subset(mask, &cores->allowed)) rc = -EINVAL;
    for (unsigned cpu = 0; cpu < PA_CPU_MAX && rc == 0; cpu++)
        if (pa_cpumask_test(mask, cpu) && !pa__core_usable(cores, cpu, exclusive, false)) rc = -EBUSY;
    if (rc == 0) rc = pa__new_reservation(cores, mask, exclusive, out);
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_get(pa_cores_t *cores, pa_core_reservation_t reservation, pa_cpumask_t *out, bool *exclusive) {
    pthread_mutex_lock(&cores->lock);
    pa__reservation_t *r = pa__lookup(cores, reservation);
    if (r) {
        if (out) *out = r->mask;
        if (exclusive) *exclusive = r->exclusive;
    }
    pthread_mutex_unlock(&cores->lock);
    return r ? 0 : -ENOENT;
}

/* Sets mask on a target without saving anything (resize). ESRCH: the target is gone,
 * which is not a failure. */
static int pa__reapply(const pa__target_t *t, const pa_cpumask_t *mask) {
    int rc = t->whole_process ? pa_affinity_set_process(t->id, mask, NULL) : pa_affinity_set_thread(t->id, mask);
    return rc == -ESRCH ? 0 : rc;
}

/* Puts a target back as it was before apply; frees its record. First error other than
 * ESRCH, or 0. */
static int pa__restore_target(pa__target_t *t) {
    int first_error = 0;
    if (t->whole_process) {
        /* Threads born since apply inherited the reserved mask and have no saved mask:
         * they get the main thread's previous one; the saved threads are then set back
         * exactly. */
        int rc = pa_affinity_set_process(t->id, &t->fallback, NULL);
        if (rc != 0 && rc != -ESRCH) first_error = rc;
    }
    int rc = pa_affinity_restore(&t->saved);
    if (rc != 0 && first_error == 0) first_error = rc;
    pa_affinity_saved_free(&t->saved);
    return first_error;
}

int pa_cores_apply(pa_cores_t *cores, pa_core_reservation_t reservation, pid_t target, bool whole_process) {
    pthread_mutex_lock(&cores->lock);
    int rc = 0;
    pa__reservation_t *r = pa__lookup(cores, reservation);
    if (!r) rc = -ENOENT;
    if (rc == 0 && r->target_count == r->target_capacity) {
        size_t capacity = r->target_capacity ? r->target_capacity * 2 : 4;
        pa__target_t *targets = realloc(r->targets, capacity * sizeof(*targets));
        if (!targets) rc = -ENOMEM;
        else {
            r->targets = targets;
            r->target_capacity = capacity;
        }
    }
    if (rc == 0) {
        pa__target_t t;
        memset(&t, 0, sizeof(t));
        pa_affinity_saved_init(&t.saved);
        t.whole_process = whole_process;
        /* 0 means "the caller": resolve it now, since release may run on another thread.
         * gettid through syscall(2): the glibc wrapper is 2.30+, newer than manylinux. */
        t.id = target != 0 ? target : (whole_process ? getpid() : (pid_t)syscall(SYS_gettid));
        if (t.id < 0) rc = -ESRCH;
        if (rc == 0 && whole_process) {
            rc = pa_affinity_get(t.id, &t.fallback);
            if (rc == 0) rc = pa_affinity_set_process(t.id, &r->mask, &t.saved);
        } else if (rc == 0) {
            pa_cpumask_t previous;
            rc = pa_affinity_get(t.id, &previous);
            if (rc == 0) rc = pa__saved_push(&t.saved, t.id, &previous);
            if (rc == 0) rc = pa_affinity_set_thread(t.id, &r->mask);
        }
        if (rc == 0) r->targets[r->target_count++] = t;
        else pa_affinity_saved_free(&t.saved);
    }
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_resize(pa_cores_t *cores, pa_core_reservation_t reservation, unsigned new_count) {
    pthread_mutex_lock(&cores->lock);
    int rc = 0;
    pa__reservation_t *r = pa__lookup(cores, reservation);
    unsigned current = r ? pa_cpumask_count(&r->mask) : 0;
    if (!r) rc = -ENOENT;
    else if (new_count == 0 || new_count > pa_cpumask_count(&cores->allowed)) rc = -EINVAL;
    if (rc != 0 || new_count == current) {
        pthread_mutex_unlock(&cores->lock);
        return rc;
    }

    const size_t index = (size_t)(r - cores->slots);
    const pa_cpumask_t old_mask = r->mask;
    pa_cpumask_t new_mask = old_mask;
    if (new_count > current) {
        pa_cpumask_t added;
        rc = pa__pick(cores, new_count - current, r->exclusive, NULL, &old_mask, &added);
        if (rc == 0) {
            pa__hold(cores, &added, r->exclusive, index);
            for (unsigned w = 0; w < PA__WORDS; w++) new_mask.bits[w] |= added.bits[w];
        }
    } else {
        pa_cpumask_t removed;
        pa_cpumask_zero(&removed);
        unsigned to_remove = current - new_count;
        for (unsigned cpu = PA_CPU_MAX; cpu-- > 0 && to_remove > 0;) {
            if (!pa_cpumask_test(&new_mask, cpu)) continue;
            pa_cpumask_clear(&new_mask, cpu);
            pa_cpumask_set(&removed, cpu);
            to_remove--;
        }
        pa__unhold(cores, &removed, r->exclusive);
    }
    if (rc != 0) {
        pthread_mutex_unlock(&cores->lock);
        return rc;
    }

    size_t done = 0;
    for (; done < r->target_count; done++) {
        rc = pa__reapply(&r->targets[done], &new_mask);
        if (rc != 0) break;
    }
    if (rc != 0) {
        /* Put the reservation and the targets already re-applied back as they were. */
        for (size_t i = done; i-- > 0;) (void)pa__reapply(&r->targets[i], &old_mask);
        pa__unhold(cores, &new_mask, r->exclusive);
        pa__hold(cores, &old_mask, r->exclusive, index);
    } else {
        r->mask = new_mask;
    }
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

/* Restores the targets, frees the cores and the slot. Under lock. */
static int pa__release_locked(pa_cores_t *cores, pa__reservation_t *r) {
    int first_error = 0;
    for (size_t i = r->target_count; i-- > 0;) {
        int rc = pa__restore_target(&r->targets[i]);
        if (rc != 0 && first_error == 0) first_error = rc;
    }
    free(r->targets);
    r->targets = NULL;
    r->target_count = r->target_capacity = 0;
    pa__unhold(cores, &r->mask, r->exclusive);
    size_t index = (size_t)(r - cores->slots);
    r->live = false;
    r->generation++;
    if (r->generation == 0) r->generation = 1; /* 0 would make the id look like "none" */
    r->next_free = cores->free_head;
    cores->free_head = (uint32_t)(index + 1);
    cores->live--;
    return first_error;
}

int pa_cores_release(pa_cores_t *cores, pa_core_reservation_t reservation) {
    pthread_mutex_lock(&cores->lock);
    pa__reservation_t *r = pa__lookup(cores, reservation);
    int rc = r ? pa__release_locked(cores, r) : -ENOENT;
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

void pa_cores_destroy(pa_cores_t *cores) {
    if (!cores) return;
    pthread_mutex_lock(&cores->lock);
    for (size_t i = cores->slot_count; i-- > 0;)
        if (cores->slots[i].live) (void)pa__release_locked(cores, &cores->slots[i]);
    pthread_mutex_unlock(&cores->lock);
    pthread_mutex_destroy(&cores->lock);
    free(cores->slots);
    free(cores);
}

int pa_cores_available(pa_cores_t *cores, pa_cpumask_t *free_exclusive, pa_cpumask_t *allowed) {
    pthread_mutex_lock(&cores->lock);
    if (free_exclusive) {
        pa_cpumask_zero(free_exclusive);
        for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++)
            if (pa__core_usable(cores, cpu, true, true)) pa_cpumask_set(free_exclusive, cpu);
    }
    if (allowed) *allowed = cores->allowed;
    pthread_mutex_unlock(&cores->lock);
    return 0;
}

size_t pa_cores_live(pa_cores_t *cores) {
    pthread_mutex_lock(&cores->lock);
    size_t live = cores->live;
    pthread_mutex_unlock(&cores->lock);
    return live;
}
