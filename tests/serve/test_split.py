"""test_split.py - the coordinator/worker split: `entrokv coordinator`
routing to `entrokv worker` processes over the internal Worker gRPC
service gives the same tokens as a worker serving the request itself,
spreads load over workers, passes cancellation and refusals through, and
shuts down cleanly.
"""
import concurrent.futures as cf
import json
import time
import urllib.error

import grpc
import pytest

from conftest import SLOW, Server
from test_serve import PROMPTS, gen_request, generation, run_stream, wait_for


def worker_stats(w, pb):
    stub = pb["entrokv_pb2_grpc"].WorkerStub(w.channel)
    return stub.Stats(pb["entrokv_pb2"].StatsRequest(), timeout=30)


def worker_idle(w, pb):
    s = worker_stats(w, pb)
    return s.running == 0 and s.queued == 0 and s.kv_blocks_free == s.kv_blocks_total


@pytest.fixture(scope="module")
def split():
    workers = [Server("--ctx", "512", "--max-running", "4", "--max-queued", "6", cmd="worker")
               for _ in range(2)]
    coord = Server("--ctx", "512", "--workers",
                   ",".join(f"127.0.0.1:{w.grpc_port}" for w in workers), cmd="coordinator")
    # it listens at once; the workers are routed to once their health check answers
    wait_for(lambda: coord.stderr().count(" healthy") == 2, what="both workers healthy")
    yield coord, workers
    codes = [coord.stop()] + [w.stop() for w in workers]
    assert codes == [0, 0, 0], (codes, coord.stderr()[-3000:])


def test_worker_stats_report_its_pool(split, pb):
    _, workers = split
    s = worker_stats(workers[0], pb)
    assert s.max_ctx == 512 and s.kv_blocks_total > 0 and s.kv_blocks_free == s.kv_blocks_total


def test_coordinator_output_equals_the_worker_serving_it_directly(split, pb):
    coord, workers = split
    for p in PROMPTS[:3]:
        req = gen_request(pb, p, max_tokens=16)
        text_c, ids_c, last_c, _ = run_stream(generation(coord, pb), req)
        text_w, ids_w, last_w, _ = run_stream(generation(workers[0], pb), req)
        assert ids_c == ids_w and text_c == text_w
        assert last_c.finish_reason == last_w.finish_reason
        assert last_c.usage.prompt_tokens == last_w.usage.prompt_tokens


def test_recall_fields_and_counters_pass_through_the_coordinator(split, pb):
    """recall_gather, recall_every and recall_promote reach a remote worker
    (remote.c forwards them): through the coordinator the workers' own
    counters (Worker Stats) move as each field says (whole blocks with
    promotion promote, without promotion or with token recall none; ranking
    every 64 steps ranks less than every step), and the coordinator's
    tokens equal the worker's own; the workers' recall counters reach the
    coordinator's /metrics."""
    coord, workers = split
    doc = open("/usr/share/common-licenses/MPL-2.0").read()[:1200]
    base = dict(max_tokens=40, ignore_eos=True, kv_method="snapkv", kv_budget=0.5, recall=2)

    def counters():
        st = [worker_stats(w, pb) for w in workers]
        return (sum(s.recall_promotions for s in st), sum(s.recall_rankings for s in st))

    moved = {}
    for name, extra in (("blocks", {"recall_gather": 0}),
                        ("every64", {"recall_gather": 0, "recall_every": 64}),
                        ("nopromote", {"recall_gather": 0, "recall_promote": False}),
                        ("tokens", {})):  # the default: token recall, K = 2
        req = gen_request(pb, doc, **base, **extra)
        c0 = counters()
        _, ids_c, _, _ = run_stream(generation(coord, pb), req)
        c1 = counters()
        moved[name] = (c1[0] - c0[0], c1[1] - c0[1])
        _, ids_w, _, _ = run_stream(generation(workers[0], pb), req)
        assert ids_c == ids_w, extra
    assert moved["blocks"][0] > 0 and moved["blocks"][1] > 0, moved
    assert 0 < moved["every64"][1] < moved["blocks"][1], moved
    assert moved["nopromote"][0] == 0 and moved["tokens"][0] == 0, moved
    assert moved["tokens"][1] > 0, moved
    stats = [worker_stats(w, pb) for w in workers]
    blocks = sum(s.recall_blocks for s in stats)
    promotions = sum(s.recall_promotions for s in stats)
    assert blocks > 0 and promotions > 0
    assert sum(s.recall_bytes for s in stats) == blocks * 4160  # SmolLM2: 64 x 16 x 2 x 2 + 64
    # the coordinator polls its workers' Stats
    wait_for(lambda: coord.metric("entrokv_recall_blocks_total") == blocks and
             coord.metric("entrokv_recall_promotions_total") == promotions,
             what="the workers' recall counters on the coordinator's /metrics")


