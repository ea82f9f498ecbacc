/*
 * bench_memory.c — what a memory reservation costs, and what it buys.
 *
 * (1) Reserve: pa_memory_reserve(POPULATE) against what a C user would write instead,
 *     mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE) of the same size, each followed by
 *     release / munmap (not timed: the same munmap on both sides). Then with LOCK against
 *     mmap(MAP_POPULATE) + mlock. The two sides alternate run by run, so drift in the
 *     machine (page cache, compaction, frequency) hits both alike. The ratio is the
 *     baseline's time over ours: 1.0 = as fast as the plain call; the target is >= 0.8.
 * (2) First touch: writing one byte per page of a reserved (populated) region against the
 *     same writes to a fresh mmap, where every write takes a page fault — the latency the
 *     reservation takes off the consumer's path. Target: >= 50x faster.
 * (3) Stall: while one thread reserves a large region, another maps and unmaps 1 MiB
 *     every 200 us (what malloc of a large block or a new thread stack does). Populating
 *     holds the process's mmap lock; the worst and median time of the other thread's
 *     mmap + munmap during the reservation, ours (chunked, pausing: memory.c "Populate")
 *     against mmap(MAP_POPULATE), and both reservation times.
 *
 * Usage: bench_memory [--sizes MiB,MiB,...] [--runs N] [--touch-size MiB]
 * Defaults: sizes 4,64,512; 7 runs (best and median shown); touch region 256 MiB.
 * Times are CLOCK_MONOTONIC.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "prealloc/memory.h"

#define MiB ((size_t)1024 * 1024)
#define MAX_SIZES 16
#define MAX_RUNS 101

/* The baseline: plain mmap with MAP_POPULATE, optionally mlock'ed (through syscall(2), as
 * the library does, so a sanitizer build measures the same kernel work). */
static double baseline_reserve(size_t size, bool lock, void **out) {
    double t0 = now_s();
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    if (lock && syscall(SYS_mlock, p, size) != 0) {
        perror("mlock");
        exit(1);
    }
    double t1 = now_s();
    *out = p;
    return t1 - t0;
}

static double ours_reserve(size_t size, unsigned flags, pa_memory_t *mem) {
    double t0 = now_s();
    int rc = pa_memory_reserve(mem, size, flags);
    double t1 = now_s();
    if (rc != 0) {
        fprintf(stderr, "pa_memory_reserve: %s\n", strerror(-rc));
        exit(1);
    }
    if ((flags & PA_MEM_LOCK) && !(mem->effective_flags & PA_MEM_LOCK)) {
        fprintf(stderr, "not locked (lock_error %s): raise RLIMIT_MEMLOCK or run as root\n",
                strerror(mem->lock_error));
        exit(1);
    }
    return t1 - t0;
}

static void bench_reserve(const size_t *sizes, int n_sizes, int runs) {
    printf("(1) reserve N bytes, faulted in (and locked): ours vs the plain mmap, %d runs each\n", runs);
    printf("%-26s %9s %12s %12s %12s %12s %9s\n", "operation", "size MiB", "ours med ms", "base med ms",
           "ours best ms", "base best ms", "ratio");
    for (int lock = 0; lock <= 1; lock++) {
        for (int s = 0; s < n_sizes; s++) {
            size_t size = sizes[s];
            double ours[MAX_RUNS], base[MAX_RUNS];
            unsigned flags = PA_MEM_POPULATE | (lock ? PA_MEM_LOCK_REQUIRED : 0);
            /* one untimed warm-up of each: first-use costs (page tables, allocator) */
            pa_memory_t mem;
            void *p;
            ours_reserve(size, flags, &mem);
            pa_memory_release(&mem);
            baseline_reserve(size, lock, &p);
            munmap(p, size);
            for (int r = 0; r < runs; r++) {
                if (r % 2 == 0) {
                    ours[r] = ours_reserve(size, flags, &mem);
                    pa_memory_release(&mem);
                    base[r] = baseline_reserve(size, lock, &p);
                    munmap(p, size);
                } else {
                    base[r] = baseline_reserve(size, lock, &p);
                    munmap(p, size);
                    ours[r] = ours_reserve(size, flags, &mem);
                    pa_memory_release(&mem);
                }
            }
            double ob = best(ours, runs), bb = best(base, runs);
            double om = median(ours, runs), bm = median(base, runs);
            printf("%-26s %9zu %12.3f %12.3f %12.3f %12.3f %8.2fx\n",
                   lock ? "reserve POPULATE|LOCK" : "reserve POPULATE", size / MiB, om * 1e3, bm * 1e3, ob * 1e3,
                   bb * 1e3, bm / om);
        }
        printf("%-26s   (baseline: %s; ratio = base median / ours median, >= 0.8 wanted)\n", "",
               lock ? "mmap(MAP_POPULATE) + mlock" : "mmap(MAP_POPULATE)");
    }
}

/* Writes one byte per page; returns seconds. */
static double touch_pages(unsigned char *p, size_t size) {
    size_t page = pa_page_size();
    double t0 = now_s();
    for (size_t off = 0; off < size; off += page) ((volatile unsigned char *)p)[off] = 1;
    return now_s() - t0;
}

