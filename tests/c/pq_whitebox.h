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
#define pa_pq_pop wb_pq_pop
#define pa_pq_pop_many wb_pq_pop_many
#define pa_pq_pop_items wb_pq_pop_items
#define pa_pq_peek wb_pq_peek
#define pa_pq_cancel wb_pq_cancel
#define pa_pq_size wb_pq_size
#include "../../src/native/pq.c"

#endif
