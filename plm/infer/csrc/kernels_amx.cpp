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
#if !defined(PLM_SIMDE) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PLM_HAVE_AMX 1
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")
#include <immintrin.h>
#endif

#include "plm_kernels.h"

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

#else

bool amx_compiled() { return false; }

void gemm_bf16_amx(const uint16_t*, int64_t, int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint16_t*, float*,
                   int64_t) {}

#endif

}  // namespace plm
