/*
 * test_disk.c — space reservations and I/O priority, checked through the kernel:
 * st_blocks / st_size / st_mode / FD_CLOEXEC of the file, the directory's entries,
 * statvfs of a small tmpfs the test mounts (root only; the ENOSPC checks need a
 * filesystem small enough to fill, and are skipped with a message otherwise), and
 * ioprio_get for priorities.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pa_test.h"
#include "prealloc/disk.h"

#define MIB (1024u * 1024u)

static char scratch[256];

static void make_scratch(void) {
    const char *base = getenv("TMPDIR");
    snprintf(scratch, sizeof(scratch), "%s/pa-test-disk-XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(scratch)) {
        perror("mkdtemp");
        exit(2);
    }
}

static int entries_in(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static uint64_t blocks_of(int fd) {
    uint64_t b = 0;
    if (pa_disk_allocated(fd, &b) < 0) return UINT64_MAX;
    return b;
}

static off_t size_of(int fd) {
    struct stat st;
    return fstat(fd, &st) < 0 ? -1 : st.st_size;
}

static void test_named_reservation_holds_blocks(void) {
    pa_disk_reservation_t r;
    REQUIRE(pa_disk_reserve(scratch, "named", 4 * MIB, 0, &r) == 0);
    CHECK(r.named && r.fd >= 0 && !(r.flags & PA_DISK_TMPFILE));
    CHECK(blocks_of(r.fd) >= 4 * MIB);
    CHECK_EQ_INT(size_of(r.fd), 4 * MIB);
    struct stat st;
    CHECK(stat(r.path, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(fcntl(r.fd, F_GETFD) & FD_CLOEXEC);
    /* the name exists exactly once: O_EXCL refuses a second */
    pa_disk_reservation_t again;
    CHECK_EQ_INT(pa_disk_reserve(scratch, "named", MIB, 0, &again), -EEXIST);
    char path[PA_DISK_PATH_MAX];
    strcpy(path, r.path);
    CHECK_EQ_INT(pa_disk_release(&r), 0);
    CHECK(r.fd == -1 && access(path, F_OK) != 0);
    CHECK_EQ_INT(pa_disk_release(&r), 0); /* idempotent */
    CHECK_EQ_INT(entries_in(scratch), 0);
}

static void test_keep_size_file_stays_empty(void) {
    pa_disk_reservation_t r;
    REQUIRE(pa_disk_reserve(scratch, "keep", 2 * MIB, PA_DISK_KEEP_SIZE, &r) == 0);
    CHECK_EQ_INT(size_of(r.fd), 0);
    CHECK(blocks_of(r.fd) >= 2 * MIB);
    /* appends land in the reserved blocks: the allocation does not grow */
    uint64_t before = blocks_of(r.fd);
    char buf[4096];
    memset(buf, 'x', sizeof(buf));
    for (int i = 0; i < 256; i++) CHECK(write(r.fd, buf, sizeof(buf)) == (ssize_t)sizeof(buf));
    CHECK_EQ_INT(size_of(r.fd), 1 * MIB);
    CHECK_EQ_INT(blocks_of(r.fd), before);
    CHECK_EQ_INT(pa_disk_release(&r), 0);
}

static void test_tmpfile_is_unnamed_until_linked(void) {
    pa_disk_reservation_t r;
    REQUIRE(pa_disk_reserve(scratch, "fallback", 2 * MIB, PA_DISK_TMPFILE, &r) == 0);
    if (!(r.flags & PA_DISK_TMPFILE)) {
        fprintf(stderr, "  (no O_TMPFILE on %s: got a named file)\n", scratch);
        CHECK(r.named);
        pa_disk_release(&r);
        return;
    }
    CHECK_EQ_INT(entries_in(scratch), 0);
    CHECK(blocks_of(r.fd) >= 2 * MIB);
    char path[PA_DISK_PATH_MAX];
    snprintf(path, sizeof(path), "%s/linked", scratch);
    CHECK_EQ_INT(pa_disk_link(&r, path), 0);
    CHECK(r.named && !(r.flags & PA_DISK_TMPFILE) && strcmp(r.path, path) == 0);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (uint64_t)st.st_blocks * 512 >= 2 * MIB && (st.st_mode & 0777) == 0600);
    CHECK_EQ_INT(pa_disk_link(&r, path), -EALREADY);
    /* detach: the consumer owns fd and name; release no longer unlinks */
    int fd = -1;
    CHECK_EQ_INT(pa_disk_detach(&r, &fd), 0);
    CHECK(fd >= 0 && r.fd == -1);
    CHECK_EQ_INT(pa_disk_release(&r), 0);
    CHECK(access(path, F_OK) == 0);
    close(fd);
    unlink(path);
}

