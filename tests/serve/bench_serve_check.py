#!/usr/bin/env python3
"""bench_serve_check.py - `entrokv bench serve` against a stand-in
llama-server (this file run with --fake): the benchmark must start
llama-server once per concurrency C with -np C -cb -c ctx*C --cache-ram 0 and
the same threads and GGUF, send it the same requests as entrokv (streaming,
ignore_eos, max_tokens), count the streamed tokens, and report ratios
against it. entrokv itself is real (127.0.0.1, a free port).
Usage: bench_serve_check.py ENTROKV MODEL
"""
import http.server
import json
import os
import subprocess
import sys
import tempfile


def fake(argv):
    """llama-server stand-in: /v1/models, and /v1/completions streaming
    max_tokens one-character tokens; logs its argv and request bodies."""
    log = os.environ["FAKE_LOG"]
    port = int(argv[argv.index("--port") + 1])
    with open(log, "a") as f:
        f.write(json.dumps({"argv": argv}) + "\n")

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = b'{"data":[{"id":"fake"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(log, "a") as f:
                f.write(json.dumps({"body": req}) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            n = req.get("max_tokens", 4)
            for _ in range(n):
                self.wfile.write(b'data: {"choices":[{"text":"x"}]}\n\n')
                self.wfile.flush()
            self.wfile.write(b'data: {"choices":[{"text":""}],"usage":{"completion_tokens":%d}}\n\n'
                             % n)
            self.wfile.write(b"data: [DONE]\n\n")

    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()


def main():
    if sys.argv[1:2] == ["--fake"]:
        fake(sys.argv[2:])
        return
    bin_, model = sys.argv[1], sys.argv[2]
    d = tempfile.mkdtemp()
    server = os.path.join(d, "llama-server")
    with open(server, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} --fake \"$@\"\n")
    os.chmod(server, 0o755)
    env = dict(os.environ, FAKE_LOG=os.path.join(d, "log"))
    r = subprocess.run([bin_, "bench", "serve", "--model", model, "--llama-server", server,
                        "--concurrency", "1,2", "--max-tokens", "3", "--min-requests", "2",
                        "--prompt-chars", "200", "--ctx", "512", "--no-compressed"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    log = [json.loads(l) for l in open(env["FAKE_LOG"])]
    starts = [e["argv"] for e in log if "argv" in e]
    bodies = [e["body"] for e in log if "body" in e]
    # one llama-server per concurrency, each with C slots and ctx*C tokens
    assert len(starts) == 2, starts
    for conc, argv in zip((1, 2), starts):
        s = " ".join(argv)
        assert f"-np {conc} -cb -c {512 * conc} --cache-ram 0" in s, s
        assert "-t 2 -tb 2" in s and f"-m {model}" in s and "--host 127.0.0.1" in s, s
    # warm-up, then at least --min-requests per wave; every request like entrokv's
    waves = [b for b in bodies if b.get("max_tokens") == 3]
    assert len(waves) == 2 + 2, bodies
    assert all(b["stream"] and b["ignore_eos"] and b["temperature"] == 0 for b in waves), waves
    assert len({b["prompt"] for b in waves}) >= 2, waves  # distinct prompts within a wave
    waves_out = [r for r in rows if r["bench"] == "serve"]
    ref = {r["concurrency"]: r for r in waves_out if r["server"] == "llama.cpp-server"}
    ours = {r["concurrency"]: r for r in waves_out if r["server"] == "entrokv-full"}
    assert set(ref) == set(ours) == {1, 2}, rows
    for c in (1, 2):
        assert ref[c]["output_tokens"] == 3 * ref[c]["requests"] and ref[c]["failed"] == 0, ref
        assert ours[c]["completed"] == ours[c]["requests"] >= 2, ours
        assert ours[c]["kv_tokens"] == 512 * c, ours
    ratios = {r["concurrency"]: r for r in rows if r.get("bench") == "serve_ratio"}
    for c in (1, 2):
        want = ours[c]["output_tokens_per_s"] / ref[c]["output_tokens_per_s"]
        assert abs(ratios[c]["vs_llama_cpp"] - round(want, 2)) < 0.011, (ratios, want)
    (meta,) = [r for r in rows if r.get("bench") == "serve_meta"]
    assert "-np C -cb -c 512*C --cache-ram 0" in meta["llama_server"]["args"], meta
    print("all passed")


if __name__ == "__main__":
    main()
