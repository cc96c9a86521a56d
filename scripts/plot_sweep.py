"""Plots `entrokv eval sweep`'s CSV: quality against KV memory per sequence,
one line per method (perplexity ratio to full KV, and passkey accuracy).
The perplexity panel's x is the KV held on average over the continuation
(kv_bytes_held: what decode methods such as SCOPE and H2O bound) where the
CSV has it, else the KV right after the prompt's compression.
Usage: plot_sweep.py sweep.csv sweep.png"""
import csv
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
methods = []
for r in rows:
    if r["method"] not in methods:
        methods.append(r["method"])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
for m in methods:
    rs = sorted((r for r in rows if r["method"] == m), key=lambda r: float(r["kv_bytes_ppl"]))
    held = "kv_bytes_held" if rs and rs[0].get("kv_bytes_held") else "kv_bytes_ppl"
    rs.sort(key=lambda r: float(r[held]))
    mib = [float(r[held]) / 2**20 for r in rs]
    # composed methods (snapkv+spark0.5, full+h2o) dashed, zero-fill dotted
    ls = ":" if m.endswith("z") else "--" if "+" in m else "-"
    style = dict(marker="o", label=m, linestyle=ls,
                 linewidth=2 if m.startswith("uncomp") else 1)
    ax1.plot(mib, [float(r["ppl_ratio"]) for r in rs], **style)
    pk = sorted(rs, key=lambda r: float(r["kv_bytes_passkey"]))
    mib_pk = [float(r["kv_bytes_passkey"]) / 2**20 for r in pk]
    ax2.plot(mib_pk, [float(r["passkey_accuracy"]) for r in pk], **style)
ax1.set_xscale("log")

ax1.set_xlabel("KV MiB held per sequence (mean over the continuation)"
               if rows and rows[0].get("kv_bytes_held") else "KV MiB per sequence (from the pool)")
ax1.set_ylabel("perplexity / full-KV perplexity")
ax1.set_title("continuation perplexity")
ax2.set_xscale("log")
ax2.set_xlabel("KV MiB per sequence (from the pool)")
ax2.set_ylabel("accuracy")
ax2.set_ylim(-0.05, 1.05)
ax2.set_title("passkey retrieval")
plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2x10^1
for ax in (ax1, ax2):
    ax.grid(True, which="both", alpha=0.3)
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
ax2.legend(fontsize="small", ncol=2 if len(methods) > 8 else 1)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
