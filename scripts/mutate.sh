#!/usr/bin/env bash
# mutate.sh - plant known bugs one at a time and check the test suite fails.
#
#   scripts/mutate.sh                 every scripts/mutations/*.patch
#   scripts/mutate.sh --fast          only those marked "# fast: yes" (CI)
#   scripts/mutate.sh PATCH...        the given patches
#
# A mutation is a patch file: header lines, then a unified diff that
# `git apply` takes at the repository root (docs/testing.md says how to write
# one):
#   # bug: what the planted bug is
#   # tests: a ctest -R regex naming the tests that must catch it
#   # fast: yes|no
#   # device: cuda   (optional) its tests run only on a GPU: with no device
#                    it is SKIPPED (not counted as missed); with one, the
#                    scratch tree is built with CUDA
#   # cpu: FLAG ...  (optional) /proc/cpuinfo flags the mutated code needs
#                    (e.g. avx512f avx512bw avx512vl avx512vnni: the kernels'
#                    AVX-512 level): on a CPU without one of them that code
#                    never runs, so the mutation is SKIPPED, not MISSED
#
# The working tree (uncommitted files included, build outputs not) is copied
# to a scratch tree under $MUTATE_WORK (default build/mutate), built once in
# Release without CUDA, and the tests every selected patch names are run once
# unmutated: they must pass there, or a "caught" would mean nothing
# (MUTATE_BASELINE=0 skips that run where the same tree has just passed
# them). Then for each patch: apply, rebuild (incrementally), run its
# tests, revert. A patch is CAUGHT when at least one of its tests fails,
# MISSED when all pass, and INVALID when it does not apply or does not build
# (a mutation must be a bug the compiler accepts). Prints a table; exits 0
# only when every patch was caught.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

fast=0
patches=()
for arg in "$@"; do
    case "$arg" in
        --fast) fast=1 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
        -*) echo "mutate.sh: unknown option $arg" >&2; exit 2 ;;
        *) patches+=("$(realpath "$arg")") ;;
    esac
