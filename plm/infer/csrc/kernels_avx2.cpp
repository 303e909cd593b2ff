// AVX2 + FMA + F16C kernels (llama.cpp's x86 baseline): int8 dots with maddubs/madd on the
// 16-row tiles (two 8-row halves per 64-byte vector), bf16/fp16 widened to fp32 for FMA.
// Same integer sums and fp32 sequence as kernels_scalar.cpp (see plm_kernels.h).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <stdlib.h>

#include "plm_kernels.h"

namespace plm {
namespace {

// the sparse helpers take register arrays by pointer: inlined, they stay in registers
#define PLM_ALWAYS_INLINE inline __attribute__((always_inline))

inline __m256 f16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256i ld256(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline int32_t ld32(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// (v, v) int16 pairs in each 32-bit lane from 8 bytes (unsigned or signed)
inline __m256i pairs_u8(const uint8_t* p) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  return _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
}
inline __m256i pairs_i8(const int8_t* p) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
  return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
}

inline void store_tile(float* y, int64_t ldy, int64_t m, int64_t row0, int64_t N, __m256 lo, __m256 hi) {
  float* dst = y + m * ldy + row0;
  if (row0 + TILE <= N) {
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
  } else {
    float tmp[TILE];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    for (int r = 0; r < TILE && row0 + r < N; r++) dst[r] = tmp[r];
  }
}

// The per-block fp32 step of every path, on a tile's two 8-row halves: acc += float(sum) *
// (d_w * d_x), d_w the block's 16 fp16 scales at dw.
template <int MB>
inline void block_step(__m256 (&al)[MB], __m256 (&ah)[MB], const __m256i (&il)[MB], const __m256i (&ih)[MB],
                       const uint8_t* dw, const QAct& x, int64_t m0, int64_t nd, int64_t b) {
  const __m256 dl = f16x8(dw), dh = f16x8(dw + 16);
  for (int i = 0; i < MB; i++) {
    const __m256 dx = _mm256_set1_ps(x.d[(m0 + i) * nd + b]);
    al[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(il[i]), _mm256_mul_ps(dl, dx), al[i]);
    ah[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ih[i]), _mm256_mul_ps(dh, dx), ah[i]);
  }
}

template <int MT, int MB>
inline void store_tiles(float* y, int64_t ldy, int64_t m0, const int64_t* row0, int64_t N, const __m256 (&al)[MT][MB],
                        const __m256 (&ah)[MT][MB]) {
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) store_tile(y, ldy, m0 + i, row0[t], N, al[t][i], ah[t][i]);
}

void quantize_act(const float* x, int64_t K, int bs, int8_t* q, float* d, int32_t* s16) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t b = 0; b < K / bs; b++) {
    const float* xb = x + b * bs;
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < bs; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
    const float db = hmax8(mx) / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    const __m256 vid = _mm256_set1_ps(id);
    for (int i = 0; i < bs; i += 32) {
      // cvtps rounds to nearest even (MXCSR default), as nearbyintf in the scalar path
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vid));
      const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), vid));
      const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), vid));
      const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), vid));
      __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      v = _mm256_permutevar8x32_epi32(v, perm);
      _mm256_storeu_si256((__m256i*)(q + b * bs + i), v);
      // sums of 16: sad of the biased bytes gives 4 sums of 8
      const __m256i sad = _mm256_sad_epu8(_mm256_xor_si256(v, flip), _mm256_setzero_si256());
      int64_t s[4];
      _mm256_storeu_si256((__m256i*)s, sad);
      s16[(b * bs + i) / 16] = (int32_t)(s[0] + s[1]) - 16 * 128;
      s16[(b * bs + i) / 16 + 1] = (int32_t)(s[2] + s[3]) - 16 * 128;
    }
  }
}

// ---- Q8_0 ---------------------------------------------------------------------------------
template <int MT, int MB>
void q8_0_rows(const uint8_t* const* wts, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 32, nd = K / x.bs;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  __m256 al[MT][MB], ah[MT][MB];
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) al[t][i] = ah[t][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wts[t] + b * Q8_0_TB;
      __m256i il[MB], ih[MB];
      for (int i = 0; i < MB; i++) il[i] = ih[i] = _mm256_setzero_si256();
      for (int c = 0; c < 8; c++) {
        const __m256i wl = _mm256_xor_si256(ld256(blk + 32 + 64 * c), flip);
        const __m256i wh = _mm256_xor_si256(ld256(blk + 64 + 64 * c), flip);
        const __m256i ul = _mm256_abs_epi8(wl), uh = _mm256_abs_epi8(wh);
        for (int i = 0; i < MB; i++) {
          const __m256i xb = _mm256_set1_epi32(ld32(x.q + (m0 + i) * K + 32 * b + 4 * c));
          il[i] = _mm256_add_epi32(il[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ul, _mm256_sign_epi8(xb, wl)), ones));
          ih[i] = _mm256_add_epi32(ih[i], _mm256_madd_epi16(_mm256_maddubs_epi16(uh, _mm256_sign_epi8(xb, wh)), ones));
        }
      }
      block_step<MB>(al[t], ah[t], il, ih, blk, x, m0, nd, b);
    }
  }
  store_tiles<MT, MB>(y, ldy, m0, row0, N, al, ah);
}

// ---- Q4_0 ---------------------------------------------------------------------------------
// One 64-byte nibble group (16 rows x 8 inputs) against 8 activation bytes, int16 pair sums
// added into sl (rows 0-7) / sh (rows 8-15). Each maddubs pair is at most 2*15*127 = 3810, so
// 8 of them (one block of 32) stay within int16.
struct Nib {  // a 64-byte group unpacked: ll, lh = rows 0-7 low / high nibbles; hl, hh = rows 8-15
  __m256i ll, lh, hl, hh;
};
inline Nib nib_unpack(const uint8_t* g) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i vl = ld256(g), vh = ld256(g + 32);
  return {_mm256_and_si256(vl, m4), _mm256_and_si256(_mm256_srli_epi16(vl, 4), m4), _mm256_and_si256(vh, m4),
          _mm256_and_si256(_mm256_srli_epi16(vh, 4), m4)};
}
inline void nib_madd(const Nib& n, __m256i xa, __m256i xb, __m256i& sl, __m256i& sh) {
  sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(n.ll, xa));
  sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(n.lh, xb));
  sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(n.hl, xa));
  sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(n.hh, xb));
}

