#!/usr/bin/env bash
# perf_run.sh - measure entrokv against llama.cpp's own tools and regenerate
# the README's performance section from the results:
#   docs/eval/perf-generate.jsonl   entrokv bench generate (vs llama-bench)
#   docs/eval/perf-generate-long.jsonl   the same at LONG_CONTEXTS, when LONG=1
#   docs/eval/perf-serve.jsonl      entrokv bench serve (vs llama-server -np C -cb)
#   README.md                       scripts/perf_readme.py over both
# Run on a quiet machine (nothing else busy): the figures are only as good as
# the machine is idle. Needs scripts/setup.sh --bench (llama-bench,
# llama-server) and a Release build. Settings, from the environment:
#   BIN=build/release/entrokv MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
#   THREADS=2 CONTEXTS=512,2048 REPS=5 CONCURRENCY=1,4,16,64
#   LONG=0 LONG_CONTEXTS=8192 OUT=docs/eval
# Time on a quiet 2-core VM, estimated from the rates in issue 22: about 5
# minutes for CONTEXTS, 5-6 for serve; LONG=1 adds about 30 (each 8k round
# prefills 8128 tokens four times in llama.cpp: prompt and depth, flash
# attention on and off).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release/entrokv}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-2}
CONTEXTS=${CONTEXTS:-512,2048}
LONG=${LONG:-0}
LONG_CONTEXTS=${LONG_CONTEXTS:-8192}
REPS=${REPS:-5}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
OUT=${OUT:-docs/eval}
py=.venv/bin/python
[ -x "$py" ] || py=python3
[ -x "$BIN" ] || { echo "perf_run: no $BIN; build it first (cmake --build build/release --target entrokv)" >&2; exit 2; }
[ -x build/llamacpp/bin/llama-bench ] && [ -x build/llamacpp/bin/llama-server ] ||
    { echo "perf_run: no llama.cpp tools; run scripts/setup.sh --bench" >&2; exit 2; }
mkdir -p "$OUT"
# Written to temporary files first: a failed run leaves the committed JSONL alone.
gen=$(mktemp) serve=$(mktemp) long=$(mktemp)
trap 'rm -f "$gen" "$serve" "$long"' EXIT
start=$(date +%s)
echo "perf_run: bench generate (contexts $CONTEXTS, $REPS repetitions)" >&2
"$BIN" bench generate --model "$MODEL" --threads "$THREADS" --contexts "$CONTEXTS" \
    --reps "$REPS" >"$gen"
if [ "$LONG" = 1 ]; then
    echo "perf_run: bench generate (contexts $LONG_CONTEXTS, $REPS repetitions), $(( $(date +%s) - start )) s so far" >&2
    "$BIN" bench generate --model "$MODEL" --threads "$THREADS" --contexts "$LONG_CONTEXTS" \
        --reps "$REPS" >"$long"
fi
echo "perf_run: bench serve (concurrency $CONCURRENCY), $(( $(date +%s) - start )) s so far" >&2
"$BIN" bench serve --model "$MODEL" --threads "$THREADS" --concurrency "$CONCURRENCY" >"$serve"
cp "$gen" "$OUT/perf-generate.jsonl"
cp "$serve" "$OUT/perf-serve.jsonl"
if [ "$LONG" = 1 ]; then cp "$long" "$OUT/perf-generate-long.jsonl"; fi
gens=()
for f in "$OUT"/perf-generate*.jsonl; do gens+=(--generate "$f"); done
"$py" scripts/perf_readme.py "${gens[@]}" --serve "$OUT/perf-serve.jsonl"
echo "perf_run: done in $(( $(date +%s) - start )) s; README.md regenerated from $OUT/perf-*.jsonl" >&2
