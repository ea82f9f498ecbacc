/*
 * prealloc/pagecache.h — page-cache warming: make a set of file ranges resident ahead of
 * a predicted start, prove it through the kernel, optionally pin it, give it back.
 *
 * Design
 * ------
 * A cold program start mostly waits for the disk; the files it will read are known (given
 * by a rule or recorded once), so they can be read into the page cache before it starts.
 * One pa_pagecache_file_t describes one range [offset, offset + length) of one regular
 * file. The steps, each batched over an array of files (one call, one GIL release):
 *
 *   1. open: O_RDONLY | O_NOATIME | O_NONBLOCK | O_CLOEXEC (O_NOATIME is refused with
 *      EPERM for a file the caller does not own; then the open is retried without it, and
 *      `noatime` says which). O_NONBLOCK keeps a FIFO from blocking the open. The path
 *      the kernel really opened (readlink of /proc/self/fd/N, so every symlink and ".."
 *      is already resolved and there is no check-then-open race; so /proc must be
 *      mounted where roots are given) must lie inside one of
 *      the allowed roots (each realpath'd, compared on a '/' boundary): a symlink that
 *      points out of the roots is refused with -EACCES. Only regular files are accepted
 *      (-EINVAL otherwise). The range is clamped to the file size.
 *   2. warm, asynchronously: POSIX_FADV_WILLNEED in chunks. One call reads at most
 *      max(read_ahead_kb, max_sectors_kb) of the device (the kernel's
 *      force_page_cache_ra clamps it), so a single WILLNEED of a 200 MB file reads only the
 *      first few hundred KiB to MiB; the chunk is read from /sys/class/bdi/M:m
 *      (pa_pagecache_chunk_bytes), 128 KiB when unknown. Issued before any synchronous
 *      step, so the device sees a deep queue — for small ranges and parts of files; a
 *      whole large file that is also made certain (3) is not advised ("Large files").
 *   3. warm, certainly: the range is pread() into a reused 1 MiB buffer (method READ):
 *      a read returns only once its pages are up to date in the page cache (or fails
 *      with the I/O error), so every page is resident on return. With PA_PAGECACHE_MAP,
 *      a range over PA_PAGECACHE_READ_MAX bytes is populated instead: MADV_POPULATE_READ
 *      (Linux >= 5.14) on a read-only MAP_SHARED mapping, which copies nothing (pread
 *      again where the kernel does not know it, EINVAL); the mapping is dropped
 *      afterwards unless the file is pinned. See "Reading, not mapping" for why reading
 *      is the default.
 *   4. pin (optional): mlock of the mapping, bounded by a byte budget the caller computes
 *      from RLIMIT_MEMLOCK (requested vs effective: pinned_bytes and pin_error). Locked,
 *      mapped pages survive POSIX_FADV_DONTNEED and reclaim until unpinned.
 *   5. count: cachestat(2) (Linux >= 6.5, syscall 451 on every architecture that has the
 *      unified syscall table) counts cached, dirty, writeback and evicted pages of a range
 *      from the page-cache xarray without touching page tables. Where it is missing
 *      (ENOSYS), mincore(2) over a temporary mapping is the fallback. Both reveal a
 *      file's page-cache state only to its owner, a writer or CAP_SYS_ADMIN (cachestat
 *      since 6.14 answers EPERM; mincore reports every page resident, no count at all),
 *      so for anyone else the count is "restricted": unknown, method NONE. A populate
 *      that succeeded still proves those pages were made resident.
 *   6. mark / evict: mark records a per-page residency bitmap (mincore) before warming;
 *      evict issues POSIX_FADV_DONTNEED only over the runs of pages that were not resident
 *      at mark time, so pages other programs had cached stay.
 *   7. close: unpin, unmap, close the fd, free the bitmap; leaves the file "empty".
 *
 * The warmer never hands file contents to anyone: it only asks the kernel to cache them.
 *
 * Many small files (a program's libraries and modules). After drop_caches a file's first
 * open reads its inode (and directory blocks) synchronously; issuing every file's
 * readahead only after all opens leaves the device idle during those lookups. So
 * pa_pagecache_open_many_ex does, per file and in one pass: open, fstat, checks (roots,
 * regular, size and mtime against a profile's record), the "before" count, and, for a
 * range of at most PA_PAGECACHE_INLINE_MAX bytes, the readahead — the device reads it
 * while the next file is looked up. Larger ranges are not advised there: queued in the
 * open pass, their megabytes stood in front of every later open's inode read (the block
 * layer does not put metadata reads first; measured: single opens of 20-50 ms behind an
 * 8 MiB readahead). The populate pass follows over the whole set. The readahead chunk is
 * looked up once per device, not per file (sysfs reads), and the roots are canonicalised
 * once per batch.
 *
 * Large files. When residency must be certain (POPULATE), a whole large file is not
 * advised at all: the reads (or a populate's faults) drive the kernel's own readahead
 * (sequential, asynchronous ahead of the reader, in large folios where the filesystem
 * has them), where POSIX_FADV_WILLNEED's forced readahead allocates order-0 pages one by
 * one. Measured on a 221 MiB database (6.18, ext4, load ~8 on 2 vCPUs, 21 rounds):
 * WILLNEED then populate warmed in 696 ms and the query after it took 131 ms; populate
 * alone 205 ms and 88 ms (vmtouch -t: 360 and 70; fully warm: 64). So a whole large file
 * is not advised when it is also populated (warm_many with both flags, the batch open);
 * part of a file still is — the kernel's readahead reads around and past the range's
 * end, more than was asked — and WILLNEED alone still advises everything.
 *
 * Reading, not mapping. With every page resident by the kernel's count either way, the
 * program that came next ran faster after a read-based warming than after
 * MADV_POPULATE_READ: the same query, 9 rounds, load ~5: populate 96 ms, pread of the
 * files 76, cat 75, vmtouch -t 78, for a warming of 175 / 193 / 190 / 187 ms. Why was not
 * found (folio sizes and LRU state differ between the two paths); the default follows
 * the measurement and costs a copy (~10 % more warming time here).
 *
 * Directories (PA_PAGECACHE_LIST_DIRS). A program also looks up names that are not in a
 * file list — symlinks (libfoo.so.1 -> libfoo.so.1.2.3), the names an import system or a
 * compiler's search path probes and does not find. Where those lie in the directory of a
 * listed file, reading the whole directory (getdents64 until its end, the names thrown
 * away) puts its blocks in the cache, so the lookups need no disk. It is done in the open
 * pass, the first time a directory is met and before the large readaheads are queued
 * (behind them each directory read waited for megabytes); a directory outside the roots
 * (the path the kernel opened, as for files) is not read. Names looked up in
 * directories that hold no listed file stay uncovered.
 *
 * Waste. cachestat's `evicted` counts the shadow entries reclaim leaves for pages it
 * evicted, so a warmed page pushed out before the need shows up there; pages dropped by
 * POSIX_FADV_DONTNEED (invalidation) leave none and are not counted. Whether a warmed
 * page was read afterwards needs idle-page tracking (/sys/kernel/mm/page_idle, root,
 * CONFIG_IDLE_PAGE_TRACKING), which this component does not use: the kernel it was
 * written on has none.
 *
 * Complexity: O(pages) of kernel work for populate, pin, mincore; O(range / chunk)
 * syscalls for WILLNEED; O(1) syscalls for cachestat. All calls block (disk I/O); none
 * takes a lock of ours. Thread safety: a pa_pagecache_file_t is owned by one thread at a
 * time; distinct files are independent.
 * Limits: a file's range must fit in the address space (mapping it); names in the roots
 * and paths are at most PATH_MAX. What a file list cannot warm: directory entries and
 * failed lookups (a compiler's search path probes), which only running the program does.
 */