template <int MT, int MB>
void q4_0_rows(const uint8_t* const* wts, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 32, nd = K / x.bs;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 al[MT][MB], ah[MT][MB];
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) al[t][i] = ah[t][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wts[t] + b * Q4_0_TB;
      __m256i sl[MB], sh[MB];
      for (int i = 0; i < MB; i++) sl[i] = sh[i] = _mm256_setzero_si256();
      for (int g = 0; g < 4; g++) {
        const Nib n = nib_unpack(blk + 32 + 64 * g);
        for (int i = 0; i < MB; i++) {
          const int8_t* xq = x.q + (m0 + i) * K + 32 * b + 8 * g;
          nib_madd(n, _mm256_set1_epi32(ld32(xq)), _mm256_set1_epi32(ld32(xq + 4)), sl[i], sh[i]);
        }
      }
      __m256i il[MB], ih[MB];
      for (int i = 0; i < MB; i++) {
        const int32_t* s = x.s16 + (m0 + i) * (K / 16) + 2 * b;
        const __m256i off = _mm256_set1_epi32(8 * (s[0] + s[1]));
        il[i] = _mm256_sub_epi32(_mm256_madd_epi16(sl[i], ones), off);
        ih[i] = _mm256_sub_epi32(_mm256_madd_epi16(sh[i], ones), off);
      }
      block_step<MB>(al[t], ah[t], il, ih, blk, x, m0, nd, b);
    }
  }
  store_tiles<MT, MB>(y, ldy, m0, row0, N, al, ah);
}

// Per-row bytes of two consecutive sub-blocks of a tile (16 rows each, at p and p + 16; mins of
// Q4_K, scales of Q6_K) against the two sub-blocks' activation sums: each row's
// byte_0 * sum_0 + byte_1 * sum_1 added in by one `madd` per 8 rows (bytes and sums fit int16),
// for the 8 / W pairs of a super-block; W = 16-input sums per sub-block (2 for 32 inputs, 1 for
// 16). lo / hi: rows 0-7 / 8-15 of the tile.
template <int MB, bool Signed, int W>
PLM_ALWAYS_INLINE void pair_terms(__m256i (&lo)[MB], __m256i (&hi)[MB], const uint8_t* bytes, const QAct& x, int64_t m0, int64_t K,
                                 int64_t b) {
  for (int p = 0; p < 8 / W; p++) {
    const __m128i a = _mm_loadu_si128((const __m128i*)(bytes + 32 * p));
    const __m128i c = _mm_loadu_si128((const __m128i*)(bytes + 32 * p + 16));
    const __m128i l = _mm_unpacklo_epi8(a, c), h = _mm_unpackhi_epi8(a, c);  // lane r: (byte_0, byte_1) of row r
    const __m256i pl = Signed ? _mm256_cvtepi8_epi16(l) : _mm256_cvtepu8_epi16(l);
    const __m256i ph = Signed ? _mm256_cvtepi8_epi16(h) : _mm256_cvtepu8_epi16(h);
    for (int i = 0; i < MB; i++) {
      const int32_t* s = x.s16 + (m0 + i) * (K / 16) + 16 * b + 2 * W * p;
      int32_t s0 = 0, s1 = 0;
      for (int k = 0; k < W; k++) s0 += s[k], s1 += s[W + k];
      const __m256i sp = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)s0 | ((uint32_t)s1 << 16)));
      lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(pl, sp));
      hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(ph, sp));
    }
  }
}

// ---- Q4_K, Q5_K -----------------------------------------------------------------------------
// Q5_K: bits 0 and 1 of each byte of a fifth-bit plane to 16 (for the low and high nibbles),
// then the plane moves on to the next group's two bits (what a 16-bit shift carries in from
// the neighbouring byte lands at bits 6-7 and is never read: at most 3 shifts)
inline void fifth_bits(__m256i& plane, __m256i& lo, __m256i& hi) {
  const __m256i v16 = _mm256_set1_epi8(16);
  lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(plane, 4), v16));
  hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(plane, 3), v16));
  plane = _mm256_srli_epi16(plane, 2);
}

// The int16 pair sums of a sub-block times its 6-bit scales, into the int32 sums; then cleared.
template <int MB>
PLM_ALWAYS_INLINE void sub_scale(__m256i (&sl)[MB], __m256i (&sh)[MB], __m256i (&cl)[MB], __m256i (&ch)[MB],
                                 const uint8_t* sc) {
  const __m256i scl = pairs_u8(sc), sch = pairs_u8(sc + 8);
  for (int i = 0; i < MB; i++) {
    cl[i] = _mm256_add_epi32(cl[i], _mm256_madd_epi16(sl[i], scl));
    ch[i] = _mm256_add_epi32(ch[i], _mm256_madd_epi16(sh[i], sch));
    sl[i] = sh[i] = _mm256_setzero_si256();
  }
}

// Five (Q5_K): each nibble gains its fifth bit from the sub-block's plane after the Q4_K
// layout; its values reach 31, so the int16 pair sums go to int32 every two groups, not four.
template <int MT, int MB, bool Five = false>
void q4_k_rows(const uint8_t* const* wts, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 256, nd = K / x.bs, TB = Five ? Q5_K_TB : Q4_K_TB;
  const __m256 neg = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000));
  __m256 al[MT][MB], ah[MT][MB];
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) al[t][i] = ah[t][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wts[t] + b * TB;
      __m256i cl[MB], ch[MB], nl[MB], nh[MB];  // sum sc*dot and sum m*s32, per half
      for (int i = 0; i < MB; i++) cl[i] = ch[i] = nl[i] = nh[i] = _mm256_setzero_si256();
      for (int j = 0; j < 8; j++) {
        __m256i sl[MB], sh[MB], p0, p1;
        for (int i = 0; i < MB; i++) sl[i] = sh[i] = _mm256_setzero_si256();
        if constexpr (Five) p0 = ld256(blk + qk_sub(true, j) + 256), p1 = ld256(blk + qk_sub(true, j) + 288);
        for (int g = 0; g < 4; g++) {  // each nibble group unpacked once for the call's rows
          Nib n = nib_unpack(blk + qk_sub(Five, j) + 64 * g);
          if constexpr (Five) {  // rows 0-7 in p0, rows 8-15 in p1, as the nibble halves
            fifth_bits(p0, n.ll, n.lh);
            fifth_bits(p1, n.hl, n.hh);
          }
          for (int i = 0; i < MB; i++) {
            const int8_t* xq = x.q + (m0 + i) * K + 256 * b + 32 * j + 8 * g;
            nib_madd(n, _mm256_set1_epi32(ld32(xq)), _mm256_set1_epi32(ld32(xq + 4)), sl[i], sh[i]);
          }
          if constexpr (Five)
            if (g == 1) sub_scale<MB>(sl, sh, cl, ch, blk + 64 + 16 * j);
        }
        sub_scale<MB>(sl, sh, cl, ch, blk + 64 + 16 * j);
      }
      pair_terms<MB, false, 2>(nl, nh, blk + 192, x, m0, K, b);  // the min term
      const __m256 dl = f16x8(blk), dh = f16x8(blk + 16), ml = f16x8(blk + 32), mh = f16x8(blk + 48);
      for (int i = 0; i < MB; i++) {
        const __m256 dx = _mm256_set1_ps(x.d[(m0 + i) * nd + b]);
        al[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cl[i]), _mm256_mul_ps(dl, dx), al[t][i]);
        ah[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ch[i]), _mm256_mul_ps(dh, dx), ah[t][i]);
        al[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nl[i]), _mm256_xor_ps(_mm256_mul_ps(ml, dx), neg), al[t][i]);
        ah[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nh[i]), _mm256_xor_ps(_mm256_mul_ps(mh, dx), neg), ah[t][i]);
      }
    }
  }
  store_tiles<MT, MB>(y, ldy, m0, row0, N, al, ah);
}

