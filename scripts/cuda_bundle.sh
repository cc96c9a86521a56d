#!/usr/bin/env bash
# cuda_bundle.sh - what `entrokv serve --device cuda` needs on a GPU machine
# that has CUDA, python3 and torch but none of the serving libraries (gRPC,
# protobuf-c, libmicrohttpd, UCX, GnuTLS, cJSON, OpenMPI, LAPACKE) and no
# network: one directory, carried with the device run (docs/cuda.md,
# "Serving on the GPU"; tests/cuda/device-check.sh uses it when present).
#
# Usage: scripts/cuda_bundle.sh [BUILD] [OUTDIR]
#   BUILD   a Release build with CUDA (default build/release; its entrokv must
#           say "CUDA backend: on" at configure)
#   OUTDIR  default .cudabundle (in .git/info/exclude, so it travels only when
#           a run names it in carry)
# Env: EKV_BUNDLE_PY="3.12"   Python versions to fetch wheels for (the lent
#                              image's python3 is 3.12.3, KINDS.md); "" none
#      EKV_BUNDLE_MODEL=PATH   the GGUF to cut (default models/SmolLM2-...Q4_1.gguf)
#      EKV_BUNDLE_LAYERS=4     layers kept (scripts/gguf_truncate.py)
#      EKV_BUNDLE_MAX_MIB=54   fail above this (64 MiB travel in all, with the
#                              tracked tree's ~8)
#
# OUTDIR/
#   payload.tar.xz     bin/, lib/, sys/ and run, unpacked on the GPU machine
#                      (tar -xJf payload.tar.xz -C DIR; device-check.sh does):
#     bin/entrokv      the binary (stripped)
#     lib/             every shared library it loads except glibc's, the
#                      compiler runtime's and the CUDA driver / toolkit's
#                      (libcuda, libcudart, libcublas*, libcusolver*, ...,
#                      which the GPU machine's CUDA 13 provides); reference
#                      LAPACK / BLAS in place of OpenBLAS (36 MB)
#     sys/             glibc, libstdc++, libgcc_s and the dynamic loader of
#                      this machine: used only when the binary cannot start
#                      on the GPU machine's own (an older glibc)
#     run              run PROGRAM ARGS with the bundle's libraries
#                      (`DIR/run entrokv serve ...`); EKV_BUNDLE_LOADER=1
#                      forces the carried loader, 0 the machine's
#   include/cjson/cJSON.h  for the standalone CUDA build there (its
#                      libcjson.so.1 is the payload's lib/)
#   py/                entrokv_pb2.py, health_pb2.py (+ _grpc; serve_check.py
#                      needs only entrokv_pb2)
#   whl/               wheels (protobuf, openai and its needs; grpcio with
#                      EKV_BUNDLE_GRPCIO=1) for pip install --no-index --target
#   model/demo-cut.gguf  the demo model's first EKV_BUNDLE_LAYERS layers, its
#                      Q8_0 embedding requantized to Q4_1 (28 MB at 4 layers)
#   MANIFEST.txt       what is in it, sizes, the commit
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build/release}
OUT=${2:-$ROOT/.cudabundle}
PYVERS=${EKV_BUNDLE_PY-3.12}
MODEL=${EKV_BUNDLE_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
LAYERS=${EKV_BUNDLE_LAYERS:-4}
MAX_MIB=${EKV_BUNDLE_MAX_MIB:-54}
PY=${EKV_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

BIN="$BUILD/entrokv"
[ -x "$BIN" ] || { echo "cuda_bundle: no $BIN (build it first)" >&2; exit 1; }
if ! grep -q "EKV_CUDA:BOOL=ON" "$BUILD/CMakeCache.txt" 2>/dev/null; then
    echo "cuda_bundle: $BUILD was configured without CUDA (EKV_CUDA=OFF)" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"/{bin,lib,sys,py,whl,model}
# the bundle folder must not travel unless named in carry
if [ "$OUT" = "$ROOT/.cudabundle" ] && [ -d "$ROOT/.git" -o -f "$ROOT/.git" ]; then
    EXCL="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
    case "$EXCL" in /*) ;; *) EXCL="$ROOT/$EXCL" ;; esac
    mkdir -p "$(dirname "$EXCL")"
    grep -qx '/.cudabundle/' "$EXCL" 2>/dev/null || echo '/.cudabundle/' >> "$EXCL"
fi

cp "$BIN" "$OUT/bin/entrokv"
strip --strip-unneeded "$OUT/bin/entrokv" 2>/dev/null || true

# Which libraries stay behind: the GPU machine's CUDA toolkit and driver
# provide the CUDA ones (same major version: the build's nvcc is 13.x); the
# C runtime is the machine's own unless its glibc is too old (then sys/).
is_cuda() {
    case "$1" in
        libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*|libcusolver.so*|libcusparse.so*|\
        libnvJitLink.so*|libnvidia-*|libcurand.so*|libcufft.so*|libnccl.so*|libnvrtc.so*) return 0 ;;
    esac
    return 1
}
is_sys() {
    case "$1" in
        linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|\
        libresolv.so*|libutil.so*|libanl.so*|libstdc++.so*|libgcc_s.so*) return 0 ;;
    esac
    return 1
}
missing=0
while read -r name _ path _; do
    [ -n "${name:-}" ] || continue
    case "$name" in /*) continue ;; esac # the loader, by its path (below)
    if [ "$path" = "not" ]; then
        is_cuda "$name" || { echo "cuda_bundle: $name not found here" >&2; missing=1; }
        continue
    fi
    if is_cuda "$name"; then
        echo "$name (left for the GPU machine's CUDA)" >> "$OUT/.cuda-libs"
    elif is_sys "$name"; then
        cp -L "$path" "$OUT/sys/$name"
    elif [ -f "$path" ]; then
        cp -L "$path" "$OUT/lib/$name"
    fi
done < <(ldd "$OUT/bin/entrokv" | sed -n 's/^\s*\(\S*\) => \(.*\) (0x.*)$/\1 x \2 y/p;
                                         s/^\s*\(\S*\) => not found$/\1 x not y/p;
                                         s/^\s*\(\/\S*ld-linux\S*\) (0x.*)$/\1 x \1 y/p')
[ $missing -eq 0 ] || exit 1
# LAPACK: the reference build (LAPACKE's dsyev is only the CPU entropy's)
# where the system's alternative is OpenBLAS, whose 36 MB would not travel
A=/usr/lib/x86_64-linux-gnu
if [ -e "$OUT/lib/libopenblas.so.0" ] && [ -r $A/lapack/liblapack.so.3 ] && [ -r $A/blas/libblas.so.3 ]; then
    cp -L $A/lapack/liblapack.so.3 $A/blas/libblas.so.3 "$OUT/lib/"
    rm -f "$OUT/lib/libopenblas.so.0"
fi
ld=$(ldd "$OUT/bin/entrokv" | sed -n 's/^\s*\(\/\S*ld-linux[^ ]*\) .*/\1/p' | head -1)
[ -n "$ld" ] && cp -L "$ld" "$OUT/sys/$(basename "$ld")"
strip --strip-unneeded "$OUT"/lib/*.so* 2>/dev/null || true

cat > "$OUT/run" <<'RUN'
#!/bin/sh
# run PROGRAM ARGS: bin/PROGRAM with this bundle's libraries. The machine's
# own glibc when the program starts with it, else the carried loader and C
# runtime (sys/); EKV_BUNDLE_LOADER=1 forces the carried ones, 0 the machine's.
d=$(cd "$(dirname "$0")" && pwd)
p=$1; shift
case "$p" in */*) ;; *) p="$d/bin/$p" ;; esac
cuda="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"
lp="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$cuda"
mode=${EKV_BUNDLE_LOADER:-}
if [ -z "$mode" ]; then
    if LD_LIBRARY_PATH="$lp" "$p" --help >/dev/null 2>&1; then mode=0; else mode=1; fi
