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
 * Targets. The registry keeps one record per target (a thread, or a whole process) that
 * some live reservation is applied to: the masks it had before the first apply (every
 * thread's, plus the main thread's as the fallback for threads born later), its start
 * time, and the live reservations applied to it, oldest first. A target runs on the mask
 * of its NEWEST live reservation; releasing one that is not the newest changes nothing on
 * the target, releasing the newest moves it to the next newest's mask, and releasing the
 * last puts back the original masks (for a whole process: every thread to the fallback,
 * then the saved threads exactly). So releases in any order, expiry included, leave each
 * target where its live reservations say, never on cores a released reservation gave
 * back. A resize re-applies the new mask to the targets whose newest reservation it is;
 * if one fails (other than ESRCH: a target that is gone is skipped), those already
 * re-applied get the old mask back and the reservation keeps its old cores. A thread
 * target and a whole-process target covering the same thread are separate records (the
 * later set wins on that thread); hosts pin either threads or processes, not both.
 *
 * Identity. Before any set on a target recorded earlier, its start time (field 22 of
 * /proc/<id>/stat, the rule prealloc/journal.py also uses) is compared with the one
 * recorded at the first apply: a target that exited, or whose id the kernel has handed to
 * a new task, is never touched (pid reuse would otherwise repin an unrelated process).
 * The start time counts clock ticks (10 ms at USER_HZ 100), so where the kernel allows
 * (Linux >= 5.3, and for a thread only its process's main thread) the record also holds
 * a pidfd from the first apply, which names the task itself: once it has exited, the
 * pidfd says so whatever now holds the number. The check and the set are two system
 * calls, so a task that exits AND has its id reused between them is not caught.
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

#include "fork.h"

#define PA__WORDS (PA_CPU_MAX / 64)
/* pidfd system calls (Linux 5.1 / 5.3): the numbers are the same on every architecture */
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
/* Rounds of listing /proc/<pid>/task before set_process stops chasing new threads. */
#define PA__SET_ROUNDS 64

/* The size of cpu_set_t, not CPU_SETSIZE: musl defines CPU_SETSIZE as 128 (bytes, it
 * seems) while its cpu_set_t holds 1024 bits like glibc's. The _S macros below take the
 * size in bytes, so both libcs are read the same way. */
_Static_assert(sizeof(cpu_set_t) * 8 >= PA_CPU_MAX, "cpu_set_t must hold PA_CPU_MAX cpus");

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
    CPU_ZERO_S(sizeof(*set), set);
    for (unsigned w = 0; w < PA__WORDS; w++) {
        uint64_t bits = mask->bits[w];
        while (bits) {
            unsigned bit = (unsigned)__builtin_ctzll(bits);
            CPU_SET_S(w * 64 + bit, sizeof(*set), set);
            bits &= bits - 1;
        }
    }
}

static void pa__from_cpuset(const cpu_set_t *set, pa_cpumask_t *mask) {
    pa_cpumask_zero(mask);
    for (unsigned cpu = 0; cpu < PA_CPU_MAX; cpu++)
        if (CPU_ISSET_S(cpu, sizeof(*set), set)) pa_cpumask_set(mask, cpu);
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
    if (!out) return -EINVAL;
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
    if (!out) return -EINVAL;
    cpu_set_t set;
    if (sched_getaffinity(tid, sizeof(set), &set) != 0) return -errno;
    pa__from_cpuset(&set, out);
    return 0;
}

