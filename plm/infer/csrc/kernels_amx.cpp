// AMX-BF16 product for BF16 weights (Xeons from Sapphire Rapids on): `tdpbf16ps` multiplies a
// tile of 16 weight rows x 32 inputs by a tile of 16 input pairs x up to 16 activation rows into
// 16 x 16 fp32 sums, 8,192 multiply-adds an instruction, where `vdpbf16ps` does 32. Prompts
// (many activation rows) gain by that; decode steps (one row) use the same tiles, because every
// output's sums then run in the same order whatever the batch, so a prompt still equals its
// tokens fed one at a time and a batched step the rows alone, bit for bit.
//
// Operands: the weight tile is one `tileloadd` straight from the row-major bf16 matrix (16 rows
// at a stride of 2K bytes); the activations come packed by the caller (ops.cpp) as
// xp[m tile][K/32][16 pairs][mw] 32-bit (k, k+1) pairs, mw = min(M, 16) activation rows a tile
// (rows past M zero); the sums are C^T (weight rows x activation rows), written out transposed.
// Tiles: 0-3 sums, 4-5 weights, 6-7 activations.
//
// Absorbed-MLA attention over a bf16 latent cache on the same tiles (attention_amx_bf16), for
// 16 heads at a time: the scores are cache rows (16 a tile, 32 values of a row) times the query
// as (k, k+1) pairs of 16 heads, 18 `tdpbf16ps` per 16 rows at D = 576; the values are the
// probabilities as (t, t+1) pairs of 16 heads times the value pairs (pack_values), into 16 heads
// x 16 latent dims a tile. A part's rows go in chunks of up to 256 with one softmax maximum
// each, merged online; query and probabilities rounded to bf16 as on the vdpbf16ps path.
#if !defined(PLM_SIMDE) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PLM_HAVE_AMX 1
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")
#include <immintrin.h>
#endif

#include "plm_kernels.h"
#ifdef PLM_HAVE_AMX
#include "avx512_attn.h"
#endif

namespace plm {

#ifdef PLM_HAVE_AMX
namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Sums of NT weight tiles (16 rows each, from w[i]) x MT activation tiles (from b[j]) over KB
// blocks of 32 inputs into ct[i * MT + j][16][16] (columns past mw unused).
template <int NT, int MT>
void block(const uint16_t* const* w, int64_t ldw, const uint32_t* const* b, int64_t kstep, int64_t bstride,
           int64_t KB, float* ct) {
  static_assert(NT <= 2 && MT <= 2, "tiles 0-3 sums, 4-5 weights, 6-7 activations");
  _tile_zero(0);
  if constexpr (NT * MT > 1) _tile_zero(1);
  if constexpr (NT * MT > 2) _tile_zero(2);
  if constexpr (NT * MT > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < KB; kb++) {
    if constexpr (MT == 2) {
      _tile_loadd(6, b[0] + kb * kstep, bstride);
      _tile_loadd(7, b[1] + kb * kstep, bstride);
      _tile_loadd(4, w[0] + kb * 32, ldw);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT == 2) {
        _tile_loadd(5, w[1] + kb * 32, ldw);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else {
      _tile_loadd(7, b[0] + kb * kstep, bstride);
      _tile_loadd(4, w[0] + kb * 32, ldw);
      _tile_dpbf16ps(0, 4, 7);
      if constexpr (NT == 2) {
        _tile_loadd(5, w[1] + kb * 32, ldw);
        _tile_dpbf16ps(1, 5, 7);
      }
    }
  }
  _tile_stored(0, ct, 64);
  if constexpr (NT * MT > 1) _tile_stored(1, ct + 256, 64);
  if constexpr (NT * MT > 2) _tile_stored(2, ct + 512, 64);
  if constexpr (NT * MT > 3) _tile_stored(3, ct + 768, 64);
}

}  // namespace

bool amx_compiled() { return true; }

void gemm_bf16_amx(const uint16_t* W, int64_t K, int64_t rows, int64_t n0, int64_t n1, const uint32_t* xp, int64_t M,
                   const uint16_t* wtail, float* y, int64_t ldy) {
  const int64_t mw = M < 16 ? M : 16, MT = (M + 15) / 16, KB = K / 32;
  const int64_t kstep = 16 * mw, tstep = KB * kstep, bstride = 4 * mw, ldw = 2 * K;
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = (uint16_t)(t == 4 || t == 5 ? 64 : bstride);
  }
  _tile_loadconfig(&cfg);
  alignas(64) float ct[4 * 256];
  // the 16 weight rows from n: the matrix, or the zero-padded copy of its last rows
  auto wrows = [&](int64_t n) { return n + 16 <= rows ? W + n * K : wtail; };
  auto put = [&](int64_t n, int64_t mt, int nt, int mtn) {  // C^T tiles -> y[m][n]
    for (int i = 0; i < nt; i++)
      for (int j = 0; j < mtn; j++) {
        const float* c = ct + (i * mtn + j) * 256;
        const int64_t nb = n + 16 * i, mb = (mt + j) * 16;
        const int64_t nr = n1 - nb < 16 ? n1 - nb : 16, mr = M - mb < 16 ? M - mb : 16;
        for (int64_t q = 0; q < mr; q++)  // a row of y at a time: whole cache lines written
          for (int64_t r = 0; r < nr; r++) y[(mb + q) * ldy + nb + r] = c[r * 16 + q];
      }
  };
  if (MT == 1) {  // decode steps and small batches: two weight tiles in flight (three: 2-3% slower)
    int64_t n = n0;
    for (; n + 32 <= n1; n += 32) {
      const uint16_t* w[2] = {wrows(n), wrows(n + 16)};
      block<2, 1>(w, ldw, &xp, kstep, bstride, KB, ct);
      put(n, 0, 2, 1);
    }
    for (; n < n1; n += 16) {
      const uint16_t* w[1] = {wrows(n)};
      block<1, 1>(w, ldw, &xp, kstep, bstride, KB, ct);
      put(n, 0, 1, 1);
    }
  } else {
    // activation tiles in groups that stay in L2 (1 MiB) while the weight rows pass by once
    int64_t MB = (1 << 20) / (32 * K);
    MB = MB < 2 ? 2 : MB & ~(int64_t)1;
    for (int64_t m0 = 0; m0 < MT; m0 += MB) {
      const int64_t m1 = MT < m0 + MB ? MT : m0 + MB;
      for (int64_t n = n0; n < n1; n += 32) {
        const bool two = n + 16 < n1;
        const uint16_t* w[2] = {wrows(n), two ? wrows(n + 16) : nullptr};
        for (int64_t mt = m0; mt < m1; mt += 2) {
          const uint32_t* b[2] = {xp + mt * tstep, xp + (mt + 1) * tstep};
          if (mt + 1 < m1) {
            if (two) block<2, 2>(w, ldw, b, kstep, bstride, KB, ct);
            else block<1, 2>(w, ldw, b, kstep, bstride, KB, ct);
            put(n, mt, two ? 2 : 1, 2);
          } else {
            if (two) block<2, 1>(w, ldw, b, kstep, bstride, KB, ct);
            else block<1, 1>(w, ldw, b, kstep, bstride, KB, ct);
            put(n, mt, two ? 2 : 1, 1);
          }
        }
      }
    }
  }
  // back to the init state: the 8 KiB of tile data then leaves this thread's context switches
  // and signal frames (about 0.5 us a call; only matrices of 1 MiB and more get here)
  _tile_release();
}