static void test_resize_grows_and_shrinks_blocks(void) {
    for (unsigned flags = 0; flags <= PA_DISK_KEEP_SIZE; flags += PA_DISK_KEEP_SIZE) {
        pa_disk_reservation_t r;
        REQUIRE(pa_disk_reserve(scratch, "resize", 2 * MIB, flags, &r) == 0);
        CHECK_EQ_INT(pa_disk_resize(&r, 6 * MIB), 0);
        CHECK(blocks_of(r.fd) >= 6 * MIB);
        CHECK_EQ_INT(size_of(r.fd), flags ? 0 : 6 * MIB);
        CHECK_EQ_INT(pa_disk_resize(&r, 1 * MIB), 0);
        /* allow one extra block of metadata / rounding */
        CHECK(blocks_of(r.fd) >= 1 * MIB && blocks_of(r.fd) < 1 * MIB + 64 * 1024);
        CHECK_EQ_INT(size_of(r.fd), flags ? 0 : 1 * MIB);
        CHECK_EQ_INT(r.bytes, 1 * MIB);
        CHECK_EQ_INT(pa_disk_resize(&r, 0), -EINVAL);
        CHECK_EQ_INT(pa_disk_release(&r), 0);
        CHECK_EQ_INT(pa_disk_resize(&r, MIB), -EINVAL);
    }
}

static void test_bad_arguments(void) {
    pa_disk_reservation_t r;
    CHECK_EQ_INT(pa_disk_reserve(scratch, "x", 0, 0, &r), -EINVAL);
    CHECK_EQ_INT(pa_disk_reserve(scratch, "a/b", MIB, 0, &r), -EINVAL);
    CHECK_EQ_INT(pa_disk_reserve(scratch, "", MIB, 0, &r), -EINVAL);
    CHECK_EQ_INT(pa_disk_reserve(scratch, "x", MIB, 0x80, &r), -EINVAL);
    CHECK_EQ_INT(pa_disk_reserve("/nonexistent-pa-dir", "x", MIB, 0, &r), -ENOENT);
    CHECK_EQ_INT(entries_in(scratch), 0);
    pa_disk_space_t s;
    CHECK_EQ_INT(pa_disk_space("/nonexistent-pa-dir", &s), -ENOENT);
    CHECK_EQ_INT(pa_disk_fallocate(-1, 0, 0, MIB), -EBADF);
}

/* On a 16 MiB tmpfs: statvfs moves by the reservation, and a reservation bigger than
 * what is free fails with ENOSPC and leaves the free space as it was. */
