#!/usr/bin/env bash
# perf_profile.sh - where one decode step's and one prefill's time goes:
# `perf record` over `entrokv bench generate` at one context, split by phase
# with the bench's perf-mark lines (EKV_PERF_MARKS), symbols grouped into
# matmul / logits / attention / element-wise / pool wait / other.
#
#   scripts/perf_profile.sh CONTEXT [N_DECODE=128] [THREADS=2] [BIN=build/release/entrokv]
#
# Writes build/perf/ctx-CONTEXT-tTHREADS.{data,log} and prints, per phase,
# its wall time (from the marks) and the share of on-CPU samples per group.
# perf's cpu-clock software event (no hardware counters needed): the shares
# are of CPU time our threads ran, so time spent descheduled is not in them.
set -euo pipefail
cd "$(dirname "$0")/.."
ctx=${1:?context}; nd=${2:-128}; th=${3:-2}; bin=${4:-build/release/entrokv}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p build/perf
out=build/perf/ctx-$ctx-t$th
EKV_PERF_MARKS=1 perf record -q -k CLOCK_MONOTONIC -F 999 -o "$out.data" -- \
    "$bin" bench generate --model "$model" --no-reference --contexts "$ctx" \
    --n-decode "$nd" --reps 1 --bw-mib 0 --threads "$th" >"$out.log" 2>&1
# the last marks are the measured repetition (the first are the warm-up)
for phase in prefill decode; do
    read -r t0 t1 < <(grep "^perf-mark $phase " "$out.log" | tail -n 1 | cut -d' ' -f3,4)
    perf report -i "$out.data" --time "$t0,$t1" --no-children --sort symbol -g none \
        --stdio 2>/dev/null | python3 -c '
import re, sys
phase, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
groups = [("layer matmuls (Q4_1 gemm)", r"gemm_q4_1|gemm_q4_0|gemm_q4_k|gemm_q6_k"),
          ("logits (Q8_0 gemm, tied output)", r"gemm_q8_0"),
          ("activation quantize", r"prep_|quantize|q8_1|q8_k"),
          ("attention", r"attend|scores|values|softmax|exp_|exp256|attention|split_"),
          ("norm/rope/swiglu/add", r"rmsnorm|rope|swiglu|kern_add|task_norm|task_residual"),
          ("pool wait/spin", r"worker_main|ekv_pool_run|pool_|sched_yield"),
          ("kernel", r"^\[k\]")]
tot = {g: 0.0 for g, _ in groups}; other = {}
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(\S+)", line)
    if not m:
        continue
    pct, kind, sym = float(m.group(1)), m.group(2), m.group(3)
    key = "[k]" if kind == "[k]" else sym
    for g, rx in groups:
        if re.search(rx, key):
            tot[g] += pct
            break
    else:
        other[sym] = other.get(sym, 0) + pct
print(f"{phase}: {t1 - t0:.3f} s wall")
for g, _ in groups:
    print(f"  {tot[g]:5.1f}%  {g}")
rest = sorted(other.items(), key=lambda kv: -kv[1])
print(f"  {sum(other.values()):5.1f}%  other: " + ", ".join(f"{s} {p:.1f}" for s, p in rest[:4]))
' "$phase" "$t0" "$t1"
done
grep generate_summary "$out.log" || true
