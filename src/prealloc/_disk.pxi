# ---------------------------------------------------------------------------------------
# disk space and I/O priority (prealloc/disk.h); included from _native.pyx
#
# A DiskReservation owns one pa_disk_reservation_t. Its calls may run on several threads
# (the engine's worker and a claiming thread), and every system call runs without the
# GIL, so a mutex makes each call see the struct whole: a release can never close the
# descriptor a resize is using.

DISK_KEEP_SIZE = PA_DISK_KEEP_SIZE
DISK_TMPFILE = PA_DISK_TMPFILE
IOPRIO_CLASS_NONE = PA_IOPRIO_CLASS_NONE
IOPRIO_CLASS_RT = PA_IOPRIO_CLASS_RT
IOPRIO_CLASS_BE = PA_IOPRIO_CLASS_BE
IOPRIO_CLASS_IDLE = PA_IOPRIO_CLASS_IDLE
IOPRIO_LEVELS = PA_IOPRIO_LEVELS


@cython.final
cdef class DiskReservation:
    """Space reserved with fallocate on the filesystem of a directory (see disk.h).
    Made by _reserve_disk; released by release() or when garbage collected."""

    cdef pa_disk_reservation_t _r
    cdef pthread_mutex_t _lock

    def __cinit__(self):
        self._r.fd = -1
        self._r.bytes = 0
        self._r.flags = 0
        self._r.named = False
        self._r.path[0] = 0
        pthread_mutex_init(&self._lock, NULL)

    def __dealloc__(self):
        pa_disk_release(&self._r)
        pthread_mutex_destroy(&self._lock)

    @staticmethod
    cdef DiskReservation _create(bytes directory, bytes name, uint64_t nbytes, unsigned flags):
        cdef DiskReservation self = DiskReservation.__new__(DiskReservation)
        cdef const char *c_dir = directory
        cdef const char *c_name = name
        cdef int rc
        with nogil:
            rc = pa_disk_reserve(c_dir, c_name, nbytes, flags, &self._r)
        _check(rc, "pa_disk_reserve")
        return self

    def resize(self, uint64_t nbytes):
        """Grows (fallocate) or shrinks (punch-hole / truncate) the reserved range."""
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_disk_resize(&self._r, nbytes)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_disk_resize")

    def link(self, path):
        """Names an unnamed (O_TMPFILE) reservation at path."""
        cdef bytes c_path = os.fsencode(path)
        cdef const char *p = c_path
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_disk_link(&self._r, p)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_disk_link")

    def detach(self):
        """Hands the descriptor over (the caller closes it); the name, if any, is no
        longer unlinked by release."""
        cdef int fd = -1
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_disk_detach(&self._r, &fd)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_disk_detach")
        return fd

    def release(self):
        """Unlinks the file if its name is ours and closes it. Idempotent."""
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_disk_release(&self._r)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_disk_release")

    def allocated_bytes(self):
        """st_blocks x 512 of the file now (0 once released)."""
        cdef uint64_t out = 0
        cdef int rc = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            if self._r.fd >= 0:
                rc = pa_disk_allocated(self._r.fd, &out)
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_disk_allocated")
        return out

    @property
    def fd(self):
        return None if self._r.fd < 0 else self._r.fd

    @property
    def size(self):
        return self._r.bytes

    @property
    def path(self):
        return os.fsdecode(<bytes>self._r.path) if self._r.path[0] else None

    @property
    def named(self):
        return bool(self._r.named)

    @property
    def unnamed(self):
        return self._r.fd >= 0 and (self._r.flags & PA_DISK_TMPFILE) != 0

    @property
    def keep_size(self):
        return (self._r.flags & PA_DISK_KEEP_SIZE) != 0

    @property
    def released(self):
        return self._r.fd < 0


def _reserve_disk(directory, name, uint64_t nbytes, unsigned flags):
    """pa_disk_reserve: nbytes on the filesystem of directory (name: the file's name when
    it cannot be, or is not asked to be, an O_TMPFILE)."""
    return DiskReservation._create(os.fsencode(directory), os.fsencode(name or ""), nbytes, flags)


def disk_space(path):
    """statvfs + st_dev of path: (total, free, available, block_size, device) in bytes."""
    cdef bytes c_path = os.fsencode(path)
    cdef const char *p = c_path
    cdef pa_disk_space_t space
    cdef int rc
    with nogil:
        rc = pa_disk_space(p, &space)
    _check(rc, "pa_disk_space")
    return (space.total, space.free, space.available, space.block_size, space.device)


def disk_allocated(int fd):
    """st_blocks x 512 of an open file."""
    cdef uint64_t out = 0
    cdef int rc
    with nogil:
        rc = pa_disk_allocated(fd, &out)
    _check(rc, "pa_disk_allocated")
    return out


def disk_fallocate(int fd, int mode, uint64_t offset, uint64_t length):
    """The fallocate system call itself (never glibc's emulation)."""
    cdef int rc
    with nogil:
        rc = pa_disk_fallocate(fd, mode, offset, length)
    _check(rc, "pa_disk_fallocate")


def ioprio_get(pid_t tid=0):
    """The raw I/O priority of one thread (class << 13 | level; 0 = the calling thread)."""
    cdef int out = 0
    cdef int rc
    with nogil:
        rc = pa_ioprio_get(tid, &out)
    _check(rc, "pa_ioprio_get")
    return out


def ioprio_set(pid_t tid, int value):
    """Sets the raw I/O priority of one thread (0 = the calling thread)."""
    cdef int rc
    with nogil:
        rc = pa_ioprio_set(tid, value)
    _check(rc, "pa_ioprio_set")
