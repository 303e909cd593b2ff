// bf16 GEMV with AVX512-BF16 `vdpbf16ps`: 32 weight/activation pairs per instruction, fp32
// accumulation (activations already rounded to bf16 by the caller, as on every path).
// Separate from kernels_avx512.cpp because AVX512-VNNI hosts without BF16 exist (Cascade
// Lake, Ice Lake): only this function needs the extension.
#ifdef PLM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>
#endif

#include "plm_kernels.h"
#include "simde_shim.h"

namespace plm {
namespace {

inline __m512bh ldbh(const uint16_t* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

template <int MB>
void bf16_rows(const uint16_t* W, int64_t K, int64_t n, const uint16_t* xb, int64_t m0, float* y, int64_t ldy) {
  __m512 a0[MB], a1[MB];
  for (int i = 0; i < MB; i++) a0[i] = a1[i] = _mm512_setzero_ps();
  const __mmask32 all = 0xffffffffu;
  const uint16_t* w = W + n * K;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh w0 = ldbh(w + k, all), w1 = ldbh(w + k + 32, all);
    for (int i = 0; i < MB; i++) {
      a0[i] = _mm512_dpbf16_ps(a0[i], w0, ldbh(xb + (m0 + i) * K + k, all));
      a1[i] = _mm512_dpbf16_ps(a1[i], w1, ldbh(xb + (m0 + i) * K + k + 32, all));
    }
  }
  for (; k < K; k += 32) {  // zero-masked tail: missing pairs contribute 0 * 0
    const __mmask32 msk = K - k >= 32 ? all : (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh w0 = ldbh(w + k, msk);
    for (int i = 0; i < MB; i++) a0[i] = _mm512_dpbf16_ps(a0[i], w0, ldbh(xb + (m0 + i) * K + k, msk));
  }
  for (int i = 0; i < MB; i++) y[(m0 + i) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
}

// M = 1: 4 weight rows share each activation load; 8 independent accumulation chains.
void bf16_rows4(const uint16_t* W, int64_t K, int64_t n, const uint16_t* xb, float* y) {
  __m512 a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
  const __mmask32 all = 0xffffffffu;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh x0 = ldbh(xb + k, all), x1 = ldbh(xb + k + 32, all);
    for (int r = 0; r < 4; r++) {
      // the next 4 rows at the same offset: a row is only a few pages, too short for the
      // hardware prefetcher to ramp up on; this keeps 8 row streams in flight per thread
      _mm_prefetch((const char*)(W + (n + 4 + r) * K + k), _MM_HINT_T0);
      _mm_prefetch((const char*)(W + (n + 4 + r) * K + k + 32), _MM_HINT_T0);
      a[r][0] = _mm512_dpbf16_ps(a[r][0], ldbh(W + (n + r) * K + k, all), x0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], ldbh(W + (n + r) * K + k + 32, all), x1);
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 msk = K - k >= 32 ? all : (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh x0 = ldbh(xb + k, msk);
    for (int r = 0; r < 4; r++) a[r][0] = _mm512_dpbf16_ps(a[r][0], ldbh(W + (n + r) * K + k, msk), x0);
  }
  for (int r = 0; r < 4; r++) y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

}  // namespace

void gemv_bf16_avx512bf16(const void* W, int64_t K, int64_t n0, int64_t n1, const uint16_t* xb, int64_t M, float* y,
                          int64_t ldy) {
  if (M == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) bf16_rows4((const uint16_t*)W, K, n, xb, y);
    for (; n < n1; n++) bf16_rows<1>((const uint16_t*)W, K, n, xb, 0, y, ldy);
    return;
  }
  for (int64_t n = n0; n < n1; n++) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_rows<4>((const uint16_t*)W, K, n, xb, m, y, ldy);
    for (; m < M; m++) bf16_rows<1>((const uint16_t*)W, K, n, xb, m, y, ldy);
  }
}

}  // namespace plm
