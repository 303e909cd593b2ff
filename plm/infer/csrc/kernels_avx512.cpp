// AVX-512 (F, BW, VL, DQ, VNNI) kernels: one 16-row tile is one zmm, `vpdpbusd` multiplies
// 4 unsigned weight bytes by 4 signed activation bytes per row and accumulates in int32, so a
// block costs one instruction per 64 bytes of weights. Same integer sums and fp32 sequence as
// kernels_scalar.cpp. Entries without a kernel here (one-row sparse, attention, activation
// quantisation) use the AVX2 kernels, which run unchanged on these CPUs.
//
// PLM_SIMDE builds this file against SIMDe's portable AVX-512 emulation
// (scripts/check_avx512_emulated.sh), so the path can be verified on a host without AVX-512.
#ifdef PLM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#endif

#include <time.h>

#include "plm_kernels.h"
#include "simde_shim.h"
#include "avx512_sum.h"

namespace plm {
namespace {

inline __m512 f16x16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512i ld512(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
inline int32_t ld32(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

inline void store_tile(float* y, int64_t ldy, int64_t m, int64_t row0, int64_t N, __m512 v) {
  float* dst = y + m * ldy + row0;
  if (row0 + TILE <= N) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << (N - row0)) - 1), v);
  }
}

// The integer sums of a 32-input block (Q8_0, Q4_0) start at -offset * sum(x block) rather
// than at zero, so the weight offset costs no subtraction per (tile, row): the same int32 sums.
template <int MT, int MB>
inline void block_start(__m512i (&is)[MT][MB], int32_t offset, const QAct& x, int64_t m0, int64_t K, int64_t b) {
  for (int i = 0; i < MB; i++) {
    const int32_t* s = x.s16 + (m0 + i) * (K / 16) + 2 * b;
    const __m512i off = _mm512_set1_epi32(-offset * (s[0] + s[1]));
    for (int j = 0; j < MT; j++) is[j][i] = off;
  }
}

// The per-block fp32 step, as every path: acc += float(dot) * (d_w * d_x).
template <int MT, int MB>
inline void block_epilogue(__m512 (&acc)[MT][MB], const __m512i (&is)[MT][MB], const uint8_t* const* wt, int64_t boff,
                           const QAct& x, int64_t m0, int64_t nd, int64_t b) {
  __m512 dw[MT];
  for (int j = 0; j < MT; j++) dw[j] = f16x16(wt[j] + boff);
  for (int i = 0; i < MB; i++) {
    const __m512 dx = _mm512_set1_ps(x.d[(m0 + i) * nd + b]);
    for (int j = 0; j < MT; j++)
      acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[j][i]), _mm512_mul_ps(dw[j], dx), acc[j][i]);
  }
}

// MT tiles (separate weight streams, see the driver) x MB activation rows; every (tile, row)
// pair gets the same per-block sequence whatever MT and MB are.
template <int MT, int MB>
void q8_0_rows(const uint8_t* const* wt, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 32, nd = K / x.bs;
  __m512 acc[MT][MB];
  for (int j = 0; j < MT; j++)
    for (int i = 0; i < MB; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512i is[MT][MB];
    block_start<MT, MB>(is, 128, x, m0, K, b);
    for (int c = 0; c < 8; c++) {
      __m512i w[MT];
      for (int j = 0; j < MT; j++) w[j] = ld512(wt[j] + b * Q8_0_TB + 32 + 64 * c);  // q + 128 as unsigned bytes
      for (int i = 0; i < MB; i++) {  // each activation broadcast feeds every tile
        const __m512i xv = _mm512_set1_epi32(ld32(x.q + (m0 + i) * K + 32 * b + 4 * c));
        for (int j = 0; j < MT; j++) is[j][i] = _mm512_dpbusd_epi32(is[j][i], w[j], xv);
      }
    }
    block_epilogue<MT, MB>(acc, is, wt, b * Q8_0_TB, x, m0, nd, b);
  }
  for (int j = 0; j < MT; j++)
    for (int i = 0; i < MB; i++) store_tile(y, ldy, m0 + i, row0[j], N, acc[j][i]);
}

