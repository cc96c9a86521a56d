#!/usr/bin/env python3
"""perf_readme.py - regenerate the README's performance section from the
benchmark JSONL committed under docs/eval/, so every figure there comes
from a file anyone can read (and re-measure with scripts/perf_run.sh).

Inputs: the stdout of `entrokv bench generate` (generate, generate_meta,
generate_summary, generate_ratio lines) and of `entrokv bench serve`
(serve_meta, serve, serve_ratio lines). The section between the lines
`<!-- perf:begin -->` and `<!-- perf:end -->` in the README is replaced.

Usage:
  scripts/perf_readme.py [--generate FILE]... [--serve docs/eval/perf-serve.jsonl]
                         [--readme README.md] [--check | --print]
--generate may repeat (one table each, in the order given); by default every
docs/eval/perf-generate*.jsonl in name order (perf_run.sh writes
perf-generate.jsonl, and with LONG=1 perf-generate-long.jsonl).
--check exits 1 when the README's section differs from what the JSONL
gives (nothing is written); --print writes the section to stdout.
Exit 2 on a missing or malformed input, naming the file and line.
"""
import argparse
import glob
import json
import sys

BEGIN = "<!-- perf:begin -->"
END = "<!-- perf:end -->"


class InputError(Exception):
    pass


def read_jsonl(path):
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}:{i}: not JSON ({e})")
        if not isinstance(row, dict) or "bench" not in row:
            raise InputError(f"{path}:{i}: not a benchmark row (no \"bench\" field)")
        rows.append(row)
    return rows


def one(rows, bench, path):
    found = [r for r in rows if r["bench"] == bench]
    if len(found) != 1:
        raise InputError(f"{path}: expected one \"{bench}\" line, found {len(found)}")
    return found[0]


def need(row, key, path):
    if key not in row or row[key] is None:
        raise InputError(f"{path}: a \"{row.get('bench')}\" line has no \"{key}\"")
    return row[key]


