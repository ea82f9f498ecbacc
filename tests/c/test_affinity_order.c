/*
 * test_affinity_order.c — the core registry's targets over many reservations, checked
 * through sched_getaffinity:
 *
 *   test_release_in_every_order   three reservations ({0}, {1}, {0,1}) applied to one
 *                                 thread in each of the 6 orders and released in each of
 *                                 the 6 orders: after every release the thread runs on the
 *                                 newest live reservation's cores, or its original mask.
 *   test_resize_moves_only_newest resizing a reservation that is not a target's newest
 *                                 leaves the target alone.
 *   test_reused_pid_not_repinned  (root: a private pid namespace, ns_last_pid) a process
 *                                 that gets the pid of an exited target keeps its mask when
 *                                 the reservation is released.
 *   test_fork_child_leaves_pins   a child of fork gets -EOWNERDEAD from the inherited
 *                                 registry, and its destroy does not unpin the parent.
 *   test_null_arguments           NULL is -EINVAL, never a crash.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pa_test.h"
#include "prealloc/affinity.h"

static pa_cpumask_t thread_mask(void) {
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    (void)pa_affinity_get(0, &m);
    return m;
}

static pa_cpumask_t mask_of(unsigned a, int b) {
    pa_cpumask_t m;
    pa_cpumask_zero(&m);
    pa_cpumask_set(&m, a);
    if (b >= 0) pa_cpumask_set(&m, (unsigned)b);
    return m;
}

static const int perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};

static void test_release_in_every_order(void) {
    pa_cpumask_t original = thread_mask();
    if (pa_cpumask_count(&original) < 2) {
        fprintf(stderr, "  skipped: needs 2 allowed cpus\n");
        return;
    }
    unsigned c0 = 0, c1 = 0, seen = 0;
    for (unsigned cpu = 0; cpu < PA_CPU_MAX && seen < 2; cpu++)
        if (pa_cpumask_test(&original, cpu)) (seen++ == 0 ? (c0 = cpu) : (c1 = cpu));
    pa_cpumask_t masks[3] = {mask_of(c0, -1), mask_of(c1, -1), mask_of(c0, (int)c1)};
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    int wrong = 0;
    for (int a = 0; a < 6; a++) {
        for (int b = 0; b < 6; b++) {
            pa_core_reservation_t res[3];
            for (int i = 0; i < 3; i++) REQUIRE(pa_cores_reserve_mask(cores, &masks[i], false, &res[i]) == 0);
            int live[3], live_count = 0; /* reservation numbers, oldest apply first */
            for (int i = 0; i < 3; i++) {
                REQUIRE(pa_cores_apply(cores, res[perms[a][i]], 0, false) == 0);
                live[live_count++] = perms[a][i];
            }
            for (int i = 0; i < 3; i++) {
                int gone = perms[b][i];
                CHECK_EQ_INT(pa_cores_release(cores, res[gone]), 0);
                int k = 0;
                for (int j = 0; j < live_count; j++)
                    if (live[j] != gone) live[k++] = live[j];
                live_count = k;
                pa_cpumask_t expected = live_count ? masks[live[live_count - 1]] : original;
                pa_cpumask_t now = thread_mask();
                if (!pa_cpumask_equal(&now, &expected)) {
                    wrong++;
                    fprintf(stderr, "  apply order %d, release order %d, after %d releases: wrong mask\n", a, b, i + 1);
                }
            }
        }
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(pa_cores_live(cores), 0);
    pa_cores_destroy(cores);
    pa_cpumask_t now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &original));
}

static void test_resize_moves_only_newest(void) {
    pa_cpumask_t original = thread_mask();
    if (pa_cpumask_count(&original) < 2) return;
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    pa_core_reservation_t older, newer;
    REQUIRE(pa_cores_reserve(cores, 1, false, NULL, &older) == 0);
    REQUIRE(pa_cores_reserve(cores, 1, false, NULL, &newer) == 0);
    REQUIRE(pa_cores_apply(cores, older, 0, false) == 0);
    REQUIRE(pa_cores_apply(cores, newer, 0, false) == 0);
    pa_cpumask_t newer_mask, now;
    REQUIRE(pa_cores_get(cores, newer, &newer_mask, NULL) == 0);
    CHECK_EQ_INT(pa_cores_resize(cores, older, 2), 0);
    now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &newer_mask));
    CHECK_EQ_INT(pa_cores_release(cores, newer), 0);
    pa_cpumask_t older_mask;
    REQUIRE(pa_cores_get(cores, older, &older_mask, NULL) == 0);
    CHECK_EQ_INT(pa_cpumask_count(&older_mask), 2);
    now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &older_mask));
    pa_cores_destroy(cores);
    now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &original));
}

static void sleep_forever(void) {
    for (;;) pause();
}

/* Runs as pid 1 of a fresh pid namespace with its own /proc. Exit status: 0 pass,
 * 1 fail, 77 cannot set up. */