#ifndef PREALLOC_PAGECACHE_H
#define PREALLOC_PAGECACHE_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Warm flags. */
#define PA_PAGECACHE_WILLNEED (1u << 0) /* chunked POSIX_FADV_WILLNEED (asynchronous) */
#define PA_PAGECACHE_POPULATE (1u << 1) /* MADV_POPULATE_READ / pread: resident on return */
#define PA_PAGECACHE_MAP (1u << 2)      /* with POPULATE: MADV_POPULATE_READ, not pread */
#define PA_PAGECACHE_ALL_FLAGS 0x7u

/* Open flag (pa_pagecache_open_args_t.flags only): read the directory of every file,
 * once each, just before the first of its files is opened. */
#define PA_PAGECACHE_LIST_DIRS (1u << 8)

/* Ranges up to this many bytes are advised right after their open in the batch open,
 * and are the only ones warm_many advises when it also populates. */
#define PA_PAGECACHE_INLINE_MAX ((uint64_t)256 << 10)

/* Ranges up to this many bytes are read even with PA_PAGECACHE_MAP. */
#define PA_PAGECACHE_READ_MAX ((uint64_t)128 << 10)

/* "Any size" / "any mtime" for pa_pagecache_open_args_t's expectations. */
#define PA_PAGECACHE_ANY_SIZE UINT64_MAX
#define PA_PAGECACHE_ANY_MTIME INT64_MIN