template <int MT, int MB>
void q4_0_rows(const uint8_t* const* wt, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 32, nd = K / x.bs;
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512 acc[MT][MB];
  for (int j = 0; j < MT; j++)
    for (int i = 0; i < MB; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512i is[MT][MB];
    block_start<MT, MB>(is, 8, x, m0, K, b);
    for (int g = 0; g < 4; g++) {
      __m512i lo[MT], hi[MT];
      for (int j = 0; j < MT; j++) {
        const __m512i v = ld512(wt[j] + b * Q4_0_TB + 32 + 64 * g);
        lo[j] = _mm512_and_si512(v, m4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      for (int i = 0; i < MB; i++) {  // each activation broadcast feeds every tile
        const int8_t* xq = x.q + (m0 + i) * K + 32 * b + 8 * g;
        const __m512i xa = _mm512_set1_epi32(ld32(xq)), xb = _mm512_set1_epi32(ld32(xq + 4));
        for (int j = 0; j < MT; j++) is[j][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(is[j][i], lo[j], xa), hi[j], xb);
      }
    }
    block_epilogue<MT, MB>(acc, is, wt, b * Q4_0_TB, x, m0, nd, b);
  }
  for (int j = 0; j < MT; j++)
    for (int i = 0; i < MB; i++) store_tile(y, ldy, m0 + i, row0[j], N, acc[j][i]);
}

// Per-row bytes of two consecutive sub-blocks of a tile (16 rows each, at p and p + 16; mins of
// Q4_K, scales of Q6_K) against the two sub-blocks' activation sums: each row's
// byte_0 * sum_0 + byte_1 * sum_1 added in by one `vpdpwssd` (bytes and sums fit int16), for
// the 8 / W pairs of a super-block; W = 16-input sums per sub-block (2 for 32 inputs, 1 for 16).
template <int MB, bool Signed, int W>
inline void pair_terms(__m512i (&acc)[MB], const uint8_t* bytes, const QAct& x, int64_t m0, int64_t K, int64_t b) {
  for (int p = 0; p < 8 / W; p++) {
    const __m128i a = _mm_loadu_si128((const __m128i*)(bytes + 32 * p));
    const __m128i c = _mm_loadu_si128((const __m128i*)(bytes + 32 * p + 16));
    const __m256i ac = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(a, c)), _mm_unpackhi_epi8(a, c), 1);
    const __m512i wp = Signed ? _mm512_cvtepi8_epi16(ac) : _mm512_cvtepu8_epi16(ac);  // lane r: (byte_0, byte_1) of row r
    for (int i = 0; i < MB; i++) {
      const int32_t* s = x.s16 + (m0 + i) * (K / 16) + 16 * b + 2 * W * p;
      int32_t s0 = 0, s1 = 0;
      for (int k = 0; k < W; k++) s0 += s[k], s1 += s[W + k];
      acc[i] = _mm512_dpwssd_epi32(acc[i], wp, _mm512_set1_epi32((int32_t)((uint32_t)(uint16_t)s0 | ((uint32_t)s1 << 16))));
    }
  }
}

// Q4_K: per sub-block of 32 inputs the nibble dot (weights unpacked once per tile, shared by
// the activation rows) times the 6-bit scale; the min term sum_j m_j * sum(x_j) two sub-blocks
// per `vpdpwssd` (pair_terms): the same int32 sums as every path's. Five (Q5_K): each unpacked
// nibble vector gains its fifth bits from the sub-block's plane after the Q4_K layout.
template <int MT, int MB, bool Five = false>
void q4_k_rows(const uint8_t* const* wt, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 256, nd = K / x.bs, TB = Five ? Q5_K_TB : Q4_K_TB;
  const __m512i m4 = _mm512_set1_epi8(15), v16 = _mm512_set1_epi8(16);
  const __m512 neg = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000));
  __m512 acc[MT][MB];
  for (int j = 0; j < MT; j++)
    for (int i = 0; i < MB; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    // sub-block by sub-block across the tiles: each activation broadcast feeds every tile, and
    // the tiles' streams advance together
    __m512i isc[MT][MB], imin[MT][MB];
    for (int t = 0; t < MT; t++)
      for (int i = 0; i < MB; i++) isc[t][i] = imin[t][i] = _mm512_setzero_si512();
    for (int j = 0; j < 8; j++) {
      __m512i dj[MT][MB], plane[MT];
      for (int t = 0; t < MT; t++) {
        for (int i = 0; i < MB; i++) dj[t][i] = _mm512_setzero_si512();
        if constexpr (Five) plane[t] = ld512(wt[t] + b * TB + qk_sub(true, j) + 256);
      }
      for (int g = 0; g < 4; g++) {
        __m512i xa[MB], xb[MB];
        for (int i = 0; i < MB; i++) {
          const int8_t* xq = x.q + (m0 + i) * K + 256 * b + 32 * j + 8 * g;
          xa[i] = _mm512_set1_epi32(ld32(xq));
          xb[i] = _mm512_set1_epi32(ld32(xq + 4));
        }
        for (int t = 0; t < MT; t++) {
          const __m512i v = ld512(wt[t] + b * TB + qk_sub(Five, j) + 64 * g);
          __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          if constexpr (Five) {  // lo | ((plane << 4) & 16), hi | ((plane << 3) & 16): bits 0 and 1 to bit 4
            lo = _mm512_ternarylogic_epi32(lo, _mm512_slli_epi16(plane[t], 4), v16, 0xF8);
            hi = _mm512_ternarylogic_epi32(hi, _mm512_slli_epi16(plane[t], 3), v16, 0xF8);
            // the next group's bits to bits 0 and 1 (what a 16-bit shift carries in from the
            // neighbouring byte lands at bits 6-7 and is never read: at most 3 shifts)
            plane[t] = _mm512_srli_epi16(plane[t], 2);
          }
          for (int i = 0; i < MB; i++) dj[t][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dj[t][i], lo, xa[i]), hi, xb[i]);
        }
      }
      for (int t = 0; t < MT; t++) {
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wt[t] + b * TB + 64 + 16 * j)));
        for (int i = 0; i < MB; i++) isc[t][i] = _mm512_add_epi32(isc[t][i], _mm512_mullo_epi32(dj[t][i], sc));
      }
    }
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wt[t] + b * TB;
      pair_terms<MB, false, 2>(imin[t], blk + 192, x, m0, K, b);
      const __m512 d = f16x16(blk), dm = f16x16(blk + 32);
      for (int i = 0; i < MB; i++) {
        const __m512 dx = _mm512_set1_ps(x.d[(m0 + i) * nd + b]);
        acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[t][i]), _mm512_mul_ps(d, dx), acc[t][i]);
        acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[t][i]), _mm512_xor_ps(_mm512_mul_ps(dm, dx), neg), acc[t][i]);
      }
    }
  }
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) store_tile(y, ldy, m0 + i, row0[t], N, acc[t][i]);
}

