// Pieces of the bf16 attention kernels shared by the AVX512-BF16 and AMX units (heads in the 16
// lanes): exp, fp32 -> bf16 rounding, the query and value pairs, the online softmax step of a
// block, a part's normalised result, and the loops over head groups, parts and chunks. Include
// after the target pragma.
#pragma once

namespace plm {
namespace {

inline __m512 exp16(__m512 x) {  // Cephes exp, x <= 0 (relative error ~1e-7)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(0.693359375f)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(-2.12194440e-4f)));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, z, x), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// fp32 -> bf16 bits in the low half of each lane, round to nearest even (finite inputs)
inline __m512i bf16_rne(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}

// vP[tp][r] = (V[2tp][r], V[2tp+1][r]) for r < rank (rank even), a zero row past tb
inline void pack_values(const uint16_t* c, int64_t D, int64_t rank, int64_t tb, uint32_t* vP) {
  // word i of the result takes word idx[i] of (a | b): a's r-th value then b's r-th value
  alignas(64) uint16_t lo[32], hi[32];
  for (int i = 0; i < 16; i++) {
    lo[2 * i] = (uint16_t)i, lo[2 * i + 1] = (uint16_t)(32 + i);
    hi[2 * i] = (uint16_t)(16 + i), hi[2 * i + 1] = (uint16_t)(48 + i);
  }
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t t = 0; t < tb; t += 2) {
    const uint16_t* a = c + t * D;
    const uint16_t* b = t + 1 < tb ? a + D : nullptr;
    uint32_t* o = vP + (t / 2) * rank;
    for (int64_t r = 0; r < rank; r += 32) {
      const __mmask32 m = rank - r >= 32 ? 0xffffffffu : (__mmask32)((1ull << (rank - r)) - 1);
      const __m512i va = _mm512_maskz_loadu_epi16(m, a + r);
      const __m512i vb = b ? _mm512_maskz_loadu_epi16(m, b + r) : _mm512_setzero_si512();
      const int64_t n = rank - r >= 32 ? 32 : rank - r;  // pairs to store
      const __m512i p0 = _mm512_permutex2var_epi16(va, ilo, vb), p1 = _mm512_permutex2var_epi16(va, ihi, vb);
      _mm512_mask_storeu_epi32(o + r, (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1), p0);
      if (n > 16) _mm512_mask_storeu_epi32(o + r + 16, (__mmask16)(n >= 32 ? 0xffff : (1u << (n - 16)) - 1), p1);
    }
  }
}


// qt[k][j] = (q[j][2k], q[j][2k+1]) rounded to bf16, for the g <= 16 heads of a group (q [g][D],
// D even), zero for lanes past g: the query as pairs with heads in lanes, [D/2][16] 32-bit
inline void pack_query(const float* q, int64_t D, int64_t g, uint32_t* qt) {
  memset(qt, 0, sizeof(uint32_t) * 8 * D);
  alignas(64) uint16_t qb[32];
  for (int64_t j = 0; j < g; j++) {
    const float* qj = q + j * D;
    for (int64_t k = 0; k < D; k += 16) {
      const __mmask16 m = D - k >= 16 ? 0xffff : (__mmask16)((1u << (D - k)) - 1);
      _mm256_store_si256((__m256i*)qb, _mm512_cvtepi32_epi16(bf16_rne(_mm512_maskz_loadu_ps(m, qj + k))));
      const int64_t n = D - k >= 16 ? 16 : D - k;
      for (int64_t i = 0; i < n; i += 2) qt[((k + i) / 2) * 16 + j] = qb[i] | ((uint32_t)qb[i + 1] << 16);
    }
  }
}

// The softmax step of a block of tb scored rows (sT [tb][16], heads in lanes) against the running
// maximum m and sum l (both updated): the probabilities rounded to bf16, the sum adding the
// rounded values (so the output stays a convex combination of cached values), handed out as
// (t, t+1) pairs, put(t / 2, 16 pairs); returns alpha, the factor for the output so far.
template <typename Put>
inline __m512 softmax_pairs(const float* sT, int64_t tb, __m512& m, __m512& l, const Put& put) {
  __m512 bm = _mm512_loadu_ps(sT);
  for (int64_t t = 1; t < tb; t++) bm = _mm512_max_ps(bm, _mm512_loadu_ps(sT + t * 16));
  const __m512 mnew = _mm512_max_ps(m, bm);
  const __m512 alpha = exp16(_mm512_sub_ps(m, mnew));  // m = -inf: exp16 clamps, alpha ~ 0
  m = mnew;
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < tb; t += 2) {
    const __m512i e0 = bf16_rne(exp16(_mm512_sub_ps(_mm512_loadu_ps(sT + t * 16), mnew)));
    const __m512i e1 = t + 1 < tb ? bf16_rne(exp16(_mm512_sub_ps(_mm512_loadu_ps(sT + (t + 1) * 16), mnew)))
                                  : _mm512_setzero_si512();
    sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(e0, 16)),
                                           _mm512_castsi512_ps(_mm512_slli_epi32(e1, 16))));
    put(t / 2, _mm512_or_si512(e0, _mm512_slli_epi32(e1, 16)));
  }
  l = _mm512_fmadd_ps(l, alpha, sum);
  return alpha;
}

// A part's result for the g heads of a group: out[j][r] = o(j, r) / l[j] and (lse not null)
// lse[j] = m[j] + log l[j], the part's log-sum-exp for the merge
template <typename Get>
inline void finish_heads(__m512 m, __m512 l, int64_t g, int64_t rank, const Get& o, float* out, float* lse) {
  alignas(64) float lv[16], mv[16];
  _mm512_store_ps(lv, l);
  _mm512_store_ps(mv, m);
  for (int64_t j = 0; j < g; j++) {
    const float inv = lv[j] > 0.f ? 1.f / lv[j] : 0.f;
    for (int64_t r = 0; r < rank; r++) out[j * rank + r] = o(j, r) * inv;
    if (lse) lse[j] = lv[j] > 0.f ? mv[j] + __builtin_logf(lv[j]) : -__builtin_inff();
  }
}

// The loops both bf16 kernels share: the heads in groups of 16 (the query packed as pairs into
// qt), each part of `part` cached rows with its own softmax state (maximum m, sum l) and sums
// (cleared by clear()), its rows in chunks of up to `chunk` (body(rows, n, m, l)), then the
// part's normalised result (o(j, r): head j's sum at latent dim r).
template <typename Clear, typename Body, typename Get>
inline void attention_parts(const float* q, int64_t nh, int64_t D, int64_t rank, const uint16_t* cache, int64_t S,
                            int64_t part, int64_t chunk, uint32_t* qt, float* out, float* lse, const Clear& clear,
                            const Body& body, const Get& o) {
  for (int64_t h0 = 0; h0 < nh; h0 += 16) {
    const int64_t g = nh - h0 < 16 ? nh - h0 : 16;
    pack_query(q + h0 * D, D, g, qt);
    for (int64_t p0 = 0, pi = 0; p0 < S; p0 += part, pi++) {
      const int64_t np = S - p0 < part ? S - p0 : part;
      clear();
      __m512 m = _mm512_set1_ps(-__builtin_inff()), l = _mm512_setzero_ps();
      for (int64_t c0 = 0; c0 < np; c0 += chunk) body(cache + (p0 + c0) * D, np - c0 < chunk ? np - c0 : chunk, m, l);
      finish_heads(m, l, g, rank, o, out + (pi * nh + h0) * rank, lse ? lse + pi * nh + h0 : nullptr);
    }
  }
}

}  // namespace
}  // namespace plm