int pa_affinity_set_thread(pid_t tid, const pa_cpumask_t *mask) {
    if (!mask || pa_cpumask_count(mask) == 0) return -EINVAL;
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
    if (!saved) return -EINVAL;
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
    if (!mask || pa_cpumask_count(mask) == 0) return -EINVAL;
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

/* ---- task identity ---- */

int pa_task_start_time(pid_t tid, uint64_t *start_ticks) {
    if (!start_ticks || tid < 0) return -EINVAL;
    if (tid == 0) tid = (pid_t)syscall(SYS_gettid);
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)tid);
    FILE *f = fopen(path, "re");
    if (!f) return errno == ENOENT ? -ESRCH : -errno;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* the command name (field 2) may hold spaces and parentheses: fields resume after
     * the last ')'; field 3 (state) follows, starttime is field 22 */
    const char *p = strrchr(buf, ')');
    if (!p) return -EIO;
    p++;
    for (int field = 3; field < 22; field++) {
        while (*p == ' ') p++;
        while (*p && *p != ' ') p++;
        if (!*p) return -EIO;
    }
    char *end;
    unsigned long long value = strtoull(p, &end, 10);
    if (end == p) return -EIO;
    *start_ticks = (uint64_t)value;
    return 0;
}

/* ---- the core reservation registry ---- */

/* A thread or process some live reservation is applied to. */
typedef struct pa__target {
    pid_t id;              /* the tid, or the pid when whole_process */
    bool whole_process;
    uint64_t start_time;   /* of id at the first apply (pa_task_start_time); 0 = unknown */
    int pidfd;             /* pidfd_open(id) at the first apply, or -1 (kernel < 5.3, or
                              a thread that is not its process's main thread) */
    pa_cpumask_t fallback; /* whole process: the main thread's mask before the first apply */
    pa_affinity_saved_t saved; /* every thread's mask before the first apply */
    pa_core_reservation_t *applied; /* live reservations applied to it, oldest first */
    size_t applied_count;
    size_t applied_capacity;
} pa__target_t;

typedef struct pa__reservation {
    uint32_t generation; /* never 0; bumped when the slot is freed */
    bool live;
    bool exclusive;
    uint32_t next_free; /* free list link: index + 1 of the next free slot, 0 = end */
    pa_cpumask_t mask;
} pa__reservation_t;

