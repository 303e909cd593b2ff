// CPU feature detection, the kernel table of the selected path, the matrix drivers
// (activation quantisation + threading over tiles), and the torch.ops.plm.* operators.
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>
#include <unordered_map>

#include "plm_native.h"

namespace plm {

// ---- CPU features ----------------------------------------------------------------------
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false, avx512 = false, vnni = false, bf16 = false, amx = false;
};

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}

// Linux hands a process the AMX tile data state only when it asks (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile instruction faults.
bool amx_permitted() {
#ifdef __linux__
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (!osxsave || !avx) return Features{};
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xe6) == 0xe6;  // XMM|YMM, + opmask|ZMM
  if (!os_avx) return Features{};
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = (b & (1u << 5)) && f.fma && f.f16c;
  const bool avx512f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  f.vnni = c & (1u << 11);
  f.avx512 = os_avx512 && avx512f && dq && bw && vl && f.vnni && f.avx2;
  const bool amx_cpu = (d & (1u << 22)) && (d & (1u << 24)), os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);  // BF16, TILE; XTILECFG|XTILEDATA
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.bf16 = f.avx512 && (a & (1u << 5));
  f.amx = f.bf16 && amx_cpu && os_amx && amx_compiled() && amx_permitted();
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

#ifdef PLM_EMULATED_AVX512
constexpr bool kEmulated = true;  // test build: the AVX-512 units run on SIMDe's emulation
#else
constexpr bool kEmulated = false;
#endif

bool supports(const std::string& isa) {
  if (isa == "scalar") return true;
  if (isa == "avx2") return features().avx2;
  if (isa == "avx512") return kEmulated || features().avx512;
  if (isa == "amx") return !kEmulated && features().amx;
  return false;
}

Dispatch make_dispatch(const std::string& isa) {
  Dispatch dp;
  dp.isa = isa;
  dp.k = isa == "scalar" ? kernels_scalar : kernels_avx2;
  if (isa == "avx512" || isa == "amx") {  // overlay the AVX-512 entries; the rest stay AVX2
    const Kernels& z = kernels_avx512;
    dp.k.name = z.name;
    if (z.gemv_q8_0) dp.k.gemv_q8_0 = z.gemv_q8_0;
    if (z.gemv_q4_0) dp.k.gemv_q4_0 = z.gemv_q4_0;
    if (z.gemv_q4_k) dp.k.gemv_q4_k = z.gemv_q4_k;
    if (z.gemv_q6_k) dp.k.gemv_q6_k = z.gemv_q6_k;
    if (z.gemv_q5_k) dp.k.gemv_q5_k = z.gemv_q5_k;
    if (z.gemv_f) dp.k.gemv_f = z.gemv_f;
    if (z.sparse_rows) dp.k.sparse_rows = z.sparse_rows;
    dp.bf16_dp = kEmulated || features().bf16;
    dp.amx = isa == "amx";  // the AVX-512 path plus AMX tiles for BF16 weights
  }
  return dp;
}

std::string best_isa() {
  return supports("amx") ? "amx" : supports("avx512") && !kEmulated ? "avx512" : supports("avx2") ? "avx2" : "scalar";
}

// One table per path, built on first use and never freed, so switching paths (tests) cannot
// pull a table from under a computation running in another thread.
const Dispatch* table(const std::string& isa) {
  static std::mutex mu;
  static std::unordered_map<std::string, const Dispatch*> made;
  std::lock_guard<std::mutex> lock(mu);
  auto it = made.find(isa);
  if (it == made.end()) it = made.emplace(isa, new Dispatch(make_dispatch(isa))).first;
  return it->second;
}

std::atomic<const Dispatch*> g_dispatch{nullptr};

}  // namespace

const Dispatch& dispatch() {
  const Dispatch* d = g_dispatch.load(std::memory_order_acquire);
  if (!d) {
    const Dispatch* best = table(best_isa());
    g_dispatch.compare_exchange_strong(d, best);  // on failure d holds the winner
    d = g_dispatch.load(std::memory_order_acquire);
  }
  return *d;
}