def tps(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def spread(s):
    return f"{tps(s['median'])} ({tps(s['min'])}-{tps(s['max'])})"


def secs(x):
    if x is None:
        return "-"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def generate_section(rows, path):
    meta = one(rows, "generate_meta", path)
    summ = [r for r in rows if r["bench"] == "generate_summary"]
    ratios = {r["context"]: r for r in rows if r["bench"] == "generate_ratio"}
    if not summ:
        raise InputError(f"{path}: no generate_summary lines")
    contexts = sorted({need(r, "context", path) for r in summ})
    by = {(r["engine"], r["context"]): r for r in summ}
    llama = meta.get("llama_cpp") or {}
    setup = llama.get("setup") or {}
    bw = meta.get("read_bandwidth") or {}
    out = []
    ref_desc = (f"llama.cpp's own `llama-bench` (llama.cpp {llama.get('build_commit', '?')}, "
                f"from llama-cpp-python {setup.get('llama_cpp_python', '?')}'s source, "
                f"built by `scripts/setup.sh --bench` with {setup.get('flags', '?')}; "
                f"the faster of flash attention on and off per shape)") if llama else \
        "no reference (run without llama-bench)"
    out.append(f"Single stream, `entrokv bench generate`, measured {meta.get('date', '?')} on "
               f"{llama.get('cpu_info', 'this machine')}, {need(meta, 'threads', path)} threads, "
               f"entrokv {meta.get('entrokv_commit', '?')} against {ref_desc}. "
               f"The engines alternate over {need(meta, 'reps', path)} repetitions; "
               f"tokens/s as median (min-max), ratios of the medians. A context of N is a prompt "
               f"of N - {need(meta, 'n_decode', path)} tokens of real text, then "
               f"{meta['n_decode']} greedy decode steps.")
    out.append("")
    out.append("| context | prefill tok/s entrokv | llama.cpp (FA) | ratio "
               "| decode tok/s entrokv | llama.cpp (FA) | ratio | decode / bound entrokv, llama.cpp |")
    out.append("|---|---|---|---|---|---|---|---|")
    for c in contexts:
        ours = by.get(("entrokv", c))
        if not ours:
            raise InputError(f"{path}: no entrokv summary at context {c}")
        ref = by.get(("llama.cpp", c))
        ratio = ratios.get(c)
        cells = [str(c), spread(ours["prefill_tokens_per_s"])]
        if ref and ratio:
            cells += [f"{spread(ref['prefill_tokens_per_s'])} ({ref['prefill_flash_attn']})",
                      f"{ratio['prefill_ratio']:.2f}x"]
        else:
            cells += ["-", "-"]
        cells.append(spread(ours["decode_tokens_per_s"]))
        if ref and ratio:
            cells += [f"{spread(ref['decode_tokens_per_s'])} ({ref['decode_flash_attn']})",
                      f"{ratio['decode_ratio']:.2f}x"]
        else:
            cells += ["-", "-"]
        fr = [r.get("decode_fraction_of_bound") for r in (ours, ref) if r]
        cells.append(", ".join(f"{f:.2f}" for f in fr if f is not None) or "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if bw:
        ws = bw.get("weights_sized") or {}
        out.append(f"The bound is the streaming read bandwidth measured in the same run "
                   f"({bw['threads']} threads over {bw['buffer_mib']} MiB, best pass before or after "
                   f"the rounds: {bw['best_gb_per_s']:.1f} GB/s) over the bytes one decode step "
                   f"reads (every weight, and the fp16 K and V of every cached token)."
                   + (f" Over a buffer the size of the weights ({ws['bytes'] / 1e6:.0f} MB), which "
                      f"a large last-level cache may hold, the same kernel reads "
                      f"{ws['best']:.1f} GB/s." if ws else ""))
        out.append("")
    return out


def serve_section(rows, path):
    meta = one(rows, "serve_meta", path)
    waves = [r for r in rows if r["bench"] == "serve"]
    if not waves:
        raise InputError(f"{path}: no serve lines")
    ls = meta.get("llama_server") or {}
    out = [f"Serving, `entrokv bench serve`, measured {meta.get('date', '?')}: C concurrent "
           f"streaming clients, {meta.get('max_tokens', '?')} output tokens per request "
           f"(end-of-generation ignored), prompts of {meta.get('prompt_chars', '?')} characters "
           f"of real text, {need(meta, 'threads', path)} threads, {meta.get('ctx', '?')} "
           f"tokens of context per sequence; entrokv's KV pool {meta.get('kv_tokens', '?')} "
           f"tokens, against "
           + (f"llama.cpp's `llama-server {ls.get('args', '')}` ({ls.get('version', '?')})."
              if ls else "no reference.")]
    out.append("")
    out.append("| C | server | output tok/s | vs llama-server | TTFT p50 / p99 | ITL p50 / p99 "
               "| failed |")
    out.append("|---|---|---|---|---|---|---|")
    ref = {r["concurrency"]: r for r in waves if r.get("server") == "llama.cpp-server"}
    order = {}
    for r in waves:
        order.setdefault(need(r, "server", path), len(order))
    for r in sorted(waves, key=lambda r: (need(r, "concurrency", path), order[r["server"]])):
        c = r["concurrency"]
        base = ref.get(c)
        vs = (f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
              if base and base["output_tokens_per_s"] and r is not base else "-")
        out.append(f"| {c} | {r['server']} | {r['output_tokens_per_s']:.1f} | {vs} | "
                   f"{secs(r.get('ttft_p50_s'))} / {secs(r.get('ttft_p99_s'))} | "
                   f"{secs(r.get('itl_p50_s'))} / {secs(r.get('itl_p99_s'))} | "
                   f"{r.get('failed', 0)} of {r.get('requests', '?')} |")
    out.append("")
    return out


def section(gen_paths, serve_path):
    sources = ", ".join(gen_paths + [serve_path])
    out = [BEGIN,
           "<!-- generated by scripts/perf_readme.py from " + sources
           + "; edit those (by re-measuring: scripts/perf_run.sh), not this -->", ""]
    for gen_path in gen_paths:
        out += generate_section(read_jsonl(gen_path), gen_path)
    out += serve_section(read_jsonl(serve_path), serve_path)
    out += ["Re-measure and regenerate:", "", "```sh",
            "bash scripts/setup.sh --bench   # llama.cpp's llama-bench and llama-server",
            "bash scripts/perf_run.sh        # writes " + sources,
            "python3 scripts/perf_readme.py  # this section, from those files", "```", END]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generate", action="append")
    ap.add_argument("--serve", default="docs/eval/perf-serve.jsonl")
    ap.add_argument("--readme", default="README.md")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--print", action="store_true")
    a = ap.parse_args()
    gen = a.generate or sorted(glob.glob("docs/eval/perf-generate*.jsonl"))
    if not gen:
        print("perf_readme: no docs/eval/perf-generate*.jsonl (run scripts/perf_run.sh) and no "
              "--generate", file=sys.stderr)
        return 2
    try:
        new = section(gen, a.serve)
    except InputError as e:
        print(f"perf_readme: {e}", file=sys.stderr)
        return 2
    if a.print:
        sys.stdout.write(new)
        return 0
    try:
        text = open(a.readme, encoding="utf-8").read()
    except OSError as e:
        print(f"perf_readme: {a.readme}: {e.strerror}", file=sys.stderr)
        return 2
    b, e = text.find(BEGIN), text.find(END)
    if b < 0 or e < b or text.count(BEGIN) != 1 or text.count(END) != 1:
        print(f"perf_readme: {a.readme} needs exactly one '{BEGIN}' line followed by one "
              f"'{END}' line", file=sys.stderr)
        return 2
    updated = text[:b] + new.rstrip("\n") + text[e + len(END):]
    if a.check:
        if updated != text:
            print(f"perf_readme: {a.readme}'s performance section is not what {a.generate} and "
                  f"{a.serve} give; run scripts/perf_readme.py", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        open(a.readme, "w", encoding="utf-8").write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
