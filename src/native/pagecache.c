/*
 * pagecache.c — page-cache warming: open within roots, chunked WILLNEED, populate,
 * pin, count (cachestat / mincore), mark and evict.
 *
 * The design lives in prealloc/pagecache.h; this comment adds what the header leaves to
 * the implementation.
 *
 * Mappings. Populate, mincore and pin need a mapping of the range; the mapping starts at
 * the range's offset aligned down to a page (the range's offset is stored aligned), and
 * only a pinned file keeps one. A PROT_READ MAP_SHARED mapping of a file we opened
 * O_RDONLY can never write to it. Mappings are made in windows of PA__WINDOW (64 MiB) for
 * populate and mincore so a huge file costs bounded address space and the mmap lock is
 * released between windows (another thread's mmap waits one window, not the whole file).
 *
 * cachestat is called through syscall(2) with its number: glibc has no wrapper, and the
 * number (451) is the same on every architecture with the unified table (x86_64 and
 * aarch64 included). A build on an architecture without it gets -ENOSYS and the mincore
 * fallback.
 */
#define _GNU_SOURCE
#include "prealloc/pagecache.h"

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef __NR_cachestat
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv) || defined(__i386__) || \
    defined(__arm__) || defined(__powerpc__) || defined(__s390__) || defined(__loongarch__)
#define __NR_cachestat 451
#endif
#endif

#define PA__WINDOW ((uint64_t)64 << 20)
#define PA__READ_BOUNCE ((size_t)1 << 20)
#define PA__DEFAULT_CHUNK ((uint64_t)128 << 10)

static uint64_t pa__page(void) {
    static long page = 0;
    if (page == 0) page = sysconf(_SC_PAGESIZE);
    return (uint64_t)page;
}

void pa_pagecache_file_init(pa_pagecache_file_t *f) {
    memset(f, 0, sizeof(*f));
    f->fd = -1;
}

