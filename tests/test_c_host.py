"""A C host links the core from the installed package: headers from
prealloc.get_include(), the static library from prealloc.get_library_dir()."""
from __future__ import annotations

import subprocess
from pathlib import Path

from osutil import build_c_host

HOST = r"""
#include <prealloc/prealloc.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    pa_table_t *table;
    if (pa_table_create(64, &table) != 0) return 1;
    pa_record_init_t init = {.status = PA_STATUS_ALLOCATED, .requested = 2.0, .allocated = 2.0};
    pa_id_t id;
    if (pa_table_insert(table, &init, &id) != 0) return 2;
    if (pa_table_transition(table, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_EXPIRED, NULL) != 0) return 3;
    if (pa_table_transition(table, id, PA_STATUS_BIT(PA_STATUS_ALLOCATED), PA_STATUS_RELEASING, NULL) != -EAGAIN) return 4;

    pa_pq_t *pq;
    if (pa_pq_create(0, &pq) != 0) return 5;
    pa_pq_push(pq, 1, 1.0, 0.5, NAN);
    pa_pq_push(pq, 2, 5.0, 0.5, NAN);
    pa_pq_item_t item;
    if (pa_pq_pop(pq, &item) != 1 || item.value != 2) return 6;  /* 1 popped, 0 empty, <0 -errno */

    pa_memory_t mem;
    if (pa_memory_reserve(&mem, 1 << 20, PA_MEM_POPULATE) != 0) return 7;
    memset(mem.addr, 1, mem.size);
    size_t resident = 0;
    pa_memory_resident(&mem, &resident);
    if (resident != mem.size) return 8;
    pa_memory_release(&mem);

    pa_cpumask_t mask;
    if (pa_affinity_get(0, &mask) != 0 || pa_cpumask_count(&mask) == 0) return 9;

    printf("host ok %s\n", pa_status_name(PA_STATUS_EXPIRED));
    pa_pq_destroy(pq);
    pa_table_destroy(table);
    return 0;
}
"""


def test_c_host_compiles_links_and_runs_against_the_installed_core(tmp_path: Path):
    exe = build_c_host(HOST, tmp_path, header="prealloc.h", optimize="-O0")
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.strip() == "host ok EXPIRED"
