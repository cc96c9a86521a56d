#!/usr/bin/env python3
"""bench_serve.py - `entrokv bench serve`: serving throughput and latency
under concurrency, entrokv against llama.cpp's own llama-server in the same
run.

For each concurrency C in --concurrency, and for each server in turn
(entrokv full KV, entrokv with compressed KV, and llama-server started with
`-np C -cb`: C slots, continuous batching), the server is started fresh on
the same GGUF and thread count, warmed up, and C clients each send streaming
/v1/completions requests (greedy, --max-tokens with end-of-generation
ignored, distinct windows of real text so no prefix is shared; at least
--min-requests per wave) recording time to first token, the gaps between
streamed tokens, and the tokens generated (from the final usage). Which
server goes first alternates between concurrencies. llama-server gets
--ctx tokens per slot (-c ctx*C) and its prompt cache off (--cache-ram 0);
entrokv gets the same KV room (a pool of ctx*C tokens) and its prefix store
off, unless --kv-tokens fixes its pool: then compressed KV shows as more
sequences fitting in the same memory.

Prints one JSON line per (server, concurrency): output tokens/s over the
wave, p50/p99 TTFT and inter-token latency, completed/failed requests; a
"serve_meta" line (versions, flags); then ratios against llama-server.
Exit 0 when every request completed on the entrokv servers.
"""
import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not come up")


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def one_request(port, body, out):
    """Streams one completion; appends (ttft, gaps, tokens, ok) to out."""
    t0 = time.time()
    ttft, last, gaps, tokens, ok = None, None, [], 0, False
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
        c.request("POST", "/v1/completions", json.dumps(body),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 200:
            for raw in r:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    ok = True
                    break
                msg = json.loads(data)
                now = time.time()
                ch = msg.get("choices") or [{}]
                if ch[0].get("text"):
                    if ttft is None:
                        ttft = now - t0
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
                    tokens += 1
                if msg.get("usage"):
                    tokens = msg["usage"].get("completion_tokens", tokens)
        c.close()
    except (OSError, ValueError, http.client.HTTPException):
        ok = False
    out.append((ttft, gaps, tokens, ok))


def wave(port, prompts, conc, rounds, extra, max_tokens):
    results, threads = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(rounds):
            body = {"prompt": prompts[(i * rounds + r) % len(prompts)], "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            body.update(extra)
            res = []
            one_request(port, body, res)
            with lock:
                results.extend(res)

    t0 = time.time()
    for i in range(conc):
        t = threading.Thread(target=client, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.time() - t0
    ttfts = [r[0] for r in results if r[0] is not None]
    gaps = [g for r in results for g in r[1]]
    toks = sum(r[2] for r in results)
    return {"concurrency": conc, "requests": len(results),
            "completed": sum(1 for r in results if r[3]),
            "failed": sum(1 for r in results if not r[3]),
            "output_tokens": toks, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(toks / wall, 2) if wall > 0 else 0,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99)}


def make_prompts(text_path, n, chars):
    text = open(text_path, encoding="utf-8", errors="replace").read()
    text = re.sub(r"\s+", " ", text)
    step = max(1, (len(text) - chars) // max(1, n))
    return [text[i * step:i * step + chars] + "\n\nContinue the text:" for i in range(n)]


def recall_metrics(port):
    """The server's entrokv_recall_*_total counters from /metrics ({} when
    unreadable): blocks and bytes recalled, deadline misses."""
    want = {"entrokv_recall_blocks_total": "recall_blocks",
            "entrokv_recall_bytes_total": "recall_bytes",
            "entrokv_recall_deadline_misses_total": "recall_deadline_misses"}
    out = {}
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        for line in c.getresponse().read().decode().splitlines():
            f = line.split()
            if len(f) == 2 and f[0] in want:
                out[want[f[0]]] = int(float(f[1]))
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    return out


def kv_tokens(a, conc):
    return a.kv_tokens or a.ctx * conc


def start_entrokv(a, conc, extra_args):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    args = [a.entrokv, "serve", "--model", a.model, "--host", "127.0.0.1", "--grpc-port", "0",
            "--http-port", str(port), "--threads", str(a.threads), "--ctx", str(a.ctx),
            "--kv-tokens", str(kv_tokens(a, conc)), "--max-running", str(max(64, conc)),
            "--max-queued", "1024",
            "--kvstore-mb", "0", "--device", a.device, *extra_args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    wait_http(port, proc, 120)
    return proc, port


def find_llama_server(a):
    if a.llama_server:
        return a.llama_server
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.getcwd(), os.path.dirname(here)):
        p = os.path.join(d, "build", "llamacpp", "bin", "llama-server")
        if os.access(p, os.X_OK):
            return p
    return None


def llama_server_args(a, conc, port):
    """conc None: the command line as the JSON shows it (C, ctx*C)."""
    ctx = f"{a.ctx}*C" if conc is None else str(a.ctx * conc)
    return [a.llama_server, "-m", a.model, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(a.threads), "-tb", str(a.threads), "-np", "C" if conc is None else str(conc),
            "-cb", "-c", ctx, "--cache-ram", "0"]


def start_llamacpp(a, conc):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="bench-llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(llama_server_args(a, conc, port), stdout=subprocess.DEVNULL,
                            stderr=log)
    wait_http(port, proc, 180)
    return proc, port


def llama_server_version(path):
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        return " ".join((r.stdout + r.stderr).split())[:200]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--entrokv", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--llama-server", help="llama.cpp's llama-server (default: the one "
                   "scripts/setup.sh --bench builds in build/llamacpp/bin)")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="entrokv serve --device (cuda: GPU 0; docs/cuda.md)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--kv-tokens", type=int, default=0,
                   help="entrokv's KV pool in tokens (default: ctx * C, llama-server's KV room)")
    p.add_argument("--prefill-chunk", default=None,
                   help="entrokv's --prefill-chunk (default: the server's own); a list such "
                   "as 0,64 runs one full-KV server per value (entrokv-full-chunkN), "
                   "alternated like the others, the compressed one with the last")
    p.add_argument("--prompt-chars", type=int, default=1400)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="requests per client")
    p.add_argument("--min-requests", type=int, default=8,
                   help="raise the requests per client so a wave has at least this many")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--kv-method", default="snapkv")
    p.add_argument("--kv-budget", type=float, default=0.1)
    p.add_argument("--recall", type=int, default=0,
                   help="the compressed server's requests ask for recall R per KV head per "
                        "step (the request field \"recall\"; 0: off): R blocks' worth of tokens, "
                        "by token with the server's default recall_gather, 2")
    p.add_argument("--no-compressed", action="store_true", help="skip the compressed-KV server")
    p.add_argument("--no-reference", action="store_true")
    a = p.parse_args()
    try:
        concs = [int(c) for c in a.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency expects a list like 1,4,16")
    if not concs or min(concs) < 1 or a.rounds < 1 or a.min_requests < 1 or a.max_tokens < 1:
        p.error("concurrency, --rounds, --min-requests and --max-tokens must be >= 1")
    if not a.no_reference:
        a.llama_server = find_llama_server(a)
        if not a.llama_server:
            p.error("no llama-server found: run scripts/setup.sh --bench, or pass "
                    "--llama-server PATH or --no-reference")
    rounds = {c: max(a.rounds, -(-a.min_requests // c)) for c in concs}
    prompts = make_prompts(a.text, max(c * rounds[c] for c in concs), a.prompt_chars)
    try:
        chunks = [int(x) for x in a.prefill_chunk.split(",")] if a.prefill_chunk else [None]
    except ValueError:
        p.error("--prefill-chunk expects a number or a list like 0,64")
    chunk_args = [[] if pc is None else ["--prefill-chunk", str(pc)] for pc in chunks]
    servers = [("entrokv-full" if len(chunks) == 1 else f"entrokv-full-chunk{pc}",
                lambda c, ca=ca: start_entrokv(a, c, ca), {}) for pc, ca in zip(chunks, chunk_args)]
    if not a.no_compressed:
        fields = {"kv_method": a.kv_method, "kv_budget": a.kv_budget}
        if a.recall:
            fields["recall"] = a.recall
        servers.append((f"entrokv-{a.kv_method}-{a.kv_budget:g}" +
                        (f"-r{a.recall}" if a.recall else ""),
                        lambda c: start_entrokv(a, c, chunk_args[-1]), fields))
    if not a.no_reference:
        servers.append(("llama.cpp-server", lambda c: start_llamacpp(a, c), {}))
    meta = {"bench": "serve_meta", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": a.threads, "model": a.model, "ctx": a.ctx,
            "kv_tokens": a.kv_tokens or "ctx*C", "prompt_chars": a.prompt_chars,
            "prefill_chunk": chunks if a.prefill_chunk else "default",
            "max_tokens": a.max_tokens, "rounds": rounds, "text": a.text}
    if not a.no_reference:
        meta["llama_server"] = {"path": a.llama_server,
                                "version": llama_server_version(a.llama_server),
                                "args": " ".join(llama_server_args(a, None, "PORT")[1:])}
    print(json.dumps(meta), flush=True)
    rows = {}
    ok = True
    for k, c in enumerate(concs):
        # which server goes first alternates, so drift falls on all alike
        order = servers if k % 2 == 0 else servers[::-1]
        for name, start, extra in order:
            try:
                proc, port = start(c)
            except (RuntimeError, OSError) as e:
                print(f"bench serve: {name} did not start: {e}", file=sys.stderr)
                ok = ok and name.startswith("llama")
                continue
            try:
                # warm-up with a prompt the waves never use
                one_request(port, {"prompt": "Warm-up.", "max_tokens": 4, "stream": True}, [])
                r = wave(port, prompts, c, rounds[c], extra, a.max_tokens)
                r.update({"bench": "serve", "server": name, "threads": a.threads,
                          "device": a.device if name.startswith("entrokv") else "cpu",
                          "kv_tokens": kv_tokens(a, c) if name.startswith("entrokv") else None})
                if "recall" in extra:  # the server's counters (the warm-up recalls nothing)
                    r["recall"] = extra["recall"]
                    r.update(recall_metrics(port))
                    if "recall_bytes" in r and r["output_tokens"]:
                        r["recall_bytes_per_token"] = round(
                            r["recall_bytes"] / r["output_tokens"], 1)
                rows[(name, c)] = r
                print(json.dumps(r), flush=True)
                print(f"  {name:24s} c={c:3d} {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50 "
                      f"{r['ttft_p50_s'] or 0:.2f}s p99 {r['ttft_p99_s'] or 0:.2f}s  ITL p50 "
                      f"{(r['itl_p50_s'] or 0) * 1e3:.0f}ms p99 {(r['itl_p99_s'] or 0) * 1e3:.0f}ms"
                      f"  failed {r['failed']}", file=sys.stderr, flush=True)
                if name.startswith("entrokv") and r["failed"]:
                    ok = False
            finally:
                stop(proc)
    print("\nratios (output tokens/s):", file=sys.stderr)
    for c in concs:
        ref = rows.get(("llama.cpp-server", c))
        full = rows.get((servers[0][0], c))
        for (name, cc), r in rows.items():
            if cc != c or name == "llama.cpp-server":
                continue
            line = {"bench": "serve_ratio", "server": name, "concurrency": c}
            if ref and ref["output_tokens_per_s"]:
                line["vs_llama_cpp"] = round(r["output_tokens_per_s"] / ref["output_tokens_per_s"], 2)
                # latency ratios: below 1 means entrokv answers sooner
                for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
                    if r[key] is not None and ref[key]:
                        line[f"{key[:-2]}_vs_llama_cpp"] = round(r[key] / ref[key], 2)
            if full and full["output_tokens_per_s"] and name != servers[0][0]:
                line["vs_entrokv_full"] = round(r["output_tokens_per_s"] / full["output_tokens_per_s"], 2)
            print(json.dumps(line), flush=True)
            print(f"  c={c:3d} {name:24s} " + " ".join(f"{k}={v}" for k, v in line.items()
                                                          if "vs_" in k), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
