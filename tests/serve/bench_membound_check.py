#!/usr/bin/env python3
"""bench_membound_check.py - `entrokv bench membound` on a tiny shape: two
prompts, a pool of one full sequence, full KV against SnapKV 10%. Every
request completes with its --max-tokens; the pool is the one the flags
imply; the engine's Stats came back (preemptions, steps) and say the
compressed run saved KV and the full run none (so the policy reached the
server); the Stats were sampled during each wave (at most the two
requests ran at once, the pool's occupancy is a fraction); the prefill
baseline ran the same prompts with one output token each and its share
line is its wall over full's; the ratio line and the PNG are written."""
import json
import os
import subprocess
import sys
import tempfile


def main():
    bin_, model = sys.argv[1], sys.argv[2]
    png = os.path.join(tempfile.mkdtemp(), "membound.png")
    args = [bin_, "bench", "membound", "--model", model, "--prompt-chars", "1200",
            "--prompt-tokens", "400", "--requests", "2", "--max-tokens", "4", "--ctx", "1024",
            "--pools", "1", "--policies", "full,snapkv:0.1", "--sample-s", "0.1",
            "--prefill-baseline"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", png]
    except ImportError:
        png = None
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    runs = {x["label"]: x for x in rows if x["bench"] == "membound"}
    assert set(runs) == {"full", "snapkv 0.1"}, rows
    for x in runs.values():
        assert x["completed"] == x["requests"] == 2, x
        assert x["output_tokens"] == 2 * 4, x
        assert x["kv_tokens"] == 400 + 4 + 32, x
        assert x["preemptions"] >= 0 and x["steps"] > 0, x
        assert 2 * 100 < x["prompt_tokens"] <= 2 * 400, x  # both prompts, as sized
        assert x["ttft_p50_s"] is not None and x["ttft_p50_s"] <= x["ttft_p99_s"], x
        assert len(x["samples"]) >= 1 and 0 <= x["max_running"] <= 2, x
        assert all(0 <= s[3] <= 1 for s in x["samples"]), x
    assert runs["full"]["kv_bytes_saved"] == 0, runs
    assert runs["snapkv 0.1"]["kv_bytes_saved"] > 0, runs
    (ratio,) = [x for x in rows if x["bench"] == "membound_ratio"]
    want = runs["snapkv 0.1"]["output_tokens_per_s"] / runs["full"]["output_tokens_per_s"]
    assert abs(ratio["vs_full"] - round(want, 2)) < 0.011, (ratio, want)
    (pre,) = [x for x in rows if x["bench"] == "membound_prefill"]
    assert pre["policy"] == "full" and pre["output_tokens"] == 2 and pre["completed"] == 2, pre
    (share,) = [x for x in rows if x["bench"] == "membound_prefill_share"]
    assert abs(share["share"] - pre["wall_s"] / runs["full"]["wall_s"]) < 0.0011, (share, pre)
    (meta,) = [x for x in rows if x["bench"] == "membound_meta"]
    assert meta["max_tokens"] == 4 and meta["requests"] == 2, meta
    if png:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    print("all passed")


if __name__ == "__main__":
    main()
