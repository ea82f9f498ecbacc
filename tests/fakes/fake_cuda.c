/* TEST CODE, never shipped: a fake CUDA driver, libcuda.so.1, backed by host memory.
 *
 * It implements the driver calls prealloc.strategies.gpu makes (ctypes on the driver
 * API, dlopen("libcuda.so.1") as on a CUDA machine), with the real ABI and the real
 * error codes, for machines without a GPU:
 *   - cuMemCreate makes a memfd of the size (physical memory) and adds it to the
 *     device's "allocated" in the shared state, which the fake NVML reports as used;
 *     over the device's free memory it fails with CUDA_ERROR_OUT_OF_MEMORY;
 *   - cuMemAddressReserve reserves host address space (PROT_NONE, MAP_NORESERVE), so a
 *     "device pointer" is a host address the tests can read and write through;
 *   - cuMemMap maps the memfd MAP_SHARED|MAP_FIXED at the address, cuMemSetAccess makes
 *     it read-write, cuMemUnmap puts PROT_NONE reserved space back;
 *   - cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR) dups the memfd, and
 *     cuMemImportFromShareableHandle in another process takes it back: both processes
 *     then see the same bytes, as two processes sharing device memory do;
 *   - primary contexts are counted per device (retain - release), so a test sees a
 *     warmed context and its release.
 * Faults are injected per call name (fake_gpu_state.h). Built by tests/fakes/__init__.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>

#include "fake_common.h"

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum {
    CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3, CUDA_ERROR_NO_DEVICE = 100, CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201, CUDA_ERROR_INVALID_HANDLE = 400, CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801, CUDA_ERROR_UNKNOWN = 999,
};
enum { CU_MEM_HANDLE_TYPE_NONE = 0, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 };
enum { CU_MEM_LOCATION_TYPE_DEVICE = 1, CU_MEM_ALLOCATION_TYPE_PINNED = 1, CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 };
enum {
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
};

typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage; unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;
typedef struct { char bytes[16]; } CUuuid;

#define MAX_ALLOCS 256
#define MAX_RESERVATIONS 64
#define MAX_MAPPINGS 1024

typedef struct { int fd; uint64_t size; int device; int imported; int in_use; int handle_types; } alloc_t;
typedef struct { uint64_t ptr, size; } range_t;
typedef struct { uint64_t ptr, size; CUmemGenericAllocationHandle handle; int readable; } mapping_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static alloc_t allocs[MAX_ALLOCS];
static range_t reservations[MAX_RESERVATIONS];
static mapping_t mappings[MAX_MAPPINGS];
static int initialised;
static char primary_ctx[FAKE_MAX_DEVICES];
static int retained_here[FAKE_MAX_DEVICES]; /* this process's retains */
static __thread CUcontext ctx_stack[16];
static __thread int ctx_depth;

