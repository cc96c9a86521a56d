#!/usr/bin/env python3
"""bench_soak.py - `entrokv bench soak`: a bounded fault soak of the split
deployment (issue 21, part 7).

Starts an `entrokv kvstore` daemon (unless --no-kvstore), two `entrokv
worker`s on fixed local ports storing their prefix KV in it, and an `entrokv
coordinator` in front of them, computes each test prompt's greedy tokens
alone (the references), then for --minutes runs --clients client threads
mixing:

  gRPC streams and HTTP streams / non-streamed completions (greedy, checked
  against the references when they complete), gRPC cancels after a few
  tokens, HTTP clients that hang up mid-stream, malformed requests (bad
  JSON, wrong types, unknown fields, empty prompts) and oversized ones
  (over --max-prompt-bytes, over the context)

while a fault thread, one fault at a time and always leaving one worker
untouched, kills a worker with SIGKILL and restarts it on the same port, or
stops one with SIGSTOP for a few seconds, or does the same to the KV store
daemon (three faults in ten).

Every completed greedy request must equal its reference; every failure
must be a clear status (gRPC UNAVAILABLE / RESOURCE_EXHAUSTED / the
expected INVALID_ARGUMENT, HTTP 400 / 429 / 503 or an SSE error event, each
with a message); no client may wait past its deadline. After the clients
stop, the coordinator's and workers' KV blocks, queue depth and running
sequences return to idle, the coordinator's open file descriptors to their
idle count (a few sockets of slack for channels reconnected to restarted
workers) and its RSS stays within --rss-slack-mb of the idle value.

Prints the counts as one JSON object; exit 0 when wrong tokens, unclear
failures and leaks are all 0.
"""
import argparse
import http.client
import importlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# two share a prefix of several KV blocks, which the workers store in and
# restore from the KV store daemon
SHARED = ("A river begins as rain on high ground, gathers into streams, cuts a valley "
          "through soft rock, slows across a plain and meets the sea at a delta. ")
PROMPTS = [
    "The capital of France is", "Once upon a time", "def fib(n):",
    "The three primary colors are", "Water boils at", "List three fruits:",
    "The quick brown fox", "In 1492, Columbus",
    SHARED + "Where does a river begin?", SHARED + "Where does a river end?",
]


def log(*a):
    print("soak:", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def stubs():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="entrokv-soak-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for name in ("entrokv.proto", "health.proto"):
        assert protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}",
                            f"--grpc_python_out={out}", f"{ROOT}/proto/{name}"]) == 0
    sys.path.insert(0, out)
    return importlib.import_module("entrokv_pb2"), importlib.import_module("entrokv_pb2_grpc")


