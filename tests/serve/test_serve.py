"""test_serve.py - `entrokv serve` driven by real clients: gRPC stubs made
from proto/ by grpcio-tools, the official `openai` package, curl and
promtool. Each test names the behaviour it checks; see conftest.py for the
servers they run against.
"""
import concurrent.futures as cf
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import grpc
import openai
import pytest

from conftest import SLOW, Server

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "The quick brown fox",
    "In 1969, the first humans",
]


def gen_request(pb, prompt="The capital of France is", **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0.0)
    return pb["entrokv_pb2"].GenerateRequest(prompt=prompt, **kw)


def generation(server, pb):
    return pb["entrokv_pb2_grpc"].GenerationStub(server.channel)


def run_stream(stub, req, timeout=120):
    """Collects a Generate stream: (text, ids, last message, message count)."""
    text, ids, last, n = "", [], None, 0
    for msg in stub.Generate(req, timeout=timeout * (4 if SLOW else 1)):
        text += msg.text
        ids += list(msg.token_ids)
        last, n = msg, n + 1
    return text, ids, last, n


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout * (3 if SLOW else 1)
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kv_idle(server):
    return (server.metric("entrokv_kv_blocks_used") == 0 and
            server.metric("entrokv_running_sequences") == 0 and
            server.metric("entrokv_queue_depth") == 0)


def oai(server):
    return openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                         timeout=120 * (4 if SLOW else 1))


# ---------------------------------------------------------------- gRPC

def test_grpc_generate_streams_tokens_then_usage(server, pb):
    text, ids, last, n = run_stream(generation(server, pb), gen_request(pb, max_tokens=16))
    assert n >= 2, "tokens should arrive as a stream, not one message"
    assert last.finish_reason in ("length", "stop")
    assert last.usage.completion_tokens == len(ids) and 0 < len(ids) <= 16
    assert last.usage.prompt_tokens > 0
    assert last.usage.kv_bytes > 0 and last.usage.kv_bytes_full >= last.usage.kv_bytes
    assert "Paris" in text


def test_grpc_generate_chat_messages_use_the_template(server, pb):
    e = pb["entrokv_pb2"]
    req = e.GenerateRequest(messages=[e.Message(role="user", content="What is 2 + 2?")],
                            max_tokens=24, temperature=0)
    text, ids, last, _ = run_stream(generation(server, pb), req)
    assert text.strip() and last.finish_reason in ("stop", "length")
    tok = generation(server, pb).Tokenize(
        e.TokenizeRequest(messages=[e.Message(role="user", content="What is 2 + 2?")]))
    assert last.usage.prompt_tokens == len(tok.token_ids) > 10


def test_grpc_tokenize_matches_generate_prompt_tokens(server, pb):
    e = pb["entrokv_pb2"]
    stub = generation(server, pb)
    tok = stub.Tokenize(e.TokenizeRequest(text="Hello world, hello world"))
    assert len(tok.token_ids) > 2 and all(t >= 0 for t in tok.token_ids)
    _, _, last, _ = run_stream(stub, gen_request(pb, "Hello world, hello world", max_tokens=1))
    assert last.usage.prompt_tokens == len(tok.token_ids)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Tokenize(e.TokenizeRequest(text=""))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_stop_string_ends_the_text(server, pb):
    text, _, last, _ = run_stream(generation(server, pb),
                                  gen_request(pb, "List: one, two, three,", max_tokens=40,
                                              stop=[","]))
    assert last.finish_reason == "stop" and "," not in text


def test_grpc_seeded_sampling_is_reproducible(server, pb):
    stub = generation(server, pb)
    req = gen_request(pb, "Tell me a story:", max_tokens=16, temperature=0.9, top_p=0.95,
                      top_k=40, seed=1234)
    assert run_stream(stub, req)[1] == run_stream(stub, req)[1]


