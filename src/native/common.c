/* common.c — status names, the status machine's edges, the monotonic clock. */
#define _GNU_SOURCE
#include "prealloc/common.h"

#include <time.h>

static const char *const status_names[PA_STATUS_COUNT] = {
    "PENDING", "ALLOCATED", "ACTIVE", "RELEASING", "RELEASED", "FAILED", "EXPIRED",
};

/* legal_next[from] = bitmask of statuses reachable in one step; see common.h. */
static const uint32_t legal_next[PA_STATUS_COUNT] = {
    [PA_STATUS_PENDING] = PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_FAILED) |
                          PA_STATUS_BIT(PA_STATUS_EXPIRED) | PA_STATUS_BIT(PA_STATUS_RELEASED),
    [PA_STATUS_ALLOCATED] = PA_STATUS_BIT(PA_STATUS_ACTIVE) | PA_STATUS_BIT(PA_STATUS_RELEASING) |
                            PA_STATUS_BIT(PA_STATUS_EXPIRED) | PA_STATUS_BIT(PA_STATUS_FAILED),
    [PA_STATUS_ACTIVE] = PA_STATUS_BIT(PA_STATUS_RELEASING) | PA_STATUS_BIT(PA_STATUS_EXPIRED),
    [PA_STATUS_RELEASING] = PA_STATUS_BIT(PA_STATUS_RELEASED) | PA_STATUS_BIT(PA_STATUS_FAILED) |
                            PA_STATUS_BIT(PA_STATUS_ALLOCATED) | PA_STATUS_BIT(PA_STATUS_ACTIVE),
    [PA_STATUS_RELEASED] = 0,
    [PA_STATUS_FAILED] = 0,
    [PA_STATUS_EXPIRED] = 0,
};

const char *pa_status_name(unsigned status) {
    return status < PA_STATUS_COUNT ? status_names[status] : "?";
}

bool pa_status_transition_legal(unsigned from, unsigned to) {
    if (from >= PA_STATUS_COUNT || to >= PA_STATUS_COUNT) return false;
    return (legal_next[from] & PA_STATUS_BIT(to)) != 0;
}

uint64_t pa_clock_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
