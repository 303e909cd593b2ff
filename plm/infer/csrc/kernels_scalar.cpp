// Portable kernels. They define the semantics every SIMD path must reproduce: for the block
// formats the same integer block sums and the same fp32 sequence per output row (so results
// are bit-identical across paths), for float formats the same math up to summation order.
#include <math.h>

#include "plm_kernels.h"

namespace plm {
namespace {

inline float ld_f16(const uint8_t* p, int i) { uint16_t h; memcpy(&h, p + 2 * i, 2); return fp16_to_fp32(h); }

void quantize_act(const float* x, int64_t K, int bs, int8_t* q, float* d, int32_t* s16) {
  for (int64_t b = 0; b < K / bs; b++) {
    const float* xb = x + b * bs;
    float amax = 0.f;
    for (int i = 0; i < bs; i++) amax = fmaxf(amax, fabsf(xb[i]));
    const float db = amax / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    for (int i = 0; i < bs; i++) q[b * bs + i] = (int8_t)nearbyintf(xb[i] * id);
  }
  for (int64_t g = 0; g < K / 16; g++) {
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += q[g * 16 + i];
    s16[g] = s;
  }
}

inline void store_rows(float* y, int64_t ldy, int64_t m, int64_t row0, int64_t N, const float* acc) {
  for (int r = 0; r < TILE && row0 + r < N; r++) y[m * ldy + row0 + r] = acc[r];
}

// Tiles [t0, t1) x M activation rows x the blocks of bs inputs (tb packed bytes each):
// block(blk, xq, s16, dx, acc) adds one block's terms to the tile's 16 row sums, given the
// block's activations, their sums of 16 and d_x.
template <typename Block>
void tile_rows(const uint8_t* W, int64_t K, int64_t bs, int64_t tb, int64_t t0, int64_t t1, const QAct& x, int64_t M,
               float* y, int64_t ldy, int64_t N, const Block& block) {
  const int64_t nb = K / bs;
  for (int64_t t = t0; t < t1; t++)
    for (int64_t m = 0; m < M; m++) {
      float acc[TILE] = {0};
      for (int64_t b = 0; b < nb; b++)
        block(W + (t * nb + b) * tb, x.q + m * K + b * bs, x.s16 + m * (K / 16) + b * (bs / 16),
              x.d[m * (K / x.bs) + b], acc);
      store_rows(y, ldy, m, t * TILE, N, acc);
    }
}

// Q4_0-style nibble group (64 bytes, 16 rows x 8 inputs) dotted with 8 activation bytes; with
// `plane` (Q5_K), the value in byte p's low / high nibble gains 16 from bit 2 gi / 2 gi + 1 of
// plane[p] (gi: the group's index in its sub-block).
inline void nib_group_dot(const uint8_t* g, const int8_t* xq, int32_t* isum, const uint8_t* plane = nullptr,
                          int gi = 0) {
  for (int r = 0; r < TILE; r++)
    for (int j = 0; j < 4; j++) {
      const int p = 4 * r + j;
      const uint8_t b = g[p];
      int lo = b & 15, hi = b >> 4;
      if (plane) {
        lo |= ((plane[p] >> (2 * gi)) & 1) << 4;
        hi |= ((plane[p] >> (2 * gi + 1)) & 1) << 4;
      }
      isum[r] += lo * xq[j] + hi * xq[4 + j];
    }
}

void gemv_q8_0(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
               int64_t ldy, int64_t N) {
  tile_rows(W, K, 32, Q8_0_TB, t0, t1, x, M, y, ldy, N,
            [](const uint8_t* blk, const int8_t* xq, const int32_t*, float dx, float* acc) {
              int32_t isum[TILE] = {0};
              for (int c = 0; c < 8; c++)
                for (int r = 0; r < TILE; r++)
                  for (int j = 0; j < 4; j++) isum[r] += ((int)blk[32 + 64 * c + 4 * r + j] - 128) * xq[4 * c + j];
              for (int r = 0; r < TILE; r++) acc[r] = fmaf((float)isum[r], ld_f16(blk, r) * dx, acc[r]);
            });
}

void gemv_q4_0(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
               int64_t ldy, int64_t N) {
  tile_rows(W, K, 32, Q4_0_TB, t0, t1, x, M, y, ldy, N,
            [](const uint8_t* blk, const int8_t* xq, const int32_t* s16, float dx, float* acc) {
              const int32_t s32 = s16[0] + s16[1];
              int32_t isum[TILE] = {0};
              for (int g = 0; g < 4; g++) nib_group_dot(blk + 32 + 64 * g, xq + 8 * g, isum);
              for (int r = 0; r < TILE; r++) acc[r] = fmaf((float)(isum[r] - 8 * s32), ld_f16(blk, r) * dx, acc[r]);
            });
}

// Q4_K, and Q5_K (Five: the nibbles' fifth bits from the masks after the Q4_K layout)
template <bool Five>
void gemv_qk(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
             int64_t ldy, int64_t N) {
  tile_rows(W, K, 256, Five ? Q5_K_TB : Q4_K_TB, t0, t1, x, M, y, ldy, N,
            [](const uint8_t* blk, const int8_t* xq, const int32_t* s16, float dx, float* acc) {
              const uint8_t* sc = blk + 64;
              const uint8_t* mn = blk + 192;
              int32_t isc[TILE] = {0}, imin[TILE] = {0};
              for (int j = 0; j < 8; j++) {
                int32_t dot[TILE] = {0};
                for (int g = 0; g < 4; g++)
                  nib_group_dot(blk + qk_sub(Five, j) + 64 * g, xq + 32 * j + 8 * g, dot,
                                Five ? blk + qk_sub(true, j) + 256 : nullptr, g);
                const int32_t s32 = s16[2 * j] + s16[2 * j + 1];
                for (int r = 0; r < TILE; r++) {
                  isc[r] += sc[16 * j + r] * dot[r];
                  imin[r] += mn[16 * j + r] * s32;
                }
              }
              for (int r = 0; r < TILE; r++) {
                acc[r] = fmaf((float)isc[r], ld_f16(blk, r) * dx, acc[r]);
                acc[r] = fmaf((float)imin[r], -(ld_f16(blk + 32, r) * dx), acc[r]);
              }
            });
}

void gemv_q4_k(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
               int64_t ldy, int64_t N) {
  gemv_qk<false>(W, K, t0, t1, x, M, y, ldy, N);
}

void gemv_q5_k(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
               int64_t ldy, int64_t N) {
  gemv_qk<true>(W, K, t0, t1, x, M, y, ldy, N);
}

void gemv_q6_k(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M, float* y,
               int64_t ldy, int64_t N) {
  tile_rows(W, K, 256, Q6_K_TB, t0, t1, x, M, y, ldy, N,
            [](const uint8_t* blk, const int8_t* xq, const int32_t* s16, float dx, float* acc) {
              const int8_t* sc = (const int8_t*)(blk + 32);
              int32_t isum[TILE] = {0};
              for (int u = 0; u < 8; u++) {
                const uint8_t* ql = blk + 288 + 384 * u;
                const uint8_t* qh = ql + 256;
                for (int h = 0; h < 2; h++) {  // sub-blocks of 16 inputs: groups 2h, 2h+1 of the unit
                  const int g16 = 2 * u + h;
                  int32_t dot[TILE] = {0};
                  for (int g = 2 * h; g < 2 * h + 2; g++) {
                    const int8_t* xg = xq + 32 * u + 8 * g;
                    for (int r = 0; r < TILE; r++)
                      for (int j = 0; j < 4; j++) {
                        const int p = 4 * r + j;
                        const uint8_t lo = ql[64 * g + p], hb = qh[32 * g + (p & 31)];
                        const int sh = p < 32 ? 0 : 2;
                        const int q_lo = (lo & 15) | (((hb >> sh) & 3) << 4);
                        const int q_hi = (lo >> 4) | (((hb >> (sh + 4)) & 3) << 4);
                        dot[r] += q_lo * xg[j] + q_hi * xg[4 + j];
                      }
                  }
                  for (int r = 0; r < TILE; r++) isum[r] += sc[16 * g16 + r] * (dot[r] - 32 * s16[g16]);
                }
              }
              for (int r = 0; r < TILE; r++) acc[r] = fmaf((float)isum[r], ld_f16(blk, r) * dx, acc[r]);
            });
}

inline float load_w(int fmt, const void* W, int64_t i) {
  if (fmt == F32) return ((const float*)W)[i];
  const uint16_t h = ((const uint16_t*)W)[i];
  return fmt == F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}

void gemv_f(int fmt, const void* W, int64_t K, int64_t n0, int64_t n1, const float* x, const uint16_t*, int64_t M,
            float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; n++)
    for (int64_t m = 0; m < M; m++) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; k++) acc += load_w(fmt, W, n * K + k) * x[m * K + k];
      y[m * ldy + n] = acc;
    }
}