void set_isa(const std::string& name) {
  const std::string isa = name == "auto" ? best_isa() : name;
  TORCH_CHECK(isa == "scalar" || isa == "avx2" || isa == "avx512" || isa == "amx", "plm: unknown ISA '", name,
              "' (choose auto, amx, avx512, avx2 or scalar)");
  TORCH_CHECK(supports(isa), "plm: this CPU cannot run the ", isa, " kernels (it has: ", cpu_features(), ")");
  g_dispatch.store(table(isa), std::memory_order_release);
}

std::string cpu_features() {
  const Features& f = features();
  std::string s;
  auto add = [&](bool on, const char* n) { if (on) s += (s.empty() ? "" : " ") + std::string(n); };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512, "avx512(f,bw,vl,dq)");
  add(f.vnni, "avx512vnni");
  add(f.bf16, "avx512bf16");
  add(f.amx, "amx-bf16");
  add(kEmulated, "emulated-avx512");
  return s.empty() ? "none" : s;
}

// ---- matrices ----------------------------------------------------------------------------
namespace {

using GemvFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const QAct&, int64_t, float*, int64_t, int64_t);

GemvFn tile_fn(const Kernels& k, int fmt) {
  switch (fmt) {
    case Q8_0: return k.gemv_q8_0;
    case Q4_0: return k.gemv_q4_0;
    case Q4_K: return k.gemv_q4_k;
    case Q5_K: return k.gemv_q5_k;
    case Q6_K: return k.gemv_q6_k;
  }
  return nullptr;
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Quantise `rows` activation rows of K inputs (blocks of bs) into w.q / w.d / w.s16.
void quantize_rows(const Kernels& k, const float* x, int64_t rows, int64_t K, int bs, Work& w) {
  int8_t* q = grow(w.q, rows * K);
  float* d = grow(w.d, rows * K / bs);
  int32_t* s = grow(w.s16, rows * K / 16);
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) k.quantize_act(x + r * K, K, bs, q + r * K, d + r * (K / bs), s + r * (K / 16));
  };
  if (rows * K < (1 << 16)) body(0, rows);
  else parallel_run(rows, 1, [&](int64_t a, int64_t b, int) { body(a, b); });
}

// x -> bf16-rounded copy (fp32 values and bf16 bits): BF16 weights see bf16 activations on
// every path (vdpbf16ps needs them; the others round the same way so results agree).
const float* round_bf16(const float* x, int64_t n, Work& w) {
  float* xf = grow(w.xf, n);
  uint16_t* xb = grow(w.xb, n);
  for (int64_t i = 0; i < n; i++) {
    xb[i] = fp32_to_bf16(x[i]);
    xf[i] = bf16_to_fp32(xb[i]);
  }
  return xf;
}

// Chunks of at least `grain` items, about four per thread so a late thread costs little.
template <typename F>
void parallel(int64_t total, int64_t grain, const F& f) {
  const int64_t nt = at::get_num_threads();
  if (total <= grain || nt == 1) return f(0, total);
  const int64_t chunk = std::max(grain, ceil_div(total, 4 * nt));
  parallel_run(total, chunk, [&](int64_t a, int64_t b, int) { f(a, b); });
}

}  // namespace

// BF16 matrices smaller than this (PLM_AMX_MIN_BYTES, default 1 MiB) stay on vdpbf16ps: in a
// small model they sit in the caches, where a one-row AMX tile runs at about 0.9x vdpbf16ps
// and its set-up per call shows. Decided per matrix, never per batch, so batch == alone holds.
int64_t amx_min_bytes() {
  const char* e = std::getenv("PLM_AMX_MIN_BYTES");
  return e && *e ? std::atoll(e) : int64_t(1) << 20;
}

