"""openai_api.py - OpenAI API parity (issue 23) with the official
`openai` client and grpcio: log-probabilities (chat, completions, gRPC;
streamed and not), echo with prompt log-probabilities and max_tokens 0,
presence/frequency penalties and logit_bias, and every unsupported field
refused with a 400 (HTTP) or INVALID_ARGUMENT (gRPC) naming it.

The reference for every log-probability is tests/serve/logits_ref.c: the raw
logits of each row straight from model_forward, none of the serving path in
between; the log-softmax, temperature and penalties are applied here, in
float64, from their definitions (docs/serving.md).
"""
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import grpc
import numpy as np
import openai
import pytest

from conftest import BIN, MODEL, SLOW

LOGITS_REF = os.environ.get("EKV_LOGITS_REF",
                            os.path.join(os.path.dirname(BIN), "tests", "logits_ref"))
TOL = 2e-4  # float32 logits, log-softmax in float32 vs float64 here
PROMPT = "The capital of France is Paris. The capital of Italy is"


def ref_logits(seqs):
    """Raw logits for each sequence of ids: a list of (len, n_vocab) arrays."""
    assert os.path.exists(LOGITS_REF), f"no logits_ref at {LOGITS_REF} (set EKV_LOGITS_REF)"
    with tempfile.NamedTemporaryFile(suffix=".bin") as out:
        r = subprocess.run([LOGITS_REF, MODEL, out.name], capture_output=True, text=True,
                           input="".join(" ".join(map(str, s)) + "\n" for s in seqs),
                           timeout=300 if SLOW else 120)
        assert r.returncode == 0, r.stderr
        n_vocab = int(r.stdout.split()[-1])
        flat = np.fromfile(out.name, dtype=np.float32).reshape(-1, n_vocab)
    res, at = [], 0
    for s in seqs:
        res.append(flat[at:at + len(s)].astype(np.float64))
        at += len(s)
    return res


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def oai(server):
    return openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                         timeout=120 * (4 if SLOW else 1))


def stub(server, pb):
    return pb["entrokv_pb2_grpc"].GenerationStub(server.channel)


def grpc_run(server, pb, **kw):
    """(prompt entries, generated entries, generated ids, last message) of a Generate."""
    plp, lp, ids, last = [], [], [], None
    for m in stub(server, pb).Generate(pb["entrokv_pb2"].GenerateRequest(**kw),
                                       timeout=120 * (4 if SLOW else 1)):
        plp += list(m.prompt_logprobs)
        lp += list(m.logprobs)
        ids += list(m.token_ids)
        last = m
    return plp, lp, ids, last


def tokenize(server, pb, text=None, messages=None):
    e = pb["entrokv_pb2"]
    req = e.TokenizeRequest(text=text) if text is not None else e.TokenizeRequest(
        messages=[e.Message(**m) for m in messages])
    return list(stub(server, pb).Tokenize(req).token_ids)


def check_top(entries_values, ref_row, k):
    """entries_values: [(token_id, logprob)] best first, against one reference row."""
    assert len(entries_values) == k
    vals = [v for _, v in entries_values]
    assert vals == sorted(vals, reverse=True), "top log-probabilities must be best first"
    for tid, v in entries_values:
        assert abs(v - ref_row[tid]) < TOL
    # the k best of the reference (up to ties within the tolerance)
    assert min(vals) >= np.sort(ref_row)[-k] - TOL


# ---------------------------------------------------------------- log-probabilities

