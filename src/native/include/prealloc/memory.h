/*
 * prealloc/memory.h — memory reservation: mapped, faulted in and (when permitted) locked
 * ahead of need.
 *
 * Design
 * ------
 * A reservation is one anonymous mapping (MAP_PRIVATE) or, when shareable, a MAP_SHARED
 * mapping of a memfd that another process can map through the fd. The steps, in order:
 *   1. mmap; for huge pages the mapping is aligned to PA_HUGE_PAGE_SIZE (over-map, then
 *      trim head and tail), its length rounded up to PA_HUGE_PAGE_SIZE, and advised
 *      MADV_HUGEPAGE before any page is touched, so the first faults can be served by
 *      transparent huge pages. Populate and lock then cover that whole mapping (a huge
 *      page is all-or-nothing per block), so a huge-page reservation may hold up to
 *      one huge page - 1 page more than `size`.
 *   2. populate: MADV_POPULATE_WRITE (Linux >= 5.14) faults every page in writable and
 *      reports failure (-ENOMEM instead of a later SIGBUS or OOM kill); where the kernel
 *      does not know it (EINVAL), each page is written once ("touch"), which cannot
 *      report failure.
 *   3. lock: mlock. Where RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK says no, the
 *      reservation stays unlocked and lock_error records the errno — unless the caller
 *      set PA_MEM_LOCK_REQUIRED, in which case everything is undone and the errno returned.
 * Every reservation records what was asked (requested_flags) and what the machine gave
 * (effective_flags, plus the errno behind each difference).
 *
 * Resize: shrinking unmaps the tail. Growing maps the new tail right after the region
 * with MAP_FIXED_NOREPLACE, so the address never changes and outstanding pointers stay
 * valid; when a neighbour is in the way and may_move is set, the region is rebuilt
 * elsewhere (mremap moves the pages without copying where the kernel can; a memfd is
 * simply mapped again).
 * Growth is populated and locked like the original. Release unlocks (munmap drops the
 * locks) and unmaps, and closes the memfd.
 *
 * fork: a private reservation is advised MADV_WIPEONFORK (MADV_DONTFORK before Linux
 * 4.14): a child sees the range as fresh, zero-filled, unpopulated and unlocked memory of
 * its own (releasing it there is fine), and the parent keeps its pages — without it they
 * would turn copy-on-write and the parent would fault every page again on its next
 * write. A shareable (memfd) reservation stays shared with the child: the same pages.
 *
 * NULL: every pa_memory_* call given a NULL reservation (or out pointer) answers -EINVAL;
 * pa_memory_init_empty(NULL) does nothing.
 *
 * Complexity: O(pages) for populate/lock (the kernel's work); everything else O(1)
 * syscalls. Thread safety: a pa_memory_t is owned by one thread at a time; distinct
 * reservations are independent.
 */
#ifndef PREALLOC_MEMORY_H
#define PREALLOC_MEMORY_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Requested / effective flags. */
#define PA_MEM_POPULATE (1u << 0)      /* fault every page in before returning */
#define PA_MEM_LOCK (1u << 1)          /* mlock; best effort unless LOCK_REQUIRED */
#define PA_MEM_LOCK_REQUIRED (1u << 2) /* fail instead of returning an unlocked region;
                                          implies PA_MEM_LOCK (requested_flags shows both) */
#define PA_MEM_HUGE_PAGES (1u << 3)    /* huge-page-aligned mapping advised MADV_HUGEPAGE */
#define PA_MEM_SHAREABLE (1u << 4)     /* memfd-backed MAP_SHARED mapping */
#define PA_MEM_ALL_FLAGS 0x1fu

/* The transparent huge page size of this machine: read once from
 * /sys/kernel/mm/transparent_hugepage/hpage_pmd_size (2 MiB on x86-64 and 4 KiB-page
 * arm64, 32 MiB or 512 MiB on arm64 with 16 or 64 KiB pages); 2 MiB when unreadable. */
PA_API size_t pa_huge_page_size(void);
#define PA_HUGE_PAGE_SIZE (pa_huge_page_size())

typedef enum pa_populate_method {
    PA_POPULATE_NONE = 0,     /* not populated */
    PA_POPULATE_MADVISE = 1,  /* MADV_POPULATE_WRITE */
    PA_POPULATE_MAP = 2,      /* MAP_POPULATE at mmap time */
    PA_POPULATE_TOUCH = 3     /* one write per page */
} pa_populate_method_t;

typedef struct pa_memory {
    void *addr;              /* start of the usable region; NULL when not reserved */
    size_t size;             /* usable bytes (the request rounded up to a page) */
    size_t requested_size;   /* bytes asked for */
    int fd;                  /* the memfd when shareable, else -1 */
    unsigned requested_flags;
    unsigned effective_flags; /* what holds now: POPULATE, LOCK, HUGE_PAGES, SHAREABLE */
    int populate_method;      /* pa_populate_method_t */
    int lock_error;           /* 0, or the errno that kept the region from being locked */
    int huge_pages_error;     /* 0, or why huge pages are not effective: EINVAL (the kernel
                                 refused MADV_HUGEPAGE: built without THP), EOPNOTSUPP (the
                                 THP policy in /sys/kernel/mm/transparent_hugepage — enabled,
                                 or shmem_enabled for SHAREABLE — is never/deny) */
    int populate_error;       /* 0, or the errno the populate step reported; EINVAL with
                                 populate_method TOUCH: MADV_POPULATE_WRITE is unknown to the
                                 kernel, the pages were written instead */
    /* private */
    void *map_base;           /* the mapping (== addr; map_size >= size, larger only with
                                 HUGE_PAGES, where it is size rounded up to the huge page size) */
    size_t map_size;
} pa_memory_t;

/* Reserves size bytes (> 0) with flags (PA_MEM_*). On failure *mem is left "empty"
 * (addr NULL, fd -1) and nothing stays mapped. -EINVAL (size 0, unknown flags, size
 * rounding overflows or the mapping would exceed PTRDIFF_MAX), -ENOMEM (mmap, or
 * populate found no memory), -EPERM/-EAGAIN/-ENOMEM from mlock with LOCK_REQUIRED,
 * or the errno of mmap/memfd_create/ftruncate. */
PA_API int pa_memory_reserve(pa_memory_t *mem, size_t size, unsigned flags);

/* Resizes to new_size (> 0). With may_move false the address never changes (-ENOMEM when
 * the neighbouring address space is taken). Grown pages are populated / locked as the
 * reservation's effective flags say (-EAGAIN/-ENOMEM/-EPERM when they cannot be locked).
 * On failure the reservation is unchanged. -EINVAL on an empty reservation, 0, or a size
 * whose rounding overflows. */
PA_API int pa_memory_resize(pa_memory_t *mem, size_t new_size, bool may_move);

/* Unlocks and unmaps, closes the memfd; leaves *mem empty. Releasing an empty
 * reservation is a no-op returning 0. */
PA_API int pa_memory_release(pa_memory_t *mem);

/* Bytes of the region resident in RAM now (mincore). -EINVAL on an empty reservation. */
PA_API int pa_memory_resident(const pa_memory_t *mem, size_t *resident_bytes);

/* Fills *mem as an empty reservation (addr NULL, fd -1). */
PA_API void pa_memory_init_empty(pa_memory_t *mem);

PA_API size_t pa_page_size(void);
/* Physical RAM of the machine in bytes (sysconf), 0 if unknown. */
PA_API uint64_t pa_physical_memory(void);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_MEMORY_H */