Mat make_mat(const at::Tensor& data, int64_t fmt, int64_t N, int64_t K, int64_t groups, bool sparse) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.device().is_cpu(),
              "plm: packed weights must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(groups >= 1 && N % groups == 0, "plm: ", N, " rows do not split into ", groups, " groups");
  check_shape((int)fmt, N, K, "matrix");
  Mat m;
  m.data = data;
  m.fmt = (int)fmt;
  m.N = N;
  m.K = K;
  m.groups = groups;
  m.sparse = sparse;
  int64_t expect;
  if (sparse) {
    TORCH_CHECK(groups == 1, "plm: the sparse layout has no groups");
    TORCH_CHECK(fmt != Q5_K, "plm: no sparse layout for Q5_K");
    const int64_t Np = ceil_div(N, 64) * 64, nb = K / 32, ns = K / 256;
    expect = is_float((int)fmt) ? row_bytes((int)fmt, K) * N
             : fmt == Q8_0     ? K * Np + 2 * nb * Np
             : fmt == Q4_0     ? K * Np / 2 + 2 * nb * Np
             : fmt == Q6_K     ? K * Np + 2 * ns * Np + K / 16 * Np
                               : K * Np / 2 + 4 * ns * Np + 2 * nb * Np;
  } else {
    expect = is_float((int)fmt) ? row_bytes((int)fmt, K) * N : groups * m.tiles_per_group() * m.tile_bytes();
  }
  TORCH_CHECK(data.numel() == expect, "plm: packed ", format_name((int)fmt), " [", N, ", ", K, "] should be ", expect,
              " bytes, got ", data.numel());
  m.amx = fmt == BF16 && !sparse && K % 32 == 0 && data.numel() >= amx_min_bytes();
  const int64_t ng = m.Ng(), tail = ng % 16;
  if (m.amx && tail) {  // each group's last rows % 16 rows, zero-padded to a whole tile (made once)
    m.amx_tail = at::zeros({groups * 16 * K * 2}, at::kByte);
    for (int64_t g = 0; g < groups; g++)
      memcpy(m.amx_tail.data_ptr<uint8_t>() + g * 16 * K * 2, data.data_ptr<uint8_t>() + (g * ng + ng - tail) * K * 2,
             tail * K * 2);
  }
  return m;
}

void Mat::forward(const float* x, int64_t M, float* y, int64_t ldy, Work& w) const {
  TORCH_CHECK(!sparse, "plm: forward on a sparse-layout matrix");
  const Dispatch& dp = dispatch();
  const int64_t G = groups, ng = Ng();
  const uint8_t* base = data.data_ptr<uint8_t>();
  if (is_block(fmt)) {
    const int bs = act_block(fmt);
    quantize_rows(dp.k, x, G * M, K, bs, w);
    const GemvFn fn = tile_fn(dp.k, fmt);
    const int64_t tpg = tiles_per_group(), tb = tile_bytes();
    const int8_t* q = w.q.data();
    const float* d = w.d.data();
    const int32_t* s = w.s16.data();
    parallel(G * tpg, std::max<int64_t>(1, (1 << 16) / (TILE * K * std::max<int64_t>(M, 1))), [&](int64_t a, int64_t b) {
      for (int64_t g = a / tpg; g < G && g * tpg < b; g++) {
        const int64_t t0 = std::max(a, g * tpg) - g * tpg, t1 = std::min(b, (g + 1) * tpg) - g * tpg;
        const QAct qa{q + g * M * K, d + g * M * (K / bs), s + g * M * (K / 16), K, bs};
        fn(base + g * tpg * tb, K, t0, t1, qa, M, y + g * ng, ldy, ng);
      }
    });
    return;
  }
  const int64_t elt = fmt == F32 ? 4 : 2;
  const float* xp = fmt == BF16 ? round_bf16(x, G * M * K, w) : x;
  const uint16_t* xb = fmt == BF16 ? w.xb.data() : nullptr;
  if (amx && dp.amx) return forward_amx(xb, M, y, ldy, w);
  const bool dp_bf16 = fmt == BF16 && dp.bf16_dp;
  parallel(N, std::max<int64_t>(1, (1 << 15) / (K * std::max<int64_t>(M, 1))), [&](int64_t a, int64_t b) {
    for (int64_t g = a / ng; g < G && g * ng < b; g++) {
      const int64_t n0 = std::max(a, g * ng) - g * ng, n1 = std::min(b, (g + 1) * ng) - g * ng;
      const uint8_t* wg = base + g * ng * K * elt;
      if (dp_bf16) gemv_bf16_avx512bf16(wg, K, n0, n1, xb + g * M * K, M, y + g * ng, ldy);
      else dp.k.gemv_f(fmt, wg, K, n0, n1, xp + g * M * K, xb ? xb + g * M * K : nullptr, M, y + g * ng, ldy);
    }
  });
}

