#!/usr/bin/env python3
"""llamacpp_ref.py - llama.cpp reference timings for `entrokv bench generate`.

What: loads a GGUF model with llama.cpp (llama-cpp-python's low-level ctypes
API), then measures
  1. prefill: the whole prompt, in llama_decode batches of --n-batch tokens
     (logits only for the last token), after one untimed warm-up run;
  2. decode: --n-decode tokens generated greedily, one llama_decode per token,
     argmax over llama_get_logits_ith(-1) with numpy (EOS is not special);
and prints ONE JSON line on stdout:

  {"engine":"llama.cpp","version":"0.3.36","threads":N,"prompt_tokens":P,
   "prefill_s":..,"prefill_tokens_per_s":..,"decode_tokens":D,"decode_s":..,
   "decode_tokens_per_s":..,"flash_attn":"on|off","extra_bufts":true|false}

Why: entrokv's benchmark compares itself against llama.cpp on the same prompt
tokens and thread count. The low-level API keeps Python overhead out of the
timed region (no sampler chain, no high-level Llama bookkeeping), so the numbers
are llama.cpp's own speed. llama.cpp's log goes to /dev/null unless --verbose.

Settings: n_ctx = P + D + 16; n_batch = n_ubatch = --n-batch; n_threads =
n_threads_batch = --threads; KV cache F16 and flash attention AUTO (llama.cpp
defaults). CPU "extra buffer types" (AMX, weight repacking) are used when the
CPU can run them: --extra-bufts auto probes them in a child process first,
because on VMs that advertise AMX without enabling it, ggml dies with SIGILL.

Usage (called by entrokv as a subprocess):
  python3 bench/llamacpp_ref.py --model M.gguf --tokens-file F --threads N \\
      --n-decode D [--n-batch 512]
F holds whitespace-separated prompt token ids. Exit status: 0 ok, 2 setup or
usage error (message on stderr).
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

try:
    import numpy as np
    import llama_cpp
except ImportError as e:
    sys.stderr.write(
        f"llamacpp_ref.py: cannot import llama_cpp/numpy ({e}).\n"
        "The llama.cpp benchmark reference is optional: "
        "run scripts/setup.sh --bench to install it.\n")
    sys.exit(2)


def die(msg):
    sys.stderr.write(f"llamacpp_ref.py: {msg}\n")
    sys.exit(2)


_log = []


@llama_cpp.llama_log_callback
def _log_cb(level, text, user_data):
    # Swallow llama.cpp's log (keeping only what we report) so stdout/stderr
    # stay clean for the caller.
    line = text.decode("utf-8", "replace")
    if "Flash Attention" in line:
        _log.append(line.strip())


class Runner:
    """One model + context; small helpers around llama_decode."""

    def __init__(self, model_path, n_ctx, n_batch, threads, extra_bufts):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            die(f"cannot load model {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            die("cannot create llama.cpp context")
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(max(n_batch, 1), 0, 1)

    def decode(self, tokens, pos0):
        """Decode tokens at positions pos0.. (one llama_decode call), with
        logits for the last token only."""
        b = self.batch
        n = len(tokens)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            die(f"llama_decode failed with {rc}")

    def prefill(self, tokens):
        for s in range(0, len(tokens), self.n_batch):
            self.decode(tokens[s:s + self.n_batch], s)
        llama_cpp.llama_synchronize(self.ctx)

    def argmax_last(self):
        p = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(self.n_vocab,))))

    def reset(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)


def probe_extra_bufts(args):
    """True when llama.cpp survives a tiny decode with extra buffer types on.

    Run in a child process: an unusable AMX unit kills it with SIGILL, which
    we cannot catch in-process.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model,
           "--threads", str(args.threads), "--probe"]
    try:
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def flash_attn_state():
    """'on'/'off' as llama.cpp resolved flash_attn_type AUTO (from its log)."""
    for line in _log:
        if "enabled" in line:
            return "on"
        if "disabled" in line:
            return "off"
    return "unknown"


def read_tokens(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError) as e:
        die(f"cannot read token ids from {path}: {e}")


def main():
    ap = argparse.ArgumentParser(description="llama.cpp reference timings "
                                 "(one JSON line on stdout)")
    ap.add_argument("--model", required=True, help="GGUF model file")
    ap.add_argument("--tokens-file", help="whitespace-separated prompt ids")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--extra-bufts", choices=["auto", "on", "off"],
                    default="auto", help="CPU AMX/repack buffer types")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp log")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if not os.path.isfile(args.model):
        die(f"no model file {args.model}")
    if args.threads < 1 or args.n_decode < 0 or args.n_batch < 1:
        die("--threads and --n-batch must be >= 1, --n-decode >= 0")
    if not args.verbose:
        llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))

    if args.probe:  # child of probe_extra_bufts()
        r = Runner(args.model, 64, 32, args.threads, True)
        r.prefill(list(range(100, 132)))
        r.decode([r.argmax_last()], 32)
        return

    if not args.tokens_file:
        die("--tokens-file is required")
    prompt = read_tokens(args.tokens_file)
    if not prompt:
        die(f"{args.tokens_file} holds no token ids")

    extra = {"on": True, "off": False}.get(args.extra_bufts)
    if extra is None:
        extra = probe_extra_bufts(args)

    r = Runner(args.model, len(prompt) + args.n_decode + 16, args.n_batch,
               args.threads, extra)
    if max(prompt) >= r.n_vocab or min(prompt) < 0:
        die(f"token id out of range (vocab {r.n_vocab})")

    # Untimed warm-up: touch the weights (mmap), spin up the thread pool and
    # build both graph shapes (a batch and a single token).
    warm = prompt[:min(len(prompt), 16)]
    r.prefill(warm)
    r.decode([r.argmax_last()], len(warm))
    r.reset()

    t0 = time.perf_counter()
    r.prefill(prompt)
    t1 = time.perf_counter()
    prefill_s = t1 - t0

    # Greedy decode, one token per llama_decode; the argmax of each step
    # feeds the next. (Reading the logits forces the step to finish.)
    pos = len(prompt)
    tok = r.argmax_last()
    t0 = time.perf_counter()
    for _ in range(args.n_decode):
        r.decode([tok], pos)
        pos += 1
        tok = r.argmax_last()
    t1 = time.perf_counter()
    decode_s = t1 - t0

    out = {
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "prefill_s": round(prefill_s, 6),
        "prefill_tokens_per_s": round(len(prompt) / prefill_s, 3),
        "decode_tokens": args.n_decode,
        "decode_s": round(decode_s, 6),
        "decode_tokens_per_s": (round(args.n_decode / decode_s, 3)
                                if args.n_decode else 0.0),
        "flash_attn": flash_attn_state(),
        "extra_bufts": extra,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
