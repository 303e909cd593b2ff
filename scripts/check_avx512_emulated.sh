#!/usr/bin/env bash
# Check the AVX-512 kernels on a host without AVX-512: build the kernel library with its
# AVX-512 units compiled against SIMDe's portable emulation (plus plm/infer/csrc/simde_shim.h
# for the intrinsics SIMDe lacks), then run the kernel and decoder tests on that path. The
# emulated build lives under its own cache key and never replaces the real one.
#
#   apt-get install libsimde-dev      # once (Debian/Ubuntu)
#   scripts/check_avx512_emulated.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  echo "SIMDe headers not found (/usr/include/simde): apt-get install libsimde-dev" >&2
  exit 2
fi
export PLM_KERNEL_EMULATE_AVX512=1
"$PY" -m plm kernels build
# every test that runs per path, on the emulated AVX-512 one; the decoder tests with it forced
"$PY" -m pytest tests/test_kernels.py -q -k "avx512 or bit_identical" "$@"
PLM_NATIVE_ISA=avx512 "$PY" -m pytest tests/test_native_decoder.py -q -k "not llama" "$@"
