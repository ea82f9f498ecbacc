/* TEST CODE: mapping the shared fake-GPU state and injecting faults (see fake_gpu_state.h).
 * Included by both fake libraries; everything is static to each. */
#ifndef FAKE_COMMON_H
#define FAKE_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fake_gpu_state.h"

static fake_gpu_state_t *fake_state;
static pthread_mutex_t fake_state_lock = PTHREAD_MUTEX_INITIALIZER;

/* The shared state, mapped on first use; NULL when $PREALLOC_FAKE_GPU_STATE names no
 * valid state file (the fakes then act as a machine without a driver). */
static fake_gpu_state_t *fake_state_get(void) {
    pthread_mutex_lock(&fake_state_lock);
    if (fake_state == NULL) {
        const char *path = getenv("PREALLOC_FAKE_GPU_STATE");
        int fd = path ? open(path, O_RDWR | O_CLOEXEC) : -1;
        if (fd >= 0) {
            void *map = mmap(NULL, sizeof(fake_gpu_state_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (map != MAP_FAILED) {
                fake_gpu_state_t *state = map;
                if (state->magic == FAKE_GPU_MAGIC && state->version == FAKE_GPU_VERSION)
                    fake_state = state;
                else
                    munmap(map, sizeof(fake_gpu_state_t));
            }
        }
    }
    pthread_mutex_unlock(&fake_state_lock);
    return fake_state;
}

/* The injected error for call, or 0. A fault armed for call lets `after` calls succeed,
 * then fails `count` times (for ever when count is 0). */
static int fake_fault(const char *call) {
    fake_gpu_state_t *s = fake_state_get();
    if (s == NULL)
        return 0;
    for (int i = 0; i < FAKE_MAX_FAULTS; i++) {
        fake_fault_t *f = &s->faults[i];
        if (f->code == 0 || strncmp(f->call, call, sizeof f->call) != 0)
            continue;
        if (__atomic_load_n(&f->after, __ATOMIC_ACQUIRE) > 0) {
            __atomic_fetch_sub(&f->after, 1, __ATOMIC_ACQ_REL);
            return 0;
        }
        if (f->count < 0)
            return 0; /* spent */
        if (f->count > 0 && __atomic_sub_fetch(&f->count, 1, __ATOMIC_ACQ_REL) == 0)
            f->count = -1;
        __atomic_fetch_add(&f->hits, 1, __ATOMIC_ACQ_REL);
        return f->code;
    }
    return 0;
}

/* This process's slot in the process table (claimed on first use), or NULL when full. */
__attribute__((unused)) static fake_proc_t *fake_own_proc(fake_gpu_state_t *s) {
    uint32_t pid = (uint32_t)getpid();
    for (int i = 0; i < FAKE_MAX_PROCS; i++)
        if (__atomic_load_n(&s->procs[i].pid, __ATOMIC_ACQUIRE) == pid)
            return &s->procs[i];
    for (int i = 0; i < FAKE_MAX_PROCS; i++) {
        uint32_t expected = 0;
        if (__atomic_compare_exchange_n(&s->procs[i].pid, &expected, pid, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return &s->procs[i];
    }
    return NULL;
}

#endif
