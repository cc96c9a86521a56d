"""test_kvstore_serve.py - the KV store tier inside `entrokv serve`: a
request whose prompt prefix was served before restores that prefix's KV
(from the host tier by default, or from an `entrokv kvstore` daemon over
UCX) instead of recomputing it, and produces exactly the tokens of the
first, fully computed run, with and without compression; a daemon killed
with -9 turns restores into misses and requests keep succeeding. Each test
starts from a prompt no other test sends, so its first run is cold whatever
ran before (a miss, nothing restored), and its second waits until the
tier's stored-bytes counter shows the first run's save finished.
"""
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BIN, SLOW, Server
from test_serve import gen_request, generation, run_stream, wait_for

DOC = open("/usr/share/common-licenses/MPL-2.0").read()[:2400]
QUESTION = "\n\nIn one sentence, what is this document about?"


def tier_metric(server, name, tier):
    _, text = server.get("/metrics")
    m = re.search(rf'^{name}{{tier="{tier}"}} (\S+)$', text, re.M)
    assert m, f"{name}{{tier={tier}}} missing"
    return float(m.group(1))


def fresh_prompt(tag, tail=QUESTION):
    """DOC behind a first line no other test uses: block keys chain every
    token from the first one on, so nothing an earlier test saved (in any
    order) can match even one block of it."""
    return f"[{tag}]\n" + DOC + tail


def wait_saved(server, tier, before):
    """Waits (bounded) until the tier has stored more bytes than before:
    saves run in the store's background, and /metrics is republished when
    one finishes."""
    wait_for(lambda: tier_metric(server, "entrokv_kvstore_bytes_in_total", tier) > before,
             timeout=30, what=f"the prompt's KV stored in the {tier} tier")


def counts(server):
    return (server.metric("entrokv_kvstore_hits_total"),
            server.metric("entrokv_kvstore_misses_total"))


def cold_then_warm(server, pb, req, tier):
    """Runs req on a prompt nothing stored yet, then again once its save
    is in; asserts the first was a miss with no block restored. Returns
    both runs (run_stream tuples), the block-rows the second restored and
    the seconds the cold run took."""
    stub = generation(server, pb)
    stored = tier_metric(server, "entrokv_kvstore_bytes_in_total", tier)
    hits, misses = counts(server)
    t0 = time.time()
    cold = run_stream(stub, req, timeout=300)
    cold_s = time.time() - t0
    hits_cold, misses_cold = counts(server)
    assert hits_cold == hits, "the cold run restored blocks nobody saved"
    assert misses_cold >= misses + 1, "the cold run never asked the store"
    wait_saved(server, tier, stored)
    warm = run_stream(stub, req, timeout=300)
    return cold, warm, server.metric("entrokv_kvstore_hits_total") - hits_cold, cold_s


@pytest.fixture(scope="module")
def store_server():
    s = Server("--ctx", "1024", "--kv-tokens", "4096", "--max-running", "4")
    yield s
    assert s.stop() == 0, s.stderr()[-4000:]


def test_repeated_prefix_is_restored_from_the_host_tier_and_tokens_match(store_server, pb):
    req = gen_request(pb, fresh_prompt("host tier"), max_tokens=12, ignore_eos=True)
    cold, warm, restored, _ = cold_then_warm(store_server, pb, req, "host")
    assert len(cold[1]) == 12 and cold[1] == warm[1]
    assert restored >= 25  # ~540 prompt tokens: 33 whole blocks, minus the tail computed
    assert tier_metric(store_server, "entrokv_kvstore_bytes_out_total", "host") > 0
    wait_for(lambda: store_server.metric("entrokv_kv_blocks_used") == 0, what="KV freed")


def test_restored_prefix_is_compressed_again_with_the_same_result(store_server, pb):
    req = gen_request(pb, fresh_prompt("compressed", "\n\nSummarize the text above."),
                      max_tokens=12, ignore_eos=True, kv_method="snapkv", kv_budget=0.25)
    cold, warm, restored, _ = cold_then_warm(store_server, pb, req, "host")
    assert restored >= 25
    assert cold[1] == warm[1]
    for run in (cold, warm):
        assert run[2].usage.kv_bytes < run[2].usage.kv_bytes_full / 2


@pytest.fixture(scope="module")
def daemon():
    tmp = tempfile.mkdtemp(prefix="entrokv-kvstore-")
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("serve-test-token\n")
    proc = subprocess.Popen([BIN, "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb", "256",
                             "--auth-token-file", token], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on [\d.]+:(\d+)", line)
    assert m, f"kvstore did not start: {line!r}"
    yield proc, f"127.0.0.1:{m.group(1)}", token
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_daemon_tier_restores_and_a_dead_daemon_is_a_miss(daemon, pb):
    proc, addr, token = daemon
    s = Server("--ctx", "1024", "--kv-tokens", "4096", "--kvstore-mb", "0",
               "--kvstore-peers", addr, "--kvstore-token-file", token)
    try:
        req = gen_request(pb, fresh_prompt("daemon tier"), max_tokens=12, ignore_eos=True)
        cold, warm, restored, cold_s = cold_then_warm(s, pb, req, "daemon")
        first = cold[1]
        assert first == warm[1] and restored >= 25
        assert tier_metric(s, "entrokv_kvstore_bytes_out_total", "daemon") > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stub = generation(s, pb)
        misses = s.metric("entrokv_kvstore_misses_total")
        t0 = time.time()
        third = run_stream(stub, req, timeout=300)[1]
        assert third == first  # recomputed, never different
        assert s.metric("entrokv_kvstore_misses_total") > misses
        # a miss, never a hang: the recompute a cold run takes, plus the
        # store's timeouts (2 s an op) - not the 300 s the call may wait
        assert time.time() - t0 < cold_s + (60 if SLOW else 30)
    finally:
        assert s.stop() == 0, s.stderr()[-4000:]
