/*
 * fork.h — internal: how the core tells an object inherited across fork() from one made
 * in this process.
 *
 * fork() copies memory but only the calling thread: in the child, a thread the parent
 * started does not exist, and a mutex that another thread of the parent held at the
 * moment of the fork stays locked forever. An object holding a thread or a mutex (the
 * expiry ticker, the core registry) records the process's fork generation when it is
 * created; a pthread_atfork child handler bumps the generation, so every such object
 * sees at its next call that it was inherited and neither joins a thread nor takes a
 * lock. The check is one relaxed load, cheaper than getpid() (a system call since glibc
 * 2.25). Which answer an inherited object gives is each component's contract (its
 * header, "fork").
 */
#ifndef PA_FORK_H
#define PA_FORK_H

#include <stdint.h>

/* The current fork generation: 0 in the process that first loaded the core, +1 in each
 * child created by fork() since. Registers the atfork handler on first use. */
uint32_t pa__fork_generation(void);

#endif /* PA_FORK_H */