static CUresult ready(const char *call, fake_gpu_state_t **out) {
    fake_gpu_state_t *s = fake_state_get();
    if (s == NULL)
        return CUDA_ERROR_NO_DEVICE;
    if (!__atomic_load_n(&initialised, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    int fault = fake_fault(call);
    if (fault)
        return fault;
    *out = s;
    return CUDA_SUCCESS;
}

CUresult cuInit(unsigned int flags) {
    fake_gpu_state_t *s = fake_state_get();
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (s == NULL)
        return CUDA_ERROR_NO_DEVICE;
    if (s->cuda_init_error)
        return s->cuda_init_error;
    int fault = fake_fault("cuInit");
    if (fault)
        return fault;
    __atomic_store_n(&initialised, 1, __ATOMIC_RELEASE);
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    fake_gpu_state_t *s = fake_state_get();
    if (version == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *version = s ? (int)s->driver_version : 0;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **str) {
    switch (error) {
    case CUDA_SUCCESS: *str = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *str = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *str = "out of memory"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *str = "initialization error"; break;
    case CUDA_ERROR_NO_DEVICE: *str = "no CUDA-capable device is detected"; break;
    case CUDA_ERROR_INVALID_DEVICE: *str = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *str = "invalid device context"; break;
    case CUDA_ERROR_INVALID_HANDLE: *str = "invalid resource handle"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *str = "operation not supported"; break;
    default: *str = "unknown error"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **str) {
    switch (error) {
    case CUDA_SUCCESS: *str = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *str = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *str = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *str = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_NO_DEVICE: *str = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_DEVICE: *str = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *str = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *str = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *str = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *str = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceGetCount", &s);
    if (rc)
        return rc;
    *count = (int)s->device_count;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceGet", &s);
    if (rc)
        return rc;
    if (ordinal < 0 || (unsigned)ordinal >= s->device_count)
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

static CUresult device_ok(fake_gpu_state_t *s, CUdevice device) {
    return device < 0 || (unsigned)device >= s->device_count ? CUDA_ERROR_INVALID_DEVICE : CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceGetAttribute", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    if (attribute == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
        *value = (int)s->dev[device].vmm_supported;
    else if (attribute == CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)
        *value = (int)s->dev[device].posix_fd_supported;
    else
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int length, CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceGetName", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    snprintf(name, (size_t)length, "%s", s->dev[device].name);
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceTotalMem", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    *bytes = s->dev[device].total;
    return CUDA_SUCCESS;
}

/* The 16 bytes of the NVML UUID string "GPU-xxxxxxxx-xxxx-...", as the driver has them. */
CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDeviceGetUuid", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    const char *text = s->dev[device].uuid + 4;
    int n = 0;
    for (const char *p = text; *p && n < 32; p++) {
        if (*p == '-')
            continue;
        char digit[3] = {p[0], p[1], 0};
        uuid->bytes[n / 2] = (char)strtol(digit, NULL, 16);
        n += 2;
        p++;
    }
    return n == 32 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device) { return cuDeviceGetUuid_v2(uuid, device); }

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDevicePrimaryCtxRetain", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    __atomic_fetch_add(&s->dev[device].primary_ctx_refs, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&retained_here[device], 1, __ATOMIC_ACQ_REL);
    *ctx = &primary_ctx[device];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuDevicePrimaryCtxRelease", &s);
    if (rc || (rc = device_ok(s, device)))
        return rc;
    if (__atomic_load_n(&retained_here[device], __ATOMIC_ACQUIRE) <= 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    __atomic_fetch_sub(&retained_here[device], 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_sub(&s->dev[device].primary_ctx_refs, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    if (ctx_depth >= 16)
        return CUDA_ERROR_INVALID_VALUE;
    ctx_stack[ctx_depth++] = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    if (ctx_depth <= 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    CUcontext top = ctx_stack[--ctx_depth];
    if (ctx)
        *ctx = top;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *ctx) {
    *ctx = ctx_depth ? ctx_stack[ctx_depth - 1] : NULL;
    return CUDA_SUCCESS;
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop, int option) {
    fake_gpu_state_t *s;
    (void)option;
    CUresult rc = ready("cuMemGetAllocationGranularity", &s);
    if (rc || (rc = device_ok(s, prop->location.id)))
        return rc;
    *granularity = s->granularity;
    return CUDA_SUCCESS;
}

static alloc_t *alloc_of(CUmemGenericAllocationHandle handle) {
    if (handle == 0 || handle > MAX_ALLOCS || !allocs[handle - 1].in_use)
        return NULL;
    return &allocs[handle - 1];
}

static CUresult new_alloc(int fd, uint64_t size, int device, int imported, int handle_types,
                          CUmemGenericAllocationHandle *handle) {
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (!allocs[i].in_use) {
            allocs[i] = (alloc_t){fd, size, device, imported, 1, handle_types};
            *handle = (CUmemGenericAllocationHandle)(i + 1);
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                     unsigned long long flags) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemCreate", &s);
    if (rc)
        return rc;
    if (handle == NULL || prop == NULL || flags != 0 || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED
            || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    int device = prop->location.id;
    if ((rc = device_ok(s, device)))
        return rc;
    if (size == 0 || size % s->granularity != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (prop->requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR && !s->dev[device].posix_fd_supported)
        return CUDA_ERROR_NOT_SUPPORTED;
    fake_device_t *d = &s->dev[device];
    uint64_t after = __atomic_add_fetch(&d->allocated, size, __ATOMIC_ACQ_REL);
    if (d->reserved + d->base_used + after > d->total) {
        __atomic_fetch_sub(&d->allocated, size, __ATOMIC_ACQ_REL);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    int fd = memfd_create("fake-cuda-device-memory", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
        if (fd >= 0)
            close(fd);
        __atomic_fetch_sub(&d->allocated, size, __ATOMIC_ACQ_REL);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_lock(&lock);
    rc = new_alloc(fd, size, device, 0, prop->requestedHandleTypes, handle);
    pthread_mutex_unlock(&lock);
    if (rc) {
        close(fd);
        __atomic_fetch_sub(&d->allocated, size, __ATOMIC_ACQ_REL);
        return rc;
    }
    fake_proc_t *proc = fake_own_proc(s);
    if (proc)
        __atomic_fetch_add(&proc->used[device], size, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&s->live_handles, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemRelease", &s);
    if (rc)
        return rc;
    pthread_mutex_lock(&lock);
    alloc_t *a = alloc_of(handle);
    if (a == NULL) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    alloc_t copy = *a;
    a->in_use = 0;
    pthread_mutex_unlock(&lock);
    close(copy.fd);
    if (!copy.imported) {
        __atomic_fetch_sub(&s->dev[copy.device].allocated, copy.size, __ATOMIC_ACQ_REL);
        fake_proc_t *proc = fake_own_proc(s);
        if (proc)
            __atomic_fetch_sub(&proc->used[copy.device], copy.size, __ATOMIC_ACQ_REL);
    }
    __atomic_fetch_sub(&s->live_handles, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemAddressReserve", &s);
    if (rc)
        return rc;
    if (ptr == NULL || size == 0 || size % s->granularity != 0 || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    (void)alignment; /* mmap's page alignment; the fake does not align further */
    void *map = mmap((void *)(uintptr_t)addr, size, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lock);
    int slot = -1;
    for (int i = 0; i < MAX_RESERVATIONS && slot < 0; i++)
        if (reservations[i].size == 0)
            slot = i;
    if (slot >= 0)
        reservations[slot] = (range_t){(uint64_t)(uintptr_t)map, size};
    pthread_mutex_unlock(&lock);
    if (slot < 0) {
        munmap(map, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *ptr = (CUdeviceptr)(uintptr_t)map;
    __atomic_fetch_add(&s->live_reservations, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

static int overlaps_mapping(uint64_t ptr, uint64_t size) {
    for (int i = 0; i < MAX_MAPPINGS; i++)
        if (mappings[i].size && mappings[i].ptr < ptr + size && ptr < mappings[i].ptr + mappings[i].size)
            return 1;
    return 0;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemAddressFree", &s);
    if (rc)
        return rc;
    pthread_mutex_lock(&lock);
    int slot = -1;
    for (int i = 0; i < MAX_RESERVATIONS; i++)
        if (reservations[i].size == size && reservations[i].ptr == ptr)
            slot = i;
    if (slot < 0 || overlaps_mapping(ptr, size)) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_VALUE; /* unknown range, or still mapped */
    }
    reservations[slot].size = 0;
    pthread_mutex_unlock(&lock);
    munmap((void *)(uintptr_t)ptr, size);
    __atomic_fetch_sub(&s->live_reservations, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

static int within_reservation(uint64_t ptr, uint64_t size) {
    for (int i = 0; i < MAX_RESERVATIONS; i++)
        if (reservations[i].size && reservations[i].ptr <= ptr && ptr + size <= reservations[i].ptr + reservations[i].size)
            return 1;
    return 0;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemMap", &s);
    if (rc)
        return rc;
    pthread_mutex_lock(&lock);
    alloc_t *a = alloc_of(handle);
    if (a == NULL || flags != 0 || size == 0 || size % s->granularity || offset + size > a->size
            || !within_reservation(ptr, size) || overlaps_mapping(ptr, size)) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    int slot = -1;
    for (int i = 0; i < MAX_MAPPINGS && slot < 0; i++)
        if (mappings[i].size == 0)
            slot = i;
    void *map = slot < 0 ? MAP_FAILED
        : mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, (off_t)offset);
    if (map == MAP_FAILED) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    mappings[slot] = (mapping_t){ptr, size, handle, 0};
    pthread_mutex_unlock(&lock);
    __atomic_fetch_add(&s->mapped_bytes, (int64_t)size, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemUnmap", &s);
    if (rc)
        return rc;
    pthread_mutex_lock(&lock);
    /* the range must be covered exactly by whole mappings */
    uint64_t covered = 0;
    for (int i = 0; i < MAX_MAPPINGS; i++)
        if (mappings[i].size && mappings[i].ptr >= ptr && mappings[i].ptr + mappings[i].size <= ptr + size)
            covered += mappings[i].size;
    if (covered != size || size == 0) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (int i = 0; i < MAX_MAPPINGS; i++)
        if (mappings[i].size && mappings[i].ptr >= ptr && mappings[i].ptr + mappings[i].size <= ptr + size)
            mappings[i].size = 0;
    mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    pthread_mutex_unlock(&lock);
    __atomic_fetch_sub(&s->mapped_bytes, (int64_t)size, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemSetAccess", &s);
    if (rc)
        return rc;
    if (desc == NULL || count == 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    uint64_t covered = 0;
    for (int i = 0; i < MAX_MAPPINGS; i++)
        if (mappings[i].size && mappings[i].ptr >= ptr && mappings[i].ptr + mappings[i].size <= ptr + size)
            covered += mappings[i].size;
    int ok = covered == size && desc[0].location.type == CU_MEM_LOCATION_TYPE_DEVICE;
    int prot = desc[0].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
             : desc[0].flags == 1 ? PROT_READ : PROT_NONE;
    if (ok)
        ok = mprotect((void *)(uintptr_t)ptr, size, prot) == 0;
    pthread_mutex_unlock(&lock);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle, int type,
                                      unsigned long long flags) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemExportToShareableHandle", &s);
    if (rc)
        return rc;
    pthread_mutex_lock(&lock);
    alloc_t *a = alloc_of(handle);
    int fd = -1;
    if (a && type == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR && flags == 0
            && (a->handle_types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
        fd = fcntl(a->fd, F_DUPFD_CLOEXEC, 0);
    pthread_mutex_unlock(&lock);
    if (fd < 0)
        return a == NULL ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_NOT_SUPPORTED;
    *(int *)shareable = fd;
    return CUDA_SUCCESS;
}

CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle, int type) {
    fake_gpu_state_t *s;
    CUresult rc = ready("cuMemImportFromShareableHandle", &s);
    if (rc)
        return rc;
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_INVALID_VALUE;
    int fd = fcntl((int)(intptr_t)os_handle, F_DUPFD_CLOEXEC, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0)
            close(fd);
        return CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_lock(&lock);
    rc = new_alloc(fd, (uint64_t)st.st_size, 0, 1, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, handle);
    pthread_mutex_unlock(&lock);
    if (rc) {
        close(fd);
        return rc;
    }
    __atomic_fetch_add(&s->live_handles, 1, __ATOMIC_ACQ_REL);
    return CUDA_SUCCESS;
}

/* Entry points by name, for bindings that resolve the driver through it (cuda-bindings);
 * prealloc's ctypes binding resolves symbols directly and never calls it. */
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    (void)version; (void)flags;
    char name[128];
    snprintf(name, sizeof name, "%s_v2", symbol);
    void *fn = dlsym(RTLD_DEFAULT, name);
    if (fn == NULL)
        fn = dlsym(RTLD_DEFAULT, symbol);
    if (status)
        *status = fn ? 0 : 1;
    *pfn = fn;
    return fn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
