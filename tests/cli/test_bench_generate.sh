#!/usr/bin/env bash
# test_bench_generate.sh - `entrokv bench generate` against a stand-in
# llama-bench whose timings are known, so what the benchmark reports can be
# checked against what its documentation says it reports:
#   - llama-bench is asked for one shape per call, with -r 1 -o jsonl: the
#     prompt (-p P -n 0 -d 0), then generation at its depth (-p 0 -n D -d P),
#     with -fa on,off;
#   - per phase, llama.cpp's figure is the faster flash attention setting's
#     median over the repetitions, with min and max beside it;
#   - the ratios are entrokv's median over llama.cpp's;
#   - the decode bound is bandwidth / (weight bytes + fp16 K and V bytes);
#   - a llama-bench that fails or prints nonsense is a clear error, exit 1;
#   - --decode-variants: fast and scalar recall rankings generate the same
#     tokens, and the counters order as they must.
# Usage: test_bench_generate.sh ENTROKV MODEL
set -uo pipefail
bin=$1
model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }

# The stand-in: call k (per flash attention setting and phase) reports
# a fixed sequence of tokens/s; FA on is faster at prefill, off at decode.
# Prefill on: 100 300 200 (median 200); off: 50 70 60 (60).
# Decode on: 20 30 25 (25); off: 40 90 50 (50).
cat >"$tmp/llama-bench" <<'EOF'
#!/usr/bin/env bash
set -u
dir=$(dirname "$0")
echo "$*" >>"$dir/calls"
[ "${FAKE_MODE:-}" = fail ] && exit 3
[ "${FAKE_MODE:-}" = garbage ] && { echo "not json"; exit 0; }
args=" $* "
case "$args" in *" -r 1 -o jsonl"*) ;; *) echo "bad args: $*" >&2; exit 9 ;; esac
case "$args" in *" -t 2 -fa on,off "*) ;; *) echo "bad args: $*" >&2; exit 9 ;; esac
p=$(sed -E 's/.* -p ([0-9]+) .*/\1/' <<<"$args")
n=$(sed -E 's/.* -n ([0-9]+) .*/\1/' <<<"$args")
d=$(sed -E 's/.* -d ([0-9]+) .*/\1/' <<<"$args")
if [ "$n" = 0 ] && [ "$d" = 0 ] && [ "$p" -gt 0 ]; then phase=pp
elif [ "$p" = 0 ] && [ "$n" -gt 0 ] && [ "$d" -gt 0 ]; then phase=tg
else echo "bad shape: $*" >&2; exit 9; fi
k=$(grep -c -- "-n $n -d $d" "$dir/calls")
seq_pp_on=(100 300 200); seq_pp_off=(50 70 60); seq_tg_on=(20 30 25); seq_tg_off=(40 90 50)
for fa in 1 0; do
    if [ $fa = 1 ]; then name=on; else name=off; fi
    eval "ts=\${seq_${phase}_${name}[$(( (k - 1) % 3 ))]}"
    echo "{\"build_commit\": \"fake123\", \"build_number\": 42, \"cpu_info\": \"Fake CPU\", \"n_batch\": 2048, \"n_ubatch\": 512, \"n_threads\": 2, \"type_k\": \"f16\", \"flash_attn\": $fa, \"n_prompt\": $p, \"n_gen\": $n, \"n_depth\": $d, \"avg_ts\": $ts, \"stddev_ts\": 0, \"samples_ns\": [ 1 ],\"samples_ts\": [ $ts ]}"
done
EOF
chmod +x "$tmp/llama-bench"
# a short text: tokenizing all of the GPL costs seconds under ASan
head -c 3000 /usr/share/common-licenses/GPL-3 >"$tmp/text"

if "$bin" bench generate --model "$model" --contexts 48 --n-decode 8 --reps 3 --bw-mib 16 \
    --text "$tmp/text" --llama-bench "$tmp/llama-bench" >"$tmp/out" 2>"$tmp/err"; then
    if python3 - "$tmp/out" "$tmp/calls" "$model" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
