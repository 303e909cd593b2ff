// Load-time work: GGUF blocks -> our layouts (tiles, neuron-major), dequantisation of packed
// rows, and quantisers from float weights to GGUF blocks (ports of ggml's reference
// quantize_row_{q8_0,q4_0,q4_K}_ref, so our own checkpoints need no llama.cpp).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "plm_native.h"

namespace plm {

// Packed weights are read whole every token. On 4 KiB pages that stream walks a page table
// entry every 4 KiB; on 2 MiB transparent huge pages one per 2 MiB (Linux grants them to an
// madvise'd mapping when /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always").
// benchmarks/ab.py on an Intel Xeon host with AMX: decode of 4- and 8-bit models
// 1.02-1.07x, load 0.84x (the Q4_0 model 7.9 s against 6.7; why, not measured: finding or
// zeroing free 2 MiB pages are the candidates); on an AMD EPYC host (an earlier build) neutral. Block formats only: bf16 decoded no
// faster on them and loaded 1.9x slower. Zero-filled, as any fresh mapping. PLM_HUGE_PAGES=0
// keeps 4 KiB pages (a short run that loads once and decodes little).
at::Tensor weight_buffer(int64_t bytes) {
#ifdef __linux__
  constexpr int64_t H = int64_t(2) << 20;
  const char* env = std::getenv("PLM_HUGE_PAGES");
  if (bytes >= 2 * H && !(env && std::strcmp(env, "0") == 0)) {
    const int64_t n = ceil_div(bytes, 4096) * 4096;
    void* p = mmap(nullptr, n + H, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      const uintptr_t b = (uintptr_t)p, a = (b + H - 1) & ~(uintptr_t)(H - 1);  // 2 MiB aligned start
      if (a > b) munmap(p, a - b);
      if (b + H > a) munmap((void*)(a + n), b + H - a);
      // whole 2 MiB pages only: a huge page over the tail would make up to 2 MiB resident for nothing
      madvise((void*)a, bytes / H * H, MADV_HUGEPAGE);  // advice: refused or ignored, the pages are plain ones
      return at::from_blob((void*)a, {bytes}, [n](void* q) { munmap(q, n); }, at::TensorOptions().dtype(at::kByte));
    }
  }
#endif
  return at::zeros({bytes}, at::kByte);
}

bool is_block(int fmt) { return fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_K || fmt == Q5_K || fmt == Q6_K; }
static bool is_super(int fmt) { return fmt == Q4_K || fmt == Q5_K || fmt == Q6_K; }
bool is_float(int fmt) { return fmt == F32 || fmt == F16 || fmt == BF16; }
int block_size(int fmt) { return is_super(fmt) ? 256 : is_block(fmt) ? 32 : 1; }
int act_block(int fmt) { return is_super(fmt) ? 256 : 32; }

int64_t row_bytes(int fmt, int64_t K) {
  switch (fmt) {
    case F32: return 4 * K;
    case F16: case BF16: return 2 * K;
    case Q8_0: return K / 32 * 34;
    case Q4_0: return K / 32 * 18;
    case Q4_K: return K / 256 * 144;
    case Q5_K: return K / 256 * 176;
    case Q6_K: return K / 256 * 210;
  }
  TORCH_CHECK(false, "plm: unsupported format ", fmt);
}

std::string format_name(int fmt) {
  switch (fmt) {
    case F32: return "F32"; case F16: return "F16"; case BF16: return "BF16"; case Q8_0: return "Q8_0";
    case Q4_0: return "Q4_0"; case Q4_K: return "Q4_K"; case Q5_K: return "Q5_K"; case Q6_K: return "Q6_K";
  }
  return "type " + std::to_string(fmt);
}

void check_shape(int fmt, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(is_block(fmt) || is_float(fmt), "plm: ", what, ": unsupported format ", format_name(fmt));
  TORCH_CHECK(N > 0 && K > 0, "plm: ", what, ": empty matrix [", N, ", ", K, "]");
  TORCH_CHECK(K % block_size(fmt) == 0, "plm: ", what, ": ", format_name(fmt), " needs K divisible by ",
              block_size(fmt), ", got K=", K);
}

namespace {

inline uint16_t rd16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }
inline void wr16(uint8_t* p, uint16_t v) { memcpy(p, &v, 2); }

void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// One GGUF block (or super-block) of one row, decoded to stored integers and scales.
struct Canon {
  int q[256];
  uint16_t d = 0, dmin = 0;
  uint8_t sc[8] = {0}, mn[8] = {0};  // Q4_K, Q5_K
  int8_t sc6[16] = {0};              // Q6_K
};

void decode_block(int fmt, const uint8_t* raw, Canon& c) {
  switch (fmt) {
    case Q8_0:
      c.d = rd16(raw);
      for (int k = 0; k < 32; k++) c.q[k] = (int8_t)raw[2 + k];
      break;
    case Q4_0:
      c.d = rd16(raw);
      for (int k = 0; k < 16; k++) {
        c.q[k] = raw[2 + k] & 15;
        c.q[k + 16] = raw[2 + k] >> 4;
      }
      break;
    case Q4_K:
    case Q5_K: {  // Q5_K: d, dmin, scales, then qh[32] (bit j of byte l: input 32j + l) before qs
      c.d = rd16(raw);
      c.dmin = rd16(raw + 2);
      for (int j = 0; j < 8; j++) get_scale_min_k4(j, raw + 4, &c.sc[j], &c.mn[j]);
      const uint8_t* qs = raw + (fmt == Q5_K ? 48 : 16);
      for (int k = 0; k < 256; k++) {
        const int ch = k / 64, l = k % 64;
        c.q[k] = l < 32 ? qs[32 * ch + l] & 15 : qs[32 * ch + l - 32] >> 4;
        if (fmt == Q5_K) c.q[k] |= ((raw[16 + k % 32] >> (k / 32)) & 1) << 4;
      }
      break;
    }
    case Q6_K: {
      const uint8_t *ql = raw, *qh = raw + 128;
      for (int i = 0; i < 16; i++) c.sc6[i] = (int8_t)raw[192 + i];
      c.d = rd16(raw + 208);
      for (int k = 0; k < 256; k++) {
        const int n = k / 128, l = k % 128, quarter = l / 32, ll = l % 32;
        const uint8_t lo = ql[64 * n + (quarter & 1) * 32 + ll];
        const int low4 = quarter < 2 ? lo & 15 : lo >> 4;
        c.q[k] = low4 | (((qh[32 * n + ll] >> (2 * quarter)) & 3) << 4);
      }
      break;
    }
  }
}

// Position of input k (within a 32-input block) of tile row r in the nibble/byte layouts.
inline int nib_byte(int k, int r) { return 64 * (k / 8) + 4 * r + (k & 3); }
inline bool nib_high(int k) { return (k & 7) >= 4; }
inline void put_nib(uint8_t* p, int k, int r, int v) { p[nib_byte(k, r)] |= (uint8_t)(v << (nib_high(k) ? 4 : 0)); }
inline int get_nib(const uint8_t* p, int k, int r) { return (p[nib_byte(k, r)] >> (nib_high(k) ? 4 : 0)) & 15; }
// Q5_K: the fifth bit of sub-block j's input k of row r sits in byte 4 r + (k & 3) of the
// sub-block's 64-byte plane (after its nibbles), at bit 2 g + h (g = k / 8 its nibble group,
// h = 1 for a high nibble): the same byte as its nibble in the group, so the kernels shift it
// into place.
inline int q5_byte(int j, int k, int r) { return (int)qk_sub(true, j) + 256 + 4 * r + (k & 3); }
inline int q5_bit(int k) { return 2 * (k / 8) + (nib_high(k) ? 1 : 0); }

int tile_block_bytes(int fmt) {
  switch (fmt) {
    case Q8_0: return Q8_0_TB; case Q4_0: return Q4_0_TB; case Q4_K: return Q4_K_TB; case Q5_K: return Q5_K_TB;
    case Q6_K: return Q6_K_TB;
  }
  return 0;
}

void encode_tile(int fmt, const Canon& c, int r, uint8_t* tb) {
  switch (fmt) {
    case Q8_0:
      wr16(tb + 2 * r, c.d);
      for (int k = 0; k < 32; k++) tb[32 + 64 * (k / 4) + 4 * r + (k & 3)] = (uint8_t)(c.q[k] + 128);
      break;
    case Q4_0:
      wr16(tb + 2 * r, c.d);
      for (int k = 0; k < 32; k++) put_nib(tb + 32, k, r, c.q[k]);
      break;
    case Q4_K:
    case Q5_K:
      wr16(tb + 2 * r, c.d);
      wr16(tb + 32 + 2 * r, c.dmin);
      for (int j = 0; j < 8; j++) {
        tb[64 + 16 * j + r] = c.sc[j];
        tb[192 + 16 * j + r] = c.mn[j];
        for (int k = 0; k < 32; k++) {
          put_nib(tb + qk_sub(fmt == Q5_K, j), k, r, c.q[32 * j + k] & 15);
          if (fmt == Q5_K) tb[q5_byte(j, k, r)] |= (uint8_t)(((c.q[32 * j + k] >> 4) & 1) << q5_bit(k));
        }
      }
      break;
    case Q6_K:
      wr16(tb + 2 * r, c.d);
      for (int g = 0; g < 16; g++) tb[32 + 16 * g + r] = (uint8_t)c.sc6[g];
      for (int u = 0; u < 8; u++) {
        uint8_t* ql = tb + 288 + 384 * u;
        uint8_t* qh = ql + 256;
        for (int k = 0; k < 32; k++) {
          const int q = c.q[32 * u + k];
          put_nib(ql, k, r, q & 15);
          const int p = 4 * r + (k & 3);
          const int shift = (p < 32 ? 0 : 2) + (nib_high(k) ? 4 : 0);
          qh[32 * (k / 8) + (p & 31)] |= (uint8_t)(((q >> 4) & 3) << shift);
        }
      }
      break;
  }
}

float dequant_tile_value(int fmt, const uint8_t* tb, int r, int k) {
  switch (fmt) {
    case Q8_0:
      return fp16_to_fp32(rd16(tb + 2 * r)) * (float)((int)tb[32 + 64 * (k / 4) + 4 * r + (k & 3)] - 128);
    case Q4_0:
      return fp16_to_fp32(rd16(tb + 2 * r)) * (float)(get_nib(tb + 32, k, r) - 8);
    case Q4_K:
    case Q5_K: {
      const int j = k / 32, kk = k % 32;
      const float d = fp16_to_fp32(rd16(tb + 2 * r)) * tb[64 + 16 * j + r];
      const float m = fp16_to_fp32(rd16(tb + 32 + 2 * r)) * tb[192 + 16 * j + r];
      int q = get_nib(tb + qk_sub(fmt == Q5_K, j), kk, r);
      if (fmt == Q5_K) q |= ((tb[q5_byte(j, kk, r)] >> q5_bit(kk)) & 1) << 4;
      return d * (float)q - m;
    }
    case Q6_K: {
      const int u = k / 32, kk = k % 32, p = 4 * r + (kk & 3);
      const uint8_t* ql = tb + 288 + 384 * u;
      const int shift = (p < 32 ? 0 : 2) + (nib_high(kk) ? 4 : 0);
      const int q = get_nib(ql, kk, r) | (((ql[256 + 32 * (kk / 8) + (p & 31)] >> shift) & 3) << 4);
      return fp16_to_fp32(rd16(tb + 2 * r)) * (float)(int8_t)tb[32 + 16 * (k / 16) + r] * (float)(q - 32);
    }
  }
  return 0.f;
}

// ---- quantisers (ggml reference algorithms) --------------------------------------------------
inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i;
  memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

void quantize_q8_0(const float* x, int64_t K, uint8_t* out) {
  for (int64_t b = 0; b < K / 32; b++, x += 32, out += 34) {
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    wr16(out, fp32_to_fp16(d));
    for (int j = 0; j < 32; j++) out[2 + j] = (uint8_t)(int8_t)std::roundf(x[j] * id);
  }
}

void quantize_q4_0(const float* x, int64_t K, uint8_t* out) {
  for (int64_t b = 0; b < K / 32; b++, x += 32, out += 18) {
    float amax = 0.f, mx = 0.f;
    for (int j = 0; j < 32; j++)
      if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); mx = x[j]; }
    const float d = mx / -8.f, id = d != 0.f ? 1.f / d : 0.f;
    wr16(out, fp32_to_fp16(d));
    for (int j = 0; j < 16; j++) {
      const int x0 = std::min(15, (int)(int8_t)(x[j] * id + 8.5f));
      const int x1 = std::min(15, (int)(int8_t)(x[16 + j] * id + 8.5f));
      out[2 + j] = (uint8_t)(x0 | (x1 << 4));
    }
  }
}

