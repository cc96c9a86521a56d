#!/usr/bin/env bash
# test.sh - the whole test suite, as CI runs it (.ci/run calls this).
#
#   1. dependencies, Release build and the demo model (scripts/setup.sh, idempotent)
#   2. unit tests, and the tests labelled asan, under AddressSanitizer +
#      UndefinedBehaviorSanitizer (build/asan: -O1, no CUDA)
#   3. model, fixture, CLI, KV store and serving tests in Release
#      (build/release, CUDA compiled where nvcc exists; the CUDA tests skip
#      without a device)
#   4. the serving tests that feed the server hostile or interrupted input,
#      again against the ASan + UBSan build
#   5. ThreadSanitizer: thread pool, step engine, coordinator (scripts/tsan.sh)
#   6. the fast planted bugs, each of which must fail the suite (scripts/mutate.sh --fast)
#   7. the libFuzzer targets side by side for a bounded time (EKV_FUZZ_SECONDS, 45 in CI)
#
# Each stage prints its wall time; the whole run took 23 to 38 minutes on
# 2 cores in the last clean-clone runs (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
t0=$SECONDS
stage() { echo "== [$((SECONDS - t0)) s] $*"; }

stage "setup (packages, venv, Release build, model)"
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1

# The fuzz targets' clang build (two to three minutes alone) runs from here
# on at the lowest priority, on the cycles the stages below leave idle.
mkdir -p build
nice -n 19 bash scripts/fuzz.sh --build-only >build/fuzz-build.log 2>&1 &
fuzz_build=$!
trap 'kill "$fuzz_build" 2>/dev/null || true' EXIT

stage "unit tests and the tests labelled asan (ASan + UBSan)"
# -O1 (what ASan's documentation recommends) keeps every check ASan and
# UBSan make; CUDA is compiled once, in the Release build.
cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-O1 -g" \
    -DEKV_SANITIZE=ON -DEKV_CUDA=OFF >/dev/null
cmake --build build/asan -j"$jobs"
ctest --test-dir build/asan -L 'unit|asan' --output-on-failure -j"$jobs"

stage "model, fixture, CLI, KV store and serving tests (Release)"
cmake --build build/release -j"$jobs"
ctest --test-dir build/release -L 'model|cli|serve|kvstore' --output-on-failure -j"$jobs"

stage "serving tests with hostile or interrupted input (ASan + UBSan)"
ctest --test-dir build/asan -L serve --output-on-failure -j"$jobs"

stage "ThreadSanitizer (thread pool, step engine, coordinator)"
bash scripts/tsan.sh

stage "planted bugs, fast subset (scripts/mutate.sh --fast)"
MUTATE_BASELINE=0 bash scripts/mutate.sh --fast # stage 3 ran these tests unmutated

stage "fuzzing (${EKV_FUZZ_SECONDS:-45} s per target, side by side)"
if ! wait "$fuzz_build"; then
    cat build/fuzz-build.log >&2
    echo "test.sh: the fuzz targets did not build" >&2
    exit 1
fi
bash scripts/fuzz.sh "${EKV_FUZZ_SECONDS:-45}"

stage "all tests passed"
