#!/usr/bin/env python3
"""bench_membound.py - `entrokv bench membound`: serving in the memory-bound
regime (issue 22, part 5). Long prompts of real text (--prompt-chars of the
texts in --text, distinct windows, about 4 characters a token) and a KV pool
that holds only --pools full sequences (prompt + --max-tokens each); for each
KV policy in --policies (full, and SnapKV / UNComp at 10% and 20% by
default) and each pool size, a fresh `entrokv serve` gets --requests
streaming /v1/completions at once (greedy, end-of-generation ignored, the
prefix store off) and the run records output tokens/s over the wave, TTFT
p50/p99, ITL p50/p99, the engine's preemptions and steps (the gRPC Worker
service's Stats) and the prompt tokens the server counted.

With full KV the pool runs --pools sequences at a time and the rest wait
(or are preempted and recomputed when decode outgrows the pool); a
compressed prompt holds its budget's share of the pool once its prefill
ends, so more sequences decode together and each decode step reads less
KV. Prefill is the same for every policy (compression needs the whole
prompt's KV first), so the gain grows with --max-tokens.

During each wave the engine's Stats are polled (--sample-s): the mean and
most sequences running at once and the pool's mean occupancy, with the
series, are the accounting behind a throughput. --prefill-baseline also
runs the wave with full KV and one output token per pool: its wall time is
the prefill's share of the full-KV run, which bounds what any policy can
gain (full's wall over it).

A policy is NAME[:BUDGET][:rR][:gK] (parse_policy): rR asks each request
for recall of R evicted blocks per KV head per step (the request field
"recall"; docs/COMPRESSION.md, "Recall of evicted KV"), gK for recall by
token from the K x R best-ranked blocks ("recall_gather"; only sent when
given: absent, the server's default, K = 2; g0 for whole blocks).
The recall buffer comes out of the budget, so snapkv:0.1:r10 holds the
same resident memory as snapkv:0.1. Each run's line records the worker's
recall counters (Stats recall_*: blocks and bytes recalled, deadline
misses, promotions, blocks spilled) and bytes recalled per output token.

Prints one JSON line per (policy, pool) and a "membound_meta" line;
--plot PNG draws output tokens/s against the KV pool (matplotlib);
--from-jsonl FILE --plot PNG redraws it from a run's output.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serve as bs  # noqa: E402  (free_port, wait_http, one_request, pct, stop)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ("/usr/share/common-licenses/GPL-3,/usr/share/common-licenses/GFDL-1.3,"
         "/usr/share/common-licenses/LGPL-2.1,/usr/share/common-licenses/MPL-1.1,"
         "/usr/share/common-licenses/GPL-2,/usr/share/common-licenses/Apache-2.0")


def make_prompts(paths, n, chars):
    """n distinct windows of chars characters over the texts, one after another."""
    import re
    text = ""
    for p in paths.split(","):
        with open(p, encoding="utf-8", errors="replace") as f:
            text += re.sub(r"\s+", " ", f.read()) + " "
    if len(text) < chars:
        raise SystemExit(f"bench membound: the texts hold {len(text)} characters, fewer than "
                         f"--prompt-chars {chars}")
    step = max(1, (len(text) - chars) // max(1, n - 1)) if n > 1 else 0
    return [text[i * step:i * step + chars] + "\n\nSummarise the text above:" for i in range(n)]


def parse_policy(s):
    """NAME[:BUDGET][:rR][:gK] -> {"name", "budget", "recall", "gather",
    "label"}: budget 1.0 when omitted, recall 0 (off), gather None (not
    sent). The label is "NAME BUDGET" (plus " rR", " gK"), "full" alone."""
    parts = s.strip().split(":")
    name = parts[0]
    if not name:
        raise ValueError(f"policy {s!r}: no method name")
    pol = {"name": name, "budget": 1.0, "recall": 0, "gather": None}
    rest = parts[1:]
    if rest and rest[0][:1] not in ("r", "g"):
        pol["budget"] = float(rest.pop(0))
        if not pol["budget"] > 0:
            raise ValueError(f"policy {s!r}: the budget must be positive")
    seen = set()
    for x in rest:
        key = {"r": "recall", "g": "gather"}.get(x[:1])
        if key is None or key in seen or not x[1:].isdigit():
            raise ValueError(f"policy {s!r}: {x!r} is not rN (recall) or gK (gather), once each")
        seen.add(key)
        pol[key] = int(x[1:])
    if pol["gather"] is not None and not pol["recall"]:
        raise ValueError(f"policy {s!r}: gather (gK) needs recall (rN, N > 0)")
    label = name if name == "full" else f"{name} {pol['budget']:g}"
    if pol["recall"]:
        label += f" r{pol['recall']}"
    if pol["gather"] is not None:
        label += f" g{pol['gather']}"
    pol["label"] = label
    return pol


RECALL_STATS = ("recall_blocks", "recall_bytes", "recall_deadline_misses", "recall_promotions",
                "recall_spilled_blocks")


def stats(port, raw=False):
    """The engine's Stats over the Worker service, or {} when it cannot be read."""
    try:
        pb, pb_grpc = stats.stubs
        import grpc
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            s = pb_grpc.WorkerStub(ch).Stats(pb.StatsRequest(), timeout=10)
            if raw:
                return s
            return {"preemptions": s.preemptions, "steps": s.steps,
                    "kv_blocks_total": s.kv_blocks_total, "kv_bytes_saved": s.kv_bytes_saved,
                    **{k: getattr(s, k) for k in RECALL_STATS}}
    except Exception as e:  # noqa: BLE001 - the bench reports what it could not read
        print(f"bench membound: Stats: {e}", file=sys.stderr)
        return {}


