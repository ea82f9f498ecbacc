# ---------------------------------------------------------------------------------------
# page-cache warming (prealloc/pagecache.h); included from _native.pyx
#
# A PageCacheFiles owns an array of pa_pagecache_file_t, one per file range. Every call
# loops over the whole set in C without the GIL (one release per batch, not per file).
# The engine's worker, a claiming thread and a releasing thread may call the same set, so
# a mutex makes each call see the array whole: close() can never free what warm() reads.

from libc.stdint cimport int64_t

cdef extern from "prealloc/pagecache.h" nogil:
    uint64_t PA_PAGECACHE_READ_MAX
    uint64_t PA_PAGECACHE_INLINE_MAX
    unsigned PA_PAGECACHE_MAP
    unsigned PA_PAGECACHE_LIST_DIRS
    uint64_t PA_PAGECACHE_ANY_SIZE
    int64_t PA_PAGECACHE_ANY_MTIME

    ctypedef struct pa_pagecache_open_args_t:
        const char *const *paths
        const uint64_t *offsets
        const uint64_t *lengths
        const uint64_t *expect_size
        const int64_t *expect_mtime_ns
        const char *const *roots
        size_t nroots
        unsigned flags
        uint64_t chunk_bytes
        pa_pagecache_count_t *before
        uint64_t *dirs_listed

    int pa_pagecache_open_many_ex(pa_pagecache_file_t *files, size_t n, const pa_pagecache_open_args_t *args)


PAGECACHE_WILLNEED = PA_PAGECACHE_WILLNEED
PAGECACHE_POPULATE = PA_PAGECACHE_POPULATE
PAGECACHE_READ_MAX = PA_PAGECACHE_READ_MAX
PAGECACHE_INLINE_MAX = PA_PAGECACHE_INLINE_MAX

_WARM_METHODS = {0: "none", 1: "willneed", 2: "populate_read", 3: "read"}
_COUNT_METHODS = {0: "none", 1: "cachestat", 2: "mincore"}


