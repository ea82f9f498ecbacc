#!/usr/bin/env bash
# CI lane: the mutation check. Runs tests/mutants/run_mutants.py over every
# tests/mutants/*.mutants file on a plain build of a private copy of the C sources;
# exits non-zero if any mutant survives (or is invalid). Needs cmake, ninja and a C
# compiler (the CI venv has the first two).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
shopt -s nullglob
files=(tests/mutants/*.mutants)
if ((${#files[@]} == 0)); then
  echo "no tests/mutants/*.mutants files" >&2
  exit 1
fi
exec "$PY" tests/mutants/run_mutants.py --jobs "$(nproc)" "${files[@]}"
