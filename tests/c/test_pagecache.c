/*
 * test_pagecache.c — page-cache warming, checked through the kernel: cachestat and
 * mincore counts of files the test writes (flushed with fsync so POSIX_FADV_DONTNEED can
 * drop them), VmLck in /proc/self/status for pins, readlink'd symlinks for the roots.
 *
 * The files live under a fresh directory in $TMPDIR (default /var/tmp, which is a disk
 * on CI machines; tmpfs pages cannot be dropped, so the eviction tests skip there).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "pa_test.h"
#include "prealloc/pagecache.h"

#define MiB ((uint64_t)1024 * 1024)
#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

static char dir[256];
static uint64_t page;
static bool droppable; /* the directory's filesystem can drop clean pages */

static long long status_bytes(const char *key) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return -1;
    char line[256];
    long long value = -1;
    size_t key_len = strlen(key);
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, key_len) == 0 && line[key_len] == ':') {
            value = atoll(line + key_len + 1) * 1024;
            break;
        }
    }
    fclose(f);
    return value;
}

/* Writes size bytes to dir/name, flushes them and drops them from the cache. */
static void make_file(const char *name, uint64_t size, char *path_out) {
    snprintf(path_out, 512, "%s/%s", dir, name);
    int fd = open(path_out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char buf[65536];
    for (size_t i = 0; i < sizeof(buf); i++) buf[i] = (char)(i * 7 + 1);
    for (uint64_t done = 0; done < size; done += sizeof(buf)) {
        size_t n = size - done < sizeof(buf) ? (size_t)(size - done) : sizeof(buf);
        if (write(fd, buf, n) != (ssize_t)n) break;
    }
    fsync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

static uint64_t cached_pages(const pa_pagecache_file_t *f) {
    pa_pagecache_count_t c;
    if (pa_pagecache_count(f, &c) != 0) return UINT64_MAX;
    return c.cached;
}

static void test_open_roots(void) {
    char inside[512], link_out[512], link_in[512], sub[512];
    make_file("inside.bin", 3 * page + 5, inside);
    const char *roots[] = {dir};
    pa_pagecache_file_t f;

    CHECK_EQ_INT(pa_pagecache_open(&f, inside, 0, 0, roots, 1), 0);
    CHECK(f.fd >= 0);
    CHECK_EQ_INT(f.size, 3 * page + 5);
    CHECK_EQ_INT(f.length, 3 * page + 5);
    CHECK(f.noatime); /* the test owns the file */
    CHECK_EQ_INT(pa_pagecache_close(&f), 0);
    CHECK_EQ_INT(f.fd, -1);

    /* Range clamped, offset aligned down to a page. */
    CHECK_EQ_INT(pa_pagecache_open(&f, inside, page + 10, 100 * page, roots, 1), 0);
    CHECK_EQ_INT(f.offset, page);
    CHECK_EQ_INT(f.length, 2 * page + 5);
    pa_pagecache_close(&f);

    /* A symlink inside the root that points out of it is refused; one pointing in is not. */
    snprintf(link_out, sizeof(link_out), "%s/out", dir);
    snprintf(link_in, sizeof(link_in), "%s/in", dir);
    CHECK_EQ_INT(symlink("/proc/self/exe", link_out), 0);
    CHECK_EQ_INT(symlink("inside.bin", link_in), 0);
    CHECK_EQ_INT(pa_pagecache_open(&f, link_out, 0, 0, roots, 1), -EACCES);
    CHECK_EQ_INT(f.open_error, EACCES);
    CHECK_EQ_INT(f.fd, -1);
    CHECK_EQ_INT(pa_pagecache_open(&f, link_in, 0, 0, roots, 1), 0);
    pa_pagecache_close(&f);

    /* ".." out of the root, and a root that is only a string prefix ("/x/ab" vs "/x/a"). */
    snprintf(sub, sizeof(sub), "%s/../%s", dir, strrchr(dir, '/') + 1);
    char dotdot[600];
    snprintf(dotdot, sizeof(dotdot), "%s/inside.bin", sub);
    CHECK_EQ_INT(pa_pagecache_open(&f, dotdot, 0, 0, roots, 1), 0); /* resolves back in */
    pa_pagecache_close(&f);
    char prefix_root[300];
    snprintf(prefix_root, sizeof(prefix_root), "%s/insid", dir);
    const char *prefix_roots[] = {prefix_root};
    CHECK_EQ_INT(pa_pagecache_open(&f, inside, 0, 0, prefix_roots, 1), -EACCES);
    const char *slash_roots[] = {"/"};
    CHECK_EQ_INT(pa_pagecache_open(&f, inside, 0, 0, slash_roots, 1), 0);
    pa_pagecache_close(&f);

    /* Not a regular file; missing; relative root. */
    CHECK_EQ_INT(pa_pagecache_open(&f, dir, 0, 0, roots, 1), -EINVAL);
    snprintf(sub, sizeof(sub), "%s/missing", dir);
    CHECK_EQ_INT(pa_pagecache_open(&f, sub, 0, 0, roots, 1), -ENOENT);
    const char *bad_roots[] = {"relative"};
    CHECK_EQ_INT(pa_pagecache_open(&f, inside, 0, 0, bad_roots, 1), -EINVAL);
    CHECK_EQ_INT(pa_pagecache_close(&f), 0); /* closing an empty file */
    unlink(link_out);
    unlink(link_in);
    unlink(inside);
}

static void test_populate_and_counts(void) {
    char path[512];
    make_file("populate.bin", 8 * MiB, path);
    pa_pagecache_file_t f;
    REQUIRE(pa_pagecache_open(&f, path, 0, 0, NULL, 0) == 0);
    uint64_t pages = 8 * MiB / page;
    if (droppable) CHECK(cached_pages(&f) < pages / 2);
    CHECK_EQ_INT(pa_pagecache_warm(&f, PA_PAGECACHE_WILLNEED | PA_PAGECACHE_POPULATE | PA_PAGECACHE_MAP, 0), 0);
    CHECK_EQ_INT(f.warm_method, PA_PAGECACHE_WARM_POPULATE);
    CHECK_EQ_INT(cached_pages(&f), pages);

    /* Both counters agree on a fully resident file; cachestat reports its method. */
    pa_pagecache_count_t cs, mc;
    int rc = pa_pagecache_cachestat(f.fd, 0, 8 * MiB, &cs);
    CHECK(rc == 0 || rc == -ENOSYS);
    if (rc == 0) {
        CHECK_EQ_INT(cs.cached, pages);
        CHECK_EQ_INT(cs.method, PA_PAGECACHE_COUNT_CACHESTAT);
    }
    CHECK_EQ_INT(pa_pagecache_mincore(f.fd, 0, 8 * MiB, &mc), 0);
    CHECK_EQ_INT(mc.cached, pages);
    CHECK_EQ_INT(mc.method, PA_PAGECACHE_COUNT_MINCORE);

    if (droppable) {
        CHECK_EQ_INT(pa_pagecache_evict(&f, false, NULL), 0);
        CHECK(cached_pages(&f) < pages / 2);
        /* (cachestat's nr_evicted counts pages reclaim evicted — shadow entries — not
         * the ones DONTNEED invalidated, so it stays where it was here.) */
        /* WILLNEED alone in chunks reads the file (asynchronously; the populate after
         * it waits for the reads in flight and fills any gap). */
        CHECK_EQ_INT(pa_pagecache_warm(&f, PA_PAGECACHE_WILLNEED, 0), 0);
        CHECK_EQ_INT(f.warm_method, PA_PAGECACHE_WARM_WILLNEED);
        CHECK_EQ_INT(pa_pagecache_warm(&f, PA_PAGECACHE_POPULATE, 0), 0);
        CHECK_EQ_INT(cached_pages(&f), pages);
    }
    CHECK_EQ_INT(pa_pagecache_warm(&f, 0x80, 0), -EINVAL);
    pa_pagecache_close(&f);
    CHECK_EQ_INT(pa_pagecache_warm(&f, PA_PAGECACHE_POPULATE, 0), -EBADF);
    unlink(path);
}

static void test_pin_survives_dontneed(void) {
    char path[512];
    make_file("pin.bin", 4 * MiB, path);
    pa_pagecache_file_t f;
    REQUIRE(pa_pagecache_open(&f, path, 0, 0, NULL, 0) == 0);
    long long locked_before = status_bytes("VmLck");
    CHECK_EQ_INT(pa_pagecache_pin(&f, UINT64_MAX), 0);
    if (f.pin_error != 0) { /* RLIMIT_MEMLOCK below 4 MiB: nothing pinned, said why */
        fprintf(stderr, "  (pin refused: %s; pin test limited)\n", strerror(f.pin_error));
        CHECK_EQ_INT(f.pinned_bytes, 0);
        CHECK_EQ_INT(status_bytes("VmLck"), locked_before);
        pa_pagecache_close(&f);
        unlink(path);
        return;
    }
    uint64_t pages = 4 * MiB / page;
    CHECK_EQ_INT(f.pinned_bytes, 4 * MiB);
    CHECK_EQ_INT(status_bytes("VmLck") - locked_before, 4 * MiB);
    CHECK_EQ_INT(cached_pages(&f), pages);
    CHECK_EQ_INT(pa_pagecache_evict(&f, false, NULL), 0);
    CHECK_EQ_INT(cached_pages(&f), pages); /* locked pages stay */
    CHECK_EQ_INT(pa_pagecache_unpin(&f), 0);
    CHECK_EQ_INT(status_bytes("VmLck"), locked_before);
    CHECK_EQ_INT(f.pinned_bytes, 0);
    if (droppable) {
        CHECK_EQ_INT(pa_pagecache_evict(&f, false, NULL), 0);
        CHECK(cached_pages(&f) < pages / 2);
    }

    /* A budget below the range pins the part that fits and says ENOMEM. */
    CHECK_EQ_INT(pa_pagecache_pin(&f, MiB + 100), 0);
    CHECK_EQ_INT(f.pinned_bytes, MiB);
    CHECK_EQ_INT(f.pin_error, ENOMEM);
    CHECK_EQ_INT(status_bytes("VmLck") - locked_before, MiB);
    CHECK_EQ_INT(pa_pagecache_close(&f), 0); /* close unpins */
    CHECK_EQ_INT(status_bytes("VmLck"), locked_before);
    unlink(path);
}

static void test_mark_and_evict_unmarked(void) {
    if (!droppable) {
        fprintf(stderr, "  (skipped: %s is on tmpfs, pages cannot be dropped)\n", dir);
        return;
    }
    char path[512];
    make_file("mark.bin", 4 * MiB, path);
    pa_pagecache_file_t f;
    REQUIRE(pa_pagecache_open(&f, path, 0, 0, NULL, 0) == 0);
    /* The first half is "someone else's": cached before the warm, read through an fd of
     * its own with readahead off (a 2 MiB read would otherwise read 2 MiB more ahead). */
    char *buf = malloc(2 * MiB);
    REQUIRE(buf != NULL);
    int other = open(path, O_RDONLY | O_CLOEXEC);
    REQUIRE(other >= 0);
    CHECK_EQ_INT(posix_fadvise(other, 0, 0, POSIX_FADV_RANDOM), 0);
    CHECK_EQ_INT(pread(other, buf, 2 * MiB, 0), (ssize_t)(2 * MiB));
    close(other);
    free(buf);
    CHECK_EQ_INT(pa_pagecache_evict(&f, true, NULL), -EINVAL); /* never marked */
    CHECK_EQ_INT(pa_pagecache_mark(&f), 0);
    CHECK_EQ_INT(pa_pagecache_warm(&f, PA_PAGECACHE_POPULATE, 0), 0);
    CHECK_EQ_INT(cached_pages(&f), 4 * MiB / page);
    uint64_t evicted = 0;
    CHECK_EQ_INT(pa_pagecache_evict(&f, true, &evicted), 0);
    CHECK_EQ_INT(evicted, 2 * MiB);
    pa_pagecache_count_t first, second;
    CHECK_EQ_INT(pa_pagecache_mincore(f.fd, 0, 2 * MiB, &first), 0);
    CHECK_EQ_INT(pa_pagecache_mincore(f.fd, 2 * MiB, 2 * MiB, &second), 0);
    CHECK_EQ_INT(first.cached, 2 * MiB / page);
    CHECK(second.cached < (2 * MiB / page) / 4);
    pa_pagecache_close(&f);
    unlink(path);
}

static void test_batch(void) {
    char a[512], b[512], c[512], missing[512];
    make_file("a.bin", MiB, a);
    make_file("b.bin", 2 * MiB, b);
    make_file("c.bin", 3 * page, c);
    snprintf(missing, sizeof(missing), "%s/missing.bin", dir);
    const char *paths[] = {a, missing, b, c};
    const char *roots[] = {dir};
    pa_pagecache_file_t files[4];
    CHECK_EQ_INT(pa_pagecache_open_many(files, 4, paths, NULL, NULL, roots, 1), 3);
    CHECK_EQ_INT(files[1].open_error, ENOENT);
    CHECK_EQ_INT(pa_pagecache_warm_many(files, 4, PA_PAGECACHE_WILLNEED | PA_PAGECACHE_POPULATE, 0), 3);
    pa_pagecache_count_t counts[4];
    CHECK_EQ_INT(pa_pagecache_count_many(files, 4, counts), 3);
    CHECK_EQ_INT(counts[0].cached, MiB / page);
    CHECK_EQ_INT(counts[1].cached, 0);
    CHECK_EQ_INT(counts[1].method, PA_PAGECACHE_COUNT_NONE);
    CHECK_EQ_INT(counts[2].cached, 2 * MiB / page);
    CHECK_EQ_INT(counts[3].cached, 3);
    CHECK_EQ_INT(pa_pagecache_warm_many(files, 4, 0x40, 0), -EINVAL);
    CHECK_EQ_INT(files[0].warm_method, PA_PAGECACHE_WARM_READ);
    for (int i = 0; i < 4; i++) CHECK_EQ_INT(pa_pagecache_close(&files[i]), 0);
    unlink(a);
    unlink(b);
    unlink(c);
}

/* Polls until f's range counts `want` cached pages (readahead is asynchronous); the
 * bound only keeps a broken kernel from hanging the test. */
static uint64_t wait_cached(const pa_pagecache_file_t *f, uint64_t want) {
    uint64_t got = 0;
    for (int i = 0; i < 500 && (got = cached_pages(f)) < want; i++) usleep(10000);
    return got;
}

static void test_open_many_ex(void) {
    char small[512], big[512], stale_size[512], stale_mtime[512], hot[512];
    make_file("small.bin", 3 * page, small);
    make_file("big.bin", 2 * MiB, big); /* > PA_PAGECACHE_INLINE_MAX: advised after the opens */
    make_file("stale_size.bin", page, stale_size);
    make_file("stale_mtime.bin", page, stale_mtime);
    make_file("hot.bin", 4 * page, hot);
    struct stat stm;
    REQUIRE(stat(stale_mtime, &stm) == 0);
    int fd = open(hot, O_RDONLY | O_CLOEXEC); /* another program's pages */
    REQUIRE(fd >= 0);
    char buf[4096];
    while (read(fd, buf, sizeof(buf)) > 0) {
    }
    close(fd);
    const char *paths[] = {small, big, stale_size, stale_mtime, hot};
    uint64_t sizes[] = {3 * page, PA_PAGECACHE_ANY_SIZE, page + 1, page, 4 * page};
    int64_t mtimes[] = {PA_PAGECACHE_ANY_MTIME, PA_PAGECACHE_ANY_MTIME, PA_PAGECACHE_ANY_MTIME,
                        (int64_t)stm.st_mtim.tv_sec * 1000000000 + stm.st_mtim.tv_nsec + 1,
                        PA_PAGECACHE_ANY_MTIME};
    const char *roots[] = {dir};
    pa_pagecache_count_t before[5];
    pa_pagecache_file_t files[5];
    uint64_t listed = 99;
    pa_pagecache_open_args_t args = {.paths = paths, .expect_size = sizes, .expect_mtime_ns = mtimes,
                                     .roots = roots, .nroots = 1,
                                     .flags = PA_PAGECACHE_WILLNEED | PA_PAGECACHE_LIST_DIRS,
                                     .before = before, .dirs_listed = &listed};
    CHECK_EQ_INT(pa_pagecache_open_many_ex(files, 5, &args), 3);
    CHECK_EQ_INT(listed, 1); /* five files, one directory, read once */
    CHECK_EQ_INT(files[0].open_error, 0);
    CHECK_EQ_INT(files[2].open_error, ESTALE); /* the size differs */
    CHECK_EQ_INT(files[3].open_error, ESTALE); /* the mtime differs */
    CHECK_EQ_INT(files[2].fd, -1);
    CHECK_EQ_INT(before[2].method, PA_PAGECACHE_COUNT_NONE);
    CHECK_EQ_INT(before[4].cached, 4); /* counted before the readahead */
    if (droppable) {
        CHECK_EQ_INT(before[0].cached, 0);
        CHECK_EQ_INT(before[1].cached, 0);
    }
    /* the small range was advised in the pass, the large one left to populate */
    CHECK_EQ_INT(wait_cached(&files[0], 3), 3);
    if (droppable) CHECK_EQ_INT(cached_pages(&files[1]), 0);
    CHECK_EQ_INT(pa_pagecache_warm_many(files, 5, PA_PAGECACHE_POPULATE, 0), 3);
    CHECK_EQ_INT(files[0].warm_method, PA_PAGECACHE_WARM_READ);
    CHECK_EQ_INT(files[1].warm_method, PA_PAGECACHE_WARM_READ); /* reading is the default */
    CHECK_EQ_INT(pa_pagecache_warm_many(files, 5, PA_PAGECACHE_POPULATE | PA_PAGECACHE_MAP, 0), 3);
    CHECK_EQ_INT(files[0].warm_method, PA_PAGECACHE_WARM_READ); /* <= PA_PAGECACHE_READ_MAX */
    CHECK_EQ_INT(files[1].warm_method, PA_PAGECACHE_WARM_POPULATE);
    CHECK_EQ_INT(cached_pages(&files[0]), 3);
    CHECK_EQ_INT(cached_pages(&files[1]), 2 * MiB / page);
    for (int i = 0; i < 5; i++) CHECK_EQ_INT(pa_pagecache_close(&files[i]), 0);
    /* populate is not a flag of the open; a relative root opens nothing */
    args.flags = PA_PAGECACHE_POPULATE;
    CHECK_EQ_INT(pa_pagecache_open_many_ex(files, 5, &args), -EINVAL);
    const char *bad_roots[] = {dir, "relative"};
    args.flags = 0;
    args.roots = bad_roots;
    args.nroots = 2;
    CHECK_EQ_INT(pa_pagecache_open_many_ex(files, 5, &args), 0);
    for (int i = 0; i < 5; i++) {
        CHECK_EQ_INT(files[i].open_error, EINVAL);
        CHECK_EQ_INT(files[i].fd, -1);
        CHECK_EQ_INT(before[i].method, PA_PAGECACHE_COUNT_NONE);
    }
    /* a directory outside the roots is not read (the file in it is refused too) */
    char subdir[512], in_sub[512];
    snprintf(subdir, sizeof(subdir), "%s/sub", dir);
    REQUIRE(mkdir(subdir, 0755) == 0);
    make_file("sub/x.bin", page, in_sub);
    const char *two[] = {small, in_sub};
    const char *sub_roots[] = {subdir};
    pa_pagecache_open_args_t in_roots = {.paths = two, .roots = sub_roots, .nroots = 1,
                                         .flags = PA_PAGECACHE_LIST_DIRS, .dirs_listed = &listed};
    CHECK_EQ_INT(pa_pagecache_open_many_ex(files, 2, &in_roots), 1);
    CHECK_EQ_INT(files[0].open_error, EACCES);
    CHECK_EQ_INT(listed, 1); /* sub, not dir */
    for (int i = 0; i < 2; i++) CHECK_EQ_INT(pa_pagecache_close(&files[i]), 0);
    unlink(in_sub);
    rmdir(subdir);
    /* no roots, no expectations, no counts: every file opens */
    pa_pagecache_open_args_t plain = {.paths = paths};
    CHECK_EQ_INT(pa_pagecache_open_many_ex(files, 5, &plain), 5);
    for (int i = 0; i < 5; i++) CHECK_EQ_INT(pa_pagecache_close(&files[i]), 0);
    unlink(small);
    unlink(big);
    unlink(stale_size);
    unlink(stale_mtime);
    unlink(hot);
}

/* A file this process may not count (not its owner, not writable, not root): the
 * count is marked restricted instead of mincore's "all resident". As root, or for a test
 * binary owned by the caller, the count is a real one. */
static void test_count_permission(void) {
    pa_pagecache_file_t f;
    REQUIRE(pa_pagecache_open(&f, "/proc/self/exe", 0, 0, NULL, 0) == 0);
    struct stat st;
    REQUIRE(fstat(f.fd, &st) == 0);
    pa_pagecache_count_t c;
    CHECK_EQ_INT(pa_pagecache_count(&f, &c), 0);
    bool may = geteuid() == 0 || st.st_uid == geteuid() || faccessat(AT_FDCWD, "/proc/self/exe", W_OK, AT_EACCESS) == 0;
    if (may) {
        CHECK(!c.restricted);
        CHECK(c.method != PA_PAGECACHE_COUNT_NONE);
        CHECK(c.cached > 0); /* the running binary's pages */
    } else {
        CHECK(c.restricted);
        CHECK_EQ_INT(c.method, PA_PAGECACHE_COUNT_NONE);
        CHECK_EQ_INT(c.cached, 0);
    }
    pa_pagecache_close(&f);
}

static void test_chunk_bytes(void) {
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    uint64_t chunk = pa_pagecache_chunk_bytes(fd);
    CHECK(chunk >= 4096 && chunk % 1024 == 0);
    close(fd);
}

int main(void) {
    page = (uint64_t)sysconf(_SC_PAGESIZE);
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/pa-pagecache-XXXXXX", tmp && *tmp ? tmp : "/var/tmp");
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "mkdtemp %s: %s\n", dir, strerror(errno));
        return 1;
    }
    char real[256];
    if (realpath(dir, real)) snprintf(dir, sizeof(dir), "%s", real);
    struct statfs fs;
    droppable = statfs(dir, &fs) == 0 && fs.f_type != TMPFS_MAGIC;
    RUN_TEST(test_open_roots);
    RUN_TEST(test_populate_and_counts);
    RUN_TEST(test_pin_survives_dontneed);
    RUN_TEST(test_mark_and_evict_unmarked);
    RUN_TEST(test_batch);
    RUN_TEST(test_open_many_ex);
    RUN_TEST(test_count_permission);
    RUN_TEST(test_chunk_bytes);
    rmdir(dir);
    TEST_MAIN_END();
}
