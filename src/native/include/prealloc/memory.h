/*
 * prealloc/memory.h — memory reservation: mapped, faulted in and (when permitted) locked
 * ahead of need.
 *
 * Design
 * ------
 * A reservation is one anonymous mapping (MAP_PRIVATE) or, when shareable, a MAP_SHARED
 * mapping of a memfd that another process can map through the fd. The steps, in order:
 *   1. mmap; for huge pages the mapping is aligned to PA_HUGE_PAGE_SIZE (over-map, then
 *      trim head and tail) and advised MADV_HUGEPAGE before any page is touched, so the
 *      first faults can be served by transparent huge pages.
 *   2. populate: MADV_POPULATE_WRITE (Linux >= 5.14) faults every page in writable and
 *      reports failure; on older kernels MAP_POPULATE was already asked at mmap time, and
 *      where neither is available each page is written once ("touch").
 *   3. lock: mlock. Where RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK says no, the
 *      reservation stays unlocked and lock_error records the errno — unless the caller
 *      set PA_MEM_LOCK_REQUIRED, in which case everything is undone and the errno returned.
 * Every reservation records what was asked (requested_flags) and what the machine gave
 * (effective_flags, plus the errno behind each difference).
 *
 * Resize uses mremap: in place when may_move is false (the address never changes, so
 * outstanding pointers stay valid), or allowed to move. Growth is populated and locked
 * like the original. Release unlocks (munmap drops the locks) and unmaps, and closes the
 * memfd.
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
#define PA_MEM_LOCK_REQUIRED (1u << 2) /* fail instead of returning an unlocked region */
#define PA_MEM_HUGE_PAGES (1u << 3)    /* 2 MiB-aligned mapping advised MADV_HUGEPAGE */
#define PA_MEM_SHAREABLE (1u << 4)     /* memfd-backed MAP_SHARED mapping */
#define PA_MEM_ALL_FLAGS 0x1fu

#define PA_HUGE_PAGE_SIZE ((size_t)2 * 1024 * 1024)

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
    int huge_pages_error;     /* 0, or why MADV_HUGEPAGE was refused (EINVAL: THP disabled) */
    int populate_error;       /* 0, or the errno the populate step reported */
    /* private */
    void *map_base;           /* the mapping as created (may start before addr) */
    size_t map_size;
} pa_memory_t;

/* Reserves size bytes (> 0) with flags (PA_MEM_*). On failure *mem is left "empty"
 * (addr NULL, fd -1) and nothing stays mapped. -EINVAL (size 0, unknown flags, size
 * rounding overflows), -ENOMEM, -EPERM/-EAGAIN/-ENOMEM from mlock with LOCK_REQUIRED,
 * or the errno of mmap/memfd_create/ftruncate. */
PA_API int pa_memory_reserve(pa_memory_t *mem, size_t size, unsigned flags);

/* Resizes to new_size (> 0). With may_move false the address never changes (-ENOMEM when
 * the neighbouring address space is taken). Grown pages are populated / locked as the
 * reservation's effective flags say. On failure the reservation is unchanged. */
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