// Q6_K: the 6-bit values rebuilt per 64-byte group (4 low bits from the nibbles, 2 high bits
// from 32 bytes of qh: bytes 0-31 of the group at bits 0-1 / 4-5, bytes 32-63 at bits 2-3 /
// 6-7, see pack.cpp), then `vpdpbusd` as Q4_0; one sub-block scale per 16 inputs. The -32 offset
// comes once per super-block: 32 * sum_j sc_j * sum(x_j), two sub-blocks per `vpdpwssd`
// (pair_terms), the same int32 as every path's sum_j sc_j * (dot_j - 32 sum(x_j)).
template <int MT, int MB>
void q6_k_rows(const uint8_t* const* wt, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  const int64_t nb = K / 256, nd = K / x.bs;
  const __m512i m4 = _mm512_set1_epi8(15), m33 = _mm512_set1_epi8(0x33);
  __m512 acc[MT][MB];
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) acc[t][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512i isum[MT][MB];
    for (int t = 0; t < MT; t++)
      for (int i = 0; i < MB; i++) isum[t][i] = _mm512_setzero_si512();
    for (int u = 0; u < 8; u++) {
      for (int h = 0; h < 2; h++) {  // sub-blocks of 16 inputs: groups 2h, 2h+1 of the unit
        __m512i dot[MT][MB];
        for (int t = 0; t < MT; t++)
          for (int i = 0; i < MB; i++) dot[t][i] = _mm512_setzero_si512();
        for (int g = 2 * h; g < 2 * h + 2; g++) {
          __m512i xa[MB], xb[MB];  // each activation broadcast feeds every tile
          for (int i = 0; i < MB; i++) {
            const int8_t* xq = x.q + (m0 + i) * K + 256 * b + 32 * u + 8 * g;
            xa[i] = _mm512_set1_epi32(ld32(xq));
            xb[i] = _mm512_set1_epi32(ld32(xq + 4));
          }
          for (int t = 0; t < MT; t++) {
            const uint8_t* ql = wt[t] + b * Q6_K_TB + 288 + 384 * u;
            const __m512i v = ld512(ql + 64 * g);
            const __m256i pl = _mm256_loadu_si256((const __m256i*)(ql + 256 + 32 * g));
            // p: each byte's two high bits for its low nibble at bits 0-1 and for its high nibble at
            // bits 4-5, all else zero; then one bit-select (low 4 bits from the nibbles, high 4
            // from the plane) per half. What the 16-bit shifts carry across bytes lands in bits
            // the select takes from the other operand.
            const __m512i p = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(pl), _mm256_srli_epi16(pl, 2), 1), m33);
            const __m512i lo = _mm512_ternarylogic_epi32(m4, v, _mm512_slli_epi16(p, 4), 0xCA);
            const __m512i hi = _mm512_ternarylogic_epi32(m4, _mm512_srli_epi16(v, 4), p, 0xCA);
            for (int i = 0; i < MB; i++)
              dot[t][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[t][i], lo, xa[i]), hi, xb[i]);
          }
        }
        for (int t = 0; t < MT; t++) {
          const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wt[t] + b * Q6_K_TB + 32 + 16 * (2 * u + h))));
          for (int i = 0; i < MB; i++) isum[t][i] = _mm512_add_epi32(isum[t][i], _mm512_mullo_epi32(sc, dot[t][i]));
        }
      }
    }
    for (int t = 0; t < MT; t++) {
      const uint8_t* blk = wt[t] + b * Q6_K_TB;
      __m512i off[MB];
      for (int i = 0; i < MB; i++) off[i] = _mm512_setzero_si512();
      pair_terms<MB, true, 1>(off, blk + 32, x, m0, K, b);
      for (int i = 0; i < MB; i++) isum[t][i] = _mm512_sub_epi32(isum[t][i], _mm512_slli_epi32(off[i], 5));
      const __m512 dw = f16x16(blk);
      for (int i = 0; i < MB; i++)
        acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][i]), _mm512_mul_ps(dw, _mm512_set1_ps(x.d[(m0 + i) * nd + b])),
                                    acc[t][i]);
    }
  }
  for (int t = 0; t < MT; t++)
    for (int i = 0; i < MB; i++) store_tile(y, ldy, m0 + i, row0[t], N, acc[t][i]);
}

// Up to 4 activation rows per call (the driver and its four read streams for decode: plm_kernels.h).
#define PLM_TILE_DRIVER(NAME, ROWS, BS, TB, BT)                                                      \
  void NAME(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y, \
            int64_t ldy, int64_t N) {                                                                 \
    tile_driver<4, BT>(W, (K / BS) * TB, t0, t1, M, [&](auto mt, auto mb, const uint8_t* const* w, int64_t m, const int64_t* r) { \
      ROWS<decltype(mt)::value, decltype(mb)::value>(w, K, x, m, y, ldy, r, N);                      \
    });                                                                                             \
  }
