#!/usr/bin/env python3
"""test_perf_readme.py - scripts/perf_readme.py, which writes the README's
performance section from benchmark JSONL. The rows below are made up for the
test (round numbers whose table cells can be worked out by hand from what
the script's documentation promises): medians with min-max, ratios of the
medians, the faster flash attention setting named, the decode fraction of
the bound, serving ratios against llama-server; --check refuses a stale
README; broken inputs are exit 2 naming file and line.
Usage: test_perf_readme.py SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

SRC = sys.argv[1] if len(sys.argv) > 1 else "."
SCRIPT = os.path.join(SRC, "scripts", "perf_readme.py")

GEN = [
    {"bench": "generate", "engine": "entrokv", "round": 0, "context": 512},
    {"bench": "generate_meta", "date": "2026-12-07T12:00:00Z", "entrokv_commit": "abc1234",
     "threads": 2, "reps": 5, "n_decode": 64,
     "read_bandwidth": {"threads": 2, "buffer_mib": 1024, "best_gb_per_s": 26.0,
                        "weights_sized": {"bytes": 96576768, "best": 60.0}},
     "llama_cpp": {"build_commit": "0c1e57098", "cpu_info": "Test CPU",
                   "setup": {"llama_cpp_python": "0.3.36", "flags": "-DGGML_NATIVE=ON"}}},
    {"bench": "generate_summary", "engine": "entrokv", "context": 512,
     "prefill_tokens_per_s": {"median": 580.0, "min": 550.4, "max": 602.0},
     "decode_tokens_per_s": {"median": 150.0, "min": 138.0, "max": 153.0},
     "decode_fraction_of_bound": 0.571},
    {"bench": "generate_summary", "engine": "llama.cpp", "context": 512,
     "prefill_tokens_per_s": {"median": 290.0, "min": 280.0, "max": 300.0},
     "decode_tokens_per_s": {"median": 60.0, "min": 55.5, "max": 64.0},
     "prefill_flash_attn": "on", "decode_flash_attn": "off", "decode_fraction_of_bound": 0.229},
    {"bench": "generate_ratio", "context": 512, "prefill_ratio": 2.0, "decode_ratio": 2.5},
    {"bench": "generate_summary", "engine": "entrokv", "context": 128,
     "prefill_tokens_per_s": {"median": 99.94, "min": 90.0, "max": 110.0},
     "decode_tokens_per_s": {"median": 160.0, "min": 150.0, "max": 170.0}},
]
SERVE = [
    {"bench": "serve_meta", "date": "2026-12-07T12:10:00Z", "threads": 2, "kv_tokens": 4096,
     "max_tokens": 32, "prompt_chars": 1400,
     "llama_server": {"args": "-np C -cb", "version": "version: 0 (0c1e57098)"}},
    {"bench": "serve", "server": "entrokv-full", "concurrency": 4, "requests": 8, "failed": 0,
     "output_tokens_per_s": 300.0, "ttft_p50_s": 0.25, "ttft_p99_s": 1.5,
     "itl_p50_s": 0.02, "itl_p99_s": 0.05},
    {"bench": "serve", "server": "llama.cpp-server", "concurrency": 4, "requests": 8,
     "failed": 0, "output_tokens_per_s": 200.0, "ttft_p50_s": 0.5, "ttft_p99_s": 2.0,
     "itl_p50_s": 0.03, "itl_p99_s": 0.06},
    {"bench": "serve", "server": "entrokv-full", "concurrency": 1, "requests": 8, "failed": 1,
     "output_tokens_per_s": 100.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
     "itl_p50_s": 0.01, "itl_p99_s": 0.02},
]
README = "# x\n\n## Performance\n\n<!-- perf:begin -->\nold figures\n<!-- perf:end -->\n\n## Tests\n"


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def main():
    d = tempfile.mkdtemp()
    gen, serve, readme = (os.path.join(d, n) for n in ("g.jsonl", "s.jsonl", "README.md"))
    write(gen, GEN)
    write(serve, SERVE)
    open(readme, "w").write(README)
    paths = ["--generate", gen, "--serve", serve, "--readme", readme]

    r = run(*paths, "--check")
    assert r.returncode == 1 and "not what" in r.stderr, r  # the placeholder is stale
    r = run(*paths)
    assert r.returncode == 0, r
    text = open(readme).read()
    assert text.startswith("# x\n\n## Performance\n\n<!-- perf:begin -->\n"), text
    assert text.endswith("<!-- perf:end -->\n\n## Tests\n"), text
    assert "old figures" not in text
    lines = text.splitlines()
    # contexts in increasing order, medians (min-max), ratios, FA, fractions
    rows = [l for l in lines if l.startswith("| 128 |") or l.startswith("| 512 |")]
    assert rows == [
        "| 128 | 99.9 (90.0-110) | - | - | 160 (150-170) | - | - | - |",
        "| 512 | 580 (550-602) | 290 (280-300) (on) | 2.00x | 150 (138-153) "
        "| 60.0 (55.5-64.0) (off) | 2.50x | 0.57, 0.23 |"], rows
    assert "26.0 GB/s" in text and "60.0 GB/s" in text and "97 MB" in text, text
    assert "llama.cpp 0c1e57098" in text and "llama-cpp-python 0.3.36" in text, text
    assert "5 repetitions" in text and "N - 64" in text, text
    serve_rows = [l for l in lines if l.startswith("| 1 |") or l.startswith("| 4 |")]
    assert serve_rows == [
        "| 1 | entrokv-full | 100.0 | - | 100 ms / 200 ms | 10 ms / 20 ms | 1 of 8 |",
        "| 4 | entrokv-full | 300.0 | 1.50x | 250 ms / 1.50 s | 20 ms / 50 ms | 0 of 8 |",
        "| 4 | llama.cpp-server | 200.0 | - | 500 ms / 2.00 s | 30 ms / 60 ms | 0 of 8 |",
    ], serve_rows
    # regenerating is a no-op, and --check agrees
    r = run(*paths)
    assert r.returncode == 0 and open(readme).read() == text, r
    assert run(*paths, "--check").returncode == 0
    # a changed figure makes the README stale
    GEN[2]["decode_tokens_per_s"]["median"] = 151.0
    write(gen, GEN)
    assert run(*paths, "--check").returncode == 1

    # broken inputs: exit 2, naming the file (and line)
    write(gen, GEN[:2] + ["{not json"])
    r = run(*paths)
    assert r.returncode == 2 and f"{gen}:3: not JSON" in r.stderr, r
    write(gen, [GEN[0]])
    r = run(*paths)
    assert r.returncode == 2 and "expected one \"generate_meta\" line, found 0" in r.stderr, r
    write(gen, GEN)
    r = run("--generate", gen, "--serve", os.path.join(d, "none.jsonl"), "--readme", readme)
    assert r.returncode == 2 and "none.jsonl" in r.stderr, r
    open(readme, "w").write("# no markers\n")
    r = run(*paths)
    assert r.returncode == 2 and "needs exactly one" in r.stderr, r
    assert open(readme).read() == "# no markers\n"
    print("all passed")


if __name__ == "__main__":
    main()
