"""conftest.py - fixtures for the serving tests: `entrokv serve` processes on
127.0.0.1 with ephemeral ports, and gRPC stubs generated from proto/ with
grpcio-tools into a temporary directory at test time.

Environment: ENTROKV_BIN (the binary; default build/release/entrokv) and
EKV_MODEL (the GGUF; default models/SmolLM2-135M-Instruct.Q4_1.gguf).
EKV_SERVE_SLOW=1 (set for sanitizer builds) scales time limits and the load
test down.
"""
import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("ENTROKV_BIN", os.path.join(ROOT, "build", "release", "entrokv"))
MODEL = os.environ.get("EKV_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
SLOW = os.environ.get("EKV_SERVE_SLOW", "") not in ("", "0")


def generate_stubs():
    """Compiles proto/*.proto with grpcio-tools into a temp dir and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="entrokv-stubs-")
    proto_dir = os.path.join(ROOT, "proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for name in ("entrokv.proto", "health.proto"):
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
                          f"--python_out={out}", f"--grpc_python_out={out}",
                          os.path.join(proto_dir, name)])
        assert rc == 0, f"protoc failed on {name}"
    sys.path.insert(0, out)
    mods = {n: importlib.import_module(n) for n in
            ("entrokv_pb2", "entrokv_pb2_grpc", "health_pb2", "health_pb2_grpc")}
    return mods


@pytest.fixture(scope="session")
def pb():
    return generate_stubs()


class Server:
    """One `entrokv serve` process (or `worker` / `coordinator` with cmd=...);
    stderr is kept in a file for the log checks."""

    def __init__(self, *extra, cmd="serve"):
        assert os.path.exists(BIN), f"no binary at {BIN} (set ENTROKV_BIN)"
        assert os.path.exists(MODEL), f"no model at {MODEL} (set EKV_MODEL)"
        self.log = tempfile.NamedTemporaryFile(prefix=f"entrokv-{cmd}-", suffix=".log",
                                               delete=False)
        if cmd == "worker":
            where = ["--listen", "127.0.0.1:0", "--threads", "2"]
        else:
            where = ["--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"]
            if cmd == "serve":
                where += ["--threads", "2"]
        # no grace period at SIGTERM (no load balancer here to notice readiness
        # fail): stop() returns as soon as the running streams are done
        where += ["--drain-grace", "0"]
        args = [BIN, cmd, "--model", MODEL, *where, *extra]
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.grpc_port = self.http_port = None
        deadline = time.time() + (120 if SLOW else 60)
        while time.time() < deadline:
            m = re.search(r"listening grpc=[\d.]+:(\d+)(?: http=[\d.]+:(\d+))?", self.stderr())
            if m:
                self.grpc_port = int(m.group(1))
                self.http_port = int(m.group(2)) if m.group(2) else None
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"entrokv serve exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.1)
        else:
            self.proc.kill()
            raise RuntimeError("entrokv serve did not start: " + self.stderr())
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def stderr(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.http + path, timeout=timeout) as r:
            return r.status, r.read().decode()

    def metric(self, name):
        _, text = self.get("/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} missing from /metrics"
        return float(m.group(1))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Signals the server and returns its exit status."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout * (3 if SLOW else 1))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    """The main server: a 512-token context (so over-long prompts are easy to
    make) and room for 32 concurrent sequences."""
    s = Server("--ctx", "512", "--kv-tokens", "16384", "--max-running", "32",
               "--max-queued", "256")
    yield s
    rc = s.stop()
    assert rc == 0, f"serve exited {rc}:\n{s.stderr()[-4000:]}"


@pytest.fixture(scope="module")
def small_server():
    """A server whose queue is tiny, for the overload tests."""
    s = Server("--ctx", "512", "--max-running", "2", "--max-queued", "2")
    yield s
    rc = s.stop()
    assert rc == 0, f"serve exited {rc}:\n{s.stderr()[-4000:]}"