/* path lies inside root (both canonical): equal, or root is a prefix ending on '/'. */
static bool pa__inside(const char *path, const char *root) {
    size_t n = strlen(root);
    while (n > 1 && root[n - 1] == '/') n--; /* "/usr/" == "/usr"; "/" stays "/" */
    if (n == 1 && root[0] == '/') return path[0] == '/';
    return strncmp(path, root, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* The allowed roots, canonicalised once for a batch: realpath of each (a root that does
 * not exist contains nothing and is left out); `all` when one of them is "/". */
typedef struct pa__roots {
    char **real;
    size_t n;
    bool any; /* roots were given (nroots > 0): the check applies */
    bool all; /* ... and one of them is "/": every path passes */
} pa__roots_t;

static void pa__roots_free(pa__roots_t *r) {
    for (size_t i = 0; i < r->n; i++) free(r->real[i]);
    free(r->real);
    memset(r, 0, sizeof(*r));
}

/* 0, -EINVAL (a root that is not absolute), -ENOMEM. */
static int pa__roots_init(pa__roots_t *r, const char *const *roots, size_t nroots) {
    memset(r, 0, sizeof(*r));
    if (nroots == 0) return 0;
    r->any = true;
    for (size_t i = 0; i < nroots; i++)
        if (roots[i] == NULL || roots[i][0] != '/') return -EINVAL;
    r->real = calloc(nroots, sizeof(char *));
    if (!r->real) return -ENOMEM;
    for (size_t i = 0; i < nroots; i++) {
        char *real = realpath(roots[i], NULL);
        if (real == NULL) {
            if (errno == ENOMEM) {
                pa__roots_free(r);
                return -ENOMEM;
            }
            continue;
        }
        if (strcmp(real, "/") == 0) r->all = true;
        r->real[r->n++] = real;
    }
    return 0;
}

static int pa__check_roots(int fd, const pa__roots_t *roots) {
    if (!roots->any || roots->all) return 0;
    char proc[64], real[PATH_MAX + 1];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    ssize_t len = readlink(proc, real, sizeof(real) - 1);
    if (len < 0) return -errno;
    if ((size_t)len >= sizeof(real) - 1) return -ENAMETOOLONG;
    real[len] = '\0';
    for (size_t i = 0; i < roots->n; i++)
        if (pa__inside(real, roots->real[i])) return 0;
    return -EACCES;
}

/* pa_pagecache_open with the roots canonicalised already and, optionally, the size and
 * mtime the file must have. */
static int pa__open_one(pa_pagecache_file_t *f, const char *path, uint64_t offset, uint64_t length,
                        const pa__roots_t *roots, uint64_t expect_size, int64_t expect_mtime_ns) {
    pa_pagecache_file_init(f);
    int rc = 0;
    if (path == NULL || path[0] == '\0') {
        rc = -EINVAL;
        goto fail;
    }
    if (strlen(path) >= PATH_MAX) {
        rc = -ENAMETOOLONG;
        goto fail;
    }
    const int base = O_RDONLY | O_NONBLOCK | O_CLOEXEC;
    int fd = open(path, base | O_NOATIME);
    f->noatime = fd >= 0;
    if (fd < 0 && errno == EPERM) fd = open(path, base); /* not our file: no O_NOATIME */
    if (fd < 0) {
        rc = -errno;
        goto fail;
    }
    f->fd = fd;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = pa__check_roots(fd, roots)) != 0) goto fail;
    int64_t mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if ((expect_size != PA_PAGECACHE_ANY_SIZE && (uint64_t)st.st_size != expect_size) ||
        (expect_mtime_ns != PA_PAGECACHE_ANY_MTIME && mtime_ns != expect_mtime_ns)) {
        rc = -ESTALE;
        goto fail;
    }
    f->size = (uint64_t)st.st_size;
    f->dev = (uint64_t)st.st_dev;
    f->mtime_ns = mtime_ns;
    uint64_t start = offset & ~(pa__page() - 1);
    if (start > f->size) start = f->size;
    uint64_t end = (length == 0 || length > UINT64_MAX - offset) ? f->size : offset + length;
    if (end > f->size) end = f->size;
    if (end < start) end = start;
    f->offset = start;
    f->length = end - start;
    return 0;
fail:
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    f->noatime = false;
    f->open_error = -rc;
    return rc;
}

int pa_pagecache_open(pa_pagecache_file_t *f, const char *path, uint64_t offset, uint64_t length,
                      const char *const *roots, size_t nroots) {
    pa__roots_t canon;
    int rc = pa__roots_init(&canon, roots, nroots);
    if (rc != 0) {
        pa_pagecache_file_init(f);
        f->open_error = -rc;
        return rc;
    }
    rc = pa__open_one(f, path, offset, length, &canon, PA_PAGECACHE_ANY_SIZE, PA_PAGECACHE_ANY_MTIME);
    pa__roots_free(&canon);
    return rc;
}

uint64_t pa_pagecache_chunk_bytes(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return PA__DEFAULT_CHUNK;
    static const char *const dirs[] = {"/sys/dev/block/%u:%u/queue/%s", "/sys/dev/block/%u:%u/../queue/%s"};
    static const char *const keys[] = {"read_ahead_kb", "max_sectors_kb"};
    uint64_t best = 0;
    for (size_t d = 0; d < 2 && best == 0; d++) {
        for (size_t k = 0; k < 2; k++) {
            char path[128];
            snprintf(path, sizeof(path), dirs[d], major(st.st_dev), minor(st.st_dev), keys[k]);
            FILE *in = fopen(path, "re");
            if (!in) continue;
            unsigned long long kb = 0;
            if (fscanf(in, "%llu", &kb) == 1 && kb * 1024 > best) best = kb * 1024;
            fclose(in);
        }
    }
    return best ? best : PA__DEFAULT_CHUNK;
}

static int pa__willneed(pa_pagecache_file_t *f, uint64_t chunk) {
    for (uint64_t done = 0; done < f->length; done += chunk) {
        uint64_t n = f->length - done < chunk ? f->length - done : chunk;
        int err = posix_fadvise(f->fd, (off_t)(f->offset + done), (off_t)n, POSIX_FADV_WILLNEED);
        if (err) return -err;
    }
    return 0;
}

