#!/usr/bin/env bash
# test_cli.sh - the entrokv binary as a user drives it: exit codes and
# messages for bad input, the --json contract, fetch-model's no-op path and
# a short benchmark run. Usage: test_cli.sh ENTROKV MODEL
set -uo pipefail
bin=$1
model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect NAME CODE PATTERN -- CMD...: exit status CODE and stderr matching PATTERN
expect() {
    local name=$1 code=$2 pattern=$3
    shift 4
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -ne "$code" ] || ! grep -qE -- "$pattern" "$tmp/err"; then
        echo "FAIL $name: exit $rc (want $code), stderr: $(head -c 400 "$tmp/err")"
        fails=$((fails + 1))
    else
        echo "ok   $name"
    fi
}

expect no_command 2 "usage" -- "$bin"
expect unknown_command 2 "unknown command" -- "$bin" frobnicate
expect unknown_flag 2 "unknown flag '--bogus'" -- "$bin" generate --model "$model" --prompt hi --bogus
expect missing_value 2 "needs a value" -- "$bin" generate --model "$model" --prompt
expect bad_number 2 "expects an integer" -- "$bin" generate --model "$model" --prompt hi --max-tokens 12x
expect bad_temperature 2 "expects a number" -- "$bin" generate --model "$model" --prompt hi --temperature nan
expect missing_model 1 "nope.gguf" -- "$bin" generate --model "$tmp/nope.gguf" --prompt hi
head -c 1000000 "$model" >"$tmp/truncated.gguf"
expect truncated_model 1 "truncated.gguf" -- "$bin" generate --model "$tmp/truncated.gguf" --prompt hi
head -c 4096 /dev/urandom >"$tmp/random.gguf"
expect random_model 1 "random.gguf" -- "$bin" generate --model "$tmp/random.gguf" --prompt hi
long=$(printf 'word %.0s' $(seq 1 200))
expect prompt_too_long 2 "context" -- "$bin" generate --model "$model" --prompt "$long" --ctx 64

# --json: one object with the documented fields, consistent with each other
if "$bin" generate --model "$model" --chat --prompt "Name three colors." --max-tokens 12 --json \
    >"$tmp/json" 2>"$tmp/err"; then
    if python3 - "$tmp/json" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().strip().splitlines()
assert len(lines) == 1, lines
o = json.loads(lines[0])
for k in ("prompt_tokens", "completion_tokens", "token_ids", "text",
          "prefill_tokens_per_s", "decode_tokens_per_s"):
    assert k in o, k
assert o["completion_tokens"] == len(o["token_ids"]) <= 12, o
assert o["prompt_tokens"] > 10 and o["prefill_tokens_per_s"] > 0, o
assert o["completion_tokens"] > 0 and len(o["text"]) > 0, o
PY
    then echo "ok   json_output"; else echo "FAIL json_output: $(cat "$tmp/json")"; fails=$((fails + 1)); fi
else
    echo "FAIL json_output: $(cat "$tmp/err")"; fails=$((fails + 1))
fi

# streaming: text on stdout, and --max-tokens 0 generates nothing
out=$("$bin" generate --model "$model" --prompt "The capital of France is" --max-tokens 8 2>/dev/null)
if [ -n "${out//[[:space:]]/}" ]; then echo "ok   stream_output"; else echo "FAIL stream_output"; fails=$((fails + 1)); fi
n=$("$bin" generate --model "$model" --prompt "Hello" --max-tokens 0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["completion_tokens"])')
if [ "$n" = 0 ]; then echo "ok   max_tokens_zero"; else echo "FAIL max_tokens_zero: $n"; fails=$((fails + 1)); fi

# --tp N: N ranks as threads (docs/tp.md); the first greedy tokens (wide
# margins) match the single-process run's, compression runs per rank, and
# what a group cannot do is a clear error, not a hang
one=$("$bin" generate --model "$model" --prompt "The capital of France is" --max-tokens 3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
if tp2=$(timeout 120 "$bin" generate --model "$model" --prompt "The capital of France is" --max-tokens 3 --tp 2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])') &&
    tp3=$(timeout 120 "$bin" generate --model "$model" --prompt "The capital of France is a city that" --max-tokens 4 --tp 3 --kv-method snapkv --kv-budget 0.5 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["completion_tokens"], d["kv_bytes_prompt"] > 0)') &&
    [ "$tp2" = "$one" ] && [ "$tp3" = "4 True" ]; then
    echo "ok   generate_tp"