PLM_TILE_DRIVER(gemv_q8_0, q8_0_rows, 32, Q8_0_TB, 2)
PLM_TILE_DRIVER(gemv_q4_0, q4_0_rows, 32, Q4_0_TB, 2)
PLM_TILE_DRIVER(gemv_q4_k, q4_k_rows, 256, Q4_K_TB, 1)
PLM_TILE_DRIVER(gemv_q6_k, q6_k_rows, 256, Q6_K_TB, 2)
template <int MT, int MB>
void q5_k_rows(const uint8_t* const* wt, int64_t K, const QAct& x, int64_t m0, float* y, int64_t ldy,
               const int64_t* row0, int64_t N) {
  q4_k_rows<MT, MB, true>(wt, K, x, m0, y, ldy, row0, N);
}
PLM_TILE_DRIVER(gemv_q5_k, q5_k_rows, 256, Q5_K_TB, 1)
#undef PLM_TILE_DRIVER

// ---- float weights (convert + FMA; BF16 with vdpbf16ps lives in kernels_avx512bf16.cpp) ----
inline __m512 load16(int fmt, const void* W, int64_t i, __mmask16 m) {
  if (fmt == F32) return _mm512_maskz_loadu_ps(m, (const float*)W + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)W + i);
  if (fmt == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int MB>
void f_rows(int fmt, const void* W, int64_t K, int64_t n, const float* x, int64_t m0, float* y, int64_t ldy) {
  __m512 a0[MB], a1[MB];
  for (int i = 0; i < MB; i++) a0[i] = a1[i] = _mm512_setzero_ps();
  const __mmask16 all = 0xffff;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = load16(fmt, W, n * K + k, all), w1 = load16(fmt, W, n * K + k + 16, all);
    for (int i = 0; i < MB; i++) {
      a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (m0 + i) * K + k), a0[i]);
      a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (m0 + i) * K + k + 16), a1[i]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 msk = K - k >= 16 ? all : (__mmask16)((1u << (K - k)) - 1);
    const __m512 w0 = load16(fmt, W, n * K + k, msk);
    for (int i = 0; i < MB; i++) a0[i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(msk, x + (m0 + i) * K + k), a0[i]);
  }
  for (int i = 0; i < MB; i++) y[(m0 + i) * ldy + n] = hsum16(_mm512_add_ps(a0[i], a1[i]));
}