calls = open(sys.argv[2]).read().splitlines()
by = lambda b: [r for r in rows if r["bench"] == b]
# one prompt call and one generation call per repetition
assert len(calls) == 6, calls
assert sum(" -p 40 -n 0 -d 0 " in c + " " for c in calls) == 3, calls
assert sum(" -p 0 -n 8 -d 40 " in c + " " for c in calls) == 3, calls
assert all("--no-warmup" not in c for c in calls), calls  # 40 < 1024 tokens
ours = [r for r in by("generate") if r["engine"] == "entrokv"]
ref = [r for r in by("generate") if r["engine"] == "llama.cpp"]
assert len(ours) == 3 and len(ref) == 6, (ours, ref)
assert sorted(r["round"] for r in ours) == [0, 1, 2]
(summ_ours,) = [r for r in by("generate_summary") if r["engine"] == "entrokv"]
(summ_ref,) = [r for r in by("generate_summary") if r["engine"] == "llama.cpp"]
assert summ_ref["prefill_flash_attn"] == "on" and summ_ref["decode_flash_attn"] == "off", summ_ref
assert summ_ref["prefill_tokens_per_s"] == {"median": 200, "min": 100, "max": 300}, summ_ref
assert summ_ref["decode_tokens_per_s"] == {"median": 50, "min": 40, "max": 90}, summ_ref
assert summ_ref["flash_attn_off"]["prefill_median"] == 60, summ_ref
assert summ_ref["flash_attn_on"]["decode_median"] == 25, summ_ref
for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
    vals = [r[key] for r in ours]
    s = summ_ours[key]
    assert abs(s["median"] - statistics.median(vals)) < 0.011, (s, vals)
    assert abs(s["min"] - min(vals)) < 0.011 and abs(s["max"] - max(vals)) < 0.011, (s, vals)
(ratio,) = by("generate_ratio")
assert abs(ratio["prefill_ratio"] - summ_ours["prefill_tokens_per_s"]["median"] / 200) < 2e-3, ratio
assert abs(ratio["decode_ratio"] - summ_ours["decode_tokens_per_s"]["median"] / 50) < 2e-3, ratio
(meta,) = by("generate_meta")
assert meta["llama_cpp"]["build_commit"] == "fake123" and meta["llama_cpp"]["build_number"] == 42, meta
assert meta["reps"] == 3 and meta["threads"] == 2, meta
bw = meta["read_bandwidth"]["best_gb_per_s"] * 1e9
assert bw > 0, meta
# bound = bandwidth / (weights + K and V of every attended token, fp16):
# SmolLM2-135M: 30 layers, 3 KV heads of 64; weights from the GGUF's tensor sizes
kv_per_token = 2 * 30 * 3 * 64 * 2
bytes_tok = summ_ours["decode_bytes_per_token"]
weights = bytes_tok - kv_per_token * (40 + (8 + 1) / 2)
assert 90e6 < weights < 100e6, weights  # the Q4_1 GGUF's weights are ~96.6 MB
for s in (summ_ours, summ_ref):
    bound = s["decode_bound_tokens_per_s"]
    assert abs(bound - bw / bytes_tok) / bound < 0.01, (bound, bw, bytes_tok)
    frac = s["decode_tokens_per_s"]["median"] / bound
    assert abs(s["decode_fraction_of_bound"] - frac) < 2e-3, s
PY
    then ok bench_generate_vs_fake; else fail "bench_generate_vs_fake: $(head -c 2000 "$tmp/out")"; fi
else
    fail "bench_generate_vs_fake: exit $?: $(tail -c 600 "$tmp/err")"
fi

# expect NAME CODE PATTERN -- CMD...
expect() {
    local name=$1 code=$2 pattern=$3
    shift 4
    "$@" >"$tmp/o" 2>"$tmp/e"
    local rc=$?
    if [ "$rc" -ne "$code" ] || ! grep -qE -- "$pattern" "$tmp/e"; then
        fail "$name: exit $rc (want $code), stderr: $(head -c 400 "$tmp/e")"
    else
        ok "$name"
    fi
}
args=(--model "$model" --contexts 48 --n-decode 8 --reps 1 --bw-mib 0 --text "$tmp/text")
rm -f "$tmp/calls"
FAKE_MODE=fail expect bench_ref_fails 1 "llama-bench failed.*-fa on,off -p 40 -n 0 -d 0" -- \
    env FAKE_MODE=fail "$bin" bench generate "${args[@]}" --llama-bench "$tmp/llama-bench"
expect bench_ref_garbage 1 "llama.cpp reference failed at context 48" -- \
    env FAKE_MODE=garbage "$bin" bench generate "${args[@]}" --llama-bench "$tmp/llama-bench"
expect bench_ref_missing 1 "no llama-bench found at $tmp/none" -- \
    "$bin" bench generate "${args[@]}" --llama-bench "$tmp/none"
