"""client.py - the kubelet's prober and a user, inside the node's network
namespace (podrun.py), driven by test_start_rendered.py over stdin/stdout,
one JSON object per line each way:

  {"op": "probe", "probes": [...]}   -> {"results": [true|"why", ...]}
      each probe as podrun.Cluster.probe_spec() gives it: httpGet (status
      200-399), grpc (grpc.health.v1.Health/Check of its service: SERVING),
      tcpSocket (connect)
  {"op": "chat", "base_url": URL, "model": M, "n": N, "extra": {...}}
      -> {"texts": [...]} or {"error": "..."}: N chat completions and
      completions, 4 at a time, with the official openai client
  {"op": "get", "url": URL}          -> {"status": S, "body": "..."}

grpc health uses a service descriptor built here, not generated stubs (the
stubs need grpcio-tools at import; the message is two fields).
"""
import concurrent.futures as cf
import json
import socket
import sys
import urllib.error
import urllib.request

import grpc
import openai


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def health_check(ip, port, service, timeout=2.0):
    """grpc.health.v1.Health/Check; True when SERVING, else why not."""
    req = (b"\x0a" + varint(len(service.encode())) + service.encode()) if service else b""
    with grpc.insecure_channel(f"{ip}:{port}") as ch:
        call = ch.unary_unary("/grpc.health.v1.Health/Check",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            resp = call(req, timeout=timeout)
        except grpc.RpcError as e:
            return f"grpc {e.code().name}: {e.details()}"
    # HealthCheckResponse { ServingStatus status = 1; } SERVING = 1
    status = resp[1] if len(resp) >= 2 and resp[0] == 0x08 else 0
    return True if status == 1 else f"status {status}"


def probe(p):
    try:
        if p["type"] == "httpGet":
            url = f"http://{p['ip']}:{p['port']}{p['path']}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return True if 200 <= r.status < 400 else f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                return f"HTTP {e.code}"
        if p["type"] == "grpc":
            return health_check(p["ip"], p["port"], p["service"])
        with socket.create_connection((p["ip"], p["port"]), timeout=2):
            return True
    except Exception as e:  # a probe that fails for any reason is a failed probe
        return f"{type(e).__name__}: {e}"


PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Once upon a time",
           "The quick brown fox", "Water boils at", "import numpy as np", "Roses are red,"]


def chat(base_url, model, n, extra):
    """n requests, 4 at a time: chat completions and completions with
    different prompts (different prefixes, so the coordinator's prefix
    affinity does not keep them all on one group)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                max_tokens=8, temperature=0, extra_body=extra)
            text = r.choices[0].message.content
        else:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                          temperature=0, extra_body=extra)
            text = r.choices[0].text
        assert r.choices[0].finish_reason in ("stop", "length"), r
        assert r.usage.completion_tokens >= 1, r
        return text

    with cf.ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, range(n)))


def main():
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "probe":
                out = {"results": [probe(p) for p in cmd["probes"]]}
            elif cmd["op"] == "chat":
                out = {"texts": chat(cmd["base_url"], cmd["model"], cmd["n"], cmd.get("extra", {}))}
            elif cmd["op"] == "get":
                try:
                    with urllib.request.urlopen(cmd["url"], timeout=10) as r:
                        out = {"status": r.status, "body": r.read().decode(errors="replace")}
                except urllib.error.HTTPError as e:
                    out = {"status": e.code, "body": e.read().decode(errors="replace")}
            else:
                out = {"error": f"unknown op {cmd['op']}"}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