/* pread the range through buf (PA__READ_BOUNCE bytes; NULL: one is allocated). */
static int pa__read_range(pa_pagecache_file_t *f, char *buf) {
    char *own = NULL;
    if (buf == NULL && (buf = own = malloc(PA__READ_BOUNCE)) == NULL) return -ENOMEM;
    int rc = 0;
    for (uint64_t done = 0; done < f->length;) {
        size_t want = f->length - done < PA__READ_BOUNCE ? (size_t)(f->length - done) : PA__READ_BOUNCE;
        ssize_t got = pread(f->fd, buf, want, (off_t)(f->offset + done));
        if (got < 0) {
            if (errno == EINTR) continue;
            rc = -errno;
            break;
        }
        if (got == 0) break; /* truncated meanwhile: nothing more to cache */
        done += (uint64_t)got;
    }
    free(own);
    return rc;
}

/* Populates the range window by window; -EINVAL when the kernel lacks
 * MADV_POPULATE_READ (nothing has been populated then). */
static int pa__populate(pa_pagecache_file_t *f) {
    for (uint64_t done = 0; done < f->length; done += PA__WINDOW) {
        size_t n = (size_t)(f->length - done < PA__WINDOW ? f->length - done : PA__WINDOW);
        void *map = mmap(NULL, n, PROT_READ, MAP_SHARED, f->fd, (off_t)(f->offset + done));
        if (map == MAP_FAILED) return -errno;
        int rc = madvise(map, n, MADV_POPULATE_READ) == 0 ? 0 : -errno;
        munmap(map, n);
        /* EFAULT: a page past EOF (the file shrank under us) — what exists is cached. */
        if (rc == -EFAULT) return 0;
        if (rc != 0) return rc;
    }
    return 0;
}

/* The readahead chunk of a device, looked up once per batch and device. */
typedef struct pa__chunk_cache {
    uint64_t given; /* the caller's chunk_bytes: nonzero overrides the lookup */
    bool known;
    uint64_t dev, bytes;
} pa__chunk_cache_t;

static uint64_t pa__chunk(pa__chunk_cache_t *c, const pa_pagecache_file_t *f) {
    if (c->given) return c->given;
    if (!c->known || c->dev != f->dev) {
        c->bytes = pa_pagecache_chunk_bytes(f->fd);
        c->dev = f->dev;
        c->known = true;
    }
    return c->bytes;
}

/* One file's warm; buf: a PA__READ_BOUNCE buffer to reuse, or NULL. */
static int pa__warm(pa_pagecache_file_t *f, unsigned flags, pa__chunk_cache_t *chunks, char *buf) {
    if (f->fd < 0) return -EBADF;
    if (flags & ~PA_PAGECACHE_ALL_FLAGS) return -EINVAL;
    f->warm_error = 0;
    if (f->length == 0) {
        f->warm_method = PA_PAGECACHE_WARM_NONE;
        return 0;
    }
    int rc = 0;
    if (flags & PA_PAGECACHE_WILLNEED) {
        rc = pa__willneed(f, pa__chunk(chunks, f));
        f->warm_method = PA_PAGECACHE_WARM_WILLNEED;
    }
    if (rc == 0 && (flags & PA_PAGECACHE_POPULATE)) {
        /* pread by default (see "Reading, not mapping" in the header); a mapping when
         * asked (PA_PAGECACHE_MAP) for a range that is not small, or when no buffer can
         * be had (a mapping needs none). */
        bool map = (flags & PA_PAGECACHE_MAP) && f->length > PA_PAGECACHE_READ_MAX;
        if (!map) {
            rc = pa__read_range(f, buf); /* buf NULL: it allocates one */
            f->warm_method = PA_PAGECACHE_WARM_READ;
            map = rc == -ENOMEM;
        }
        if (map) {
            rc = pa__populate(f);
            f->warm_method = PA_PAGECACHE_WARM_POPULATE;
            if (rc == -EINVAL) {
                rc = pa__read_range(f, buf);
                f->warm_method = PA_PAGECACHE_WARM_READ;
            }
        }
    }
    f->warm_error = -rc;
    return rc;
}

