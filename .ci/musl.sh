#!/usr/bin/env bash
# CI lane: build the C core and its C tests with musl (Debian's musl-tools gives
# musl-gcc) and run them, so the core keeps compiling and passing on Alpine-like
# systems (musllinux wheels). Installs musl-tools with apt-get when musl-gcc is missing.
# Usage: .ci/musl.sh [build-dir]   (default build/ci-musl)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=$(realpath -m "${1:-$ROOT/build/ci-musl}")

if ! command -v musl-gcc >/dev/null; then
  apt-get update -qq && apt-get install -y -qq musl-tools
fi

# musl-gcc searches musl's headers only; the core also needs the kernel's uapi headers
# (<linux/...>, <asm/...>). Give it exactly those, not glibc's: a directory of links.
KERNEL_HEADERS=$BUILD/kernel-headers
mkdir -p "$KERNEL_HEADERS"
MULTIARCH=$(gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")
for dir in /usr/include/linux /usr/include/asm-generic "/usr/include/$MULTIARCH/asm" /usr/include/mtd; do
  [ -d "$dir" ] && ln -sfn "$dir" "$KERNEL_HEADERS/$(basename "$dir")"
done

CC=musl-gcc cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPA_BUILD_TESTS=ON -DPA_BUILD_BENCHMARKS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS="-isystem $KERNEL_HEADERS" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
# every test binary must really be linked against musl (its interpreter ld-musl)
for exe in "$BUILD"/test_*; do
  [ -f "$exe" ] && [ -x "$exe" ] || continue
  readelf -l "$exe" | grep -q 'ld-musl' || { echo "$exe is not linked against musl" >&2; exit 1; }
done
ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)"
