#!/usr/bin/env python3
"""make_gguf_seeds.py - writes the small synthetic seed files for fuzz_gguf.

The seeds cover each structural feature of GGUF once (v2 and v3 headers, every
scalar type, numeric/string/nested arrays, custom alignment, tensors of several
block types) so the fuzzer starts from valid files and mutates inward. No model
data: tensor bytes are a counter pattern. Each file stays under 4 KB.

Usage: tests/fuzz/make_gguf_seeds.py [outdir]   (default tests/fuzz/corpus/gguf)
"""
import os
import struct
import sys

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i",
              F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml type -> (elements per block, bytes per block)
BLOCKS = {0: (1, 4), 1: (1, 2), 3: (32, 20), 8: (32, 34), 12: (256, 144)}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(value(et, x) for x in items)
    return struct.pack(SCALAR_FMT[t], v)


def gguf(version, kvs, tensors=(), align=32):
    """kvs: [(key, type, value)]; tensors: [(name, ne, ggml_type)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gstr(key) + struct.pack("<I", t) + value(t, v)
    infos, data = b"", b""
    for name, ne, gt in tensors:
        per, nb = BLOCKS[gt]
        rows = 1
        for d in ne[1:]:
            rows *= d
        nbytes = ne[0] // per * nb * rows
        data += b"\0" * (-len(data) % align)
        infos += gstr(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        infos += struct.pack("<IQ", gt, len(data))
        data += bytes((i * 7 + 1) & 0xFF for i in range(nbytes))
    out += infos
    if tensors:
        out += b"\0" * (-len(out) % align) + data
    return out


SEEDS = {
    "minimal_v3.gguf": gguf(3, []),
    "scalars_v2.gguf": gguf(2, [
        ("t.u8", U8, 200), ("t.i8", I8, -100), ("t.u16", U16, 60000),
        ("t.i16", I16, -30000), ("t.u32", U32, 4000000000), ("t.i32", I32, -2000000000),
        ("t.f32", F32, 1.5), ("t.bool", BOOL, True), ("t.str", STR, "h\u00e9llo"),
        ("t.u64", U64, 2**63 + 5), ("t.i64", I64, -2**62), ("t.f64", F64, 3.25),
    ]),
    "arrays_v3.gguf": gguf(3, [
        ("a.i32", ARR, (I32, [1, -2, 3])),
        ("a.f32", ARR, (F32, [0.5, -1.25])),
        ("a.str", ARR, (STR, ["<|endoftext|>", "<|im_start|>", "", "\u0120t"])),
        ("a.nested", ARR, (ARR, [(U8, [1, 2]), (STR, ["x"]), (ARR, [(I64, [7])])])),
        ("a.empty", ARR, (U32, [])),
        ("a.bool", ARR, (BOOL, [True, False])),
        ("a.u64", ARR, (U64, [2**64 - 1, 42])),
    ]),
    "tensors_align64_v3.gguf": gguf(3, [
        ("general.architecture", STR, "llama"), ("general.alignment", U32, 64),
    ], [
        ("tok", (8, 2), 0), ("f16", (4, 3, 2, 1), 1), ("q8", (64, 3), 8),
        ("q41", (32, 1, 2), 3), ("q4k", (256,), 12),
    ], align=64),
    "llama_like_v3.gguf": gguf(3, [
        ("general.architecture", STR, "llama"), ("general.name", STR, "seed"),
        ("llama.block_count", U32, 1), ("llama.context_length", U32, 64),
        ("llama.embedding_length", U32, 32), ("llama.attention.head_count", U32, 2),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.tokens", ARR, (STR, ["<|endoftext|>", "<|im_start|>", "a", "b"])),
        ("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 1, 1])),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b"])),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
    ], [
        ("token_embd.weight", (32, 4), 8), ("blk.0.attn_norm.weight", (32,), 0),
        ("output_norm.weight", (32,), 0),
    ]),
}


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "gguf")
    os.makedirs(outdir, exist_ok=True)
    for name, blob in SEEDS.items():
        assert len(blob) < 4096, (name, len(blob))
        with open(os.path.join(outdir, name), "wb") as fh:
            fh.write(blob)
        print("%s: %d bytes" % (name, len(blob)))


if __name__ == "__main__":
    main()