// BF16 weights on AMX tiles: the activations packed once into (k, k+1) pairs by tiles of 16
// rows (gemm_bf16_amx's layout), then the rows shared out in whole tiles of 16 (a group's last
// partial tile read from amx_tail, made by make_mat).
void Mat::forward_amx(const uint16_t* xb, int64_t M, float* y, int64_t ldy, Work& w) const {
  if (M <= 0) return;  // a tile of no columns is not a valid tile configuration
  const int64_t G = groups, ng = Ng(), KB = K / 32, mw = std::min<int64_t>(M, 16), MT = ceil_div(M, 16);
  const int64_t per_group = MT * KB * 16 * mw;  // packed 32-bit pairs of one group's activations
  uint32_t* xp = grow(w.xp, G * per_group);
  parallel(G * MT, std::max<int64_t>(1, (1 << 14) / (16 * K)), [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; it++) {
      const int64_t g = it / MT, mt = it % MT;
      for (int64_t c = 0; c < mw; c++) {
        const int64_t m = mt * 16 + c;
        uint32_t* o = xp + g * per_group + mt * KB * 16 * mw + c;
        if (m >= M) {  // the last tile's rows past M
          for (int64_t i = 0; i < KB * 16; i++) o[i * mw] = 0;
          continue;
        }
        const uint32_t* src = (const uint32_t*)(xb + (g * M + m) * K);  // K % 32 == 0: pairs aligned
        for (int64_t i = 0; i < KB * 16; i++) o[i * mw] = src[i];
      }
    }
  });
  const uint16_t* W = (const uint16_t*)data.data_ptr<uint8_t>();
  const uint16_t* wt = amx_tail.defined() ? (const uint16_t*)amx_tail.data_ptr<uint8_t>() : nullptr;
  const int64_t tpg = ceil_div(ng, 16);
  parallel(G * tpg, std::max<int64_t>(1, (1 << 15) / (16 * K * std::max<int64_t>(M, 1))), [&](int64_t a, int64_t b) {
    for (int64_t g = a / tpg; g < G && g * tpg < b; g++) {
      const int64_t t0 = std::max(a, g * tpg) - g * tpg, t1 = std::min(b, (g + 1) * tpg) - g * tpg;
      gemm_bf16_amx(W + g * ng * K, K, ng, 16 * t0, std::min(ng, 16 * t1), xp + g * per_group, M,
                    wt ? wt + g * 16 * K : nullptr, y + g * ng, ldy);
    }
  });
}