class Proc:
    def __init__(self, args, name):
        self.args, self.name = args, name
        self.log = tempfile.NamedTemporaryFile(prefix=f"entrokv-soak-{name}-", suffix=".log",
                                               delete=False)
        self.start()

    def start(self):
        self.log_mark = len(self.text()) if hasattr(self, "proc") else 0
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=self.log)

    def text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_listen(self, timeout=120, what="listening grpc="):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: "
                                   f"{self.text()[-2000:]}")
            if what in self.text()[self.log_mark:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start")

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Counts:
    def __init__(self):
        self.mu = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.mu:
            self.c[key] = self.c.get(key, 0) + n

    def snapshot(self):
        with self.mu:
            return dict(sorted(self.c.items()))


class Soak:
    def __init__(self, a):
        self.a = a
        self.pb, self.pbg = stubs()
        import grpc

        self.grpc = grpc
        self.counts = Counts()
        self.unclear = []  # the first few, for the report
        self.ports = [free_port() for _ in range(2)]
        common = ["--model", a.model, "--ctx", str(a.ctx), "--drain-grace", "0",
                  "--drain-timeout", "5"]
        store = ["--kvstore-mb", "0"]
        self.daemon = None
        if not a.no_kvstore:  # the workers' prefix KV goes to one daemon
            token = os.path.join(tempfile.mkdtemp(prefix="entrokv-soak-kv-"), "token")
            with open(token, "w") as f:
                f.write("soak-token\n")
            kv_port = free_port()
            self.daemon = Proc([a.entrokv, "kvstore", "--listen", f"127.0.0.1:{kv_port}",
                                "--capacity-mb", "64", "--auth-token-file", token], "kvstore")
            self.daemon.wait_listen(what="listening on")
            store += ["--kvstore-peers", f"127.0.0.1:{kv_port}", "--kvstore-token-file", token]
        self.workers = [Proc([a.entrokv, "worker", *common, "--listen", f"127.0.0.1:{p}",
                              "--threads", str(a.worker_threads), "--max-running", "8",
                              "--max-queued", "64", *store], f"worker{i}")
                        for i, p in enumerate(self.ports)]
        for w in self.workers:
            w.wait_listen()
        self.coord = Proc([a.entrokv, "coordinator", *common, "--host", "127.0.0.1",
                           "--grpc-port", "0", "--http-port", "0",
                           "--max-prompt-bytes", str(a.max_prompt_bytes),
                           "--workers", ",".join(f"127.0.0.1:{p}" for p in self.ports)],
                          "coordinator")
        self.coord.wait_listen()
        import re

        m = re.search(r"listening grpc=[\d.]+:(\d+) http=[\d.]+:(\d+)", self.coord.text())
        self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = self.pbg.GenerationStub(self.channel)
        deadline = time.time() + 60
        while self.coord.text().count(" healthy") < 2 and time.time() < deadline:
            time.sleep(0.1)
        self.stop_at = None
        self.fault_mu = threading.Lock()

    # ---- requests ----

    def greedy(self, prompt):
        return self.pb.GenerateRequest(prompt=prompt, max_tokens=self.a.max_tokens,
                                       temperature=0.0)

    def grpc_stream(self, req, cancel_after=None):
        """(ids, text, finish) or raises grpc.RpcError."""
        call = self.stub.Generate(req, timeout=self.a.request_timeout)
        ids, text, n, last = [], "", 0, None
        for msg in call:
            ids += list(msg.token_ids)
            text += msg.text
            n += 1
            last = msg
            if cancel_after is not None and n >= cancel_after:
                call.cancel()
                return None
        return ids, text, last.finish_reason if last else ""

    def http(self, body, stream, hang_up_after=None, raw=None):
        """One completion: {status, text, err (the error's message), done (the
        whole answer arrived), hung (we hung up on purpose)}."""
        out = {"status": 0, "text": "", "err": None, "done": False, "hung": False}
        c = http.client.HTTPConnection("127.0.0.1", self.http_port,
                                       timeout=self.a.request_timeout)
        try:
            data = raw if raw is not None else json.dumps(body).encode()
            c.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
            r = c.getresponse()
            out["status"] = r.status
            if r.status != 200 or not stream:
                j = json.loads(r.read())
                if r.status == 200:
                    out["text"], out["done"] = j["choices"][0]["text"], True
                else:
                    out["err"] = j["error"]["message"]
                return out
            events = 0
            for raw_line in r:
                line = raw_line.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                d = line[6:]
                if d == "[DONE]":
                    out["done"] = out["err"] is None
                    break
                j = json.loads(d)
                events += 1
                if "error" in j:
                    out["err"] = j["error"].get("message", "")
                    continue
                out["text"] += j["choices"][0].get("text", "")
                if hang_up_after is not None and events >= hang_up_after:
                    out["hung"] = True  # the socket closes below, mid-stream
                    return out
            return out
        finally:
            c.close()

    def note_unclear(self, what):
        self.counts.add("unclear_failures")
        if len(self.unclear) < 10:
            self.unclear.append(what)

    def check_grpc_error(self, e, expected=()):
        g = self.grpc.StatusCode
        code, details = e.code(), e.details() or ""
        clear = {g.UNAVAILABLE, g.RESOURCE_EXHAUSTED, *expected}
        if code in clear and details:
            self.counts.add(f"grpc_{code.name.lower()}")
        else:
            self.note_unclear(f"grpc {code.name}: {details!r}")

    def one(self, rnd):
        a = self.a
        kind = rnd.choices(["grpc_stream", "http_stream", "http_plain", "grpc_cancel",
                            "http_hangup", "malformed", "oversized"],
                           weights=[30, 20, 10, 10, 10, 10, 10])[0]
        self.counts.add(f"sent_{kind}")
        i = rnd.randrange(len(PROMPTS))
        ref_ids, ref_text = self.refs[i]
        g = self.grpc.StatusCode
        try:
            if kind == "grpc_stream":
                ids, text, _ = self.grpc_stream(self.greedy(PROMPTS[i]))
                self.compare(ids == ref_ids and text == ref_text, kind, PROMPTS[i], ids, ref_ids)
            elif kind == "grpc_cancel":
                self.grpc_stream(self.greedy(PROMPTS[i]), cancel_after=rnd.randint(1, 3))
                self.counts.add("cancelled")
            elif kind in ("http_stream", "http_plain", "http_hangup"):
                body = {"model": "m", "prompt": PROMPTS[i], "max_tokens": a.max_tokens,
                        "temperature": 0, "stream": kind != "http_plain"}
                hang = rnd.randint(1, 3) if kind == "http_hangup" else None
                r = self.http(body, kind != "http_plain", hang)
                if r["hung"]:
                    self.counts.add("disconnected")
                elif r["status"] == 200 and r["done"]:
                    self.compare(r["text"] == ref_text, kind, PROMPTS[i], r["text"], ref_text)
                elif r["status"] == 200 and r["err"]:
                    self.counts.add("http_error_event")
                elif r["status"] in (429, 503) and r["err"]:
                    self.counts.add(f"http_{r['status']}")
                else:
                    self.note_unclear(f"http {kind}: {r}")
            elif kind == "malformed":
                self.malformed(rnd)
            else:
                self.oversized(rnd)
        except self.grpc.RpcError as e:
            self.check_grpc_error(e)
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
            self.note_unclear(f"{kind}: {type(e).__name__}: {e}")

    def compare(self, equal, kind, prompt, got, want):
        if equal:
            self.counts.add("completed_equal_to_reference")
        else:
            self.counts.add("wrong_tokens")
            log(f"WRONG TOKENS ({kind}) for {prompt!r}: {got!r} != {want!r}")

    def malformed(self, rnd):
        g = self.grpc.StatusCode
        which = rnd.randrange(4)
        if which == 0:  # gRPC: empty prompt
            try:
                self.grpc_stream(self.pb.GenerateRequest(prompt="", max_tokens=2))
                self.note_unclear("empty prompt accepted")
            except self.grpc.RpcError as e:
                self.check_grpc_error(e, expected=(g.INVALID_ARGUMENT,))
            return
        raw = [b'{"prompt": "hi", "max_tokens": 2',            # truncated JSON
               b'{"prompt": 5, "max_tokens": 2}',              # wrong type
               b'{"prompt": "hi", "max_tokens": 2, "nope": 1}'][which - 1]  # unknown field
        r = self.http(None, False, raw=raw)
        if r["status"] == 400 and r["err"]:
            self.counts.add("http_400")
        else:
            self.note_unclear(f"malformed {raw!r}: {r}")

    def oversized(self, rnd):
        g = self.grpc.StatusCode
        if rnd.random() < 0.5:  # over --max-prompt-bytes
            text = "x" * (self.a.max_prompt_bytes + 1)
        else:  # over the context
            text = "hello " * (self.a.ctx * 2)
        try:
            self.grpc_stream(self.pb.GenerateRequest(prompt=text, max_tokens=2))
            self.note_unclear("oversized prompt accepted")
        except self.grpc.RpcError as e:
            self.check_grpc_error(e, expected=(g.INVALID_ARGUMENT,))

    def client(self, k):
        rnd = random.Random(self.a.seed * 1000 + k)
        while time.time() < self.stop_at:
            self.one(rnd)

    # ---- faults ----

    def faults(self):
        rnd = random.Random(self.a.seed)
        while True:
            wait = rnd.uniform(self.a.fault_every * 0.5, self.a.fault_every * 1.5)
            if time.time() + wait + 10 > self.stop_at:
                return
            time.sleep(wait)
            if self.daemon and rnd.random() < 0.3:
                self.daemon_fault(rnd)
                continue
            w = self.workers[rnd.randrange(2)]
            if rnd.random() < 0.5:
                log(f"kill -9 {w.name}")
                w.proc.kill()
                w.proc.wait()
                self.counts.add("faults_kill9_worker")
                time.sleep(rnd.uniform(1, 4))
                w.start()
                w.wait_listen()
                self.counts.add("worker_restarts")
            else:
                s = rnd.uniform(3, 8)
                log(f"SIGSTOP {w.name} for {s:.1f} s")
                w.proc.send_signal(signal.SIGSTOP)
                self.counts.add("faults_sigstop_worker")
                time.sleep(s)
                w.proc.send_signal(signal.SIGCONT)

    def daemon_fault(self, rnd):
        d = self.daemon
        if rnd.random() < 0.5:
            log("kill -9 kvstore")
            d.proc.kill()
            d.proc.wait()
            self.counts.add("faults_kill9_kvstore")
            time.sleep(rnd.uniform(1, 3))
            for _ in range(10):  # its port may take a moment to be free again
                d.start()
                try:
                    d.wait_listen(timeout=10, what="listening on")
                    self.counts.add("kvstore_restarts")
                    return
                except RuntimeError:
                    d.proc.kill()
                    d.proc.wait()
                    time.sleep(1)
            self.counts.add("kvstore_restart_failed")  # restores are misses from here on
        else:
            s = rnd.uniform(3, 8)
            log(f"SIGSTOP kvstore for {s:.1f} s")
            d.proc.send_signal(signal.SIGSTOP)
            self.counts.add("faults_sigstop_kvstore")
            time.sleep(s)
            d.proc.send_signal(signal.SIGCONT)

    # ---- idle state ----

    def gauges(self):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def worker_idle(self, w):
        stub = self.pbg.WorkerStub(self.grpc.insecure_channel(f"127.0.0.1:{self.ports[w]}"))
        s = stub.Stats(self.pb.StatsRequest(), timeout=5)
        return s.running == 0 and s.queued == 0 and s.kv_blocks_free == s.kv_blocks_total

    def idle(self):
        try:
            g = self.gauges()
            return (g["entrokv_queue_depth"] == 0 and g["entrokv_running_sequences"] == 0 and
                    g["entrokv_kv_blocks_used"] == 0 and
                    all(self.worker_idle(i) for i in range(2)))
        except Exception:
            return False

    def wait_idle(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.idle():
                return True
            time.sleep(0.5)
        return False

    def run(self):
        a = self.a
        # the references: each prompt alone, greedy
        self.refs = []
        for p in PROMPTS:
            ids, text, _ = self.grpc_stream(self.greedy(p))
            self.refs.append((ids, text))
        # warm both workers, then the idle baseline
        for p in PROMPTS:
            self.grpc_stream(self.greedy(p))
        assert self.wait_idle(), "not idle before the soak"
        time.sleep(2)
        fds0, rss0 = self.coord.fds(), self.coord.rss_mb()
        t0 = time.time()
        self.stop_at = t0 + a.minutes * 60
        threads = [threading.Thread(target=self.client, args=(k,)) for k in range(a.clients)]
        threads.append(threading.Thread(target=self.faults))
        rss_max = rss0
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss_max = max(rss_max, self.coord.rss_mb())
            time.sleep(1)
        wall = time.time() - t0
        # every worker back and healthy, then idle
        deadline = time.time() + 60
        while time.time() < deadline and not (self.idle() and all(
                w.proc.poll() is None for w in self.workers)):
            time.sleep(0.5)
        idle = self.wait_idle()
        time.sleep(3)  # channels to restarted workers settle
        fds1, rss1 = self.coord.fds(), self.coord.rss_mb()
        counts = self.counts.snapshot()
        g = self.gauges()
        counts.update({
            "minutes": a.minutes, "wall_s": round(wall, 1), "clients": a.clients,
            "requests": sum(v for k, v in counts.items() if k.startswith("sent_")),
            "faults_injected": sum(v for k, v in counts.items() if k.startswith("faults_")),
            "retries": int(g.get("entrokv_request_retries_total", 0)),
            "wrong_tokens": counts.get("wrong_tokens", 0),
            "unclear_failures": counts.get("unclear_failures", 0),
            "kv_idle_after": idle,
            "coordinator_fds": [fds0, fds1],
            "coordinator_rss_mb": [round(rss0, 1), round(rss_max, 1), round(rss1, 1)],
        })
        leaks = (0 if idle else 1) + (1 if fds1 > fds0 + a.fd_slack else 0) + \
                (1 if rss1 > rss0 + a.rss_slack_mb else 0)
        counts["leaks"] = leaks
        if self.unclear:
            counts["unclear_examples"] = self.unclear
        return counts

    def close(self):
        self.channel.close()
        codes = [self.coord.stop()] + [w.stop() for w in self.workers]
        if self.daemon:
            self.daemon.proc.send_signal(signal.SIGCONT)
            self.daemon.proc.kill()
            self.daemon.proc.wait()
        return codes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entrokv", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-prompt-bytes", type=int, default=65536)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--no-kvstore", action="store_true",
                    help="workers without a KV store daemon (no daemon faults)")
    ap.add_argument("--fault-every", type=float, default=12.0, help="mean seconds between faults")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--fd-slack", type=int, default=8)
    ap.add_argument("--rss-slack-mb", type=float, default=64.0)
    ap.add_argument("--python", help=argparse.SUPPRESS)
    a = ap.parse_args()
    s = Soak(a)
    try:
        counts = s.run()
    finally:
        codes = s.close()
    counts["exit_codes"] = codes
    print(json.dumps(counts))
    ok = (counts["wrong_tokens"] == 0 and counts["unclear_failures"] == 0 and
          counts["leaks"] == 0 and codes[0] == 0)
    if not ok:
        log("FAILED; logs:", s.coord.log.name, *(w.log.name for w in s.workers))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
