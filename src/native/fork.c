/*
 * fork.c — the fork generation (see fork.h).
 */
#include "fork.h"

#include <pthread.h>
#include <stdatomic.h>

#include "atomics.h"

static _Atomic uint32_t pa__fork_gen;
static pthread_once_t pa__fork_once = PTHREAD_ONCE_INIT;

/* Runs in the child only, on the one thread that called fork(), before fork() returns
 * there: nothing else runs yet, so relaxed is enough. */
static void pa__fork_child(void) {
    pa__store_relaxed(&pa__fork_gen, pa__load_relaxed(&pa__fork_gen) + 1);
}

static void pa__fork_register(void) {
    /* Failure (ENOMEM) leaves the generation at 0 everywhere: objects then behave as
     * before this handler existed; nothing better can be done without memory. */
    (void)pthread_atfork(NULL, NULL, pa__fork_child);
}

uint32_t pa__fork_generation(void) {
    pthread_once(&pa__fork_once, pa__fork_register);
    /* relaxed: written only by the child handler, before any other thread exists in the
     * child; threads of this process that read it were created after that point */
    return pa__load_relaxed(&pa__fork_gen);
}
