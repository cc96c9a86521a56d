"""choices.py - n > 1 choices and best_of (issue 23) with the official
`openai` client and grpcio, against `entrokv serve` and through the
coordinator -> worker split.

What the engine defines (docs/serving.md, "n"): choice i samples with seed
+ i from the one prefilled, compressed prompt, so each choice equals a solo
request with seed + i, and greedy choices are all the solo greedy text. The
prompt's KV blocks are shared: /metrics shows shared blocks while the
choices run, copy-on-write copies after, and a peak pool use well below n
times the solo request's. best_of returns the n of best_of candidates with
the highest cumulative logprob, checked against solo requests' logprobs.
"""
import collections
import threading
import time

import grpc
import openai
import pytest

from conftest import SLOW, Server
from test_serve import wait_for

TIMEOUT = 120 * (4 if SLOW else 1)
PROMPT = "Once upon a time, in a small village by the sea, there lived"
# a long prompt (about 300 tokens): its blocks dominate the pool, so sharing shows
LONG = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(25))


@pytest.fixture(scope="module")
def server():
    s = Server("--ctx", "1024", "--kv-tokens", "16384", "--max-running", "32")
    yield s
    rc = s.stop()
    assert rc == 0, f"serve exited {rc}:\n{s.stderr()[-4000:]}"


@pytest.fixture(scope="module")
def split(server):
    w = Server("--ctx", "1024", "--kv-tokens", "16384", "--max-running", "32", cmd="worker")
    c = Server("--ctx", "1024", "--workers", f"127.0.0.1:{w.grpc_port}", cmd="coordinator")
    wait_for(lambda: " healthy" in c.stderr(), what="the worker healthy")
    yield c, w
    codes = [c.stop(), w.stop()]
    assert codes == [0, 0], (codes, c.stderr()[-3000:])


def oai(server):
    return openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                         timeout=TIMEOUT)


def solo(server, seed, **kw):
    return oai(server).completions.create(model="m", prompt=PROMPT, seed=seed, **kw).choices[0]


def by_index(choices):
    assert sorted(c.index for c in choices) == list(range(len(choices)))
    return sorted(choices, key=lambda c: c.index)


SAMPLED = dict(max_tokens=4 if SLOW else 24, temperature=0.9, top_p=0.95)


def test_each_seeded_choice_equals_a_solo_request_with_seed_plus_i(server):
    r = oai(server).completions.create(model="m", prompt=PROMPT, n=3, seed=1234, **SAMPLED)
    got = by_index(r.choices)
    solos = [oai(server).completions.create(model="m", prompt=PROMPT, seed=1234 + i, **SAMPLED)
             for i in range(3)]
    for i in range(3):
        assert got[i].text == solos[i].choices[0].text, i
        assert got[i].finish_reason == solos[i].choices[0].finish_reason
    assert len({c.text for c in got}) > 1, "three seeds should not all draw the same text"
    # usage: the prompt once, the completion tokens of every choice
    assert r.usage.prompt_tokens == solos[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in solos)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_choices_are_all_the_solo_greedy_text(server):
    msgs = [{"role": "user", "content": "Name three colours."}]
    c = oai(server).chat.completions
    r = c.create(model="m", messages=msgs, n=3, max_tokens=16, temperature=0)
    one = c.create(model="m", messages=msgs, max_tokens=16, temperature=0).choices[0]
    got = by_index(r.choices)
    assert [g.message.content for g in got] == [one.message.content] * 3
    assert all(g.finish_reason == one.finish_reason for g in got)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_choices_reassemble_to_the_whole_response(server, chat):
    kw = dict(model="m", n=3, seed=77, stream_options={"include_usage": True}, **SAMPLED)
    c = oai(server)
    if chat:
        kw["messages"] = [{"role": "user", "content": PROMPT}]
        whole = c.chat.completions.create(**{k: v for k, v in kw.items()
                                             if k != "stream_options"})
        stream = c.chat.completions.create(stream=True, **kw)
    else:
        kw["prompt"] = PROMPT
        whole = c.completions.create(**{k: v for k, v in kw.items() if k != "stream_options"})
        stream = c.completions.create(stream=True, **kw)
    text, finish, usage = collections.defaultdict(str), {}, []
    for ch in stream:
        if ch.usage:
            usage.append(ch.usage)
            assert not ch.choices
            continue
        assert len(ch.choices) == 1  # one choice per chunk, tagged with its index
        x = ch.choices[0]
        assert x.index not in finish, "a chunk after the choice's finish"
        text[x.index] += (x.delta.content or "") if chat else x.text
        if x.finish_reason:
            finish[x.index] = x.finish_reason
    got = by_index(whole.choices)
    assert sorted(text) == sorted(finish) == [0, 1, 2]
    for i in range(3):
        assert text[i] == (got[i].message.content if chat else got[i].text)
        assert finish[i] == got[i].finish_reason
    assert len(usage) == 1, "one usage chunk, at the end"
    assert usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens == whole.usage.prompt_tokens


def watch_metrics(server, stop, seen):
    while not stop.is_set():
        for name in ("entrokv_kv_blocks_shared", "entrokv_kv_blocks_used"):
            seen[name] = max(seen.get(name, 0), server.metric(name))
        time.sleep(0.02)