float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep) {
  float mn = x[0], mx = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
    sum_w += weights[i];
    sum_x += weights[i] * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.f;
  }
  float iscale = nmax / (mx - mn), scale = 1 / iscale, best_mad = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - mn))));
    L[i] = (uint8_t)l;
    const float diff = scale * l + mn - x[i];
    best_mad += weights[i] * diff * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - mn))));
      Laux[i] = (uint8_t)l;
      sum_l += weights[i] * l;
      sum_l2 += weights[i] * l * l;
      sum_xl += weights[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float mad = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * Laux[i] + this_min - x[i];
        mad += weights[i] * diff * diff;
      }
      if (mad < best_mad) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_mad = mad;
        scale = this_scale;
        mn = this_min;
      }
    }
  }
  *the_min = -mn;
  return scale;
}

void quantize_q4_k(const float* x, int64_t K, uint8_t* out) {
  for (int64_t b = 0; b < K / 256; b++, x += 256, out += 144) {
    uint8_t L[256], Laux[32], scl[12] = {0};
    float weights[32], mins[8], scales[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
      max_scale = std::max(max_scale, scales[j]);
      max_min = std::max(max_min, mins[j]);
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      const uint8_t ls = (uint8_t)std::min(63, nearest_int(inv_scale * scales[j]));
      const uint8_t lm = (uint8_t)std::min(63, nearest_int(inv_min * mins[j]));
      if (j < 4) {
        scl[j] = ls;
        scl[j + 4] = lm;
      } else {
        scl[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
        scl[j - 4] |= ((ls >> 4) << 6);
        scl[j - 0] |= ((lm >> 4) << 6);
      }
    }
    const uint16_t dh = fp32_to_fp16(max_scale / 63.f), mh = fp32_to_fp16(max_min / 63.f);
    wr16(out, dh);
    wr16(out + 2, mh);
    memcpy(out + 4, scl, 12);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      get_scale_min_k4(j, scl, &sc, &m);
      const float d = fp16_to_fp32(dh) * sc;
      if (!d) continue;
      const float dm = fp16_to_fp32(mh) * m;
      for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = (uint8_t)std::max(0, std::min(15, nearest_int((x[32 * j + ii] + dm) / d)));
    }
    uint8_t* q = out + 16;
    for (int j = 0; j < 256; j += 64, q += 32)
      for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
  }
}