fi
if [ "$mode" = 1 ]; then
    ld=$(ls "$d"/sys/ld-linux* | head -1)
    exec "$ld" --library-path "$d/lib:$d/sys:$cuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$p" "$@"
fi
LD_LIBRARY_PATH="$lp" exec "$p" "$@"
RUN
chmod +x "$OUT/run"

# cJSON's header: the standalone CUDA build there links the payload's
# libcjson.so.1 with it (tests/cuda/standalone, EKV_CJSON_DIR)
mkdir -p "$OUT/include/cjson"
cp /usr/include/cjson/cJSON.h "$OUT/include/cjson/"

# gRPC stubs (generated here: the GPU machine has no grpcio-tools)
"$PY" - "$ROOT/proto" "$OUT/py" <<'PYSTUB'
import os, sys
from grpc_tools import protoc
src, out = sys.argv[1], sys.argv[2]
inc = os.path.join(os.path.dirname(protoc.__file__), "_proto")
for name in ("entrokv.proto", "health.proto"):
    if protoc.main(["protoc", f"-I{src}", f"-I{inc}", f"--python_out={out}",
                    f"--grpc_python_out={out}", os.path.join(src, name)]):
        sys.exit(f"protoc failed on {name}")
PYSTUB

# wheels: protobuf at the version the stubs were generated with, and the
# openai client with its needs. Not grpcio (7 MB a Python version): the GPU
# image has one, and serve_check.py calls Generate without the
# entrokv_pb2_grpc module that would insist on this grpcio-tools' version
# (EKV_BUNDLE_GRPCIO=1 carries it anyway).
pins=$("$PY" -c 'import google.protobuf as p; print(f"protobuf=={p.__version__}")')
[ "${EKV_BUNDLE_GRPCIO:-0}" = 1 ] && pins="$pins $("$PY" -c 'import grpc; print(f"grpcio=={grpc.__version__}")')"
for v in $PYVERS; do
    "$PY" -m pip download -q --only-binary=:all: --python-version "$v" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$OUT/whl" $pins openai
done

# the demo model, cut to fit
if [ -r "$MODEL" ]; then
    "$PY" "$ROOT/scripts/gguf_truncate.py" "$MODEL" "$OUT/model/demo-cut.gguf" --layers "$LAYERS" \
        --embd-q4-1
else
    echo "cuda_bundle: $MODEL absent: no model in the bundle" >&2
fi

{
    echo "entrokv CUDA bundle, $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"
    echo "binary: $(cd "$OUT" && ./run entrokv --help >/dev/null 2>&1 && echo starts || echo DOES NOT START)"
    cat "$OUT/.cuda-libs" 2>/dev/null
    (cd "$OUT" && du -ab bin lib sys py whl model | sort -k2)
} > "$OUT/MANIFEST.txt"
rm -f "$OUT/.cuda-libs"
# bin/, lib/, sys/ and run travel as one xz archive (about a third of their
# size); device-check.sh unpacks it (tar -xJf payload.tar.xz -C DIR)
tar -C "$OUT" -cf - run bin lib sys | xz -6 -T0 > "$OUT/payload.tar.xz"
rm -rf "$OUT/bin" "$OUT/lib" "$OUT/sys" "$OUT/run"
bytes=$(du -sb "$OUT" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "cuda_bundle: $OUT: $mib MiB (limit $MAX_MIB)" >&2
[ "$mib" -le "$MAX_MIB" ] || { echo "cuda_bundle: too large to travel" >&2; exit 1; }