// ---- Q6_K ---------------------------------------------------------------------------------
template <int MT, int MB>
void q6_k_rows(const uint8_t* const* wts, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 256, nd = K / x.bs;
  const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
  __m256 al[MT][MB], ah[MT][MB];
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) al[t][i] = ah[t][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wts[t] + b * Q6_K_TB;
      const int8_t* sc = (const int8_t*)(blk + 32);
      __m256i il[MB], ih[MB];
      for (int i = 0; i < MB; i++) il[i] = ih[i] = _mm256_setzero_si256();
      for (int u = 0; u < 8; u++) {
        const uint8_t* ql = blk + 288 + 384 * u;
        const uint8_t* qh = ql + 256;
        for (int g = 0; g < 4; g++) {
          const int g16 = 2 * u + g / 2;
          const __m256i vl = ld256(ql + 64 * g), vh = ld256(ql + 64 * g + 32), pl = ld256(qh + 32 * g);
          const __m256i lo_l = _mm256_or_si256(_mm256_and_si256(vl, m4), _mm256_and_si256(_mm256_slli_epi16(pl, 4), m30));
          const __m256i hi_l = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(vl, 4), m4), _mm256_and_si256(pl, m30));
          const __m256i lo_h = _mm256_or_si256(_mm256_and_si256(vh, m4), _mm256_and_si256(_mm256_slli_epi16(pl, 2), m30));
          const __m256i hi_h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(vh, 4), m4),
                                               _mm256_and_si256(_mm256_srli_epi16(pl, 2), m30));
          const __m256i scl = pairs_i8(sc + 16 * g16), sch = pairs_i8(sc + 16 * g16 + 8);
          for (int i = 0; i < MB; i++) {
            const int8_t* xq = x.q + (m0 + i) * K + 256 * b + 32 * u + 8 * g;
            const __m256i xa = _mm256_set1_epi32(ld32(xq)), xb = _mm256_set1_epi32(ld32(xq + 4));
            // q <= 63: each pair <= 16002, the lo+hi sum <= 32004 fits int16
            const __m256i tl = _mm256_add_epi16(_mm256_maddubs_epi16(lo_l, xa), _mm256_maddubs_epi16(hi_l, xb));
            const __m256i th = _mm256_add_epi16(_mm256_maddubs_epi16(lo_h, xa), _mm256_maddubs_epi16(hi_h, xb));
            il[i] = _mm256_add_epi32(il[i], _mm256_madd_epi16(tl, scl));
            ih[i] = _mm256_add_epi32(ih[i], _mm256_madd_epi16(th, sch));
          }
        }
      }
      // the -32 offset once per super-block: 32 * sum_j sc_j * sum16(x)_j, two sub-blocks per madd
      __m256i ol[MB], oh[MB];
      for (int i = 0; i < MB; i++) ol[i] = oh[i] = _mm256_setzero_si256();
      pair_terms<MB, true, 1>(ol, oh, blk + 32, x, m0, K, b);
      for (int i = 0; i < MB; i++) {
        il[i] = _mm256_sub_epi32(il[i], _mm256_slli_epi32(ol[i], 5));
        ih[i] = _mm256_sub_epi32(ih[i], _mm256_slli_epi32(oh[i], 5));
      }
      block_step<MB>(al[t], ah[t], il, ih, blk, x, m0, nd, b);
    }
  }
  store_tiles<MT, MB>(y, ldy, m0, row0, N, al, ah);
}

// Rows of M activations, two at a time (registers), the tile re-read from cache for each pair
// (the driver and its four read streams for decode: plm_kernels.h).
#define PLM_TILE_DRIVER(NAME, ROWS, TB)                                                                \
  void NAME(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y, \
            int64_t ldy, int64_t N) {                                                                 \
    const int64_t bs = TB == Q4_K_TB || TB == Q5_K_TB || TB == Q6_K_TB ? 256 : 32;                  \
    tile_driver<2>(W, (K / bs) * TB, t0, t1, M, [&](auto mt, auto mb, const uint8_t* const* w, int64_t m, const int64_t* r) { \
      ROWS<decltype(mt)::value, decltype(mb)::value>(w, K, x, m, y, ldy, r, N);                      \
    });                                                                                             \
  }
PLM_TILE_DRIVER(gemv_q8_0, q8_0_rows, Q8_0_TB)
PLM_TILE_DRIVER(gemv_q4_0, q4_0_rows, Q4_0_TB)
PLM_TILE_DRIVER(gemv_q4_k, q4_k_rows, Q4_K_TB)
PLM_TILE_DRIVER(gemv_q6_k, q6_k_rows, Q6_K_TB)
template <int MT, int MB>
void q5_k_rows(const uint8_t* const* wts, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  q4_k_rows<MT, MB, true>(wts, K, x, m0, y, ldy, row0, N);
}
PLM_TILE_DRIVER(gemv_q5_k, q5_k_rows, Q5_K_TB)
#undef PLM_TILE_DRIVER

