#!/usr/bin/env bash
# Build llama-cpp-python once per machine and print the wheel's path.
#
# Why not `pip install llama-cpp-python`: its default -march=native build enables AMX on
# Sapphire-Rapids-class VMs whose kernels do not grant AMX tile state, and llama.cpp then dies
# with SIGILL in Q8_0/Q4 matmuls. We build for the CPU's vector extensions with AMX off, and
# cache the wheel under a key of version + flags, since pip's own wheel cache ignores flags.
#
# PLM_LLAMA_ISA=avx2 builds without AVX-512 even on an AVX-512 CPU: llama.cpp as it runs on an
# AVX2-only host (most laptops and desktops), for `benchmarks/edge.py --isa avx2`.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${1:-python3}"
source "$(dirname "$0")/llama_cmake_flags.sh"  # ARGS
KEY=$(echo "$VERSION $ARGS $(uname -m)" | sha256sum | cut -c1-12)
DIR="${PLM_WHEEL_CACHE:-$HOME/.cache/plm/wheels}/llama-cpp-python-$VERSION-$KEY"
if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (about 10 minutes on 2 cores; cached in $DIR)" >&2
  mkdir -p "$DIR.tmp"
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip wheel -q --no-cache-dir --no-deps -w "$DIR.tmp" "llama-cpp-python==$VERSION" >&2
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
ls "$DIR"/llama_cpp_python-*.whl
