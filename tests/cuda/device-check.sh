#!/usr/bin/env bash
# device-check.sh - everything the CUDA backend needs checked on a GPU, in one
# go, without network (docs/cuda.md, "The device check"):
#  1. build: the full project (build/cuda) where it configures, else
#     tests/cuda/standalone (build/cuda-standalone: the kernels, the forward,
#     the step engine, the test_cuda_* programs and the kernel benchmark,
#     needing only CUDA and pthreads); EKV_CHECK_BUILD=DIR uses a build as is
#  2. every test_cuda_* program (test_cuda_forward also on the carried cut of
#     the demo model; test_cuda_engine: the step engine with 16 concurrent
#     requests, two compressed, GPU against CPU)
#  3. with the carried bundle (scripts/cuda_bundle.sh -> .cudabundle: the
#     full entrokv binary with its serving libraries, wheels, gRPC stubs, the
#     cut model): `entrokv generate --device cpu|cuda`, then
#     tests/cuda/serve_check.py: `entrokv serve --device cuda` against
#     `--device cpu` through grpcio and openai, and 1 / 16 / 64 streams
#  4. `entrokv bench generate --device cuda` (and cpu) on the cut model
#  5. the kernel benchmark (`bench cuda-attention`: decode attention and whole
#     random-weight Llama-3.1-8B decode steps, 4k / 32k x 1 / 16 / 64, full
#     and 10%, fraction of the HBM bound, torch SDPA as the reference)
# Every step has its own time limit and the whole run a budget
# (EKV_BUDGET_S, default 480 s): a step starts only with its limit left, so
# one hang cannot eat the lease. Results: OUTDIR (see the end), summary.json.
#
# Usage: tests/cuda/device-check.sh [--dry-run] OUTDIR
#   --dry-run  where no GPU is: the same steps with --device cpu in place of
#              cuda where a step can run so (the serve check compares two CPU
#              servers; CUDA tests report skip), nothing built when
#              EKV_CHECK_BUILD names a build (e.g. build/release)
# Env: EKV_BUDGET_S (480), EKV_JOBS (nproc), EKV_TEST_TIMEOUT (120 per test),
#      EKV_BENCH_ARGS (extra flags for the kernel benchmark), EKV_BUNDLE
#      (.cudabundle), EKV_CHECK_BUILD (a build directory to use as is),
#      EKV_PYTHON (python3: the clients' interpreter), EKV_SKIP_PIP=1 (use
#      EKV_PYTHON's packages as they are instead of the bundle's wheels).
# Exit status: 0 when every step ran and passed.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: device-check.sh [--dry-run] OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
JOBS=${EKV_JOBS:-$(nproc)}
BUDGET=${EKV_BUDGET_S:-480}
BUNDLE=${EKV_BUNDLE:-$ROOT/.cudabundle}
PYTHON=${EKV_PYTHON:-python3}
mkdir -p "$OUT/tests"
OUT=$(cd "$OUT" && pwd)
t_start=$(date +%s)
DEV=cuda
[ $DRY -eq 1 ] && DEV=cpu
exec 3>&1 # log lines go to the script's stdout even inside a step's redirection
log() { echo "[device-check $(date +%H:%M:%S) +$(( $(date +%s) - t_start ))s] $*" | tee -a "$OUT/progress.log" >&3; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || echo "\"$1\""; }
declare -A STEP_RC STEP_S
STEPS=()

# step NAME LIMIT_S CMD...: runs CMD under timeout min(LIMIT, budget left),
# or skips it (rc 125) when less than LIMIT/3 is left.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - t_start) ))
    local lim=$(( limit < left ? limit : left ))
    STEPS+=("$name")
    if [ $lim -lt $(( limit / 3 )) ] || [ $lim -le 5 ]; then
        STEP_RC[$name]=125; STEP_S[$name]=0
        log "$name: SKIPPED (budget: ${left}s left, needs ${limit}s)"
        return 125
    fi
    local s0; s0=$(date +%s)
    timeout -k 10 "$lim" "$@"
    local rc=$?
    STEP_RC[$name]=$rc; STEP_S[$name]=$(( $(date +%s) - s0 ))
    log "$name: rc $rc in ${STEP_S[$name]}s (limit ${lim}s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
    return $rc
}

