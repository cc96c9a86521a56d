"""lm_eval_harness.py - lm-evaluation-harness (PyPI `lm-eval`) against
`entrokv serve`, as its users run it: `lm_eval --model local-completions`
on a multiple-choice task defined by a YAML and a JSONL file this test
writes (32 questions of real text), scored by loglikelihood through
/v1/completions with `echo`, `logprobs` and token-id prompts.

Offline: the harness needs a Hugging Face tokenizer; it is built from the
GGUF's own metadata (the `gguf` package reads it, transformers' GGUF
tokenizer converter builds it; transformers' one-call
`from_pretrained(gguf_file=...)` needs PyTorch, which this venv does not
have) and saved to a directory passed as `tokenizer=`. The dataset is
loaded by `datasets`' packaged json builder. HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE are set: nothing comes from a hub.

Checked: the harness's per-choice loglikelihoods (--log_samples) equal the
sums of log-softmax of entrokv's own raw logits (tests/serve/logits_ref.c,
model_forward alone) over the same token ids within 2e-3 nats, its
is_greedy flags equal the reference's, and its acc equals the accuracy of
the reference loglikelihoods (where two choices are within the tolerance
of each other the item may go either way and is left out of that count).
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import gguf  # noqa: F401  (scripts/requirements.txt; missing is a failure, not a skip)
import lm_eval  # noqa: F401
import numpy as np
import pytest
import transformers  # noqa: F401

from conftest import MODEL, SLOW, Server
from openai_api import log_softmax, ref_logits

TOL = 2e-3  # nats, a sum over a few tokens of float32 log-probabilities

ITEMS = [
    ("What is the capital of France?", ["Paris", "London", "Rome", "Madrid"], 0),
    ("What is the capital of Japan?", ["Beijing", "Seoul", "Tokyo", "Bangkok"], 2),
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Yellow"], 2),
    ("How many days are there in a week?", ["Five", "Six", "Seven", "Eight"], 2),
    ("What do bees make?", ["Milk", "Honey", "Silk", "Wool"], 1),
    ("Which animal is known as the king of the jungle?", ["Lion", "Mouse", "Frog", "Owl"], 0),
    ("What is frozen water called?", ["Steam", "Ice", "Sand", "Glass"], 1),
    ("Which organ pumps blood through the body?", ["Liver", "Lung", "Heart", "Skin"], 2),
    ("What is the largest ocean on Earth?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("What gas do plants absorb from the air?", ["Oxygen", "Helium", "Carbon dioxide", "Neon"], 2),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen",
                                     "Mark Twain"], 1),
    ("What is the boiling point of water in degrees Celsius?", ["50", "100", "150", "200"], 1),
    ("Which continent is Egypt in?", ["Asia", "Europe", "Africa", "South America"], 2),
    ("What is the opposite of hot?", ["Warm", "Cold", "Wet", "Loud"], 1),
    ("Which instrument has black and white keys?", ["Guitar", "Drum", "Piano", "Flute"], 2),
    ("What is the main language spoken in Brazil?", ["Spanish", "Portuguese", "French",
                                                     "English"], 1),
    ("How many hours are there in a day?", ["12", "20", "24", "30"], 2),
    ("What does a thermometer measure?", ["Weight", "Temperature", "Speed", "Time"], 1),
    ("Which fruit is yellow and curved?", ["Apple", "Banana", "Grape", "Cherry"], 1),
    ("What is the capital of Italy?", ["Rome", "Venice", "Milan", "Naples"], 0),
    ("Which bird is a symbol of peace?", ["Crow", "Eagle", "Dove", "Parrot"], 2),
    ("What is the largest planet in our solar system?", ["Saturn", "Jupiter", "Neptune",
                                                          "Earth"], 1),
    ("Which season comes after winter?", ["Summer", "Autumn", "Spring", "Monsoon"], 2),
    ("What is H2O more commonly called?", ["Salt", "Water", "Sugar", "Air"], 1),
    ("Which metal is liquid at room temperature?", ["Iron", "Mercury", "Gold", "Copper"], 1),
    ("How many continents are there?", ["Five", "Six", "Seven", "Nine"], 2),
    ("What is the freezing point of water in degrees Celsius?", ["0", "10", "32", "-10"], 0),
    ("Which country is home to the kangaroo?", ["India", "Canada", "Australia", "Norway"], 2),
    ("What do you call a baby cat?", ["Puppy", "Kitten", "Calf", "Foal"], 1),
    ("Which shape has three sides?", ["Square", "Circle", "Triangle", "Hexagon"], 2),
]

TASK_YAML = """task: entrokv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