struct pa_cores {
    pthread_mutex_t lock;
    uint32_t fork_gen; /* the fork generation it was created in (see "fork" in the header) */
    pa_cpumask_t allowed;
    uint32_t exclusive_holder[PA_CPU_MAX]; /* slot index + 1, 0 = no exclusive holder */
    uint32_t shared_count[PA_CPU_MAX];     /* shared reservations holding the core */
    pa__reservation_t *slots;
    size_t slot_count;
    size_t slot_capacity;
    uint32_t free_head; /* index + 1 of the first free slot, 0 = none */
    size_t live;
    pa__target_t *targets; /* unordered */
    size_t target_count;
    size_t target_capacity;
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

/* Whether the registry was inherited across fork (its lock may be held by a thread that
 * does not exist here, and its targets are the parent's business). */
static bool pa__inherited(const pa_cores_t *cores) {
    return cores->fork_gen != pa__fork_generation();
}

int pa_cores_create(const pa_cpumask_t *allowed, pa_cores_t **out) {
    if (!out) return -EINVAL;
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
    cores->fork_gen = pa__fork_generation();
    *out = cores;
    return 0;
}

/* Takes the registry's lock: 0, -EINVAL (NULL) or -EOWNERDEAD (inherited across fork). */
static int pa__enter(pa_cores_t *cores) {
    if (!cores) return -EINVAL;
    if (pa__inherited(cores)) return -EOWNERDEAD;
    pthread_mutex_lock(&cores->lock);
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
    pa__hold(cores, mask, exclusive, index);
    cores->live++;
    *out = pa__make_id(r->generation, index);
    return 0;
}

int pa_cores_reserve(pa_cores_t *cores, unsigned count, bool exclusive, const pa_cpumask_t *prefer,
                     pa_core_reservation_t *out) {
    if (!out) return -EINVAL;
    *out = 0;
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
    pa_cpumask_t picked;
    if (count == 0 || count > pa_cpumask_count(&cores->allowed)) rc = -EINVAL;
    else rc = pa__pick(cores, count, exclusive, prefer, NULL, &picked);
    if (rc == 0) rc = pa__new_reservation(cores, &picked, exclusive, out);
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_reserve_mask(pa_cores_t *cores, const pa_cpumask_t *mask, bool exclusive,
                          pa_core_reservation_t *out) {
    if (!out || !mask) return -EINVAL;
    *out = 0;
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
    if (pa_cpumask_count(mask) == 0 || !pa_cpumask_subset(mask, &cores->allowed)) rc = -EINVAL;
    for (unsigned cpu = 0; cpu < PA_CPU_MAX && rc == 0; cpu++)
        if (pa_cpumask_test(mask, cpu) && !pa__core_usable(cores, cpu, exclusive, false)) rc = -EBUSY;
    if (rc == 0) rc = pa__new_reservation(cores, mask, exclusive, out);
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_get(pa_cores_t *cores, pa_core_reservation_t reservation, pa_cpumask_t *out, bool *exclusive) {
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
    pa__reservation_t *r = pa__lookup(cores, reservation);
    if (r) {
        if (out) *out = r->mask;
        if (exclusive) *exclusive = r->exclusive;
    }
    pthread_mutex_unlock(&cores->lock);
    return r ? 0 : -ENOENT;
}

/* ---- targets ---- */

/* Whether the target is still the task it was at the first apply: same start time (the
 * rule prealloc/journal.py uses). A task that has exited, or whose id now names another
 * task, is not: it is never touched again. */
static bool pa__target_same(const pa__target_t *t) {
    /* A pidfd names the task itself: signal 0 answers ESRCH once it has exited, even if
     * its pid is in use again. Exact, where the start time has clock-tick granularity. */
    if (t->pidfd >= 0 && syscall(SYS_pidfd_send_signal, t->pidfd, 0, NULL, 0) != 0 && errno == ESRCH) return false;
    if (t->start_time == 0) return true; /* no /proc at apply: nothing to compare */
    uint64_t now;
    return pa_task_start_time(t->id, &now) == 0 && now == t->start_time;
}

static pa__target_t *pa__find_target(pa_cores_t *cores, pid_t id, bool whole_process) {
    for (size_t i = 0; i < cores->target_count; i++)
        if (cores->targets[i].id == id && cores->targets[i].whole_process == whole_process) return &cores->targets[i];
    return NULL;
}

static void pa__target_free(pa_cores_t *cores, pa__target_t *t) {
    if (t->pidfd >= 0) close(t->pidfd);
    pa_affinity_saved_free(&t->saved);
    free(t->applied);
    *t = cores->targets[--cores->target_count]; /* unordered: the last one fills the hole */
}

/* Sets mask on a target without saving anything. ESRCH (gone, or its id reused) is not a
 * failure. */
static int pa__set_target(const pa__target_t *t, const pa_cpumask_t *mask) {
    if (!pa__target_same(t)) return 0;
    int rc = t->whole_process ? pa_affinity_set_process(t->id, mask, NULL) : pa_affinity_set_thread(t->id, mask);
    return rc == -ESRCH ? 0 : rc;
}

/* Puts a target back as it was before its first apply. First error other than ESRCH. */
static int pa__restore_original(pa__target_t *t) {
    if (!pa__target_same(t)) return 0;
    int first_error = 0;
    if (t->whole_process) {
        /* Threads born since apply inherited a reserved mask and have no saved mask:
         * they get the main thread's previous one; the saved threads are then set back
         * exactly. */
        int rc = pa_affinity_set_process(t->id, &t->fallback, NULL);
        if (rc != 0 && rc != -ESRCH) first_error = rc;
    }
    int rc = pa_affinity_restore(&t->saved);
    if (rc != 0 && first_error == 0) first_error = rc;
    return first_error;
}

/* The mask a target should have now: its newest live reservation's. */
static const pa_cpumask_t *pa__target_mask(pa_cores_t *cores, const pa__target_t *t) {
    return &pa__lookup(cores, t->applied[t->applied_count - 1])->mask;
}

/* Removes reservation id from t's list; returns whether it was t's newest. */
static bool pa__target_drop(pa__target_t *t, pa_core_reservation_t id) {
    for (size_t i = t->applied_count; i-- > 0;) {
        if (t->applied[i] != id) continue;
        bool newest = i == t->applied_count - 1;
        memmove(&t->applied[i], &t->applied[i + 1], (t->applied_count - i - 1) * sizeof(*t->applied));
        t->applied_count--;
        return newest;
    }
    return false;
}

static int pa__target_push(pa__target_t *t, pa_core_reservation_t id) {
    (void)pa__target_drop(t, id); /* applied again: it becomes the newest */
    if (t->applied_count == t->applied_capacity) {
        size_t capacity = t->applied_capacity ? t->applied_capacity * 2 : 4;
        pa_core_reservation_t *applied = realloc(t->applied, capacity * sizeof(*applied));
        if (!applied) return -ENOMEM;
        t->applied = applied;
        t->applied_capacity = capacity;
    }
    t->applied[t->applied_count++] = id;
    return 0;
}

int pa_cores_apply(pa_cores_t *cores, pa_core_reservation_t reservation, pid_t target, bool whole_process) {
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
    pa__reservation_t *r = pa__lookup(cores, reservation);
    /* 0 means "the caller": resolve it now, since release may run on another thread.
     * gettid through syscall(2): the glibc wrapper is 2.30+, newer than manylinux. */
    pid_t id = target != 0 ? target : (whole_process ? getpid() : (pid_t)syscall(SYS_gettid));
    if (!r) rc = -ENOENT;
    else if (id < 0) rc = -ESRCH;
    pa__target_t *t = rc == 0 ? pa__find_target(cores, id, whole_process) : NULL;
    if (t && !pa__target_same(t)) {
        /* the task we knew under this id is gone: its record is stale */
        pa__target_free(cores, t);
        t = NULL;
    }
    if (rc == 0 && t) {
        /* already held by a reservation: its originals are saved; switch masks */
        rc = t->whole_process ? pa_affinity_set_process(t->id, &r->mask, NULL) : pa_affinity_set_thread(t->id, &r->mask);
        if (rc == 0) {
            rc = pa__target_push(t, reservation);
            if (rc != 0) (void)pa__set_target(t, pa__target_mask(cores, t));
        }
    } else if (rc == 0) {
        if (cores->target_count == cores->target_capacity) {
            size_t capacity = cores->target_capacity ? cores->target_capacity * 2 : 4;
            pa__target_t *targets = realloc(cores->targets, capacity * sizeof(*targets));
            if (!targets) rc = -ENOMEM;
            else {
                cores->targets = targets;
                cores->target_capacity = capacity;
            }
        }
        pa__target_t fresh;
        memset(&fresh, 0, sizeof(fresh));
        pa_affinity_saved_init(&fresh.saved);
        fresh.id = id;
        fresh.whole_process = whole_process;
        fresh.pidfd = (int)syscall(SYS_pidfd_open, id, 0);
        if (fresh.pidfd < 0) fresh.pidfd = -1;
        /* identity first, so a task that exits during the apply cannot be mistaken later */
        if (rc == 0 && pa_task_start_time(id, &fresh.start_time) == -ESRCH) rc = -ESRCH;
        if (rc == 0) rc = pa__target_push(&fresh, reservation);
        if (rc == 0 && whole_process) {
            rc = pa_affinity_get(id, &fresh.fallback);
            if (rc == 0) rc = pa_affinity_set_process(id, &r->mask, &fresh.saved);
        } else if (rc == 0) {
            pa_cpumask_t previous;
            rc = pa_affinity_get(id, &previous);
            if (rc == 0) rc = pa__saved_push(&fresh.saved, id, &previous);
            if (rc == 0) rc = pa_affinity_set_thread(id, &r->mask);
        }
        if (rc == 0) {
            cores->targets[cores->target_count++] = fresh;
        } else {
            if (fresh.pidfd >= 0) close(fresh.pidfd);
            pa_affinity_saved_free(&fresh.saved);
            free(fresh.applied);
        }
    }
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

int pa_cores_resize(pa_cores_t *cores, pa_core_reservation_t reservation, unsigned new_count) {
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
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

    /* Only targets whose newest reservation this is run on its cores now. */
    size_t done = 0;
    for (; done < cores->target_count; done++) {
        pa__target_t *t = &cores->targets[done];
        if (t->applied[t->applied_count - 1] != reservation) continue;
        rc = pa__set_target(t, &new_mask);
        if (rc != 0) break;
    }
    if (rc != 0) {
        /* Put the reservation and the targets already re-applied back as they were. */
        for (size_t i = done; i-- > 0;) {
            pa__target_t *t = &cores->targets[i];
            if (t->applied[t->applied_count - 1] == reservation) (void)pa__set_target(t, &old_mask);
        }
        pa__unhold(cores, &new_mask, r->exclusive);
        pa__hold(cores, &old_mask, r->exclusive, index);
    } else {
        r->mask = new_mask;
    }
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

/* Takes the reservation off every target (each goes to its newest remaining
 * reservation's mask, or its original when none remains), frees the cores and the slot.
 * Under lock. */
static int pa__release_locked(pa_cores_t *cores, pa__reservation_t *r) {
    const size_t index = (size_t)(r - cores->slots);
    const pa_core_reservation_t id = pa__make_id(r->generation, index);
    int first_error = 0;
    for (size_t i = cores->target_count; i-- > 0;) {
        pa__target_t *t = &cores->targets[i];
        /* not applied here, or below its newest: dropped, and the target keeps running on
         * its newest reservation's cores */
        if (!pa__target_drop(t, id)) continue;
        int rc;
        if (t->applied_count == 0) {
            rc = pa__restore_original(t);
            pa__target_free(cores, t);
        } else {
            rc = pa__set_target(t, pa__target_mask(cores, t));
        }
        if (rc != 0 && first_error == 0) first_error = rc;
    }
    pa__unhold(cores, &r->mask, r->exclusive);
    r->live = false;
    r->generation++;
    if (r->generation == 0) r->generation = 1; /* 0 would make the id look like "none" */
    r->next_free = cores->free_head;
    cores->free_head = (uint32_t)(index + 1);
    cores->live--;
    return first_error;
}

int pa_cores_release(pa_cores_t *cores, pa_core_reservation_t reservation) {
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
    pa__reservation_t *r = pa__lookup(cores, reservation);
    rc = r ? pa__release_locked(cores, r) : -ENOENT;
    pthread_mutex_unlock(&cores->lock);
    return rc;
}

void pa_cores_destroy(pa_cores_t *cores) {
    if (!cores) return;
    if (pa__inherited(cores)) {
        /* a child of fork: the targets are the parent's to restore, and the lock may be
         * held by a thread that does not exist here; free the memory only */
        for (size_t i = 0; i < cores->target_count; i++) {
            if (cores->targets[i].pidfd >= 0) close(cores->targets[i].pidfd);
            pa_affinity_saved_free(&cores->targets[i].saved);
            free(cores->targets[i].applied);
        }
        free(cores->targets);
        free(cores->slots);
        free(cores);
        return;
    }
    pthread_mutex_lock(&cores->lock);
    for (size_t i = 0; i < cores->target_count; i++) (void)pa__restore_original(&cores->targets[i]);
    while (cores->target_count) pa__target_free(cores, &cores->targets[cores->target_count - 1]);
    pthread_mutex_unlock(&cores->lock);
    pthread_mutex_destroy(&cores->lock);
    free(cores->targets);
    free(cores->slots);
    free(cores);
}

int pa_cores_available(pa_cores_t *cores, pa_cpumask_t *free_exclusive, pa_cpumask_t *allowed) {
    int rc = pa__enter(cores);
    if (rc != 0) return rc;
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
    if (pa__enter(cores) != 0) return 0;
    size_t live = cores->live;
    pthread_mutex_unlock(&cores->lock);
    return live;
}
