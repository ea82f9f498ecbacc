/*
 * atomics.h (private) — the one place the core touches C11 atomics.
 *
 * Every access names its memory order, in the manner of concurrencykit and mimalloc;
 * there is no implicit seq_cst anywhere in the core. A call site that uses an acquire
 * or release says in a comment which access it pairs with.
 */
#ifndef PA_ATOMICS_H
#define PA_ATOMICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define PA_CACHE_LINE 64
#define PA_CACHE_ALIGNED _Alignas(PA_CACHE_LINE)

#define pa__load_relaxed(p) atomic_load_explicit((p), memory_order_relaxed)
#define pa__load_acquire(p) atomic_load_explicit((p), memory_order_acquire)
#define pa__store_relaxed(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define pa__store_release(p, v) atomic_store_explicit((p), (v), memory_order_release)

#define pa__fetch_add_relaxed(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#define pa__fetch_add_acq_rel(p, v) atomic_fetch_add_explicit((p), (v), memory_order_acq_rel)
#define pa__fetch_sub_relaxed(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_relaxed)
#define pa__fetch_sub_acq_rel(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_acq_rel)
#define pa__fetch_or_acq_rel(p, v) atomic_fetch_or_explicit((p), (v), memory_order_acq_rel)
#define pa__exchange_acq_rel(p, v) atomic_exchange_explicit((p), (v), memory_order_acq_rel)

/* CAS: on failure *expected receives the current value, read with acquire so the
 * caller may act on what the winner published. */
#define pa__cas_weak_acq_rel(p, expected, desired) \
    atomic_compare_exchange_weak_explicit((p), (expected), (desired), memory_order_acq_rel, memory_order_acquire)
#define pa__cas_strong_acq_rel(p, expected, desired) \
    atomic_compare_exchange_strong_explicit((p), (expected), (desired), memory_order_acq_rel, memory_order_acquire)
#define pa__cas_weak_release(p, expected, desired) \
    atomic_compare_exchange_weak_explicit((p), (expected), (desired), memory_order_release, memory_order_relaxed)
#define pa__cas_strong_relaxed(p, expected, desired) \
    atomic_compare_exchange_strong_explicit((p), (expected), (desired), memory_order_relaxed, memory_order_relaxed)

#define pa__fence_acquire() atomic_thread_fence(memory_order_acquire)
#define pa__fence_release() atomic_thread_fence(memory_order_release)
/* The one full fence the core needs: a store that must be visible before a following
 * load (epoch announcement vs. reading shared pointers), the store-load case no weaker
 * order covers. */
#define pa__fence_seq_cst() atomic_thread_fence(memory_order_seq_cst)

static inline void pa__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* doubles travel through 64-bit atomics by bit pattern */
static inline uint64_t pa__double_bits(double d) {
    union { double d; uint64_t u; } v;
    v.d = d;
    return v.u;
}
static inline double pa__bits_double(uint64_t u) {
    union { double d; uint64_t u; } v;
    v.u = u;
    return v.d;
}

#endif /* PA_ATOMICS_H */
