#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (its HTTP server with continuous batching, `-np N`) from
# the llama.cpp sources inside the llama-cpp-python sdist, so it is exactly the llama.cpp that
# our Python binding and parity tests use. Prints the binary's path; cached per version + flags.
#
#   scripts/build_llama_server.sh [PYTHON]     # build once (5-15 minutes on 2 cores)
#   scripts/build_llama_server.sh --path       # print where it would be; exit 1 if not built
#
# For benchmarks/serve.py only; never run in CI. The CPU flags are the wheel's
# (scripts/llama_cmake_flags.sh: the CPU's vector extensions, AMX off; PLM_LLAMA_ISA=avx2 as
# there); no network at build time (no prebuilt web UI download, no OpenSSL).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
source "$(dirname "$0")/llama_cmake_flags.sh"  # ARGS
KEY=$(echo "$VERSION $ARGS $(uname -m)" | sha256sum | cut -c1-12)
DIR="${PLM_LLAMA_SERVER_CACHE:-$HOME/.cache/plm/llama-server}/$VERSION-$KEY"
BIN="$DIR/llama-server"
if [ "${1:-}" = "--path" ]; then
  echo "$BIN"
  [ -x "$BIN" ]
  exit
fi
PY="${1:-python3}"
if [ ! -x "$BIN" ]; then
  for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "build_llama_server.sh: $tool not found" >&2; exit 2; }
  done
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  echo "downloading the llama-cpp-python $VERSION sdist (its vendor/llama.cpp)" >&2
  "$PY" -m pip download -q --no-binary :all: --no-deps -d "$WORK" "llama-cpp-python==$VERSION" >&2
  tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
  echo "building llama-server (5-15 minutes on 2 cores; cached in $DIR)" >&2
  # shellcheck disable=SC2086
  cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release $ARGS -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
  cmake --build "$WORK/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
  mkdir -p "$DIR.tmp"
  cp "$(find "$WORK/build" -name llama-server -type f -perm -u+x | head -1)" "$DIR.tmp/llama-server"
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
echo "$BIN"
