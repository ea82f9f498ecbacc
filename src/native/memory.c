/*
 * memory.c — memory reservation: mmap, populate, mlock, transparent huge pages, memfd.
 *
 * The design lives in prealloc/memory.h; this comment adds the decisions the header
 * leaves to the implementation.
 *
 * Layout of a reservation. `addr` is the usable start and `size` the request rounded up
 * to a page. The mapping itself is [map_base, map_base + map_size): the same range, except
 * with PA_MEM_HUGE_PAGES, where map_size is `size` rounded up to pa_huge_page_size() and the
 * start is 2 MiB aligned (we over-map by one huge page and trim head and tail, the
 * technique jemalloc and mimalloc use for aligned chunks). Populate and lock then cover
 * the whole mapping, not only `size`: a transparent huge page is all-or-nothing per 2 MiB
 * block, and locking a part of a block would split the VMA and with it the huge page.
 * So a huge-page reservation can hold up to 2 MiB - 1 page more than `size`.
 *
 * Shareable reservations are MAP_SHARED mappings of a memfd sized with ftruncate. For huge
 * pages the aligned address comes from a PROT_NONE placeholder that the memfd mapping
 * replaces with MAP_FIXED (safe: we own the placeholder). Shared memory gets huge pages
 * from shmem THP, whose policy is separate (shmem_enabled); we advise anyway and record
 * what the kernel's policy allows.
 *
 * Populate. MADV_POPULATE_WRITE (Linux >= 5.14) faults every page in writable and, unlike
 * MAP_POPULATE, reports failure, so an out-of-memory shows up as -ENOMEM here instead of a
 * later SIGBUS or OOM kill. Where the kernel answers EINVAL (older than 5.14) we write one
 * byte per page instead; populate_error then records that EINVAL (the reason the method
 * is TOUCH), and the reservation succeeds. PA_POPULATE_MAP is never chosen: MAP_POPULATE
 * cannot report failure and would fault pages in before MADV_HUGEPAGE is in place.
 * The kernel holds the process's mmap lock for reading through one madvise call, and a
 * thread that maps or unmaps anything meanwhile (malloc of a large block, a Python arena,
 * a thread stack) waits for it: a 1 GiB populate in one call (or MAP_POPULATE) stalled
 * another thread's 1 MiB mmap + munmap for the whole 320-420 ms here. So the calls go in
 * chunks of PA_POPULATE_CHUNK (2 MiB, aligned, so a huge page is never split between
 * calls) — which alone is not enough: the rwsem lets a reader (our next call) take the
 * lock ahead of a waiting writer until the writer has waited a few milliseconds (15 ms
 * measured). So every PA_POPULATE_PAUSE_EVERY (8 MiB) we also sleep 10 us, long enough
 * for the woken writer to take the lock. Measured (benchmarks/c/bench_memory.c, 1 GiB):
 * the other thread's worst stall falls to ~2-5 ms, the populate time stays within noise
 * of one call. (Faulting pages by touch takes per-VMA locks on Linux >= 6.4 and stalls
 * nobody, but costs about twice the time and cannot report an out-of-memory.)
 *
 * Lock. mlock after populating, so that a lack of memory (populate's -ENOMEM) is told
 * apart from a refused lock (RLIMIT_MEMLOCK, CAP_IPC_LOCK), which best-effort LOCK
 * tolerates. We call the mlock/munlock system calls through syscall(2): the sanitizer
 * runtimes (ASan, TSan, MSan) replace mlock() with a no-op that returns 0, which would
 * make a sanitizer build report memory as locked that is not. effective_flags only ever
 * holds flags that were requested: memory locked without POPULATE is resident but not
 * reported as POPULATE.
 *
 * Resize. Shrinking unmaps the tail (it cannot fail for lack of room), then truncates a
 * memfd (a memfd sealed with F_SEAL_SHRINK, as the broker hands out, stays long: the
 * truncate is refused and the other process's mapping stays valid). Growing in place maps the new tail right after the mapping with
 * MAP_FIXED_NOREPLACE, so the address never changes and a neighbour is never replaced
 * (-ENOMEM when one is there), then advises, locks and populates it; if that fails the
 * tail is unmapped: unchanged. We map the tail rather than mremap the whole because
 * mremap only works on a range inside one VMA, and a locked or moved reservation can span
 * several. When the neighbouring addresses are taken and may_move is set, the reservation
 * is rebuilt elsewhere in an order that keeps every failure reversible: map the new,
 * larger region (aligned for huge pages), prepare its tail, and only then move the old
 * pages over its head with mremap(MREMAP_FIXED) (page tables move, no byte is copied, the
 * lock moves with them; a kernel that cannot move a range spanning several VMAs gets a
 * copy instead). A memfd needs no move: the new mapping already shows the old contents.
 * Until the last step the old reservation is untouched, so a failure unmaps the new
 * region and returns with nothing changed.
 *
 * Complexity: O(pages) kernel work for populate, lock and resident; O(1) system calls
 * otherwise. Blocking (page faults, compaction for huge pages). Not thread-safe per
 * reservation (owned by one thread at a time); distinct reservations are independent.
 * Limits: one memfd per shareable reservation; the touch fallback cannot report an
 * out-of-memory (the kernel answers a failed write fault with SIGBUS or the OOM killer).
 */