done
header() { # header FIELD FILE: the value of "# FIELD: value", or empty
    sed -n "s/^# $1: *//p" "$2" | head -n 1
}
if [ ${#patches[@]} -eq 0 ]; then
    for p in scripts/mutations/*.patch; do
        [ -e "$p" ] || continue
        if [ "$fast" = 1 ] && [ "$(header fast "$p")" != yes ]; then
            continue
        fi
        patches+=("$root/$p")
    done
fi
if [ ${#patches[@]} -eq 0 ]; then
    echo "mutate.sh: no mutations selected" >&2
    exit 2
fi
for p in "${patches[@]}"; do
    if [ -z "$(header bug "$p")" ] || [ -z "$(header tests "$p")" ]; then
        echo "mutate.sh: $p lacks a '# bug:' or '# tests:' line" >&2
        exit 2
    fi
done

# Mutations of GPU code are caught only where a device runs their tests.
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpu=1
fi
needs_gpu() { [ "$(header device "$1")" = cuda ]; }
cpu_flags=" $(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1) "
# skip_reason PATCH: why this machine cannot run the patch's code ("" if it can)
skip_reason() {
    if needs_gpu "$1" && [ "$gpu" = 0 ]; then
        echo "needs a GPU"
        return
    fi
    local f
    for f in $(header cpu "$1"); do
        case "$cpu_flags" in
            *" $f "*) ;;
            *) echo "needs the CPU flag $f"; return ;;
        esac
    done
}
cuda=OFF
for p in "${patches[@]}"; do
    if needs_gpu "$p" && [ "$gpu" = 1 ]; then
        cuda=ON
    fi
done

work=$(realpath -m "${MUTATE_WORK:-build/mutate}")
src=$work/src
bld=$work/build
logs=$work/logs
jobs=$(nproc)
mkdir -p "$src" "$logs"

# The scratch tree: what git would see (tracked and untracked, not ignored),
# as a git repository of its own so each mutation reverts cleanly. The model
# and the venv are linked, not copied. Only files whose content differs are
# copied (with a new mtime), so an unchanged tree keeps its build, and a run
# that was killed mid-mutation is undone here.
echo "mutate.sh: scratch tree $src"
if [ -d "$src/.git" ]; then
    git -C "$src" reset -q --hard
    git -C "$src" clean -q -fd
fi
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    if ! cmp -s "$f" "$src/$f"; then
        mkdir -p "$src/$(dirname "$f")"
        cp "$f" "$src/$f"
    fi
done
for link in models .venv; do
    [ -e "$link" ] && ln -sfn "$root/$link" "$src/$link"
done
(
    cd "$src"
    [ -d .git ] || git init -q
    printf '/build/\n/models\n/.venv\n' > .git/info/exclude
    git add -A
    git -c user.name=mutate -c user.email=mutate@localhost commit -q --allow-empty -m baseline
)

# Only what the selected tests run is built: the programs their commands
# start or name (a test program, the entrokv binary a KV store test starts
# daemons from), and entrokv for tests that are scripts around it (CLI,
# pytest serving tests).
configured=0
# targets_for REGEX: the build targets of the tests REGEX selects
targets_for() {
    local all
    all=$(cmake --build "$bld" --target help 2>/dev/null | sed -n 's/^\.\.\. \([^ ]*\).*/\1/p')
    ctest --test-dir "$bld" --show-only=json-v1 -R "$1" | ALL="$all" python3 -c '
import json, os, sys
all_targets = set(os.environ["ALL"].split())
want = set()
for t in json.load(sys.stdin)["tests"]:
    # ctest gives a command only once the program exists
    names = [os.path.basename(a) for a in t.get("command") or []]
    own = t["name"].split(".", 1)[-1]
    if own in all_targets:
        names.insert(0, own)
    want.update(n for n in names if n in all_targets)
    if not names or names[0] not in all_targets or not t.get("command"):
        want.add("entrokv")
print("\n".join(sorted(want)))'
}
# build LOGFILE REGEX: configure (once a run; the build itself reconfigures
# when a CMakeLists.txt or a globbed directory changes), then bring the
# targets of the tests REGEX selects up to date. A mutation relinks only
# its own tests' programs, not every program of the run (the libraries are
# static: one changed file relinked all of them, most of a mutation's time).
build() {
    if [ "$configured" = 0 ]; then
        cmake -S "$src" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DEKV_CUDA=$cuda >>"$1" 2>&1 ||
            return 1
        configured=1
    fi
    local want
    mapfile -t want < <(targets_for "$2")
    targets=("${want[@]}")
    cmake --build "$bld" -j"$jobs" --target "${want[@]}" -- -k >>"$1" 2>&1
}
# A build that fails only in files the patch does not touch (a test someone
# is still writing) does not make the mutation invalid: the tests run on what
# did build, and the baseline run has shown those pass.
broke_patch() { # broke_patch PATCH LOG: did a file the patch touches fail?
    local f
    for f in $(git -C "$src" apply --numstat "$1" 2>/dev/null | cut -f3); do
        grep -q "$f:[0-9]*:[0-9]*: error" "$2" && return 0
    done
    return 1
}
failed_tests() { # failed_tests LOG: the names ctest lists as failed
    sed -n 's/^[[:space:]]*[0-9]\+ - \([^ ]*\) (.*$/\1/p' "$1" | sort -u | paste -sd, -
}

union=$(for p in "${patches[@]}"; do
    [ -n "$(skip_reason "$p")" ] && continue
    header tests "$p"
done | sort -u | paste -sd'|' -)
if [ -z "$union" ]; then # every selected mutation needs a GPU or CPU this machine lacks
    for p in "${patches[@]}"; do
        printf 'mutate.sh: SKIPPED %s (%s)\n' "$(basename "$p" .patch)" "$(skip_reason "$p")"
    done
    echo "mutate.sh: 0 of ${#patches[@]} run: none can run here"
    exit 0
fi
echo "mutate.sh: building the unmutated tree (CUDA $cuda)"
if ! build "$logs/baseline-build.log" "$union"; then
    echo "mutate.sh: warning: part of the unmutated tree does not build:" \
        "$(grep -c ': error' "$logs/baseline-build.log") errors, see $logs/baseline-build.log" >&2
fi
echo "mutate.sh: built ${targets[*]}"
if [ "${MUTATE_BASELINE:-1}" = 0 ]; then
    # CI sets this: its Release stage has just run these tests on this tree.
    echo "mutate.sh: not rerunning the unmutated tests (MUTATE_BASELINE=0)"
else
    echo "mutate.sh: the unmutated tree must pass: $union"
    if ! ctest --test-dir "$bld" -R "$union" --output-on-failure >"$logs/baseline-test.log" 2>&1; then
        echo "mutate.sh: tests fail without any mutation: $(failed_tests "$logs/baseline-test.log")" >&2
        echo "mutate.sh: see $logs/baseline-test.log" >&2
        exit 1
    fi
fi

results=()
n_caught=0
n_skipped=0
for p in "${patches[@]}"; do
    name=$(basename "$p" .patch)
    bug=$(header bug "$p")
    tests=$(header tests "$p")
    why=$(skip_reason "$p")
    if [ -n "$why" ]; then
        n_skipped=$((n_skipped + 1))
        printf 'mutate.sh: SKIPPED %s (%s)\n' "$name" "$why"
        results+=("$(printf '| %s | %s | SKIPPED | %s |' "$name" "$bug" "$why")")
        continue
    fi
    log=$logs/$name.log
    : >"$log"
    start=$SECONDS
    if ! git -C "$src" apply "$p" >>"$log" 2>&1; then
        verdict=INVALID; by="does not apply"
    elif ! build "$log" "$tests" && broke_patch "$p" "$log"; then
        verdict=INVALID; by="does not build"
    elif ctest --test-dir "$bld" -R "$tests" --output-on-failure >>"$log" 2>&1; then
        verdict=MISSED; by="($tests all pass)"
    else
        verdict=CAUGHT; by=$(failed_tests "$log")
        n_caught=$((n_caught + 1))
    fi
    git -C "$src" reset -q --hard
    git -C "$src" clean -q -fd
    printf 'mutate.sh: %-7s %s (%ds) %s\n' "$verdict" "$name" $((SECONDS - start)) "$by"
    results+=("$(printf '| %s | %s | %s | %s |' "$name" "$bug" "$verdict" "$by")")
done
# Rebuild what the last mutation touched, so the next run starts clean.
build "$logs/restore-build.log" "$union" || true

echo
echo "| mutation | planted bug | result | failed tests |"
echo "|---|---|---|---|"
printf '%s\n' "${results[@]}"
echo
echo "mutate.sh: ${n_caught} of $((${#patches[@]} - n_skipped)) caught, ${n_skipped} skipped (need a GPU or CPU flags this machine lacks; logs in $logs)"
[ "$n_caught" -eq $((${#patches[@]} - n_skipped)) ]