@cython.final
cdef class PageCacheFiles:
    """Ranges of files opened for warming (O_NOATIME where permitted, refused outside
    `roots`). Files that cannot be opened stay in the set, closed, with their errno in
    open_errors. Nothing here reads file contents into Python.

    expect_sizes / expect_mtimes_ns (a profile's record; -1 for "any"): a file that differs
    is refused with ESTALE. willneed: issue each file's readahead right after it opened,
    in the same pass (the device reads it while the next file is looked up).
    count_before: count each file's residency in that pass, before its readahead
    (counts_before()). list_dirs: in that pass, read the directory of each file once,
    before its first file is opened and before the large readaheads are queued, so the
    names a program looks up there and that are not in the set (symlinks, failed
    lookups) are found in the cache (directories outside `roots` are not read;
    dirs_listed says how many were)."""

    cdef pa_pagecache_file_t *_files
    cdef readonly uint64_t dirs_listed
    cdef pa_pagecache_count_t *_before
    cdef size_t _n
    cdef pthread_mutex_t _lock
    cdef readonly tuple paths

    def __cinit__(self):
        self._files = NULL
        self._before = NULL
        self._n = 0
        pthread_mutex_init(&self._lock, NULL)

    def __init__(self, paths, offsets=None, lengths=None, roots=None, *, expect_sizes=None,
                 expect_mtimes_ns=None, bint willneed=False, bint count_before=False,
                 bint list_dirs=False):
        encoded = [os.fsencode(p) for p in paths]
        encoded_roots = [os.fsencode(r) for r in (roots or ())]
        cdef size_t n = len(encoded), nroots = len(encoded_roots), i
        if self._files is not NULL:
            raise TypeError("PageCacheFiles is already initialised")
        off = _u64(offsets if offsets is not None else np.zeros(n, dtype=np.uint64))
        lens = _u64(lengths if lengths is not None else np.zeros(n, dtype=np.uint64))
        if len(off) != n or len(lens) != n:
            raise ValueError(f"offsets and lengths must have {n} entries like paths")
        sizes_arr = _expectations(expect_sizes, n, "expect_sizes", np.uint64, PA_PAGECACHE_ANY_SIZE)
        mtimes_arr = _expectations(expect_mtimes_ns, n, "expect_mtimes_ns", np.int64, PA_PAGECACHE_ANY_MTIME)
        cdef const uint64_t[::1] off_view = off
        cdef const uint64_t[::1] len_view = lens
        cdef const uint64_t[::1] size_view = sizes_arr
        cdef const int64_t[::1] mtime_view = mtimes_arr
        cdef pa_pagecache_open_args_t args
        cdef const char **c_paths = <const char **>PyMem_Malloc((n + 1) * sizeof(char *))
        cdef const char **c_roots = <const char **>PyMem_Malloc((nroots + 1) * sizeof(char *))
        cdef pa_pagecache_file_t *files = <pa_pagecache_file_t *>PyMem_Malloc((n + 1) * sizeof(pa_pagecache_file_t))
        cdef pa_pagecache_count_t *before = NULL
        if count_before:
            before = <pa_pagecache_count_t *>PyMem_Malloc((n + 1) * sizeof(pa_pagecache_count_t))
        if c_paths is NULL or c_roots is NULL or files is NULL or (count_before and before is NULL):
            PyMem_Free(c_paths)
            PyMem_Free(c_roots)
            PyMem_Free(files)
            PyMem_Free(before)
            raise MemoryError()
        for i in range(n):
            if b"\0" in encoded[i]:
                PyMem_Free(c_paths)
                PyMem_Free(c_roots)
                PyMem_Free(files)
                PyMem_Free(before)
                raise ValueError(f"path {paths[i]!r} contains a NUL byte")
            c_paths[i] = <const char *>encoded[i]
        for i in range(nroots):
            c_roots[i] = <const char *>encoded_roots[i]
        memset(&args, 0, sizeof(args))
        args.paths = c_paths
        args.offsets = &off_view[0] if n else NULL
        args.lengths = &len_view[0] if n else NULL
        args.expect_size = &size_view[0] if n and expect_sizes is not None else NULL
        args.expect_mtime_ns = &mtime_view[0] if n and expect_mtimes_ns is not None else NULL
        args.roots = c_roots
        args.nroots = nroots
        args.flags = (PA_PAGECACHE_WILLNEED if willneed else 0) | (PA_PAGECACHE_LIST_DIRS if list_dirs else 0)
        args.before = before
        args.dirs_listed = &self.dirs_listed
        with nogil:
            pa_pagecache_open_many_ex(files, n, &args)
        PyMem_Free(c_paths)
        PyMem_Free(c_roots)
        self._files = files
        self._before = before
        self._n = n
        self.paths = tuple(os.fsdecode(p) for p in encoded)

    def __dealloc__(self):
        cdef size_t i
        if self._files is not NULL:
            for i in range(self._n):
                pa_pagecache_close(&self._files[i])
            PyMem_Free(self._files)
            self._files = NULL
        PyMem_Free(self._before)
        self._before = NULL
        pthread_mutex_destroy(&self._lock)

    def __len__(self):
        return self._n

    def warm(self, *, bint willneed=True, bint populate=True, uint64_t chunk_bytes=0,
             Py_ssize_t start=0, stop=None, bint mapped=False):
        """Warms every open file of [start, stop): WILLNEED first (asynchronous, chunked;
        with populate, not for whole files over PAGECACHE_INLINE_MAX bytes), then
        populate each (resident on return: a pread into a reused buffer, or with mapped
        MADV_POPULATE_READ for ranges over PAGECACHE_READ_MAX bytes). Returns how many
        warmed without error."""
        cdef unsigned flags = ((PA_PAGECACHE_WILLNEED if willneed else 0) | (PA_PAGECACHE_POPULATE if populate else 0)
                               | (PA_PAGECACHE_MAP if mapped else 0))
        cdef Py_ssize_t end = <Py_ssize_t>self._n if stop is None else stop
        if start < 0 or end < start or end > <Py_ssize_t>self._n:
            raise ValueError(f"start and stop must satisfy 0 <= start <= stop <= {self._n}, not {start}, {stop}")
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self._lock)
            rc = pa_pagecache_warm_many(self._files + start, <size_t>(end - start), flags, chunk_bytes)
            pthread_mutex_unlock(&self._lock)
        return _check(rc, "pa_pagecache_warm_many")

    def counts(self):
        """(pages, methods, restricted): pages is an (n, 5) uint64 array of cached, dirty,
        writeback, evicted, recently_evicted pages per file; methods the counting method
        of each ("cachestat", "mincore", "none" for a closed file); restricted[i] True where
        the kernel does not reveal the file's page-cache state to this process (not its
        owner, not writable, no CAP_SYS_ADMIN): its counts are 0, not measured."""
        cdef pa_pagecache_count_t *out = <pa_pagecache_count_t *>PyMem_Malloc((self._n + 1) * sizeof(pa_pagecache_count_t))
        if out is NULL:
            raise MemoryError()
        with nogil:
            pthread_mutex_lock(&self._lock)
            pa_pagecache_count_many(self._files, self._n, out)
            pthread_mutex_unlock(&self._lock)
        try:
            return _count_triple(out, self._n)
        finally:
            PyMem_Free(out)

    def counts_before(self):
        """counts() as taken when the files were opened, before any readahead of theirs
        (count_before=True); None when not asked for."""
        if self._before is NULL:
            return None
        return _count_triple(self._before, self._n)

    def pin(self, uint64_t budget_bytes):
        """Pins (mlock) files in order while budget_bytes lasts; a file that does not fit
        whole is pinned in part. Returns the bytes pinned; pin_errors says why less."""
        cdef size_t i
        cdef uint64_t left = budget_bytes, total = 0
        cdef int rc = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n):
                if self._files[i].fd < 0:
                    continue
                rc = pa_pagecache_pin(&self._files[i], left)
                if rc != 0:
                    break
                left -= self._files[i].pinned_bytes
                total += self._files[i].pinned_bytes
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_pagecache_pin")
        return total

    def unpin(self):
        cdef size_t i
        cdef int rc = 0, one
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n):
                one = pa_pagecache_unpin(&self._files[i])
                if rc == 0:
                    rc = one
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_pagecache_unpin")

    def mark(self):
        """Records each open file's per-page residency now (for evict(only_unmarked))."""
        cdef size_t i
        cdef int rc = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n):
                if self._files[i].fd >= 0:
                    rc = pa_pagecache_mark(&self._files[i])
                    if rc != 0:
                        break
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_pagecache_mark")

    def evict(self, *, bint only_unmarked=True):
        """POSIX_FADV_DONTNEED over every open file (only the pages not resident at
        mark time by default). Returns the bytes advised."""
        cdef size_t i
        cdef int rc = 0
        cdef uint64_t one = 0, total = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n):
                if self._files[i].fd >= 0:
                    rc = pa_pagecache_evict(&self._files[i], only_unmarked, &one)
                    if rc != 0:
                        break
                    total += one
            pthread_mutex_unlock(&self._lock)
        _check(rc, "pa_pagecache_evict")
        return total

    def close(self):
        """Unpins, unmaps and closes every file. Idempotent."""
        cdef size_t i
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n):
                pa_pagecache_close(&self._files[i])
            pthread_mutex_unlock(&self._lock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef list _field(self, int which):
        cdef size_t i
        cdef pa_pagecache_file_t *f
        out = []
        with nogil:
            pthread_mutex_lock(&self._lock)
        try:
            for i in range(self._n):
                f = &self._files[i]
                if which == 0:
                    out.append(f.size)
                elif which == 1:
                    out.append(f.offset)
                elif which == 2:
                    out.append(f.length)
                elif which == 3:
                    out.append(f.open_error)
                elif which == 4:
                    out.append(bool(f.noatime))
                elif which == 5:
                    out.append(_WARM_METHODS.get(f.warm_method, str(f.warm_method)))
                elif which == 6:
                    out.append(f.warm_error)
                elif which == 7:
                    out.append(f.pinned_bytes)
                elif which == 8:
                    out.append(f.pin_error)
                else:
                    out.append(f.fd >= 0)
        finally:
            pthread_mutex_unlock(&self._lock)
        return out

    @property
    def sizes(self):
        """File sizes at open (0 for a file that did not open)."""
        return self._field(0)

    @property
    def offsets(self):
        return self._field(1)

    @property
    def lengths(self):
        """Bytes of each range (clamped to the file)."""
        return self._field(2)

    @property
    def open_errors(self):
        return self._field(3)

    @property
    def noatime(self):
        return self._field(4)

    @property
    def warm_methods(self):
        return self._field(5)

    @property
    def warm_errors(self):
        return self._field(6)

    @property
    def pinned_bytes(self):
        return self._field(7)

    @property
    def pin_errors(self):
        return self._field(8)

    @property
    def is_open(self):
        return self._field(9)


cdef object _expectations(values, size_t n, str name, dtype, any_value):
    """values as a contiguous array of n entries, -1 (or None) meaning "any"."""
    if values is None:
        return np.zeros(n, dtype=dtype)
    items = list(values)
    if len(items) != n:
        raise ValueError(f"{name} must have {n} entries like paths")
    for i, v in enumerate(items):
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == -1):
            items[i] = any_value
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}[{i}] must be an int >= 0 or -1 (any), not {v!r}")
    return np.ascontiguousarray(np.array(items, dtype=dtype))


