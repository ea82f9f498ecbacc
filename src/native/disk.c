/*
 * disk.c — disk space reservations (fallocate) and I/O priority (ioprio).
 *
 * The design lives in prealloc/disk.h; this comment adds what the implementation decides.
 *
 * O_TMPFILE. Kernels and filesystems without it answer EOPNOTSUPP (filesystem), EISDIR
 * (a kernel that predates the flag and sees O_DIRECTORY's bits) or EINVAL; any of those
 * falls back to a named file. Other errors (EACCES, ENOENT, ENOSPC) are the directory's
 * and are returned as they are.
 *
 * Growth that fails. fallocate may allocate part of a range before answering ENOSPC, and
 * those blocks stay allocated. A failed grow punches [old, new) out again so "nothing
 * changes" holds for the space, not only for our record; a failed reserve releases the
 * file entirely.
 *
 * Shrink. A file whose size is the reservation (no KEEP_SIZE) is punched
 * (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE, the kernel's rule) and truncated to the new size,
 * which alone frees the tail where punch-hole is missing. A KEEP_SIZE range lies beyond
 * EOF, and ext4 ignores punches there (ext4_punch_hole returns early past i_size), so we
 * truncate to the current size instead — which frees *every* block past EOF on every
 * filesystem — and fallocate [EOF, new) again. Between the two calls another writer may
 * take the space we just freed; the re-fallocate then answers ENOSPC and the reservation
 * holds only up to EOF (r->bytes says so). That window is the price of KEEP_SIZE shrink.
 *
 * Linking an O_TMPFILE: linkat(AT_FDCWD, "/proc/self/fd/N", AT_FDCWD, path,
 * AT_SYMLINK_FOLLOW) — the open(2) manual's recipe; AT_EMPTY_PATH would need
 * CAP_DAC_READ_SEARCH.
 */
#define _GNU_SOURCE
#include "prealloc/disk.h"

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define PA__IOPRIO_WHO_PROCESS 1

int pa_disk_fallocate(int fd, int mode, uint64_t offset, uint64_t len) {
    if (offset > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX) return -EINVAL;
    long rc;
    do {
        rc = syscall(SYS_fallocate, fd, mode, (off_t)offset, (off_t)len);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) return errno == ENOTSUP ? -EOPNOTSUPP : -errno;
    return 0;
}

int pa_disk_allocated(int fd, uint64_t *out) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    *out = (uint64_t)st.st_blocks * 512u;
    return 0;
}

int pa_disk_space(const char *path, pa_disk_space_t *out) {
    struct statvfs vfs;
    struct stat st;
    if (statvfs(path, &vfs) < 0) return -errno;
    if (stat(path, &st) < 0) return -errno;
    uint64_t frsize = vfs.f_frsize ? vfs.f_frsize : vfs.f_bsize;
    out->total = (uint64_t)vfs.f_blocks * frsize;
    out->free = (uint64_t)vfs.f_bfree * frsize;
    out->available = (uint64_t)vfs.f_bavail * frsize;
    out->block_size = frsize;
    out->device = (uint64_t)st.st_dev;
    return 0;
}

static void pa__disk_clear(pa_disk_reservation_t *r) {
    r->fd = -1;
    r->bytes = 0;
    r->flags = 0;
    r->named = false;
    r->path[0] = '\0';
}

/* The fallocate mode of the reservation's own range. */
static int pa__disk_mode(const pa_disk_reservation_t *r) {
    return (r->flags & PA_DISK_KEEP_SIZE) ? FALLOC_FL_KEEP_SIZE : 0;
}

int pa_disk_reserve(const char *directory, const char *name, uint64_t bytes, unsigned flags,
                    pa_disk_reservation_t *out) {
    if (!directory || !out || bytes == 0 || bytes > (uint64_t)INT64_MAX) return -EINVAL;
    if (flags & ~(PA_DISK_KEEP_SIZE | PA_DISK_TMPFILE)) return -EINVAL;
    pa__disk_clear(out);
    out->flags = flags & PA_DISK_KEEP_SIZE;
    int fd = -1;
    if (flags & PA_DISK_TMPFILE) {
        fd = open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd >= 0) {
            out->flags |= PA_DISK_TMPFILE;
        } else if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
            return -errno;
        }
    }
    if (fd < 0) {
        if (!name || !name[0] || strchr(name, '/')) return -EINVAL;
        int n = snprintf(out->path, sizeof(out->path), "%s/%s", directory, name);
        if (n < 0 || (size_t)n >= sizeof(out->path)) {
            out->path[0] = '\0';
            return -EINVAL;
        }
        fd = open(out->path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        if (fd < 0) {
            int err = -errno;
            out->path[0] = '\0';
            return err;
        }
        out->named = true;
    }
    out->fd = fd;
    int rc = pa_disk_fallocate(fd, pa__disk_mode(out), 0, bytes);
    if (rc < 0) {
        pa_disk_release(out);
        return rc;
    }
    out->bytes = bytes;
    return 0;
}