#define _GNU_SOURCE
#include "prealloc/memory.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* a power of two; a call never splits a huge page: pa__populate_chunk() takes the larger
 * of this and the huge page size */
#define PA_POPULATE_CHUNK ((uintptr_t)2 << 20)
#define PA_POPULATE_PAUSE_EVERY ((uintptr_t)8 << 20) /* a power of two, multiple of the chunk */
#define PA_POPULATE_PAUSE_NS 10000

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older libc headers lack it */
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18 /* Linux 4.14 */
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000 /* Linux 4.17; glibc < 2.28 lacks the name */
#endif
/* memfd_create(2) through syscall(2): glibc has the wrapper only since 2.27, older than
 * the manylinux baselines a wheel may be built on. */
#if !defined(SYS_memfd_create) && defined(__x86_64__)
#define SYS_memfd_create 319
#elif !defined(SYS_memfd_create) && defined(__aarch64__)
#define SYS_memfd_create 279
#endif

/* mincore vector entries checked per call: bounds the stack buffer, not the region. */
#define PA__MINCORE_CHUNK 4096

static size_t pa__huge_size = 0;
static pthread_once_t pa__huge_once = PTHREAD_ONCE_INIT;

/* The PMD size the kernel's transparent huge pages use: 2 MiB on x86-64 and on arm64
 * with 4 KiB pages, 32 MiB with 16 KiB pages, 512 MiB with 64 KiB pages. */
static void pa__huge_size_read(void) {
    size_t size = (size_t)2 << 20;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "re");
    if (f) {
        unsigned long long value = 0;
        /* only a power of two above the page size is a page size */
        if (fscanf(f, "%llu", &value) == 1 && value > pa_page_size() && (value & (value - 1)) == 0 &&
            value <= (unsigned long long)SIZE_MAX / 4)
            size = (size_t)value;
        fclose(f);
    }
    pa__huge_size = size;
}

size_t pa_huge_page_size(void) {
    /* pthread_once orders the store in pa__huge_size_read before every return here */
    pthread_once(&pa__huge_once, pa__huge_size_read);
    return pa__huge_size;
}

static uintptr_t pa__populate_chunk(void) {
    size_t huge = pa_huge_page_size();
    return huge > PA_POPULATE_CHUNK ? (uintptr_t)huge : PA_POPULATE_CHUNK;
}

size_t pa_page_size(void) {
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 ? (size_t)page : 4096;
}

uint64_t pa_physical_memory(void) {
    long pages = sysconf(_SC_PHYS_PAGES);
    if (pages <= 0) return 0;
    return (uint64_t)pages * (uint64_t)pa_page_size();
}

void pa_memory_init_empty(pa_memory_t *mem) {
    if (!mem) return;
    memset(mem, 0, sizeof(*mem));
    mem->addr = NULL;
    mem->map_base = NULL;
    mem->fd = -1;
}

/* Rounds n up to a multiple of align (a power of two); false on overflow. */
static bool pa__round_up(size_t n, size_t align, size_t *out) {
    if (n > SIZE_MAX - (align - 1)) return false;
    *out = (n + align - 1) & ~(align - 1);
    return true;
}

static int pa__sys_mlock(void *addr, size_t len) {
    /* syscall(2), not mlock(3): see "Lock" in the design comment. */
    return syscall(SYS_mlock, addr, len) == 0 ? 0 : -errno;
}

static void pa__sys_munlock(void *addr, size_t len) {
    (void)syscall(SYS_munlock, addr, len);
}