/* How a range was made resident (warm_method). */
typedef enum pa_pagecache_warm_method {
    PA_PAGECACHE_WARM_NONE = 0,
    PA_PAGECACHE_WARM_WILLNEED = 1, /* advised only: residency not certain */
    PA_PAGECACHE_WARM_POPULATE = 2, /* MADV_POPULATE_READ */
    PA_PAGECACHE_WARM_READ = 3      /* pread into a bounce buffer (no MADV_POPULATE_READ) */
} pa_pagecache_warm_method_t;

/* How a residency count was obtained. */
typedef enum pa_pagecache_count_method {
    PA_PAGECACHE_COUNT_NONE = 0,
    PA_PAGECACHE_COUNT_CACHESTAT = 1,
    PA_PAGECACHE_COUNT_MINCORE = 2
} pa_pagecache_count_method_t;

/* Pages of a range (cachestat's fields; mincore fills `cached` only). */
typedef struct pa_pagecache_count {
    uint64_t cached;
    uint64_t dirty;
    uint64_t writeback;
    uint64_t evicted;          /* evicted since they were cached (shadow entries) */
    uint64_t recently_evicted; /* ... of those, recently enough to count as thrashing */
    int method;                /* pa_pagecache_count_method_t */
    bool restricted;           /* the kernel does not reveal this file's page-cache state
                                  to this process (not its owner, not writable, no
                                  CAP_SYS_ADMIN): the counts are 0 and method NONE */
} pa_pagecache_count_t;

typedef struct pa_pagecache_file {
    int fd;                /* -1 when not open */
    int open_error;        /* 0, or the errno that kept the file from opening */
    bool noatime;          /* opened with O_NOATIME */
    uint64_t size;         /* file size at open */
    uint64_t offset;       /* the range, clamped to the file (offset page aligned down) */
    uint64_t length;
    int warm_method;       /* pa_pagecache_warm_method_t of the last warm */
    int warm_error;        /* 0, or the errno of the last warm */
    uint64_t pinned_bytes; /* bytes mlocked now */
    int pin_error;         /* 0, or why fewer bytes than asked are pinned */
    /* private */
    void *map;             /* the pinned mapping, NULL when not pinned */
    size_t map_len;
    uint8_t *marked;       /* per-page residency at mark time (1 = resident), or NULL */
    size_t marked_pages;
    uint64_t dev;          /* st_dev at open (the readahead chunk is per device) */
    int64_t mtime_ns;      /* st_mtime at open, ns */
} pa_pagecache_file_t;

/* The batch open of pa_pagecache_open_many_ex. Arrays have n entries or are NULL. */
typedef struct pa_pagecache_open_args {
    const char *const *paths;
    const uint64_t *offsets;         /* NULL: every range starts at 0 */
    const uint64_t *lengths;         /* NULL: every range runs to the end of its file */
    const uint64_t *expect_size;     /* NULL, or the size each file must have
                                        (PA_PAGECACHE_ANY_SIZE: any); else -ESTALE */
    const int64_t *expect_mtime_ns;  /* NULL, or its st_mtime in ns (PA_PAGECACHE_ANY_MTIME) */
    const char *const *roots;
    size_t nroots;
    unsigned flags;                  /* PA_PAGECACHE_WILLNEED: readahead of each range of
                                        at most PA_PAGECACHE_INLINE_MAX bytes right after
                                        its open, of larger parts of files after the last
                                        open, not of whole large files ("Large files";
                                        POPULATE is not accepted);
                                        PA_PAGECACHE_LIST_DIRS: see there */
    uint64_t chunk_bytes;            /* 0: the device's (pa_pagecache_chunk_bytes) */
    pa_pagecache_count_t *before;    /* NULL, or n counts taken after the open and before
                                        the readahead (zeroed, method NONE, if not open) */
    uint64_t *dirs_listed;           /* NULL, or out: directories read (LIST_DIRS) */
} pa_pagecache_open_args_t;

/* Fills *f as an empty (closed) file. */
PA_API void pa_pagecache_file_init(pa_pagecache_file_t *f);

/* Opens path (see the design: O_NOATIME, roots, regular files) and sets the range
 * [offset, offset + length) clamped to the file; length 0 means "to the end". nroots 0
 * allows every path. Records the errno in f->open_error too. -EACCES (outside the roots),
 * -EINVAL (not a regular file, bad root), -ENAMETOOLONG, or open's errno. */