// ggml's make_qx_quants for rmse_type 1 (weights x^2): symmetric levels in [-nmax, nmax), the
// scale refined over 18 nearby candidates; L gets level + nmax
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
  float mx = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      mx = x[i];
    }
  }
  if (amax < 1e-15f) {  // GROUP_MAX_EPS
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / mx, sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
    L[i] = (int8_t)(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.f, best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / mx;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = (int8_t)(nmax + std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i]))));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q6_K, ggml's reference quantiser: 16 sub-blocks of 16 values, each a 6-bit level (-32..31)
// times an int8 sub-block scale times the fp16 super-block scale d. Layout: ql[128] (low 4 bits),
// qh[64] (high 2 bits), scales[16], d.
void quantize_q6_k(const float* x, int64_t K, uint8_t* out) {
  for (int64_t b = 0; b < K / 256; b++, x += 256, out += 210) {
    int8_t L[256];
    float scales[16], max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
      scales[ib] = scale;
      if (std::fabs(scale) > max_abs_scale) {
        max_abs_scale = std::fabs(scale);
        max_scale = scale;
      }
    }
    memset(out, 0, 210);
    if (max_abs_scale < 1e-15f) continue;  // an all-zero block: d = 0, every level 0
    const float iscale = -128.f / max_scale;
    const uint16_t dh = fp32_to_fp16(1 / iscale);
    int8_t* sc = (int8_t*)(out + 192);
    for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)std::min(127, nearest_int(iscale * scales[ib]));
    uint8_t Lu[256];
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(dh) * sc[j];
      if (!d) {
        for (int ii = 0; ii < 16; ++ii) Lu[16 * j + ii] = (uint8_t)L[16 * j + ii];
        continue;
      }
      for (int ii = 0; ii < 16; ++ii) {
        const int l = std::max(-32, std::min(31, nearest_int(x[16 * j + ii] / d)));
        Lu[16 * j + ii] = (uint8_t)(l + 32);
      }
    }
    uint8_t *ql = out, *qh = out + 128;
    for (int j = 0; j < 256; j += 128, ql += 64, qh += 32)
      for (int l = 0; l < 32; ++l) {
        const uint8_t q1 = Lu[j + l] & 0xF, q2 = Lu[j + l + 32] & 0xF, q3 = Lu[j + l + 64] & 0xF, q4 = Lu[j + l + 96] & 0xF;
        ql[l] = q1 | (q3 << 4);
        ql[l + 32] = q2 | (q4 << 4);
        qh[l] = (Lu[j + l] >> 4) | ((Lu[j + l + 32] >> 4) << 2) | ((Lu[j + l + 64] >> 4) << 4) | ((Lu[j + l + 96] >> 4) << 6);
      }
    wr16(out + 208, dh);
  }
}

}  // namespace