def peak_while(server, fn):
    stop, seen = threading.Event(), {}
    t = threading.Thread(target=watch_metrics, args=(server, stop, seen))
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return seen


def test_the_prompt_kv_blocks_are_shared_between_choices(server):
    c = oai(server).completions
    kw = dict(model="m", prompt=LONG, max_tokens=48, temperature=0.8, seed=5,
              extra_body={"ignore_eos": True})
    wait_for(lambda: server.metric("entrokv_kv_blocks_used") == 0, what="an idle pool")
    cow0 = server.metric("entrokv_kv_cow_copies_total")
    solo_peak = peak_while(server, lambda: c.create(**kw))
    r = None

    def run():
        nonlocal r
        r = c.create(n=3, **kw)
    n_peak = peak_while(server, run)
    assert len(r.choices) == 3 and r.usage.prompt_tokens > 250
    assert n_peak["entrokv_kv_blocks_shared"] > 0, n_peak
    assert server.metric("entrokv_kv_cow_copies_total") > cow0
    # three private copies would hold 3x the solo request's blocks
    assert n_peak["entrokv_kv_blocks_used"] < 2 * solo_peak["entrokv_kv_blocks_used"], \
        (n_peak, solo_peak)
    wait_for(lambda: server.metric("entrokv_kv_blocks_shared") == 0, what="shared blocks freed")


def grpc_choices(server, pb, **kw):
    """{index: (text, ids, last message)} of a gRPC Generate with n."""
    text, ids, last = collections.defaultdict(str), collections.defaultdict(list), {}
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    for m in stub.Generate(pb["entrokv_pb2"].GenerateRequest(**kw), timeout=TIMEOUT):
        assert m.index not in last, "a message after the choice's finish"
        text[m.index] += m.text
        ids[m.index] += list(m.token_ids)
        if m.finish_reason:
            last[m.index] = m
    return {i: (text[i], ids[i], last.get(i)) for i in set(text) | set(last)}


def test_grpc_n_equals_the_http_choices(server, pb):
    g = grpc_choices(server, pb, prompt=PROMPT, n=3, seed=99, max_tokens=SAMPLED["max_tokens"],
                     temperature=0.9, top_p=0.95)
    r = oai(server).completions.create(model="m", prompt=PROMPT, n=3, seed=99, **SAMPLED)
    assert sorted(g) == [0, 1, 2]
    for c in r.choices:
        text, ids, last = g[c.index]
        assert text == c.text and last.finish_reason == c.finish_reason
        assert last.usage.completion_tokens == len(ids)


@pytest.mark.parametrize("n", [-1, 17])
def test_grpc_n_out_of_range_is_invalid_argument(server, pb, n):
    with pytest.raises(grpc.RpcError) as e:
        grpc_choices(server, pb, prompt=PROMPT, n=n, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be" in e.value.details()


def test_n_through_the_coordinator_equals_local(server, split, pb):
    coord, worker = split
    stats = pb["entrokv_pb2_grpc"].WorkerStub(worker.channel)
    cow0 = stats.Stats(pb["entrokv_pb2"].StatsRequest(), timeout=30).kv_cow_copies
    kw = dict(model="m", prompt=PROMPT, n=3, seed=4321, **SAMPLED)
    local = by_index(oai(server).completions.create(**kw).choices)
    remote = oai(coord).completions.create(**kw)
    assert [c.text for c in by_index(remote.choices)] == [c.text for c in local]
    assert [c.finish_reason for c in by_index(remote.choices)] == \
        [c.finish_reason for c in local]
    # the worker forked them (one request carrying n, not n requests)
    assert stats.Stats(pb["entrokv_pb2"].StatsRequest(), timeout=30).kv_cow_copies > cow0
    # and streamed over gRPC through the coordinator, each choice tagged
    g = grpc_choices(coord, pb, prompt=PROMPT, n=3, seed=4321, max_tokens=SAMPLED["max_tokens"],
                     temperature=0.9, top_p=0.95)
    assert [g[i][0] for i in range(3)] == [c.text for c in local]


def test_best_of_returns_the_n_with_the_highest_cumulative_logprob(server):
    kw = dict(max_tokens=12, temperature=1.0)
    r = oai(server).completions.create(model="m", prompt=PROMPT, n=2, best_of=4, seed=11, **kw)
    cands = [solo(server, 11 + i, logprobs=0, **kw) for i in range(4)]
    score = [sum(c.logprobs.token_logprobs) for c in cands]
    order = sorted(range(4), key=lambda i: (-score[i], i))
    assert len(set(score)) == 4, "distinct candidates expected"
    got = by_index(r.choices)
    assert [c.text for c in got] == [cands[i].text for i in order[:2]], (score, order)
    assert all(c.logprobs is None for c in got)  # not asked for: not shown
    # usage counts every candidate, as OpenAI bills best_of
    assert r.usage.completion_tokens == sum(
        oai(server).completions.create(model="m", prompt=PROMPT, seed=11 + i, **kw)
        .usage.completion_tokens for i in range(4))
