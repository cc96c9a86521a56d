#!/usr/bin/env python3
"""serve_check.py - `entrokv serve --device cuda` against `--device cpu` on one
model, through both clients (tests/cuda/device-check.sh runs it on the GPU
machine; `--gpu-device cpu` makes the same run with two CPU servers, the
dry run where no GPU is).

1. Starts both servers (127.0.0.1, ports from their "listening" line).
2. grpcio (entrokv.proto's Generation.Generate, stubs from --stubs or
   compiled with grpc_tools): PROMPTS text prompts, greedy, ignore_eos, each
   token's log-probability with the top two, 4 at a time; full KV, SnapKV
   10% and UNComp 10% (online). Per prompt the GPU's token ids must equal
   the CPU's up to the first step whose CPU top-1 / top-2 gap is under
   --margin (0.58: the Q4_1 near-tie rule of test_cuda_forward.c, where the
   CPU's 8-bit activations and the GPU's fp16 differ in rounding, not only
   in order); from there the runs may part. |logprob| differences while they
   agree are reported (not bounded here: test_cuda_forward bounds logits).
3. openai (the completions endpoint, greedy, the same prompts): the GPU's
   text equals the CPU's where the gRPC run found no near-tie for that prompt.
4. Throughput of the GPU server: 1, 16 and 64 concurrent gRPC streams of
   --tp-tokens tokens each (ignore_eos), output tokens/s and time to first
   token.
Writes one JSON object (--out) and exits 0 only when every check held.
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "List three prime numbers and explain why they are prime.",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains,",
    "Explain how a GPU differs from a CPU in two sentences.",
    "The quick brown fox jumps over the lazy dog. " * 12 + "Summarise the text above.",
    "Translate to German: the weather is nice today and we are going for a walk.",
]
POLICIES = [("full", 1.0), ("snapkv", 0.1), ("uncomp", 0.1)]


def stubs(path):
    if path:
        sys.path.insert(0, path)
    else:
        from grpc_tools import protoc
        out = tempfile.mkdtemp(prefix="ekv-stubs-")
        inc = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        for name in ("entrokv.proto", "health.proto"):
            if protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{inc}", f"--python_out={out}",
                            f"--grpc_python_out={out}", f"{ROOT}/proto/{name}"]):
                sys.exit(f"protoc failed on {name}")
        sys.path.insert(0, out)
    import entrokv_pb2
    return entrokv_pb2


def generate_call(pb, channel):
    """Generation.Generate on channel without entrokv_pb2_grpc (which refuses a
    grpcio older than the grpcio-tools that wrote it: the GPU image's own
    grpcio serves here, only protobuf travels)."""
    return channel.unary_stream("/entrokv.v1.Generation/Generate",
                                request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)


class Server:
    def __init__(self, a, device, log_path):
        self.log = open(log_path, "w+")
        args = list(a.entrokv) + ["serve", "--model", a.model, "--host", "127.0.0.1",
                                  "--grpc-port", "0", "--http-port", "0", "--device", device,
                                  "--ctx", str(a.ctx), "--kvstore-mb", "0", "--max-running", "64",
                                  "--kv-tokens", str(a.ctx * 66), "--threads", str(a.threads)]
        self.device = device
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True)
        t0 = time.time()
        while True:
            self.log.seek(0)
            text = self.log.read()
            m = re.search(r"listening grpc=[\d.]+:(\d+) http=[\d.]+:(\d+)", text)
            if m:
                self.grpc, self.http = int(m[1]), int(m[2])
                break
            if self.proc.poll() is not None or time.time() - t0 > a.start_timeout:
                self.stop()
                raise RuntimeError(f"serve --device {device} did not start:\n{text[-2000:]}")
            time.sleep(0.2)
        self.start_s = time.time() - t0

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def grpc_run(pb, stub, prompt, max_tokens, method, budget, timeout):
    req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                ignore_eos=True, logprobs=True, top_logprobs=2)
    if method != "full":
        req.kv_method, req.kv_budget = method, budget
    ids, lps, margins, t0, ttft = [], [], [], time.time(), None
    for msg in stub(req, timeout=timeout):
        if msg.token_ids and ttft is None:
            ttft = time.time() - t0
        ids += list(msg.token_ids)
        for lp in msg.logprobs[:len(msg.token_ids)]:
            lps.append(lp.logprob)
            tops = [t.logprob for t in lp.top_logprobs]
            margins.append(tops[0] - tops[1] if len(tops) > 1 else float("inf"))
    return {"ids": ids, "lp": lps, "margin": margins, "seconds": time.time() - t0, "ttft": ttft}


def compare(cpu, gpu, margin):
    """(equal_prefix, parted_at_near_tie, ok, max |d logprob| while equal)"""
    n, worst = 0, 0.0
    for t, (a, b) in enumerate(zip(cpu["ids"], gpu["ids"])):
        if a != b:
            near = cpu["margin"][t] < margin
            return n, near, near, worst
        if t < len(cpu["lp"]) and t < len(gpu["lp"]):
            worst = max(worst, abs(cpu["lp"][t] - gpu["lp"][t]))
        n += 1
    return n, False, len(cpu["ids"]) == len(gpu["ids"]), worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entrokv", required=True, help="the binary (or a wrapper; split on spaces)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--stubs", help="directory with entrokv_pb2*.py (else grpc_tools compiles)")
    ap.add_argument("--gpu-device", default="cuda", help="cpu: the dry run")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--margin", type=float, default=0.58)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--tp-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--logs", default=".")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    a.entrokv = a.entrokv.split()
    pb = stubs(a.stubs)
    import grpc
    import openai
    res = {"model": os.path.basename(a.model), "gpu_device": a.gpu_device, "checks": [],
           "ok": False}
    servers = {}
    try:
        servers["cpu"] = Server(a, "cpu", os.path.join(a.logs, "serve-cpu.log"))
        servers["gpu"] = Server(a, a.gpu_device, os.path.join(a.logs, "serve-gpu.log"))
        res["start_seconds"] = {k: round(s.start_s, 2) for k, s in servers.items()}
        runs = {}
        for name, s in servers.items():
            ch = grpc.insecure_channel(f"127.0.0.1:{s.grpc}")
            stub = generate_call(pb, ch)
            jobs = {}
            with cf.ThreadPoolExecutor(4) as ex:
                for method, budget in POLICIES:
                    for i, p in enumerate(PROMPTS):
                        jobs[(method, i)] = ex.submit(grpc_run, pb, stub, p, a.max_tokens,
                                                      method, budget, a.timeout)
            runs[name] = {k: f.result() for k, f in jobs.items()}
            ch.close()
        ok, near_ties = True, {}
        for (method, i), c in runs["cpu"].items():
            g = runs["gpu"][(method, i)]
            n, near, good, worst = compare(c, g, a.margin)
            if near:
                near_ties[(method, i)] = True
            ok = ok and good and len(c["ids"]) == a.max_tokens
            res["checks"].append({"client": "grpcio", "kv": method, "prompt": i, "equal": n,
                                  "of": len(c["ids"]), "near_tie": near, "ok": good,
                                  "max_dlogprob": round(worst, 4)})
        for name, s in servers.items():  # openai: the same prompts, full KV
            cl = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http}/v1", api_key="unused",
                               max_retries=0, timeout=a.timeout)
            s.texts = [cl.completions.create(model="m", prompt=p, max_tokens=a.max_tokens,
                                             temperature=0).choices[0].text for p in PROMPTS]
        for i in range(len(PROMPTS)):
            same = servers["cpu"].texts[i] == servers["gpu"].texts[i]
            good = same or near_ties.get(("full", i), False)
            ok = ok and good and len(servers["gpu"].texts[i]) > 0
            res["checks"].append({"client": "openai", "prompt": i, "equal_text": same,
                                  "ok": good, "gpu_text": servers["gpu"].texts[i][:80]})
        # throughput of the GPU server
        g = servers["gpu"]
        ch = grpc.insecure_channel(f"127.0.0.1:{g.grpc}")
        stub = generate_call(pb, ch)
        res["throughput"] = []
        for c in [int(x) for x in a.concurrency.split(",") if x]:
            t0 = time.time()
            with cf.ThreadPoolExecutor(c) as ex:
                outs = list(ex.map(lambda k: grpc_run(pb, stub, PROMPTS[k % len(PROMPTS)],
                                                      a.tp_tokens, "full", 1.0, a.timeout),
                                   range(c)))
            wall = time.time() - t0
            toks = sum(len(o["ids"]) for o in outs)
            ttfts = sorted(o["ttft"] for o in outs if o["ttft"] is not None)
            row = {"streams": c, "tokens": toks, "seconds": round(wall, 3),
                   "output_tokens_per_s": round(toks / wall, 1),
                   "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4) if ttfts else None}
            res["throughput"].append(row)
            print(f"serve --device {a.gpu_device}: {c:3d} streams {row['output_tokens_per_s']:9.1f}"
                  f" tok/s, TTFT p50 {row['ttft_p50_s']} s", file=sys.stderr)
            ok = ok and toks == c * a.tp_tokens
        ch.close()
        res["ok"] = ok
    except Exception as e:  # noqa: BLE001 - any failure is the check's result
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        for s in servers.values():
            s.stop()
    n_bad = sum(1 for c in res["checks"] if not c["ok"])
    res["checks_failed"] = n_bad
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"serve_check: {len(res['checks'])} checks, {n_bad} failed, "
          f"{sum(1 for c in res['checks'] if c.get('near_tie'))} near-tie(s); "
          f"{'ok' if res['ok'] else 'FAILED ' + res.get('error', '')}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