expect bench_reps_zero 2 "--reps" -- "$bin" bench generate "${args[@]}" --reps 0
expect bench_fa_bad 2 "--flash-attn expects on, off or both" -- \
    "$bin" bench generate "${args[@]}" --flash-attn maybe
expect bench_bw_small 2 "--bw-mib" -- "$bin" bench generate "${args[@]}" --bw-mib 3

# --recall: the entrokv lines carry the recall counters; with R = 1 every
# (layer, KV head) recalls one block at every decode step (the evicted
# blocks all precede the decode positions), each block 16 tokens of fp16 K
# and V (head_dim 64) and int32 positions
if "$bin" bench generate --model "$model" --contexts 96 --n-decode 4 --reps 1 --bw-mib 0 \
    --text "$tmp/text" --no-reference --kv-method snapkv --kv-budget 0.5 --recall 1 \
    >"$tmp/rout" 2>"$tmp/rerr"; then
    if python3 - "$tmp/rout" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
r = [x for x in rows if x["bench"] == "generate"][0]
heads = 30 * 3  # SmolLM2-135M: 30 layers x 3 KV heads
block = 2 * 16 * 64 * 2 + 16 * 4
assert r["kv_method"] == "snapkv" and r["recall"] == 1, r
assert r["recall_blocks"] == 4 * heads, r
assert r["recall_bytes"] == 4 * heads * block, r
assert r["recall_bytes_per_token"] == heads * block, r
assert r["recall_evicted_tokens"] > 0, r
PY
    then ok bench_recall_fields; else fail "bench_recall_fields: $(head -c 600 "$tmp/rout")"; fi
else
    fail "bench --recall: $(head -c 400 "$tmp/rerr")"
fi
expect bench_recall_bad 2 "recall" -- "$bin" bench generate "${args[@]}" --no-reference --recall -1

# --decode-variants: one prefill, every variant decodes on a clone in each
# round; the batched, pruned ranking (fast) generates the tokens the
# one-block-at-a-time ranking (scalar) does, reads K for no more blocks,
# and the box (M = 0) reads none; full KV holds more than the policy alone,
# which holds more than the policy with its recall buffer
if "$bin" bench generate --model "$model" --contexts 160 --n-decode 6 --reps 2 --bw-mib 0 \
    --text "$tmp/text" --no-reference --kv-method snapkv --kv-budget 0.5 --recall 1 \
    --decode-variants full,norecall,16:fast,16:scalar,0:fast,0:scalar \
    >"$tmp/vout" 2>"$tmp/verr"; then
    if python3 - "$tmp/vout" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 12 and all(r["bench"] == "decode_variant" for r in rows), rows
by = {}
for r in rows:
    by.setdefault(r["variant"], []).append(r)
assert sorted(by) == ["0:fast", "0:scalar", "16:fast", "16:scalar", "full", "norecall"], by
for v, rs in by.items():
    assert [r["round"] for r in rs] == [0, 1], rs
    assert len({r["tokens_hash"] for r in rs}) == 1, rs  # each round decodes the same clone
h = {v: rs[0]["tokens_hash"] for v, rs in by.items()}
assert h["16:fast"] == h["16:scalar"] and h["0:fast"] == h["0:scalar"], h
k = {v: rs[0].get("recall_rank_k_blocks") for v, rs in by.items()}
assert k["0:fast"] == 0 and k["0:scalar"] == 0, k
assert 0 < k["16:fast"] <= k["16:scalar"], k
for v in ("16:fast", "16:scalar", "0:fast", "0:scalar"):
    r = by[v][0]
    assert r["recall_rankings"] > 0 and r["recall_rank_bytes_per_token"] > 0, r
kv = {v: rs[0]["kv_resident_bytes"] for v, rs in by.items()}
assert kv["full"] > kv["norecall"] > kv["16:fast"] == kv["0:scalar"] > 0, kv
PY
    then ok bench_decode_variants; else fail "bench_decode_variants: $(head -c 600 "$tmp/vout")"; fi
else
    fail "bench --decode-variants: $(head -c 400 "$tmp/verr")"
fi
expect bench_variants_bad 1 "--decode-variants" -- "$bin" bench generate --model "$model" \
    --contexts 96 --n-decode 4 --reps 1 --bw-mib 0 --text "$tmp/text" --no-reference \
    --kv-method snapkv --kv-budget 0.5 --recall 1 --decode-variants 16:fastest

[ "$fails" -eq 0 ] || { echo "$fails failed"; exit 1; }
echo "all passed"
