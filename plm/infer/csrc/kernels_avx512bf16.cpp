// AVX512-BF16 kernels (`vdpbf16ps`: 32 bf16 pairs per instruction, fp32 accumulation): the
// bf16 GEMV (activations already rounded to bf16 by the caller, as on every path) and the
// absorbed-MLA attention over a bf16 latent cache. Separate from kernels_avx512.cpp because
// AVX512-VNNI hosts without BF16 exist (Cascade Lake, Ice Lake): only these need the extension.
#ifdef PLM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>
#endif

#include "plm_kernels.h"
#include "simde_shim.h"
#include "avx512_sum.h"
#include "avx512_attn.h"

namespace plm {
namespace {

inline __m512bh ldbh(const uint16_t* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// One weight row n against activation row m: two chains over alternating 32-wide blocks, the
// tail on the first, summed at the end (the arithmetic every BF16 kernel here shares).
void bf16_pair(const uint16_t* W, int64_t K, int64_t n, const uint16_t* xb, int64_t m, float* y, int64_t ldy) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  const __mmask32 all = 0xffffffffu;
  const uint16_t *w = W + n * K, *x = xb + m * K;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, ldbh(w + k, all), ldbh(x + k, all));
    a1 = _mm512_dpbf16_ps(a1, ldbh(w + k + 32, all), ldbh(x + k + 32, all));
  }
  for (; k < K; k += 32) {  // zero-masked tail: missing pairs contribute 0 * 0
    const __mmask32 msk = K - k >= 32 ? all : (__mmask32)((1ull << (K - k)) - 1);
    a0 = _mm512_dpbf16_ps(a0, ldbh(w + k, msk), ldbh(x + k, msk));
  }
  y[m * ldy + n] = hsum16(_mm512_add_ps(a0, a1));
}

// M = 1: weight rows n, n + dn, n + 2dn, n + 3dn share each activation load (4 separate read
// streams, see gemv_bf16_avx512bf16); 8 independent accumulation chains.
void bf16_rows4(const uint16_t* W, int64_t K, int64_t n, int64_t dn, const uint16_t* xb, float* y) {
  __m512 a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
  const __mmask32 all = 0xffffffffu;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh x0 = ldbh(xb + k, all), x1 = ldbh(xb + k + 32, all);
    for (int r = 0; r < 4; r++) {
      a[r][0] = _mm512_dpbf16_ps(a[r][0], ldbh(W + (n + r * dn) * K + k, all), x0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], ldbh(W + (n + r * dn) * K + k + 32, all), x1);
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 msk = K - k >= 32 ? all : (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh x0 = ldbh(xb + k, msk);
    for (int r = 0; r < 4; r++) a[r][0] = _mm512_dpbf16_ps(a[r][0], ldbh(W + (n + r * dn) * K + k, msk), x0);
  }
  for (int r = 0; r < 4; r++) y[n + r * dn] = hsum16(_mm512_add_ps(a[r][0], a[r][1]));
}

