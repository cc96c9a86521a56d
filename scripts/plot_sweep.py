"""Plots `entrokv eval sweep`'s CSV: quality against KV memory per sequence,
one line per method (perplexity ratio to full KV, and passkey accuracy).
Usage: plot_sweep.py sweep.csv sweep.png"""
import csv
import sys

import matplotlib

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
    mib = [float(r["kv_bytes_ppl"]) / 2**20 for r in rs]
    style = dict(marker="o", label=m, linewidth=2 if m.startswith("uncomp") else 1)
    ax1.plot(mib, [float(r["ppl_ratio"]) for r in rs], **style)
    mib_pk = [float(r["kv_bytes_passkey"]) / 2**20 for r in rs]
    ax2.plot(mib_pk, [float(r["passkey_accuracy"]) for r in rs], **style)
ax1.set_xscale("log")

ax1.set_xlabel("KV MiB per sequence (from the pool)")
ax1.set_ylabel("perplexity / full-KV perplexity")
ax1.set_title("continuation perplexity")
ax2.set_xscale("log")
ax2.set_xlabel("KV MiB per sequence (from the pool)")
ax2.set_ylabel("accuracy")
ax2.set_ylim(-0.05, 1.05)
ax2.set_title("passkey retrieval")
for ax in (ax1, ax2):
    ax.grid(True, which="both", alpha=0.3)
ax2.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
