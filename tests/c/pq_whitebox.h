/* The queue's own source, compiled into a white-box test: the test reaches its static
 * functions and types, and may define the hooks pq.c offers (PQ_RETIRE_HOOK,
 * PQ_GROUP_HOOK, PQ_INSERT_HOOK, PQ_TEST_LEVEL) before including this. The public names
 * are renamed wb_pq_* so that they do not clash with the core library the test also
 * links (whose pa_pq_* the test can still call, e.g. as a reference). */
#ifndef PA_TESTS_PQ_WHITEBOX_H
#define PA_TESTS_PQ_WHITEBOX_H

#define pa_pq_create wb_pq_create
#define pa_pq_destroy wb_pq_destroy
#define pa_pq_push wb_pq_push
#define pa_pq_push_many wb_pq_push_many
#define pa_pq_push_all wb_pq_push_all
#define pa_pq_pop wb_pq_pop
#define pa_pq_pop_many wb_pq_pop_many
#define pa_pq_pop_items wb_pq_pop_items
#define pa_pq_peek wb_pq_peek
#define pa_pq_cancel wb_pq_cancel
#define pa_pq_size wb_pq_size
#include "../../src/native/pq.c"

/* Whether the bucket of v holds an entry for v that is not marked removed (read while no
 * other thread changes the index). */
static inline bool wb_indexed_entry(pa_pq_t *pq, uint64_t v) {
    uintptr_t raw = pa__load_acquire(bucket_of(pq, v));
    while (raw) {
        pq_node_t *n = unmark(raw);
        uintptr_t next = pa__load_acquire(&node_ext(n)->hnext);
        if (n->value == v && !is_marked(next)) return true;
        raw = next;
    }
    return false;
}

#endif