// M > 1 (prefill): 4 weight rows x 4 activation rows per call, 16 accumulators, so each loaded
// vector feeds 4 instructions. The same arithmetic per (row, activation row) as bf16_pair and
// bf16_rows4 (two chains over alternating 32-wide blocks, the tail on the first, summed at the
// end), run as two passes over K so only one chain's 16 accumulators are live at a time.
// (16 named accumulators: with an array GCC stores all of them to the stack after every block,
// which halves the speed)
void bf16_tile44(const uint16_t* W, int64_t K, int64_t n, const uint16_t* xb, int64_t m, float* y, int64_t ldy) {
  const __mmask32 all = 0xffffffffu;
  const int64_t K64 = K & ~(int64_t)63;
  const uint16_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
  const uint16_t *x0 = xb + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
#define PLM_ACC(j) __m512 c0##j = _mm512_setzero_ps(), c1##j = c0##j, c2##j = c0##j, c3##j = c0##j
#define PLM_ROW(j, k, msk)                                       \
  {                                                              \
    const __m512bh xv = ldbh(x##j + (k), (msk));                 \
    c0##j = _mm512_dpbf16_ps(c0##j, v0, xv);                     \
    c1##j = _mm512_dpbf16_ps(c1##j, v1, xv);                     \
    c2##j = _mm512_dpbf16_ps(c2##j, v2, xv);                     \
    c3##j = _mm512_dpbf16_ps(c3##j, v3, xv);                     \
  }
#define PLM_BLOCK(k, msk)                                                                  \
  {                                                                                        \
    const __m512bh v0 = ldbh(w0 + (k), (msk)), v1 = ldbh(w1 + (k), (msk)), v2 = ldbh(w2 + (k), (msk)), \
                   v3 = ldbh(w3 + (k), (msk));                                             \
    PLM_ROW(0, k, msk) PLM_ROW(1, k, msk) PLM_ROW(2, k, msk) PLM_ROW(3, k, msk)            \
  }
  alignas(64) float first[4][4][16];
  {  // chain 1: even 32-blocks, then the tail
    PLM_ACC(0); PLM_ACC(1); PLM_ACC(2); PLM_ACC(3);
    for (int64_t k = 0; k < K64; k += 64) PLM_BLOCK(k, all)
    for (int64_t k = K64; k < K; k += 32) PLM_BLOCK(k, K - k >= 32 ? all : (__mmask32)((1ull << (K - k)) - 1))
#define PLM_KEEP(j) _mm512_store_ps(first[0][j], c0##j), _mm512_store_ps(first[1][j], c1##j), \
                    _mm512_store_ps(first[2][j], c2##j), _mm512_store_ps(first[3][j], c3##j)
    PLM_KEEP(0); PLM_KEEP(1); PLM_KEEP(2); PLM_KEEP(3);
  }
  {  // chain 2: odd 32-blocks; y = sum of both
    PLM_ACC(0); PLM_ACC(1); PLM_ACC(2); PLM_ACC(3);
    for (int64_t k = 32; k < K64; k += 64) PLM_BLOCK(k, all)
#define PLM_OUT(j)                                                        \
  s[j] = _mm512_add_ps(_mm512_load_ps(first[0][j]), c0##j);                \
  s[4 + j] = _mm512_add_ps(_mm512_load_ps(first[1][j]), c1##j);            \
  s[8 + j] = _mm512_add_ps(_mm512_load_ps(first[2][j]), c2##j);            \
  s[12 + j] = _mm512_add_ps(_mm512_load_ps(first[3][j]), c3##j);
    __m512 s[16];
    PLM_OUT(0) PLM_OUT(1) PLM_OUT(2) PLM_OUT(3)
    sum16x16(s, y, ldy, m, n);
  }
#undef PLM_ACC
#undef PLM_ROW
#undef PLM_BLOCK
#undef PLM_KEEP
#undef PLM_OUT
}

// ---- attention ----------------------------------------------------------------------------
// Heads in lanes: one zmm holds a value for each of 16 heads, so the scores of a cached row for
// all heads are 288 `vdpbf16ps` against broadcast (k, k+1) pairs of the row (D = 576), the
// softmax is elementwise across 16 heads, and the values are `vdpbf16ps` of the (t, t+1)
// probability pairs against broadcast (V[t][r], V[t+1][r]) pairs. Every cached row is read
// once for all heads, with no horizontal sums. The query and the probabilities are rounded to
// bf16 (as llama.cpp rounds them to f16 against its f16 cache); the running sum l adds the
// rounded probabilities, so the output stays a convex combination of the cached values.

inline __m512bh bcast_pair(const uint16_t* p) {  // (p[0], p[1]) in every lane
  int32_t v;
  memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

constexpr int64_t BTB = 64;  // cached rows per block (even)

// scores sT[t][16] = scale * q . row t for the rows of the block, rows in groups of 8 (8
// independent accumulation chains cover the instruction's latency)
inline void scores(const __m512bh* qT, int64_t D2, const uint16_t* c, int64_t D, int64_t tb, float scale, float* sT) {
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + 8 <= tb; t += 8) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const uint16_t* r = c + t * D;
    for (int64_t k = 0; k < D2; k++) {
      const __m512bh qk = qT[k];
      for (int i = 0; i < 8; i++) a[i] = _mm512_dpbf16_ps(a[i], qk, bcast_pair(r + i * D + 2 * k));
    }
    for (int i = 0; i < 8; i++) _mm512_storeu_ps(sT + (t + i) * 16, _mm512_mul_ps(a[i], vs));
  }
  for (; t < tb; t++) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    const uint16_t* r = c + t * D;
    int64_t k = 0;
    for (; k + 2 <= D2; k += 2) {
      a0 = _mm512_dpbf16_ps(a0, qT[k], bcast_pair(r + 2 * k));
      a1 = _mm512_dpbf16_ps(a1, qT[k + 1], bcast_pair(r + 2 * k + 2));
    }
    if (k < D2) a0 = _mm512_dpbf16_ps(a0, qT[k], bcast_pair(r + 2 * k));
    _mm512_storeu_ps(sT + t * 16, _mm512_mul_ps(_mm512_add_ps(a0, a1), vs));
  }
}

}  // namespace

int64_t attention_bf16_scratch_floats(int64_t D, int64_t rank) {
  return 8 * D + 16 * rank + 16 * BTB + 8 * BTB + BTB * rank / 2 + 64 + 16;
}

void attention_avx512bf16(const float* q, int64_t nh, int64_t D, int64_t rank, const uint16_t* cache, int64_t S,
                          int64_t part, float scale, float* out, float* lse, float* scratch) {
  const int64_t D2 = D / 2;
  // 64-byte aligned regions of the scratch
  float* base = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  __m512bh* qT = (__m512bh*)base;            // [D/2] pairs x 16 heads
  float* OT = base + 8 * D;                  // [rank][16]
  float* sT = OT + 16 * rank;                // [BTB][16]
  uint32_t* pP = (uint32_t*)(sT + 16 * BTB); // [BTB/2][16]
  uint32_t* vP = pP + 8 * BTB;               // [BTB/2][rank]
  attention_parts(
      q, nh, D, rank, cache, S, part, BTB, (uint32_t*)qT, out, lse, [&] { memset(OT, 0, sizeof(float) * 16 * rank); },
      [&](const uint16_t* c, int64_t tb, __m512& m, __m512& l) {
        const int64_t tp = (tb + 1) / 2;
        scores(qT, D2, c, D, tb, scale, sT);
        const __m512 alpha =
            softmax_pairs(sT, tb, m, l, [&](int64_t p, __m512i pair) { _mm512_storeu_si512(pP + p * 16, pair); });
        pack_values(c, D, rank, tb, vP);
        // OT[r] = alpha * OT[r] + sum over pairs of (p_t, p_t+1) . (V[t][r], V[t+1][r]), r in 16s
        int64_t r = 0;
        for (; r + 16 <= rank; r += 16) {
          __m512 a[16];
          for (int i = 0; i < 16; i++) a[i] = _mm512_mul_ps(_mm512_load_ps(OT + (r + i) * 16), alpha);
          for (int64_t p = 0; p < tp; p++) {
            const __m512bh pv = (__m512bh)_mm512_load_si512(pP + p * 16);
            const uint16_t* v = (const uint16_t*)(vP + p * rank + r);
            for (int i = 0; i < 16; i++) a[i] = _mm512_dpbf16_ps(a[i], pv, bcast_pair(v + 2 * i));
          }
          for (int i = 0; i < 16; i++) _mm512_store_ps(OT + (r + i) * 16, a[i]);
        }
        for (; r < rank; r++) {
          __m512 a = _mm512_mul_ps(_mm512_load_ps(OT + r * 16), alpha);
          for (int64_t p = 0; p < tp; p++)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_load_si512(pP + p * 16), bcast_pair((const uint16_t*)(vP + p * rank + r)));
          _mm512_store_ps(OT + r * 16, a);
        }
      },
      [&](int64_t j, int64_t r) { return OT[r * 16 + j]; });
}

void gemv_bf16_avx512bf16(const void* W, int64_t K, int64_t n0, int64_t n1, const uint16_t* xb, int64_t M, float* y,
                          int64_t ldy) {
  if (M == 1) {  // the rows cut into four runs read side by side: prefetchers draw more bandwidth from several streams
    const int64_t q = (n1 - n0) / 4;
    for (int64_t i = 0; i < q; i++) bf16_rows4((const uint16_t*)W, K, n0 + i, q, xb, y);
    for (int64_t n = n0 + 4 * q; n < n1; n++) bf16_pair((const uint16_t*)W, K, n, xb, 0, y, ldy);
    return;
  }
  // activation rows in blocks that stay in L2 while the rows [n0, n1) stream past them
  const uint16_t* w = (const uint16_t*)W;
  int64_t MB = ((256 << 10) / (2 * K)) & ~(int64_t)3;  // no std:: templates in ISA units
  if (MB < 4) MB = 4;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = M < m0 + MB ? M : m0 + MB;
    const int64_t m4 = m0 + ((m1 - m0) & ~(int64_t)3);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
      for (int64_t m = m0; m < m4; m += 4) bf16_tile44(w, K, n, xb, m, y, ldy);
    for (; n < n1; n++)  // rows past the last 4 and activation rows past the last 4: one pair at a time
      for (int64_t m = m0; m < m4; m++) bf16_pair(w, K, n, xb, m, y, ldy);
    for (n = n0; n < n1; n++)
      for (int64_t m = m4; m < m1; m++) bf16_pair(w, K, n, xb, m, y, ldy);
  }
}

}  // namespace plm
