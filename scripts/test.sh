#!/usr/bin/env bash
# test.sh - the whole test suite, as CI runs it (.ci/run calls this).
#
#   1. dependencies, Release build and the demo model (scripts/setup.sh, idempotent)
#   2. unit tests, and the tests labelled asan, under AddressSanitizer +
#      UndefinedBehaviorSanitizer (build/asan)
#   3. model, fixture, CLI, KV store and serving tests in Release (build/release), then
#      the serving tests again against the ASan + UBSan build
#   4. the libFuzzer targets for a bounded time (EKV_FUZZ_SECONDS, default 60 each)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== unit tests and the tests labelled asan (ASan + UBSan)"
cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DEKV_SANITIZE=ON >/dev/null
cmake --build build/asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build/asan -L 'unit|asan' --output-on-failure -j"$jobs"

echo "== model, fixture, CLI and serving tests (Release)"
cmake --build build/release -j"$jobs"
ctest --test-dir build/release -L 'model|cli|serve|kvstore' --output-on-failure

echo "== serving tests (ASan + UBSan; real clients against the sanitized server)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build/asan -L serve --output-on-failure

echo "== fuzzing (${EKV_FUZZ_SECONDS:-60} s per target)"
bash scripts/fuzz.sh "${EKV_FUZZ_SECONDS:-60}"

echo "== all tests passed"
