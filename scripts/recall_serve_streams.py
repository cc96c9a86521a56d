#!/usr/bin/env python3
"""recall_serve_streams.py - N concurrent long-prompt completions with
recall through `entrokv serve` (issue 20), the recall blocks in host memory
or behind `--recall-host-mb 0` on an `entrokv kvstore` daemon, or no recall:
wall time, completion tokens/s over all streams, per-request latency, and
the server's recall counters from /metrics. One JSON line per run on stdout.

  python3 scripts/recall_serve_streams.py --entrokv build/rel/entrokv \\
      --model models/SmolLM2-135M-Instruct.Q4_1.gguf --mode daemon --streams 16

Bounded: each request has a timeout, the server and daemon are stopped at
the end. Prompts are distinct windows of a real text (so no prefix is
shared), compressed with --kv-method/--kv-budget, recall R per head.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request


def start(cmd, pattern, stream, timeout=60):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    src = p.stdout if stream == "stdout" else p.stderr
    end, seen = time.time() + timeout, ""
    while time.time() < end:
        line = src.readline()
        if not line:
            break
        seen += line
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in src], daemon=True).start()
            return p, m
    p.kill()
    raise SystemExit(f"{cmd[1]} did not start: {seen[-2000:]}")


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for name in ("recall_blocks_total", "recall_bytes_total", "recall_deadline_misses_total",
                 "recall_spilled_blocks_total", "generated_tokens_total"):
        m = re.search(rf"^entrokv_{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entrokv", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["none", "host", "daemon"], required=True)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-chars", type=int, default=2400)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-method", default="snapkv")
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--recall", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    text = open(a.text).read()
    tmp = tempfile.mkdtemp(prefix="entrokv-recall-streams-")
    daemon = None
    extra = []
    if a.mode == "daemon":
        token = os.path.join(tmp, "token")
        with open(token, "w") as f:
            f.write("recall-streams\n")
        daemon, m = start([a.entrokv, "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb",
                           "1024", "--auth-token-file", token], r"listening on [\d.]+:(\d+)",
                          "stdout")
        extra = ["--kvstore-peers", f"127.0.0.1:{m.group(1)}", "--kvstore-token-file", token,
                 "--recall-host-mb", "0"]
    ctx = 2048
    server, m = start([a.entrokv, "serve", "--model", a.model, "--host", "127.0.0.1",
                       "--grpc-port", "0", "--http-port", "0", "--threads", str(a.threads),
                       "--ctx", str(ctx), "--kv-tokens", str(ctx * (a.streams + 2)),
                       "--max-running", str(a.streams), "--kvstore-mb", "0", *extra],
                      r"listening grpc=[\d.]+:\d+ http=[\d.]+:(\d+)", "stderr")
    port = int(m.group(1))
    before = metrics(port)
    lat, toks, errors = [0.0] * a.streams, [0] * a.streams, []

    def one(i):
        start_c = (i * 997) % max(1, len(text) - a.prompt_chars)
        body = {"model": "m", "prompt": f"[{i}] " + text[start_c:start_c + a.prompt_chars],
                "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}
        if a.mode != "none":
            body.update(kv_method=a.kv_method, kv_budget=a.kv_budget, recall=a.recall)
        else:
            body.update(kv_method=a.kv_method, kv_budget=a.kv_budget)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.time()
        try:
            r = json.loads(urllib.request.urlopen(req, timeout=a.timeout).read())
            toks[i] = r["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            errors.append(f"{i}: {e}")
        lat[i] = time.time() - t0

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(a.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    after = metrics(port)
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
    if daemon:
        daemon.kill()
        daemon.wait()
    gen = sum(toks)
    d = {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None
         for k in after}
    lat.sort()
    print(json.dumps({
        "bench": "recall_serve_streams", "mode": a.mode, "streams": a.streams,
        "prompt_chars": a.prompt_chars, "max_tokens": a.max_tokens, "kv_method": a.kv_method,
        "kv_budget": a.kv_budget, "recall": a.recall if a.mode != "none" else 0,
        "threads": a.threads, "wall_s": round(wall, 2), "completion_tokens": gen,
        "completion_tokens_per_s": round(gen / wall, 2),
        "latency_s": {"median": round(lat[len(lat) // 2], 2), "max": round(lat[-1], 2)},
        "recall_blocks": d["recall_blocks_total"],
        "recall_bytes_per_token": round(d["recall_bytes_total"] / gen, 1) if gen else None,
        "recall_deadline_misses": d["recall_deadline_misses_total"],
        "recall_spilled_blocks": d["recall_spilled_blocks_total"], "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
