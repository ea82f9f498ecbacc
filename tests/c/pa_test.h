/*
 * pa_test.h — the tiny harness every C test uses: CHECK macros that report file:line
 * and count failures, and a scale factor so stress loops shrink under TSan (which runs
 * 5-15x slower) without changing what they check.
 */
#ifndef PA_TEST_H
#define PA_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int pa_test_failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            pa_test_failures++;                                                      \
        }                                                                            \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                        \
    do {                                                                                          \
        long long pa_a_ = (long long)(a), pa_b_ = (long long)(b);                                 \
        if (pa_a_ != pa_b_) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, \
                    #a, #b, pa_a_, pa_b_);                                                        \
            pa_test_failures++;                                                                   \
        }                                                                                         \
    } while (0)

/* A failed REQUIRE makes the rest of the test meaningless: stop the test function. */
#define REQUIRE(cond)                                                                  \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond); \
            pa_test_failures++;                                                        \
            return;                                                                    \
        }                                                                              \
    } while (0)

#define RUN_TEST(fn)                                  \
    do {                                              \
        int pa_before_ = pa_test_failures;            \
        fn();                                         \
        fprintf(stderr, "%-50s %s\n", #fn,            \
                pa_test_failures == pa_before_ ? "ok" : "FAILED"); \
    } while (0)

#define TEST_MAIN_END() return pa_test_failures ? 1 : 0

/* Iteration counts for stress tests: full size normally, divided under TSan. The env var
 * PA_STRESS_SCALE (a positive integer) multiplies them for longer local runs. */
static inline long pa_stress(long full) {
    long scale = 1;
    const char *env = getenv("PA_STRESS_SCALE");
    if (env && atol(env) > 0) scale = atol(env);
#ifdef PA_UNDER_TSAN
    long n = full * scale / 10;
#else
    long n = full * scale;
#endif
    return n > 0 ? n : 1;
}

/* xorshift64*: a deterministic per-thread random stream for tests. */
static inline uint64_t pa_rand_next(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

#endif /* PA_TEST_H */