else
    echo "FAIL generate_tp: '$one' '${tp2:-}' '${tp3:-}'"; fails=$((fails + 1))
fi
expect tp_more_ranks_than_heads 1 "KV heads" -- timeout 60 "$bin" generate --model "$model" --prompt hi --tp 4
# recall under --tp: each rank keeps its own heads' store (tokens checked
# by serve.test_tp_worker and model.test_engine_tp); rank 0's heads
# recalled, by default token recall (K = 2, no promotion), whole blocks
# with --recall-gather 0; the JSON says which ran
rc_tp=$(for g in 2 0; do timeout 120 "$bin" generate --model "$model" --prompt "$(printf 'word %.0s' $(seq 80))" --max-tokens 4 --tp 2 --kv-method snapkv --kv-budget 0.9 --recall 1 $([ $g = 0 ] && echo --recall-gather 0) --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["completion_tokens"], d.get("recall_blocks", 0) > 0, d.get("recall_mode"), d.get("recall_gather"), d.get("recall_promote"))'; done | tr '\n' ' ')
if [ "$rc_tp" = "4 True tokens 2 0 4 True blocks 0 1 " ]; then echo "ok   tp_recall"; else echo "FAIL tp_recall: '$rc_tp'"; fails=$((fails + 1)); fi
# the ranking's channel count is not in the TP plan: refused, not applied to rank 0 alone
expect tp_recall_channels_refused 2 "recall-channels is not supported with --tp" -- timeout 120 "$bin" generate --model "$model" --prompt "$(printf 'word %.0s' $(seq 80))" --max-tokens 2 --tp 2 --kv-method snapkv --kv-budget 0.9 --recall 1 --recall-channels 8
expect recall_gather_out_of_range 2 "recall-gather" -- "$bin" generate --model "$model" --prompt hi --recall 1 --recall-gather 9