int pa_pagecache_warm(pa_pagecache_file_t *f, unsigned flags, uint64_t chunk_bytes) {
    pa__chunk_cache_t chunks = {.given = chunk_bytes};
    return pa__warm(f, flags, &chunks, NULL);
}

int pa_pagecache_cachestat(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out) {
    memset(out, 0, sizeof(*out));
#ifdef __NR_cachestat
    struct {
        uint64_t off, len;
    } range = {offset, length};
    struct {
        uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
    } cs;
    if (length == 0) { /* cachestat's len 0 means "to the end of the file" */
        out->method = PA_PAGECACHE_COUNT_CACHESTAT;
        return 0;
    }
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) != 0) return -errno;
    out->cached = cs.nr_cache;
    out->dirty = cs.nr_dirty;
    out->writeback = cs.nr_writeback;
    out->evicted = cs.nr_evicted;
    out->recently_evicted = cs.nr_recently_evicted;
    out->method = PA_PAGECACHE_COUNT_CACHESTAT;
    return 0;
#else
    (void)fd, (void)offset, (void)length;
    return -ENOSYS;
#endif
}

/* mincore of one window into vec (one byte per page); the window's offset is page
 * aligned. */
static int pa__mincore_window(int fd, uint64_t offset, size_t n, unsigned char *vec) {
    void *map = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED) return -errno;
    int rc = mincore(map, n, vec) == 0 ? 0 : -errno;
    munmap(map, n);
    return rc;
}

int pa_pagecache_mincore(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out) {
    memset(out, 0, sizeof(*out));
    out->method = PA_PAGECACHE_COUNT_MINCORE;
    uint64_t page = pa__page();
    uint64_t start = offset & ~(page - 1);
    uint64_t end = offset + length;
    if (length == 0) return 0;
    unsigned char *vec = malloc((size_t)(PA__WINDOW / page));
    if (!vec) return -ENOMEM;
    int rc = 0;
    for (uint64_t at = start; at < end; at += PA__WINDOW) {
        size_t n = (size_t)(end - at < PA__WINDOW ? end - at : PA__WINDOW);
        if ((rc = pa__mincore_window(fd, at, n, vec)) != 0) break;
        size_t pages = (n + page - 1) / page;
        for (size_t i = 0; i < pages; i++) out->cached += vec[i] & 1;
    }
    free(vec);
    return rc;
}

/* The kernel's rule for revealing page-cache state of a file (mincore's
 * can_do_mincore; cachestat's since 6.14): the caller owns it, may write it, or has
 * CAP_SYS_ADMIN — approximated here by euid 0. Otherwise mincore reports every page of a
 * file mapping resident, which is no count at all. */
static bool pa__may_count(int fd) {
    struct stat st;
    if (geteuid() == 0) return true;
    if (fstat(fd, &st) != 0) return false;
    if (st.st_uid == geteuid()) return true;
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    return faccessat(AT_FDCWD, proc, W_OK, AT_EACCESS) == 0;
}

int pa_pagecache_count(const pa_pagecache_file_t *f, pa_pagecache_count_t *out) {
    if (f->fd < 0) {
        memset(out, 0, sizeof(*out));
        return -EBADF;
    }
    int rc = pa_pagecache_cachestat(f->fd, f->offset, f->length, out);
    if (rc == -ENOSYS && !pa__may_count(f->fd)) rc = -EPERM; /* mincore would say "all resident" */
    if (rc == -EPERM) {
        memset(out, 0, sizeof(*out));
        out->method = PA_PAGECACHE_COUNT_NONE;
        out->restricted = true;
        return 0;
    }
    if (rc == -ENOSYS) rc = pa_pagecache_mincore(f->fd, f->offset, f->length, out);
    return rc;
}