static int pa__memfd_create(const char *name) {
#ifdef SYS_memfd_create
    /* MFD_ALLOW_SEALING: the machine broker seals a memfd it hands to a client against
     * shrinking (F_SEAL_SHRINK | F_SEAL_SEAL), so the client's mapping can never run past
     * the end of the file (a SIGBUS). A memfd made without it refuses every seal. */
    long fd = syscall(SYS_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    return fd >= 0 ? (int)fd : -errno;
#else
    (void)name;
    return -ENOSYS;
#endif
}

/* The bytes of the mapping that populate and lock cover: the whole mapping (see the
 * design comment on huge pages); equal to size without huge pages. */
static size_t pa__span(const pa_memory_t *mem) {
    return mem->map_size;
}

/* Reads a THP policy file and reports whether its selected value (the one in brackets) is
 * one of the values that mean "never". Returns 1 (never), 0 (something else), -1
 * (unreadable, or "inherit", which defers to the caller's fallback). */
static int pa__thp_policy_never(const char *path) {
    char buf[160];
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *open = strchr(buf, '[');
    const char *close = open ? strchr(open, ']') : NULL;
    if (!open || !close) return -1;
    size_t len = (size_t)(close - open - 1);
    if (len == 7 && strncmp(open + 1, "inherit", 7) == 0) return -1;
    if ((len == 5 && strncmp(open + 1, "never", 5) == 0) || (len == 4 && strncmp(open + 1, "deny", 4) == 0))
        return 1;
    return 0;
}

/* Whether the kernel's THP policy can give this kind of mapping 2 MiB pages at all.
 * The per-size file (Linux >= 6.8 for anonymous, 6.11 for shmem) wins unless it says
 * "inherit"; unknown counts as allowed, madvise having succeeded. */
static bool pa__thp_policy_allows(bool shmem) {
    char per_size[128];
    snprintf(per_size, sizeof(per_size), "/sys/kernel/mm/transparent_hugepage/hugepages-%zukB/%s",
             pa_huge_page_size() >> 10, shmem ? "shmem_enabled" : "enabled");
    const char *global = shmem ? "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
                               : "/sys/kernel/mm/transparent_hugepage/enabled";
    int never = pa__thp_policy_never(per_size);
    if (never < 0) never = pa__thp_policy_never(global);
    return never != 1;
}

/* Maps len bytes (a multiple of align) at an address aligned to align, readable and
 * writable: anonymous private memory, or the memfd fd from offset 0 when fd >= 0. For
 * align > page the range comes from an over-sized PROT_NONE placeholder that the real
 * mapping replaces, and the placeholder's unused head and tail are unmapped. */
/* A private mapping is not inherited as copy-on-write (see "fork" in memory.h):
 * MADV_WIPEONFORK gives a child an empty mapping of its own at the same address, so the
 * parent's pages stay its own and its next write does not fault; kernels before 4.14
 * get MADV_DONTFORK (the child has no mapping there). Neither fails on a private
 * anonymous mapping, so errors are ignored. */
static void pa__private_on_fork(void *addr, size_t len) {
    if (madvise(addr, len, MADV_WIPEONFORK) != 0) (void)madvise(addr, len, MADV_DONTFORK);
}

static int pa__map_aligned(size_t len, size_t align, int fd, void **out) {
    int share = fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS);
    if (align <= pa_page_size()) {
        void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, share, fd, 0);
        if (p == MAP_FAILED) return -errno;
        if (fd < 0) pa__private_on_fork(p, len);
        *out = p;
        return 0;
    }
    if (len > SIZE_MAX - align) return -ENOMEM;
    size_t over = len + align;
    void *placeholder = mmap(NULL, over, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (placeholder == MAP_FAILED) return -errno;
    uintptr_t base = (uintptr_t)placeholder;
    uintptr_t aligned = (base + align - 1) & ~(uintptr_t)(align - 1);
    void *p = mmap((void *)aligned, len, PROT_READ | PROT_WRITE, share | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        munmap(placeholder, over);
        return -err;
    }
    size_t head = aligned - base;
    size_t tail = over - head - len;
    if (head) munmap(placeholder, head);
    if (tail) munmap((void *)(aligned + len), tail);
    if (fd < 0) pa__private_on_fork(p, len);
    *out = p;
    return 0;
}

/* Faults [start, start + len) in writable. Records the method in mem; returns 0 or
 * -ENOMEM (or another -errno from the kernel) when the pages cannot be had. fresh says
 * the range holds no data yet (see the touch fallback). */