cdef object _count_triple(const pa_pagecache_count_t *out, size_t n):
    pages = np.zeros((n, 5), dtype=np.uint64)
    cdef uint64_t[:, ::1] view = pages
    cdef size_t i
    for i in range(n):
        view[i, 0] = out[i].cached
        view[i, 1] = out[i].dirty
        view[i, 2] = out[i].writeback
        view[i, 3] = out[i].evicted
        view[i, 4] = out[i].recently_evicted
    methods = [_COUNT_METHODS.get(out[i].method, str(out[i].method)) for i in range(n)]
    restricted = [bool(out[i].restricted) for i in range(n)]
    return pages, methods, restricted


def pagecache_cachestat(int fd, uint64_t offset=0, uint64_t length=0):
    """cachestat(2) of a range of fd: (cached, dirty, writeback, evicted,
    recently_evicted) pages. OSError ENOSYS where the kernel lacks it, EPERM where it
    refuses; length 0 = to the end of the file."""
    cdef pa_pagecache_count_t c
    cdef int rc
    cdef uint64_t end = length
    if length == 0:
        size = os.fstat(fd).st_size
        end = size - offset if size > offset else 0
    with nogil:
        rc = pa_pagecache_cachestat(fd, offset, end, &c)
    _check(rc, "pa_pagecache_cachestat")
    return (c.cached, c.dirty, c.writeback, c.evicted, c.recently_evicted)


def pagecache_mincore(int fd, uint64_t offset=0, uint64_t length=0):
    """Pages of a range of fd in the page cache by mincore(2) over a temporary mapping
    (length 0 = to the end of the file)."""
    cdef pa_pagecache_count_t c
    cdef int rc
    cdef uint64_t end = length
    if length == 0:
        size = os.fstat(fd).st_size
        end = size - offset if size > offset else 0
    with nogil:
        rc = pa_pagecache_mincore(fd, offset, end, &c)
    _check(rc, "pa_pagecache_mincore")
    return c.cached


def pagecache_chunk_bytes(int fd):
    """The most bytes one POSIX_FADV_WILLNEED on fd's device reads."""
    return pa_pagecache_chunk_bytes(fd)