PA_API int pa_pagecache_open(pa_pagecache_file_t *f, const char *path, uint64_t offset, uint64_t length,
                             const char *const *roots, size_t nroots);

/* Warms the range with flags (PA_PAGECACHE_*); chunk_bytes 0 = pa_pagecache_chunk_bytes.
 * -EBADF when not open, -EINVAL for unknown flags, -EIO/-ENOMEM from populate. */
PA_API int pa_pagecache_warm(pa_pagecache_file_t *f, unsigned flags, uint64_t chunk_bytes);

/* Counts the range's pages in the page cache (cachestat, else mincore); a file whose
 * state the kernel does not reveal to this process gets out->restricted, 0 counts and
 * method NONE (return 0). */
PA_API int pa_pagecache_count(const pa_pagecache_file_t *f, pa_pagecache_count_t *out);

/* Pins (mlock) at most max_bytes of the range, from its start, page granular. A refused
 * mlock is not an error: pinned_bytes stays 0 and pin_error records the errno; a budget
 * smaller than the range records ENOMEM with the part that fits pinned. Returns 0, or
 * -EBADF / the errno of mmap. Pinning again first unpins. */
PA_API int pa_pagecache_pin(pa_pagecache_file_t *f, uint64_t max_bytes);

/* Unlocks and unmaps the pinned mapping. No-op when not pinned. */
PA_API int pa_pagecache_unpin(pa_pagecache_file_t *f);

/* Records which pages of the range are resident now (for pa_pagecache_evict). */
PA_API int pa_pagecache_mark(pa_pagecache_file_t *f);

/* POSIX_FADV_DONTNEED over the range; with only_unmarked, only the runs of pages that
 * were not resident at the last mark (-EINVAL when never marked). Pinned pages stay.
 * *evicted_bytes (may be NULL): the bytes advised. */
PA_API int pa_pagecache_evict(pa_pagecache_file_t *f, bool only_unmarked, uint64_t *evicted_bytes);

/* Unpins, unmaps, closes, frees; leaves *f empty. Closing an empty file returns 0. */
PA_API int pa_pagecache_close(pa_pagecache_file_t *f);

/* Batches: one call over n files. open_many opens files[i] from paths[i] and the range
 * offsets[i]/lengths[i] (NULL arrays: whole files) and returns how many opened (each
 * failure in its open_error). warm_many first issues WILLNEED for every open file (when
 * asked; when it populates too, not for a whole file larger than PA_PAGECACHE_INLINE_MAX:
 * "Large files"), then populates each; returns the number warmed without error (errors in
 * warm_error). count_many fills out[i] (zeroed, method NONE, for a closed file). */
PA_API int pa_pagecache_open_many(pa_pagecache_file_t *files, size_t n, const char *const *paths,
                                  const uint64_t *offsets, const uint64_t *lengths,
                                  const char *const *roots, size_t nroots);
PA_API int pa_pagecache_warm_many(pa_pagecache_file_t *files, size_t n, unsigned flags, uint64_t chunk_bytes);

/* The one-pass open (see "Many small files"): opens files[i] as pa_pagecache_open does,
 * refuses with -ESTALE (in open_error) a file whose size or mtime differ from the
 * expected ones, counts it into before[i] and issues the readahead of the small ranges
 * (and of parts of large files), reading directories first with LIST_DIRS. Returns how
 * many opened; -EINVAL for flags other than WILLNEED | LIST_DIRS. A root that is not
 * absolute opens nothing (every open_error EINVAL, 0). */
PA_API int pa_pagecache_open_many_ex(pa_pagecache_file_t *files, size_t n, const pa_pagecache_open_args_t *args);
PA_API int pa_pagecache_count_many(const pa_pagecache_file_t *files, size_t n, pa_pagecache_count_t *out);

/* Raw counters on any fd: cachestat(2) (-ENOSYS where the kernel lacks it, -EPERM where
 * it refuses) and mincore over a temporary mapping. */
PA_API int pa_pagecache_cachestat(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out);
PA_API int pa_pagecache_mincore(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out);

/* The most bytes one POSIX_FADV_WILLNEED of fd's device reads: max(read_ahead_kb,
 * max_sectors_kb) of its bdi, 128 KiB when unknown. */
PA_API uint64_t pa_pagecache_chunk_bytes(int fd);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_PAGECACHE_H */
