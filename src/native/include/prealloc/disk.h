/*
 * prealloc/disk.h — disk space reserved ahead of need (fallocate) and I/O priority
 * (ioprio_set).
 *
 * Design
 * ------
 * Space. A reservation is a file on the filesystem of a directory whose blocks are
 * allocated with fallocate(2) before anyone writes: once the call returns, the first
 * `bytes` bytes of writes into that file cannot fail with ENOSPC, whoever fills the
 * filesystem meanwhile, and the filesystem's free space (statvfs f_bavail) has already
 * dropped by that much, so other writers see ENOSPC first. PA_DISK_KEEP_SIZE allocates
 * beyond end of file (FALLOC_FL_KEEP_SIZE): the consumer gets an empty file whose
 * appends land in reserved blocks; without it the file's size is `bytes` (zero-reading
 * unwritten extents).
 *
 * We call the fallocate system call itself, never glibc's posix_fallocate: where the
 * filesystem lacks fallocate, posix_fallocate silently falls back to writing one byte per
 * block from user space, which is slow, not atomic against other writers, and wrong for
 * KEEP_SIZE. We return -EOPNOTSUPP instead and the caller says "not supported on this
 * filesystem".
 *
 * The file is created with O_CLOEXEC and mode 0600 (the reservation is ours until it is
 * handed over; a child we exec must not inherit it). PA_DISK_TMPFILE tries O_TMPFILE
 * first: an unnamed inode whose blocks the kernel frees when the last descriptor closes,
 * so a crash of the holder leaves nothing behind; pa_disk_link names it (linkat through
 * /proc/self/fd, which needs no CAP_DAC_READ_SEARCH) at the moment of hand-over. A
 * filesystem without O_TMPFILE (EOPNOTSUPP / EISDIR / EINVAL from open) gets a named file
 * instead — which outlives a crash, so the caller journals its path before creating it.
 *
 * Resize: growing fallocates [old, new) (-ENOSPC leaves the reservation as it was: the
 * kernel may have allocated part of the range, which we punch out again); shrinking
 * punches [new, old) out (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) and, without KEEP_SIZE,
 * truncates the file to the new size. Release unlinks a named file we still own and
 * closes the descriptor; the kernel frees the blocks when the last descriptor goes.
 *
 * Priority. ioprio_set/ioprio_get by system call (glibc has no wrappers). The kernel
 * keeps one I/O priority per thread (IOPRIO_WHO_PROCESS acts on one tid), so "a
 * process's priority" is one call per thread; the loop over /proc/PID/task and the
 * saving of previous values live with the caller, like affinity's journal. Whether the
 * priority does anything is the block device's scheduler's business: `none` ignores it,
 * mq-deadline honours the class (RT before BE before IDLE), bfq the class and the level.
 *
 * Complexity and progress: every call is O(1) system calls and blocking (fallocate may
 * take milliseconds on a big range). No state is shared between reservations; a
 * reservation struct is owned by its caller and not thread-safe by itself.
 *
 * Limits: the path of a named reservation fits PA_DISK_PATH_MAX bytes; sizes are whole
 * bytes (the filesystem rounds allocation up to its block size).
 */
#ifndef PREALLOC_DISK_H
#define PREALLOC_DISK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_DISK_PATH_MAX 4096

/* flags of pa_disk_reserve */
#define PA_DISK_KEEP_SIZE 0x1u /* allocate beyond EOF: the file stays empty */
#define PA_DISK_TMPFILE 0x2u   /* O_TMPFILE first (unnamed until pa_disk_link) */

typedef struct pa_disk_reservation {
    int fd;            /* -1 once released or detached */
    uint64_t bytes;    /* the reserved range [0, bytes) */
    unsigned flags;    /* PA_DISK_KEEP_SIZE, and PA_DISK_TMPFILE when the file is unnamed */
    bool named;        /* path names the file and we own that name (unlinked on release) */
    char path[PA_DISK_PATH_MAX]; /* the file's path once named; "" while unnamed */
} pa_disk_reservation_t;