// One activation row against weight rows n + r * dn, r < 4 (4 read streams): x loads shared,
// 8 independent FMA chains.
void f_rows4(int fmt, const void* W, int64_t K, int64_t n, int64_t dn, const float* x, float* y) {
  __m512 a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
  const __mmask16 all = 0xffff;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < 4; r++) {
      a[r][0] = _mm512_fmadd_ps(load16(fmt, W, (n + r * dn) * K + k, all), x0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(load16(fmt, W, (n + r * dn) * K + k + 16, all), x1, a[r][1]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 msk = K - k >= 16 ? all : (__mmask16)((1u << (K - k)) - 1);
    const __m512 x0 = _mm512_maskz_loadu_ps(msk, x + k);
    for (int r = 0; r < 4; r++) a[r][0] = _mm512_fmadd_ps(load16(fmt, W, (n + r * dn) * K + k, msk), x0, a[r][0]);
  }
  for (int r = 0; r < 4; r++) y[n + r * dn] = hsum16(_mm512_add_ps(a[r][0], a[r][1]));
}

// M > 1: 4 weight rows x 4 activation rows, so each loaded vector feeds 4 FMAs and the 16 sums
// reduce together (sum16x16). The same two chains per (row, activation row) as f_rows (the
// first 16 of every 32 plus the tail, the second 16), run as two passes so only 16
// accumulators are live; named, since GCC spills an array of them to the stack every block.
void f_tile44(int fmt, const void* W, int64_t K, int64_t n, const float* x, int64_t m, float* y, int64_t ldy) {
  const __mmask16 all = 0xffff;
  const int64_t K32 = K & ~(int64_t)31;
  const int64_t o0 = n * K, o1 = o0 + K, o2 = o1 + K, o3 = o2 + K;
  const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
#define PLM_ACC(j) __m512 c0##j = _mm512_setzero_ps(), c1##j = c0##j, c2##j = c0##j, c3##j = c0##j
#define PLM_ROW(j, k, msk)                                     \
  {                                                            \
    const __m512 xv = _mm512_maskz_loadu_ps(msk, x##j + (k));  \
    c0##j = _mm512_fmadd_ps(v0, xv, c0##j);                    \
    c1##j = _mm512_fmadd_ps(v1, xv, c1##j);                    \
    c2##j = _mm512_fmadd_ps(v2, xv, c2##j);                    \
    c3##j = _mm512_fmadd_ps(v3, xv, c3##j);                    \
  }
#define PLM_BLOCK(k, msk)                                                                          \
  {                                                                                                \
    const __m512 v0 = load16(fmt, W, o0 + (k), msk), v1 = load16(fmt, W, o1 + (k), msk),           \
                 v2 = load16(fmt, W, o2 + (k), msk), v3 = load16(fmt, W, o3 + (k), msk);           \
    PLM_ROW(0, k, msk) PLM_ROW(1, k, msk) PLM_ROW(2, k, msk) PLM_ROW(3, k, msk)                    \
  }
#define PLM_SET(arr, j) arr[j] = c0##j, arr[4 + j] = c1##j, arr[8 + j] = c2##j, arr[12 + j] = c3##j
  __m512 first[16];
  {  // chain 1: the first 16 of every 32, then the tail
    PLM_ACC(0); PLM_ACC(1); PLM_ACC(2); PLM_ACC(3);
    for (int64_t k = 0; k < K32; k += 32) PLM_BLOCK(k, all)
    for (int64_t k = K32; k < K; k += 16) PLM_BLOCK(k, K - k >= 16 ? all : (__mmask16)((1u << (K - k)) - 1))
    PLM_SET(first, 0); PLM_SET(first, 1); PLM_SET(first, 2); PLM_SET(first, 3);
  }
  {  // chain 2: the second 16 of every 32; y = sum of both
    PLM_ACC(0); PLM_ACC(1); PLM_ACC(2); PLM_ACC(3);
    for (int64_t k = 16; k < K32; k += 32) PLM_BLOCK(k, all)
    __m512 second[16];
    PLM_SET(second, 0); PLM_SET(second, 1); PLM_SET(second, 2); PLM_SET(second, 3);
    for (int i = 0; i < 16; i++) first[i] = _mm512_add_ps(first[i], second[i]);
  }
  sum16x16(first, y, ldy, m, n);
#undef PLM_ACC
#undef PLM_ROW
#undef PLM_BLOCK
#undef PLM_SET
}

void gemv_f(int fmt, const void* W, int64_t K, int64_t n0, int64_t n1, const float* x, const uint16_t*, int64_t M,
            float* y, int64_t ldy) {
  if (M == 1) {  // decode: the rows cut into four runs read side by side (as the block formats)
    const int64_t q = (n1 - n0) / 4;
    for (int64_t i = 0; i < q; i++) f_rows4(fmt, W, K, n0 + i, q, x, y);
    for (int64_t n = n0 + 4 * q; n < n1; n++) f_rows<1>(fmt, W, K, n, x, 0, y, ldy);
    return;
  }
  const int64_t M4 = M & ~(int64_t)3;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    for (int64_t m = 0; m < M4; m += 4) f_tile44(fmt, W, K, n, x, m, y, ldy);
    for (int64_t r = 0; r < 4; r++)
      for (int64_t m = M4; m < M; m++) f_rows<1>(fmt, W, K, n + r, x, m, y, ldy);
  }
  for (; n < n1; n++) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f_rows<4>(fmt, W, K, n, x, m, y, ldy);
    for (; m < M; m++) f_rows<1>(fmt, W, K, n, x, m, y, ldy);
  }
}

// ---- sparse layout, several activation rows --------------------------------------------
// The neuron-major down projection for a batch of activation rows (a prompt chunk, a batched
// step), as a dense product: across rows nearly every neuron is active somewhere, and walking
// each row's own active list (sparse_q) re-reads the weights per row at a quarter of
// `vpdpbusd`'s rate. Here 4 neuron rows x 64 outputs are transposed once into the dense
// kernel's form (one dword = 4 neurons' bytes for one output) into an L1 buffer used by every
// activation row, which multiplies only its groups of 4 activations that hold a nonzero byte;
// blocks inactive in every row are skipped, unread. Per output the integer sums and the fp32
// sequence are the dense kernel's (acc = fma(float(isum), d_w * d_x, acc) per block, or per
// super-block for the K-quants), so the result is dense's bit for bit.
//
// After the byte transpose, zmm k of a 64-output chunk holds in 128-bit lane L the outputs
// 16L + 4k .. 16L + 4k + 3 (unpack works within lanes); the per-output scales are permuted to
// the same order once per block, the sums back to output order once per row.

enum : int64_t { SR_MAXCH = 16 };  // (block, chunk of 64 outputs) pairs the buffer holds