static void test_statvfs_and_enospc_on_small_tmpfs(void) {
    if (geteuid() != 0) {
        fprintf(stderr, "  (skipped: mounting a small tmpfs needs root)\n");
        return;
    }
    char mnt[300];
    snprintf(mnt, sizeof(mnt), "%s/mnt", scratch);
    REQUIRE(mkdir(mnt, 0700) == 0);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=16m") < 0) {
        fprintf(stderr, "  (skipped: mount tmpfs: %s)\n", strerror(errno));
        rmdir(mnt);
        return;
    }
    pa_disk_space_t before, held, after;
    CHECK_EQ_INT(pa_disk_space(mnt, &before), 0);
    CHECK_EQ_INT(before.total, 16 * MIB);
    pa_disk_reservation_t r;
    CHECK_EQ_INT(pa_disk_reserve(mnt, "r", 10 * MIB, PA_DISK_KEEP_SIZE, &r), 0);
    CHECK_EQ_INT(pa_disk_space(mnt, &held), 0);
    CHECK_EQ_INT(before.available - held.available, 10 * MIB);
    pa_disk_reservation_t big;
    CHECK_EQ_INT(pa_disk_reserve(mnt, "big", 8 * MIB, 0, &big), -ENOSPC);
    CHECK_EQ_INT(pa_disk_resize(&r, 20 * MIB), -ENOSPC);
    CHECK_EQ_INT(r.bytes, 10 * MIB);
    CHECK_EQ_INT(pa_disk_space(mnt, &after), 0);
    CHECK_EQ_INT(after.available, held.available); /* the failures left nothing allocated */
    CHECK_EQ_INT(entries_in(mnt), 1);
    CHECK_EQ_INT(pa_disk_resize(&r, 4 * MIB), 0);
    CHECK_EQ_INT(pa_disk_space(mnt, &after), 0);
    CHECK_EQ_INT(before.available - after.available, 4 * MIB);
    CHECK_EQ_INT(pa_disk_release(&r), 0);
    CHECK_EQ_INT(pa_disk_space(mnt, &after), 0);
    CHECK_EQ_INT(after.available, before.available);
    CHECK(umount(mnt) == 0);
    rmdir(mnt);
}

static void test_ioprio_of_this_thread(void) {
    int saved = -1, now = -1;
    REQUIRE(pa_ioprio_get(0, &saved) == 0);
    CHECK_EQ_INT(pa_ioprio_set(0, PA_IOPRIO_VALUE(PA_IOPRIO_CLASS_BE, 5)), 0);
    CHECK_EQ_INT(pa_ioprio_get((pid_t)syscall(SYS_gettid), &now), 0);
    CHECK_EQ_INT(now, PA_IOPRIO_VALUE(PA_IOPRIO_CLASS_BE, 5));
    CHECK_EQ_INT(PA_IOPRIO_CLASS_OF(now), PA_IOPRIO_CLASS_BE);
    CHECK_EQ_INT(PA_IOPRIO_LEVEL_OF(now), 5);
    CHECK_EQ_INT(pa_ioprio_set(0, PA_IOPRIO_VALUE(4, 0)), -EINVAL);
    CHECK_EQ_INT(pa_ioprio_set(0, PA_IOPRIO_VALUE(PA_IOPRIO_CLASS_BE, 8)), -EINVAL);
    int rt = pa_ioprio_set(0, PA_IOPRIO_VALUE(PA_IOPRIO_CLASS_RT, 2));
    if (geteuid() == 0) CHECK_EQ_INT(rt, 0);
    else CHECK(rt == -EPERM || rt == 0); /* CAP_SYS_NICE alone also allows RT on new kernels */
    CHECK_EQ_INT(pa_ioprio_get(0, &now), 0);
    if (rt == 0) CHECK_EQ_INT(now, PA_IOPRIO_VALUE(PA_IOPRIO_CLASS_RT, 2));
    CHECK_EQ_INT(pa_ioprio_set(0, saved), 0);
    CHECK_EQ_INT(pa_ioprio_get(0, &now), 0);
    CHECK_EQ_INT(now, saved);
    CHECK_EQ_INT(pa_ioprio_get(0x7ffffff0, &now), -ESRCH);
}

int main(void) {
    make_scratch();
    RUN_TEST(test_named_reservation_holds_blocks);
    RUN_TEST(test_keep_size_file_stays_empty);
    RUN_TEST(test_tmpfile_is_unnamed_until_linked);
    RUN_TEST(test_resize_grows_and_shrinks_blocks);
    RUN_TEST(test_bad_arguments);
    RUN_TEST(test_statvfs_and_enospc_on_small_tmpfs);
    RUN_TEST(test_ioprio_of_this_thread);
    rmdir(scratch);
    TEST_MAIN_END();
}