int64_t Mat::tile_bytes() const { return tile_block_bytes(fmt) * (K / block_size(fmt)); }

at::Tensor pack_tiles(const at::Tensor& raw_in, int fmt, int64_t N, int64_t K) {
  check_shape(fmt, N, K, "pack");
  const at::Tensor raw = raw_in.contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.numel() == N * row_bytes(fmt, K), "plm: pack: expected ",
              N * row_bytes(fmt, K), " bytes of ", format_name(fmt), " for [", N, ", ", K, "], got ", raw.numel());
  if (is_float(fmt)) return raw.reshape({-1}).clone();  // 4 KiB pages: see weight_buffer
  const int64_t nt = ceil_div(N, TILE), nb = K / block_size(fmt), tb = tile_block_bytes(fmt), rb = row_bytes(fmt, K);
  const int64_t gb = rb / nb;  // GGUF bytes per block
  at::Tensor out = weight_buffer(nt * nb * tb);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    Canon c;
    for (int64_t t = t0; t < t1; t++)
      for (int r = 0; r < TILE && t * TILE + r < N; r++)
        for (int64_t b = 0; b < nb; b++) {
          decode_block(fmt, src + (t * TILE + r) * rb + b * gb, c);
          encode_tile(fmt, c, r, dst + (t * nb + b) * tb);
        }
  });
  return out;
}

