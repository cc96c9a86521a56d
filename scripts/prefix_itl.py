"""prefix_itl.py - a decoding stream's inter-token gaps while (1) a
~2.1k-token prompt is prefilled and saved to the host KV store tier (about
48 MB of KV), then (2) the same prompt plus a short tail restores it (issue
21, part 2: those copies run off the engine thread).

usage: .venv/bin/python scripts/prefix_itl.py BIN[,BIN...] ROUNDS
Runs each binary once per round, alternating (A B A B), one server each
(--ctx 4096 --kvstore-mb 512), and prints one JSON line per run: the prefill
window's gap p50 / p99 (ms), the decode gaps alone after it, and the gaps
while the restore runs. A measurement script, not a test (bounded by the
prefill speed: about 20-60 s a run on the 2-core VM)."""
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "serve"))
import conftest  # noqa: E402
from openai import OpenAI  # noqa: E402

WORDS = "alpha river stone cloud pepper violin copper desert comet honey tiger paper rain glass owl chess moon bread".split()

def long_prompt(seed, n_words=740):
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) + str(r.randint(0, 99)) for _ in range(n_words))

def pct(g, q):
    g = sorted(g)
    return g[min(len(g) - 1, int(q * len(g)))] * 1e3 if g else -1

def run(seed):
    s = conftest.Server("--ctx", "4096", "--kv-tokens", "12288", "--kvstore-mb", "512")
    try:
        c = OpenAI(base_url=s.http + "/v1", api_key="x")
        times, stop = [], threading.Event()
        def stream():
            st = c.completions.create(model="m", prompt="Once upon a time", max_tokens=3000,
                                      stream=True, temperature=0, extra_body={"ignore_eos": True})
            for ch in st:
                times.append(time.time())
                if stop.is_set():
                    break
            st.close()
        th = threading.Thread(target=stream); th.start()
        while len(times) < 20: time.sleep(0.01)
        doc = long_prompt(seed)
        t0 = time.time()
        r = c.completions.create(model="m", prompt=doc, max_tokens=1, temperature=0)
        t1 = time.time()
        time.sleep(2.0)  # the save lands; the stream decodes alone
        t2 = time.time()
        r2 = c.completions.create(model="m", prompt=doc + " and then", max_tokens=1, temperature=0)
        t3 = time.time()
        time.sleep(1.0)
        t4 = time.time()
        stop.set(); th.join()
        gaps = [(a, b - a) for a, b in zip(times, times[1:])]
        prefill = [g for a, g in gaps if a >= t0 and a + g <= t1]
        base = [g for a, g in gaps if a >= t1 + 0.5 and a + g <= t2]
        restore = [g for a, g in gaps if a >= t2 and a + g <= t4]
        return dict(bin=conftest.BIN, prompt_tokens=r.usage.prompt_tokens,
                    prefill_s=round(t1 - t0, 2), prefill_gaps=len(prefill),
                    prefill_p50_ms=round(pct(prefill, .5)), prefill_p99_ms=round(pct(prefill, .99)),
                    decode_p50_ms=round(pct(base, .5)), decode_p99_ms=round(pct(base, .99)),
                    restore_ttft_ms=round((t3 - t2) * 1e3), restore_gaps=len(restore),
                    restore_p99_ms=round(pct(restore, .99)), restore_max_ms=round(max(restore) * 1e3) if restore else -1)
    finally:
        s.stop()

if __name__ == "__main__":
    bins = sys.argv[1].split(",")
    seed = int(time.time())
    for _ in range(int(sys.argv[2])):
        for b in bins:
            seed += 1
            conftest.BIN = b
            print(json.dumps(run(seed)), flush=True)
