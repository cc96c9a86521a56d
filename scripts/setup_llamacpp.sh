#!/usr/bin/env bash
# setup_llamacpp.sh - build llama.cpp's own llama-bench and llama-server, the
# reference for `entrokv bench generate` and `entrokv bench serve`.
#
# Source: the llama.cpp tree vendored in llama-cpp-python's source package on
# PyPI (pip download --no-binary :all:), pinned by scripts/requirements-bench.txt.
# Built natively (-march=native via GGML_NATIVE, Release, static, no CURL, no
# OpenSSL, no web UI), only those two targets, into build/llamacpp/:
#   build/llamacpp/bin/llama-bench, build/llamacpp/bin/llama-server
#   build/llamacpp/version.json   {"llama_cpp_python":..,"llama_cpp_commit":..,"flags":..}
# Idempotent: a finished build whose version.json names the pinned version is
# kept. Prints the versions. Called by scripts/setup.sh --bench.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/build/llamacpp"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
want=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' scripts/requirements-bench.txt)
[ -n "$want" ] || { echo "setup_llamacpp: no llama-cpp-python==X pin in scripts/requirements-bench.txt" >&2; exit 2; }
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
       -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CUDA=OFF)

show_versions() {
    cat "$root/version.json"
    "$root/bin/llama-bench" --version 2>&1 | head -n 2 || true
}

if [ -x "$root/bin/llama-bench" ] && [ -x "$root/bin/llama-server" ] &&
    grep -q "\"llama_cpp_python\": \"$want\"" "$root/version.json" 2>/dev/null; then
    echo "setup_llamacpp: llama.cpp from llama-cpp-python $want already built in $root"
    show_versions
    exit 0
fi

mkdir -p "$root/dl"
sdist="$root/dl/llama_cpp_python-$want.tar.gz"
if [ ! -f "$sdist" ]; then
    echo "setup_llamacpp: downloading the llama-cpp-python $want source package"
    "$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
        "llama-cpp-python==$want" -d "$root/dl"
fi
src="$root/src/llama_cpp_python-$want"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$root/src"
    mkdir -p "$root/src"
    tar xzf "$sdist" -C "$root/src"
fi
llama="$src/vendor/llama.cpp"
# The sdist has no .git; its CHANGELOG names the llama.cpp commit it vendors.
commit=$(awk -v v="## [$want]" '$0 == v {on = 1; next} /^## \[/ {on = 0}
    on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
    "$src/CHANGELOG.md")
commit=${commit:-unknown}
jobs=$(nproc)
echo "setup_llamacpp: building llama-bench and llama-server (llama.cpp $commit), $jobs jobs"
# GIT_CEILING_DIRECTORIES: llama.cpp's build-info asks git for the commit, and
# without the ceiling git would answer with entrokv's own repository.
# Its compiler warnings go to the logs; on failure their tail is shown.
if ! GIT_CEILING_DIRECTORIES="$src/vendor" cmake -S "$llama" -B "$root/build" "${flags[@]}" \
    -DLLAMA_BUILD_COMMIT="$commit" >"$root/cmake.log" 2>&1; then
    tail -n 30 "$root/cmake.log" >&2
    echo "setup_llamacpp: configuring llama.cpp failed (log: $root/cmake.log)" >&2
    exit 1
fi
if ! nice -n 10 cmake --build "$root/build" -j"$jobs" --target llama-bench llama-server \
    >"$root/build.log" 2>&1; then
    grep -E "error|Error" "$root/build.log" | tail -n 30 >&2
    echo "setup_llamacpp: building llama.cpp failed (log: $root/build.log)" >&2
    exit 1
fi
mkdir -p "$root/bin"
cp "$root/build/bin/llama-bench" "$root/build/bin/llama-server" "$root/bin/"
printf '{"llama_cpp_python": "%s", "llama_cpp_commit": "%s", "source": "%s", "flags": "%s", "compiler": "%s"}\n' \
    "$want" "$commit" "pypi:llama-cpp-python==$want (vendor/llama.cpp)" "${flags[*]}" \
    "$(${CC:-cc} --version | head -n 1)" >"$root/version.json"
show_versions
