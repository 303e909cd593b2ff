# Sourced by scripts/build_llama_wheel.sh and scripts/build_llama_server.sh: sets ARGS, the CMake
# flags of llama.cpp's CPU backend for this machine: its vector extensions (AVX-512 with VNNI,
# VBMI and BF16 where present, AVX2, FMA, F16C), no -march=native, AMX off (Sapphire-Rapids-class
# VMs that do not grant AMX tile state SIGILL otherwise). PLM_LLAMA_ISA=avx2 leaves AVX-512 out
# even where the CPU has it (llama.cpp as it runs on an AVX2-only host); any value other than
# native or avx2 exits 2 before anything is built.
case "${PLM_LLAMA_ISA:-native}" in
  native|avx2) ;;
  *) echo "PLM_LLAMA_ISA must be native or avx2, got '${PLM_LLAMA_ISA}'" >&2; exit 2 ;;
esac
if [ "${PLM_LLAMA_ISA:-native}" = native ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  SIMD="-DGGML_AVX512=ON"
  for f in avx512_vbmi:VBMI avx512_vnni:VNNI avx512_bf16:BF16; do
    grep -qw "${f%%:*}" /proc/cpuinfo && SIMD="$SIMD -DGGML_AVX512_${f##*:}=ON"
  done
else
  SIMD=""
fi
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  SIMD="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $SIMD"
fi
ARGS="-DGGML_NATIVE=OFF $SIMD -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
