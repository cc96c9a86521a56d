"""recall_tier.py - recall with its evicted blocks on a KV store daemon
(`--recall-host-mb 0`: nothing but the partly filled last block of each
head stays in host memory) through `entrokv serve`: requests with recall
complete with every token they asked for while the daemon serves, while it
is stopped (SIGSTOP: its ops can only time out, after 2 s, and no decode
step waits for them) and after it was killed with -9; the recall counters
appear on /metrics (blocks spilled, blocks recalled, deadline misses).

Run by ctest as serve.test_recall_tier (pytest on this file).
"""
import os
import re
import signal
import subprocess
import tempfile
import time

from conftest import BIN, SLOW, Server
from test_serve import gen_request, generation, run_stream

DOC = open("/usr/share/common-licenses/MPL-2.0").read()[:1800]
N = 16  # tokens per request


def request(pb, tag):
    # snapkv at 40% keeps the recent window plus the heavy hitters; recall 2
    # brings 2 of the evicted blocks back per head and step
    return gen_request(pb, f"[{tag}]\n" + DOC, max_tokens=N, ignore_eos=True,
                       kv_method="snapkv", kv_budget=0.4, recall=2)


def timed(stub, req):
    t0 = time.time()
    _, ids, _, _ = run_stream(stub, req, timeout=300)
    return len(ids), time.time() - t0


def test_recall_from_the_daemon_survives_stop_and_kill(pb):
    tmp = tempfile.mkdtemp(prefix="entrokv-recall-tier-")
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("recall-tier-token\n")
    proc = subprocess.Popen([BIN, "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb", "64",
                             "--auth-token-file", token], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    m = re.search(r"listening on [\d.]+:(\d+)", proc.stdout.readline())
    assert m, "kvstore did not start"
    s = Server("--ctx", "1024", "--kv-tokens", "4096", "--kvstore-mb", "0",
               "--kvstore-peers", f"127.0.0.1:{m.group(1)}", "--kvstore-token-file", token,
               "--recall-host-mb", "0")
    try:
        stub = generation(s, pb)
        n, solo = timed(stub, request(pb, "served"))
        assert n == N
        assert s.metric("entrokv_recall_spilled_blocks_total") > 0
        assert s.metric("entrokv_recall_blocks_total") > 0
        n, again = timed(stub, request(pb, "served again"))
        assert n == N
        solo = min(solo, again)
        # stopped once the request's first token is out (its evicted blocks
        # are on the daemon by then): every fetch times out after 2 s, and a
        # step that waited on one would make the request take N * 2 s
        misses = s.metric("entrokv_recall_deadline_misses_total")
        fetched = s.metric("entrokv_recall_blocks_total")
        t0, n = time.time(), 0
        for msg in stub.Generate(request(pb, "stopped"), timeout=300 * (4 if SLOW else 1)):
            if n == 0 and msg.token_ids:
                proc.send_signal(signal.SIGSTOP)
            n += len(msg.token_ids)
        stopped = time.time() - t0
        print(f"{N} tokens: {solo:.2f} s with the daemon, {stopped:.2f} s with it stopped")
        assert n == N
        assert stopped < 3 * solo + (8.0 if SLOW else 4.0), (stopped, solo)
        assert s.metric("entrokv_recall_deadline_misses_total") > misses
        assert s.metric("entrokv_recall_blocks_total") > fetched
        proc.send_signal(signal.SIGCONT)
        proc.kill()  # -9
        proc.wait()
        n, killed = timed(stub, request(pb, "killed"))
        print(f"after kill -9: {killed:.2f} s")
        assert n == N
        # the prompt's prefix restore from the dead daemon may wait for its
        # op timeout and a reconnect (2 s each) before the prefill starts
        assert killed < 3 * solo + (16.0 if SLOW else 12.0), (killed, solo)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        assert s.stop() == 0, s.stderr()[-4000:]