static void bench_first_touch(size_t size, int runs) {
    size_t pages = size / pa_page_size();
    printf("\n(2) first write to each page of a %zu MiB region (%zu pages), %d runs each\n", size / MiB, pages, runs);
    printf("%-40s %14s %14s %9s\n", "region", "med ns/page", "best ns/page", "speedup");
    static const struct {
        const char *name;
        unsigned flags;
    } kinds[] = {{"reserved (POPULATE)", PA_MEM_POPULATE},
                 {"reserved (POPULATE|HUGE_PAGES)", PA_MEM_POPULATE | PA_MEM_HUGE_PAGES}};
    double cold[MAX_RUNS];
    double warm[2][MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            exit(1);
        }
        cold[r] = touch_pages(p, size);
        munmap(p, size);
        for (int k = 0; k < 2; k++) {
            pa_memory_t mem;
            ours_reserve(size, kinds[k].flags, &mem);
            warm[k][r] = touch_pages(mem.addr, size);
            pa_memory_release(&mem);
        }
    }
    double cold_med = median(cold, runs), cold_best = best(cold, runs);
    printf("%-40s %14.1f %14.1f %9s\n", "cold mmap (baseline: page fault each)", cold_med * 1e9 / (double)pages,
           cold_best * 1e9 / (double)pages, "1x");
    for (int k = 0; k < 2; k++) {
        double m = median(warm[k], runs), b = best(warm[k], runs);
        printf("%-40s %14.2f %14.2f %8.0fx\n", kinds[k].name, m * 1e9 / (double)pages, b * 1e9 / (double)pages,
               cold_med / m);
    }
    printf("%-40s   (speedup = cold median / reserved median, >= 50x wanted)\n", "");
}

/* ---- (3) the stall other threads see ---- */

#define MAX_PROBES 100000
typedef struct prober {
    atomic_int stop;
    int n;
    double lat[MAX_PROBES];
} prober_t;

static void *probe_main(void *arg) {
    prober_t *pr = arg;
    while (!atomic_load(&pr->stop) && pr->n < MAX_PROBES) {
        double t0 = now_s();
        void *p = mmap(NULL, MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED) munmap(p, MiB);
        pr->lat[pr->n++] = now_s() - t0;
        struct timespec gap = {0, 200000};
        nanosleep(&gap, NULL);
    }
    return NULL;
}

/* One reservation of size by ours (1) or the baseline (0) while a prober runs: the
 * reservation's time, and the prober's worst and median stall during it. */
static void stall_run(size_t size, int ours, double *reserve_s, double *worst_s, double *median_s) {
    static prober_t pr;
    memset(&pr, 0, sizeof pr);
    pthread_t th;
    if (pthread_create(&th, NULL, probe_main, &pr) != 0) exit(1);
    struct timespec settle = {0, 20000000};
    nanosleep(&settle, NULL);
    int first = pr.n; /* probes before the reservation are not counted */
    pa_memory_t mem;
    void *p = NULL;
    *reserve_s = ours ? ours_reserve(size, PA_MEM_POPULATE, &mem) : baseline_reserve(size, false, &p);
    atomic_store(&pr.stop, 1);
    pthread_join(th, NULL);
    if (ours) {
        pa_memory_release(&mem);
    } else {
        munmap(p, size);
    }
    int n = pr.n - first;
    double *lat = pr.lat + first;
    if (n <= 0) {
        *worst_s = *median_s = 0;
        return;
    }
    double worst = 0;
    for (int i = 0; i < n; i++)
        if (lat[i] > worst) worst = lat[i];
    *worst_s = worst;
    *median_s = median(lat, n);
}

static void bench_stall(size_t size, int runs) {
    printf("\n(3) another thread's 1 MiB mmap + munmap while %zu MiB is reserved, %d runs each\n", size / MiB, runs);
    printf("%-26s %14s %14s %14s\n", "reservation", "reserve med ms", "stall max ms", "stall med ms");
    double res[2][MAX_RUNS], worst[2][MAX_RUNS], med[2][MAX_RUNS];
    for (int r = 0; r < runs; r++)
        for (int k = 0; k < 2; k++) {
            int ours = (r + k) % 2; /* alternate which goes first */
            stall_run(size, ours, &res[ours][r], &worst[ours][r], &med[ours][r]);
        }
    static const char *names[2] = {"mmap(MAP_POPULATE)", "ours (POPULATE)"};
    for (int k = 0; k < 2; k++)
        printf("%-26s %14.1f %14.2f %14.3f\n", names[k], median(res[k], runs) * 1e3, median(worst[k], runs) * 1e3,
               median(med[k], runs) * 1e3);
    printf("%-26s   (medians over runs; worst stall ratio base / ours: %.0fx, reserve time ratio: %.2fx)\n", "",
           median(worst[0], runs) / median(worst[1], runs), median(res[0], runs) / median(res[1], runs));
}

int main(int argc, char **argv) {
    size_t sizes[MAX_SIZES] = {4 * MiB, 64 * MiB, 512 * MiB};
    int n_sizes = 3, runs = 7;
    size_t touch_size = 256 * MiB;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc) {
            n_sizes = 0;
            char *list = argv[++i], *save = NULL;
            for (char *tok = strtok_r(list, ",", &save); tok && n_sizes < MAX_SIZES; tok = strtok_r(NULL, ",", &save))
                sizes[n_sizes++] = (size_t)strtoull(tok, NULL, 10) * MiB;
        } else if (strcmp(argv[i], "--runs") == 0 && i + 1 < argc) {
            runs = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--touch-size") == 0 && i + 1 < argc) {
            touch_size = (size_t)strtoull(argv[++i], NULL, 10) * MiB;
        } else {
            fprintf(stderr, "usage: %s [--sizes MiB,MiB,...] [--runs N] [--touch-size MiB]\n", argv[0]);
            return 2;
        }
    }
    if (runs < 1 || runs > MAX_RUNS || n_sizes == 0 || touch_size == 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    for (int s = 0; s < n_sizes; s++)
        if (sizes[s] == 0) {
            fprintf(stderr, "bad size\n");
            return 2;
        }
    bench_reserve(sizes, n_sizes, runs);
    bench_first_touch(touch_size, runs);
    bench_stall(sizes[n_sizes - 1], runs);
    return 0;
}