static int pa__populate(pa_memory_t *mem, void *start, size_t len, bool fresh) {
    uintptr_t at = (uintptr_t)start, end = at + len;
    while (at < end) {
        /* up to the next chunk boundary (see "Populate" above) */
        const uintptr_t chunk = pa__populate_chunk();
        uintptr_t stop = (at & ~(chunk - 1)) + chunk;
        if (stop > end) stop = end;
        if (madvise((void *)at, stop - at, MADV_POPULATE_WRITE) == 0) {
            at = stop;
            if (at < end && (at & (PA_POPULATE_PAUSE_EVERY - 1)) == 0) {
                /* let a thread waiting for the mmap lock have it (see "Populate") */
                struct timespec pause = {0, PA_POPULATE_PAUSE_NS};
                nanosleep(&pause, NULL);
            }
            continue;
        }
        int err = errno;
        if (err == EINTR) continue; /* a signal arrived: populating again is idempotent */
        if (err == EINVAL && at == (uintptr_t)start) break; /* kernel older than 5.14: touch */
        mem->populate_error = err;
        /* EFAULT: a page could not be faulted in (no memory for it, or a memfd page past
         * its size) — to the caller that is running out of memory. */
        return (err == ENOMEM || err == EFAULT) ? -ENOMEM : -err;
    }
    if (at == end) {
        mem->populate_method = PA_POPULATE_MADVISE;
        return 0;
    }
    /* Fresh memory: one write per page. A write fault gives a private, writable page (a
     * read fault would only map the shared zero page), and zero is the fresh value.
     * Existing memfd pages (a moved shareable reservation) are read instead: they are
     * already allocated, a read fault maps them, and a write could race with another
     * process writing the same shared page. */
    size_t page = pa_page_size();
    volatile unsigned char *p = (volatile unsigned char *)start;
    if (fresh) {
        for (size_t off = 0; off < len; off += page) p[off] = 0;
    } else {
        for (size_t off = 0; off < len; off += page) (void)p[off];
    }
    mem->populate_method = PA_POPULATE_TOUCH;
    mem->populate_error = EINVAL;
    return 0;
}

/* Unmaps and closes whatever *mem holds, leaving it empty. */
static void pa__undo(pa_memory_t *mem) {
    if (mem->map_base) munmap(mem->map_base, mem->map_size);
    if (mem->fd >= 0) close(mem->fd);
    pa_memory_init_empty(mem);
}

int pa_memory_reserve(pa_memory_t *mem, size_t size, unsigned flags) {
    if (!mem) return -EINVAL;
    pa_memory_init_empty(mem);
    if (size == 0 || (flags & ~PA_MEM_ALL_FLAGS) != 0) return -EINVAL;
    if (flags & PA_MEM_LOCK_REQUIRED) flags |= PA_MEM_LOCK; /* required implies asked */
    const bool huge = (flags & PA_MEM_HUGE_PAGES) != 0;
    const bool shareable = (flags & PA_MEM_SHAREABLE) != 0;

    size_t rounded, map_size;
    if (!pa__round_up(size, pa_page_size(), &rounded)) return -EINVAL;
    map_size = rounded;
    if (huge && !pa__round_up(rounded, pa_huge_page_size(), &map_size)) return -EINVAL;
    if (huge && map_size > SIZE_MAX - pa_huge_page_size()) return -EINVAL; /* the over-map */
    /* mmap takes lengths up to PTRDIFF_MAX; anything larger is a bad size, not a lack of
     * memory. */
    if (map_size > (size_t)PTRDIFF_MAX) return -EINVAL;

    mem->requested_size = size;
    mem->requested_flags = flags;

    int rc;
    if (shareable) {
        rc = pa__memfd_create("prealloc");
        if (rc < 0) {
            pa__undo(mem);
            return rc;
        }
        mem->fd = rc;
        if (ftruncate(mem->fd, (off_t)map_size) != 0) {
            rc = -errno;
            pa__undo(mem);
            return rc;
        }
    }

    void *base;
    rc = pa__map_aligned(map_size, huge ? pa_huge_page_size() : pa_page_size(), mem->fd, &base);
    if (rc != 0) {
        pa__undo(mem);
        return rc;
    }
    mem->map_base = base;
    mem->map_size = map_size;
    mem->addr = base;
    mem->size = rounded;
    if (shareable) mem->effective_flags |= PA_MEM_SHAREABLE;

    if (huge) {
        /* Before any page is touched, so the first faults can be served by huge pages. */
        if (madvise(base, map_size, MADV_HUGEPAGE) != 0) {
            mem->huge_pages_error = errno; /* EINVAL: kernel built without THP */
        } else if (!pa__thp_policy_allows(shareable)) {
            mem->huge_pages_error = EOPNOTSUPP; /* advised, but the sysfs policy is never */
        } else {
            mem->effective_flags |= PA_MEM_HUGE_PAGES;
        }
    }

    if (flags & PA_MEM_POPULATE) {
        rc = pa__populate(mem, base, pa__span(mem), true);
        if (rc != 0) {
            pa__undo(mem);
            return rc;
        }
        mem->effective_flags |= PA_MEM_POPULATE;
    }

    if (flags & PA_MEM_LOCK) {
        rc = pa__sys_mlock(base, pa__span(mem));
        if (rc != 0) {
            if (flags & PA_MEM_LOCK_REQUIRED) {
                pa__undo(mem);
                return rc;
            }
            /* mlock can fail after marking the range locked (a page it could not fault
             * in): unlock, so that what VmLck shows matches effective_flags. */
            pa__sys_munlock(base, pa__span(mem));
            mem->lock_error = -rc;
        } else {
            mem->effective_flags |= PA_MEM_LOCK;
        }
    }
    return 0;
}