void Mat::forward_sparse(const float* a, int64_t M, float* y, int64_t ldy, Work& w, SparseStats* st) const {
  TORCH_CHECK(sparse, "plm: forward_sparse on a tile-layout matrix");
  const Dispatch& dp = dispatch();
  const uint8_t* base = data.data_ptr<uint8_t>();
  const int64_t nb = K / 32;
  const SparseW W{base, fmt, N, K, ceil_div(N, 64) * 64};
  const int bs = act_block(fmt);
  const float* av = a;
  if (is_block(fmt)) {
    quantize_rows(dp.k, a, M, K, bs, w);
  } else if (fmt == BF16) {
    av = round_bf16(a, M * K, w);
  }
  auto count = [&](int64_t active) {
    if (st) {
      st->rows += M;
      st->active += active;
      st->neurons += M * K;
    }
  };
  const int64_t chunks = W.Np / 64;
  if (M >= SPARSE_ROWS_MIN && dp.k.sparse_rows && is_block(fmt)) {
    // several rows: their active neurons together cover most blocks, so the layout is read
    // once as a dense product; the kernel needs only which blocks some row of a pass uses (it
    // finds each row's nonzero activations itself). At most SPARSE_ROWS_MAX rows a pass, so
    // the accumulators stay bounded (a long prompt scored in one forward); tasks of 512
    // outputs, so each neuron row is read in long runs.
    const int64_t per = std::min(M, SPARSE_ROWS_MAX) * 1024;  // floats of one thread's accumulators
    float* acc = grow(w.acc, at::get_num_threads() * per + 16);
    acc += (16 - ((uintptr_t)acc / 4) % 16) % 16;  // 64-byte aligned
    uint8_t* live = grow(w.live, nb);
    int64_t active = 0;
    for (int64_t m0 = 0; m0 < M; m0 += SPARSE_ROWS_MAX) {
      const int64_t rows = std::min(SPARSE_ROWS_MAX, M - m0);
      const int8_t* q = w.q.data() + m0 * K;
      for (int64_t b = 0; b < nb; b++) {
        int32_t n = 0;  // branch-free: the zeros are random, a branch would mispredict
        for (int64_t m = 0; m < rows; m++)
          for (int64_t i = m * K + 32 * b; i < m * K + 32 * b + 32; i++) n += q[i] != 0;
        live[b] = n > 0;
        active += n;
      }
      const QAct qa{q, w.d.data() + m0 * (K / bs), w.s16.data() + m0 * (K / 16), K, bs};
      parallel_run(chunks, 8, [&](int64_t c0, int64_t c1, int tid) {
        dp.k.sparse_rows(W, qa, rows, live, c0, c1, y + m0 * ldy, ldy, acc + tid * per);
      });
    }
    count(active);
    return;
  }
  int32_t* idx = grow(w.idx, M * K);
  int32_t* start = grow(w.start, M * (nb + 1));
  int64_t active = 0;
  for (int64_t m = 0; m < M; m++) {  // active neurons: non-zero quantised (or float) activations
    int32_t n = 0;
    int32_t* ix = idx + m * K;
    int32_t* st_m = start + m * (nb + 1);
    const int8_t* q = is_block(fmt) ? w.q.data() + m * K : nullptr;
    const float* ar = av + m * K;
    for (int64_t b = 0; b < nb; b++) {
      st_m[b] = n;
      for (int64_t i = 32 * b; i < 32 * b + 32; i++)
        if (q ? q[i] != 0 : ar[i] != 0.f) ix[n++] = (int32_t)i;
    }
    st_m[nb] = n;
    active += n;
  }
  count(active);
  // one activation row: a contiguous share of the outputs per thread, so each active neuron's
  // row is read in one long segment (DRAM and the prefetchers favour few long runs)
  parallel(chunks, M == 1 ? ceil_div(chunks, at::get_num_threads()) : 1, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = c0 * 64, j1 = std::min(N, c1 * 64);
    for (int64_t m = 0; m < M; m++) {
      const int32_t* st_m = start + m * (nb + 1);
      if (is_block(fmt)) {
        const ActiveList act{idx + m * K, st_m};
        dp.k.sparse_q(W, w.q.data() + m * K, w.d.data() + m * (K / bs), w.s16.data() + m * (K / 16), act, j0, j1,
                      y + m * ldy);
      } else {
        dp.k.sparse_f(W, av + m * K, idx + m * K, st_m[nb], j0, j1, y + m * ldy);
      }
    }
  });
}

void Mat::row(int64_t r, float* out) const {
  const uint8_t* base = data.data_ptr<uint8_t>();
  TORCH_CHECK(!sparse && groups == 1, "plm: row access needs an ungrouped tile-layout matrix");
  if (is_block(fmt)) return dequant_tile_row(fmt, base, K, r, out);
  for (int64_t k = 0; k < K; k++) {
    const int64_t i = r * K + k;
    out[k] = fmt == F32 ? ((const float*)base)[i]
             : fmt == F16 ? fp16_to_fp32(((const uint16_t*)base)[i]) : bf16_to_fp32(((const uint16_t*)base)[i]);
  }
}

