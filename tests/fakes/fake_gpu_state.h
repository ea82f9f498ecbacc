/* TEST CODE, never shipped: the state shared by the fake libnvidia-ml.so.1 and the fake
 * libcuda.so.1 (tests/fakes/fake_nvml.c, tests/fakes/fake_cuda.c).
 *
 * Both libraries map one file, named by $PREALLOC_FAKE_GPU_STATE, MAP_SHARED, so every
 * process of a test (the allocating one, a second process that imports an exported fd,
 * the pytest process that configures and inspects) sees the same devices. The fake CUDA
 * driver adds what cuMemCreate makes to dev[i].allocated and the fake NVML reports it in
 * "used": NVML's used memory moves by exactly what the strategy created, as on a real
 * GPU. The layout is mirrored by tests/fakes/__init__.py (ctypes); change both together.
 *
 * Counters that several processes move are updated with __atomic builtins.
 */
#ifndef FAKE_GPU_STATE_H
#define FAKE_GPU_STATE_H

#include <stdint.h>

#define FAKE_GPU_MAGIC 0x50414750u /* "PGAP" */
#define FAKE_GPU_VERSION 1u
#define FAKE_MAX_DEVICES 4
#define FAKE_MAX_MIG 4
#define FAKE_MAX_PROCS 16
#define FAKE_MAX_FAULTS 4

typedef struct {
    char call[48];     /* the function that fails, e.g. "cuMemMap" */
    int32_t after;     /* successful calls before it starts failing (counts down) */
    int32_t count;     /* failures left; 0 = fails for ever once started */
    int32_t code;      /* the error code it returns */
    uint32_t hits;     /* failures returned so far */
} fake_fault_t;

typedef struct {
    uint64_t total;
    uint64_t used;
} fake_mig_t;

typedef struct {
    char name[64];
    char uuid[96];          /* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" */
    uint64_t total;
    uint64_t reserved;      /* driver-reserved: in v1's used, not in v2's */
    uint64_t base_used;     /* what "other processes" hold */
    uint64_t allocated;     /* what fake cuMemCreate holds now (atomic) */
    uint32_t util_gpu;
    uint32_t util_memory;
    uint32_t mig_enabled;
    uint32_t mig_count;
    fake_mig_t mig[FAKE_MAX_MIG];
    int32_t primary_ctx_refs; /* cuDevicePrimaryCtxRetain - Release (atomic) */
    uint32_t vmm_supported;
    uint32_t posix_fd_supported;
    uint32_t pad;
} fake_device_t;

typedef struct {
    uint32_t pid;           /* 0 = free slot (claimed by CAS) */
    uint32_t pad;
    uint64_t used[FAKE_MAX_DEVICES];
} fake_proc_t;

typedef struct {
    uint32_t magic;
    uint32_t version;
    int32_t nvml_init_error;   /* nvmlInit* returns this when non-zero */
    int32_t cuda_init_error;   /* cuInit returns this when non-zero */
    uint32_t device_count;
    uint32_t driver_version;   /* e.g. 12040 */
    uint64_t granularity;      /* cuMemGetAllocationGranularity */
    /* leak accounting, over all processes (atomic) */
    int64_t live_handles;      /* cuMemCreate/Import - cuMemRelease */
    int64_t live_reservations; /* cuMemAddressReserve - cuMemAddressFree */
    int64_t mapped_bytes;      /* cuMemMap - cuMemUnmap */
    int64_t nvml_inits;        /* nvmlInit - nvmlShutdown */
    fake_fault_t faults[FAKE_MAX_FAULTS];
    fake_device_t dev[FAKE_MAX_DEVICES];
    fake_proc_t procs[FAKE_MAX_PROCS];
} fake_gpu_state_t;

#endif
