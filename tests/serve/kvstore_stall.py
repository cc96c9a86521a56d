"""kvstore_stall.py - a KV store daemon that stops answering (SIGSTOP) must
not stall the engine: a request cancelled while its prefix restore waits on
the daemon is dropped at once (kvprefix_restore_finish abandons the batch;
the store frees the job when its ops time out), so the next request is
served in its usual time (issue 21, part 2: cancellation never blocks the
engine).

Run by ctest as serve.test_kvstore_stall (pytest on this file; a file
of its own so its planted bug runs just it).
"""
import os
import re
import signal
import subprocess
import tempfile
import time

from conftest import BIN, SLOW, Server
from test_kvstore_serve import fresh_prompt, tier_metric, wait_saved
from test_serve import gen_request, generation, run_stream


def test_cancel_during_a_stalled_restore_does_not_block_the_engine(pb):
    """A request whose restore waits on a stopped daemon (SIGSTOP: its ops
    can only time out, after 2 s) is cancelled; the engine drops the restore
    without waiting for the store, so a 1-token request right after is
    served in its usual time, not after the store's op timeout."""
    tmp = tempfile.mkdtemp(prefix="entrokv-kvstore-stall-")
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("stall-test-token\n")
    proc = subprocess.Popen([BIN, "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb", "64",
                             "--auth-token-file", token], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    m = re.search(r"listening on [\d.]+:(\d+)", proc.stdout.readline())
    assert m, "kvstore did not start"
    s = Server("--ctx", "1024", "--kv-tokens", "4096", "--kvstore-mb", "0",
               "--kvstore-peers", f"127.0.0.1:{m.group(1)}", "--kvstore-token-file", token)
    try:
        stub = generation(s, pb)
        small = gen_request(pb, "Hi", max_tokens=1)
        solo = []
        for _ in range(3):
            t0 = time.time()
            run_stream(stub, small)
            solo.append(time.time() - t0)
        # a short prompt (a few blocks): enough to restore, cheap under ASan
        req = gen_request(pb, fresh_prompt("stalled restore")[:400], max_tokens=4,
                          ignore_eos=True)
        stored = tier_metric(s, "entrokv_kvstore_bytes_in_total", "daemon")
        run_stream(stub, req, timeout=300)
        wait_saved(s, "daemon", stored)
        proc.send_signal(signal.SIGSTOP)
        call = stub.Generate(req, timeout=300)  # its restore now waits on the stopped daemon
        time.sleep(0.3)
        call.cancel()
        t0 = time.time()
        run_stream(stub, small)
        took = time.time() - t0
        print(f"1-token request after the cancel: {took * 1000:.0f} ms "
              f"(solo {min(solo) * 1000:.0f} ms; the store's op timeout is 2000 ms)")
        assert took < min(solo) + (2.0 if SLOW else 1.0), (took, solo)
    finally:
        proc.send_signal(signal.SIGCONT)
        assert s.stop() == 0, s.stderr()[-4000:]
        proc.kill()
        proc.wait()