def test_grpc_and_completions_logprobs_equal_reference(server, pb):
    """Greedy (temperature 0): log-softmax of the raw logits at temperature 1
    for the prompt (echo) and every generated token; HTTP equals gRPC."""
    prompt_ids = tokenize(server, pb, PROMPT)
    plp, lp, gen, last = grpc_run(server, pb, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=5, prompt_logprobs=True)
    assert [e.token_id for e in plp] == prompt_ids
    assert [e.token_id for e in lp][:len(gen)] == gen and len(gen) == last.usage.completion_tokens > 0
    assert len(lp) in (len(gen), len(gen) + 1)  # + an end-of-generation token's
    gen = [e.token_id for e in lp]
    ref = log_softmax(ref_logits([prompt_ids + gen])[0])
    assert plp[0].WhichOneof("has_logprob") is None and not plp[0].top_logprobs
    for i in range(1, len(prompt_ids)):
        assert abs(plp[i].logprob - ref[i - 1][prompt_ids[i]]) < TOL, i
        check_top([(t.token_id, t.logprob) for t in plp[i].top_logprobs], ref[i - 1], 5)
    n = len(prompt_ids)
    for j, e in enumerate(lp):
        row = ref[n - 1 + j]
        assert abs(e.logprob - row[gen[j]]) < TOL
        assert gen[j] == int(np.argmax(row)) or row[gen[j]] >= row.max() - TOL  # greedy
        check_top([(t.token_id, t.logprob) for t in e.top_logprobs], row, 5)

    c = oai(server)
    r = c.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0,
                             logprobs=5, echo=True)
    ch = r.choices[0]
    assert ch.text.startswith(PROMPT) and len(ch.text) > len(PROMPT)
    got = ch.logprobs.token_logprobs
    assert len(got) == n + len(gen) and got[0] is None and ch.logprobs.top_logprobs[0] is None
    want = [e.logprob for e in plp[1:]] + [e.logprob for e in lp]
    assert np.allclose(got[1:], want, atol=1e-6)
    assert "".join(ch.logprobs.tokens[:n + last.usage.completion_tokens]) == ch.text
    assert ch.logprobs.text_offset[0] == 0 and ch.logprobs.text_offset[1] == len(
        ch.logprobs.tokens[0])
    for top, v in zip(ch.logprobs.top_logprobs[1:], got[1:]):
        assert 5 <= len(top) <= 6 and v in top.values()

    # streamed: the same entries, in order
    toks, vals, text = [], [], ""
    for chunk in c.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0,
                                      logprobs=5, echo=True, stream=True):
        if not chunk.choices:
            continue
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs:
            toks += chunk.choices[0].logprobs.tokens
            vals += chunk.choices[0].logprobs.token_logprobs
    assert text == ch.text and toks == ch.logprobs.tokens
    assert vals[0] is None and np.allclose(vals[1:], got[1:], atol=1e-6)


def test_chat_logprobs_top20_streamed_and_not(server, pb):
    msgs = [{"role": "user", "content": "Name three colours."}]
    prompt_ids = tokenize(server, pb, messages=msgs)
    e = pb["entrokv_pb2"]
    _, lp, gen, _ = grpc_run(server, pb, messages=[e.Message(**m) for m in msgs],
                             max_tokens=8, temperature=0, logprobs=True, top_logprobs=20)
    gen = [x.token_id for x in lp]  # with an end-of-generation token's entry, if one ended it
    ref = log_softmax(ref_logits([prompt_ids + gen])[0])
    c = oai(server)
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0,
                                  logprobs=True, top_logprobs=20)
    content = r.choices[0].logprobs.content
    # an end-of-generation token that ends the answer has an entry, but no text
    assert len(content) == len(gen) and r.usage.completion_tokens in (len(gen), len(gen) - 1)
    n_text = r.usage.completion_tokens
    assert "".join(x.token for x in content[:n_text]) == r.choices[0].message.content
    for j, x in enumerate(content):
        row = ref[len(prompt_ids) - 1 + j]
        assert abs(x.logprob - row[gen[j]]) < TOL
        assert bytes(x.bytes).decode("utf-8", "replace") == x.token
        tops = x.top_logprobs
        assert len(tops) == 20
        vals = [t.logprob for t in tops]
        assert vals == sorted(vals, reverse=True) and abs(vals[0] - row.max()) < TOL
        assert min(vals) >= np.sort(row)[-20] - TOL
    streamed = []
    for chunk in c.chat.completions.create(model="m", messages=msgs, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=20,
                                           stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [x.token for x in streamed] == [x.token for x in content]
    assert np.allclose([x.logprob for x in streamed], [x.logprob for x in content], atol=1e-6)
    # logprobs off: none in the response
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None


def test_sampled_logprobs_are_of_the_tempered_distribution(server, pb):
    """Temperature 0.7 with a seed: log-softmax(logits / 0.7) of each drawn token."""
    prompt_ids = tokenize(server, pb, PROMPT)
    _, lp, gen, _ = grpc_run(server, pb, prompt=PROMPT, max_tokens=8, temperature=0.7, seed=5,
                             logprobs=True, top_logprobs=3)
    gen = [e.token_id for e in lp]
    raw = ref_logits([prompt_ids + gen])[0]
    ref = log_softmax(raw / 0.7)
    for j, e in enumerate(lp):
        assert abs(e.logprob - ref[len(prompt_ids) - 1 + j][gen[j]]) < TOL


def test_echo_with_max_tokens_zero_scores_the_prompt(server, pb):
    prompt_ids = tokenize(server, pb, PROMPT)
    ref = log_softmax(ref_logits([prompt_ids])[0])
    c = oai(server)
    r = c.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    ch = r.choices[0]
    assert ch.text == PROMPT and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(prompt_ids)
    lp = ch.logprobs.token_logprobs
    assert len(lp) == len(prompt_ids) and lp[0] is None
    assert np.allclose(lp[1:], [ref[i - 1][prompt_ids[i]] for i in range(1, len(prompt_ids))],
                       atol=TOL)
    # logprobs 0: each top dict holds the chosen token only (OpenAI: up to logprobs + 1)
    assert all(len(t) == 1 for t in ch.logprobs.top_logprobs[1:])
    # a prompt of token ids, as lm-evaluation-harness sends it
    r = c.completions.create(model="m", prompt=[prompt_ids], max_tokens=0, echo=True,
                             logprobs=1)
    assert np.allclose(r.choices[0].logprobs.token_logprobs[1:], lp[1:], atol=1e-6)
    # echo without logprobs
    r = c.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPT and r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="m", prompt=PROMPT, max_tokens=0)


