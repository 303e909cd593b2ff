// Torch-side internals shared by ops.cpp, pack.cpp and decoder.cpp (baseline ISA only).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "plm_kernels.h"

namespace plm {

// ---- dispatch -------------------------------------------------------------------------
struct Dispatch {
  Kernels k;                 // merged table of the selected path
  std::string isa;           // "amx", "avx512", "avx2" or "scalar"
  bool bf16_dp = false;      // AVX512-BF16 vdpbf16ps for BF16 weights
  bool amx = false;          // AMX-BF16 tiles for BF16 weights (kernels_amx.cpp)
};
const Dispatch& dispatch();
void set_isa(const std::string& name);  // throws if the CPU lacks it
std::string cpu_features();
void gemv_bf16_avx512bf16(const void* W, int64_t K, int64_t n0, int64_t n1, const uint16_t* xb, int64_t M, float* y,
                          int64_t ldy);
void attention_avx512bf16(const float* q, int64_t nh, int64_t D, int64_t rank, const uint16_t* cache, int64_t S,
                          int64_t part, float scale, float* out, float* lse, float* scratch);
int64_t attention_bf16_scratch_floats(int64_t D, int64_t rank);
// y[m][n] for n in [n0, n1) (n0 a multiple of 16) of a group of `rows` weight rows, K % 32 == 0;
// xp: activations packed as kernels_amx.cpp says; wtail: the last rows % 16 rows, zero-padded
void gemm_bf16_amx(const uint16_t* W, int64_t K, int64_t rows, int64_t n0, int64_t n1, const uint32_t* xp, int64_t M,
                   const uint16_t* wtail, float* y, int64_t ldy);
// Absorbed-MLA attention over a bf16 cache on AMX tiles (D % 32 == 0, rank % 16 == 0); the
// arguments as Kernels::attention's, scratch attention_amx_scratch_floats(D, rank) floats
void attention_amx_bf16(const float* q, int64_t nh, int64_t D, int64_t rank, const uint16_t* cache, int64_t S,
                        int64_t part, float scale, float* out, float* lse, float* scratch);
int64_t attention_amx_scratch_floats(int64_t D, int64_t rank);
bool amx_compiled();  // false where the compiler had no AMX (the unit is a stub)
// `vpdpbusd` multiply-adds one thread issues in `iters` loop turns of a register-only loop
// (the compute roofline of the block formats); returns its seconds
double vnni_loop_seconds(int64_t iters, int64_t* macs);

// Absorbed-MLA attention on the selected path (the kernel table's entry, or the AVX512-BF16
// kernel for a bf16 cache when the CPU has it); the arguments as Kernels::attention's.
void attention(const float* q, int64_t nh, int64_t D, int64_t rank, const void* cache, bool cache_bf16, int64_t S,
               int64_t part, float scale, float* out, float* lse, float* scratch);
int64_t attention_scratch_floats(int64_t nh, int64_t D, int64_t rank);

// ---- threads ------------------------------------------------------------------------
// fn(begin, end, thread index) over [0, total) in chunks of `grain`, on the caller and the
// pool's workers (pool.cpp); thread indices are in [0, torch.get_num_threads()).
using ParallelFn = std::function<void(int64_t, int64_t, int)>;
void parallel_run(int64_t total, int64_t grain, const ParallelFn& fn);

// ---- formats --------------------------------------------------------------------------
bool is_block(int fmt);            // Q8_0, Q4_0, Q4_K, Q5_K, Q6_K
bool is_float(int fmt);            // F32, F16, BF16
int block_size(int fmt);           // inputs per GGUF block (1 for float formats)
int64_t row_bytes(int fmt, int64_t K);  // GGUF bytes of one row of K inputs
int act_block(int fmt);            // activation quantisation block: 32 or 256
std::string format_name(int fmt);
void check_shape(int fmt, int64_t N, int64_t K, const char* what);

// GGUF blocks [N, row_bytes] -> tile layout (block formats) or a contiguous copy (float).
at::Tensor pack_tiles(const at::Tensor& raw, int fmt, int64_t N, int64_t K);
// A zero-filled byte buffer for packed block-format weights: from 4 MiB on, on 2 MiB transparent
// huge pages where Linux grants them (pack.cpp says why; PLM_HUGE_PAGES=0 keeps 4 KiB pages)
at::Tensor weight_buffer(int64_t bytes);
// GGUF blocks -> neuron-major layout for the sparse down projection.
at::Tensor pack_sparse(const at::Tensor& raw, int fmt, int64_t N, int64_t K);
// Packed tiles -> float [N, K] (tests; embedding rows).
void dequant_tile_row(int fmt, const uint8_t* tiles, int64_t K, int64_t row, float* out);
// float [N, K] -> GGUF blocks (Q8_0, Q4_0, Q4_K; F32/F16/BF16 casts).
at::Tensor quantize_blocks(const at::Tensor& w, int fmt);
// Neuron-major layout -> float [N, K] (tests).
at::Tensor dequant_sparse(const at::Tensor& packed, int fmt, int64_t N, int64_t K);

// ---- matrices -------------------------------------------------------------------------
struct Work {  // scratch reused across calls (grows, never shrinks)
  std::vector<int8_t> q;
  std::vector<float> d, xf, acc;
  std::vector<int32_t> s16, idx, start;
  std::vector<uint8_t> live;
  std::vector<uint16_t> xb;
  std::vector<uint32_t> xp;
};

// From this many activation rows on, the sparse layout is multiplied as a dense product
// (Kernels::sparse_rows); fewer rows walk their own active neurons, reading nothing else.
constexpr int64_t SPARSE_ROWS_MIN = 6, SPARSE_ROWS_MAX = 256;  // rows per pass of that product

struct SparseStats {
  int64_t rows = 0, active = 0, neurons = 0;
};

// One weight matrix y = x W^T, W [N, K] in `fmt`, packed. `groups` > 1: N = groups * Ng rows
// where group g is multiplied by its own activation rows (absorbed MLA's per-head matrices);
// tile formats pack each group separately (padded to whole tiles).
struct Mat {
  at::Tensor data;
  int fmt = -1;
  int64_t N = 0, K = 0, groups = 1;
  bool sparse = false;  // neuron-major layout (down projection)
  bool amx = false;     // BF16 on AMX tiles where the path has them (make_mat: K % 32 == 0, size)
  at::Tensor amx_tail;  // amx and rows % 16: each group's last rows, zero-padded to 16 (a tile load)

  bool defined() const { return fmt >= 0; }
  int64_t Ng() const { return N / groups; }
  int64_t tiles_per_group() const { return ceil_div(Ng(), TILE); }
  int64_t tile_bytes() const;
  int64_t nbytes() const { return data.defined() ? data.numel() * data.element_size() : 0; }
  // x [groups][M][K] (group-major), y [M][N] row stride ldy. bf16_x: x already rounded.
  void forward(const float* x, int64_t M, float* y, int64_t ldy, Work& w) const;
  void forward_amx(const uint16_t* xb, int64_t M, float* y, int64_t ldy, Work& w) const;  // BF16 on AMX tiles
  // sparse layout: y [M][N] from a [M][K], skipping zero (quantised) activations
  void forward_sparse(const float* a, int64_t M, float* y, int64_t ldy, Work& w, SparseStats* st) const;
  void row(int64_t r, float* out) const;  // dequantised row r (embedding lookup)
};

Mat make_mat(const at::Tensor& data, int64_t fmt, int64_t N, int64_t K, int64_t groups, bool sparse);

}  // namespace plm