finish() {
    local status=$1 t_end; t_end=$(date +%s)
    {
        echo "{\"status\": $(json_str "$status"), \"mode\": $(json_str "$MODE"), \"dry_run\": $DRY,"
        echo " \"tests_passed\": ${n_pass:-0}, \"tests_failed\": ${n_fail:-0}, \"tests_skipped\": ${n_skip:-0},"
        echo " \"bundle\": $([ -d "$BUNDLE" ] && echo true || echo false), \"steps\": {"
        local first=1
        for s in "${STEPS[@]}"; do
            [ $first -eq 1 ] || echo ","
            first=0
            printf '  "%s": {"rc": %s, "seconds": %s}' "$s" "${STEP_RC[$s]}" "${STEP_S[$s]}"
        done
        echo "},"
        echo " \"total_seconds\": $((t_end - t_start)), \"outdir\": $(json_str "$OUT")}"
    } > "$OUT/summary.json"
    log "done: $status (summary.json)"
}

log "repository $ROOT, output $OUT, budget ${BUDGET}s, dry run $DRY"
{ nvidia-smi || echo "nvidia-smi failed"; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true; } \
    > "$OUT/nvidia-smi.txt" 2>&1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
log "device: ${GPU_NAME:-none}"
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
TESTS=$(cd "$ROOT/tests/cuda" && ls test_cuda_*.c | sed 's/\.c$//')

# ---- 0. the carried bundle: unpacked first (the standalone build takes its cJSON) ----
CUT="$BUNDLE/model/demo-cut.gguf"
UNPACK=${EKV_BUNDLE_UNPACK:-/tmp/ekv-bundle}
have_bundle=0
if [ -r "$BUNDLE/payload.tar.xz" ]; then
    rm -rf "$UNPACK" && mkdir -p "$UNPACK"
    step unpack 60 tar -xJf "$BUNDLE/payload.tar.xz" -C "$UNPACK" && have_bundle=1
    cp -r "$BUNDLE/include" "$UNPACK/" 2>/dev/null
fi

# ---- 1. build ----
MODE=full
BENCH=()
if [ -n "${EKV_CHECK_BUILD:-}" ]; then
    BUILD=$(cd "$EKV_CHECK_BUILD" && pwd)
    MODE=given
    [ -x "$BUILD/entrokv" ] && BENCH=("$BUILD/entrokv" bench cuda-attention)
    [ -x "$BUILD/ekv_cuda_bench" ] && BENCH=("$BUILD/ekv_cuda_bench")
    log "using the build in $BUILD as is"
else
    BUILD="$ROOT/build/cuda"
    build_full() {
        cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DEKV_CUDA=ON -DEKV_WERROR=OFF \
            > "$OUT/configure.log" 2>&1 &&
            cmake --build "$BUILD" -j"$JOBS" --target $TESTS entrokv > "$OUT/build.log" 2>&1
    }
    build_sa() {
        cmake -S "$ROOT/tests/cuda/standalone" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
            -DEKV_CJSON_DIR="$UNPACK" >> "$OUT/configure.log" 2>&1 && cmake --build "$BUILD" -j"$JOBS" >> "$OUT/build.log" 2>&1
    }
    export ROOT BUILD OUT JOBS TESTS UNPACK
    export -f build_full build_sa
    if pkg-config --exists grpc 2>/dev/null && step build-full 300 bash -c build_full; then
        BENCH=("$BUILD/entrokv" bench cuda-attention)
    else
        MODE=standalone
        BUILD="$ROOT/build/cuda-standalone"
        log "standalone build in $BUILD (the image has no gRPC: the served binary is the bundle's)"
        export BUILD
        if ! step build-standalone 300 bash -c build_sa; then
            grep -E "error" "$OUT/build.log" | head -20
            finish build-failed; exit 1
        fi
        BENCH=("$BUILD/ekv_cuda_bench")
    fi
fi

# ---- 2. the CUDA tests ----
n_pass=0 n_fail=0 n_skip=0
echo "[" > "$OUT/tests.json"
first=1
for t in $TESTS; do
    bin=$(find "$BUILD" -name "$t" -type f -perm -u+x | head -1)
    args=()
    [ "$t" = test_cuda_forward ] && [ -r "$CUT" ] && args=("$CUT")
    if [ -z "$bin" ]; then
        rc=127
    else
        step "$t" "${EKV_TEST_TIMEOUT:-120}" "$bin" "${args[@]}" > "$OUT/tests/$t.log" 2>&1
        rc=$?
    fi
    case $rc in
        0) n_pass=$((n_pass + 1)); word=pass ;;
        77) n_skip=$((n_skip + 1)); word=skip ;;
        *) n_fail=$((n_fail + 1)); word=fail ;;
    esac
    [ $first -eq 1 ] || echo "," >> "$OUT/tests.json"
    first=0
    printf '{"test": "%s", "result": "%s", "rc": %d, "seconds": %s}' "$t" "$word" "$rc" \
        "${STEP_S[$t]:-0}" >> "$OUT/tests.json"