void dequant_tile_row(int fmt, const uint8_t* tiles, int64_t K, int64_t row, float* out) {
  const int64_t bs = block_size(fmt), nb = K / bs, tb = tile_block_bytes(fmt);
  const int64_t t = row / TILE;
  const int r = (int)(row % TILE);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = tiles + (t * nb + b) * tb;
    for (int k = 0; k < bs; k++) out[b * bs + k] = dequant_tile_value(fmt, blk, r, k);
  }
}

at::Tensor pack_sparse(const at::Tensor& raw_in, int fmt, int64_t N, int64_t K) {
  check_shape(fmt, N, K, "pack_sparse");
  TORCH_CHECK(fmt != Q5_K, "plm: pack_sparse: no sparse layout for Q5_K (hold the matrix as Q8_0)");
  const at::Tensor raw = raw_in.contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.numel() == N * row_bytes(fmt, K), "plm: pack_sparse: expected ",
              N * row_bytes(fmt, K), " bytes of ", format_name(fmt), ", got ", raw.numel());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  if (is_float(fmt)) {  // transpose [N, K] -> [K, N]
    const int64_t e = fmt == F32 ? 4 : 2;
    at::Tensor out = at::empty({K * N * e}, at::kByte);
    uint8_t* dst = out.data_ptr<uint8_t>();
    at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; k++)
        for (int64_t j = 0; j < N; j++) memcpy(dst + (k * N + j) * e, src + (j * K + k) * e, e);
    });
    return out;
  }
  const int64_t Np = ceil_div(N, 64) * 64, nb = K / 32, ns = K / 256, rb = row_bytes(fmt, K);
  const int64_t qbytes = fmt == Q8_0 || fmt == Q6_K ? K * Np : K * Np / 2;
  const int64_t total = fmt == Q4_K ? qbytes + 4 * ns * Np + 2 * nb * Np
                        : fmt == Q6_K ? qbytes + 2 * ns * Np + K / 16 * Np
                                      : qbytes + 2 * nb * Np;
  at::Tensor out = weight_buffer(total);
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t bs = block_size(fmt), gb = rb / (K / bs);
  at::parallel_for(0, Np / 64, 1, [&](int64_t c0, int64_t c1) {  // 64-output chunks: nibble bytes never shared
    Canon c;
    for (int64_t j = c0 * 64; j < std::min(N, c1 * 64); j++)
      for (int64_t b = 0; b < K / bs; b++) {
        decode_block(fmt, src + j * rb + b * gb, c);
        for (int k = 0; k < bs; k++) {
          const int64_t i = b * bs + k;  // neuron
          if (fmt == Q8_0 || fmt == Q6_K) {
            dst[i * Np + j] = (uint8_t)c.q[k];
          } else {
            const int64_t jj = j % 64;
            dst[i * (Np / 2) + (j / 64) * 32 + (jj % 32)] |= (uint8_t)(c.q[k] << (jj < 32 ? 0 : 4));
          }
        }
        if (fmt == Q6_K) {
          wr16(dst + qbytes + 2 * (b * Np + j), c.d);
          for (int g = 0; g < 16; g++) dst[qbytes + 2 * ns * Np + (16 * b + g) * Np + j] = (uint8_t)c.sc6[g];
        } else if (fmt == Q4_K) {
          uint8_t* dpl = dst + qbytes;
          wr16(dpl + 2 * (b * Np + j), c.d);
          wr16(dpl + 2 * ns * Np + 2 * (b * Np + j), c.dmin);
          for (int s = 0; s < 8; s++) {
            dst[qbytes + 4 * ns * Np + (8 * b + s) * Np + j] = c.sc[s];
            dst[qbytes + 4 * ns * Np + nb * Np + (8 * b + s) * Np + j] = c.mn[s];
          }
        } else {
          wr16(dst + qbytes + 2 * (b * Np + j), c.d);
        }
      }
  });
  return out;
}

