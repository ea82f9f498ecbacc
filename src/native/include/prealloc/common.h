/*
 * prealloc/common.h — definitions shared by every component of the prealloc core.
 *
 * Conventions (libuv style):
 *   - Public functions are pa_<object>_<verb>; types pa_<name>_t; macros PA_*.
 *   - Functions return int: 0 on success or a negative errno (-EINVAL, -ENOENT, ...).
 *     Queue-style "got one / empty" answers are bool.
 *   - The caller owns every struct: pa_<object>_init() fills it, pa_<object>_destroy()
 *     (or _release) gives its resources back. Fields documented as private must not be
 *     touched by the caller.
 *   - Library code never prints, aborts or exits.
 *   - NULL, one rule for every module: a function given a NULL object or a NULL pointer
 *     it needs answers -EINVAL (functions answering a count answer 0, bool false;
 *     _destroy(NULL) does nothing). Pointers a header documents as optional ("nullable",
 *     "NULL = ...") are exempt.
 *   - fork(): objects that own a thread or a mutex (the ticker, the core registry) are
 *     safe to inherit: a child never blocks on them; what each answers there is in its
 *     header ("fork"). Private memory reservations are not copy-on-write across fork.
 *   - Times are nanoseconds on CLOCK_MONOTONIC (the clock Python's time.monotonic() reads
 *     on Linux), so a deadline computed in Python means the same instant here.
 */
#ifndef PREALLOC_COMMON_H
#define PREALLOC_COMMON_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PA_API __attribute__((visibility("default")))
#else
#define PA_API
#endif

#define PA_VERSION_MAJOR 0
#define PA_VERSION_MINOR 1
#define PA_VERSION_PATCH 0

/* A 64-bit allocation id: low 32 bits the slot index, high 32 bits the slot's generation
 * (never 0). 0 is never a valid id, so it can mean "none". */
typedef uint64_t pa_id_t;
#define PA_ID_NONE ((pa_id_t)0)

/* The lifecycle of an allocation record; the numbering matches the spec's
 * AllocationStatus enum and prealloc.AllocationStatus in Python. */
typedef enum pa_status {
    PA_STATUS_PENDING = 0,   /* requested, not yet backed by a resource */
    PA_STATUS_ALLOCATED = 1, /* resource reserved, not yet claimed by its consumer */
    PA_STATUS_ACTIVE = 2,    /* claimed: the consumer holds the resource */
    PA_STATUS_RELEASING = 3, /* a release won the race and is giving the resource back */
    PA_STATUS_RELEASED = 4,  /* final: given back (or cancelled before allocation) */
    PA_STATUS_FAILED = 5,    /* final: could not be allocated / released */
    PA_STATUS_EXPIRED = 6    /* final: its deadline or duration passed first */
} pa_status_t;

#define PA_STATUS_COUNT 7
#define PA_STATUS_BIT(s) (1u << (unsigned)(s))
#define PA_STATUS_FINAL_MASK \
    (PA_STATUS_BIT(PA_STATUS_RELEASED) | PA_STATUS_BIT(PA_STATUS_FAILED) | PA_STATUS_BIT(PA_STATUS_EXPIRED))
#define PA_STATUS_LIVE_MASK                                                       \
    (PA_STATUS_BIT(PA_STATUS_PENDING) | PA_STATUS_BIT(PA_STATUS_ALLOCATED) |      \
     PA_STATUS_BIT(PA_STATUS_ACTIVE) | PA_STATUS_BIT(PA_STATUS_RELEASING))

/* Name of a status ("PENDING", ...), or "?" for a value out of range. */
PA_API const char *pa_status_name(unsigned status);

/* True when the transition from -> to is one of the legal edges of the status machine:
 *   PENDING   -> ALLOCATED | FAILED | EXPIRED | RELEASED (cancelled before allocation)
 *   ALLOCATED -> ACTIVE | RELEASING | EXPIRED | FAILED
 *   ACTIVE    -> RELEASING | EXPIRED
 *   RELEASING -> RELEASED | FAILED | ALLOCATED | ACTIVE (a failed release reverts)
 *   final states -> nothing (the record can only be removed) */
PA_API bool pa_status_transition_legal(unsigned from, unsigned to);

/* Nanoseconds on CLOCK_MONOTONIC. */
PA_API uint64_t pa_clock_now_ns(void);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_COMMON_H */