// ---- attention ----------------------------------------------------------------------------
// vdpbf16ps attention needs (k, k+1) and (r, r+1) pairs
static bool bf16_attention(const Dispatch& dp, bool cache_bf16, int64_t D, int64_t rank) {
  return dp.bf16_dp && cache_bf16 && D % 2 == 0 && rank % 2 == 0;
}

// AMX attention: the score tiles take 32 values of a cached row, the value tiles 16 latent dims
static bool amx_attention(const Dispatch& dp, bool cache_bf16, int64_t D, int64_t rank) {
  return dp.amx && cache_bf16 && D % 32 == 0 && rank % 16 == 0;
}

int64_t attention_scratch_floats(int64_t nh, int64_t D, int64_t rank) {
  return std::max({attn_scratch_floats(nh, D), attention_bf16_scratch_floats(D, rank),
                   attention_amx_scratch_floats(D, rank)});
}

void attention(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache, bool cache_bf16, int64_t S,
               int64_t part, float scale, float* out, float* lse, float* scratch) {
  const Dispatch& dp = dispatch();
  if (amx_attention(dp, cache_bf16, D, rank))
    return attention_amx_bf16(q, nh, D, rank, (const uint16_t*)cache, S, part, scale, out, lse, scratch);
  if (bf16_attention(dp, cache_bf16, D, rank))
    return attention_avx512bf16(q, nh, D, rank, (const uint16_t*)cache, S, part, scale, out, lse, scratch);
  dp.k.attention(q, nh, D, rank, cache, cache_bf16, S, part, scale, out, lse, scratch);
}

// ---- operators -----------------------------------------------------------------------------
namespace {

at::Tensor as_f32_2d(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "plm: ", what, " expects [M, ", K, "] activations, got ", x.sizes());
  return x.to(at::kFloat).contiguous();
}

at::Tensor op_gemv(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K, const at::Tensor& x, int64_t groups) {
  const Mat m = make_mat(packed, fmt, N, K, groups, false);
  const at::Tensor xf = as_f32_2d(x, K, "gemv");
  TORCH_CHECK(xf.size(0) % groups == 0, "plm: gemv: ", xf.size(0), " activation rows for ", groups, " groups");
  const int64_t M = xf.size(0) / groups;
  at::Tensor y = at::empty({M, N}, at::kFloat);
  Work w;
  m.forward(xf.data_ptr<float>(), M, y.data_ptr<float>(), N, w);
  return y;
}

at::Tensor op_sparse_gemv(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K, const at::Tensor& a) {
  const Mat m = make_mat(packed, fmt, N, K, 1, true);
  const at::Tensor af = as_f32_2d(a, K, "sparse_gemv");
  at::Tensor y = at::empty({af.size(0), N}, at::kFloat);
  Work w;
  m.forward_sparse(af.data_ptr<float>(), af.size(0), y.data_ptr<float>(), N, w, nullptr);
  return y;
}

at::Tensor op_pack(const at::Tensor& raw, int64_t fmt, int64_t N, int64_t K, int64_t groups) {
  TORCH_CHECK(groups >= 1 && N % groups == 0, "plm: pack: ", N, " rows do not split into ", groups, " groups");
  if (groups == 1) return pack_tiles(raw, (int)fmt, N, K);
  const at::Tensor r2 = raw.contiguous().view({groups, -1});
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < groups; g++) parts.push_back(pack_tiles(r2[g], (int)fmt, N / groups, K));
  return at::cat(parts);
}

