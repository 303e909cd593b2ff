// PLM native kernels: shared definitions (formats, packed layouts, the per-ISA kernel table).
//
// This header is included by the ISA-specific translation units (kernels_*.cpp), which are
// compiled with `#pragma GCC target(...)`. It must therefore contain only C-style code with
// internal linkage (static inline) and no C++ standard-library templates: an inline function
// with external linkage instantiated in an AVX-512 unit could be picked by the linker for the
// whole library and crash an AVX2 host with SIGILL.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace plm {

// GGML type ids (the GGUF file's tensor types), used as our format ids too.
enum Format : int {
  F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

// Packed ("tile") layout of the block formats: output rows in tiles of TILE rows; within a
// tile, per block of 32 inputs, the scales of the 16 rows, then the quantised values
// interleaved so that one 64-byte vector holds 4 consecutive inputs of each of the 16 rows
// (one 32-bit lane per row): `vpdpbusd`/`maddubs` against a broadcast of 4 activation bytes
// then yields 16 per-row partial dots with no horizontal reduction. AVX2 handles the 64 bytes
// as two 32-byte halves (rows 0-7, rows 8-15). Bytes per row equal the GGUF block sizes
// except Q4_K (148 instead of 144: scales and mins stored as bytes) and Q5_K (180, likewise).
//
//  Q8_0, per block of 32 inputs:  fp16 d[16] | u8 q[8 chunks][16 rows][4]   (q = int8 + 128)
//  Q4_0, per block of 32:         fp16 d[16] | u8 q[4 groups][16 rows][4]   (low nibble: inputs
//                                  8g+j, high nibble: 8g+4+j; value (q - 8) * d)
//  Q4_K, per super-block of 256:  fp16 d[16] | fp16 dmin[16] | u8 sc[8][16] | u8 m[8][16] |
//                                  8 sub-blocks laid out as Q4_0's nibbles; value d*sc*q - dmin*m
//  Q5_K, per super-block of 256:  as Q4_K (the low 4 bits in the nibbles), but each sub-block's
//                                  256 nibble bytes followed by its 64-byte plane of fifth bits:
//                                  byte p holds at bit 2g + h the fifth bit (16) of the value in
//                                  byte p of nibble group g, low (h = 0) or high (h = 1) nibble
//                                  (next to the nibbles: one read stream per tile, not two);
//                                  value d*sc*q - dmin*m, q < 32
//  Q6_K, per super-block of 256:  fp16 d[16] | i8 sc[16][16] | 8 units of 32 inputs, each
//                                  u8 ql[4 groups][64] (low 4 bits, Q4_0 nibble layout) |
//                                  u8 qh[4 groups][32] (high 2 bits, see pack.cpp); value
//                                  d * sc * (q - 32)
enum : int { TILE = 16 };
// Offset of sub-block j's nibbles in a Q4_K / Q5_K tile block (Q5_K: its plane 256 bytes on).
static inline int64_t qk_sub(bool five, int j) { return 320 + (five ? 320 : 256) * j; }
enum : int { Q8_0_TB = 32 + 512, Q4_0_TB = 32 + 256, Q4_K_TB = 64 + 256 + 2048, Q5_K_TB = Q4_K_TB + 512,
             Q6_K_TB = 32 + 256 + 8 * 384 };

// Activations quantised to int8 (llama.cpp's q8_0 / q8_K): per block of `bs` inputs (32 for
// Q8_0/Q4_0 weights, 256 for the K-quants) d = max|x| / 127, q = round-to-even(x / d) as
// x * (1 / d); plus the sum of q over every 16 inputs (offset and min terms).
struct QAct {
  const int8_t* q;    // [M][K]
  const float* d;     // [M][K / bs]
  const int32_t* s16; // [M][K / 16]
  int64_t K;
  int bs;
};

// Neuron-major ("transposed") layout for the sparse relu² down projection. W is the dense
// [N = hidden, K = neurons] matrix in GGUF orientation (blocks along K); row i of the layout
// holds the N values neuron i writes, so an inactive neuron's row is never read. Np = N rounded
// up to 64 (one output chunk).
//  Q8_0: i8 q[K][Np] | fp16 d[K/32][Np]
//  Q4_0: u8 q[K][Np/2] (per 64 outputs, byte p: low nibble output p, high nibble output 32+p) |
//        fp16 d[K/32][Np]
//  Q4_K: u8 q[K][Np/2] (as Q4_0) | fp16 d[K/256][Np] | fp16 dmin[K/256][Np] | u8 sc[K/32][Np] |
//        u8 m[K/32][Np]
//  Q6_K: u8 q[K][Np] (0..63) | fp16 d[K/256][Np] | i8 sc[K/16][Np]
//  F32/F16/BF16: [K][N] rows of the weight type.
struct SparseW {
  const uint8_t* base;
  int fmt;
  int64_t N, K, Np;
};

// The active neurons of one activation row, grouped by block of 32 inputs:
// idx[start[b] .. start[b+1]) are the neurons of block b whose quantised (or float) value != 0.
struct ActiveList {
  const int32_t* idx;
  const int32_t* start;  // [K/32 + 1]
};

// Per-ISA kernel table; every entry computes exactly the same integer sums and the same
// per-row fp32 sequence acc = fma(float(isum), d_w * d_x, acc) over blocks in order, so the
// block formats give bit-identical results on every path (float formats differ by summation
// order only).
struct Kernels {
  const char* name;
  // x [K] -> q, d, s16 (bs = 32 or 256)
  void (*quantize_act)(const float* x, int64_t K, int bs, int8_t* q, float* d, int32_t* s16);
  // y[m][r] for m in [0, M), rows r of tiles [t0, t1); y row stride ldy; writes rows < N only
  void (*gemv_q8_0)(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M,
                    float* y, int64_t ldy, int64_t N);
  void (*gemv_q4_0)(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M,
                    float* y, int64_t ldy, int64_t N);
  void (*gemv_q4_k)(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M,
                    float* y, int64_t ldy, int64_t N);
  void (*gemv_q6_k)(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M,
                    float* y, int64_t ldy, int64_t N);
  void (*gemv_q5_k)(const uint8_t* W, int64_t K, int64_t t0, int64_t t1, const QAct& x, int64_t M,
                    float* y, int64_t ldy, int64_t N);
  // float weights, row-major [N][K] of fmt (F32/F16/BF16), rows [n0, n1). x: fp32 [M][K]
  // (for BF16 weights already rounded to bf16 values), xb: the same as bf16 bits (BF16 only).
  void (*gemv_f)(int fmt, const void* W, int64_t K, int64_t n0, int64_t n1, const float* x,
                 const uint16_t* xb, int64_t M, float* y, int64_t ldy);
  // sparse down, one activation row: y[j] for j in [j0, j1) (j0 a multiple of 64)
  void (*sparse_q)(const SparseW& W, const int8_t* q, const float* d, const int32_t* s16,
                   const ActiveList& act, int64_t j0, int64_t j1, float* y);
  // sparse down, float weights: y[j] = sum over active i of a[i] * W[i][j]
  void (*sparse_f)(const SparseW& W, const float* a, const int32_t* idx, int64_t n_idx,
                   int64_t j0, int64_t j1, float* y);
  // absorbed-MLA attention for a group of heads over one sequence's latent cache, cut into
  // parts of `part` rows, each with its own softmax: q [nh][D] (D = rank + rope), cache [S][D]
  // (fp32 or bf16), out [parts][nh][rank]; lse (when not null) [parts][nh] the log of each
  // head's softmax denominator (max + log sum), so the parts can be merged; scratch: at least
  // attn_scratch_floats(nh, D) floats
  void (*attention)(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache,
                    int cache_bf16, int64_t S, int64_t part, float scale, float* out, float* lse,
                    float* scratch);
  // sparse down (block formats), M activation rows at once as a dense product over the blocks
  // some row uses (live [K/32]: nonzero if so): y[m][j] for j in the chunks of 64 outputs
  // [c0, c1); acc: 64-byte aligned scratch of M * 1024 floats. Null: row by row.
  void (*sparse_rows)(const SparseW& W, const QAct& x, int64_t M, const uint8_t* live, int64_t c0,
                      int64_t c1, float* y, int64_t ldy, float* acc);
};

enum : int { ATTN_TB = 64 };  // cache rows per attention block
// enough for every path: fp32 rows of a block, a 16-head query, output and score block
// (rank <= D), and the scalar kernel's per-head state
static inline int64_t attn_scratch_floats(int64_t nh, int64_t D) {
  return ATTN_TB * D + 32 * D + 16 * ATTN_TB + nh * ATTN_TB + 4 * nh + 64;
}

extern const Kernels kernels_scalar;
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;

// ---- scalar helpers (internal linkage, usable from every ISA unit) ---------------------

static inline float fp32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t fp32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

// IEEE half -> float, exact (bit manipulation; no F16C in portable code).
static inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      uint32_t m = man;
      do { e++; m <<= 1; } while ((m & 0x400) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  return fp32_from_bits(bits);
}

// float -> IEEE half, round to nearest even (as numpy's astype(float16) and F16C do).
static inline uint16_t fp32_to_fp16(float f) {
  uint32_t x = fp32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffff;
  if (x >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (x > 0x7f800000 ? 0x200 : 0));
  if (x >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to inf
  if (x < 0x38800000) {  // subnormal half (or zero)
    if (x < 0x33000000) return (uint16_t)sign;
    const uint32_t e = x >> 23;
    const uint32_t m = (x & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((x >> 13) - (112u << 10));
  const uint32_t rem = x & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
  return (uint16_t)(sign | r);
}

static inline float bf16_to_fp32(uint16_t b) { return fp32_from_bits((uint32_t)b << 16); }

// float -> bfloat16, round to nearest even (torch's rounding); NaN stays NaN.
static inline uint16_t fp32_to_bf16(float f) {
  uint32_t x = fp32_to_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the block formats' tile driver, shared by the SIMD paths -------------------------------
template <int V>
struct IntC {  // a compile-time int for the generic lambdas below (no <type_traits> here)
  static constexpr int value = V;
};

// Tiles [t0, t1) of a packed matrix (bpt bytes per tile) against M activation rows, calling
// rows(IntC<MT>, IntC<MB>, tile pointers, m0, first output rows) for MT tiles x MB rows.
// One activation row (decode): the tiles cut into four runs read side by side, four tiles per
// call. Why: the prefetchers follow several streams per core, and one stream per core leaves
// memory bandwidth unused (bf16 decode went from 0.79-0.83x llama.cpp's F16 to 1.28-1.30x with
// this in benchmarks/edge.py's interleaved runs on an AMD EPYC host). Several activation rows
// are compute-bound: up to MBMAX rows per call; with BT > 1 (kernels whose activation
// broadcasts then feed every tile of the call: Q8_0, Q4_0 and Q6_K on AVX-512; Q4_K's sums do
// not fit the registers twice over, 0.95x at 8 and 64 rows) from 4 rows on BT tiles
// per call, one from each BT-th of the range (BT read streams), 8 / BT rows at a time. Measured
// by benchmarks/ab.py on an AMD EPYC host (2 threads, builds alternated): BT = 2 against one tile
// per call, Q8_0 at 8 rows 1.33x and the 8-sequence PLM-1.8B step 100 -> 91 ms; BT = 4 against
// BT = 2, the step 0.86x (four streams help one row, not eight).
template <int MBMAX, int BT = 1, typename Rows>
static inline void tile_driver(const uint8_t* W, int64_t bpt, int64_t t0, int64_t t1, int64_t M, const Rows& rows) {
  int64_t t = t0;
  if (M == 1) {
    const int64_t q = (t1 - t0) / 4;
    for (int64_t i = 0; i < q; i++) {
      const int64_t ts[4] = {t0 + i, t0 + q + i, t0 + 2 * q + i, t0 + 3 * q + i};
      const uint8_t* wts[4] = {W + ts[0] * bpt, W + ts[1] * bpt, W + ts[2] * bpt, W + ts[3] * bpt};
      const int64_t first[4] = {ts[0] * TILE, ts[1] * TILE, ts[2] * TILE, ts[3] * TILE};
      rows(IntC<4>(), IntC<1>(), wts, 0, first);
    }
    t = t0 + 4 * q;
  }
  if constexpr (BT > 1)
    if (M >= 4) {
      constexpr int MBT = 8 / BT;  // BT tiles x MBT rows: 8 (tile, row) accumulators per call
      const int64_t h = (t1 - t0) / BT;
      for (int64_t i = 0; i < h; i++) {
        const uint8_t* wts[BT];
        int64_t first[BT];
        for (int k = 0; k < BT; k++) {
          wts[k] = W + (t0 + k * h + i) * bpt;
          first[k] = (t0 + k * h + i) * TILE;
        }
        int64_t m = 0;
        for (; m + MBT <= M; m += MBT) rows(IntC<BT>(), IntC<MBT>(), wts, m, first);
        if constexpr (MBT >= 4)
          for (; m + 2 <= M; m += 2) rows(IntC<BT>(), IntC<2>(), wts, m, first);
        if (m < M) rows(IntC<BT>(), IntC<1>(), wts, m, first);
      }
      t = t0 + BT * h;
    }
  for (; t < t1; t++) {
    const uint8_t* wt = W + t * bpt;
    const int64_t first = t * TILE;
    int64_t m = 0;
    if constexpr (MBMAX >= 4)
      for (; m + 4 <= M; m += 4) rows(IntC<1>(), IntC<4>(), &wt, m, &first);
    for (; m + 2 <= M; m += 2) rows(IntC<1>(), IntC<2>(), &wt, m, &first);
    if (m < M) rows(IntC<1>(), IntC<1>(), &wt, m, &first);
  }
}

}  // namespace plm
