"""test_compress_serve.py - SCOPE, SparK and recall request fields (decode_method,
scope_recent, scope_window, spark_ratio, spark_recovery, recall) through the real
clients: the openai package over HTTP and grpcio over gRPC give the tokens
`entrokv generate` gives with the same flags, the KV held drops, bad values
are refused with the protocol's error, and /metrics counts the bytes each
mechanism freed."""
import json
import subprocess

import grpc
import openai
import pytest

from conftest import BIN, MODEL, SLOW, Server

# long enough that the compressed prompt frees whole blocks: on a prompt of a
# few tokens SparK's packed rows plus the decode tokens' fresh block hold
# more than full KV's one shared block (docs/COMPRESSION.md)
PROMPT = open("/usr/share/common-licenses/MPL-2.0").read()[:1200]
FIELDS = [
    ({"decode_method": "scope-slide", "scope_recent": 4, "scope_window": 12},
     ["--decode-method", "scope-slide", "--scope-recent", "4", "--scope-window", "12"]),
    ({"decode_method": "scope-discontinuous", "scope_recent": 4, "scope_window": 10,
      "kv_method": "snapkv", "kv_budget": 0.5},
     ["--decode-method", "scope-discontinuous", "--scope-recent", "4", "--scope-window", "10",
      "--kv-method", "snapkv", "--kv-budget", "0.5"]),
    ({"spark_ratio": 0.5}, ["--spark-ratio", "0.5"]),
    ({"spark_ratio": 0.8, "spark_recovery": "zero", "kv_method": "snapkv", "kv_budget": 0.5},
     ["--spark-ratio", "0.8", "--spark-recovery", "zero", "--kv-method", "snapkv",
      "--kv-budget", "0.5"]),
    # recall: token recall by default (K = 2 on both sides), K = 4, whole
    # blocks (recall_gather 0) alone and with recall_every / recall_promote
    ({"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2},
     ["--kv-method", "snapkv", "--kv-budget", "0.5", "--recall", "2"]),
    ({"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 4},
     ["--kv-method", "snapkv", "--kv-budget", "0.5", "--recall", "2", "--recall-gather", "4"]),
    ({"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 0},
     ["--kv-method", "snapkv", "--kv-budget", "0.5", "--recall", "2", "--recall-gather", "0"]),
    ({"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 0,
      "recall_every": 64},
     ["--kv-method", "snapkv", "--kv-budget", "0.5", "--recall", "2", "--recall-gather", "0",
      "--recall-every", "64"]),
    ({"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 0,
      "recall_promote": False},
     ["--kv-method", "snapkv", "--kv-budget", "0.5", "--recall", "2", "--recall-gather", "0",
      "--recall-promote", "0"]),
]


@pytest.fixture(scope="module")
def server():
    s = Server("--ctx", "512", "--kv-tokens", "4096", "--max-running", "8", "--kvstore-mb", "0")
    yield s
    assert s.stop() == 0, s.stderr()[-4000:]


def cli_ids(flags):
    out = subprocess.run([BIN, "generate", "--model", MODEL, "--prompt", PROMPT, "--max-tokens",
                          "40", "--ignore-eos", "--json", "--threads", "2", *flags],
                         capture_output=True, text=True, timeout=300 * (4 if SLOW else 1),
                         check=True)
    return json.loads(out.stdout)


def grpc_run(pb, server, **body):
    """The PROMPT's 40 greedy tokens over gRPC: (token ids, the last usage)."""
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    req = pb["entrokv_pb2"].GenerateRequest(prompt=PROMPT, max_tokens=40, temperature=0,
                                            ignore_eos=True, **body)
    ids, last = [], None
    for msg in stub.Generate(req, timeout=120 * (4 if SLOW else 1)):
        ids += list(msg.token_ids)
        last = msg
    return ids, last.usage


@pytest.mark.parametrize("body,flags", FIELDS)
def test_fields_over_http_and_grpc_equal_generate(server, pb, body, flags):
    ref = cli_ids(flags)
    c = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                      timeout=120 * (4 if SLOW else 1))
    r = c.completions.create(model="entrokv", prompt=PROMPT, max_tokens=40, temperature=0,
                             extra_body={"ignore_eos": True, **body})
    assert r.choices[0].text == ref["text"]
    assert r.usage.completion_tokens == 40
    ids, usage = grpc_run(pb, server, **body)
    assert ids == ref["token_ids"]
    assert usage.kv_bytes == ref["kv_bytes"]
    assert usage.kv_bytes < usage.kv_bytes_full


BAD = [
    {"decode_method": "scope"},
    {"decode_method": "scope-slide", "scope_recent": 12, "scope_window": 4},
    {"spark_ratio": 1.0},
    {"spark_ratio": -0.5},
    {"spark_recovery": "mean", "spark_ratio": 0.5},
    {"recall": -1},
    {"recall": 1025},
    {"recall": 8, "kv_method": "snapkv", "kv_budget": 0.2},  # 128 tokens: no resident left
    {"recall_every": -1, "recall": 2, "kv_method": "snapkv", "kv_budget": 0.5},
    {"recall_every": 65, "recall": 2, "kv_method": "snapkv", "kv_budget": 0.5},
    {"recall_gather": -1, "recall": 2, "kv_method": "snapkv", "kv_budget": 0.5},
    {"recall_gather": 9, "recall": 2, "kv_method": "snapkv", "kv_budget": 0.5},
]


@pytest.mark.parametrize("body", BAD)
def test_bad_values_are_refused(server, pb, body):
    c = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="entrokv", prompt=PROMPT, max_tokens=4, extra_body=body)
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb["entrokv_pb2"].GenerateRequest(prompt=PROMPT, max_tokens=4,
                                                             **body), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("body", [{"recall": 1.5}, {"recall": 2, "recall_every": 2.5},
                                  {"recall": 2, "recall_promote": "yes"},
                                  {"recall": 2, "recall_promote": 1},
                                  {"recall": 2, "recall_gather": 1.5},
                                  {"recall": 2, "recall_gather": "2"}])
def test_fractional_or_mistyped_recall_fields_are_refused_over_http(server, body):
    # gRPC's int32 and bool fields cannot carry these; JSON can
    c = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="entrokv", prompt=PROMPT, max_tokens=4,
                             extra_body={"kv_method": "snapkv", "kv_budget": 0.5, **body})


