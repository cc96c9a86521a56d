"""lifecycle.py - what a Kubernetes cluster expects of the serving
processes (docs/serving.md, "Lifecycle"), with real clients:

- SIGTERM: /readyz and gRPC health fail at once while /livez stays 200; new
  requests are accepted for --drain-grace seconds, then refused; running
  streams finish; exit 0. A stream still running at --drain-timeout is
  cancelled with a status that says so; a second signal exits at once.
- Flags from ENTROKV_* variables and a --config file, with the precedence
  command line > environment > file > default; unknown keys exit 2.
- `--workers dns:NAME:PORT`: the coordinator starts with no worker, then adds
  and retires worker groups as NAME's records change, while requests flow,
  without a failed request. The records live in /etc/hosts inside a private
  mount namespace (unshare -m, bind mount), so the host's file is untouched.

Run by ctest as serve.test_lifecycle (pytest on this file; conftest.py
provides the binary, the model and the gRPC stubs).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from conftest import BIN, MODEL, SLOW

SCALE = 3 if SLOW else 1


class Proc:
    """An entrokv process with its stderr in a file; args after the binary."""

    def __init__(self, *args, env=None, wrap=(), wait_listen=True):
        self.log = tempfile.NamedTemporaryFile(prefix="entrokv-life-", suffix=".log", delete=False)
        e = {k: v for k, v in os.environ.items() if not k.startswith("ENTROKV_")}
        e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        e.update(env or {})
        self.proc = subprocess.Popen([*wrap, BIN, *args], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env=e)
        self.grpc_port = self.http_port = None
        if wait_listen:
            self.wait_log(r"listening grpc=[\d.]+:(\d+)(?: http=[\d.]+:(\d+))?", 60)
            m = re.search(r"listening grpc=[\d.]+:(\d+)(?: http=[\d.]+:(\d+))?", self.stderr())
            self.grpc_port = int(m.group(1))
            self.http_port = int(m.group(2)) if m.group(2) else None
            self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def stderr(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, timeout=20):
        deadline = time.time() + timeout * SCALE
        while time.time() < deadline:
            if re.search(pattern, self.stderr()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no /{pattern}/ in the log:\n{self.stderr()[-3000:]}")

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def post(self, path, body, timeout=60):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout * SCALE) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout * SCALE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.stderr()[-3000:]}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serve(*extra, **kw):
    return Proc("serve", "--model", MODEL, "--host", "127.0.0.1", "--grpc-port", "0",
                "--http-port", "0", "--threads", "2", "--ctx", "2048", *extra, **kw)


def health(p, pb, service=""):
    stub = pb["health_pb2_grpc"].HealthStub(p.channel)
    return stub.Check(pb["health_pb2"].HealthCheckRequest(service=service), timeout=10).status


def long_request(pb, n):
    return pb["entrokv_pb2"].GenerateRequest(prompt="Count:", max_tokens=n, ignore_eos=True,
                                             temperature=0.0)


def until(cond, timeout=10, what="condition"):
    deadline = time.time() + timeout * SCALE
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ SIGTERM

def test_sigterm_readiness_fails_first_then_new_work_is_refused_and_streams_finish(pb):
    s = serve("--drain-grace", "3", "--drain-timeout", "60")
    try:
        h = pb["health_pb2"].HealthCheckResponse
        assert s.get("/readyz") == (200, {"status": "ok"})
        assert health(s, pb) == h.SERVING and health(s, pb, "entrokv.v1.Generation") == h.SERVING
        watch = pb["health_pb2_grpc"].HealthStub(s.channel).Watch(
            pb["health_pb2"].HealthCheckRequest(service=""), timeout=60 * SCALE)
        assert next(watch).status == h.SERVING
        stub = pb["entrokv_pb2_grpc"].GenerationStub(s.channel)
        call = stub.Generate(long_request(pb, 96), timeout=120 * SCALE)
        ids = list(next(call).token_ids)
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == h.NOT_SERVING  # Watch hears it at once too
        until(lambda: s.get("/readyz")[0] == 503, 1, "/readyz to fail after SIGTERM")
        code, body = s.get("/readyz")
        assert body["reason"] == "draining", body
        assert s.get("/livez") == (200, {"status": "alive"})
        assert s.get("/health")[0] == 503
        assert health(s, pb) == h.NOT_SERVING
        assert health(s, pb, "entrokv.v1.Generation") == h.NOT_SERVING
        # within the grace period new work is still served
        code, text = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert time.time() - t0 < 3, "the grace period was over before the check"
        assert code == 200, text
        # after it, refused with 503 / UNAVAILABLE, while the stream goes on
        until(lambda: "draining: new requests refused" in s.stderr(), 5, "the grace period end")
        code, text = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 503 and "shutting down" in text, (code, text)
        assert s.get("/livez")[0] == 200 and s.get("/readyz")[0] == 503
        last = None
        for msg in call:
            ids += list(msg.token_ids)
            last = msg
        assert last.finish_reason == "length" and len(ids) == 96, "the stream was cut short"
        assert s.wait_exit(20) == 0, s.stderr()[-3000:]
        assert "serve: stopped" in s.stderr()
    finally:
        s.kill()


def test_streams_past_the_drain_timeout_are_cancelled_with_a_clear_status(pb):
    s = serve("--drain-grace", "0", "--drain-timeout", "1.5")
    try:
        stub = pb["entrokv_pb2_grpc"].GenerationStub(s.channel)
        call = stub.Generate(long_request(pb, 1800), timeout=120 * SCALE)
        next(call)
        sse = []
        conn_ready = threading.Event()

        def read_sse():
            req = urllib.request.Request(
                f"http://127.0.0.1:{s.http_port}/v1/completions",
                data=json.dumps({"prompt": "Count:", "max_tokens": 1800, "ignore_eos": True,
                                 "stream": True}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120 * SCALE) as r:
                for line in r:
                    conn_ready.set()
                    if line.startswith(b"data: "):
                        sse.append(line[6:].strip())
        whole = []
        t = threading.Thread(target=read_sse)
        t.start()
        t2 = threading.Thread(target=lambda: whole.append(s.post(
            "/v1/completions", {"prompt": "Count:", "max_tokens": 1800, "ignore_eos": True})))
        t2.start()
        assert conn_ready.wait(30 * SCALE)
        until(lambda: s.stderr().count(" accepted ") >= 3, 10, "three requests running")
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ei:
            for _ in call:
                pass
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
        assert "drain timeout" in ei.value.details(), ei.value.details()
        t.join(30 * SCALE)
        assert sse[-1] == b"[DONE]", sse[-3:]
        err = json.loads(sse[-2])["error"]
        assert "drain timeout" in err["message"] and err["type"] == "service_unavailable", err
        t2.join(30 * SCALE)
        code, text = whole[0]
        assert code == 503 and "drain timeout" in text, (code, text)
        assert s.wait_exit(15) == 0, s.stderr()[-3000:]
        assert time.time() - t0 < 1.5 + 5 * SCALE, "the drain took too long"
        assert "drain timeout (1.5 s): cancelling" in s.stderr()
    finally:
        s.kill()


def test_second_signal_exits_at_once():
    s = serve("--drain-grace", "30", "--drain-timeout", "60")
    try:
        s.proc.send_signal(signal.SIGTERM)
        s.wait_log("not ready", 10)
        t0 = time.time()
        s.proc.send_signal(signal.SIGINT)
        assert s.wait_exit(5) == 128 + signal.SIGINT
        assert time.time() - t0 < 3
    finally:
        s.kill()


# ------------------------------------------------------- env and config file

def free_port(host="127.0.0.1"):
    with socket.socket() as sk:
        sk.bind((host, 0))
        return sk.getsockname()[1]


def test_env_and_config_file_set_flags_with_documented_precedence(pb, tmp_path):
    port = free_port()
    cfg = tmp_path / "worker.json"
    # file < env < command line: ctx is 320 / 384 / 448; kv-tokens is invalid (1)
    # in the file, so the worker only starts if the environment's value wins;
    # listen comes from the file alone.
    cfg.write_text(json.dumps({"listen": f"127.0.0.1:{port}", "ctx": 320, "kv-tokens": 1,
                               "model": MODEL, "max-running": 2}))
    w = Proc("worker", "--ctx", "448", "--threads", "2",
             env={"ENTROKV_CONFIG": str(cfg), "ENTROKV_CTX": "384",
                  "ENTROKV_KV_TOKENS": "8192"})
    try:
        assert w.grpc_port == port
        st = pb["entrokv_pb2_grpc"].WorkerStub(w.channel).Stats(pb["entrokv_pb2"].StatsRequest(),
                                                                timeout=10)
        assert st.max_ctx == 448
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait_exit(20) == 0
    finally:
        w.kill()
    # --config on the command line, env below it: the environment's ctx wins
    # over the file's, and a value the command line does not set comes through
    cfg.write_text(json.dumps({"listen": "127.0.0.1:0", "ctx": 320, "model": MODEL,
                               "drain-grace": 0}))
    w = Proc("worker", "--config", str(cfg), "--threads", "2", env={"ENTROKV_CTX": "384"})
    try:
        st = pb["entrokv_pb2_grpc"].WorkerStub(w.channel).Stats(pb["entrokv_pb2"].StatsRequest(),
                                                                timeout=10)
        assert st.max_ctx == 384
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait_exit(20) == 0
        assert re.search(r"new requests accepted for 0 s", w.stderr())
    finally:
        w.kill()


def test_config_file_lists_and_fractions_reach_the_coordinator(tmp_path):
    cfg = tmp_path / "coordinator.json"
    cfg.write_text(json.dumps({
        "model": MODEL, "host": "127.0.0.1", "grpc-port": 0, "http-port": 0, "ctx": 512,
        "workers": ["127.0.0.1:1", "dns:entrokv-test.invalid:50061"], "drain-grace": 0.25,
        "drain-timeout": 5}))
    c = Proc("coordinator", "--config", str(cfg))
    try:
        c.wait_log(r"worker 127\.0\.0\.1:1 added")
        c.wait_log(r"dns:entrokv-test\.invalid:50061 has 0 record\(s\)")
        assert c.get("/readyz")[0] == 503
        c.proc.send_signal(signal.SIGTERM)
        assert c.wait_exit(20) == 0, c.stderr()[-3000:]
        assert "new requests accepted for 0.25 s, running ones get 5 s" in c.stderr()
    finally:
        c.kill()


@pytest.mark.parametrize("config,env,message", [
    ({"grpc-prot": 50051}, {}, 'unknown key "grpc-prot"'),
    ({"workers": "127.0.0.1:1"}, {}, 'unknown key "workers"'),  # a coordinator flag
    ({"ctx": {"a": 1}}, {}, '"ctx" needs a string, a number or a list'),
    ("[1, 2]", {}, "not a JSON object"),
    ("{\"ctx\": ", {}, "malformed JSON"),
    ({}, {"ENTROKV_GRPC_PROT": "1"}, "ENTROKV_GRPC_PROT: `entrokv serve` has no flag --grpc-prot"),
    ({}, {"ENTROKV_LISTEN": "127.0.0.1:0"}, "has no flag --listen"),  # a worker flag
    ({}, {"ENTROKV_CTX": "nine"}, "--ctx nine came from ENTROKV_CTX"),
    ({"ctx": 7}, {}, 'came from key "ctx" of'),
])
def test_bad_config_key_or_variable_exits_2_with_a_message(tmp_path, config, env, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(config if isinstance(config, str) else json.dumps(config))
    p = subprocess.run([BIN, "serve", "--model", MODEL, "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("ENTROKV_")},
                            **env})
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr


def test_kubernetes_service_link_variables_are_not_flags():
    # what Kubernetes puts into every pod for a Service "entrokv-coordinator"
    links = {"ENTROKV_COORDINATOR_SERVICE_HOST": "10.96.0.10",
             "ENTROKV_COORDINATOR_SERVICE_PORT": "8080",
             "ENTROKV_COORDINATOR_SERVICE_PORT_HTTP": "8080",
             "ENTROKV_COORDINATOR_PORT": "tcp://10.96.0.10:8080",
             "ENTROKV_COORDINATOR_PORT_8080_TCP": "tcp://10.96.0.10:8080",
             "ENTROKV_COORDINATOR_PORT_8080_TCP_PROTO": "tcp",
             "ENTROKV_COORDINATOR_PORT_8080_TCP_PORT": "8080",
             "ENTROKV_COORDINATOR_PORT_8080_TCP_ADDR": "10.96.0.10"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENTROKV_")}
    for cmd in ("serve", "worker", "coordinator", "kvstore"):
        p = subprocess.run([BIN, cmd, "--help"], capture_output=True, text=True, timeout=30,
                           env={**base, **links})
        assert p.returncode == 0, (cmd, p.stderr)
        # a variable that only looks like one is still refused
        p = subprocess.run([BIN, cmd, "--help"], capture_output=True, text=True, timeout=30,
                           env={**base, **links, "ENTROKV_COORDINATOR_PORTS": "8080"})
        assert p.returncode == 2 and "ENTROKV_COORDINATOR_PORTS" in p.stderr, (cmd, p.stderr)


def test_missing_config_file_exits_2():
    p = subprocess.run([BIN, "worker", "--config", "/nonexistent/entrokv.json"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "/nonexistent/entrokv.json" in p.stderr, p.stderr


# ------------------------------------------------------------ DNS discovery

def can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /dev/null /etc/hosts"],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def write_hosts(path, lines):
    """Rewrites the records in place (the bind mount follows the inode, a
    rename would not be seen) with one write of a fixed size, so a lookup
    never sees a truncated, empty file."""
    text = "127.0.0.1 localhost\n" + "".join(f"{a} wg.test\n" for a in lines)
    text += "#" + " " * (1023 - len(text)) + "\n"
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, text.encode(), 0) == 1025
    finally:
        os.close(fd)


def test_dns_groups_are_added_and_retired_while_requests_flow(pb, tmp_path):
    if not can_unshare():
        pytest.skip("needs root and `unshare -m` with bind mounts for a private /etc/hosts")
    port = free_port("127.0.0.1")
    hosts = tmp_path / "hosts"
    hosts.write_text(" " * 1025)
    write_hosts(hosts, [])
    workers = [Proc("worker", "--model", MODEL, "--listen", f"127.0.0.{i}:{port}", "--threads",
                    "1", "--ctx", "512", wait_listen=False) for i in (1, 2)]
    coord = None
    done = threading.Event()  # stops the request threads, also when the test fails
    try:
        wrap = ["unshare", "-m", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"']
        coord = Proc("coordinator", "--model", MODEL, "--host", "127.0.0.1", "--grpc-port", "0",
                     "--http-port", "0", "--ctx", "512", "--workers", f"dns:wg.test:{port}",
                     "--dns-interval", "0.3", "--drain-grace", "0", wrap=wrap)
        # no record yet: up, but not ready, and requests are refused clearly
        h = pb["health_pb2"].HealthCheckResponse
        watch = pb["health_pb2_grpc"].HealthStub(coord.channel).Watch(
            pb["health_pb2"].HealthCheckRequest(service="entrokv.v1.Generation"),
            timeout=60 * SCALE)
        assert next(watch).status == h.NOT_SERVING
        assert coord.get("/livez")[0] == 200
        code, body = coord.get("/readyz")
        assert code == 503 and body["reason"] == "no healthy worker group", body
        code, text = coord.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 503 and "no healthy worker group" in text, (code, text)
        for w in workers:
            w.wait_log(r"listening grpc=", 60)
        a, b = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
        write_hosts(hosts, ["127.0.0.1"])
        coord.wait_log(rf"worker {re.escape(a)} healthy", 20)
        until(lambda: coord.get("/readyz")[0] == 200, 5, "readiness with group A")
        assert next(watch).status == h.SERVING  # Watch follows readiness
        watch.cancel()

        failures = []
        stub = pb["entrokv_pb2_grpc"].GenerationStub(coord.channel)
        # a long stream on A (the only group now) that must survive A's removal
        long_call = stub.Generate(long_request(pb, 160), timeout=120 * SCALE)
        ids = list(next(long_call).token_ids)

        def flow():
            i = 0
            while not done.is_set():
                try:
                    msgs = list(stub.Generate(pb["entrokv_pb2"].GenerateRequest(
                        prompt=f"Request {i}:", max_tokens=4, temperature=0.0), timeout=60 * SCALE))
                    if msgs[-1].finish_reason not in ("length", "stop"):
                        failures.append(f"request {i}: finish {msgs[-1].finish_reason}")
                except grpc.RpcError as e:
                    failures.append(f"request {i}: {e.code()} {e.details()}")
                i += 1
        threads = [threading.Thread(target=flow, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        write_hosts(hosts, ["127.0.0.1", "127.0.0.2"])
        coord.wait_log(rf"worker group {re.escape(b)} added from dns:wg.test", 10)
        coord.wait_log(rf"worker {re.escape(b)} healthy", 10)
        coord.wait_log(rf"group={re.escape(b)} ", 20)
        write_hosts(hosts, ["127.0.0.2"])
        coord.wait_log(rf"worker group {re.escape(a)} left dns:wg.test", 10)
        time.sleep(0.3)  # a request routed just before may log its acceptance just after
        retired_at = len(coord.stderr())
        for msg in long_call:
            ids += list(msg.token_ids)
            last = msg
        assert last.finish_reason == "length" and len(ids) == 160, "A's stream was cut short"
        coord.wait_log(rf"worker group {re.escape(a)} freed", 20)
        time.sleep(0.5)  # more requests, all on B now
        done.set()
        for t in threads:
            t.join(60 * SCALE)
        assert not failures, (failures[:5], coord.stderr()[-4000:])
        after = coord.stderr()[retired_at:]
        assert re.search(rf"group={re.escape(b)} ", after), "no request went to B after A left"
        assert not re.search(rf"accepted .*group={re.escape(a)} ", after), \
            "a request was routed to A after it left DNS"
        coord.proc.send_signal(signal.SIGTERM)
        assert coord.wait_exit(20) == 0, coord.stderr()[-3000:]
        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
            assert w.wait_exit(20) == 0, w.stderr()[-3000:]
    finally:
        done.set()
        for p in [coord, *workers]:
            if p:
                p.kill()
