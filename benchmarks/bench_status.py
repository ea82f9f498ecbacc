"""`prealloc status` against reading the same journal by hand, in one run.

What is compared, as a user would run them (a fresh process each time, wall time):

- ``prealloc status --dir D --socket NONE`` (no broker answers: the local source) — the
  journal read with its reader, each owner checked by pid and start time, the core
  registry read, the table formatted;
- ``ls -l D && cat D/*.json`` through ``sh -c`` — the hand-made look at the same files,
  which checks nothing (no owner, no trust, no registry);

with 0 and with N (default 1000) journal entries, made by ``journal.Journal.record``
(reserve_file entries of this live process), interleaved round by round. Also the
in-process cost of :func:`prealloc.status.collect` + ``format_text`` (no interpreter
start) and the start of an interpreter that only imports ``prealloc.cli`` (the floor of
every ``prealloc`` command), to tell the import from the reading. Reports medians and the ratio status / ls+cat.

    python benchmarks/bench_status.py [--entries N] [--rounds R]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prealloc import journal, status


def make_journal(directory: Path, entries: int) -> None:
    directory.mkdir(mode=0o700)
    recorder = journal.Journal(directory)
    for i in range(entries):
        recorder.record_reserve_file(directory.parent / f"reserve-{i}")


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        dirs = {0: base / "empty" / "journal", args.entries: base / "full" / "journal"}
        for count, directory in dirs.items():
            directory.parent.mkdir()
            make_journal(directory, count)
        no_broker = str(base / "no-broker.sock")
        times: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.rounds):
            for count, directory in dirs.items():
                commands = {
                    "prealloc status": [sys.executable, "-m", "prealloc", "status", "--dir", str(directory),
                                        "--socket", no_broker],
                    "ls -l + cat": ["sh", "-c", f"ls -l '{directory}' && cat '{directory}'/*.json 2>/dev/null"],
                    "import prealloc": [sys.executable, "-c", "import prealloc.cli"],
                }
                for name, argv in commands.items():
                    times.setdefault((count, name), []).append(wall(argv))
                t0 = time.perf_counter()
                data = status.collect(journal_dir=directory, socket_path=no_broker)
                status.format_text(data)
                times.setdefault((count, "collect + format, in process"), []).append(time.perf_counter() - t0)
                assert len(data["journal"]["entries"]) == count
        print(f"{args.rounds} rounds, interleaved; median wall time in ms (python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f})")
        print(f"{'entries':>8}  {'prealloc status':>16}  {'ls -l + cat':>12}  {'ratio':>6}  {'collect+format':>15}"
              f"  {'import prealloc.cli':>20}")
        for count in dirs:
            ours = statistics.median(times[(count, "prealloc status")]) * 1e3
            theirs = statistics.median(times[(count, "ls -l + cat")]) * 1e3
            inner = statistics.median(times[(count, "collect + format, in process")]) * 1e3
            floor = statistics.median(times[(count, "import prealloc")]) * 1e3
            print(f"{count:>8}  {ours:>16.1f}  {theirs:>12.1f}  {ours / theirs:>5.1f}x  {inner:>15.1f}  {floor:>20.1f}")


if __name__ == "__main__":
    main()