BUILD_TOKENIZER = r"""
import sys
import gguf
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf import gguf_tokenizer_mapping as M

r = gguf.GGUFReader(sys.argv[1])
md = {k: f.contents() for k, f in r.fields.items()
      if k.startswith("tokenizer.") or k == "general.architecture"}
g = {grp: {n: md[f"tokenizer.{k}"] for k, n in ren.items() if f"tokenizer.{k}" in md}
     for grp, ren in M.GGUF_TOKENIZER_MAPPING.items()}
tokd, cfg = g["tokenizer"], g["tokenizer_config"]
for name, key in M._SPECIAL_TOKENS.items():
    tid = md.get(f"tokenizer.ggml.{key}")
    cfg[name] = tokd["tokens"][tid] if tid is not None else None
backend, _ = M.convert_gguf_tokenizer(md["general.architecture"], tokd)
PreTrainedTokenizerFast(tokenizer_object=backend,
                        **{k: v for k, v in cfg.items() if v is not None}).save_pretrained(sys.argv[2])
"""


@pytest.fixture(scope="module")
def lm_server():
    s = Server("--ctx", "512", "--max-running", "8")
    yield s
    assert s.stop() == 0, s.stderr()[-4000:]


def test_lm_eval_local_completions_matches_entrokv_logits(lm_server, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    tok_dir = tmp_path / "tokenizer"
    subprocess.run([sys.executable, "-c", BUILD_TOKENIZER, MODEL, str(tok_dir)], check=True,
                   env=env, timeout=300, capture_output=True)
    items = tmp_path / "items.jsonl"
    with open(items, "w") as f:
        for q, ch, a in ITEMS:
            f.write(json.dumps({"question": q, "choices": ch, "answer": a}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "entrokv_mc.yaml").write_text(TASK_YAML.format(items=items))
    out = tmp_path / "out"
    base = f"http://127.0.0.1:{lm_server.http_port}/v1/completions"
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "local-completions",
           "--model_args", f"base_url={base},tokenizer={tok_dir},tokenizer_backend=huggingface,"
                           "model=entrokv,num_concurrent=4,max_retries=1,timeout=120",
           "--tasks", "entrokv_mc", "--include_path", str(tasks), "--output_path", str(out),
           "--log_samples", "--batch_size", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       timeout=900 if SLOW else 300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    results = json.load(open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]))
    acc = results["results"]["entrokv_mc"]["acc,none"]
    samples = [json.loads(line) for line in
               open(glob.glob(str(out / "**" / "samples_entrokv_mc_*.jsonl"), recursive=True)[0])]
    assert len(samples) == len(ITEMS)

    # the reference: the harness's own token split (lm_eval.api.model._encode_pair),
    # scored on entrokv's raw logits
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    pairs = []
    for s in samples:
        args = s["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        args = [args[f"gen_args_{j}"] for j in range(len(args))] if isinstance(args, dict) else args
        for ctx, cont in ((a["arg_0"], a["arg_1"]) if isinstance(a, dict) else a for a in args):
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            c_ids, whole = enc(ctx), enc(ctx + cont)
            pairs.append((c_ids, whole[len(c_ids):]))
    rows = ref_logits([c + k for c, k in pairs])
    at, counted, worst = 0, 0, 0.0
    for s in samples:
        lls = []
        for j, resp in enumerate(s["resps"]):
            c_ids, k_ids = pairs[at]
            lsm = log_softmax(rows[at])
            want = sum(lsm[len(c_ids) - 1 + i][t] for i, t in enumerate(k_ids))
            greedy = all(int(np.argmax(lsm[len(c_ids) - 1 + i])) == t for i, t in enumerate(k_ids))
            got_ll, got_greedy = resp[0][0], resp[0][1]
            got_ll = float(got_ll)
            got_greedy = got_greedy in (True, "True")
            worst = max(worst, abs(got_ll - want))
            assert abs(got_ll - want) < TOL, (s["doc"], j, got_ll, want)
            assert got_greedy == greedy, (s["doc"], j)
            lls.append(want)
            at += 1
        order = np.argsort(lls)[::-1]
        if lls[order[0]] - lls[order[1]] > 2 * TOL:  # not a near tie
            counted += 1
            assert float(s["acc"]) == float(order[0] == int(s["target"])), s["doc"]
    print(f"lm-eval acc {acc:.4f}; reference loglikelihoods agree within {worst:.2e} nats; "
          f"{counted}/{len(samples)} items without near ties")
    assert counted >= len(samples) - 2
    assert abs(acc - np.mean([float(s["acc"]) for s in samples])) < 1e-9
