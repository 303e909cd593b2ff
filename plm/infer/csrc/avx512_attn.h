// Pieces of the bf16 attention kernels shared by the AVX512-BF16 and AMX units: exp over 16
// lanes, fp32 -> bf16 rounding, and the (t, t+1) value pairs. Include after the target pragma.
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

}  // namespace
}  // namespace plm