# ---------------------------------------------------------------- penalties and bias

def test_penalties_and_logit_bias_match_the_definition(server, pb):
    """Greedy with presence/frequency penalties: at every step the chosen
    token is the argmax of raw - count * frequency - (count > 0) * presence
    (counts over the generated tokens only), and its reported log-probability
    is the log-softmax of those processed logits."""
    prompt = "1, 2, 1, 2, 1, 2, 1, 2, 1, 2,"
    prompt_ids = tokenize(server, pb, prompt)
    c = oai(server)
    plain = c.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
    changed = 0
    for pres, freq in ((0.0, 1.5), (1.8, 0.0), (0.7, 0.9), (-0.5, -0.5)):
        _, lp, gen, _ = grpc_run(server, pb, prompt=prompt, max_tokens=12, temperature=0,
                                 presence_penalty=pres, frequency_penalty=freq, logprobs=True)
        raw = ref_logits([prompt_ids + gen])[0]
        counts = np.zeros(raw.shape[1])
        for j, tok in enumerate(gen):
            x = raw[len(prompt_ids) - 1 + j] - counts * freq - (counts > 0) * pres
            assert x[tok] >= x.max() - 1e-4, (pres, freq, j)
            assert abs(lp[j].logprob - log_softmax(x)[tok]) < TOL
            counts[tok] += 1
        r = c.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0,
                                 presence_penalty=pres, frequency_penalty=freq)
        assert r.usage.completion_tokens == len(gen)
        changed += r.choices[0].text != plain.choices[0].text
    assert changed > 0, "the penalties should change this repetitive continuation"

    # logit_bias: -100 bans the greedy first token; +100 forces a token
    _, _, gen, _ = grpc_run(server, pb, prompt=prompt, max_tokens=3, temperature=0)
    first = c.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0,
                                 logprobs=0).choices[0].logprobs.tokens[0]
    r = c.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=0,
                             logit_bias={str(gen[0]): -100}, logprobs=1)
    assert r.choices[0].logprobs.tokens[0] != first
    _, _, banned, _ = grpc_run(server, pb, prompt=prompt, max_tokens=3, temperature=0,
                               logit_bias=[pb["entrokv_pb2"].LogitBias(token_id=gen[0],
                                                                       bias=-100)])
    assert banned[0] != gen[0]
    forced = tokenize(server, pb, " banana")[0]
    r = c.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=0.9, seed=1,
                             logit_bias={str(forced): 100}, logprobs=0)
    toks = r.choices[0].logprobs.tokens
    assert len(toks) == 3 and len(set(toks)) == 1 and r.choices[0].text == toks[0] * 3
    assert all(v > -1e-3 for v in r.choices[0].logprobs.token_logprobs)
    # user is accepted and changes nothing
    a = c.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, user="u1")
    assert a.choices[0].text == plain.choices[0].text[:len(a.choices[0].text)]


def test_max_completion_tokens_null_keeps_max_tokens(server):
    r = oai(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=3,
        temperature=0, extra_body={"max_completion_tokens": None, "ignore_eos": True})
    assert r.usage.completion_tokens == 3