at::Tensor op_dequantize(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K, int64_t groups, bool sparse) {
  if (sparse) return dequant_sparse(make_mat(packed, fmt, N, K, 1, true).data, (int)fmt, N, K);
  const Mat m = make_mat(packed, fmt, N, K, groups, false);
  at::Tensor out = at::empty({N, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const int64_t ng = m.Ng();
  for (int64_t g = 0; g < groups; g++) {
    const Mat part = make_mat(packed.reshape({-1}).narrow(0, g * (m.nbytes() / groups), m.nbytes() / groups).contiguous(), fmt, ng, K, 1,
                              false);
    for (int64_t r = 0; r < ng; r++) part.row(r, o + (g * ng + r) * K);
  }
  return out;
}

at::Tensor op_attention(const at::Tensor& q, const at::Tensor& cache, int64_t rank, double scale) {
  TORCH_CHECK(q.dim() == 2 && cache.dim() == 2 && q.size(1) == cache.size(1), "plm: attention expects q [H, D] and "
              "cache [S, D]");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
              "plm: attention cache must be float32 or bfloat16");
  const at::Tensor qf = q.to(at::kFloat).contiguous(), c = cache.contiguous();
  const int64_t H = q.size(0), D = q.size(1), S = cache.size(0);
  TORCH_CHECK(rank > 0 && rank <= D, "plm: attention rank ", rank, " outside [1, ", D, "]");
  at::Tensor out = at::empty({H, rank}, at::kFloat);
  std::vector<float> scratch(attention_scratch_floats(H, D, rank));
  attention(qf.data_ptr<float>(), H, D, rank, c.data_ptr(), c.scalar_type() == at::kBFloat16, S, std::max<int64_t>(S, 1),
            (float)scale, out.data_ptr<float>(), nullptr, scratch.data());
  return out;
}

// G multiply-adds per second of a register-only `vpdpbusd` loop on `threads` threads at once.
double op_vnni_peak(int64_t threads, double seconds) {
  TORCH_CHECK(supports("avx512"), "plm: vnni_peak needs AVX-512 VNNI (this CPU has: ", cpu_features(), ")");
  TORCH_CHECK(threads >= 1 && seconds > 0, "plm: vnni_peak needs threads >= 1 and seconds > 0");
  int64_t macs = 0, iters = 1 << 16;  // calibrate on one thread to about `seconds`
  while (vnni_loop_seconds(iters, &macs) < seconds / 8 && iters < (int64_t(1) << 40)) iters *= 2;
  iters = (int64_t)(iters * 8 * 0.9);
  std::vector<double> rate(threads);
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; t++)
    pool.emplace_back([&rate, iters, t] {
      int64_t n = 0;
      const double dt = vnni_loop_seconds(iters, &n);
      rate[t] = (double)n / dt;
    });
  for (auto& th : pool) th.join();
  double total = 0;
  for (double r : rate) total += r;
  return total / 1e9;
}

std::string op_isa() {
  const Dispatch& dp = dispatch();
  return dp.isa + (dp.bf16_dp ? "+bf16" : "");
}

}  // namespace
}  // namespace plm

TORCH_LIBRARY(plm, m) {
  m.def("isa() -> str", &plm::op_isa);
  m.def("set_isa(str name) -> ()", [](const std::string& n) { plm::set_isa(n); });
  m.def("cpu_features() -> str", &plm::cpu_features);
  m.def("quantize(Tensor w, int fmt) -> Tensor", [](const at::Tensor& w, int64_t f) { return plm::quantize_blocks(w, (int)f); });
  m.def("pack(Tensor raw, int fmt, int N, int K, int groups=1) -> Tensor", &plm::op_pack);
  m.def("pack_sparse(Tensor raw, int fmt, int N, int K) -> Tensor",
        [](const at::Tensor& r, int64_t f, int64_t N, int64_t K) { return plm::pack_sparse(r, (int)f, N, K); });
  m.def("dequantize(Tensor packed, int fmt, int N, int K, int groups=1, bool sparse=False) -> Tensor", &plm::op_dequantize);
  m.def("gemv(Tensor packed, int fmt, int N, int K, Tensor x, int groups=1) -> Tensor", &plm::op_gemv);
  m.def("sparse_gemv(Tensor packed, int fmt, int N, int K, Tensor a) -> Tensor", &plm::op_sparse_gemv);
  m.def("attention(Tensor q, Tensor cache, int rank, float scale) -> Tensor", &plm::op_attention);
  m.def("vnni_peak(int threads, float seconds) -> float", &plm::op_vnni_peak);
}
