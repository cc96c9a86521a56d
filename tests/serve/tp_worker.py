"""tp_worker.py - tensor-parallel worker groups behind the coordinator
(issue 16, parts 4 and 6), with real processes and a grpcio client:

- `entrokv worker --tp 2` and `--tp 3` (ranks as threads) and
  `deploy/mpi/run.sh -np 2 -- entrokv worker` (one rank per process, the
  MPI backend) give a single-process worker's greedy tokens, with full KV
  and with SnapKV and UNComp at 10%, n = 2 choices, SCOPE and recall
  included; `-np 1` gives them bit for bit;
- a follower rank killed with SIGKILL or stopped with SIGSTOP while a stream
  runs on the group: the stream ends with UNAVAILABLE within the
  communicator's timeout (plus margin), the group's Health says NOT_SERVING
  and its Stats UNAVAILABLE, the coordinator logs it unhealthy, and requests
  through the coordinator keep succeeding on its other (single-process)
  group with that group's tokens;
- the KV store tier in a `--tp 2` group behind a coordinator, over an
  `entrokv kvstore` daemon: a second request with the first one's prompt
  restores its prefix on every rank (rank 0 logs each rank's restored
  tokens and the agreed length) and gives exactly `entrokv generate --tp 2`'s
  tokens (no tier), with full KV and with SnapKV at 25%; with the daemon
  killed every rank recomputes and the tokens stay the same. A rank whose
  shard alone is missing: kvstore.test_kvprefix_tp.

Tokens: the sharded forward sums in another order (docs/tp.md, "Numerics"),
so its greedy tokens equal the single-process worker's up to the first
step whose top-1/top-2 log-probability margin (the single worker's, from
top_logprobs) is below MARGIN; past it a flip is noise, not a bug. Against
`entrokv generate --tp 2` (the same sharding, rank 0 driving gen_run and
gen_follow instead of the step engine and its plans) the tokens are equal
in full: the plan carries the same rows, positions and compression.

Run by ctest as serve.test_tp_worker (pytest on this file).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import grpc
import pytest

from conftest import BIN, MODEL, ROOT, SLOW, Server
from test_serve import gen_request, generation, run_stream, wait_for

SCALE = 3 if SLOW else 1
TP_TIMEOUT_MS = 2000
# the comm timeout, a heartbeat, a loaded CI machine
FAIL_WITHIN_S = 15 * SCALE
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
N_TOK = 8


class MpiGroup:
    """`deploy/mpi/run.sh -np N -- entrokv worker ...`: rank 0 serves, the
    others follow; their stderr (through mpirun) in one file."""

    def __init__(self, n=2, *extra):
        self.log = tempfile.NamedTemporaryFile(prefix="entrokv-tp-mpi-", suffix=".log",
                                               delete=False)
        args = [os.path.join(ROOT, "deploy", "mpi", "run.sh"), "-np", str(n), "--", BIN,
                "worker", "--model", MODEL, "--listen", "127.0.0.1:0", "--threads", "1",
                "--drain-grace", "0", "--tp-timeout-ms", str(TP_TIMEOUT_MS), *extra]
        env = dict(os.environ)
        env.setdefault("OMPI_MCA_btl", "self,tcp")  # no shared-memory transport surprises
        env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, env=env,
                                     start_new_session=True)
        self.pids = {}
        deadline = time.time() + 90 * SCALE
        while time.time() < deadline:
            text = self.stderr()
            m = re.search(r"listening grpc=[\d.]+:(\d+)", text)
            self.pids = {int(r): int(p) for r, p in
                         re.findall(r"tensor-parallel rank (\d+) of \d+ \(mpi, pid (\d+)\)", text)}
            if m and len(self.pids) == n - 1:
                self.grpc_port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"mpirun exited {self.proc.returncode}: {text}")
            time.sleep(0.1)
        else:
            self.kill()
            raise RuntimeError("the MPI worker group did not start: " + self.stderr())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def stderr(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def kill(self):
        for p in self.pids.values():  # a stopped rank would not see SIGTERM
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20 * SCALE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.channel.close() if hasattr(self, "channel") else None


MARGIN = 0.6


def tokens(target, pb, prompt, n=1, n_tok=N_TOK, **kw):
    """Greedy ids of each of n choices, from Generation.Generate."""
    out = [[] for _ in range(n)]
    for msg in generation(target, pb).Generate(
            gen_request(pb, prompt, max_tokens=n_tok, ignore_eos=True, n=n, **kw),
            timeout=120 * SCALE):
        out[msg.index] += list(msg.token_ids)
    return out


def tokens_margins(target, pb, prompt, n_tok=N_TOK, **kw):
    """Greedy ids and each step's top-1 minus top-2 log-probability."""
    ids, margins = [], []
    for msg in generation(target, pb).Generate(
            gen_request(pb, prompt, max_tokens=n_tok, ignore_eos=True, logprobs=True,
                        top_logprobs=2, **kw), timeout=120 * SCALE):
        ids += list(msg.token_ids)
        for lp in msg.logprobs:
            t = lp.top_logprobs
            margins.append(t[0].logprob - t[1].logprob if len(t) > 1 else float("inf"))
    return ids, margins