static int reuse_in_namespace(pa_cpumask_t all, unsigned c0, unsigned c1) {
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return 77;
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) return 77;
    pa_cpumask_t only_c1 = mask_of(c1, -1), only_c0 = mask_of(c0, -1);
    /* the victim starts on {c1}: that is what a wrong restore would put back */
    if (pa_affinity_set_thread(0, &only_c1) != 0) return 77;
    pid_t victim = fork();
    if (victim == 0) sleep_forever();
    if (pa_affinity_set_thread(0, &all) != 0) return 77;
    pa_cores_t *cores;
    pa_core_reservation_t r;
    if (pa_cores_create(&all, &cores) != 0) return 77;
    if (pa_cores_reserve_mask(cores, &only_c0, true, &r) != 0) return 1;
    if (pa_cores_apply(cores, r, victim, true) != 0) return 1;
    kill(victim, SIGKILL);
    waitpid(victim, NULL, 0);
    int fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY);
    if (fd < 0) return 77;
    char last[16];
    int len = snprintf(last, sizeof(last), "%d", (int)victim - 1);
    if (write(fd, last, (size_t)len) != len) return 77;
    close(fd);
    pid_t reused = fork();
    if (reused == 0) sleep_forever();
    if (reused != victim) {
        kill(reused, SIGKILL);
        return 77;
    }
    int rc = 0;
    if (pa_cores_release(cores, r) != 0) rc = 1;
    pa_cpumask_t now;
    if (pa_affinity_get(reused, &now) != 0 || !pa_cpumask_equal(&now, &all)) rc = 1;
    pa_cores_destroy(cores);
    kill(reused, SIGKILL);
    waitpid(reused, NULL, 0);
    return rc;
}

static void test_reused_pid_not_repinned(void) {
    pa_cpumask_t all = thread_mask();
    unsigned c0 = 0, c1 = 0, seen = 0;
    for (unsigned cpu = 0; cpu < PA_CPU_MAX && seen < 2; cpu++)
        if (pa_cpumask_test(&all, cpu)) (seen++ == 0 ? (c0 = cpu) : (c1 = cpu));
    if (seen < 2) {
        fprintf(stderr, "  skipped: needs 2 allowed cpus\n");
        return;
    }
    pid_t outer = fork();
    REQUIRE(outer >= 0);
    if (outer == 0) {
        alarm(30);
        if (unshare(CLONE_NEWPID | CLONE_NEWNS) != 0) _exit(77);
        pid_t init = fork();
        if (init == 0) _exit(reuse_in_namespace(all, c0, c1));
        int status = 0;
        waitpid(init, &status, 0);
        _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
    }
    int status = 0;
    REQUIRE(waitpid(outer, &status, 0) == outer);
    REQUIRE(WIFEXITED(status));
    if (WEXITSTATUS(status) == 77) {
        fprintf(stderr, "  skipped: needs CAP_SYS_ADMIN for a pid namespace and ns_last_pid\n");
        return;
    }
    CHECK_EQ_INT(WEXITSTATUS(status), 0);
}

static void test_fork_child_leaves_pins(void) {
    pa_cpumask_t original = thread_mask();
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    pa_core_reservation_t r;
    REQUIRE(pa_cores_reserve(cores, 1, true, NULL, &r) == 0);
    pa_cpumask_t m;
    REQUIRE(pa_cores_get(cores, r, &m, NULL) == 0);
    REQUIRE(pa_cores_apply(cores, r, 0, true) == 0); /* this whole process */
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        alarm(30);
        int bad = pa_cores_release(cores, r) != -EOWNERDEAD;
        bad |= pa_cores_live(cores) != 0;
        pa_cores_destroy(cores);
        _exit(bad);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    pa_cpumask_t now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &m)); /* the child did not unpin us */
    CHECK_EQ_INT(pa_cores_live(cores), 1);
    pa_cores_destroy(cores);
    now = thread_mask();
    CHECK(pa_cpumask_equal(&now, &original));
}

static void test_null_arguments(void) {
    pa_cpumask_t m = thread_mask();
    pa_core_reservation_t r;
    uint64_t ticks;
    CHECK_EQ_INT(pa_cores_create(NULL, NULL), -EINVAL);
    CHECK_EQ_INT(pa_cores_reserve(NULL, 1, false, NULL, &r), -EINVAL);
    CHECK_EQ_INT(pa_cores_reserve_mask(NULL, &m, false, &r), -EINVAL);
    CHECK_EQ_INT(pa_cores_apply(NULL, 1, 0, false), -EINVAL);
    CHECK_EQ_INT(pa_cores_resize(NULL, 1, 1), -EINVAL);
    CHECK_EQ_INT(pa_cores_release(NULL, 1), -EINVAL);
    CHECK_EQ_INT(pa_cores_get(NULL, 1, &m, NULL), -EINVAL);
    CHECK_EQ_INT(pa_cores_available(NULL, &m, NULL), -EINVAL);
    CHECK_EQ_INT(pa_cores_live(NULL), 0);
    pa_cores_destroy(NULL);
    pa_cores_t *cores;
    REQUIRE(pa_cores_create(NULL, &cores) == 0);
    CHECK_EQ_INT(pa_cores_reserve(cores, 1, false, NULL, NULL), -EINVAL);
    CHECK_EQ_INT(pa_cores_reserve_mask(cores, NULL, false, &r), -EINVAL);
    pa_cores_destroy(cores);
    CHECK_EQ_INT(pa_affinity_get(0, NULL), -EINVAL);
    CHECK_EQ_INT(pa_affinity_set_thread(0, NULL), -EINVAL);
    CHECK_EQ_INT(pa_affinity_set_process(0, NULL, NULL), -EINVAL);
    CHECK_EQ_INT(pa_affinity_restore(NULL), -EINVAL);
    CHECK_EQ_INT(pa_cpus_online(NULL), -EINVAL);
    CHECK_EQ_INT(pa_task_start_time(0, NULL), -EINVAL);
    CHECK_EQ_INT(pa_task_start_time(0, &ticks), 0);
    CHECK(ticks > 0);
}

int main(void) {
    RUN_TEST(test_release_in_every_order);
    RUN_TEST(test_resize_moves_only_newest);
    RUN_TEST(test_reused_pid_not_repinned);
    RUN_TEST(test_fork_child_leaves_pins);
    RUN_TEST(test_null_arguments);
    TEST_MAIN_END();
}
