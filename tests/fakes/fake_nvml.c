/* TEST CODE, never shipped: a fake libnvidia-ml.so.1 for machines without a GPU.
 *
 * It implements the NVML calls prealloc.monitors.nvml makes, with the real ABI, so the
 * real pynvml (nvidia-ml-py) loads it through the dynamic loader (its
 * CDLL("libnvidia-ml.so.1") finds this file via LD_LIBRARY_PATH) and drives it exactly
 * as it drives the driver's library. Devices, totals, utilisation, MIG instances and
 * injected errors come from the shared state file (fake_gpu_state.h); "used" includes
 * what the fake libcuda.so.1 created, so a reservation moves NVML's figures for real.
 *
 * Built by tests/fakes/__init__.py: gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1.
 */
#define _GNU_SOURCE
#include <stdio.h>

#include "fake_common.h"

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NOT_FOUND = 6, NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_GPU_IS_LOST = 15, NVML_ERROR_UNKNOWN = 999,
};

/* An nvmlDevice_t points at one of these: a whole GPU (mig < 0) or one MIG instance. */
typedef struct { int device; int mig; } fake_handle_t;
static fake_handle_t handles[FAKE_MAX_DEVICES][1 + FAKE_MAX_MIG];
static int initialised; /* nvmlInit count in this process */

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;

#define NVML_STRUCT_VERSION(size, ver) ((unsigned int)(size) | ((unsigned int)(ver) << 24))

static nvmlReturn_t check(const char *call, fake_gpu_state_t **out) {
    fake_gpu_state_t *s = fake_state_get();
    if (s == NULL)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    if (__atomic_load_n(&initialised, __ATOMIC_ACQUIRE) <= 0)
        return NVML_ERROR_UNINITIALIZED;
    int fault = fake_fault(call);
    if (fault)
        return fault;
    *out = s;
    return NVML_SUCCESS;
}

