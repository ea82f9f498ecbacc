/*
 * prealloc/prealloc.h — the umbrella header of the prealloc core.
 *
 * A C or C++ host includes this one header and links the static library that ships in the
 * Python wheel (prealloc.get_include() / prealloc.get_library_dir(); link with
 * -lprealloc_core -lpthread):
 *
 *   table.h     allocation table (generational ids, CAS status machine)
 *   wheel.h     hierarchical timer wheel and the expiry ticker thread
 *   pq.h        lock-free MPMC priority queue of requests
 *   memory.h    memory reservation (mmap, populate, mlock, THP, memfd)
 *   affinity.h  CPU affinity and the core reservation registry
 *   pagecache.h page-cache warming, pinning and residency (readahead, MADV_POPULATE_READ,
 *               cachestat / mincore)
 *   disk.h      disk space reservation (fallocate) and I/O priority (ioprio_set)
 *   client.h    the machine broker's client (`prealloc serve`: requests, claims by fd)
 */
#ifndef PREALLOC_PREALLOC_H
#define PREALLOC_PREALLOC_H

#include "common.h"
#include "table.h"
#include "wheel.h"
#include "pq.h"
#include "memory.h"
#include "affinity.h"
#include "pagecache.h"
#include "disk.h"
#include "client.h"

#endif /* PREALLOC_PREALLOC_H */
