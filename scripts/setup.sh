#!/usr/bin/env bash
# setup.sh - install every dependency by package name, build, fetch the model.
#
# Idempotent: re-running skips what is already there. Usage:
#   scripts/setup.sh            # Debian packages, Python venv, Release build, model
#   scripts/setup.sh --bench    # also llama.cpp's llama-bench and llama-server, the benchmark
#                               # reference (scripts/setup_llamacpp.sh; ~15 min on 2 cores)
#   scripts/setup.sh --fixtures # also llama-cpp-python, which tests/fixtures/make_fixtures.py uses
#   scripts/setup.sh --no-build # dependencies only
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
want_fixtures=0
want_build=1
for arg in "$@"; do
    case "$arg" in
        --bench) want_bench=1 ;;
        --fixtures) want_fixtures=1 ;;
        --no-build) want_build=0 ;;
        *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

# Debian packages. The serving, KV store and TP modules use gRPC, protobuf-c,
# UCX, OpenMPI, libmicrohttpd, cJSON and LAPACKE; they are installed from day
# one so the build finds them. NCCL comes with the CUDA toolkit where present.
apt_packages=(
    build-essential cmake pkg-config git unzip ca-certificates
    clang libclang-rt-14-dev
    python3 python3-venv python3-pip
    libgrpc-dev protobuf-compiler-grpc libprotobuf-c-dev protobuf-c-compiler
    libucx-dev ucx-utils iproute2
    libopenmpi-dev openmpi-bin
    libmicrohttpd-dev libgnutls28-dev libcjson-dev
    liblapacke-dev libopenblas-dev
    curl
    prometheus  # promtool, which checks /metrics in tests/serve
)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "setup: installing ${missing[*]}"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python: a project venv, so a system Python marked externally-managed is fine.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# venv's own pip installs these wheels; upgrading it first cost CI time.
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt \
    -r scripts/requirements-deploy.txt
# checkov (tests/deploy) in a venv of its own: it pins packaging<24, which
# pytest 9 cannot use. About 50 s the first time, 2 s once installed.
if [ ! -x .venv/checkov/bin/python ]; then
    python3 -m venv .venv/checkov
fi
.venv/checkov/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements-checkov.txt
if [ "$want_fixtures" = 1 ]; then
    .venv/bin/python -c "import llama_cpp" 2>/dev/null ||
        CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/python -m pip install -q -r scripts/requirements-bench.txt
fi
if [ "$want_bench" = 1 ]; then
    bash scripts/setup_llamacpp.sh
fi

if [ "$want_build" = 1 ]; then
    cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build build/release -j"$(nproc)" --target entrokv
    PATH="$PWD/.venv/bin:$PATH" build/release/entrokv fetch-model --dir models >/dev/null
fi
