#!/usr/bin/env python3
"""gguf_truncate.py - a Llama GGUF cut to its first N layers, everything else
(tokenizer, chat template, embeddings, final norm, the kept layers' tensors,
their types and bytes) copied unchanged; llama.block_count becomes N.

Why: the device machine takes at most 64 MiB with a run (docs/cuda.md,
"Serving on the GPU"), and the demo model is 98 MB. Its first 4 layers keep
the real tokenizer, chat template and Q4_1 weights (about 27 MB), so
`entrokv serve --device cuda` there serves text prompts through the real
dequantization path; the completions are not the full model's, and the
device check compares the GPU server's tokens with the CPU server's on the
same cut file.

With --embd-q4-1, a Q8_0 token_embd (the demo model's: 30 MB, the
largest tensor) is requantized to Q4_1 (17.7 MB) as ggml's
quantize_row_q4_1 does (per 32 values: d = (max - min) / 15, m = min,
q = min(15, int((x - m) / d + 0.5))); that needs numpy.

Usage: scripts/gguf_truncate.py IN.gguf OUT.gguf --layers N [--embd-q4-1]
Standard library only otherwise.
"""
import argparse
import re
import struct
import sys

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
          U64: "Q", I64: "q", F64: "d"}
# ggml tensor types: (block elements, block bytes)
TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
         10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
         30: (1, 2)}


class Reader:
    def __init__(self, buf):
        self.b, self.o = buf, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.b, self.o)
        self.o += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.b[self.o:self.o + n]
        self.o += n
        return s

    def value(self, t):
        """The raw bytes of one value of type t (read past)."""
        start = self.o
        if t in SCALAR:
            self.take(SCALAR[t])
        elif t == STR:
            self.string()
        elif t == ARR:
            et, n = self.take("I"), self.take("Q")
            for _ in range(n):
                self.value(et)
        else:
            raise ValueError(f"unknown GGUF value type {t}")
        return self.b[start:self.o]


def q8_0_to_q4_1(raw, n):
    """Q8_0 blocks (f16 d, 32 int8) of n values -> Q4_1 blocks (f16 d, f16 m, 16 bytes)."""
    import numpy as np
    b = np.frombuffer(raw, dtype=np.uint8).reshape(n // 32, 34)
    x = b[:, 2:].view(np.int8).astype(np.float32) * b[:, :2].copy().view(np.float16).astype(np.float32)
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / 15.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, ((x - lo[:, None]) * inv[:, None] + 0.5).astype(np.int32)).astype(np.uint8)
    out = np.empty((n // 32, 20), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = lo.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--embd-q4-1", action="store_true",
                    help="requantize a Q8_0 token_embd to Q4_1 (numpy)")
    a = ap.parse_args()
    with open(a.src, "rb") as f:
        buf = f.read()
    r = Reader(buf)
    if buf[:4] != b"GGUF":
        sys.exit(f"{a.src}: not a GGUF file")
    r.o = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kvs, align, arch = [], 32, "llama"
    for _ in range(n_kv):
        key = r.string()
        t = r.take("I")
        raw = r.value(t)
        k = key.decode()
        if k == "general.alignment":
            align = struct.unpack("<I", raw)[0]
        if k == "general.architecture":
            arch = raw[8:].decode()
        kvs.append((key, t, raw))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("I")
        dims = [r.take("Q") for _ in range(nd)]
        t, off = r.take("I"), r.take("Q")
        tensors.append([name.decode(), dims, t, off])
    data0 = (r.o + align - 1) // align * align
    ends = sorted(x[3] for x in tensors) + [len(buf) - data0]

    def size(tn):
        n = 1
        for d in tn[1]:
            n *= d
        if tn[2] in TYPES:
            be, bb = TYPES[tn[2]]
            return n // be * bb
        return next(e for e in ends if e > tn[3]) - tn[3]  # to the next tensor

    key_blocks = f"{arch}.block_count".encode()
    old_layers = None
    out_kv = []
    for key, t, raw in kvs:
        if key == key_blocks:
            old_layers = struct.unpack("<I", raw)[0]
            raw = struct.pack("<I", a.layers)
        out_kv.append((key, t, raw))
    if old_layers is None or not 1 <= a.layers <= old_layers:
        sys.exit(f"--layers {a.layers}: the model has {old_layers} ({key_blocks.decode()})")
    blk = re.compile(r"blk\.(\d+)\.")
    kept = [tn for tn in tensors if not (blk.match(tn[0]) and int(blk.match(tn[0])[1]) >= a.layers)]
    data = {}  # name -> replaced bytes
    for tn in kept:
        if a.embd_q4_1 and tn[0] == "token_embd.weight" and tn[2] == 8:
            n = size(tn) // 34 * 32
            data[tn[0]] = q8_0_to_q4_1(buf[data0 + tn[3]:data0 + tn[3] + size(tn)], n)
            tn[2] = 3
    def size_of(tn):
        return len(data[tn[0]]) if tn[0] in data else size(tn)
    head = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(kept), len(out_kv)))
    for key, t, raw in out_kv:
        head += struct.pack("<Q", len(key)) + key + struct.pack("<I", t) + raw
    off, infos = 0, []
    for tn in kept:
        nb = tn[0].encode()
        info = struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(tn[1]))
        info += b"".join(struct.pack("<Q", d) for d in tn[1]) + struct.pack("<IQ", tn[2], off)
        infos.append(info)
        off = (off + size_of(tn) + align - 1) // align * align
    for info in infos:
        head += info
    head += b"\0" * ((-len(head)) % align)
    with open(a.dst, "wb") as f:
        f.write(head)
        pos = 0
        for tn in kept:
            n = size_of(tn)
            f.write(data[tn[0]] if tn[0] in data else buf[data0 + tn[3]:data0 + tn[3] + n])
            pad = (-n) % align
            f.write(b"\0" * pad)
            pos += n + pad
    print(f"{a.dst}: {a.layers} of {old_layers} layers, {len(kept)} of {len(tensors)} tensors, "
          f"{len(head) + pos} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
