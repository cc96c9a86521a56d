#!/usr/bin/env bash
# test_bench_tp.sh - `entrokv bench tp` end to end: real mpirun groups of 1,
# 2 and 3 ranks over the demo model, a few decode steps each. Checks the
# JSON shape and the communication volume against the model of
# docs/scaling.md written out here from the model's shape (30 layers,
# n_embd 576): per token every rank sends, per allreduce of n floats,
# 4 ((n - len) + (N - 1) len) bytes (len its chunk, n/N), two allreduces a
# layer, and rank 0 broadcasts the 4-byte token to N - 1 peers. Speed is
# not checked (a loaded 2-core machine), only that it was measured.
#
# Usage: test_bench_tp.sh ENTROKV MODEL
set -u
bin=$1
model=$2
out=$(mktemp)
trap 'rm -f "$out" "$out.err"' EXIT
if ! timeout -k 5 240 "$bin" bench tp --model "$model" --np 1,2,3 --reps 1 --n-decode 4 \
        --prompt-tokens 16 --json >"$out" 2>"$out.err"; then
    echo "FAIL: bench tp exited non-zero"; cat "$out" "$out.err"; exit 1
fi
python3 - "$out" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
runs = {l["np"]: l for l in lines if l["bench"] == "tp"}
summ = {l["np"]: l for l in lines if l["bench"] == "tp_summary"}
assert sorted(runs) == [1, 2, 3] and sorted(summ) == [1, 2, 3], (sorted(runs), sorted(summ))
layers, n = 30, 576
for N in (1, 2, 3):
    r, s = runs[N], summ[N]
    assert r["model"] == {"n_layers": layers, "n_embd": n, "n_vocab": 49152}, r["model"]
    assert r["comm"] == "mpi" and r["decode_tokens"] == 4 and len(r["tokens"]) == 4
    assert r["decode_tokens_per_s"] > 0 and s["decode_tokens_per_s"]["median"] > 0
    if N == 1:
        want0 = want = 0
    else:
        per_rank = []
        for rank in range(N):
            ln = n // N + (1 if rank < n % N else 0)
            per_rank.append(2 * layers * 4 * ((n - ln) + (N - 1) * ln))
        per_rank[0] += 4 * (N - 1)
        want0, want = per_rank[0], sum(per_rank)
        assert r["bytes_per_token_per_rank"] == per_rank, (N, r["bytes_per_token_per_rank"], per_rank)
        assert r["collectives_per_token"] == 2 * layers + 1, r["collectives_per_token"]
        assert r["allreduce_row_us"] > 0
    assert r["bytes_per_token_rank0"] == want0, (N, r["bytes_per_token_rank0"], want0)
    assert r["bytes_per_token_total"] == want, (N, r["bytes_per_token_total"], want)
    assert s["predicted_bytes_per_token_rank0"] == want0, (N, s)
    # greedy tokens (their agreement with N = 1 is model.test_tp_forward's
    # business, with its tolerance; here only that real ids came back)
    assert all(0 <= t < 49152 for t in r["tokens"]), r["tokens"]
print("ok: bench tp volumes", {N: runs[N]["bytes_per_token_rank0"] for N in (1, 2, 3)})
PY
[ $? -eq 0 ] || exit 1
# started by mpirun itself, it is one group's ranks: one line, from rank 0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if ! timeout -k 5 120 mpirun --oversubscribe --bind-to none -np 2 "$bin" bench tp \
        --model "$model" --n-decode 2 --prompt-tokens 8 >"$out" 2>"$out.err" ||
    [ "$(grep -c '^{"bench":"tp","np":2,' "$out")" -ne 1 ] ||
    ! grep -q '"bytes_per_token_rank0":138244.0' "$out"; then
    echo "FAIL: mpirun -np 2 entrokv bench tp"; cat "$out" "$out.err"; exit 1
fi
echo "ok: mpirun -np 2 entrokv bench tp"
