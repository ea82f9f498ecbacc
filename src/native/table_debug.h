/*
 * table_debug.h — internal: a hook for the C tests only (not installed, not in the
 * public headers), so that a test reaches a generation wrap without 2^32 inserts.
 */
#ifndef PA_TABLE_DEBUG_H
#define PA_TABLE_DEBUG_H

#include "prealloc/table.h"

/* Sets the generation the next record of a free (or never-used) slot will carry.
 * -EINVAL (generation 0, index beyond the capacity), -EBUSY (the slot holds a record),
 * -ENOMEM. */
int pa__table_set_generation(pa_table_t *table, uint32_t index, uint32_t generation);

#endif /* PA_TABLE_DEBUG_H */