// 4x4 transpose of 128-bit lanes: in k, lane L <-> out L, lane k (its own inverse).
inline void lanes4x4(const __m512* in, __m512* out) {
  const __m512 t0 = _mm512_shuffle_f32x4(in[0], in[1], 0x44), t1 = _mm512_shuffle_f32x4(in[0], in[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(in[2], in[3], 0x44), t3 = _mm512_shuffle_f32x4(in[2], in[3], 0xEE);
  out[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// 64 per-output fp16 values (a scale plane's row) as 4 fp32 zmm in the transposed order.
inline void f16_lanes(const uint8_t* p, __m512* out) {
  const __m512 o[4] = {f16x16(p), f16x16(p + 32), f16x16(p + 64), f16x16(p + 96)};
  lanes4x4(o, out);
}

// 64 per-output bytes (K-quant sub-block scales, u8 or i8) as 4 int32 zmm in the transposed order.
inline void bytes_lanes(const uint8_t* p, bool is_signed, __m512i* out) {
  __m512 o[4], t[4];
  for (int L = 0; L < 4; L++) {
    const __m128i v = _mm_loadu_si128((const __m128i*)(p + 16 * L));
    o[L] = _mm512_castsi512_ps(is_signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
  }
  lanes4x4(o, t);
  for (int k = 0; k < 4; k++) out[k] = _mm512_castps_si512(t[k]);
}

// Neuron n's 64 outputs from c as unsigned bytes in output order: Q8_0 q + 128 (the dense
// kernel's offset form), Q6_K q (0..63), Q4_0 / Q4_K the nibbles.
inline __m512i neuron_row(const SparseW& W, int64_t n, int64_t c) {
  if (W.fmt == Q8_0)
    return _mm512_xor_si512(ld512(W.base + n * W.Np + c), _mm512_set1_epi8((char)0x80));
  if (W.fmt == Q6_K) return ld512(W.base + n * W.Np + c);
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(W.base + n * (W.Np / 2) + c / 2)));
  const __m512i sh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // high half: >> 4
  return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(15));
}

// Block b's 32 neuron rows, outputs j .. j + 63, into t [8 groups of 4 neurons][4 zmm].
inline void transpose_block(const SparseW& W, int64_t b, int64_t j, __m512i* t) {
  for (int g = 0; g < 8; g++) {
    const int64_t n = 32 * b + 4 * g;
    const __m512i r0 = neuron_row(W, n, j), r1 = neuron_row(W, n + 1, j), r2 = neuron_row(W, n + 2, j),
                  r3 = neuron_row(W, n + 3, j);
    const __m512i a = _mm512_unpacklo_epi8(r0, r1), bh = _mm512_unpackhi_epi8(r0, r1);
    const __m512i cl = _mm512_unpacklo_epi8(r2, r3), dh = _mm512_unpackhi_epi8(r2, r3);
    _mm512_store_si512((void*)(t + 4 * g + 0), _mm512_unpacklo_epi16(a, cl));
    _mm512_store_si512((void*)(t + 4 * g + 1), _mm512_unpackhi_epi16(a, cl));
    _mm512_store_si512((void*)(t + 4 * g + 2), _mm512_unpacklo_epi16(bh, dh));
    _mm512_store_si512((void*)(t + 4 * g + 3), _mm512_unpackhi_epi16(bh, dh));
  }
}

// Bit g set: activation bytes 4g .. 4g + 3 of the block at q are not all zero.
inline unsigned nonzero_groups(const int8_t* q) {
  return _mm256_cmpneq_epi32_mask(_mm256_loadu_si256((const __m256i*)q), _mm256_setzero_si256());
}

// is[c][k] += the groups in `bits` of one block's transposed weights t (chunk stride 32 zmm)
// times the activation bytes q of that block.
template <int NCH>
inline __attribute__((always_inline)) void group_sums(const __m512i* t, const int8_t* q, unsigned bits, __m512i (&is)[NCH][4]) {
  for (; bits; bits &= bits - 1) {
    const int g = __builtin_ctz(bits);
    const __m512i xb = _mm512_set1_epi32(ld32(q + 4 * g));
    for (int c = 0; c < NCH; c++)
      for (int k = 0; k < 4; k++)
        is[c][k] = _mm512_dpbusd_epi32(is[c][k], _mm512_load_si512((const void*)(t + c * 32 + 4 * g + k)), xb);
  }
}

// Q8_0 / Q4_0, row m over the blocks [b0, b1) for NCH chunks: T and S hold the transposed
// weights [block][chunk][group][4] and the permuted scales [block][chunk][4], `cs` chunks a
// block (T and S point at this call's first chunk); acc the row's accumulators [chunk][64].
template <int NCH>
void sparse_rows_row(const QAct& x, int64_t m, int64_t b0, int64_t b1, const uint8_t* live, const __m512i* T,
                     const __m512* S, int64_t cs, int32_t off, float* acc) {
  const int64_t K = x.K, nd = K / x.bs;
  const int8_t* qrow = x.q + m * K;
  for (int64_t b = b0; b < b1; b++) {
    if (!live[b]) continue;
    const unsigned nz = nonzero_groups(qrow + 32 * b);
    if (!nz) continue;  // nothing active: the block adds exactly 0
    const int32_t* s = x.s16 + m * (K / 16) + 2 * b;
    const __m512i st = _mm512_set1_epi32(-off * (s[0] + s[1]));
    __m512i is[NCH][4];
    for (int c = 0; c < NCH; c++)
      for (int k = 0; k < 4; k++) is[c][k] = st;
    group_sums<NCH>(T + (b - b0) * cs * 32, qrow + 32 * b, nz, is);
    const __m512 dx = _mm512_set1_ps(x.d[m * nd + b]);
    const __m512* sc = S + (b - b0) * cs * 4;
    for (int c = 0; c < NCH; c++)
      for (int k = 0; k < 4; k++) {
        float* a = acc + c * 64 + 16 * k;
        _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[c][k]), _mm512_mul_ps(sc[4 * c + k], dx), _mm512_load_ps(a)));
      }
  }
}