at::Tensor dequant_sparse(const at::Tensor& packed, int fmt, int64_t N, int64_t K) {
  at::Tensor out = at::empty({N, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  if (is_float(fmt)) {
    for (int64_t k = 0; k < K; k++)
      for (int64_t j = 0; j < N; j++)
        o[j * K + k] = fmt == F32 ? ((const float*)p)[k * N + j]
                       : fmt == F16 ? fp16_to_fp32(((const uint16_t*)p)[k * N + j]) : bf16_to_fp32(((const uint16_t*)p)[k * N + j]);
    return out;
  }
  const int64_t Np = ceil_div(N, 64) * 64, nb = K / 32, ns = K / 256;
  const int64_t qbytes = fmt == Q8_0 || fmt == Q6_K ? K * Np : K * Np / 2;
  for (int64_t j = 0; j < N; j++)
    for (int64_t i = 0; i < K; i++) {
      const int64_t jj = j % 64;
      const int q = fmt == Q8_0 ? (int8_t)p[i * Np + j]
                    : fmt == Q6_K ? p[i * Np + j]
                                  : (p[i * (Np / 2) + (j / 64) * 32 + (jj % 32)] >> (jj < 32 ? 0 : 4)) & 15;
      const int64_t b = i / 32;
      if (fmt == Q6_K) {
        const float d = fp16_to_fp32(rd16(p + qbytes + 2 * ((i / 256) * Np + j)));
        o[j * K + i] = d * (float)(int8_t)p[qbytes + 2 * ns * Np + (i / 16) * Np + j] * (float)(q - 32);
      } else if (fmt == Q8_0) {
        o[j * K + i] = fp16_to_fp32(rd16(p + qbytes + 2 * (b * Np + j))) * q;
      } else if (fmt == Q4_0) {
        o[j * K + i] = fp16_to_fp32(rd16(p + qbytes + 2 * (b * Np + j))) * (q - 8);
      } else {
        const int64_t s = i / 256;
        const float d = fp16_to_fp32(rd16(p + qbytes + 2 * (s * Np + j)));
        const float dm = fp16_to_fp32(rd16(p + qbytes + 2 * ns * Np + 2 * (s * Np + j)));
        const uint8_t sc = p[qbytes + 4 * ns * Np + b * Np + j], mn = p[qbytes + 4 * ns * Np + nb * Np + b * Np + j];
        o[j * K + i] = d * sc * q - dm * mn;
      }
    }
  return out;
}

at::Tensor quantize_blocks(const at::Tensor& w_in, int fmt) {
  TORCH_CHECK(w_in.dim() == 2, "plm: quantize expects a 2-D weight, got ", w_in.dim(), " dims");
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  check_shape(fmt, N, K, "quantize");
  const int64_t rb = row_bytes(fmt, K);
  at::Tensor out = at::empty({N, rb}, at::kByte);
  const float* x = w.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const float* xr = x + n * K;
      uint8_t* orow = o + n * rb;
      switch (fmt) {
        case F32: memcpy(orow, xr, 4 * K); break;
        case F16: for (int64_t k = 0; k < K; k++) wr16(orow + 2 * k, fp32_to_fp16(xr[k])); break;
        case BF16: for (int64_t k = 0; k < K; k++) wr16(orow + 2 * k, fp32_to_bf16(xr[k])); break;
        case Q8_0: quantize_q8_0(xr, K, orow); break;
        case Q4_0: quantize_q4_0(xr, K, orow); break;
        case Q4_K: quantize_q4_k(xr, K, orow); break;
        case Q6_K: quantize_q6_k(xr, K, orow); break;
      }
    }
  });
  return out;
}

}  // namespace plm
