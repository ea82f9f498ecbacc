# cython: language_level=3
# The whole C API of the prealloc core, declared once (uvloop style). Every function here
# is safe to call without the GIL.
from libc.stdint cimport uint32_t, uint64_t
from posix.types cimport pid_t


cdef extern from "prealloc/prealloc.h" nogil:
    ctypedef uint64_t pa_id_t

    ctypedef enum pa_status_t:
        PA_STATUS_PENDING
        PA_STATUS_ALLOCATED
        PA_STATUS_ACTIVE
        PA_STATUS_RELEASING
        PA_STATUS_RELEASED
        PA_STATUS_FAILED
        PA_STATUS_EXPIRED

    enum: PA_STATUS_COUNT
    enum: PA_STATUS_FINAL_MASK
    enum: PA_STATUS_LIVE_MASK

    const char *pa_status_name(unsigned status)
    bint pa_status_transition_legal(unsigned frm, unsigned to)
    uint64_t pa_clock_now_ns()

    # ---- table.h ----
    enum: PA_TABLE_MAX_CAPACITY

    ctypedef struct pa_record_t:
        pa_id_t id
        uint32_t status
        uint32_t resource_type
        double requested
        double allocated
        uint64_t created_ns
        uint64_t updated_ns
        uint64_t allocated_ns
        uint64_t active_ns
        uint64_t expires_ns
        uint64_t timer
        uint64_t request_id
        uint64_t owner
        uint64_t user_data

    ctypedef struct pa_record_init_t:
        uint32_t status
        uint32_t resource_type
        double requested
        double allocated
        uint64_t expires_ns
        uint64_t request_id
        uint64_t owner
        uint64_t user_data

    ctypedef struct pa_table_t:
        pass

    int pa_table_create(uint32_t capacity, pa_table_t **out)
    void pa_table_destroy(pa_table_t *table)
    int pa_table_insert(pa_table_t *table, const pa_record_init_t *init, pa_id_t *out_id)
    int pa_table_insert_at(pa_table_t *table, const pa_record_init_t *init, uint64_t now_ns, pa_id_t *out_id)
    int pa_table_transition_at(pa_table_t *table, pa_id_t id, uint32_t from_mask, pa_status_t to,
                               uint64_t now_ns, pa_status_t *prev_out)
    int pa_table_remove(pa_table_t *table, pa_id_t id)
    int pa_table_get(const pa_table_t *table, pa_id_t id, pa_record_t *out)
    int pa_table_status(const pa_table_t *table, pa_id_t id)
    int pa_table_transition(pa_table_t *table, pa_id_t id, uint32_t from_mask, pa_status_t to,
                            pa_status_t *prev_out)
    int pa_table_set_allocated(pa_table_t *table, pa_id_t id, double allocated)
    int pa_table_set_expiry(pa_table_t *table, pa_id_t id, uint64_t expires_ns, uint64_t timer)
    size_t pa_table_live(const pa_table_t *table)
    uint32_t pa_table_capacity(const pa_table_t *table)
    int pa_table_collect(const pa_table_t *table, uint32_t status_mask, pa_id_t *out, size_t max,
                         size_t *count_out)
    void pa_table_count_by_status(const pa_table_t *table, size_t *counts)

    # ---- wheel.h ----
    enum: PA_WHEEL_LEVELS
    enum: PA_WHEEL_SLOTS
    ctypedef uint64_t pa_timer_id_t
    ctypedef void (*pa_timer_fire_fn)(void *ctx, pa_timer_id_t timer, uint64_t value, uint64_t deadline_ns)
    ctypedef void (*pa_expiry_fn)(void *ctx, pa_id_t record, uint64_t deadline_ns)

    ctypedef struct pa_wheel_t:
        pass

    int pa_wheel_create(uint64_t tick_ns, uint64_t start_ns, uint32_t capacity, pa_wheel_t **out)
    void pa_wheel_destroy(pa_wheel_t *wheel)
    int pa_wheel_schedule(pa_wheel_t *wheel, uint64_t deadline_ns, uint64_t value, pa_timer_id_t *out)
    int pa_wheel_cancel(pa_wheel_t *wheel, pa_timer_id_t timer)
    size_t pa_wheel_advance(pa_wheel_t *wheel, uint64_t now_ns, pa_timer_fire_fn fire, void *ctx)
    int pa_wheel_next_wakeup(const pa_wheel_t *wheel, uint64_t *wakeup_ns)
    size_t pa_wheel_pending(const pa_wheel_t *wheel)
    uint64_t pa_wheel_now(const pa_wheel_t *wheel)
    uint64_t pa_wheel_tick_ns(const pa_wheel_t *wheel)

    ctypedef struct pa_ticker_options_t:
        uint64_t tick_ns
        uint32_t timer_capacity
        uint32_t expire_from_mask
        pa_expiry_fn on_expired
        void *on_expired_ctx

    ctypedef struct pa_ticker_t:
        pass

    int pa_ticker_create(pa_table_t *table, const pa_ticker_options_t *options, pa_ticker_t **out)
    void pa_ticker_destroy(pa_ticker_t *ticker)
    int pa_ticker_start(pa_ticker_t *ticker)
    int pa_ticker_stop(pa_ticker_t *ticker)
    int pa_ticker_schedule(pa_ticker_t *ticker, pa_id_t record, uint64_t deadline_ns, pa_timer_id_t *out)
    int pa_ticker_cancel(pa_ticker_t *ticker, pa_timer_id_t timer)
    int pa_ticker_revert(pa_ticker_t *ticker, pa_id_t record, pa_status_t to)
    size_t pa_ticker_advance(pa_ticker_t *ticker, uint64_t now_ns)
    int pa_ticker_eventfd(const pa_ticker_t *ticker)
    size_t pa_ticker_drain(pa_ticker_t *ticker, pa_id_t *out, size_t max)
    size_t pa_ticker_pending(pa_ticker_t *ticker)
    size_t pa_ticker_queued(pa_ticker_t *ticker)
    uint64_t pa_ticker_tick_ns(const pa_ticker_t *ticker)

    # ---- pq.h ----
    enum: PA_PQ_INDEXED

    ctypedef struct pa_pq_t:
        pass

    ctypedef struct pa_pq_item_t:
        uint64_t value
        double priority
        double confidence
        double deadline
        uint64_t arrival

    int pa_pq_create(unsigned flags, pa_pq_t **out)
    void pa_pq_destroy(pa_pq_t *pq)
    int pa_pq_push(pa_pq_t *pq, uint64_t value, double priority, double confidence, double deadline)
    int pa_pq_pop(pa_pq_t *pq, pa_pq_item_t *item)
    int pa_pq_push_many(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                        const double *confidences, const double *deadlines, size_t *pushed)
    int pa_pq_push_all(pa_pq_t *pq, size_t n, const uint64_t *values, const double *priorities,
                       const double *confidences, const double *deadlines, size_t *failed, size_t *kept)
    Py_ssize_t pa_pq_pop_many(pa_pq_t *pq, uint64_t *values, size_t max)
    int pa_pq_peek(pa_pq_t *pq, pa_pq_item_t *item)
    int pa_pq_cancel(pa_pq_t *pq, uint64_t value)
    size_t pa_pq_size(const pa_pq_t *pq)

    # ---- memory.h ----
    enum: PA_MEM_POPULATE
    enum: PA_MEM_LOCK
    enum: PA_MEM_LOCK_REQUIRED
    enum: PA_MEM_HUGE_PAGES
    enum: PA_MEM_SHAREABLE
    enum: PA_MEM_ALL_FLAGS
    size_t PA_HUGE_PAGE_SIZE

    ctypedef struct pa_memory_t:
        void *addr
        size_t size
        size_t requested_size
        int fd
        unsigned requested_flags
        unsigned effective_flags
        int populate_method
        int lock_error
        int huge_pages_error
        int populate_error

    int pa_memory_reserve(pa_memory_t *mem, size_t size, unsigned flags)
    int pa_memory_resize(pa_memory_t *mem, size_t new_size, bint may_move)
    int pa_memory_release(pa_memory_t *mem)
    int pa_memory_resident(const pa_memory_t *mem, size_t *resident_bytes)
    void pa_memory_init_empty(pa_memory_t *mem)
    size_t pa_page_size()
    uint64_t pa_physical_memory()

    # ---- affinity.h ----
    enum: PA_CPU_MAX

    ctypedef struct pa_cpumask_t:
        uint64_t bits[16]

    void pa_cpumask_zero(pa_cpumask_t *mask)
    void pa_cpumask_set(pa_cpumask_t *mask, unsigned cpu)
    bint pa_cpumask_test(const pa_cpumask_t *mask, unsigned cpu)
    unsigned pa_cpumask_count(const pa_cpumask_t *mask)
    int pa_cpus_online(pa_cpumask_t *out)
    int pa_affinity_get(pid_t tid, pa_cpumask_t *out)
    int pa_affinity_set_thread(pid_t tid, const pa_cpumask_t *mask)

    ctypedef struct pa_affinity_saved_t:
        size_t count

    void pa_affinity_saved_init(pa_affinity_saved_t *saved)
    void pa_affinity_saved_free(pa_affinity_saved_t *saved)
    int pa_affinity_set_process(pid_t pid, const pa_cpumask_t *mask, pa_affinity_saved_t *saved)
    int pa_affinity_restore(pa_affinity_saved_t *saved)

    ctypedef struct pa_cores_t:
        pass
    ctypedef uint64_t pa_core_reservation_t

    int pa_cores_create(const pa_cpumask_t *allowed, pa_cores_t **out)
    void pa_cores_destroy(pa_cores_t *cores)
    int pa_cores_reserve(pa_cores_t *cores, unsigned count, bint exclusive, const pa_cpumask_t *prefer,
                         pa_core_reservation_t *out)
    int pa_cores_reserve_mask(pa_cores_t *cores, const pa_cpumask_t *mask, bint exclusive,
                              pa_core_reservation_t *out)
    int pa_cores_get(pa_cores_t *cores, pa_core_reservation_t reservation, pa_cpumask_t *out, bint *exclusive)
    int pa_cores_apply(pa_cores_t *cores, pa_core_reservation_t reservation, pid_t target, bint whole_process)
    int pa_cores_resize(pa_cores_t *cores, pa_core_reservation_t reservation, unsigned new_count)
    int pa_cores_release(pa_cores_t *cores, pa_core_reservation_t reservation)
    int pa_cores_available(pa_cores_t *cores, pa_cpumask_t *free_exclusive, pa_cpumask_t *allowed)
    size_t pa_cores_live(pa_cores_t *cores)


