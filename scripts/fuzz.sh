#!/usr/bin/env bash
# fuzz.sh - build the libFuzzer targets with clang and run each one briefly.
#
# Usage: scripts/fuzz.sh [seconds-per-target]   (default 60)
#        scripts/fuzz.sh --build-only              (build the targets, run nothing)
#
# Every tests/fuzz/fuzz_<name>.c target runs for the given time, starting from
# a scratch copy of tests/fuzz/corpus/<name>/ under build/fuzz/ (or
# $EKV_FUZZ_BUILD), so the committed seeds never change. A crash, leak, sanitizer report or timeout
# leaves its input in build/fuzz/artifacts/<name>/ and makes this script exit
# non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

build_only=0
if [ "${1:-}" = --build-only ]; then # test.sh builds early, in the background
    build_only=1
    shift
fi
secs="${1:-60}"
case "$secs" in
    ''|*[!0-9]*) echo "fuzz.sh: seconds must be a whole number, got '$secs'" >&2; exit 2 ;;
esac
build="${EKV_FUZZ_BUILD:-build/fuzz}"

# EKV_FUZZ instruments the library too (fuzzer-no-link), not just the
# harness: without it libFuzzer sees no coverage inside the parsers.
cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Release \
    -DEKV_FUZZ=ON -DEKV_SANITIZE=ON -DEKV_CUDA=OFF -DEKV_TESTS=ON >/dev/null

targets=()
for src in tests/fuzz/fuzz_*.c; do
    [ -e "$src" ] || continue
    targets+=("$(basename "$src" .c)")
done
if [ ${#targets[@]} -eq 0 ]; then
    echo "fuzz.sh: no tests/fuzz/fuzz_*.c targets" >&2
    exit 2
fi
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
[ "$build_only" = 1 ] && exit 0

# The targets run side by side (each is one process), each for the given
# time, so the step takes about that long whatever the number of targets.
pids=()
names=()
for t in "${targets[@]}"; do
    name="${t#fuzz_}"
    work="$build/corpus-run/$name"
    art="$build/artifacts/$name"
    rm -rf "$work"
    mkdir -p "$work" "$art"
    if [ -d "tests/fuzz/corpus/$name" ]; then
        cp -R "tests/fuzz/corpus/$name/." "$work/"
    fi
    bin="$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)"
    if [ -z "$bin" ]; then
        echo "fuzz.sh: $t was not built" >&2
        exit 1
    fi
    echo "fuzz.sh: $t for ${secs}s (corpus $work, artifacts $art, log $build/$t.log)"
    # -timeout: a single input taking > 10 s is a hang; -rss_limit_mb keeps a
    # runaway allocation from taking the machine down with it.
    "$bin" "$work" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$art/" -print_final_stats=1 >"$build/$t.log" 2>&1 &
    pids+=($!)
    names+=("$t")
done
failed=0
for i in "${!pids[@]}"; do
    t="${names[$i]}"
    if wait "${pids[$i]}"; then
        echo "fuzz.sh: $t: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$build/$t.log" | awk '{print $2}') runs, no finding"
    else
        echo "fuzz.sh: $t FAILED; reproducer(s) in $build/artifacts/${t#fuzz_}; its log:" >&2
        tail -n 60 "$build/$t.log" >&2
        failed=1
    fi
done
exit "$failed"