done
echo "]" >> "$OUT/tests.json"
log "tests: $n_pass passed, $n_fail failed, $n_skip skipped"

# ---- 3. the served binary: generate, serve through grpcio and openai ----
bundle_ok=0
if [ $have_bundle -eq 1 ] && [ -r "$CUT" ]; then
    RUN="$UNPACK/run"
    # which libraries the served binary loads, and from where
    LD_DEBUG=libs "$RUN" entrokv --help 2>&1 >/dev/null | grep "calling init:" \
        | sed 's/.*calling init: //' | sort -u > "$OUT/bundle-libs.txt"
    log "bundle: $(grep -c "$UNPACK" "$OUT/bundle-libs.txt") libraries from the bundle, $(grep -vc "$UNPACK" "$OUT/bundle-libs.txt") from the machine"
    install_py() {
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ekv-site "$BUNDLE"/whl/*.whl
    }
    export BUNDLE PYTHON
    export -f install_py
    if [ "${EKV_SKIP_PIP:-0}" != 1 ] && [ -n "$(ls "$BUNDLE"/whl/*.whl 2>/dev/null)" ] && step pip-install 120 bash -c install_py \
        > "$OUT/pip.log" 2>&1; then
        CLIENT_PYPATH=/tmp/ekv-site${PYTHONPATH:+:$PYTHONPATH} # the clients' only (not torch's)
    fi
    "$RUN" entrokv --help > /dev/null 2>&1 && bundle_ok=1
    log "bundle: entrokv starts: $bundle_ok ($(grep -c . "$BUNDLE/MANIFEST.txt" 2>/dev/null) manifest lines)"
    devs=cpu
    [ $DEV = cpu ] || devs="$DEV cpu"
    for dev in $devs; do
        step "generate-$dev" 120 "$RUN" entrokv generate --device $dev --model "$CUT" \
            --prompt "Name three colours." --max-tokens 32 --ctx 512 --json \
            > "$OUT/generate-$dev.json" 2> "$OUT/generate-$dev.log"
    done
    step serve-check 300 env PYTHONPATH="${CLIENT_PYPATH:-${PYTHONPATH:-}}" "$PYTHON" "$ROOT/tests/cuda/serve_check.py" --entrokv "$RUN entrokv" \
        --model "$CUT" --stubs "$BUNDLE/py" --gpu-device $DEV --logs "$OUT" \
        --out "$OUT/serve-check.json" > "$OUT/serve-check.log" 2>&1
    tail -3 "$OUT/serve-check.log"
    # ---- 4. bench generate on the cut model ----
    for dev in $devs; do
        step "bench-generate-$dev" 150 "$RUN" entrokv bench generate --device $dev --model "$CUT" \
            --no-reference --contexts 512,4096 --n-decode 64 --reps 2 --bw-mib 0 --json \
            --text "$ROOT/docs/ARCHITECTURE.md" \
            > "$OUT/bench-generate-$dev.jsonl" 2> "$OUT/bench-generate-$dev.log"
    done
else
    log "no bundle at $BUNDLE (scripts/cuda_bundle.sh, carried): generate / serve / bench generate not run"
    STEPS+=(bundle); STEP_RC[bundle]=126; STEP_S[bundle]=0
fi

# ---- 5. the kernel benchmark ----
if [ $DRY -eq 0 ] && [ ${#BENCH[@]} -gt 0 ]; then
    # shellcheck disable=SC2086
    step bench-cuda 240 "${BENCH[@]}" --json --python python3 ${EKV_BENCH_ARGS:-} \
        > "$OUT/bench.jsonl" 2> "$OUT/bench.log"
    tail -40 "$OUT/bench.log"
else
    log "kernel benchmark: not run (dry run or no benchmark binary)"
fi

# ---- verdict ----
bad=0
for s in "${STEPS[@]}"; do
    rc=${STEP_RC[$s]}
    case "$s" in test_cuda_*) [ "$rc" -eq 77 ] && [ $DRY -eq 1 ] && continue ;; esac
    [ "$rc" -eq 0 ] || bad=$((bad + 1))
done
if [ $bad -eq 0 ]; then
    finish pass; exit 0
fi
finish "$bad step(s) failed or skipped: tests failed $n_fail, skipped $n_skip"; exit 1