// ---- float weights ------------------------------------------------------------------------
inline __m256 load8(int fmt, const void* W, int64_t i) {
  if (fmt == F32) return _mm256_loadu_ps((const float*)W + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)W + i));
  if (fmt == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float load1(int fmt, const void* W, int64_t i) {
  if (fmt == F32) return ((const float*)W)[i];
  const uint16_t h = ((const uint16_t*)W)[i];
  return fmt == F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}

// A float tile: R weight rows n + r * dn against MB activation rows. Per (weight row, activation
// row) one fp32 FMA chain over k in steps of 16, then an 8-step, the 8 lanes summed and the
// scalar tail in order: the same arithmetic whatever R and MB are, so a row alone (decode: R = 4
// rows read side by side as four streams, MB = 1), in a batched step or in a prompt chunk (MB =
// 2, each widened weight vector serving both rows) gives the same bits. One chain per pair, not
// one per half vector, so that 4 x 2 pairs fit the 16 registers with their x vectors.
// BF16 with `split`: 16 weights per load, widened without shuffles (the even ones by a shift,
// the odd ones by a mask) against xs, x with each 16 values split into even and odd (split16);
// otherwise (F16, F32, or BF16 rows too long for the buffers) 8 values per load8, xs = x.
// x: the unsplit rows (stride K), for the 8-step and the tail.
template <bool Split, int R, int MB>
void f_tile_of(int fmt, const void* W, int64_t K, int64_t n, int64_t dn, const float* xs, int64_t ldx,
               const float* x, float* y, int64_t ldy) {
  const __m256i odd = _mm256_set1_epi32((int)0xffff0000);
  __m256 a[R][MB];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < MB; i++) a[r][i] = _mm256_setzero_ps();
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 x0[MB], x1[MB];
    for (int i = 0; i < MB; i++) {
      x0[i] = _mm256_loadu_ps(xs + i * ldx + k);
      x1[i] = _mm256_loadu_ps(xs + i * ldx + k + 8);
    }
    for (int r = 0; r < R; r++) {
      const int64_t o = (n + r * dn) * K + k;
      __m256 w0, w1;
      if constexpr (Split) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)((const uint16_t*)W + o));
        w0 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        w1 = _mm256_castsi256_ps(_mm256_and_si256(w, odd));
      } else {
        w0 = load8(fmt, W, o);
        w1 = load8(fmt, W, o + 8);
      }
      for (int i = 0; i < MB; i++) a[r][i] = _mm256_fmadd_ps(w1, x1[i], _mm256_fmadd_ps(w0, x0[i], a[r][i]));
    }
  }
  const bool eight = K16 + 8 <= K;
  for (int r = 0; r < R; r++) {
    const int64_t row = (n + r * dn) * K;
    for (int i = 0; i < MB; i++) {
      __m256 acc = a[r][i];
      if (eight) acc = _mm256_fmadd_ps(load8(fmt, W, row + K16), _mm256_loadu_ps(x + i * K + K16), acc);
      float s = hsum8(acc);
      for (int64_t k = K16 + (eight ? 8 : 0); k < K; k++) s += load1(fmt, W, row + k) * x[i * K + k];
      y[i * ldy + n + r * dn] = s;
    }
  }
}

template <int R, int MB>
inline void f_tile(bool split, int fmt, const void* W, int64_t K, int64_t n, int64_t dn, const float* xs, int64_t ldx,
                   const float* x, float* y, int64_t ldy) {
  if (split)
    f_tile_of<true, R, MB>(fmt, W, K, n, dn, xs, ldx, x, y, ldy);
  else
    f_tile_of<false, R, MB>(fmt, W, K, n, dn, xs, ldx, x, y, ldy);
}

// x -> per 16 values the 8 even ones, then the 8 odd ones (the lanes of a split bf16 load)
void split16(const float* x, int64_t K16, float* xs) {
  for (int64_t k = 0; k < K16; k += 16)
    for (int j = 0; j < 8; j++) {
      xs[k + j] = x[k + 2 * j];
      xs[k + 8 + j] = x[k + 2 * j + 1];
    }
}

// Weight rows [n0, n1) (one of gemv_f's blocks) against MB activation rows (xs: stride ldx),
// 4 weight rows a tile.
template <int MB>
void f_rows_block(bool split, int fmt, const void* W, int64_t K, int64_t n0, int64_t n1, const float* xs,
                  int64_t ldx, const float* x, float* y, int64_t ldy) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) f_tile<4, MB>(split, fmt, W, K, n, 1, xs, ldx, x, y, ldy);
  for (; n < n1; n++) f_tile<1, MB>(split, fmt, W, K, n, 0, xs, ldx, x, y, ldy);
}

void gemv_f(int fmt, const void* W, int64_t K, int64_t n0, int64_t n1, const float* x, const uint16_t*, int64_t M,
            float* y, int64_t ldy) {
  // (No std::vector here: this file is compiled for AVX2, and an inline template instantiated in
  // it could be linked into the scalar path; see plm_kernels.h. The split rows of several
  // activation rows come from malloc.)
  const int64_t K16 = K & ~(int64_t)15;
  const bool split = fmt == BF16 && K16 <= 8192;
  float one[8192];
  float* many = split && M > 1 ? (float*)malloc(sizeof(float) * M * K16) : nullptr;
  if (M == 1 || (split && !many)) {  // row by row: four runs of weight rows read side by side
    for (int64_t m = 0; m < M; m++) {
      const float* xm = x + m * K;
      if (split) split16(xm, K16, one);
      const float* xv = split ? one : xm;
      const int64_t q = (n1 - n0) / 4;
      for (int64_t i = 0; i < q; i++) f_tile<4, 1>(split, fmt, W, K, n0 + i, q, xv, 0, xm, y + m * ldy, ldy);
      for (int64_t n = n0 + 4 * q; n < n1; n++) f_tile<1, 1>(split, fmt, W, K, n, 0, xv, 0, xm, y + m * ldy, ldy);
    }
    return;
  }
  if (split)
    for (int64_t m = 0; m < M; m++) split16(x + m * K, K16, many + m * K16);
  const float* xv = split ? many : x;
  const int64_t ldx = split ? K16 : K;
  const int64_t fit = (256 << 10) / (K * (fmt == F32 ? 4 : 2)), nb = fit > 4 ? fit : 4;
  for (int64_t b0 = n0; b0 < n1; b0 += nb) {
    const int64_t b1 = b0 + nb < n1 ? b0 + nb : n1;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      f_rows_block<2>(split, fmt, W, K, b0, b1, xv + m * ldx, ldx, x + m * K, y + m * ldy, ldy);
    if (m < M) f_rows_block<1>(split, fmt, W, K, b0, b1, xv + m * ldx, ldx, x + m * K, y + m * ldy, ldy);
  }
  free(many);
}

// ---- sparse down --------------------------------------------------------------------------
// Per 64 outputs: integer sums over a block's active neurons, two neurons at a time
// (interleaved so that madd/maddubs pairs them), flushed per block as in the dense kernel.