/* Reserves `bytes` on the filesystem of `directory`: creates the file (O_TMPFILE when
 * PA_DISK_TMPFILE is set and the filesystem has it, else directory/name, which must not
 * exist: O_EXCL) and fallocates [0, bytes). On failure nothing is left behind.
 * out->flags says whether the file ended up unnamed (PA_DISK_TMPFILE set) or named.
 * -EINVAL (bytes 0, name NULL/empty/with a '/' when a named file is needed, path too
 * long), -ENOSPC, -EOPNOTSUPP (the filesystem has no fallocate), -EEXIST, -EACCES,
 * -ENOENT (no such directory). */
PA_API int pa_disk_reserve(const char *directory, const char *name, uint64_t bytes, unsigned flags,
                           pa_disk_reservation_t *out);

/* Grows or shrinks the reserved range to `bytes` (see the design). -EINVAL for 0 or a
 * released reservation; -ENOSPC on growth leaves it unchanged. */
PA_API int pa_disk_resize(pa_disk_reservation_t *r, uint64_t bytes);

/* Names an unnamed (O_TMPFILE) reservation at `path` (must not exist). Named ones answer
 * -EALREADY. -EEXIST, -ENOENT, -EXDEV (another filesystem) as linkat does. */
PA_API int pa_disk_link(pa_disk_reservation_t *r, const char *path);

/* Gives up ownership: *fd_out receives the descriptor (the caller closes it) and the
 * name, if any, is no longer ours to unlink. The reservation is then released. */
PA_API int pa_disk_detach(pa_disk_reservation_t *r, int *fd_out);

/* Unlinks the file if we own its name, closes the descriptor. Idempotent. Returns the
 * first error other than ENOENT (the name was removed by someone else). */
PA_API int pa_disk_release(pa_disk_reservation_t *r);

/* Bytes of blocks the file really holds (st_blocks x 512). */
PA_API int pa_disk_allocated(int fd, uint64_t *out);

/* fallocate(2) itself: mode as the kernel takes it (FALLOC_FL_*). */
PA_API int pa_disk_fallocate(int fd, int mode, uint64_t offset, uint64_t len);

typedef struct pa_disk_space {
    uint64_t total;     /* f_blocks x f_frsize */
    uint64_t free;      /* f_bfree x f_frsize (root's view) */
    uint64_t available; /* f_bavail x f_frsize (what an unprivileged writer gets) */
    uint64_t block_size; /* f_frsize */
    uint64_t device;    /* st_dev of the path */
} pa_disk_space_t;

/* statvfs + stat of path. */
PA_API int pa_disk_space(const char *path, pa_disk_space_t *out);

/* ---- I/O priority ---- */

#define PA_IOPRIO_CLASS_NONE 0
#define PA_IOPRIO_CLASS_RT 1
#define PA_IOPRIO_CLASS_BE 2
#define PA_IOPRIO_CLASS_IDLE 3
#define PA_IOPRIO_LEVELS 8 /* levels 0 (highest) .. 7 */
#define PA_IOPRIO_CLASS_SHIFT 13
#define PA_IOPRIO_VALUE(cls, level) (((cls) << PA_IOPRIO_CLASS_SHIFT) | (level))
#define PA_IOPRIO_CLASS_OF(value) ((value) >> PA_IOPRIO_CLASS_SHIFT)
#define PA_IOPRIO_LEVEL_OF(value) ((value) & ((1 << PA_IOPRIO_CLASS_SHIFT) - 1))

/* The I/O priority of one thread (tid; 0 = the calling thread): IOPRIO_WHO_PROCESS.
 * A thread never given one answers class NONE. -ESRCH, -EPERM. */
PA_API int pa_ioprio_get(pid_t tid, int *out);
/* -EINVAL (bad class or level), -EPERM (RT without CAP_SYS_ADMIN, or another user's
 * thread), -ESRCH. */
PA_API int pa_ioprio_set(pid_t tid, int value);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_DISK_H */