int64_t attention_amx_scratch_floats(int64_t D, int64_t rank) {
  // qB [D/2][16] | sT [CH][16] | pA [16][CH/2] | vP [CH/2][rank] | tail [16][D] bf16 | O [16][rank] | C [16][16]
  return 8 * D + 16 * 256 + 8 * 256 + 128 * rank + 8 * D + 16 * rank + 256 + 16;
}

void attention_amx_bf16(const float* q, int64_t nh, int64_t D, int64_t rank, const uint16_t* cache, int64_t S,
                        int64_t part, float scale, float* out, float* lse, float* scratch) {
  constexpr int64_t CH = 256;  // rows per chunk
  const int64_t KT = D / 32, ldc = 2 * D;
  float* base = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  uint32_t* qB = (uint32_t*)base;                  // [D/2][16]: (q[h][2j], q[h][2j+1]) as bf16
  float* sT = base + 8 * D;                        // [CH][16] scores, head in lanes
  uint32_t* pA = (uint32_t*)(sT + 16 * CH);        // [16 heads][CH/2] probability pairs
  uint32_t* vP = pA + 8 * CH;                      // [CH/2][rank] value pairs
  uint16_t* tail = (uint16_t*)(vP + (CH / 2) * rank);  // a last partial tile of rows, zero-padded
  float* O = (float*)(tail + 16 * D);              // [16][rank] the part's running sums
  float* cb = O + 16 * rank;                       // [16][16] one stored tile
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const __m512i hidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)(CH / 2)));
  const __m512 vs = _mm512_set1_ps(scale);
  attention_parts(
      q, nh, D, rank, cache, S, part, CH, qB, out, lse, [&] { memset(O, 0, sizeof(float) * 16 * rank); },
      [&](const uint16_t* c, int64_t n, __m512& m, __m512& l) {
        const int64_t nt16 = (n + 15) / 16;
        if (n % 16) {  // the rows of the last partial tile, zero-padded (rows past S may not exist)
          memset(tail, 0, sizeof(uint16_t) * 16 * D);
          memcpy(tail, c + (n - n % 16) * D, sizeof(uint16_t) * (n % 16) * D);
        }
        auto rows = [&](int64_t ti) { return 16 * ti + 16 <= n ? c + 16 * ti * D : tail; };
        // scores: four tiles of 16 rows at a time (tiles 0-3), cache rows in 4/5, query in 6
        for (int64_t tt = 0; tt < nt16; tt += 4) {
          const int64_t cnt = nt16 - tt < 4 ? nt16 - tt : 4;
          _tile_zero(0);
          if (cnt > 1) _tile_zero(1);
          if (cnt > 2) _tile_zero(2);
          if (cnt > 3) _tile_zero(3);
          for (int64_t kk = 0; kk < KT; kk++) {
            _tile_loadd(6, qB + kk * 256, 64);
            _tile_loadd(4, rows(tt) + 32 * kk, ldc);
            _tile_dpbf16ps(0, 4, 6);
            if (cnt > 1) { _tile_loadd(5, rows(tt + 1) + 32 * kk, ldc); _tile_dpbf16ps(1, 5, 6); }
            if (cnt > 2) { _tile_loadd(4, rows(tt + 2) + 32 * kk, ldc); _tile_dpbf16ps(2, 4, 6); }
            if (cnt > 3) { _tile_loadd(5, rows(tt + 3) + 32 * kk, ldc); _tile_dpbf16ps(3, 5, 6); }
          }
          float* st = sT + tt * 256;
          _tile_stored(0, st, 64);
          if (cnt > 1) _tile_stored(1, st + 256, 64);
          if (cnt > 2) _tile_stored(2, st + 512, 64);
          if (cnt > 3) _tile_stored(3, st + 768, 64);
        }
        for (int64_t t = 0; t < n; t++) _mm512_storeu_ps(sT + t * 16, _mm512_mul_ps(_mm512_loadu_ps(sT + t * 16), vs));
        // softmax of the chunk against the running maximum; probabilities as (t, t+1) pairs per head
        const __m512 alpha =
            softmax_pairs(sT, n, m, l, [&](int64_t p, __m512i pair) { _mm512_i32scatter_epi32(pA + p, hidx, pair, 4); });
        const int64_t npair = (n + 1) / 2, jt = (npair + 15) / 16;
        for (int64_t j = npair; j < 16 * jt; j++)  // pairs past the chunk: zero probabilities
          _mm512_i32scatter_epi32(pA + j, hidx, _mm512_setzero_si512(), 4);
        pack_values(c, D, rank, n, vP);
        if (16 * jt > npair) memset(vP + npair * rank, 0, sizeof(uint32_t) * (16 * jt - npair) * rank);
        // values: 16 heads x 64 latent dims at a time (tiles 0-3), probabilities in 4, values in 5/6
        alignas(64) float av[16];
        _mm512_store_ps(av, alpha);
        for (int64_t r0 = 0; r0 < rank; r0 += 64) {
          const int64_t cnt = (rank - r0) / 16 < 4 ? (rank - r0) / 16 : 4;
          _tile_zero(0);
          if (cnt > 1) _tile_zero(1);
          if (cnt > 2) _tile_zero(2);
          if (cnt > 3) _tile_zero(3);
          for (int64_t jj = 0; jj < jt; jj++) {
            const uint32_t* v = vP + jj * 16 * rank + r0;
            _tile_loadd(4, pA + jj * 16, 4 * (CH / 2));
            _tile_loadd(5, v, 4 * rank);
            _tile_dpbf16ps(0, 4, 5);
            if (cnt > 1) { _tile_loadd(6, v + 16, 4 * rank); _tile_dpbf16ps(1, 4, 6); }
            if (cnt > 2) { _tile_loadd(5, v + 32, 4 * rank); _tile_dpbf16ps(2, 4, 5); }
            if (cnt > 3) { _tile_loadd(6, v + 48, 4 * rank); _tile_dpbf16ps(3, 4, 6); }
          }
          for (int64_t i = 0; i < cnt; i++) {
            switch (i) {
              case 0: _tile_stored(0, cb, 64); break;
              case 1: _tile_stored(1, cb, 64); break;
              case 2: _tile_stored(2, cb, 64); break;
              default: _tile_stored(3, cb, 64); break;
            }
            for (int64_t h = 0; h < 16; h++) {  // O = alpha * O + this chunk's sums
              float* o = O + h * rank + r0 + 16 * i;
              _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(av[h]), _mm512_load_ps(cb + 16 * h)));
            }
          }
        }
      },
      [&](int64_t j, int64_t r) { return O[j * rank + r]; });
  _tile_release();
}

#else

bool amx_compiled() { return false; }

int64_t attention_amx_scratch_floats(int64_t, int64_t) { return 0; }

void attention_amx_bf16(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float, float*, float*,
                        float*) {}

void gemm_bf16_amx(const uint16_t*, int64_t, int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint16_t*, float*,
                   int64_t) {}

#endif

}  // namespace plm
