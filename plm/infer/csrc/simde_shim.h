// Test-only (PLM_SIMDE builds): AVX-512 intrinsics that SIMDe 0.7 does not emulate, written
// as plain loops with the instructions' documented semantics, so the AVX-512 kernels can run
// on a host without AVX-512 (scripts/check_avx512_emulated.sh). Never part of a normal build.
#pragma once
#ifdef PLM_SIMDE

typedef simde__mmask16 __mmask16;
typedef simde__mmask32 __mmask32;

namespace plm {
namespace shim {

static inline __m512 cvtepi32_ps(__m512i v) {
  int32_t a[16];
  float f[16];
  _mm512_storeu_si512(a, v);
  for (int i = 0; i < 16; i++) f[i] = (float)a[i];
  return _mm512_loadu_ps(f);
}
// The widening conversions: N elements of In (zero- or sign-extended by the C++ conversion) to Out
template <typename In, typename Out, int N, typename V>
static inline __m512i widen(V v) {
  static_assert(sizeof(V) == N * sizeof(In) && N * sizeof(Out) == 64, "one vector in, one zmm out");
  In a[N];
  Out o[N];
  memcpy(a, &v, sizeof a);
  for (int i = 0; i < N; i++) o[i] = (Out)a[i];
  return _mm512_loadu_si512(o);
}
static inline __m512i cvtepu8_epi32(__m128i v) { return widen<uint8_t, int32_t, 16>(v); }
static inline __m512i cvtepi8_epi32(__m128i v) { return widen<int8_t, int32_t, 16>(v); }
static inline __m512i cvtepu16_epi32(__m256i v) { return widen<uint16_t, int32_t, 16>(v); }
static inline __m512i cvtepu8_epi16(__m256i v) { return widen<uint8_t, uint16_t, 32>(v); }
static inline __m512i cvtepi8_epi16(__m256i v) { return widen<int8_t, int16_t, 32>(v); }
static inline __m512 cvtph_ps(__m256i v) {
  uint16_t a[16];
  float o[16];
  _mm256_storeu_si256((__m256i*)a, v);
  for (int i = 0; i < 16; i++) o[i] = fp16_to_fp32(a[i]);
  return _mm512_loadu_ps(o);
}
static inline __m512 maskz_loadu_ps(__mmask16 m, const void* p) {
  float o[16];
  for (int i = 0; i < 16; i++) o[i] = (m >> i) & 1 ? ((const float*)p)[i] : 0.f;
  return _mm512_loadu_ps(o);
}
static inline __m256i maskz_loadu_epi16_256(__mmask16 m, const void* p) {
  uint16_t o[16];
  for (int i = 0; i < 16; i++) o[i] = (m >> i) & 1 ? ((const uint16_t*)p)[i] : 0;
  return _mm256_loadu_si256((const __m256i*)o);
}
static inline __m512i maskz_loadu_epi16_512(__mmask32 m, const void* p) {
  uint16_t o[32];
  for (int i = 0; i < 32; i++) o[i] = (m >> i) & 1 ? ((const uint16_t*)p)[i] : 0;
  return _mm512_loadu_si512(o);
}
static inline void mask_storeu_ps(void* p, __mmask16 m, __m512 v) {
  float a[16];
  _mm512_storeu_ps(a, v);
  for (int i = 0; i < 16; i++)
    if ((m >> i) & 1) ((float*)p)[i] = a[i];
}
// SIMDe's portable fmadd rounds twice (a * b + c); the instruction rounds once.
static inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  float x[16], y[16], z[16];
  _mm512_storeu_ps(x, a);
  _mm512_storeu_ps(y, b);
  _mm512_storeu_ps(z, c);
  for (int i = 0; i < 16; i++) z[i] = __builtin_fmaf(x[i], y[i], z[i]);
  return _mm512_loadu_ps(z);
}
static inline __m512i cvttps_epi32(__m512 v) {
  float a[16];
  int32_t o[16];
  _mm512_storeu_ps(a, v);
  for (int i = 0; i < 16; i++) o[i] = (int32_t)a[i];  // truncates toward zero, as the instruction
  return _mm512_loadu_si512(o);
}
static inline __m256i cvtepi32_epi16(__m512i v) {
  int32_t a[16];
  int16_t o[16];
  _mm512_storeu_si512(a, v);
  for (int i = 0; i < 16; i++) o[i] = (int16_t)a[i];  // keeps the low 16 bits
  return _mm256_loadu_si256((const __m256i*)o);
}
static inline void mask_storeu_epi32(void* p, __mmask16 m, __m512i v) {
  int32_t a[16];
  _mm512_storeu_si512(a, v);
  for (int i = 0; i < 16; i++)
    if ((m >> i) & 1) ((int32_t*)p)[i] = a[i];
}

}  // namespace shim
}  // namespace plm

#define _mm512_cvtepi32_ps plm::shim::cvtepi32_ps
#define _mm512_cvtepu8_epi32 plm::shim::cvtepu8_epi32
#define _mm512_cvtepi8_epi32 plm::shim::cvtepi8_epi32
#define _mm512_cvtepu16_epi32 plm::shim::cvtepu16_epi32
#define _mm512_cvtepu8_epi16 plm::shim::cvtepu8_epi16
#define _mm512_cvtepi8_epi16 plm::shim::cvtepi8_epi16
#define _mm512_cvtph_ps plm::shim::cvtph_ps
#define _mm512_maskz_loadu_ps plm::shim::maskz_loadu_ps
#define _mm256_maskz_loadu_epi16 plm::shim::maskz_loadu_epi16_256
#define _mm512_maskz_loadu_epi16 plm::shim::maskz_loadu_epi16_512
#define _mm512_mask_storeu_ps plm::shim::mask_storeu_ps
#define _mm512_cvttps_epi32 plm::shim::cvttps_epi32
#define _mm512_cvtepi32_epi16 plm::shim::cvtepi32_epi16
#define _mm512_mask_storeu_epi32 plm::shim::mask_storeu_epi32
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEG_INF SIMDE_MM_FROUND_TO_NEG_INF
#endif
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps plm::shim::fmadd_ps
// SIMDe 0.7's macro writes `imm8 >> 4` unparenthesised: an immediate `A | B` (rounding mode |
// _MM_FROUND_NO_EXC) becomes a scale of 2^1. Pass it parenthesised, without the exception bit.
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) simde_mm512_roundscale_ps(a, ((imm) & ~0x08))
// the same 128-bit lane selection as the integer form
#define _mm512_shuffle_f32x4(a, b, imm) \
  _mm512_castsi512_ps(_mm512_shuffle_i32x4(_mm512_castps_si512(a), _mm512_castps_si512(b), imm))

#endif  // PLM_SIMDE
