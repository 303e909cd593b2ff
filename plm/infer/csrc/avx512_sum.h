// Horizontal sums for the AVX-512 float kernels, in one fixed order: the two 256-bit halves,
// then the two 128-bit halves, then lanes (0+2, 1+3), then 0+1. hsum16 reduces one vector;
// sum16x16 reduces 16 at once with the very same pairings (three shuffles and an add per
// pair of inputs instead of a full reduction each), so a tile of a batch gives the bits the
// one-row kernels give: a batched row equals the row alone. Include after the target pragma.
#pragma once

namespace plm {
namespace {

inline float hsum16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));  // lanes 0+2, 1+3
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));  // 0+1
}

// a[4r + i] (r: weight row n+r, i: activation row m+i) summed into y[(m+i)*ldy + n + r].
inline void sum16x16(const __m512* a, float* y, int64_t ldy, int64_t m, int64_t n) {
  __m512 t[8], s[4];
  for (int p = 0; p < 8; p++)  // 256-bit halves: t[p] = [a[2p] summed to 8 | a[2p+1] summed to 8]
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 4; q++)  // 128-bit halves: 128-bit lane k of s[q] = a[4q + k] summed to 4
    s[q] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lanes (0+2, 1+3) of two inputs side by side, then 0+1: lane k of 128-bit lane i = a[4k + i]
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_ps(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float o[16];
  _mm512_store_ps(o, r);
  for (int i = 0; i < 4; i++) memcpy(y + (m + i) * ldy + n, o + 4 * i, 4 * sizeof(float));
}

}  // namespace
}  // namespace plm