class Sampler:
    """Polls the engine's Stats every `every` seconds during a wave: the
    accounting behind a throughput (how many sequences ran at once, how
    full the pool was, how many steps went by), as time averages and a
    series [t, running, queued, pool used fraction, steps]."""

    def __init__(self, port, every):
        self.port, self.every, self.rows = port, every, []
        self.stop_ev = threading.Event()
        self.t0 = time.time()
        self.th = threading.Thread(target=self.loop, daemon=True)
        self.th.start()

    def loop(self):
        while not self.stop_ev.is_set():
            s = stats(self.port, raw=True)
            if s:
                used = 1 - s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0
                self.rows.append([round(time.time() - self.t0, 2), s.running, s.queued,
                                  round(used, 3), s.steps])
            self.stop_ev.wait(self.every)

    def finish(self):
        self.stop_ev.set()
        self.th.join()
        r = self.rows
        if not r:
            return {}
        return {"mean_running": round(sum(x[1] for x in r) / len(r), 2),
                "max_running": max(x[1] for x in r),
                "mean_pool_used": round(sum(x[3] for x in r) / len(r), 3),
                "samples": r}


def prompt_tokens(port):
    """entrokv_prompt_tokens_total from /metrics (warm-up included), or None."""
    import http.client
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        for line in c.getresponse().read().decode().splitlines():
            if line.startswith("entrokv_prompt_tokens_total"):
                return int(float(line.split()[-1]))
    except (OSError, ValueError):
        pass
    return None


def git_describe():
    """The source tree this bench ran from (the binary is built from it), or None."""
    import subprocess
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def load_stubs():
    import importlib
    from grpc_tools import protoc
    out = tempfile.mkdtemp(prefix="entrokv-membound-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for name in ("entrokv.proto", "health.proto"):
        assert protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}",
                            f"--grpc_python_out={out}", f"{ROOT}/proto/{name}"]) == 0
    sys.path.insert(0, out)
    return importlib.import_module("entrokv_pb2"), importlib.import_module("entrokv_pb2_grpc")


