#!/usr/bin/env python3
"""Mutation check of the native core: break one line, run the tests that must notice.

For every mutant in the given *.mutants files (default: every one in this directory) the
script applies it to a private copy of the C sources, rebuilds that copy (plain
RelWithDebInfo, no sanitizers) and runs the named tests. A mutant is KILLED when those
tests fail (or time out), SURVIVED when they pass, and INVALID when its text is not found
exactly once or the mutated core does not build. The working tree is never modified: other
people may be building it. Exit status: 0 when every mutant was killed, 1 otherwise.

File format (one or more blocks, separated by blank lines; lines starting with # are
comments):

    name: table generation wraps to 0
    file: src/native/table.c
    find: return g == UINT32_MAX ? 1u : g + 1u;
    replace: return g + 1u;
    kills: ^test_table$
    when: root            (optional: run only as root; skipped otherwise)

- file: a path relative to the repository root.
- find: exact text that must occur exactly once in the file; replace: what it becomes
  (may be empty, which deletes it). In both, the escapes \\n (newline), \\t (tab) and
  \\\\ (backslash) let one line stand for several.
- kills: a ctest -R regular expression naming the tests that must fail; or, prefixed with
  "cmd:", a shell command run in the build directory that must exit non-zero.

Usage: tests/mutants/run_mutants.py [--build-dir DIR] [--jobs N] [--only SUBSTRING] [FILES...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KEYS = {"name", "file", "find", "replace", "kills", "when"}
COPIED = ["CMakeLists.txt", "src/native", "tests/c", "benchmarks/c"]  # tests/c includes benchmarks/c/mound.h
TEST_TIMEOUT_S = 120


@dataclass
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    kills: str
    when: str
    origin: str


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append({"n": "\n", "t": "\t", "\\": "\\"}.get(text[i + 1], "\\" + text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse(path: Path) -> list[Mutant]:
    mutants: list[Mutant] = []
    block: dict[str, str] = {}
    start = 0

    def flush() -> None:
        if not block:
            return
        missing = {"name", "file", "find", "kills"} - block.keys()
        if missing:
            raise SystemExit(f"{path}:{start}: mutant lacks {', '.join(sorted(missing))}")
        mutants.append(Mutant(block["name"], block["file"], unescape(block["find"]),
                              unescape(block.get("replace", "")), block["kills"],
                              block.get("when", ""), f"{path.name}:{start}"))
        block.clear()

    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            flush()
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in KEYS:
            raise SystemExit(f"{path}:{number}: expected 'key: value' with key in {sorted(KEYS)}")
        if not block:
            start = number
        key = key.strip()
        if key in block:
            raise SystemExit(f"{path}:{number}: {key} given twice in one mutant")
        block[key] = value[1:] if value.startswith(" ") else value
    flush()
    return mutants


def run(cmd: list[str] | str, cwd: Path, timeout: float | None = None, shell: bool = False) -> subprocess.CompletedProcess:
    """Runs cmd in a session of its own; at the timeout the whole session is killed, not
    only cmd: a mutant's test that spins would otherwise outlive the ctest that started it
    and load the machine for the mutants after it (and everything else) until killed."""
    with subprocess.Popen(cmd, cwd=cwd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything cmd left behind in its session
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def build(build_dir: Path, jobs: int) -> bool:
    return run(["cmake", "--build", str(build_dir), "-j", str(jobs)], build_dir).returncode == 0


def tests_fail(mutant: Mutant, build_dir: Path) -> bool:
    """True when the mutant's tests fail (or hang)."""
    try:
        if mutant.kills.startswith("cmd:"):
            done = run(mutant.kills[4:].strip(), build_dir, timeout=TEST_TIMEOUT_S * 4, shell=True)
        else:
            done = run(["ctest", "--test-dir", str(build_dir), "-R", mutant.kills, "--timeout", str(TEST_TIMEOUT_S),
                        "--no-tests=error"], build_dir, timeout=TEST_TIMEOUT_S * 4)
    except subprocess.TimeoutExpired:
        return True
    return done.returncode != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--build-dir", type=Path, help="where the private copy is built (default: a temp dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", help="run only mutants whose name contains this")
    args = parser.parse_args()

    files = args.files or sorted(HERE.glob("*.mutants"))
    mutants = [m for f in files for m in parse(f)]
    if args.only:
        mutants = [m for m in mutants if args.only in m.name]
    if not mutants:
        print("no mutants", file=sys.stderr)
        return 1
    is_root = os.geteuid() == 0

    work = args.build_dir or Path(tempfile.mkdtemp(prefix="pa-mutants-"))
    source, build_dir = work / "src-copy", work / "build"
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    for item in COPIED:
        origin = ROOT / item
        (shutil.copytree if origin.is_dir() else shutil.copy2)(origin, source / item)
    started = time.monotonic()
    configure = run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DPA_BUILD_TESTS=ON",
                     "-DPA_BUILD_BENCHMARKS=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], work)
    if configure.returncode != 0 or not build(build_dir, args.jobs):
        print("the unmutated copy does not configure/build:\n" + configure.stderr, file=sys.stderr)
        return 1

    # The unmutated tests must pass, or "killed" would mean nothing.
    baseline = "|".join(sorted({f"({m.kills})" for m in mutants if not m.kills.startswith("cmd:")}))
    if baseline:
        done = run(["ctest", "--test-dir", str(build_dir), "-R", baseline, "--timeout", str(TEST_TIMEOUT_S)], build_dir)
        if done.returncode != 0:
            print("the unmutated tests fail; fix them first:\n" + done.stdout[-3000:], file=sys.stderr)
            return 1

    verdicts: dict[str, int] = {"killed": 0, "survived": 0, "invalid": 0, "skipped": 0}
    for mutant in mutants:
        note = ""
        if mutant.when == "root" and not is_root:
            verdict, note = "skipped", "needs root"
        else:
            target = source / mutant.file
            original = target.read_text()
            count = original.count(mutant.find)
            if count != 1:
                verdict, note = "invalid", f"find text occurs {count} times"
            else:
                try:
                    target.write_text(original.replace(mutant.find, mutant.replace))
                    if not build(build_dir, args.jobs):
                        verdict, note = "invalid", "does not build"
                    else:
                        verdict = "killed" if tests_fail(mutant, build_dir) else "survived"
                finally:
                    target.write_text(original)
        verdicts[verdict] += 1
        note = f"; {note}" if note else ""
        print(f"{verdict.upper():9} {mutant.name}  ({mutant.origin}; kills: {mutant.kills}{note})", flush=True)
    build(build_dir, args.jobs)  # leave the copy unmutated
    if not args.build_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{verdicts['killed']} killed, {verdicts['survived']} survived, {verdicts['invalid']} invalid, "
          f"{verdicts['skipped']} skipped of {len(mutants)} in {time.monotonic() - started:.0f} s")
    return 0 if verdicts["survived"] == 0 and verdicts["invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