/* Makes the grown part [start, start + len) what the effective flags say: advised for
 * huge pages, locked, populated. The lock comes before the populate here (unlike in
 * reserve): mlock changes the VMA's flags while its new pages are still absent, which
 * lets the kernel merge it with the locked neighbour (an anonymous VMA that already has
 * pages of its own cannot merge), and it faults the pages in writable anyway. */
static int pa__prepare_growth(pa_memory_t *mem, void *start, size_t len, bool fresh) {
    if (mem->effective_flags & PA_MEM_HUGE_PAGES) (void)madvise(start, len, MADV_HUGEPAGE);
    if (mem->effective_flags & PA_MEM_LOCK) {
        int rc = pa__sys_mlock(start, len);
        if (rc != 0) return rc;
    }
    if (mem->effective_flags & PA_MEM_POPULATE) {
        int rc = pa__populate(mem, start, len, fresh);
        if (rc != 0) return rc;
    }
    return 0;
}

/* Grows in place: maps the tail right after the mapping with MAP_FIXED_NOREPLACE, then
 * prepares it. A neighbour in the way answers -EEXIST (never replaced), so the caller can
 * tell a neighbour, which moving gets around, from a lack of memory or a refused lock,
 * which moving would not. Mapping the tail instead of mremap-ing the whole works however
 * many VMAs the reservation spans (mremap needs one; moves and locks can leave several). */
static int pa__grow_in_place(pa_memory_t *mem, size_t new_map_size) {
    const size_t delta = new_map_size - mem->map_size;
    char *want = (char *)mem->map_base + mem->map_size;
    int share = mem->fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS);
    void *tail = mmap(want, delta, PROT_READ | PROT_WRITE, share | MAP_FIXED_NOREPLACE, mem->fd,
                      mem->fd >= 0 ? (off_t)mem->map_size : 0);
    if (tail == MAP_FAILED) return -errno;
    if (tail != want) {
        /* A kernel older than 4.17 took MAP_FIXED_NOREPLACE as a mere hint. */
        munmap(tail, delta);
        return -EEXIST;
    }
    if (mem->fd < 0) pa__private_on_fork(tail, delta);
    int rc = pa__prepare_growth(mem, tail, delta, true);
    if (rc != 0) munmap(tail, delta);
    return rc;
}