cdef extern from "prealloc/disk.h" nogil:
    enum: PA_DISK_PATH_MAX
    enum: PA_DISK_KEEP_SIZE
    enum: PA_DISK_TMPFILE
    enum: PA_IOPRIO_CLASS_NONE
    enum: PA_IOPRIO_CLASS_RT
    enum: PA_IOPRIO_CLASS_BE
    enum: PA_IOPRIO_CLASS_IDLE
    enum: PA_IOPRIO_LEVELS

    ctypedef struct pa_disk_reservation_t:
        int fd
        uint64_t bytes
        unsigned flags
        bint named
        char path[4096]

    ctypedef struct pa_disk_space_t:
        uint64_t total
        uint64_t free
        uint64_t available
        uint64_t block_size
        uint64_t device

    int pa_disk_reserve(const char *directory, const char *name, uint64_t bytes, unsigned flags,
                        pa_disk_reservation_t *out)
    int pa_disk_resize(pa_disk_reservation_t *r, uint64_t bytes)
    int pa_disk_link(pa_disk_reservation_t *r, const char *path)
    int pa_disk_detach(pa_disk_reservation_t *r, int *fd_out)
    int pa_disk_release(pa_disk_reservation_t *r)
    int pa_disk_allocated(int fd, uint64_t *out)
    int pa_disk_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
    int pa_disk_space(const char *path, pa_disk_space_t *out)
    int pa_ioprio_get(pid_t tid, int *out)
    int pa_ioprio_set(pid_t tid, int value)