// Q8_0 rows: int8 widened to int16, (w1, w2) pairs against (x1, x2): 8 int32 per madd.
// Accumulators hold outputs in the order [0-3, 8-11 | 4-7, 12-15] per 16; fixed at the flush.
PLM_ALWAYS_INLINE void q8_pair(const int8_t* r1, const int8_t* r2, int x1, int x2, __m256i* acc /*[8]*/) {
  const __m256i xp = _mm256_set1_epi32((int)(((uint32_t)x1 & 0xffff) | ((uint32_t)x2 << 16)));
  for (int c = 0; c < 4; c++) {
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r1 + 16 * c)));
    const __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r2 + 16 * c)));
    acc[2 * c] = _mm256_add_epi32(acc[2 * c], _mm256_madd_epi16(_mm256_unpacklo_epi16(w1, w2), xp));
    acc[2 * c + 1] = _mm256_add_epi32(acc[2 * c + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(w1, w2), xp));
  }
}
// Q6_K rows (u8 0..63): as q8_pair with zero extension.
PLM_ALWAYS_INLINE void u8_pair(const uint8_t* r1, const uint8_t* r2, int x1, int x2, __m256i* acc /*[8]*/) {
  const __m256i xp = _mm256_set1_epi32((int)(((uint32_t)x1 & 0xffff) | ((uint32_t)x2 << 16)));
  for (int c = 0; c < 4; c++) {
    const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(r1 + 16 * c)));
    const __m256i w2 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(r2 + 16 * c)));
    acc[2 * c] = _mm256_add_epi32(acc[2 * c], _mm256_madd_epi16(_mm256_unpacklo_epi16(w1, w2), xp));
    acc[2 * c + 1] = _mm256_add_epi32(acc[2 * c + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(w1, w2), xp));
  }
}
PLM_ALWAYS_INLINE void q8_unscramble(const __m256i* acc, __m256i* out /*[8] in output order*/) {
  for (int c = 0; c < 4; c++) {
    out[2 * c] = _mm256_permute2x128_si256(acc[2 * c], acc[2 * c + 1], 0x20);
    out[2 * c + 1] = _mm256_permute2x128_si256(acc[2 * c], acc[2 * c + 1], 0x31);
  }
}

// Q4 nibble rows (32 bytes = 64 outputs): (w1, w2) u8 pairs against (x1, x2) s8 with
// maddubs; int16 sums of up to 8 pairs (<= 8 * 3810) then widened into acc (output order).
PLM_ALWAYS_INLINE void q4_pair(const uint8_t* r1, const uint8_t* r2, int x1, int x2, __m256i* s /*[4] int16*/) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i xp = _mm256_set1_epi16((short)((x1 & 0xff) | ((x2 & 0xff) << 8)));
  const __m256i v1 = ld256(r1), v2 = ld256(r2);
  const __m256i a_lo = _mm256_and_si256(v1, m4), b_lo = _mm256_and_si256(v2, m4);
  const __m256i a_hi = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), b_hi = _mm256_and_si256(_mm256_srli_epi16(v2, 4), m4);
  s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a_lo, b_lo), xp));  // 0-7 | 16-23
  s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a_lo, b_lo), xp));  // 8-15 | 24-31
  s[2] = _mm256_add_epi16(s[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a_hi, b_hi), xp));  // 32-39 | 48-55
  s[3] = _mm256_add_epi16(s[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a_hi, b_hi), xp));  // 40-47 | 56-63
}
PLM_ALWAYS_INLINE void q4_widen(__m256i* s, __m256i* acc) {
  for (int h = 0; h < 2; h++) {  // low / high nibble halves
    acc[4 * h + 0] = _mm256_add_epi32(acc[4 * h + 0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s[2 * h])));
    acc[4 * h + 1] = _mm256_add_epi32(acc[4 * h + 1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s[2 * h + 1])));
    acc[4 * h + 2] = _mm256_add_epi32(acc[4 * h + 2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s[2 * h], 1)));
    acc[4 * h + 3] = _mm256_add_epi32(acc[4 * h + 3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s[2 * h + 1], 1)));
    s[2 * h] = s[2 * h + 1] = _mm256_setzero_si256();
  }
}

// Integer sums over the active neurons of block b for outputs [c0, c0+64), in output order.
PLM_ALWAYS_INLINE void block_isum(const SparseW& W, const int8_t* q, const ActiveList& act, int64_t b, int64_t c0, __m256i* out) {
  const int32_t a0 = act.start[b], a1 = act.start[b + 1];
  __m256i acc[8];
  for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
  if (W.fmt == Q8_0) {
    const int8_t* base = (const int8_t*)W.base + c0;
    int32_t a = a0;
    for (; a + 2 <= a1; a += 2) {
      const int32_t i1 = act.idx[a], i2 = act.idx[a + 1];
      q8_pair(base + i1 * W.Np, base + i2 * W.Np, q[i1], q[i2], acc);
    }
    if (a < a1) q8_pair(base + act.idx[a] * W.Np, base + act.idx[a] * W.Np, q[act.idx[a]], 0, acc);
    q8_unscramble(acc, out);
  } else {
    const uint8_t* base = W.base + c0 / 2;
    const int64_t ld = W.Np / 2;
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int32_t a = a0, n = 0;
    for (; a + 2 <= a1; a += 2) {
      const int32_t i1 = act.idx[a], i2 = act.idx[a + 1];
      q4_pair(base + i1 * ld, base + i2 * ld, q[i1], q[i2], s);
      if (++n == 8) { q4_widen(s, acc); n = 0; }
    }
    if (a < a1) q4_pair(base + act.idx[a] * ld, base + act.idx[a] * ld, q[act.idx[a]], 0, s);
    q4_widen(s, acc);
    for (int i = 0; i < 8; i++) out[i] = acc[i];
  }
}

// Software prefetch of the lines unit u (a block of 32 neurons, or a super-block of 256 for the
// K-quants) will read for outputs [s0, s1): each active neuron's row segment. The active rows
// are scattered, so the hardware prefetchers cannot guess them; we know them from the active
// list. (The scale planes are read in order, unit after unit, which the prefetchers follow.)
inline void prefetch_unit(const SparseW& W, const ActiveList& act, int64_t u, int64_t s0, int64_t s1) {
  const bool kq = W.fmt == Q4_K || W.fmt == Q6_K;
  const int64_t b0 = kq ? 8 * u : u, b1 = kq ? 8 * u + 8 : u + 1;
  const int64_t ld = W.fmt == Q8_0 || W.fmt == Q6_K ? W.Np : W.Np / 2;
  const int64_t lo = ld == W.Np ? s0 : s0 / 2, hi = ld == W.Np ? s1 : (s1 + 1) / 2;
  for (int32_t a = act.start[b0]; a < act.start[b1]; a++) {
    const char* row = (const char*)W.base + (int64_t)act.idx[a] * ld;
    for (int64_t o = lo; o < hi; o += 64) _mm_prefetch(row + o, _MM_HINT_T0);
  }
}

