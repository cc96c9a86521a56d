#!/usr/bin/env python3
"""bench_membound_check.py - `entrokv bench membound` on a tiny shape: two
prompts, a pool of one full sequence, full KV against SnapKV 10%. Every
request completes with its --max-tokens; the pool is the one the flags
imply; the engine's Stats came back (preemptions, steps) and say the
compressed run saved KV and the full run none (so the policy reached the
server); the Stats were sampled during each wave (at most the two
requests ran at once, the pool's occupancy is a fraction); the prefill
baseline ran the same prompts with one output token each and its share
line is its wall over full's; the ratio lines and the PNG are written.
Recall in the policy syntax (NAME:BUDGET:rR[:gK], issue 20): the parser
against the syntax's definition, and a snapkv:0.1:r1 run whose requests
asked for recall (the worker's recall counters move, the other runs'
stay at 0: a server per run)."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import bench_membound as bm  # noqa: E402


def check_parse():
    """NAME[:BUDGET][:rR][:gK]: budget 1 when omitted, recall 0 and gather
    None (not sent) unless given, the two suffixes once each in any order."""
    want = {"full": ("full", 1.0, 0, None, "full"),
            "snapkv:0.1": ("snapkv", 0.1, 0, None, "snapkv 0.1"),
            "snapkv:0.1:r10": ("snapkv", 0.1, 10, None, "snapkv 0.1 r10"),
            "uncomp:0.2:r4:g2": ("uncomp", 0.2, 4, 2, "uncomp 0.2 r4 g2"),
            "uncomp:0.2:g2:r4": ("uncomp", 0.2, 4, 2, "uncomp 0.2 r4 g2"),
            "snapkv:r3": ("snapkv", 1.0, 3, None, "snapkv 1 r3"),
            "snapkv:0.1:r0": ("snapkv", 0.1, 0, None, "snapkv 0.1")}
    for s, w in want.items():
        p = bm.parse_policy(s)
        assert (p["name"], p["budget"], p["recall"], p["gather"], p["label"]) == w, (s, p)
    for bad in ("snapkv:0.1:x3", "snapkv:0.1:g2", "snapkv:0.1:r1:r2", ":0.1", "snapkv:0",
                "snapkv:0.1:r", "snapkv:0.1:r-1", "snapkv:0.1:r2.5", "snapkv:abc"):
        try:
            bm.parse_policy(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")


def main():
    check_parse()
    bin_, model = sys.argv[1], sys.argv[2]
    png = os.path.join(tempfile.mkdtemp(), "membound.png")
    args = [bin_, "bench", "membound", "--model", model, "--prompt-chars", "1200",
            "--prompt-tokens", "400", "--requests", "2", "--max-tokens", "4", "--ctx", "1024",
            "--pools", "1", "--policies", "full,snapkv:0.1,snapkv:0.1:r1", "--sample-s", "0.1",
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
    assert set(runs) == {"full", "snapkv 0.1", "snapkv 0.1 r1"}, rows
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
    assert runs["snapkv 0.1 r1"]["kv_bytes_saved"] > 0, runs
    # recall: at most R = 1 block per (layer, KV head) per output token:
    # 2 requests x 4 tokens x 30 layers x 3 KV heads; the runs without none
    rec = runs["snapkv 0.1 r1"]
    assert rec["recall"] == 1 and rec["recall_gather"] is None, rec
    assert 0 < rec["recall_blocks"] <= 2 * 4 * 30 * 3, rec
    assert rec["recall_bytes"] > 0 and rec["recall_deadline_misses"] == 0, rec
    assert rec["recall_bytes_per_token"] == round(rec["recall_bytes"] / 8, 1), rec
    for lab in ("full", "snapkv 0.1"):
        assert runs[lab]["recall"] == 0 and runs[lab]["recall_blocks"] == 0, runs[lab]
        assert runs[lab]["recall_bytes"] == runs[lab]["recall_bytes_per_token"] == 0, runs[lab]
    (ratio,) = [x for x in rows if x["bench"] == "membound_ratio" and x["label"] == "snapkv 0.1"]
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