# fetch-model: a verified model already in place means no download at all
mkdir -p "$tmp/models"
ln -s "$(realpath "$model")" "$tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if path=$(EKV_PYTHON=/bin/false "$bin" fetch-model --dir "$tmp/models") &&
    [ "$path" = "$tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    echo "ok   fetch_model_present"
else
    echo "FAIL fetch_model_present"; fails=$((fails + 1))
fi
expect fetch_model_bad_flag 2 "unknown flag" -- "$bin" fetch-model --bogus

# bench: runs without the reference and prints JSON lines
if "$bin" bench generate --model "$model" --contexts 64 --n-decode 8 --no-reference --json \
    2>/dev/null | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
assert rows and rows[0]["engine"] == "entrokv" and rows[0]["decode_tokens_per_s"] > 0, rows'; then
    echo "ok   bench_no_reference"
else
    echo "FAIL bench_no_reference"; fails=$((fails + 1))
fi
expect bench_unknown 2 "unknown benchmark" -- "$bin" bench nope

# KV compression flags: every bad input is a clear usage error
lic=/usr/share/common-licenses/GPL-3
expect kv_unknown_method 2 "unknown kv method 'h2o'" -- "$bin" generate --model "$model" --prompt hi --kv-method h2o
expect kv_budget_zero 2 "kv budget must be" -- "$bin" generate --model "$model" --prompt hi --kv-method snapkv --kv-budget 0
expect kv_budget_negative 2 "kv budget must be" -- "$bin" generate --model "$model" --prompt hi --kv-method snapkv --kv-budget -0.5
expect kv_budget_not_number 2 "not a number" -- "$bin" generate --model "$model" --prompt hi --kv-method snapkv --kv-budget lots
expect kv_budget_over_prompt 2 "exceeds the prompt" -- "$bin" generate --model "$model" --prompt "hello there" --kv-method snapkv --kv-budget 64
printf 'entrokv-uncomp-profile 1\nmodel llama 32 32 8 128 128256 Llama 3\nsamples 1\n' >"$tmp/other.uncomp"
expect kv_profile_other_model 2 "another model" -- "$bin" generate --model "$model" --prompt hi --kv-method uncomp --kv-budget 0.5 --kv-profile "$tmp/other.uncomp"
expect kv_profile_missing_file 1 "nope.uncomp" -- "$bin" generate --model "$model" --prompt hi --kv-method uncomp --kv-budget 0.5 --kv-profile "$tmp/nope.uncomp"
expect eval_unknown_task 2 "usage" -- "$bin" eval frobnicate --model "$model"
expect eval_bad_depth 2 "depth" -- "$bin" eval passkey --model "$model" --depth 1.5
expect eval_text_too_short 2 "tokens" -- "$bin" eval ppl --model "$model" --text /usr/share/common-licenses/BSD --prefix 4000 --continue 64
expect calibrate_no_text 2 "required" -- "$bin" calibrate --model "$model" --out "$tmp/p"

# every method runs in generate with a real budget and reports the KV it holds
for m in full streaming snapkv pyramidkv uncomp; do
    if "$bin" generate --model "$model" --prompt "$(head -c 3000 $lic)" --max-tokens 4 --kv-method $m \
        --kv-budget 0.1 --kv-profile none --json 2>"$tmp/err" | python3 -c '
import json, sys
o = json.loads(sys.stdin.read())
full = 90 * ((o["prompt_tokens"] + 15) // 16) * 4160
m = sys.argv[1]
assert o["completion_tokens"] == 4, o
assert (o["kv_bytes_prompt"] == full) if m == "full" else (o["kv_bytes_prompt"] < full / 4), (m, o)' $m; then
        echo "ok   generate_kv_$m"
    else
        echo "FAIL generate_kv_$m: $(head -c 300 "$tmp/err")"; fails=$((fails + 1))
    fi
done

# eval ppl: JSON lines, full KV first with ratio 1, every policy's bytes from the pool
if "$bin" eval ppl --model "$model" --text $lic --prefix 300 --continue 16 --methods snapkv,uncomp-online \
    --budgets 0.2,1 2>"$tmp/err" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
assert len(rows) == 5 and rows[0]["method"] == "full" and rows[0]["ppl_ratio"] == 1, rows
for r in rows:
    assert r["ppl"] > 1 and 0 <= r["top1"] <= 1 and r["kl"] >= 0, r
    if r["budget"] == 1:
        assert r["kl"] == 0 and r["ppl_ratio"] == 1, r   # 100% budget: identical logits
    else:
        assert r["kv_fraction"] < 0.4, r'; then
    echo "ok   eval_ppl"
else
    echo "FAIL eval_ppl: $(tail -c 300 "$tmp/err")"; fails=$((fails + 1))
fi

# composed methods (one run compares token policy, SparK and decode policy on
# the same prompts) over two texts: labels as written, one row per text and
# policy, SparK below its token policy's bytes, h2o/recent at one memory
expect eval_bad_spark_part 2 "bad SparK part" -- "$bin" eval ppl --model "$model" --text $lic --prefix 300 --continue 16 --methods snapkv+spark1.5
expect eval_bad_decode_part 2 "unknown decode method" -- "$bin" eval ppl --model "$model" --text $lic --prefix 300 --continue 16 --methods full+h3o
if "$bin" eval ppl --model "$model" --text $lic,/usr/share/common-licenses/Apache-2.0 --prefix 300 \
    --continue 40 --methods snapkv,snapkv+spark0.5,snapkv+spark0.8z,full+h2o,full+recent \
    --budgets 0.5 --scope-recent 4 --scope-window 12 2>"$tmp/err" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
names = ["full", "snapkv", "snapkv+spark0.5", "snapkv+spark0.8z", "full+h2o", "full+recent"]
assert [r["method"] for r in rows] == names * 2, [r["method"] for r in rows]
assert len({r["text"] for r in rows}) == 2, rows
for t in range(2):
    by = {r["method"]: r for r in rows[6 * t: 6 * t + 6]}
    assert by["snapkv+spark0.5"]["kv_bytes"] < by["snapkv"]["kv_bytes"], by
    assert by["snapkv+spark0.8z"]["kv_bytes"] < by["snapkv+spark0.5"]["kv_bytes"], by
    assert by["full+h2o"]["kv_bytes_end"] == by["full+recent"]["kv_bytes_end"] < by["full"]["kv_bytes_end"], by
    assert by["full+h2o"]["kl"] > 0, by'; then
    echo "ok   eval_ppl_composed"
else
    echo "FAIL eval_ppl_composed: $(tail -c 300 "$tmp/err")"; fails=$((fails + 1))
fi

echo "$fails failure(s)"
[ "$fails" -eq 0 ]
