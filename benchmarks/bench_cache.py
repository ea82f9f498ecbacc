"""CACHE_SPACE effectiveness on programs no one here wrote: how much of a cold start
prealloc's page-cache warming removes, side by side with the alternatives, in one run.

Workloads
  numpy    ``python -c "import numpy"`` (this interpreter, its numpy)
  sqlite   the ``sqlite3`` CLI: 2000 indexed point lookups in a ~200 MB database the
           benchmark builds (``--db-mib``)
  gcc      ``gcc -O2 -c`` of src/native/memory.c (a real C file; its headers and cc1)

Variants, interleaved in every round (order shuffled per round, seeded)
  cold      caches dropped, then the program runs
  prealloc  caches dropped, CacheSpaceStrategy.allocate warms the profile recorded once
            with ``prealloc record`` (the same recorder as the CLI), then the program runs
  warm      the program ran just before (everything it reads is cached)
  vmtouch   caches dropped, ``vmtouch -t`` of the same file set, then the program runs

"Need to done" is the program's wall time after the warming finished (the need arrives
when warming is done: prealloc warms ahead of it); "warming" is the warming step's own
time (prealloc's allocate vs ``vmtouch -t``). Between rounds: ``sync; echo 3 >
/proc/sys/vm/drop_caches`` as root (``--drop all``, the default there), else
POSIX_FADV_DONTNEED of every file in the profiles (``--drop files``; directory entries
and inodes then stay cached, so cold is less cold). Medians over ``--rounds`` (7).

    python benchmarks/bench_cache.py                 # the full table (root: drop_caches)
    python benchmarks/bench_cache.py --quick         # one small round (CI smoke)
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prealloc.profiles import Profile, load_profile, record
from prealloc.strategies import CacheSpaceStrategy
from prealloc.types import RequestMetadata, ResourceRequest, ResourceType

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
VARIANTS = ("cold", "prealloc", "warm", "vmtouch")


def build_database(path: Path, mib: int) -> Path:
    """A table of `mib` MiB of 500-byte rows with an index on a random key; the keys
    of 2000 rows go to path.keys (the lookups)."""
    keys_path = path.with_suffix(".sql")
    if path.exists() and keys_path.exists() and path.stat().st_size >= mib * MiB * 0.9:
        return keys_path
    path.unlink(missing_ok=True)
    rows = mib * MiB // 560
    db = sqlite3.connect(path)
    db.executescript(f"""
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB);
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
        INSERT INTO t(k, v) SELECT abs(random()), randomblob(500) FROM c;
        CREATE INDEX t_k ON t(k);
    """)
    rng = random.Random(7)
    ids = rng.sample(range(1, rows + 1), min(2000, rows))
    keys = [db.execute("SELECT k FROM t WHERE id = ?", (i,)).fetchone()[0] for i in ids]
    db.close()
    keys_path.write_text(f"SELECT count(*), sum(length(v)) FROM t WHERE k IN ({','.join(map(str, keys))});\n")
    return keys_path


def workloads(workdir: Path, db_mib: int) -> dict[str, dict]:
    out: dict[str, dict] = {
        "numpy": {"cmd": [sys.executable, "-c", "import numpy"]},
        "gcc": {"cmd": ["gcc", "-O2", "-c", str(REPO / "src/native/memory.c"), "-I",
                        str(REPO / "src/native/include"), "-o", os.devnull]},
    }
    if shutil.which("sqlite3"):
        db = workdir / "bench.db"
        query = build_database(db, db_mib)
        out["sqlite"] = {"cmd": ["sqlite3", "-readonly", str(db)], "stdin": query}
    if not shutil.which("gcc"):
        del out["gcc"]
    return out


def run(work: dict) -> float:
    stdin = open(work["stdin"], "rb") if "stdin" in work else subprocess.DEVNULL
    try:
        started = time.perf_counter()
        subprocess.run(work["cmd"], stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - started
    finally:
        if "stdin" in work:
            stdin.close()


def drop(mode: str, profiles: list[Profile]) -> None:
    if mode == "all":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for profile in profiles:
        for entry in profile.files:
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--db-mib", type=int, default=200)
    parser.add_argument("--drop", choices=("all", "files"), default="all" if os.geteuid() == 0 else "files")
    parser.add_argument("--workdir", default=os.environ.get("PREALLOC_BENCH_DIR", "/var/tmp/prealloc-bench-cache"))
    parser.add_argument("--only", action="append", default=None, help="run only this workload (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one round, an 8 MiB database, --drop files")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.db_mib, args.drop = 1, 8, "files"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    profile_dir = workdir / "profiles"
    works = workloads(workdir, args.db_mib)
    if args.only:
        works = {k: v for k, v in works.items() if k in args.only}
    vmtouch = shutil.which("vmtouch")

    # one recording per workload, as `prealloc record --name bench-X -- CMD` would make
    profiles: dict[str, Profile] = {}
    for name, work in works.items():
        cmd = work["cmd"]
        if "stdin" in work:  # record through a shell so the query file is read too
            cmd = ["sh", "-c", f'exec "$@" < {work["stdin"]}', "sh", *cmd]
        profile = record(cmd, name=f"bench-{name}", seconds=60, directory=profile_dir)
        profiles[name] = load_profile(profile.name, profile_dir)
    strategy = CacheSpaceStrategy(roots=["/"], profile_dir=profile_dir)

    times: dict[str, dict[str, list[float]]] = {n: {v: [] for v in VARIANTS} for n in works}
    warming: dict[str, dict[str, list[float]]] = {n: {"prealloc": [], "vmtouch": []} for n in works}
    resident: dict[str, list[float]] = {n: [] for n in works}
    rng = random.Random(11)
    all_profiles = list(profiles.values())
    load_start = os.getloadavg()  # the machine may be shared: say how loaded it was
    for _ in range(args.rounds):
        for name, work in works.items():
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                if variant == "vmtouch" and vmtouch is None:
                    continue
                if variant == "warm":
                    run(work)
                else:
                    drop(args.drop, all_profiles)
                if variant == "prealloc":
                    profile = profiles[name]
                    request = ResourceRequest(ResourceType.CACHE_SPACE, profile.total_bytes / MiB + 1,
                                              metadata=RequestMetadata(custom_properties={"profile": profile.name}))
                    started = time.perf_counter()
                    grant = strategy.allocate(request, request.predicted_need, None)
                    warming[name]["prealloc"].append(time.perf_counter() - started)
                    details = strategy.describe(grant.handle)
                    resident[name].append(details["bytes_resident_after"] / max(1, details["bytes_requested"]))
                    try:
                        times[name][variant].append(run(work))
                    finally:
                        strategy.release(grant.handle)
                    continue
                if variant == "vmtouch":
                    started = time.perf_counter()
                    subprocess.run([vmtouch, "-tq", *(e.path for e in profiles[name].files)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    warming[name]["vmtouch"].append(time.perf_counter() - started)
                times[name][variant].append(run(work))

    load = os.getloadavg()
    results: dict = {"rounds": args.rounds, "drop": args.drop, "workloads": {},
                     "loadavg": {"start": load_start, "end": load}}
    print(f"\nrounds={args.rounds} drop={args.drop} db={args.db_mib} MiB  (medians, ms); "
          f"load average {load_start[0]:.1f} at the start, {load[0]:.1f} at the end")
    print("| workload | files | MiB | cold | prealloc | warm | vmtouch -t | cold/prealloc | prealloc/warm "
          "| warming: prealloc | warming: vmtouch -t |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in works:
        med = {v: statistics.median(t) * 1e3 if t else float("nan") for v, t in times[name].items()}
        warm_med = {v: statistics.median(t) * 1e3 if t else float("nan") for v, t in warming[name].items()}
        profile = profiles[name]
        row = {"files": len(profile.files), "mib": profile.total_bytes / MiB, "method": profile.method,
               "need_to_done_ms": med, "warming_ms": warm_med,
               "resident_fraction": min(resident[name]) if resident[name] else None}
        results["workloads"][name] = row
        print(f"| {name} | {len(profile.files)} | {profile.total_bytes / MiB:.0f} | {med['cold']:.0f} | "
              f"{med['prealloc']:.0f} | {med['warm']:.0f} | {med['vmtouch']:.0f} | "
              f"{med['cold'] / med['prealloc']:.2f}x | {med['prealloc'] / med['warm']:.2f} | "
              f"{warm_med['prealloc']:.0f} | {warm_med['vmtouch']:.0f} |")
    print("profiles recorded with: " + ", ".join(f"{n}={p.method}" for n, p in profiles.items()))
    return results


if __name__ == "__main__":
    main()