def test_recall_fields_move_the_servers_counters(server, pb):
    """What makes the FIELDS rows for recall_gather, recall_every and
    recall_promote able to fail without relying on token differences: each
    field, over both protocols (and /v1/chat/completions), moves the
    server's own recall counters as it should. Whole blocks with promotion
    promote; without promotion, or with token recall (the default, which
    promotes nothing), nothing is promoted; ranking every 64 steps ranks
    less than every step. After each refused request the server keeps
    serving."""
    def counters():
        return (server.metric("entrokv_recall_promotions_total"),
                server.metric("entrokv_recall_rankings_total"))

    c = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                      timeout=120 * (4 if SLOW else 1))
    base = {"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2}

    def over_http(body):
        c.completions.create(model="entrokv", prompt=PROMPT, max_tokens=40, temperature=0,
                             extra_body={"ignore_eos": True, **base, **body})

    def over_grpc(body):
        grpc_run(pb, server, **base, **body)

    for send in (over_http, over_grpc):
        moved = {}
        for name, body in (("blocks", {"recall_gather": 0}),
                           ("every64", {"recall_gather": 0, "recall_every": 64}),
                           ("nopromote", {"recall_gather": 0, "recall_promote": False}),
                           ("tokens", {}), ("tokens4", {"recall_gather": 4})):
            c0 = counters()
            send(body)
            c1 = counters()
            moved[name] = (c1[0] - c0[0], c1[1] - c0[1])
        assert moved["blocks"][0] > 0 and moved["blocks"][1] > 0, (send, moved)
        assert 0 < moved["every64"][1] < moved["blocks"][1], (send, moved)
        assert moved["nopromote"][0] == 0, (send, moved)
        assert moved["tokens"][0] == 0 and moved["tokens4"][0] == 0, (send, moved)
        assert moved["tokens"][1] > 0 and moved["tokens4"][1] > 0, (send, moved)

    def chat(body):  # /v1/chat/completions reads the same fields
        c.chat.completions.create(model="entrokv", messages=[{"role": "user", "content": PROMPT}],
                                  max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, **base, **body})

    c0 = counters()
    chat({"recall_gather": 0})
    c1 = counters()
    chat({})
    c2 = counters()
    assert c1[0] > c0[0] and c2[0] == c1[0] and c2[1] > c1[1], (c0, c1, c2)
    with pytest.raises(openai.BadRequestError) as e:
        chat({"recall_gather": -1})
    assert "recall_gather" in str(e.value)
    # an out-of-range K is refused with a message naming the field; the
    # server goes on serving
    with pytest.raises(openai.BadRequestError) as e:
        over_http({"recall_gather": 9})
    assert "recall_gather" in str(e.value)
    with pytest.raises(grpc.RpcError) as g:
        over_grpc({"recall_gather": 9})
    assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recall_gather" in g.value.details()
    c0 = counters()
    over_grpc({})
    assert counters()[1] > c0[1]


def test_metrics_count_bytes_per_mechanism(server):
    # runs after the requests above (module order): each mechanism freed some
    for mech in ("tokens", "channels", "decode"):
        name = f'entrokv_kv_bytes_saved_by_mechanism_total{{mechanism="{mech}"}}'
        assert server.metric(name) > 0, mech


def test_server_default_kv_policy_applies_to_requests_that_name_none(pb):
    """--kv-method/--kv-budget set what a request without kv_method gets (the
    chart's serving.kv values reach the binary this way); a request that names
    a method still overrides it, over both protocols."""
    ref = cli_ids(["--kv-method", "snapkv", "--kv-budget", "0.25"])
    s = Server("--ctx", "512", "--kv-tokens", "4096", "--kvstore-mb", "0",
               "--kv-method", "snapkv", "--kv-budget", "0.25")
    try:
        ids, usage = grpc_run(pb, s)
        assert ids == ref["token_ids"] and usage.kv_bytes == ref["kv_bytes"]
        assert usage.kv_bytes < usage.kv_bytes_full
        _, full = grpc_run(pb, s, kv_method="full")
        assert full.kv_bytes == full.kv_bytes_full
        c = openai.OpenAI(base_url=s.http + "/v1", api_key="unused", max_retries=0,
                          timeout=120 * (4 if SLOW else 1))
        r = c.completions.create(model="entrokv", prompt=PROMPT, max_tokens=40, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref["text"]
    finally:
        assert s.stop() == 0, s.stderr()[-4000:]


@pytest.mark.parametrize("flags", [["--kv-method", "snapk"], ["--kv-budget", "0"],
                                   ["--kv-method", "uncomp", "--kv-budget", "-1"]])
def test_bad_server_default_kv_policy_exits_2(flags):
    p = subprocess.run([BIN, "serve", "--model", MODEL, "--http-port", "0", "--grpc-port", "0",
                        *flags], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "--kv-" in p.stderr
