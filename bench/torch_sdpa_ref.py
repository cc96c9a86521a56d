#!/usr/bin/env python3
"""torch_sdpa_ref.py - the reference for `entrokv bench cuda-attention`.

Times torch.nn.functional.scaled_dot_product_attention on the same decode
shapes as entrokv's paged kernel with full KV: one new token per sequence,
n_q query heads sharing n_kv KV heads (GQA), fp16 K/V contiguous per head.
The group's query heads become g query rows over their KV head, so torch
reads each K/V byte once per step, as entrokv does. Prints one JSON line per
measurement; a missing torch or GPU is one JSON line with "skipped".
Needs no network.
"""
import argparse
import json
import sys


def parse_list(s):
    return [int(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hbm-gbps", type=float, default=0.0)
    a = ap.parse_args()
    base = {"bench": "cuda-attention", "engine": "torch-sdpa"}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print(json.dumps(dict(base, skipped="torch is not installed")))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps(dict(base, skipped="torch sees no CUDA device")))
        return 0
    torch.manual_seed(0)
    dev = torch.device("cuda")
    g = a.q_heads // a.kv_heads
    d = a.head_dim
    for ctx in parse_list(a.contexts):
        for b in parse_list(a.batches):
            rec = dict(base, torch=torch.__version__, context=ctx, batch=b, kv="full")
            try:
                q = torch.randn(b, a.kv_heads, g, d, dtype=torch.float16, device=dev)
                k = torch.randn(b, a.kv_heads, ctx, d, dtype=torch.float16, device=dev)
                v = torch.randn(b, a.kv_heads, ctx, d, dtype=torch.float16, device=dev)
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v)
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(a.iters):
                    F.scaled_dot_product_attention(q, k, v)
                stop.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(stop) / a.iters
            except torch.cuda.OutOfMemoryError:
                print(json.dumps(dict(rec, skipped="out of GPU memory")))
                torch.cuda.empty_cache()
                continue
            nbytes = 2 * b * a.kv_heads * ctx * d * 2
            gbps = nbytes / (ms * 1e-3) / 1e9
            rec.update(ms=round(ms, 4), bytes=nbytes, gbps=round(gbps, 1))
            if a.hbm_gbps > 0:
                rec.update(hbm_gbps=a.hbm_gbps, frac_hbm=round(gbps / a.hbm_gbps, 3))
            print(json.dumps(rec), flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