# ---------------------------------------------------------------- nothing ignored

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMP = {"prompt": "Hi", "max_tokens": 2}
REFUSED = [
    ("completions", COMP, "suffix", " end"),
    ("completions", COMP, "best_of", 17),            # above the limit (docs/serving.md)
    ("completions", dict(COMP, n=3), "best_of", 2),  # fewer than n
    ("completions", dict(COMP, stream=True), "best_of", 2),  # with stream, as OpenAI
    ("completions", COMP, "n", 0),
    ("completions", COMP, "n", 17),
    ("completions", COMP, "top_logprobs", 2),
    ("completions", COMP, "metadata", {"a": "b"}),
    ("completions", COMP, "x_not_an_openai_field", 1),
    # structured output is honoured (structured.py); what a schema may not say is refused
    ("chat/completions", CHAT, "response_format", {"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "pattern": "^a"}}}),
    ("chat/completions", CHAT, "response_format", {"type": "yaml"}),
    ("chat/completions", CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat/completions", CHAT, "tool_choice", "auto"),
    ("chat/completions", CHAT, "parallel_tool_calls", True),
    ("chat/completions", CHAT, "functions", [{"name": "f"}]),
    ("chat/completions", CHAT, "function_call", "auto"),
    ("chat/completions", CHAT, "echo", True),
    ("chat/completions", CHAT, "store", True),
    ("chat/completions", CHAT, "metadata", {"a": "b"}),
    ("chat/completions", CHAT, "modalities", ["text"]),
    ("chat/completions", CHAT, "audio", {"voice": "x"}),
    ("chat/completions", CHAT, "prediction", {"type": "content", "content": "x"}),
    ("chat/completions", CHAT, "reasoning_effort", "low"),
    ("chat/completions", CHAT, "service_tier", "auto"),
    ("chat/completions", CHAT, "web_search_options", {}),
    ("chat/completions", CHAT, "n", 17),
    ("chat/completions", CHAT, "best_of", 2),        # a completions field
    ("chat/completions", CHAT, "top_logprobs", 3),   # without logprobs: true
    ("chat/completions", dict(CHAT, stream=True), "stream_options", {"include_obfuscation": True}),
]


def post(server, path, body):
    req = urllib.request.Request(server.http + "/v1/" + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path,base,field,value", REFUSED,
                         ids=[f"{p.split('/')[0]}-{f}-{json.dumps(v)[:20]}"
                              for p, _, f, v in REFUSED])
def test_unsupported_field_is_refused_naming_it(server, path, base, field, value):
    body = dict(base, **{field: value})
    code, resp = post(server, path, body)
    assert code == 400, resp
    err = resp["error"]
    assert err["type"] == "invalid_request_error" and field in err["message"], err
    if field == "stream_options":
        assert "include_obfuscation" in err["message"]


def test_refused_through_the_openai_client(server):
    c = oai(server)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"type": "integer",
                                                              "minimum": 0}}})
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2,
                                  tools=[{"type": "function",
                                          "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].name"):
        c.chat.completions.create(model="m", max_tokens=2,
                                  messages=[{"role": "user", "content": "x", "name": "bob"}])
    # the accepted forms of the same fields go through
    r = c.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2,
                                  response_format={"type": "text"}, tool_choice="none",
                                  user="someone", logit_bias={}, presence_penalty=0,
                                  frequency_penalty=0, seed=1)
    assert r.usage.completion_tokens >= 1


def test_grpc_unknown_field_is_invalid_argument(server, pb):
    """A GenerateRequest with a field this server does not know (number 99,
    as a newer client would send it) is refused, not run without it."""
    e = pb["entrokv_pb2"]
    body = e.GenerateRequest(prompt="Hello", max_tokens=2).SerializeToString()
    call = server.channel.unary_stream("/entrokv.v1.Generation/Generate",
                                       response_deserializer=e.GenerateResponse.FromString)
    ok = list(call(body, timeout=60))
    assert ok and ok[-1].finish_reason
    unknown = bytes([0x98, 0x06, 0x01])  # field 99, varint 1
    with pytest.raises(grpc.RpcError) as ei:
        list(call(body + unknown, timeout=60))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in ei.value.details()
    msg_unknown = bytes([0x12, 0x09]) + bytes([0x0a, 0x04]) + b"user" + bytes([0x98, 0x06, 0x01])
    with pytest.raises(grpc.RpcError) as ei:
        list(call(msg_unknown + bytes([0x18, 0x02]), timeout=60))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Message" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        list(stub(server, pb).Generate(e.GenerateRequest(prompt="Hi", max_tokens=2, logprobs=True,
                                                         top_logprobs=21), timeout=60))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