def agrees(got, ref):
    """got equals the single worker's tokens up to its first near-tie."""
    ids, margins = ref
    k = next((i for i, m in enumerate(margins) if m < MARGIN), len(ids))
    return got[:k] == ids[:k]


def generate_tp(prompt, pol, tp=2, n_tok=N_TOK, whole=False):
    """`entrokv generate --tp N --json` (gen_run / gen_follow): its tokens,
    or (whole) the JSON."""
    args = [BIN, "generate", "--model", MODEL, "--prompt", prompt, "--max-tokens", str(n_tok),
            "--tp", str(tp), "--threads", str(tp), "--json", "--ignore-eos"]
    for k, v in pol.items():
        args += ["--" + k.replace("_", "-"), str(int(v) if isinstance(v, bool) else v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120 * SCALE, check=True)
    return json.loads(out.stdout) if whole else json.loads(out.stdout)["token_ids"]


def health(target, pb):
    stub = pb["health_pb2_grpc"].HealthStub(target.channel)
    return stub.Check(pb["health_pb2"].HealthCheckRequest(service=""), timeout=5).status


def stats_code(target, pb):
    try:
        pb["entrokv_pb2_grpc"].WorkerStub(target.channel).Stats(
            pb["entrokv_pb2"].StatsRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


POLICIES = [{}, {"kv_method": "snapkv", "kv_budget": 0.1}, {"kv_method": "uncomp", "kv_budget": 0.1}]


@pytest.fixture(scope="module")
def single():
    w = Server("--ctx", "512", "--max-running", "4", "--kvstore-mb", "0", cmd="worker")
    yield w
    assert w.stop() == 0, w.stderr()[-3000:]


@pytest.fixture(scope="module")
def reference(single, pb):
    return {(p, i): tokens_margins(single, pb, p, **pol)
            for p in PROMPTS for i, pol in enumerate(POLICIES)}


# SCOPE with a window small enough to evict from the 5th decode token on
SCOPE = {"kv_method": "snapkv", "kv_budget": 0.5, "decode_method": "scope-slide",
         "scope_recent": 2, "scope_window": 4}
SCOPE_TOK = 16


@pytest.fixture(scope="module")
def scope_reference(single, pb):
    """(generate --tp 2's tokens, the single worker's tokens and margins)"""
    return {p: (generate_tp(p, SCOPE, n_tok=SCOPE_TOK),
                tokens_margins(single, pb, p, n_tok=SCOPE_TOK, **SCOPE)) for p in PROMPTS}


# Recall (kvrecall.h) under TP: every rank keeps its own heads' recall
# store. A prompt long enough that SnapKV at 50% evicts blocks' worth of
# tokens per head beside R = 2 recalled; whole blocks (recall_gather 0)
# with promotion on, and ranking every 4 steps with promotion off; token
# recall (the default, K = 2: the capture op carries K to the followers).
RECALL_PROMPT = open("/usr/share/common-licenses/MPL-2.0").read()[:1200]
RECALLS = [{"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 0},
           {"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2, "recall_gather": 0,
            "recall_every": 4, "recall_promote": False},
           {"kv_method": "snapkv", "kv_budget": 0.5, "recall": 2}]
RECALL_TOK = 24
if SLOW:  # the sanitizers: the default only (the fixtures run each three times)
    RECALLS = RECALLS[2:]


def promotes(pol):
    """whole-block recall with promotion on (token recall promotes nothing)"""
    return pol.get("recall_promote", True) and pol.get("recall_gather", 2) == 0


@pytest.fixture(scope="module")
def recall_reference(single, pb):
    """per RECALLS entry: (generate --tp 2's JSON, the single worker's tokens
    and margins)"""
    return [(generate_tp(RECALL_PROMPT, pol, n_tok=RECALL_TOK, whole=True),
             tokens_margins(single, pb, RECALL_PROMPT, n_tok=RECALL_TOK, **pol))
            for pol in RECALLS]


@pytest.fixture(scope="module")
def tp_reference():
    return {(p, i): generate_tp(p, pol) for p in PROMPTS for i, pol in enumerate(POLICIES)}


def test_threads_group_same_tokens(pb, single, reference, tp_reference, scope_reference,
                                   recall_reference):
    w = Server("--ctx", "512", "--max-running", "4", "--tp", "2", "--tp-timeout-ms",
               str(TP_TIMEOUT_MS), cmd="worker")
    try:
        assert "tensor-parallel group of 2 ranks (threads)" in w.stderr()
        for p in PROMPTS:
            for i, pol in enumerate(POLICIES):
                got = tokens(w, pb, p, **pol)[0]
                assert got == tp_reference[(p, i)], (p, pol)
                assert agrees(got, reference[(p, i)]), (p, pol, got, reference[(p, i)])
        # n = 2: one prefill, forked on every rank, each choice its own sequence
        both = tokens(w, pb, PROMPTS[0], n=2)
        assert both == [tp_reference[(PROMPTS[0], 0)]] * 2
        # concurrent requests share steps: rows of several sequences per plan
        res = {}
        th = [threading.Thread(target=lambda p=p: res.__setitem__(p, tokens(w, pb, p)[0]))
              for p in PROMPTS]
        for t in th:
            t.start()
        for t in th:
            t.join()
        assert all(res[p] == tp_reference[(p, 0)] for p in PROMPTS)
        # SCOPE: each rank evicts its own heads' decode tokens
        for p in PROMPTS:
            got = tokens(w, pb, p, n_tok=SCOPE_TOK, **SCOPE)[0]
            assert got == scope_reference[p][0], (p, got, scope_reference[p][0])
            assert agrees(got, scope_reference[p][1]), (p, got, scope_reference[p][1])
        # recall: each rank ranks, recalls and promotes its own heads' blocks
        for pol, (ref_tp, ref_single) in zip(RECALLS, recall_reference):
            assert ref_tp["recall_blocks"] > 0, ref_tp  # rank 0's heads recalled
            assert (ref_tp["recall_promotions"] > 0) == promotes(pol), ref_tp
            assert ref_tp["recall_mode"] == ("tokens" if pol.get("recall_gather", 2) else
                                             "blocks"), ref_tp
            got = tokens(w, pb, RECALL_PROMPT, n_tok=RECALL_TOK, **pol)[0]
            assert got == ref_tp["token_ids"], (pol, got, ref_tp["token_ids"])
            assert agrees(got, ref_single), (pol, got, ref_single)
        assert health(w, pb) == pb["health_pb2"].HealthCheckResponse.SERVING
        # idle longer than the comm timeout: the heartbeat keeps the group up
        time.sleep(TP_TIMEOUT_MS / 1000 * 1.5)
        assert tokens(w, pb, PROMPTS[1])[0] == tp_reference[(PROMPTS[1], 0)]
    finally:
        rc = w.stop()
    assert rc == 0, w.stderr()[-3000:]
    assert "stopped:" not in w.stderr()  # no follower failed


# np = 3 and np = 1 run the same code as np = 2 (the plan, the followers'
# loop, the sharded forward): under the sanitizers (SLOW) the np = 2 tests
# cover it, and these two would double the file's time there
@pytest.mark.skipif(SLOW, reason="np = 2 covers the same code under the sanitizers")
def test_threads_group_of_3(pb, reference, recall_reference):
    """np = 3 (the demo model's 3 KV heads: one per rank): `entrokv generate
    --tp 3`'s tokens exactly and the single worker's up to its first
    near-tie, with full KV, SnapKV and UNComp at 10% and with recall."""
    w = Server("--ctx", "512", "--max-running", "4", "--tp", "3", "--tp-timeout-ms",
               str(TP_TIMEOUT_MS), cmd="worker")
    try:
        assert "tensor-parallel group of 3 ranks (threads)" in w.stderr()
        for p in PROMPTS:
            for i, pol in enumerate(POLICIES):
                got = tokens(w, pb, p, **pol)[0]
                ref = generate_tp(p, pol, tp=3)
                assert got == ref, (p, pol, got, ref)
                assert agrees(got, reference[(p, i)]), (p, pol, got, reference[(p, i)])
        pol = RECALLS[0]
        ref = generate_tp(RECALL_PROMPT, pol, tp=3, n_tok=RECALL_TOK, whole=True)
        assert ref["recall_blocks"] > 0 and ref["recall_promotions"] > 0, ref
        got = tokens(w, pb, RECALL_PROMPT, n_tok=RECALL_TOK, **pol)[0]
        assert got == ref["token_ids"], (got, ref["token_ids"])
        assert agrees(got, recall_reference[0][1]), (got, recall_reference[0][1])
    finally:
        rc = w.stop()
    assert rc == 0, w.stderr()[-3000:]
    assert "stopped:" not in w.stderr()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (openmpi-bin)")
@pytest.mark.skipif(SLOW, reason="np = 2 covers the same code under the sanitizers")
def test_mpi_group_of_1(pb, reference, recall_reference):
    """np = 1: `mpirun -np 1 entrokv worker` runs the TP path (the plan, an
    MPI communicator of one rank) over the whole model, whose forward is the
    single-process one bit for bit (docs/tp.md, "Numerics"): the single
    worker's tokens exactly, with every policy and with recall."""
    g = MpiGroup(1)
    try:
        assert "tensor-parallel rank 0 of 1 (mpi)" in g.stderr()
        for p in PROMPTS:
            for i, pol in enumerate(POLICIES):
                got = tokens(g, pb, p, **pol)[0]
                assert got == reference[(p, i)][0], (p, pol, got, reference[(p, i)][0])
        for pol, (_, ref_single) in zip(RECALLS, recall_reference):
            got = tokens(g, pb, RECALL_PROMPT, n_tok=RECALL_TOK, **pol)[0]
            assert got == ref_single[0], (pol, got, ref_single[0])
    finally:
        g.kill()


def test_more_ranks_than_kv_heads_refused():
    """The demo model has 3 KV heads: --tp 4 fails at start, naming why,
    instead of serving (or hanging on ranks that never start)."""
    r = subprocess.run([BIN, "worker", "--model", MODEL, "--listen", "127.0.0.1:0", "--tp", "4",
                        "--tp-timeout-ms", str(TP_TIMEOUT_MS)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1, r.stderr
    assert "KV heads" in r.stderr or "kv heads" in r.stderr, r.stderr


def test_recall_tier_on_daemons_refused():
    """--recall-host-mb spills recall blocks to the KV store daemons through
    a client only rank 0 would have: a TP group refuses it at start, naming
    why, rather than serve without the tier asked for."""
    with tempfile.NamedTemporaryFile("w", suffix=".token") as tok:
        tok.write("0123456789abcdef0123456789abcdef\n")
        tok.flush()
        r = subprocess.run([BIN, "worker", "--model", MODEL, "--listen", "127.0.0.1:0", "--tp",
                            "2", "--kvstore-peers", "127.0.0.1:1", "--kvstore-token-file",
                            tok.name, "--recall-host-mb", "16"],
                           capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1, r.stderr
    assert "--recall-host-mb" in r.stderr and "tensor-parallel" in r.stderr, r.stderr


@pytest.fixture
def kvstore_daemon():
    tmp = tempfile.mkdtemp(prefix="entrokv-kvstore-")
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("tp-test-token\n")
    proc = subprocess.Popen([BIN, "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb", "256",
                             "--auth-token-file", token], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    m = re.search(r"listening on [\d.]+:(\d+)", proc.stdout.readline())
    assert m, "kvstore did not start"
    yield proc, f"127.0.0.1:{m.group(1)}", token
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


RESTORE_RE = re.compile(r"tensor-parallel restore: ranks hold ([\d,]+) tokens, every rank keeps "
                        r"(\d+)")
TIER_TOK = 8


@pytest.fixture(scope="module")
def tier_reference():
    """generate --tp 2 (no tier) on RECALL_PROMPT, full KV"""
    return generate_tp(RECALL_PROMPT, {}, n_tok=TIER_TOK)


@pytest.mark.skipif(SLOW, reason="the sanitizers: too slow for the time it adds")
@pytest.mark.parametrize("launch", ["threads", "mpi"])
def test_group_kvstore_tier(pb, kvstore_daemon, tier_reference, launch):
    """Every rank saves and restores its own heads' blocks through the
    daemon (docs/tp.md, "The KV store tier"), ranks as threads or one per
    process under mpirun (each its own client); the tokens are the group's
    without a tier (generate --tp 2) whether the prefix was restored on
    every rank or recomputed on every rank (threads: with the daemon
    killed). Full KV only here: kvstore.test_kvprefix_tp restores under
    SnapKV and at np = 3."""
    if launch == "mpi" and shutil.which("mpirun") is None:
        pytest.skip("no mpirun (openmpi-bin)")
    daemon, addr, token = kvstore_daemon
    ref = tier_reference
    # the group's store ops time out at a quarter of its timeout: 2 s here,
    # the client's default, so a loaded machine's gets do not miss
    tier = ["--kvstore-mb", "0", "--kvstore-peers", addr, "--kvstore-token-file", token,
            "--tp-timeout-ms", "8000"]
    if launch == "mpi":
        w = MpiGroup(2, "--ctx", "512", "--max-running", "4", *tier)
    else:
        w = Server("--ctx", "512", "--max-running", "4", "--tp", "2", *tier, cmd="worker")
    coord = None
    try:
        wait_for(lambda: "tensor-parallel rank 1 of 2: its own KV store tier" in w.stderr(),
                 what="rank 1's tier")
        coord = Server("--ctx", "512", "--workers", f"127.0.0.1:{w.grpc_port}",
                       cmd="coordinator")
        wait_for(lambda: "healthy" in coord.stderr(), what="the TP group healthy")
        seen = len(RESTORE_RE.findall(w.stderr()))
        assert tokens(coord, pb, RECALL_PROMPT, n_tok=TIER_TOK)[0] == ref
        # the followers save at rank 0's next plan (a ping while idle):
        # until every rank's blocks are in the daemon, a request misses
        for _ in range(20 * SCALE):
            assert tokens(coord, pb, RECALL_PROMPT, n_tok=TIER_TOK)[0] == ref
            found = RESTORE_RE.findall(w.stderr())[seen:]
            if found and int(found[-1][1]) > 0:
                break
            time.sleep(0.25)
        held, kept = found[-1]
        held = [int(x) for x in held.split(",")]
        assert len(held) == 2 and min(held) > 0 and int(kept) == min(held), found
        assert int(kept) >= 16 * 10, found  # ~300 prompt tokens, a window computed
        print(f"{launch}: ranks hold {held} tokens, every rank keeps {kept}")
        if launch == "threads":  # the daemon gone: every rank misses, recomputes
            daemon.kill()
            daemon.wait()
            assert tokens(coord, pb, RECALL_PROMPT, n_tok=TIER_TOK)[0] == ref
    finally:
        if coord:
            assert coord.stop() == 0, coord.stderr()[-3000:]
        if launch == "mpi":
            w.kill()
        else:
            assert w.stop() == 0, w.stderr()[-3000:]
    assert "stopped:" not in w.stderr()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (openmpi-bin)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_mpi_group_rank_fails(pb, single, reference, tp_reference, sig):
    g = MpiGroup(2)
    coord = None
    try:
        assert "tensor-parallel rank 0 of 2 (mpi)" in g.stderr()
        for i, pol in enumerate(POLICIES):
            assert tokens(g, pb, PROMPTS[0], **pol)[0] == tp_reference[(PROMPTS[0], i)], pol
        coord = Server("--ctx", "512", "--workers",
                       f"127.0.0.1:{single.grpc_port},127.0.0.1:{g.grpc_port}",
                       cmd="coordinator")
        wait_for(lambda: len(re.findall(r"worker \S+ healthy", coord.stderr())) == 2,
                 what="both groups healthy")
        for _ in range(4):  # round-robin: both groups serve, each its own tokens
            got = tokens(coord, pb, PROMPTS[1])[0]
            assert got in (tp_reference[(PROMPTS[1], 0)], reference[(PROMPTS[1], 0)][0])
        assert health(g, pb) == pb["health_pb2"].HealthCheckResponse.SERVING

        # a long stream on the group, then its follower fails mid-generation
        result = {}

        def stream():
            try:
                run_stream(generation(g, pb), gen_request(pb, PROMPTS[0], max_tokens=400,
                                                          ignore_eos=True), timeout=120)
                result["code"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                result["code"], result["details"] = e.code(), e.details()
            result["t"] = time.time()

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)
        t0 = time.time()
        os.kill(g.pids[1], sig)
        t.join(FAIL_WITHIN_S + 120 * SCALE)
        assert not t.is_alive(), "the stream hangs after its rank failed"
        assert result["code"] == grpc.StatusCode.UNAVAILABLE, result
        assert "tensor-parallel group broken" in result["details"], result
        print(f"{signal.Signals(sig).name}: the stream ended {result['t'] - t0:.2f} s after it")
        assert result["t"] - t0 < FAIL_WITHIN_S, result["t"] - t0
        # the group says it is gone; the coordinator stops routing to it
        assert health(g, pb) == pb["health_pb2"].HealthCheckResponse.NOT_SERVING
        assert stats_code(g, pb) == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: re.search(rf"worker 127.0.0.1:{g.grpc_port} unhealthy", coord.stderr()),
                 timeout=FAIL_WITHIN_S, what="the coordinator marking the TP group unhealthy")
        print(f"{signal.Signals(sig).name}: the coordinator saw the group unhealthy "
              f"{time.time() - t0:.2f} s after it (or earlier)")
        for _ in range(3):  # only the single-process group is left
            assert tokens(coord, pb, PROMPTS[1])[0] == reference[(PROMPTS[1], 0)][0]
        with pytest.raises(grpc.RpcError) as e:  # straight to the broken group
            tokens(g, pb, PROMPTS[0])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if coord:
            assert coord.stop() == 0, coord.stderr()[-3000:]
        t1 = time.time()
        g.kill()
        print(f"the group stopped in {time.time() - t1:.2f} s")