cdef extern from "prealloc/pagecache.h" nogil:
    enum: PA_PAGECACHE_WILLNEED
    enum: PA_PAGECACHE_POPULATE
    enum: PA_PAGECACHE_ALL_FLAGS

    ctypedef struct pa_pagecache_count_t:
        uint64_t cached
        uint64_t dirty
        uint64_t writeback
        uint64_t evicted
        uint64_t recently_evicted
        int method
        bint restricted

    ctypedef struct pa_pagecache_file_t:
        int fd
        int open_error
        bint noatime
        uint64_t size
        uint64_t offset
        uint64_t length
        int warm_method
        int warm_error
        uint64_t pinned_bytes
        int pin_error

    void pa_pagecache_file_init(pa_pagecache_file_t *f)
    int pa_pagecache_open(pa_pagecache_file_t *f, const char *path, uint64_t offset, uint64_t length,
                          const char *const *roots, size_t nroots)
    int pa_pagecache_warm(pa_pagecache_file_t *f, unsigned flags, uint64_t chunk_bytes)
    int pa_pagecache_count(const pa_pagecache_file_t *f, pa_pagecache_count_t *out)
    int pa_pagecache_pin(pa_pagecache_file_t *f, uint64_t max_bytes)
    int pa_pagecache_unpin(pa_pagecache_file_t *f)
    int pa_pagecache_mark(pa_pagecache_file_t *f)
    int pa_pagecache_evict(pa_pagecache_file_t *f, bint only_unmarked, uint64_t *evicted_bytes)
    int pa_pagecache_close(pa_pagecache_file_t *f)
    int pa_pagecache_open_many(pa_pagecache_file_t *files, size_t n, const char *const *paths,
                               const uint64_t *offsets, const uint64_t *lengths,
                               const char *const *roots, size_t nroots)
    int pa_pagecache_warm_many(pa_pagecache_file_t *files, size_t n, unsigned flags, uint64_t chunk_bytes)
    int pa_pagecache_count_many(const pa_pagecache_file_t *files, size_t n, pa_pagecache_count_t *out)
    int pa_pagecache_cachestat(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out)
    int pa_pagecache_mincore(int fd, uint64_t offset, uint64_t length, pa_pagecache_count_t *out)
    uint64_t pa_pagecache_chunk_bytes(int fd)