int pa_pagecache_unpin(pa_pagecache_file_t *f) {
    if (f->map == NULL) return 0;
    int rc = munmap(f->map, f->map_len) == 0 ? 0 : -errno; /* munmap drops the locks */
    f->map = NULL;
    f->map_len = 0;
    f->pinned_bytes = 0;
    return rc;
}

int pa_pagecache_pin(pa_pagecache_file_t *f, uint64_t max_bytes) {
    if (f->fd < 0) return -EBADF;
    pa_pagecache_unpin(f);
    f->pin_error = 0;
    uint64_t page = pa__page();
    uint64_t want = (f->length + page - 1) & ~(page - 1);
    uint64_t budget = max_bytes & ~(page - 1);
    uint64_t n = want < budget ? want : budget;
    if (n < want) f->pin_error = ENOMEM;
    if (n == 0) return 0;
    void *map = mmap(NULL, (size_t)n, PROT_READ, MAP_SHARED, f->fd, (off_t)f->offset);
    if (map == MAP_FAILED) return -errno;
    /* syscall(2), not mlock(3): the sanitizer runtimes replace mlock() with a no-op
     * that returns 0, which would report pages pinned that are not (as in memory.c). */
    if (syscall(SYS_mlock, map, (size_t)n) != 0) {
        f->pin_error = errno;
        munmap(map, (size_t)n);
        return 0;
    }
    f->map = map;
    f->map_len = (size_t)n;
    f->pinned_bytes = n;
    return 0;
}

int pa_pagecache_mark(pa_pagecache_file_t *f) {
    if (f->fd < 0) return -EBADF;
    uint64_t page = pa__page();
    size_t pages = (size_t)((f->length + page - 1) / page);
    uint8_t *marked = calloc(pages ? pages : 1, 1);
    if (!marked) return -ENOMEM;
    for (uint64_t at = 0; at < f->length; at += PA__WINDOW) {
        size_t n = (size_t)(f->length - at < PA__WINDOW ? f->length - at : PA__WINDOW);
        int rc = pa__mincore_window(f->fd, f->offset + at, n, marked + at / page);
        if (rc != 0) {
            free(marked);
            return rc;
        }
    }
    for (size_t i = 0; i < pages; i++) marked[i] &= 1;
    free(f->marked);
    f->marked = marked;
    f->marked_pages = pages;
    return 0;
}

int pa_pagecache_evict(pa_pagecache_file_t *f, bool only_unmarked, uint64_t *evicted_bytes) {
    if (evicted_bytes) *evicted_bytes = 0;
    if (f->fd < 0) return -EBADF;
    if (!only_unmarked) {
        int err = f->length ? posix_fadvise(f->fd, (off_t)f->offset, (off_t)f->length, POSIX_FADV_DONTNEED) : 0;
        if (err) return -err;
        if (evicted_bytes) *evicted_bytes = f->length;
        return 0;
    }
    if (f->marked == NULL) return -EINVAL;
    uint64_t page = pa__page(), total = 0;
    for (size_t i = 0; i < f->marked_pages;) {
        if (f->marked[i]) {
            i++;
            continue;
        }
        size_t run = i;
        while (run < f->marked_pages && !f->marked[run]) run++;
        uint64_t from = (uint64_t)i * page, to = (uint64_t)run * page;
        if (to > f->length) to = f->length;
        int err = posix_fadvise(f->fd, (off_t)(f->offset + from), (off_t)(to - from), POSIX_FADV_DONTNEED);
        if (err) return -err;
        total += to - from;
        i = run;
    }
    if (evicted_bytes) *evicted_bytes = total;
    return 0;
}

int pa_pagecache_close(pa_pagecache_file_t *f) {
    int rc = pa_pagecache_unpin(f);
    if (f->fd >= 0 && close(f->fd) != 0 && rc == 0) rc = -errno;
    free(f->marked);
    pa_pagecache_file_init(f);
    return rc;
}

/* The directories a batch has read, by a 64-bit hash of the path (a collision only skips
 * a warm-up read, it never reads anything it should not). Open addressing, 0 = empty. */