void sparse_q(const SparseW& W, const int8_t* q, const float* d, const int32_t* s16, const ActiveList& act,
              int64_t j0, int64_t j1, float* y) {
  const int64_t K = W.K, Np = W.Np, nb = K / 32;
  for (int64_t c0 = j0; c0 < j1; c0 += 64) {
    const int64_t n = j1 - c0 < 64 ? j1 - c0 : 64;
    float acc[64] = {0};
    if (W.fmt == Q8_0 || W.fmt == Q4_0) {
      const uint8_t* dplane = W.base + K * (W.fmt == Q8_0 ? Np : Np / 2);
      for (int64_t b = 0; b < nb; b++) {
        if (act.start[b] == act.start[b + 1]) continue;
        int32_t isum[64] = {0};
        for (int32_t a = act.start[b]; a < act.start[b + 1]; a++) {
          const int32_t i = act.idx[a];
          const int xi = q[i];
          if (W.fmt == Q8_0) {
            const int8_t* row = (const int8_t*)W.base + i * Np + c0;
            for (int j = 0; j < n; j++) isum[j] += xi * row[j];
          } else {
            const uint8_t* row = W.base + i * (Np / 2) + c0 / 2;
            for (int j = 0; j < n; j++) isum[j] += xi * (j < 32 ? row[j] & 15 : row[j - 32] >> 4);
          }
        }
        const int32_t off = W.fmt == Q4_0 ? 8 * (s16[2 * b] + s16[2 * b + 1]) : 0;
        for (int j = 0; j < n; j++) acc[j] = fmaf((float)(isum[j] - off), ld_f16(dplane + 2 * b * Np, c0 + j) * d[b], acc[j]);
      }
    } else if (W.fmt == Q6_K) {
      const int64_t ns = K / 256;
      const uint8_t* dpl = W.base + K * Np;
      const int8_t* scpl = (const int8_t*)(dpl + 2 * ns * Np);
      for (int64_t s = 0; s < ns; s++) {
        if (act.start[8 * s] == act.start[8 * s + 8]) continue;
        int32_t isum[64] = {0};
        for (int64_t g = 16 * s; g < 16 * s + 16; g++) {  // sub-blocks of 16 neurons
          int32_t isub[64] = {0};
          bool any = false;
          for (int32_t a = act.start[g / 2]; a < act.start[g / 2 + 1]; a++) {
            const int32_t i = act.idx[a];
            if (i / 16 != g) continue;
            any = true;
            const uint8_t* row = W.base + i * Np + c0;
            for (int j = 0; j < n; j++) isub[j] += q[i] * row[j];
          }
          if (!any) continue;
          for (int j = 0; j < n; j++) isum[j] += scpl[g * Np + c0 + j] * (isub[j] - 32 * s16[g]);
        }
        for (int j = 0; j < n; j++) acc[j] = fmaf((float)isum[j], ld_f16(dpl + 2 * s * Np, c0 + j) * d[s], acc[j]);
      }
    } else {  // Q4_K
      const int64_t ns = K / 256;
      const uint8_t* dpl = W.base + K * (Np / 2);
      const uint8_t* mpl = dpl + 2 * ns * Np;
      const uint8_t* scpl = mpl + 2 * ns * Np;
      const uint8_t* mnpl = scpl + nb * Np;
      for (int64_t s = 0; s < ns; s++) {
        if (act.start[8 * s] == act.start[8 * s + 8]) continue;
        int32_t isc[64] = {0}, imin[64] = {0};
        for (int64_t b = 8 * s; b < 8 * s + 8; b++) {
          if (act.start[b] == act.start[b + 1]) continue;
          int32_t isub[64] = {0};
          for (int32_t a = act.start[b]; a < act.start[b + 1]; a++) {
            const int32_t i = act.idx[a];
            const uint8_t* row = W.base + i * (Np / 2) + c0 / 2;
            for (int j = 0; j < n; j++) isub[j] += q[i] * (j < 32 ? row[j] & 15 : row[j - 32] >> 4);
          }
          const int32_t s32 = s16[2 * b] + s16[2 * b + 1];
          for (int j = 0; j < n; j++) {
            isc[j] += scpl[b * Np + c0 + j] * isub[j];
            imin[j] += mnpl[b * Np + c0 + j] * s32;
          }
        }
        for (int j = 0; j < n; j++) {
          acc[j] = fmaf((float)isc[j], ld_f16(dpl + 2 * s * Np, c0 + j) * d[s], acc[j]);
          acc[j] = fmaf((float)imin[j], -(ld_f16(mpl + 2 * s * Np, c0 + j) * d[s]), acc[j]);
        }
      }
    }
    for (int j = 0; j < n; j++) y[c0 + j] = acc[j];
  }
}