// Q4_K / Q6_K, row m over super-block s (blocks 8s .. 8s + 7, `cs` chunks each): D / DM the
// permuted d / dmin [chunk][4]; SC the sub-block scales (Q4_K per block, Q6_K per 16 neurons)
// and MN the Q4_K mins, [sub-block][chunk][4] int32. As sparse_q: integer sums scaled per
// sub-block, one fp32 step per super-block.
template <int NCH, int FMT>
void sparse_rows_kq_row(const QAct& x, int64_t m, int64_t s, const uint8_t* live, const __m512i* T, int64_t cs,
                        const __m512* D, const __m512* DM, const __m512i* SC, const __m512i* MN, float* acc) {
  const int64_t K = x.K, nd = K / x.bs;
  const int8_t* qrow = x.q + m * K;
  const int32_t* s16 = x.s16 + m * (K / 16);
  __m512i isc[NCH][4], imin[NCH][4];
  for (int c = 0; c < NCH; c++)
    for (int k = 0; k < 4; k++) isc[c][k] = imin[c][k] = _mm512_setzero_si512();
  bool any = false;
  for (int64_t bb = 0; bb < 8; bb++) {
    const int64_t b = 8 * s + bb;
    if (!live[b]) continue;
    const unsigned nz = nonzero_groups(qrow + 32 * b);
    if (!nz) continue;
    any = true;
    const __m512i* t = T + bb * cs * 32;
    if (FMT == Q4_K) {
      __m512i is[NCH][4];
      for (int c = 0; c < NCH; c++)
        for (int k = 0; k < 4; k++) is[c][k] = _mm512_setzero_si512();
      group_sums<NCH>(t, qrow + 32 * b, nz, is);
      const __m512i s32 = _mm512_set1_epi32(s16[2 * b] + s16[2 * b + 1]);
      for (int c = 0; c < NCH; c++)
        for (int k = 0; k < 4; k++) {
          isc[c][k] = _mm512_add_epi32(isc[c][k], _mm512_mullo_epi32(SC[(bb * cs + c) * 4 + k], is[c][k]));
          imin[c][k] = _mm512_add_epi32(imin[c][k], _mm512_mullo_epi32(MN[(bb * cs + c) * 4 + k], s32));
        }
    } else {  // Q6_K: the block's two sub-blocks of 16 neurons (groups 0-3, 4-7)
      for (int h = 0; h < 2; h++) {
        const unsigned sub = (nz >> (4 * h)) & 15u;
        if (!sub) continue;
        __m512i is[NCH][4];
        const __m512i st = _mm512_set1_epi32(-32 * s16[2 * b + h]);
        for (int c = 0; c < NCH; c++)
          for (int k = 0; k < 4; k++) is[c][k] = st;
        group_sums<NCH>(t, qrow + 32 * b, sub << (4 * h), is);
        for (int c = 0; c < NCH; c++)
          for (int k = 0; k < 4; k++)
            isc[c][k] = _mm512_add_epi32(isc[c][k], _mm512_mullo_epi32(SC[((2 * bb + h) * cs + c) * 4 + k], is[c][k]));
      }
    }
  }
  if (!any) return;  // nothing active in the super-block: it adds exactly 0
  const __m512 dx = _mm512_set1_ps(x.d[m * nd + s]);
  const __m512 neg = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000));
  for (int c = 0; c < NCH; c++)
    for (int k = 0; k < 4; k++) {
      float* a = acc + c * 64 + 16 * k;
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[c][k]), _mm512_mul_ps(D[4 * c + k], dx), _mm512_load_ps(a));
      if (FMT == Q4_K)
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[c][k]), _mm512_xor_ps(_mm512_mul_ps(DM[4 * c + k], dx), neg), v);
      _mm512_store_ps(a, v);
    }
}