// The integer sums of one unit for 64 outputs at c0, flushed into the fp32 accumulators acc[8]
// (in memory: the loop over units is outside the loop over output chunks, so that each active
// row is read along its length rather than 64 bytes from every chunk in turn). Per output the
// fp32 sequence is the dense kernel's, unit by unit in order.
PLM_ALWAYS_INLINE void sparse_unit(const SparseW& W, const int8_t* q, const float* d, const int32_t* s16, const ActiveList& act,
                        int64_t u, int64_t c0, float* accp) {
  const int64_t K = W.K, Np = W.Np, nb = K / 32;
  const __m256 neg = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000));
  __m256 acc[8];
  for (int i = 0; i < 8; i++) acc[i] = _mm256_loadu_ps(accp + 8 * i);
  __m256i is[8];
  if (W.fmt == Q8_0 || W.fmt == Q4_0) {
    const int64_t b = u;
    const uint8_t* dplane = W.base + K * (W.fmt == Q8_0 ? Np : Np / 2);
    block_isum(W, q, act, b, c0, is);
    const __m256i off = _mm256_set1_epi32(W.fmt == Q4_0 ? 8 * (s16[2 * b] + s16[2 * b + 1]) : 0);
    const __m256 dx = _mm256_set1_ps(d[b]);
    for (int i = 0; i < 8; i++)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(is[i], off)),
                               _mm256_mul_ps(f16x8(dplane + 2 * (b * Np + c0 + 8 * i)), dx), acc[i]);
  } else if (W.fmt == Q6_K) {
    const int64_t s = u, ns = K / 256;
    const uint8_t* dpl = W.base + K * Np;
    const int8_t* scpl = (const int8_t*)(dpl + 2 * ns * Np);
    const uint8_t* base = W.base + c0;
    __m256i isum[8];
    for (int i = 0; i < 8; i++) isum[i] = _mm256_setzero_si256();
    for (int64_t b = 8 * s; b < 8 * s + 8; b++) {
      int32_t a = act.start[b];
      for (int h = 0; h < 2; h++) {  // the two sub-blocks of 16 neurons in this block of 32
        const int64_t g = 2 * b + h;
        int32_t e = a;
        while (e < act.start[b + 1] && act.idx[e] < 16 * (g + 1)) e++;
        if (e == a) continue;
        __m256i isub[8];
        for (int i = 0; i < 8; i++) isub[i] = _mm256_setzero_si256();
        for (; a + 2 <= e; a += 2)
          u8_pair(base + act.idx[a] * Np, base + act.idx[a + 1] * Np, q[act.idx[a]], q[act.idx[a + 1]], isub);
        if (a < e) u8_pair(base + act.idx[a] * Np, base + act.idx[a] * Np, q[act.idx[a]], 0, isub);
        a = e;
        q8_unscramble(isub, is);
        const __m256i off = _mm256_set1_epi32(32 * s16[g]);
        for (int i = 0; i < 8; i++) {
          const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(scpl + g * Np + c0 + 8 * i)));
          isum[i] = _mm256_add_epi32(isum[i], _mm256_mullo_epi32(sc, _mm256_sub_epi32(is[i], off)));
        }
      }
    }
    const __m256 dx = _mm256_set1_ps(d[s]);
    for (int i = 0; i < 8; i++)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(f16x8(dpl + 2 * (s * Np + c0 + 8 * i)), dx),
                               acc[i]);
  } else {  // Q4_K
    const int64_t s = u, ns = K / 256;
    const uint8_t* dpl = W.base + K * (Np / 2);
    const uint8_t* mpl = dpl + 2 * ns * Np;
    const uint8_t* scpl = mpl + 2 * ns * Np;
    const uint8_t* mnpl = scpl + nb * Np;
    __m256i isc[8], imin[8];
    for (int i = 0; i < 8; i++) isc[i] = imin[i] = _mm256_setzero_si256();
    for (int64_t b = 8 * s; b < 8 * s + 8; b++) {
      if (act.start[b] == act.start[b + 1]) continue;
      block_isum(W, q, act, b, c0, is);
      const __m256i s32 = _mm256_set1_epi32(s16[2 * b] + s16[2 * b + 1]);
      for (int i = 0; i < 8; i++) {
        const __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(scpl + b * Np + c0 + 8 * i)));
        const __m256i mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(mnpl + b * Np + c0 + 8 * i)));
        isc[i] = _mm256_add_epi32(isc[i], _mm256_mullo_epi32(sc, is[i]));
        imin[i] = _mm256_add_epi32(imin[i], _mm256_mullo_epi32(mn, s32));
      }
    }
    const __m256 dx = _mm256_set1_ps(d[s]);
    for (int i = 0; i < 8; i++) {
      const __m256 dd = _mm256_mul_ps(f16x8(dpl + 2 * (s * Np + c0 + 8 * i)), dx);
      const __m256 dm = _mm256_xor_ps(_mm256_mul_ps(f16x8(mpl + 2 * (s * Np + c0 + 8 * i)), dx), neg);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isc[i]), dd, acc[i]);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin[i]), dm, acc[i]);
    }
  }
  for (int i = 0; i < 8; i++) _mm256_storeu_ps(accp + 8 * i, acc[i]);
}

void sparse_q(const SparseW& W, const int8_t* q, const float* d, const int32_t* s16, const ActiveList& act,
              int64_t j0, int64_t j1, float* y) {
  const bool kq = W.fmt == Q4_K || W.fmt == Q6_K;
  const int64_t nu = kq ? W.K / 256 : W.K / 32;  // units: blocks, or super-blocks of 8 blocks
  enum : int { SPAN = 1024 };  // outputs per pass (accumulators in L1)
  const int64_t AHEAD = kq ? 1 : 8;  // units prefetched ahead (~16-24 active neurons at 91% zeros)
  alignas(32) float acc[SPAN];
  for (int64_t s0 = j0; s0 < j1; s0 += SPAN) {
    const int64_t s1 = j1 < s0 + SPAN ? j1 : s0 + SPAN, s1p = s0 + ceil_div(s1 - s0, 64) * 64;
    for (int64_t j = 0; j < s1p - s0; j++) acc[j] = 0.f;
    for (int64_t u = 0; u < AHEAD && u < nu; u++) prefetch_unit(W, act, u, s0, s1p);
    for (int64_t u = 0; u < nu; u++) {
      if (u + AHEAD < nu) prefetch_unit(W, act, u + AHEAD, s0, s1p);
      if (act.start[kq ? 8 * u : u] == act.start[kq ? 8 * u + 8 : u + 1]) continue;
      for (int64_t c0 = s0; c0 < s1p; c0 += 64) sparse_unit(W, q, d, s16, act, u, c0, acc + (c0 - s0));
    }
    for (int64_t j = s0; j < s1; j++) y[j] = acc[j - s0];
  }
}