void sparse_f(const SparseW& W, const float* a, const int32_t* idx, int64_t n_idx, int64_t j0, int64_t j1,
              float* y) {
  for (int64_t j = j0; j < j1; j++) y[j] = 0.f;
  for (int64_t t = 0; t < n_idx; t++) {
    const int32_t i = idx[t];
    const float ai = a[i];
    for (int64_t j = j0; j < j1; j++) y[j] += ai * load_w(W.fmt, W.base, i * W.N + j);
  }
}

void attention_part(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache, int cache_bf16, int64_t S,
                    float scale, float* out, float* lse, float* scratch) {
  float* R = scratch;                  // [TB][D] fp32 rows
  float* s = R + ATTN_TB * D;          // [nh][TB] scores
  float* mx = s + nh * ATTN_TB;        // [nh] running max
  float* l = mx + nh;                  // [nh] running sum
  for (int64_t h = 0; h < nh; h++) {
    mx[h] = -INFINITY;
    l[h] = 0.f;
    for (int64_t r = 0; r < rank; r++) out[h * rank + r] = 0.f;
  }
  for (int64_t t0 = 0; t0 < S; t0 += ATTN_TB) {
    const int64_t tb = S - t0 < ATTN_TB ? S - t0 : ATTN_TB;
    for (int64_t t = 0; t < tb; t++)
      for (int64_t k = 0; k < D; k++)
        R[t * D + k] = cache_bf16 ? bf16_to_fp32(((const uint16_t*)cache)[(t0 + t) * D + k])
                                  : ((const float*)cache)[(t0 + t) * D + k];
    for (int64_t h = 0; h < nh; h++) {
      float bm = -INFINITY;
      for (int64_t t = 0; t < tb; t++) {
        float acc = 0.f;
        for (int64_t k = 0; k < D; k++) acc += q[h * D + k] * R[t * D + k];
        s[h * ATTN_TB + t] = acc * scale;
        bm = fmaxf(bm, acc * scale);
      }
      const float mnew = fmaxf(mx[h], bm);
      const float alpha = expf(mx[h] - mnew);
      float sum = 0.f;
      for (int64_t t = 0; t < tb; t++) {
        const float p = expf(s[h * ATTN_TB + t] - mnew);
        s[h * ATTN_TB + t] = p;
        sum += p;
      }
      l[h] = l[h] * alpha + sum;
      mx[h] = mnew;
      float* o = out + h * rank;
      for (int64_t r = 0; r < rank; r++) o[r] *= alpha;
      for (int64_t t = 0; t < tb; t++)
        for (int64_t r = 0; r < rank; r++) o[r] += s[h * ATTN_TB + t] * R[t * D + r];
    }
  }
  for (int64_t h = 0; h < nh; h++) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    for (int64_t r = 0; r < rank; r++) out[h * rank + r] *= inv;
    if (lse) lse[h] = l[h] > 0.f ? mx[h] + __builtin_logf(l[h]) : -__builtin_inff();
  }
}

void attention(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache, int cache_bf16, int64_t S,
               int64_t part, float scale, float* out, float* lse, float* scratch) {
  for (int64_t p0 = 0, pi = 0; p0 < S; p0 += part, pi++)
    attention_part(q, nh, D, rank, (const uint8_t*)cache + p0 * D * (cache_bf16 ? 2 : 4), cache_bf16,
                   S - p0 < part ? S - p0 : part, scale, out + pi * nh * rank, lse ? lse + pi * nh : nullptr, scratch);
}

}  // namespace

extern const Kernels kernels_scalar = {
    "scalar", quantize_act, gemv_q8_0, gemv_q4_0, gemv_q4_k, gemv_q6_k, gemv_q5_k, gemv_f, sparse_q, sparse_f, attention,
    nullptr,
};

}  // namespace plm