static nvmlReturn_t resolve(void *device, fake_gpu_state_t *s, fake_handle_t **out) {
    fake_handle_t *h = device;
    char *base = (char *)handles, *end = base + sizeof handles;
    if ((char *)h < base || (char *)h >= end || (unsigned)h->device >= s->device_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *out = h;
    return NVML_SUCCESS;
}

static nvmlReturn_t init(void) {
    fake_gpu_state_t *s = fake_state_get();
    if (s == NULL)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    if (s->nvml_init_error)
        return s->nvml_init_error;
    int fault = fake_fault("nvmlInit");
    if (fault)
        return fault;
    for (int d = 0; d < FAKE_MAX_DEVICES; d++)
        for (int m = 0; m <= FAKE_MAX_MIG; m++)
            handles[d][m] = (fake_handle_t){d, m - 1};
    __atomic_fetch_add(&initialised, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&s->nvml_inits, 1, __ATOMIC_ACQ_REL);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return init(); }
nvmlReturn_t nvmlInit_v2(void) { return init(); }
nvmlReturn_t nvmlInit(void) { return init(); }

nvmlReturn_t nvmlShutdown(void) {
    fake_gpu_state_t *s = fake_state_get();
    if (s == NULL)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    if (__atomic_load_n(&initialised, __ATOMIC_ACQUIRE) <= 0)
        return NVML_ERROR_UNINITIALIZED;
    __atomic_fetch_sub(&initialised, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_sub(&s->nvml_inits, 1, __ATOMIC_ACQ_REL);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    fake_gpu_state_t *s;
    nvmlReturn_t rc = check("nvmlSystemGetDriverVersion", &s);
    if (rc)
        return rc;
    if (snprintf(version, length, "fake-%u", s->driver_version) >= (int)length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    fake_gpu_state_t *s;
    nvmlReturn_t rc = check("nvmlDeviceGetCount", &s);
    if (rc)
        return rc;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = s->device_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    fake_gpu_state_t *s;
    nvmlReturn_t rc = check("nvmlDeviceGetHandleByIndex", &s);
    if (rc)
        return rc;
    if (index >= s->device_count || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &handles[index][0];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned int *index) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetIndex", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (h->mig >= 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *index = (unsigned)h->device;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(const char *value, char *out, unsigned int length) {
    if (out == NULL || strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned int length) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetName", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    char value[128];
    if (h->mig >= 0)
        snprintf(value, sizeof value, "%s MIG %d", s->dev[h->device].name, h->mig);
    else
        snprintf(value, sizeof value, "%s", s->dev[h->device].name);
    return copy_string(value, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetUUID", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    char value[128];
    if (h->mig >= 0)
        snprintf(value, sizeof value, "MIG-%d-%s", h->mig, s->dev[h->device].uuid + 4);
    else
        snprintf(value, sizeof value, "%s", s->dev[h->device].uuid);
    return copy_string(value, uuid, length);
}

/* total, reserved and v2-used of a handle */
static void memory_of(fake_gpu_state_t *s, fake_handle_t *h, uint64_t *total, uint64_t *reserved, uint64_t *used) {
    fake_device_t *d = &s->dev[h->device];
    if (h->mig >= 0) {
        *total = d->mig[h->mig].total;
        *reserved = 0;
        *used = d->mig[h->mig].used;
    } else {
        *total = d->total;
        *reserved = d->reserved;
        *used = d->base_used + __atomic_load_n(&d->allocated, __ATOMIC_ACQUIRE);
    }
    if (*reserved + *used > *total)
        *used = *total - *reserved;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *memory) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetMemoryInfo", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t total, reserved, used;
    memory_of(s, h, &total, &reserved, &used);
    memory->total = total;
    memory->used = reserved + used; /* v1 counts the driver's reservation as used */
    memory->free = total - reserved - used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *memory) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetMemoryInfo_v2", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_STRUCT_VERSION(sizeof(nvmlMemory_v2_t), 2))
        return 25; /* NVML_ERROR_ARGUMENT_VERSION_MISMATCH */
    uint64_t total, reserved, used;
    memory_of(s, h, &total, &reserved, &used);
    memory->total = total;
    memory->reserved = reserved;
    memory->used = used;
    memory->free = total - reserved - used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *utilization) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetUtilizationRates", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (h->mig >= 0)
        return NVML_ERROR_NOT_SUPPORTED; /* as on real MIG instances */
    utilization->gpu = s->dev[h->device].util_gpu;
    utilization->memory = s->dev[h->device].util_memory;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned int *count, nvmlProcessInfo_t *infos) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetComputeRunningProcesses", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = 0;
    for (int i = 0; i < FAKE_MAX_PROCS; i++) {
        fake_proc_t *p = &s->procs[i];
        uint32_t pid = __atomic_load_n(&p->pid, __ATOMIC_ACQUIRE);
        uint64_t used = __atomic_load_n(&p->used[h->device], __ATOMIC_ACQUIRE);
        if (pid == 0 || used == 0 || h->mig >= 0)
            continue;
        if (infos != NULL && n < *count)
            infos[n] = (nvmlProcessInfo_t){pid, used, 0xFFFFFFFFu, 0xFFFFFFFFu};
        n++;
    }
    rc = (infos == NULL ? n > 0 : n > *count) ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return rc;
}

nvmlReturn_t nvmlDeviceGetMigMode(void *device, unsigned int *current, unsigned int *pending) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetMigMode", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    if (h->mig >= 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (s->dev[h->device].mig_count == 0 && !s->dev[h->device].mig_enabled)
        return NVML_ERROR_NOT_SUPPORTED; /* a GPU without MIG */
    *current = *pending = s->dev[h->device].mig_enabled ? 1u : 0u;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned int *count) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetMaxMigDeviceCount", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    *count = FAKE_MAX_MIG;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned int index, void **mig) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceGetMigDeviceHandleByIndex", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    fake_device_t *d = &s->dev[h->device];
    if (h->mig >= 0 || !d->mig_enabled || index >= FAKE_MAX_MIG)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (index >= d->mig_count)
        return NVML_ERROR_NOT_FOUND; /* an empty slot, as the real library says */
    *mig = &handles[h->device][1 + index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *device, unsigned int *is_mig) {
    fake_gpu_state_t *s;
    fake_handle_t *h;
    nvmlReturn_t rc = check("nvmlDeviceIsMigDeviceHandle", &s);
    if (rc || (rc = resolve(device, s, &h)))
        return rc;
    *is_mig = h->mig >= 0;
    return NVML_SUCCESS;
}