/* Frees the blocks of [offset, offset + len) of the reservation's file (see the top). */
static int pa__disk_free_range(pa_disk_reservation_t *r, uint64_t offset, uint64_t len) {
    struct stat st;
    if (fstat(r->fd, &st) < 0) return -errno;
    uint64_t size = (uint64_t)st.st_size;
    if ((r->flags & PA_DISK_KEEP_SIZE) && offset >= size) {
        /* beyond EOF: truncating to the size frees every block past it */
        if (ftruncate(r->fd, (off_t)size) < 0) return -errno;
        return offset > size ? pa_disk_fallocate(r->fd, FALLOC_FL_KEEP_SIZE, size, offset - size) : 0;
    }
    int rc = pa_disk_fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (rc == -EOPNOTSUPP && !(r->flags & PA_DISK_KEEP_SIZE)) rc = 0; /* the truncate after frees it */
    return rc;
}

int pa_disk_resize(pa_disk_reservation_t *r, uint64_t bytes) {
    if (!r || r->fd < 0 || bytes == 0 || bytes > (uint64_t)INT64_MAX) return -EINVAL;
    if (bytes == r->bytes) return 0;
    if (bytes > r->bytes) {
        int rc = pa_disk_fallocate(r->fd, pa__disk_mode(r), r->bytes, bytes - r->bytes);
        if (rc < 0) {
            /* give back what the kernel may have allocated before it ran out */
            (void)pa__disk_free_range(r, r->bytes, bytes - r->bytes);
            if (!(r->flags & PA_DISK_KEEP_SIZE)) (void)ftruncate(r->fd, (off_t)r->bytes);
            return rc;
        }
        r->bytes = bytes;
        return 0;
    }
    int rc = pa__disk_free_range(r, bytes, r->bytes - bytes);
    if (rc == -ENOSPC && (r->flags & PA_DISK_KEEP_SIZE)) {
        struct stat st;
        r->bytes = fstat(r->fd, &st) == 0 ? (uint64_t)st.st_size : 0; /* lost the window */
        return rc;
    }
    if (rc < 0) return rc;
    if (!(r->flags & PA_DISK_KEEP_SIZE) && ftruncate(r->fd, (off_t)bytes) < 0) return -errno;
    r->bytes = bytes;
    return 0;
}

int pa_disk_link(pa_disk_reservation_t *r, const char *path) {
    if (!r || r->fd < 0 || !path || !path[0]) return -EINVAL;
    if (!(r->flags & PA_DISK_TMPFILE)) return -EALREADY;
    if (strlen(path) >= sizeof(r->path)) return -EINVAL;
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", r->fd);
    if (linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW) < 0) return -errno;
    strcpy(r->path, path);
    r->flags &= ~PA_DISK_TMPFILE;
    r->named = true;
    return 0;
}

int pa_disk_detach(pa_disk_reservation_t *r, int *fd_out) {
    if (!r || r->fd < 0 || !fd_out) return -EINVAL;
    *fd_out = r->fd;
    pa__disk_clear(r);
    return 0;
}

int pa_disk_release(pa_disk_reservation_t *r) {
    if (!r) return -EINVAL;
    int first = 0;
    if (r->named && r->path[0] && unlink(r->path) < 0 && errno != ENOENT) first = -errno;
    if (r->fd >= 0 && close(r->fd) < 0 && errno != EINTR && !first) first = -errno;
    pa__disk_clear(r);
    return first;
}

/* ---- I/O priority ---- */

int pa_ioprio_get(pid_t tid, int *out) {
    long rc = syscall(SYS_ioprio_get, PA__IOPRIO_WHO_PROCESS, (int)tid);
    if (rc < 0) return -errno;
    *out = (int)rc;
    return 0;
}

int pa_ioprio_set(pid_t tid, int value) {
    int cls = PA_IOPRIO_CLASS_OF(value), level = PA_IOPRIO_LEVEL_OF(value);
    if (value < 0 || cls > PA_IOPRIO_CLASS_IDLE || level >= PA_IOPRIO_LEVELS) return -EINVAL;
    if (syscall(SYS_ioprio_set, PA__IOPRIO_WHO_PROCESS, (int)tid, value) < 0) return -errno;
    return 0;
}
