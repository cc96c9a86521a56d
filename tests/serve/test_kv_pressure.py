"""test_kv_pressure.py - serving when the KV pool is too small for what runs
(issue 22, part 5): a pool of 128 tokens per head and three concurrent
greedy streams of 40 tokens after ~13-token prompts. They are all admitted
(their prompts fit), then outgrow the pool, so the engine preempts and
recomputes; /metrics counts it in entrokv_preemptions_total, and every
stream still ends with its 40 tokens, the same text as the request run
alone on the same server (batch invariance across preemption)."""
import concurrent.futures

import openai
import pytest

from conftest import SLOW, Server

PROMPTS = [f"Explain {t} to a child in a few short sentences, please." for t in
           ("rain", "volcanoes", "magnets")]
N_TOKENS = 40


@pytest.fixture(scope="module")
def pressed():
    s = Server("--ctx", "512", "--kv-tokens", "128", "--max-running", "4", "--kvstore-mb", "0")
    yield s
    assert s.stop() == 0, s.stderr()[-4000:]


def complete(server, prompt):
    c = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0,
                      timeout=300 * (4 if SLOW else 1))
    r = c.completions.create(model="entrokv", prompt=prompt, max_tokens=N_TOKENS,
                             temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text, r.usage.completion_tokens


def test_small_pool_preempts_counts_it_and_equals_solo(pressed):
    solo = [complete(pressed, p) for p in PROMPTS]  # one at a time: 128 tokens hold one
    assert pressed.metric("entrokv_preemptions_total") == 0
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
        together = list(ex.map(lambda p: complete(pressed, p), PROMPTS))
    assert all(n == N_TOKENS for _, n in together), together
    assert together == solo
    assert pressed.metric("entrokv_preemptions_total") >= 1