typedef struct pa__dirset {
    uint64_t *slots;
    size_t cap, used;
    char *buf; /* getdents64 buffer */
} pa__dirset_t;

#define PA__DENTS_BUF ((size_t)64 << 10)

static uint64_t pa__hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ? h : 1;
}

/* true when h was not in the set (now it is); false when present or out of memory. */
static bool pa__dirset_add(pa__dirset_t *d, uint64_t h) {
    if (d->used * 2 >= d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 64;
        uint64_t *slots = calloc(cap, sizeof(uint64_t));
        if (!slots) return false;
        for (size_t i = 0; i < d->cap; i++) {
            if (!d->slots[i]) continue;
            size_t j = (size_t)(d->slots[i] & (cap - 1));
            while (slots[j]) j = (j + 1) & (cap - 1);
            slots[j] = d->slots[i];
        }
        free(d->slots);
        d->slots = slots;
        d->cap = cap;
    }
    size_t j = (size_t)(h & (d->cap - 1));
    while (d->slots[j]) {
        if (d->slots[j] == h) return false;
        j = (j + 1) & (d->cap - 1);
    }
    d->slots[j] = h;
    d->used++;
    return true;
}

/* Reads the directory of path (its lexical parent) once per batch; 1 when read now. */
static int pa__list_dir(pa__dirset_t *d, const char *path, const pa__roots_t *roots) {
    const char *slash = path ? strrchr(path, '/') : NULL;
    if (slash == NULL) return 0;
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    if (n >= PATH_MAX || !pa__dirset_add(d, pa__hash(path, n))) return 0;
    if (d->buf == NULL && (d->buf = malloc(PA__DENTS_BUF)) == NULL) return 0;
    char dirpath[PATH_MAX];
    memcpy(dirpath, path, n);
    dirpath[n] = '\0';
    const int base = O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC;
    int fd = open(dirpath, base | O_NOATIME);
    if (fd < 0 && errno == EPERM) fd = open(dirpath, base);
    if (fd < 0) return 0;
    int listed = 0;
    if (pa__check_roots(fd, roots) == 0) {
        long got;
        while ((got = syscall(SYS_getdents64, fd, d->buf, PA__DENTS_BUF)) > 0) {
        }
        listed = got == 0;
    }
    close(fd);
    return listed;
}

/* Whether a range is advised before it is populated: a small one (queue depth across
 * files), or part of a file (the fault readahead of a populate would read around and
 * past it, more than was asked); a whole large file is left to the fault readahead. */
static bool pa__advise_before_populate(const pa_pagecache_file_t *f) {
    return f->length <= PA_PAGECACHE_INLINE_MAX || f->offset != 0 || f->length != f->size;
}