def run_one(a, prompts, pol, kv_tokens, max_tokens=None):
    max_tokens = a.max_tokens if max_tokens is None else max_tokens
    import subprocess
    port, wport = bs.free_port(), bs.free_port()
    log = tempfile.NamedTemporaryFile(prefix="bench-membound-", suffix=".log", delete=False)
    args = [a.entrokv, "serve", "--model", a.model, "--host", "127.0.0.1", "--grpc-port", "0",
            "--http-port", str(port), "--worker-port", str(wport), "--threads", str(a.threads),
            "--ctx", str(a.ctx), "--kv-tokens", str(kv_tokens),
            "--max-running", str(max(8, a.requests)), "--kvstore-mb", "0", "--device", a.device]
    if a.prefill_chunk is not None:
        args += ["--prefill-chunk", str(a.prefill_chunk)]
    if a.reserve_output is not None:
        args += ["--kv-reserve-output", str(a.reserve_output)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    try:
        bs.wait_http(port, proc, 120)
        bs.one_request(port, {"prompt": "Warm-up.", "max_tokens": 4, "stream": True}, [])
        warm = prompt_tokens(port) or 0
        results, threads, lock = [], [], threading.Lock()

        def client(i):
            body = {"prompt": prompts[i], "max_tokens": max_tokens, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "kv_method": pol["name"], "kv_budget": pol["budget"]}
            if pol["recall"]:
                body["recall"] = pol["recall"]
            if pol["gather"] is not None:
                body["recall_gather"] = pol["gather"]
            res = []
            bs.one_request(port, body, res)
            with lock:
                results.extend(res)

        sampler = Sampler(wport, a.sample_s) if a.sample_s > 0 else None
        t0 = time.time()
        for i in range(a.requests):
            t = threading.Thread(target=client, args=(i,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        wall = time.time() - t0
        st = stats(wport)
        if sampler:
            st.update(sampler.finish())
        total = prompt_tokens(port)
        if total is not None:
            st["prompt_tokens"] = total - warm  # what the server counted for the wave
    finally:
        bs.stop(proc)
    ttfts = [r[0] for r in results if r[0] is not None]
    gaps = [g for r in results for g in r[1]]
    toks = sum(r[2] for r in results)
    if "recall_bytes" in st:
        st["recall_bytes_per_token"] = round(st["recall_bytes"] / toks, 1) if toks else None
    return {"bench": "membound", "policy": pol["name"], "budget": pol["budget"],
            "recall": pol["recall"], "recall_gather": pol["gather"], "kv_tokens": kv_tokens,
            "requests": len(results), "completed": sum(1 for r in results if r[3]),
            "output_tokens": toks, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(toks / wall, 2) if wall > 0 else 0,
            "ttft_p50_s": bs.pct(ttfts, 0.5), "ttft_p99_s": bs.pct(ttfts, 0.99),
            "itl_p50_s": bs.pct(gaps, 0.5), "itl_p99_s": bs.pct(gaps, 0.99), **st}


def plot(rows, path):
    """Output tokens/s against the KV pool and, where the Stats were
    sampled, against the KV the wave really held on average."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    held = all("mean_pool_used" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(11 if held else 6.4, 4.2),
                             squeeze=False)
    for name in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == name]
        pts = sorted((r["kv_tokens"], r["output_tokens_per_s"]) for r in mine)
        axes[0][0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if held:
            pts = sorted((r["mean_pool_used"] * r["kv_tokens"], r["output_tokens_per_s"])
                         for r in mine)
            axes[0][1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[0][0].set_xlabel("KV pool (tokens per KV head, all sequences)")
    axes[0][0].set_title("memory-bound serving: long prompts, small KV pool")
    if held:
        axes[0][1].set_xlabel("KV held, mean over the wave (tokens per KV head)")
        axes[0][1].set_title("the same runs against the KV they held")
    for ax in axes[0]:
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(0, 1.2 * max(r["output_tokens_per_s"] for r in rows))
        ax.set_xlim(0, 1.1 * ax.get_xlim()[1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--entrokv", required=True)
    p.add_argument("--model", help="the GGUF (required unless --from-jsonl)")
    p.add_argument("--text", default=TEXTS, help="comma-separated text files (real text)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="entrokv serve --device (cuda: GPU 0; docs/cuda.md)")
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--prompt-chars", type=int, default=17000,
                   help="characters per prompt (about 4 a token: 17000 is about 4k tokens)")
    p.add_argument("--prompt-tokens", type=int, default=4200,
                   help="tokens a prompt is sized at for the pool (at least what the server counts)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--pools", default="2", help="KV pool sizes in full sequences, e.g. 1,2,4")
    p.add_argument("--policies", default="full,snapkv:0.1,snapkv:0.2,uncomp:0.1,uncomp:0.2",
                   help="comma-separated NAME[:BUDGET][:rR][:gK], e.g. snapkv:0.1:r10 (recall "
                        "10 blocks per KV head per step), snapkv:0.1:r10:g2 (by token)")
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--reserve-output", type=int, default=None,
                   help="serve --kv-reserve-output PCT (admission keeps that share of each "
                        "request's max_tokens free; 100: no preemption)")
    p.add_argument("--prefill-baseline", action="store_true",
                   help="per pool, also the same wave with full KV and one output token: "
                        "the prefill's share of the full-KV run, which no KV policy changes")
    p.add_argument("--sample-s", type=float, default=1.0,
                   help="poll the engine's Stats this often during a wave (0: not at all)")
    p.add_argument("--plot", help="write a PNG of throughput against the KV pool here")
    p.add_argument("--from-jsonl", help="only draw --plot from this earlier run's output")
    a = p.parse_args()
    if a.from_jsonl:
        if not a.plot:
            p.error("--from-jsonl needs --plot")
        with open(a.from_jsonl) as f:
            plot([r for r in map(json.loads, f) if r.get("bench") == "membound"], a.plot)
        return 0
    if not a.model:
        p.error("--model is required")
    try:
        pols = [parse_policy(x) for x in a.policies.split(",")]
    except ValueError as e:
        p.error(str(e))
    pools = [float(x) for x in a.pools.split(",")]
    prompts = make_prompts(a.text, a.requests, a.prompt_chars)
    stats.stubs = load_stubs()
    seq = a.prompt_tokens + a.max_tokens + 32  # a block or two of slack per sequence
    print(json.dumps({"bench": "membound_meta",
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "model": a.model, "threads": a.threads, "ctx": a.ctx,
                      "prompt_chars": a.prompt_chars, "prompt_tokens_sized": a.prompt_tokens,
                      "max_tokens": a.max_tokens, "requests": a.requests, "pools": pools,
                      "reserve_output": a.reserve_output, "prefill_chunk": a.prefill_chunk,
                      "text": a.text, "commit": git_describe(),
                      "load_at_start": os.getloadavg()[0]}), flush=True)
    rows = []
    for k, pool in enumerate(pools):
        order = pols if k % 2 == 0 else pols[::-1]  # drift falls on all policies alike
        for pol in order:
            kv = int(pool * seq)
            r = run_one(a, prompts, pol, kv)
            r["pool_sequences"] = pool
            r["label"] = pol["label"]
            r["load"] = os.getloadavg()[0]
            rows.append(r)
            print(json.dumps(r), flush=True)
            print(f"  {r['label']:12s} pool {pool:g} seq ({kv} tok) {r['output_tokens_per_s']:7.1f} "
                  f"tok/s  TTFT p50 {r['ttft_p50_s'] or 0:.1f}s p99 {r['ttft_p99_s'] or 0:.1f}s  "
                  f"preemptions {r.get('preemptions')}  running {r.get('mean_running')} "
                  f"pool used {r.get('mean_pool_used')}  recall B/tok "
                  f"{r.get('recall_bytes_per_token')}  completed {r['completed']}/{r['requests']}",
                  file=sys.stderr, flush=True)
    if a.prefill_baseline:
        for pool in pools:
            r = run_one(a, prompts, parse_policy("full"), int(pool * seq), max_tokens=1)
            r.update(bench="membound_prefill", pool_sequences=pool,
                     label="prefill only (full KV, 1 token)",
                     load=os.getloadavg()[0])
            print(json.dumps(r), flush=True)
            print(f"  prefill only pool {pool:g}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
            full = next((x for x in rows if x["label"] == "full" and x["pool_sequences"] == pool),
                        None)
            if full and r["wall_s"] > 0:
                # with decode free, a policy could at most reach full's wall over this
                print(json.dumps({"bench": "membound_prefill_share", "pool_sequences": pool,
                                  "prefill_wall_s": r["wall_s"], "full_wall_s": full["wall_s"],
                                  "share": round(r["wall_s"] / full["wall_s"], 3),
                                  "ceiling_vs_full": round(full["wall_s"] / r["wall_s"], 2)}),
                      flush=True)
    for pool in pools:
        full = next((r for r in rows if r["label"] == "full" and r["pool_sequences"] == pool), None)
        for r in rows:
            if r["pool_sequences"] == pool and full and full["output_tokens_per_s"] and r is not full:
                print(json.dumps({"bench": "membound_ratio", "label": r["label"], "pool_sequences": pool,
                                  "vs_full": round(r["output_tokens_per_s"] /
                                                   full["output_tokens_per_s"], 2)}), flush=True)
    if a.plot:
        plot(rows, a.plot)
    return 0 if all(r["completed"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