void sparse_f(const SparseW& W, const float* a, const int32_t* idx, int64_t n_idx, int64_t j0, int64_t j1, float* y) {
  // as sparse_q: the active rows outside, output chunks inside, accumulators in L1, the rows
  // AHEAD places on prefetched; per output the sum runs over the active neurons in order
  enum : int { SPAN = 1024, AHEAD = 8 };
  const int64_t elt = W.fmt == F32 ? 4 : 2;
  alignas(32) float acc[SPAN];
  int64_t c0 = j0;
  while (c0 + 64 <= j1) {  // whole chunks of 64 outputs, up to SPAN at a time
    const int64_t c1 = c0 + ((j1 - c0 < SPAN ? j1 - c0 : SPAN) & ~(int64_t)63);
    for (int64_t j = 0; j < c1 - c0; j++) acc[j] = 0.f;
    for (int64_t t = 0; t < n_idx; t++) {
      if (t + AHEAD < n_idx) {
        const char* r = (const char*)W.base + ((int64_t)idx[t + AHEAD] * W.N + c0) * elt;
        for (int64_t o = 0; o < (c1 - c0) * elt; o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
      }
      const __m256 ai = _mm256_set1_ps(a[idx[t]]);
      const int64_t row = (int64_t)idx[t] * W.N;
      for (int64_t j = c0; j < c1; j += 8) {
        float* p = acc + (j - c0);
        _mm256_store_ps(p, _mm256_fmadd_ps(ai, load8(W.fmt, W.base, row + j), _mm256_load_ps(p)));
      }
    }
    for (int64_t j = c0; j < c1; j++) y[j] = acc[j - c0];
    c0 = c1;
  }
  for (int64_t j = c0; j < j1; j++) {
    float s = 0.f;
    for (int64_t t = 0; t < n_idx; t++) s += a[idx[t]] * load1(W.fmt, W.base, (int64_t)idx[t] * W.N + j);
    y[j] = s;
  }
}

// ---- attention ----------------------------------------------------------------------------
// exp for x <= 0 (softmax after max subtraction), Cephes polynomial: relative error ~1e-7.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, z, x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Heads in lanes (16 heads as two 8-lane halves), fp32: the cached rows of a block are widened
// to fp32 once, then each row's scores for all heads are FMAs of the transposed query against a
// broadcast of the row's value at k, the softmax is elementwise across heads, and the values
// are FMAs of the probabilities against broadcast V[t][r]; every cached row is read once per
// block for all heads, with no horizontal sums.
void attention(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache, int cache_bf16, int64_t S,
               int64_t part, float scale, float* out, float* lse, float* scratch) {
  float* R = scratch;                     // [ATTN_TB][D] fp32 rows (bf16 cache)
  float* qT = R + ATTN_TB * D;            // [D][16]
  float* OT = qT + 16 * D;                // [rank][16]
  float* sT = OT + 16 * rank;             // [ATTN_TB][16] scores, then probabilities
  const __m256 vs = _mm256_set1_ps(scale);
  for (int64_t h0 = 0; h0 < nh; h0 += 16) {
    const int64_t g = nh - h0 < 16 ? nh - h0 : 16;
    for (int64_t k = 0; k < D; k++)
      for (int64_t j = 0; j < 16; j++) qT[k * 16 + j] = j < g ? q[(h0 + j) * D + k] : 0.f;
    // each part of `part` cached rows: its own softmax, normalised, with its log-sum-exp
    for (int64_t p0 = 0, pi = 0; p0 < S; p0 += part, pi++) {
      const int64_t n = S - p0 < part ? S - p0 : part;
      const void* pc = (const uint8_t*)cache + p0 * D * (cache_bf16 ? 2 : 4);
      for (int64_t i = 0; i < 16 * rank; i++) OT[i] = 0.f;
      __m256 m0 = _mm256_set1_ps(-__builtin_inff()), m1 = m0, l0 = _mm256_setzero_ps(), l1 = l0;
      for (int64_t t0 = 0; t0 < n; t0 += ATTN_TB) {
        const int64_t tb = n - t0 < ATTN_TB ? n - t0 : ATTN_TB;
        const float* Rb;
        if (cache_bf16) {
          const uint16_t* c = (const uint16_t*)pc + t0 * D;
          int64_t k = 0;
          for (; k + 8 <= tb * D; k += 8)
            _mm256_storeu_ps(R + k, _mm256_castsi256_ps(_mm256_slli_epi32(
                                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(c + k))), 16)));
          for (; k < tb * D; k++) R[k] = bf16_to_fp32(c[k]);
          Rb = R;
        } else {
          Rb = (const float*)pc + t0 * D;
        }
        // scores, rows in fours: 8 accumulators, 2 query loads + 4 broadcasts per 8 FMAs
        int64_t t = 0;
        for (; t + 4 <= tb; t += 4) {
          __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
          const float* r0 = Rb + t * D;
          for (int64_t k = 0; k < D; k++) {
            const __m256 qa = _mm256_loadu_ps(qT + k * 16), qb = _mm256_loadu_ps(qT + k * 16 + 8);
            __m256 v = _mm256_broadcast_ss(r0 + k);
            a00 = _mm256_fmadd_ps(qa, v, a00), a01 = _mm256_fmadd_ps(qb, v, a01);
            v = _mm256_broadcast_ss(r0 + D + k);
            a10 = _mm256_fmadd_ps(qa, v, a10), a11 = _mm256_fmadd_ps(qb, v, a11);
            v = _mm256_broadcast_ss(r0 + 2 * D + k);
            a20 = _mm256_fmadd_ps(qa, v, a20), a21 = _mm256_fmadd_ps(qb, v, a21);
            v = _mm256_broadcast_ss(r0 + 3 * D + k);
            a30 = _mm256_fmadd_ps(qa, v, a30), a31 = _mm256_fmadd_ps(qb, v, a31);
          }
          float* st = sT + t * 16;
          _mm256_storeu_ps(st, _mm256_mul_ps(a00, vs)), _mm256_storeu_ps(st + 8, _mm256_mul_ps(a01, vs));
          _mm256_storeu_ps(st + 16, _mm256_mul_ps(a10, vs)), _mm256_storeu_ps(st + 24, _mm256_mul_ps(a11, vs));
          _mm256_storeu_ps(st + 32, _mm256_mul_ps(a20, vs)), _mm256_storeu_ps(st + 40, _mm256_mul_ps(a21, vs));
          _mm256_storeu_ps(st + 48, _mm256_mul_ps(a30, vs)), _mm256_storeu_ps(st + 56, _mm256_mul_ps(a31, vs));
        }
        for (; t < tb; t++) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0;
          for (int64_t k = 0; k < D; k++) {
            const __m256 v = _mm256_broadcast_ss(Rb + t * D + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qT + k * 16), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qT + k * 16 + 8), v, a1);
          }
          _mm256_storeu_ps(sT + t * 16, _mm256_mul_ps(a0, vs)), _mm256_storeu_ps(sT + t * 16 + 8, _mm256_mul_ps(a1, vs));
        }
        // online softmax, elementwise across heads
        __m256 b0 = _mm256_loadu_ps(sT), b1 = _mm256_loadu_ps(sT + 8);
        for (t = 1; t < tb; t++)
          b0 = _mm256_max_ps(b0, _mm256_loadu_ps(sT + t * 16)), b1 = _mm256_max_ps(b1, _mm256_loadu_ps(sT + t * 16 + 8));
        const __m256 n0 = _mm256_max_ps(m0, b0), n1 = _mm256_max_ps(m1, b1);
        const __m256 al0 = exp8(_mm256_sub_ps(m0, n0)), al1 = exp8(_mm256_sub_ps(m1, n1));  // m = -inf: ~0
        m0 = n0, m1 = n1;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (t = 0; t < tb; t++) {
          const __m256 p0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sT + t * 16), n0));
          const __m256 p1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sT + t * 16 + 8), n1));
          _mm256_storeu_ps(sT + t * 16, p0), _mm256_storeu_ps(sT + t * 16 + 8, p1);
          s0 = _mm256_add_ps(s0, p0), s1 = _mm256_add_ps(s1, p1);
        }
        l0 = _mm256_fmadd_ps(l0, al0, s0), l1 = _mm256_fmadd_ps(l1, al1, s1);
        // values, r in fours: OT[r] = alpha * OT[r] + sum_t p[t] * V[t][r]
        int64_t r = 0;
        for (; r + 4 <= rank; r += 4) {
          float* o = OT + r * 16;
          __m256 c00 = _mm256_mul_ps(_mm256_loadu_ps(o), al0), c01 = _mm256_mul_ps(_mm256_loadu_ps(o + 8), al1);
          __m256 c10 = _mm256_mul_ps(_mm256_loadu_ps(o + 16), al0), c11 = _mm256_mul_ps(_mm256_loadu_ps(o + 24), al1);
          __m256 c20 = _mm256_mul_ps(_mm256_loadu_ps(o + 32), al0), c21 = _mm256_mul_ps(_mm256_loadu_ps(o + 40), al1);
          __m256 c30 = _mm256_mul_ps(_mm256_loadu_ps(o + 48), al0), c31 = _mm256_mul_ps(_mm256_loadu_ps(o + 56), al1);
          for (t = 0; t < tb; t++) {
            const __m256 pa = _mm256_loadu_ps(sT + t * 16), pb = _mm256_loadu_ps(sT + t * 16 + 8);
            const float* v = Rb + t * D + r;
            __m256 x = _mm256_broadcast_ss(v);
            c00 = _mm256_fmadd_ps(pa, x, c00), c01 = _mm256_fmadd_ps(pb, x, c01);
            x = _mm256_broadcast_ss(v + 1);
            c10 = _mm256_fmadd_ps(pa, x, c10), c11 = _mm256_fmadd_ps(pb, x, c11);
            x = _mm256_broadcast_ss(v + 2);
            c20 = _mm256_fmadd_ps(pa, x, c20), c21 = _mm256_fmadd_ps(pb, x, c21);
            x = _mm256_broadcast_ss(v + 3);
            c30 = _mm256_fmadd_ps(pa, x, c30), c31 = _mm256_fmadd_ps(pb, x, c31);
          }
          _mm256_storeu_ps(o, c00), _mm256_storeu_ps(o + 8, c01), _mm256_storeu_ps(o + 16, c10);
          _mm256_storeu_ps(o + 24, c11), _mm256_storeu_ps(o + 32, c20), _mm256_storeu_ps(o + 40, c21);
          _mm256_storeu_ps(o + 48, c30), _mm256_storeu_ps(o + 56, c31);
        }
        for (; r < rank; r++) {
          float* o = OT + r * 16;
          __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(o), al0), c1 = _mm256_mul_ps(_mm256_loadu_ps(o + 8), al1);
          for (t = 0; t < tb; t++) {
            const __m256 x = _mm256_broadcast_ss(Rb + t * D + r);
            c0 = _mm256_fmadd_ps(_mm256_loadu_ps(sT + t * 16), x, c0);
            c1 = _mm256_fmadd_ps(_mm256_loadu_ps(sT + t * 16 + 8), x, c1);
          }
          _mm256_storeu_ps(o, c0), _mm256_storeu_ps(o + 8, c1);
        }
      }
      float lv[16], mv[16];
      _mm256_storeu_ps(lv, l0), _mm256_storeu_ps(lv + 8, l1), _mm256_storeu_ps(mv, m0), _mm256_storeu_ps(mv + 8, m1);
      for (int64_t j = 0; j < g; j++) {
        const float inv = lv[j] > 0.f ? 1.f / lv[j] : 0.f;
        for (int64_t r = 0; r < rank; r++) out[(pi * nh + h0 + j) * rank + r] = OT[r * 16 + j] * inv;
        if (lse) lse[pi * nh + h0 + j] = lv[j] > 0.f ? mv[j] + __builtin_logf(lv[j]) : -__builtin_inff();
      }
    }
  }
}

}  // namespace

extern const Kernels kernels_avx2 = {
    "avx2", quantize_act, gemv_q8_0, gemv_q4_0, gemv_q4_k, gemv_q6_k, gemv_q5_k, gemv_f, sparse_q, sparse_f, attention,
    nullptr,
};

}  // namespace plm