int pa_pagecache_open_many_ex(pa_pagecache_file_t *files, size_t n, const pa_pagecache_open_args_t *args) {
    if (args->flags & ~(PA_PAGECACHE_WILLNEED | PA_PAGECACHE_LIST_DIRS)) return -EINVAL;
    if (args->dirs_listed) *args->dirs_listed = 0;
    pa__roots_t roots;
    int rc = pa__roots_init(&roots, args->roots, args->nroots);
    if (rc != 0) {
        for (size_t i = 0; i < n; i++) {
            pa_pagecache_file_init(&files[i]);
            files[i].open_error = -rc;
            if (args->before) memset(&args->before[i], 0, sizeof(args->before[i]));
        }
        return 0;
    }
    pa__chunk_cache_t chunks = {.given = args->chunk_bytes};
    pa__dirset_t dirs = {0};
    int opened = 0;
    for (size_t i = 0; i < n; i++) {
        pa_pagecache_file_t *f = &files[i];
        if ((args->flags & PA_PAGECACHE_LIST_DIRS) && pa__list_dir(&dirs, args->paths[i], &roots) &&
            args->dirs_listed)
            ++*args->dirs_listed;
        rc = pa__open_one(f, args->paths[i], args->offsets ? args->offsets[i] : 0,
                          args->lengths ? args->lengths[i] : 0, &roots,
                          args->expect_size ? args->expect_size[i] : PA_PAGECACHE_ANY_SIZE,
                          args->expect_mtime_ns ? args->expect_mtime_ns[i] : PA_PAGECACHE_ANY_MTIME);
        if (args->before) {
            if (rc != 0) memset(&args->before[i], 0, sizeof(args->before[i]));
            else if (pa_pagecache_count(f, &args->before[i]) != 0) args->before[i].method = PA_PAGECACHE_COUNT_NONE;
        }
        if (rc != 0) continue;
        opened++;
        /* A small range now: the device reads it during the next lookup. */
        if ((args->flags & PA_PAGECACHE_WILLNEED) && f->length <= PA_PAGECACHE_INLINE_MAX)
            pa__warm(f, PA_PAGECACHE_WILLNEED, &chunks, NULL);
    }
    /* Large ranges of part of a file after the last open; whole large files not at all
     * (see "Large files" in the header). */
    if (args->flags & PA_PAGECACHE_WILLNEED)
        for (size_t i = 0; i < n; i++)
            if (files[i].fd >= 0 && files[i].length > PA_PAGECACHE_INLINE_MAX && pa__advise_before_populate(&files[i]))
                pa__warm(&files[i], PA_PAGECACHE_WILLNEED, &chunks, NULL);
    free(dirs.slots);
    free(dirs.buf);
    pa__roots_free(&roots);
    return opened;
}

int pa_pagecache_open_many(pa_pagecache_file_t *files, size_t n, const char *const *paths,
                           const uint64_t *offsets, const uint64_t *lengths,
                           const char *const *roots, size_t nroots) {
    pa_pagecache_open_args_t args = {
        .paths = paths, .offsets = offsets, .lengths = lengths, .roots = roots, .nroots = nroots};
    return pa_pagecache_open_many_ex(files, n, &args);
}

int pa_pagecache_warm_many(pa_pagecache_file_t *files, size_t n, unsigned flags, uint64_t chunk_bytes) {
    if (flags & ~PA_PAGECACHE_ALL_FLAGS) return -EINVAL;
    int ok = 0;
    pa__chunk_cache_t chunks = {.given = chunk_bytes};
    char *buf = NULL;
    if (flags & PA_PAGECACHE_POPULATE) buf = malloc(PA__READ_BOUNCE); /* NULL: each read allocates */
    /* Every WILLNEED first: the device gets the whole set queued before we wait on any —
     * with POPULATE only the small ranges (see "Large files" in the header). */
    if (flags & PA_PAGECACHE_WILLNEED)
        for (size_t i = 0; i < n; i++)
            if (files[i].fd >= 0 && (!(flags & PA_PAGECACHE_POPULATE) || pa__advise_before_populate(&files[i])))
                pa__warm(&files[i], PA_PAGECACHE_WILLNEED, &chunks, NULL);
    for (size_t i = 0; i < n; i++) {
        if (files[i].fd < 0) continue;
        if (flags & PA_PAGECACHE_POPULATE) {
            int prior = files[i].warm_error;
            if (pa__warm(&files[i], flags & (PA_PAGECACHE_POPULATE | PA_PAGECACHE_MAP), &chunks, buf) == 0 && prior == 0) ok++;
            else if (files[i].warm_error == 0) files[i].warm_error = prior;
        } else if (files[i].warm_error == 0) {
            ok++;
        }
    }
    free(buf);
    return ok;
}

int pa_pagecache_count_many(const pa_pagecache_file_t *files, size_t n, pa_pagecache_count_t *out) {
    int counted = 0;
    for (size_t i = 0; i < n; i++) {
        if (files[i].fd < 0) {
            memset(&out[i], 0, sizeof(out[i]));
            continue;
        }
        if (pa_pagecache_count(&files[i], &out[i]) == 0) counted++;
        else out[i].method = PA_PAGECACHE_COUNT_NONE;
    }
    return counted;
}