// y[m][j] for every row m < M and the outputs of chunks [c0, c1), in pieces of up to SR_MAXCH
// chunks (2 for the K-quants, whose super-block of 8 blocks must fit the buffer): longer runs
// of each neuron row read at once. acc: 64-byte aligned scratch of M * SR_MAXCH * 64 floats.
void sparse_rows(const SparseW& W, const QAct& x, int64_t M, const uint8_t* live, int64_t c0, int64_t c1, float* y,
                 int64_t ldy, float* acc) {
  const int64_t K = W.K, Np = W.Np, nb = K / 32, ns = K / 256;
  const bool kq = W.fmt == Q4_K || W.fmt == Q6_K;
  const int32_t off = W.fmt == Q8_0 ? 128 : 8;
  const int64_t qbytes = K * (W.fmt == Q8_0 || W.fmt == Q6_K ? Np : Np / 2);
  const uint8_t* dplane = W.base + qbytes;  // fp16 d: per block, or per super-block (K-quants)
  const uint8_t* mplane = dplane + 2 * ns * Np;  // Q4_K: dmin; Q6_K: the i8 scales
  alignas(64) __m512i T[SR_MAXCH * 32];  // 32 KiB: SR_MAXCH (block, chunk) pairs of 32 zmm
  alignas(64) __m512 S[SR_MAXCH * 4], DM[2 * 4];
  alignas(64) __m512i SC[16 * 2 * 4], MN[8 * 2 * 4];
  const int64_t maxch = kq ? 2 : SR_MAXCH;
  for (int64_t ca = c0; ca < c1; ca += maxch) {
    const int64_t nch = c1 - ca < maxch ? c1 - ca : maxch, slab = kq ? 8 : SR_MAXCH / nch;
    for (int64_t i = 0; i < M * nch * 64; i++) acc[i] = 0.f;
    for (int64_t b0 = 0; b0 < nb; b0 += slab) {
      const int64_t b1 = nb - b0 < slab ? nb : b0 + slab;
      bool any_live = false;
      for (int64_t b = b0; b < b1; b++) {
        if (!live[b]) continue;  // no row uses these 32 neurons: never read
        any_live = true;
        for (int64_t c = 0; c < nch; c++) {
          const int64_t j = (ca + c) * 64, pc = (b - b0) * nch + c;
          transpose_block(W, b, j, T + pc * 32);
          if (!kq) {
            f16_lanes(dplane + 2 * (b * Np + j), S + pc * 4);
          } else if (W.fmt == Q4_K) {
            const uint8_t* scpl = mplane + 2 * ns * Np;
            bytes_lanes(scpl + b * Np + j, false, SC + pc * 4);
            bytes_lanes(scpl + nb * Np + b * Np + j, false, MN + pc * 4);
          } else {
            for (int h = 0; h < 2; h++) bytes_lanes(mplane + (2 * b + h) * Np + j, true, SC + ((2 * (b - b0) + h) * nch + c) * 4);
          }
        }
      }
      if (!any_live) continue;
      if (kq) {
        const int64_t s = b0 / 8;
        for (int64_t c = 0; c < nch; c++) {
          const int64_t j = (ca + c) * 64;
          f16_lanes(dplane + 2 * (s * Np + j), S + c * 4);
          if (W.fmt == Q4_K) f16_lanes(mplane + 2 * (s * Np + j), DM + c * 4);
        }
        for (int64_t m = 0; m < M; m++) {
          float* a = acc + m * nch * 64;
          if (W.fmt == Q4_K) {
            if (nch == 2) sparse_rows_kq_row<2, Q4_K>(x, m, s, live, T, nch, S, DM, SC, MN, a);
            else sparse_rows_kq_row<1, Q4_K>(x, m, s, live, T, nch, S, DM, SC, MN, a);
          } else {
            if (nch == 2) sparse_rows_kq_row<2, Q6_K>(x, m, s, live, T, nch, S, DM, SC, MN, a);
            else sparse_rows_kq_row<1, Q6_K>(x, m, s, live, T, nch, S, DM, SC, MN, a);
          }
        }
        continue;
      }
      for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < nch; c += 4) {  // four chunks (16 zmm of sums) at a time
          const __m512i* t = T + c * 32;
          const __m512* sc = S + c * 4;
          float* a = acc + (m * nch + c) * 64;
          switch (nch - c < 4 ? nch - c : 4) {
#define PLM_CASE(n) case n: sparse_rows_row<n>(x, m, b0, b1, live, t, sc, nch, off, a); break;
            PLM_CASE(1) PLM_CASE(2) PLM_CASE(3) PLM_CASE(4)
#undef PLM_CASE
          }
        }
    }
    for (int64_t m = 0; m < M; m++)
      for (int64_t c = 0; c < nch; c++) {
        const float* a = acc + (m * nch + c) * 64;
        const __m512 in[4] = {_mm512_load_ps(a), _mm512_load_ps(a + 16), _mm512_load_ps(a + 32), _mm512_load_ps(a + 48)};
        __m512 out[4];
        lanes4x4(in, out);
        for (int L = 0; L < 4 && (ca + c) * 64 + 16 * L < W.N; L++) store_tile(y, ldy, m, (ca + c) * 64 + 16 * L, W.N, out[L]);
      }
  }
}

}  // namespace

// Eight independent accumulators cover the instruction's latency; the asm barrier keeps the
// compiler from hoisting or folding the loop.
double vnni_loop_seconds(int64_t iters, int64_t* macs) {
  // distinct starting values, or the compiler merges the identical chains into one
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2), a3 = _mm512_set1_epi32(3),
          a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5), a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7);
  __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(1);
  timespec t0, t1;  // C clock: no standard-library templates in an ISA unit (plm_kernels.h)
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int64_t k = 0; k < iters; k++) {
    a0 = _mm512_dpbusd_epi32(a0, w, x); a1 = _mm512_dpbusd_epi32(a1, w, x);
    a2 = _mm512_dpbusd_epi32(a2, w, x); a3 = _mm512_dpbusd_epi32(a3, w, x);
    a4 = _mm512_dpbusd_epi32(a4, w, x); a5 = _mm512_dpbusd_epi32(a5, w, x);
    a6 = _mm512_dpbusd_epi32(a6, w, x); a7 = _mm512_dpbusd_epi32(a7, w, x);
#ifndef PLM_SIMDE
    asm volatile("" : "+v"(w), "+v"(x));
#endif
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  const __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                     _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  int32_t lanes[16];
  _mm512_storeu_si512(lanes, s);
  volatile int32_t sink = lanes[0];  // keeps the chains live
  (void)sink;
  *macs = iters * 8 * 64;
  return dt;
}

// Entries left null fall back to the AVX2 kernels (see ops.cpp).
extern const Kernels kernels_avx512 = {
    "avx512", nullptr, gemv_q8_0, gemv_q4_0, gemv_q4_k, gemv_q6_k, gemv_q5_k, gemv_f, nullptr, nullptr, nullptr,
    sparse_rows,
};

}  // namespace plm