/* Grows to new_map_size somewhere else: see "Resize" in the design comment. */
static int pa__grow_moving(pa_memory_t *mem, size_t new_map_size) {
    const bool huge = (mem->requested_flags & PA_MEM_HUGE_PAGES) != 0;
    const size_t old_map_size = mem->map_size;
    void *fresh;
    int rc = pa__map_aligned(new_map_size, huge ? pa_huge_page_size() : pa_page_size(), mem->fd, &fresh);
    if (rc != 0) return rc;
    char *fresh_tail = (char *)fresh + old_map_size;
    rc = pa__prepare_growth(mem, fresh_tail, new_map_size - old_map_size, true);
    if (rc == 0 && mem->fd >= 0) {
        /* The memfd mapping already shows the old contents: prepare its head too (the
         * pages exist; this maps and locks them), then drop the old mapping. */
        rc = pa__prepare_growth(mem, fresh, old_map_size, false);
        if (rc == 0) munmap(mem->map_base, old_map_size);
    } else if (rc == 0) {
        /* Move the old pages (and their lock) over the head of the new mapping: page
         * tables move, no byte is copied. Kernels before 6.17 move only a range that lies
         * in one VMA; when in-place growths left several, copy instead. */
        void *moved = mremap(mem->map_base, old_map_size, old_map_size, MREMAP_MAYMOVE | MREMAP_FIXED, fresh);
        if (moved == MAP_FAILED) {
            rc = pa__prepare_growth(mem, fresh, old_map_size, true);
            if (rc == 0) {
                memcpy(fresh, mem->map_base, old_map_size);
                munmap(mem->map_base, old_map_size);
            }
        }
    }
    if (rc != 0) {
        munmap(fresh, new_map_size);
        return rc;
    }
    mem->map_base = fresh;
    mem->addr = fresh;
    return 0;
}

int pa_memory_resize(pa_memory_t *mem, size_t new_size, bool may_move) {
    if (!mem || !mem->addr || new_size == 0) return -EINVAL;
    const bool huge = (mem->requested_flags & PA_MEM_HUGE_PAGES) != 0;
    size_t rounded, new_map_size;
    if (!pa__round_up(new_size, pa_page_size(), &rounded)) return -EINVAL;
    new_map_size = rounded;
    if (huge && !pa__round_up(rounded, pa_huge_page_size(), &new_map_size)) return -EINVAL;
    if (huge && new_map_size > SIZE_MAX - pa_huge_page_size()) return -EINVAL;
    if (new_map_size > (size_t)PTRDIFF_MAX) return -EINVAL;

    const size_t old_map_size = mem->map_size;
    const pa_memory_t before = *mem; /* a failed growth puts back what it recorded */
    if (new_map_size < old_map_size) {
        /* munmap of the tail: cannot fail for lack of room, works across VMAs, and drops
         * the tail's locks with its pages. */
        if (munmap((char *)mem->map_base + new_map_size, old_map_size - new_map_size) != 0) return -errno;
        /* Truncate after unmapping, so no mapping is ever left past the end of the file.
         * A failure only leaves the memfd longer than the mapping until it is closed. */
        if (mem->fd >= 0) (void)ftruncate(mem->fd, (off_t)new_map_size);
        mem->map_size = new_map_size;
    } else if (new_map_size > old_map_size) {
        /* A memfd grows before it is mapped further: a page past its end is a SIGBUS. */
        if (mem->fd >= 0 && ftruncate(mem->fd, (off_t)new_map_size) != 0) return -errno;
        int rc = pa__grow_in_place(mem, new_map_size);
        if (rc == -EEXIST && may_move) rc = pa__grow_moving(mem, new_map_size);
        if (rc == -EEXIST) rc = -ENOMEM; /* the header's answer for "the neighbour is taken" */
        if (rc != 0) {
            if (mem->fd >= 0) (void)ftruncate(mem->fd, (off_t)old_map_size);
            *mem = before;
            return rc;
        }
        mem->map_size = new_map_size;
    }
    mem->size = rounded;
    mem->requested_size = new_size;
    return 0;
}

int pa_memory_release(pa_memory_t *mem) {
    if (!mem) return -EINVAL;
    int rc = 0;
    /* munmap drops the locks with the pages; no munlock needed. */
    if (mem->map_base && munmap(mem->map_base, mem->map_size) != 0) rc = -errno;
    if (mem->fd >= 0 && close(mem->fd) != 0 && rc == 0) rc = -errno;
    pa_memory_init_empty(mem);
    return rc;
}

int pa_memory_resident(const pa_memory_t *mem, size_t *resident_bytes) {
    if (!mem || !resident_bytes || !mem->addr) return -EINVAL;
    const size_t page = pa_page_size();
    const size_t pages = mem->size / page;
    unsigned char vec[PA__MINCORE_CHUNK];
    size_t resident = 0;
    for (size_t first = 0; first < pages; first += PA__MINCORE_CHUNK) {
        size_t n = pages - first < PA__MINCORE_CHUNK ? pages - first : PA__MINCORE_CHUNK;
        if (mincore((char *)mem->addr + first * page, n * page, vec) != 0) return -errno;
        for (size_t i = 0; i < n; i++) resident += vec[i] & 1u;
    }
    *resident_bytes = resident * page;
    return 0;
}