def test_concurrent_streams_spread_over_workers_and_match_solo(split, pb):
    coord, workers = split
    stub = generation(coord, pb)
    reqs = [gen_request(pb, p, max_tokens=12, ignore_eos=True) for p in PROMPTS[:4]]
    solo = [run_stream(stub, r)[1] for r in reqs]
    steps0 = [worker_stats(w, pb).steps for w in workers]
    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda i: run_stream(stub, reqs[i % 4], timeout=300)[1], range(8)))
    assert got == [solo[i % 4] for i in range(8)]
    steps1 = [worker_stats(w, pb).steps for w in workers]
    assert all(b > a for a, b in zip(steps0, steps1)), "both workers should have run steps"


def test_cancel_through_coordinator_frees_worker_kv(split, pb):
    coord, workers = split
    call = generation(coord, pb).Generate(
        gen_request(pb, "Count to one thousand:", max_tokens=400, ignore_eos=True), timeout=300)
    for _ in range(3):
        next(call)
    call.cancel()
    wait_for(lambda: all(worker_idle(w, pb) for w in workers), what="worker KV to be freed")
    wait_for(lambda: coord.metric('entrokv_requests_total{status="cancelled"}') >= 1,
             what="the cancel to be counted")


def test_worker_refusal_reaches_the_client(split, pb):
    coord, _ = split
    stub = generation(coord, pb)
    req = gen_request(pb, "Count:", max_tokens=48, ignore_eos=True)

    def one(_):
        try:
            run_stream(stub, req, timeout=300)
            return "ok"
        except grpc.RpcError as e:
            assert e.details()
            return e.code().name

    with cf.ThreadPoolExecutor(24) as ex:
        codes = list(ex.map(one, range(24)))
    assert set(codes) <= {"ok", "RESOURCE_EXHAUSTED"}, codes
    assert "RESOURCE_EXHAUSTED" in codes and "ok" in codes, codes


def test_bad_request_is_refused_by_the_coordinator(split, pb):
    coord, _ = split
    with pytest.raises(grpc.RpcError) as ei:
        run_stream(generation(coord, pb), gen_request(pb, "", max_tokens=4))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_worker_rejects_bad_token_ids(split, pb):
    _, workers = split
    e = pb["entrokv_pb2"]
    stub = pb["entrokv_pb2_grpc"].WorkerStub(workers[0].channel)
    for ids in ([], [10 ** 8], [-1]):
        req = e.WorkerGenerateRequest(prompt_ids=ids, params=e.GenerateRequest(max_tokens=2))
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(req, timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_coordinator_without_its_worker_starts_unready_and_refuses_clearly(pb):
    c = Server("--workers", "127.0.0.1:1", cmd="coordinator")
    try:
        wait_for(lambda: "worker 127.0.0.1:1 unhealthy" in c.stderr(), what="the health check")
        with pytest.raises(urllib.error.HTTPError) as ei:
            c.get("/readyz")
        assert ei.value.code == 503
        assert json.loads(ei.value.read())["reason"] == "no healthy worker group"
        with pytest.raises(grpc.RpcError) as ei:
            run_stream(generation(c, pb), gen_request(pb, max_tokens=2), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy worker group" in ei.value.details()
    finally:
        assert c.stop() == 0, c.stderr()[-3000:]