def test_health_check_and_watch(server, pb):
    h = pb["health_pb2"]
    stub = pb["health_pb2_grpc"].HealthStub(server.channel)
    for service in ("", "entrokv.v1.Generation"):
        r = stub.Check(h.HealthCheckRequest(service=service))
        assert r.status == h.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as ei:
        stub.Check(h.HealthCheckRequest(service="no.such.Service"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(h.HealthCheckRequest(service=""))
    assert next(watch).status == h.HealthCheckResponse.SERVING
    watch.cancel()


def test_unknown_method_is_unimplemented(server):
    call = server.channel.unary_unary("/entrokv.v1.Generation/Nope")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"")
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------- bad input

def raw_generate(server, pb, payload):
    """Generate with a hand-made request body (bytes), bypassing the stub's checks."""
    call = server.channel.unary_stream(
        "/entrokv.v1.Generation/Generate",
        response_deserializer=pb["entrokv_pb2"].GenerateResponse.FromString)
    return list(call(payload, timeout=60))


def pb_string(field, data):
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


BAD_GRPC = {
    "empty_prompt": dict(prompt=""),
    "prompt_longer_than_context": dict(prompt="word " * 700),
    "max_tokens_zero": dict(max_tokens=0),
    "max_tokens_over_limit": dict(max_tokens=100000),
    "negative_temperature": dict(temperature=-0.5),
    "top_p_zero": dict(top_p=0.0),
    "unknown_kv_method": dict(kv_method="zip"),
    "bad_kv_budget": dict(kv_method="snapkv", kv_budget=-1.0),
    "too_many_stops": dict(stop=[str(i) for i in range(17)]),
}


@pytest.mark.parametrize("name", sorted(BAD_GRPC))
def test_grpc_bad_request_is_invalid_argument(server, pb, name):
    fields = dict(prompt="Hello", max_tokens=4)
    fields.update(BAD_GRPC[name])
    req = pb["entrokv_pb2"].GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as ei:
        run_stream(generation(server, pb), req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert ei.value.details(), "the status needs a message"


@pytest.mark.parametrize("payload", [
    pb_string(1, b"caf\xc3"),                 # prompt: truncated UTF-8
    pb_string(1, b"\xff\xfe bad"),            # prompt: invalid bytes
    pb_string(11, b"\xed\xa0\x80"),           # kv_method: a UTF-16 surrogate
    b"\x0a\x05ab",                            # length past the end
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # malformed varint
], ids=["truncated_utf8", "invalid_utf8", "surrogate", "short_length", "bad_varint"])
def test_grpc_malformed_bytes_are_invalid_argument(server, pb, payload):
    with pytest.raises(grpc.RpcError) as ei:
        raw_generate(server, pb, payload)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details()


def http_post(server, path, body, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request("POST", path, body=body, headers=hdrs)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


BAD_HTTP = {
    "malformed_json": b'{"prompt": "hi", ',
    "not_an_object": b'["prompt"]',
    "invalid_utf8": b'{"prompt": "caf\xc3 \xff"}',
    "empty_prompt": b'{"prompt": ""}',
    "missing_prompt": b'{"max_tokens": 3}',
    "prompt_not_string": b'{"prompt": 42}',
    "prompt_longer_than_context": json.dumps({"prompt": "word " * 700}).encode(),
    "max_tokens_zero": b'{"prompt": "hi", "max_tokens": 0}',
    "max_tokens_over_limit": b'{"prompt": "hi", "max_tokens": 100000}',
    "max_tokens_fraction": b'{"prompt": "hi", "max_tokens": 1.5}',
    "negative_temperature": b'{"prompt": "hi", "temperature": -1}',
    "temperature_string": b'{"prompt": "hi", "temperature": "hot"}',
    "unknown_kv_method": b'{"prompt": "hi", "kv_method": "zip"}',
    "n_zero": b'{"prompt": "hi", "n": 0}',
    "n_over_limit": b'{"prompt": "hi", "n": 17}',
    "stop_not_strings": b'{"prompt": "hi", "stop": [1, 2]}',
}


@pytest.mark.parametrize("name", sorted(BAD_HTTP))
def test_http_bad_request_is_400_with_openai_error(server, name):
    status, data = http_post(server, "/v1/completions", BAD_HTTP[name])
    assert status == 400, (status, data)
    err = json.loads(data)["error"]
    assert err["message"] and err["type"] == "invalid_request_error"


def test_http_bad_chat_messages_are_400(server):
    for body in ({"messages": []}, {"messages": [{"content": "no role"}]},
                 {"messages": "hi"}, {"messages": [{"role": "user", "content": 5}]}):
        status, data = http_post(server, "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400, (body, status, data)
        assert json.loads(data)["error"]["message"]


def test_http_oversized_body_is_413(server):
    status, data = http_post(server, "/v1/completions",
                             b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert status == 413 and json.loads(data)["error"]["message"]


def test_http_unknown_route_and_method(server):
    status, data = http_post(server, "/v1/nope", b"{}")
    assert status == 404 and json.loads(data)["error"]["message"]
    status, _ = http_post(server, "/metrics", b"{}")
    assert status == 405


def test_server_keeps_serving_after_bad_input(server, pb):
    text, _, last, _ = run_stream(generation(server, pb), gen_request(pb, max_tokens=4))
    assert last.usage.completion_tokens == 4
    r = oai(server).completions.create(model="x", prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert server.metric('entrokv_requests_total{status="invalid"}') >= len(BAD_HTTP)


# ---------------------------------------------------------------- OpenAI HTTP

def test_openai_models_list(server):
    models = oai(server).models.list()
    assert len(models.data) == 1 and models.data[0].id == "SmolLM2-135M-Instruct.Q4_1"


def test_openai_completions_stream_equals_whole(server):
    c = oai(server)
    whole = c.completions.create(model="entrokv", prompt="The capital of France is",
                                 max_tokens=16, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert "Paris" in whole.choices[0].text
    chunks = list(c.completions.create(model="entrokv", prompt="The capital of France is",
                                       max_tokens=16, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_chat_stream_equals_whole(server):
    c = oai(server)
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a fruit."}]
    whole = c.chat.completions.create(model="entrokv", messages=msgs, max_tokens=20,
                                      temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    stream = c.chat.completions.create(model="entrokv", messages=msgs, max_tokens=20,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def completion(server, prompt="Hello there", max_tokens=6, temperature=0.0, **extra):
    """One /v1/completions call: (text, finish_reason, usage); entrokv's
    extras and any other fields go in the body beside OpenAI's."""
    known = {k: extra.pop(k) for k in ("stop", "seed") if k in extra}
    r = oai(server).completions.create(model="entrokv", prompt=prompt, max_tokens=max_tokens,
                                       temperature=temperature, extra_body=extra, **known)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


def test_openai_extra_fields_take_effect(server):
    """entrokv's extras in an OpenAI body (docs/serving.md: top_k, min_p,
    repeat_penalty or repetition_penalty, kv_method, kv_budget, ignore_eos,
    plus OpenAI's seed) each change the result as the gRPC field does."""
    greedy = completion(server)[0]
    sampled = {seed: completion(server, temperature=1.5, seed=seed)[0] for seed in (1, 2, 3)}
    assert len(set(sampled.values()) | {greedy}) > 2, "temperature 1.5 should not be greedy"
    assert completion(server, temperature=1.5, seed=1)[0] == sampled[1]  # seed pins the draw
    for seed in sampled:  # only the most likely token survives: greedy at any temperature
        assert completion(server, temperature=1.5, seed=seed, top_k=1)[0] == greedy
        assert completion(server, temperature=1.5, seed=seed, min_p=1.0)[0] == greedy
    loop = "1, 2, 1, 2, 1, 2, 1, 2, 1, 2,"
    repeated = completion(server, loop, max_tokens=12)[0]
    penalized = completion(server, loop, max_tokens=12, repeat_penalty=1.5)[0]
    assert penalized != repeated
    assert completion(server, loop, max_tokens=12, repetition_penalty=1.5)[0] == penalized
    doc = open("/usr/share/common-licenses/MPL-2.0").read()[:1200]
    full = completion(server, doc, max_tokens=4, kv_method="full")[2]
    snap = completion(server, doc, max_tokens=4, kv_method="snapkv", kv_budget=0.25)[2]
    assert full.kv_bytes == full.kv_bytes_full and snap.kv_bytes_full == full.kv_bytes_full
    assert snap.kv_bytes < full.kv_bytes_full / 2
    c = oai(server)
    msgs = [{"role": "user", "content": "Reply with only the word yes."}]
    ends = c.chat.completions.create(model="entrokv", messages=msgs, max_tokens=32, temperature=0)
    runs = c.chat.completions.create(model="entrokv", messages=msgs, max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert ends.choices[0].finish_reason == "stop" and ends.usage.completion_tokens < 32
    assert runs.choices[0].finish_reason == "length" and runs.usage.completion_tokens == 32
    assert runs.choices[0].message.content.startswith(ends.choices[0].message.content)


# OpenAI fields at values that change nothing in OpenAI's own answer either
# (unknown fields are refused: openai_api.py).
IGNORED_FIELDS = {"user": "someone", "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "logit_bias": {}, "logprobs": None}


def test_openai_neutral_fields_change_nothing_and_known_ones_still_apply(server):
    plain = completion(server, max_tokens=5, ignore_eos=True)
    extra = completion(server, max_tokens=5, ignore_eos=True, **IGNORED_FIELDS)
    assert extra[0] == plain[0] and extra[1] == plain[1] == "length"
    assert extra[2].completion_tokens == plain[2].completion_tokens == 5  # max_tokens still limits
    stopped = completion(server, max_tokens=5, stop=[","], **IGNORED_FIELDS)
    assert plain[0].startswith(",") and stopped[0] == "" and stopped[1] == "stop"
    assert completion(server, max_tokens=5, temperature=1.5, seed=1, top_k=1,
                      **IGNORED_FIELDS)[0] == plain[0]


def test_curl_health_and_metrics(server):
    out = subprocess.run(["curl", "-sS", "-f", server.http + "/health"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "ok"
    out = subprocess.run(["curl", "-sS", "-f", "-D", "-", server.http + "/metrics"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "text/plain; version=0.0.4" in out.stdout
    for name in ("entrokv_requests_total{status=\"ok\"}", "entrokv_prompt_tokens_total",
                 "entrokv_generated_tokens_total", "entrokv_ttft_seconds_bucket",
                 "entrokv_inter_token_latency_seconds_count", "entrokv_queue_depth",
                 "entrokv_running_sequences", "entrokv_kv_blocks_used", "entrokv_kv_blocks_free",
                 "entrokv_kv_bytes_saved_total", "entrokv_kvstore_hits_total",
                 "entrokv_kvstore_misses_total"):
        assert name in out.stdout, name


def test_promtool_accepts_metrics(server):
    promtool = shutil.which("promtool")
    if not promtool:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package prometheus, scripts/setup.sh)")
        pytest.skip("promtool not installed")
    _, text = server.get("/metrics")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert server.metric("entrokv_generated_tokens_total") > 0
    assert server.metric("entrokv_ttft_seconds_count") > 0


# ---------------------------------------------------------------- concurrency

def test_32_concurrent_greedy_streams_equal_solo_runs(server, pb):
    stub = generation(server, pb)
    n_tokens = 12 if SLOW else 24
    reqs = [gen_request(pb, p, max_tokens=n_tokens, ignore_eos=True) for p in PROMPTS]
    solo = [run_stream(stub, r)[1] for r in reqs]
    jobs = [reqs[i % len(reqs)] for i in range(32)]
    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda r: run_stream(stub, r, timeout=300), jobs))
    for i, (_, ids, last, _) in enumerate(results):
        assert last.finish_reason == "length" and len(ids) == n_tokens
        assert ids == solo[i % len(reqs)], f"stream {i} differs from its solo run"
    wait_for(lambda: kv_idle(server), what="KV to be freed")


def test_grpc_client_cancel_frees_kv(server, pb):
    stub = generation(server, pb)
    call = stub.Generate(gen_request(pb, "Count to one thousand:", max_tokens=400,
                                     ignore_eos=True), timeout=300)
    for _ in range(3):
        next(call)
    assert server.metric("entrokv_kv_blocks_used") > 0
    call.cancel()
    wait_for(lambda: kv_idle(server), what="KV to be freed after cancel")
    assert server.metric('entrokv_requests_total{status="cancelled"}') >= 1


def test_grpc_deadline_cancels_and_frees_kv(server, pb):
    stub = generation(server, pb)
    with pytest.raises(grpc.RpcError) as ei:
        for _ in stub.Generate(gen_request(pb, "Count:", max_tokens=500, ignore_eos=True),
                               timeout=0.5):
            pass
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: kv_idle(server), what="KV to be freed after the deadline")


def test_http_client_disconnect_mid_stream_frees_kv(server):
    body = json.dumps({"prompt": "Count to one thousand:", "max_tokens": 400,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        chunk = s.recv(4096)
        assert chunk, "server closed the stream early"
        got += chunk
    assert b"200 OK" in got and b"text/event-stream" in got
    assert server.metric("entrokv_kv_blocks_used") > 0
    s.close()
    wait_for(lambda: kv_idle(server), what="KV to be freed after the client left")


def test_load_200_short_requests_8_concurrent(server, pb):
    n = 40 if SLOW else 200
    stub = generation(server, pb)
    client = oai(server)

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        if i % 2 == 0:
            _, ids, last, _ = run_stream(stub, gen_request(pb, p, max_tokens=8,
                                                           temperature=0.7, seed=i))
            return len(ids) > 0 and last.finish_reason in ("length", "stop")
        r = client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0.7,
                                      seed=i)
        return r.usage.completion_tokens > 0

    t0 = time.time()
    with cf.ThreadPoolExecutor(8) as ex:
        ok = list(ex.map(one, range(n)))
    elapsed = time.time() - t0
    assert all(ok), f"{ok.count(False)} of {n} failed"
    assert elapsed < (600 if SLOW else 180), f"load test took {elapsed:.0f} s"
    wait_for(lambda: kv_idle(server), what="KV to be freed after the load test")


# ---------------------------------------------------------------- overload

def test_burst_over_queue_limit_is_resource_exhausted_and_429(small_server, pb):
    stub = generation(small_server, pb)
    req = gen_request(pb, "Count:", max_tokens=48, ignore_eos=True)

    def grpc_one(_):
        try:
            run_stream(stub, req, timeout=300)
            return "ok"
        except grpc.RpcError as e:
            assert e.details()
            return e.code().name

    def http_one(_):
        status, data = http_post(small_server, "/v1/completions", json.dumps(
            {"prompt": "Count:", "max_tokens": 48, "ignore_eos": True}).encode(), timeout=300)
        if status == 429:
            assert json.loads(data)["error"]["message"]
        return status

    with cf.ThreadPoolExecutor(24) as ex:
        g = ex.map(grpc_one, range(12))
        h = ex.map(http_one, range(12))
        g, h = list(g), list(h)
    assert set(g) <= {"ok", "RESOURCE_EXHAUSTED"} and set(h) <= {200, 429}, (g, h)
    assert "RESOURCE_EXHAUSTED" in g and 429 in h, "both protocols should see refusals"
    assert g.count("ok") + h.count(200) >= 2, "the accepted requests should complete"
    assert small_server.metric('entrokv_requests_total{status="rejected"}') > 0
    wait_for(lambda: kv_idle(small_server), what="KV to be freed after the burst")
    _, ids, _, _ = run_stream(stub, gen_request(pb, max_tokens=4))
    assert len(ids) == 4


# ---------------------------------------------------------------- shutdown

def test_sigterm_drains_running_streams_then_exits_0(pb):
    s = Server("--ctx", "256", "--drain-grace", "0")  # refuse new work at once
    stub = generation(s, pb)
    call = stub.Generate(gen_request(pb, "Count:", max_tokens=48, ignore_eos=True),
                         timeout=300)
    first = next(call)
    s.proc.send_signal(signal.SIGTERM)
    ids = list(first.token_ids)
    last = first
    for msg in call:
        ids += list(msg.token_ids)
        last = msg
    assert last.finish_reason == "length" and len(ids) == 48, "the stream was cut short"
    wait_for(lambda: "draining" in s.stderr(), what="the drain log line")
    with pytest.raises(grpc.RpcError) as ei:
        run_stream(stub, gen_request(pb, max_tokens=2), timeout=10)
    assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    rc = s.proc.wait(timeout=60 * (3 if SLOW else 1))  # on its own: a second signal would cut it
    s.channel.close()
    assert rc == 0, s.stderr()[-4000:]
    assert "serve: stopped" in s.stderr()
