// The whole PLM forward for decode and prefill in C++ (torch.classes.plm.Decoder): embedding,
// per layer RMSNorm, stacked q/kv_a projection, latent RMSNorm, interleaved RoPE, absorbed MLA
// against per-sequence latent caches, o_proj, RMSNorm, up_proj, relu², (sparse) down_proj,
// residuals; final norm and the tied lm_head. Python makes one call per step.
//
// Rows are tokens: a decode step has one row per sequence, a prefill chunk T rows of one
// sequence at consecutive positions. Every row writes its cache entry before attending, and
// row r attends to its sequence's positions [0, pos_r], so a prefill chunk is causal and equals
// T decode steps (block formats: bit for bit, since each row's arithmetic is independent of
// the batch).
#include <ATen/Parallel.h>

#include <cmath>
#include <unordered_map>

#include "plm_native.h"

namespace plm {
namespace {

constexpr int64_t ATTN_PART = 256;  // cached rows per attention part (native_decoder.py: ATTN_PART)

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
  const float r = 1.f / std::sqrt((float)(ss / n) + eps);
  for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

// u = relu(u)^2 with the sign bit as a mask: the signs are random, so the branch GCC makes
// of a comparison mispredicts half the time; this form vectorises.
void relu2(float* u, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t b;
    memcpy(&b, u + i, 4);
    b &= ~(uint32_t)((int32_t)b >> 31);
    float v;
    memcpy(&v, &b, 4);
    u[i] = v * v;
  }
}

// Interleaved pairs (x[2i], x[2i+1]) rotated by pos * inv_freq[i] (llama.cpp's NORM rope).
void rope(float* x, int64_t dim, const float* cs /*[dim/2][2]: cos, sin*/) {
  for (int64_t i = 0; i < dim / 2; i++) {
    const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

}  // namespace

struct Layer {
  at::Tensor ln1, ln2, kvn;
  std::vector<Mat> qa;  // parts whose outputs are concatenated: [H*(nope+rope) | rank | rope]
  Mat wuk, wuv, o, up, down;
};

struct Seq {
  at::Tensor cache;  // [layers][cap][D], f32 or bf16
  int64_t len = 0, cap = 0;
};

class Decoder : public torch::CustomClassHolder {
 public:
  Decoder(int64_t layers, int64_t hidden, int64_t heads, int64_t nope, int64_t rope, int64_t vdim, int64_t rank,
          int64_t inter, int64_t vocab, double eps, double scale, at::Tensor inv_freq, bool cache_bf16,
          int64_t capacity)
      : L_(layers), d_(hidden), H_(heads), nope_(nope), rope_(rope), vd_(vdim), R_(rank), I_(inter), V_(vocab),
        eps_((float)eps), scale_((float)scale), cache_bf16_(cache_bf16), capacity_(std::max<int64_t>(capacity, 1)) {
    TORCH_CHECK(layers > 0 && hidden > 0 && heads > 0 && nope > 0 && rope > 0 && rope % 2 == 0 && vdim > 0 &&
                    rank > 0 && inter > 0 && vocab > 0,
                "plm.Decoder: invalid shape");
    TORCH_CHECK(inv_freq.numel() == rope / 2, "plm.Decoder: inv_freq needs ", rope / 2, " values");
    inv_freq_ = inv_freq.to(at::kFloat).contiguous();
    layers_.resize(layers);
    D_ = rank + rope;
  }

  void set_vector(int64_t layer, const std::string& name, const at::Tensor& v) {
    const at::Tensor f = v.to(at::kFloat).contiguous().clone();
    auto need = [&](int64_t n) {
      TORCH_CHECK(f.numel() == n, "plm.Decoder: ", name, " of layer ", layer, " needs ", n, " values, got ", f.numel());
    };
    if (layer < 0) {
      TORCH_CHECK(name == "norm", "plm.Decoder: unknown global vector ", name);
      need(d_);
      norm_ = f;
      return;
    }
    Layer& l = at_layer(layer);
    if (name == "ln1") { need(d_); l.ln1 = f; }
    else if (name == "ln2") { need(d_); l.ln2 = f; }
    else if (name == "kv_norm") { need(R_); l.kvn = f; }
    else TORCH_CHECK(false, "plm.Decoder: unknown vector ", name);
  }

  void add_matrix(int64_t layer, const std::string& name, const at::Tensor& data, int64_t fmt, int64_t N, int64_t K,
                  int64_t groups, bool sparse) {
    Mat m = make_mat(data, fmt, N, K, groups, sparse);
    auto need = [&](int64_t n, int64_t k, int64_t g) {
      TORCH_CHECK(N == n && K == k && groups == g, "plm.Decoder: ", name, " of layer ", layer, " must be [", n, ", ",
                  k, "] in ", g, " groups, got [", N, ", ", K, "] in ", groups);
      TORCH_CHECK(!sparse || name == "down", "plm.Decoder: only down may use the sparse layout");
    };
    if (layer < 0) {
      TORCH_CHECK(name == "embed", "plm.Decoder: unknown global matrix ", name);
      need(V_, d_, 1);
      embed_ = m;
      return;
    }
    Layer& l = at_layer(layer);
    if (name == "qa") {
      TORCH_CHECK(K == d_ && groups == 1 && !sparse, "plm.Decoder: qa parts must be [*, ", d_, "]");
      l.qa.push_back(m);
    } else if (name == "wuk") { need(H_ * R_, nope_, H_); l.wuk = m; }
    else if (name == "wuv") { need(H_ * vd_, R_, H_); l.wuv = m; }
    else if (name == "o") { need(d_, H_ * vd_, 1); l.o = m; }
    else if (name == "up") { need(I_, d_, 1); l.up = m; }
    else if (name == "down") { need(d_, I_, 1); l.down = m; }
    else TORCH_CHECK(false, "plm.Decoder: unknown matrix ", name);
  }

  // The packed matrices of a layer (-1: the embedding / lm_head) in the order the step runs
  // them, each as (name, data, [fmt, N, K, groups, sparse]): the benchmark times the very
  // matrices the step reads.
  std::vector<std::tuple<std::string, at::Tensor, std::vector<int64_t>>> matrices(int64_t layer) {
    std::vector<std::tuple<std::string, at::Tensor, std::vector<int64_t>>> out;
    auto add = [&](const std::string& n, const Mat& m) {
      out.emplace_back(n, m.data, std::vector<int64_t>{m.fmt, m.N, m.K, m.groups, m.sparse});
    };
    if (layer < 0) {
      add("embed", embed_);
      return out;
    }
    const Layer& l = at_layer(layer);
    for (const Mat& m : l.qa) add("qa", m);
    add("wuk", l.wuk);
    add("wuv", l.wuv);
    add("o", l.o);
    add("up", l.up);
    add("down", l.down);
    return out;
  }

  // Everything present with consistent shapes; call once after loading.
  void check() {
    TORCH_CHECK(embed_.defined() && norm_.defined(), "plm.Decoder: embedding or final norm missing");
    for (int64_t i = 0; i < L_; i++) {
      const Layer& l = layers_[i];
      int64_t nqa = 0;
      for (const Mat& m : l.qa) nqa += m.N;
      TORCH_CHECK(nqa == qa_width(), "plm.Decoder: layer ", i, " qa parts give ", nqa, " outputs, expected ", qa_width());
      TORCH_CHECK(l.ln1.defined() && l.ln2.defined() && l.kvn.defined() && l.wuk.defined() && l.wuv.defined() &&
                      l.o.defined() && l.up.defined() && l.down.defined(),
                  "plm.Decoder: layer ", i, " is incomplete");
    }
    ready_ = true;
  }

  int64_t new_sequence() {
    const int64_t id = next_id_++;
    Seq& s = seqs_[id];
    alloc(s, capacity_);
    return id;
  }
  void free_sequence(int64_t id) { TORCH_CHECK(seqs_.erase(id) == 1, "plm.Decoder: no sequence ", id); }
  int64_t length(int64_t id) { return seq(id).len; }
  int64_t kv_bytes(int64_t id) { return seq(id).len * L_ * D_ * (cache_bf16_ ? 2 : 4); }
  void reserve(int64_t id, int64_t n) { grow_cache(seq(id), n); }
  // Drop the cache after `n` positions (e.g. to re-run a prompt suffix).
  void truncate(int64_t id, int64_t n) {
    Seq& s = seq(id);
    TORCH_CHECK(n >= 0 && n <= s.len, "plm.Decoder: truncate to ", n, " outside [0, ", s.len, "]");
    s.len = n;
  }

  // Start sequence `dst` (empty) with a copy of the first `n` positions of `src`'s cache: a
  // prompt that begins as another sequence's does skips that part of its prefill. Rows are
  // computed independently, so the copy equals what a prefill of those tokens would write.
  void copy_prefix(int64_t dst, int64_t src, int64_t n) {
    TORCH_CHECK(dst != src, "plm.Decoder: copy_prefix needs two sequences");
    Seq& s = seq(src);
    Seq& d = seq(dst);
    TORCH_CHECK(d.len == 0, "plm.Decoder: copy_prefix into sequence ", dst, ", which is not empty");
    TORCH_CHECK(n >= 0 && n <= s.len, "plm.Decoder: copy_prefix of ", n, " positions outside [0, ", s.len, "]");
    grow_cache(d, n);
    if (n) d.cache.narrow(1, 0, n).copy_(s.cache.narrow(1, 0, n));
    d.len = n;
  }

  int64_t weight_bytes() {
    int64_t n = embed_.nbytes() + 4 * d_;
    for (const Layer& l : layers_) {
      for (const Mat& m : l.qa) n += m.nbytes();
      n += l.wuk.nbytes() + l.wuv.nbytes() + l.o.nbytes() + l.up.nbytes() + l.down.nbytes() + 4 * (2 * d_ + R_);
    }
    return n;
  }

  // One decode step: tokens [B] appended to sequences seqs [B] (distinct); logits [B, V].
  at::Tensor step(const at::Tensor& seq_ids, const at::Tensor& tokens) {
    const at::Tensor t = tokens.to(at::kLong).contiguous();
    TORCH_CHECK(seq_ids.dim() == 1 && t.dim() == 1 && seq_ids.numel() == t.numel(),
                "plm.Decoder.step: expected equal-length 1-D sequence ids and tokens");
    return segments(seq_ids, at::ones({t.numel()}, at::kLong), t);
  }

  // One forward over segments: counts[i] tokens appended to sequence seq_ids[i] (distinct), so a
  // continuous-batching iteration runs its decode rows and a prompt chunk together and reads
  // the weights once. Rows are independent (see the top of the file): the result equals the
  // segments run apart. Logits [S, V] of each segment's last token.
  at::Tensor segments(const at::Tensor& seq_ids, const at::Tensor& counts, const at::Tensor& tokens) {
    TORCH_CHECK(ready_, "plm.Decoder: call check() after loading the weights");
    const at::Tensor s = seq_ids.to(at::kLong).contiguous(), n = counts.to(at::kLong).contiguous(),
                     t = tokens.to(at::kLong).contiguous();
    TORCH_CHECK(s.dim() == 1 && n.dim() == 1 && t.dim() == 1 && s.numel() == n.numel() && s.numel() > 0,
                "plm.Decoder.segments: expected equal-length 1-D sequence ids and counts, and 1-D tokens");
    const int64_t S = s.numel();
    const int64_t *sid = s.data_ptr<int64_t>(), *cnt = n.data_ptr<int64_t>();
    std::vector<Seq*> seqs(S);
    std::vector<int64_t> last(S);
    int64_t M = 0;
    for (int64_t i = 0; i < S; i++) {
      TORCH_CHECK(cnt[i] > 0, "plm.Decoder.segments: segment ", i, " (sequence ", sid[i], ") has ", cnt[i], " tokens");
      seqs[i] = &seq(sid[i]);
      for (int64_t c = 0; c < i; c++)
        TORCH_CHECK(seqs[c] != seqs[i], "plm.Decoder.segments: sequence ", sid[i], " appears twice");
      M += cnt[i];
      last[i] = M - 1;
    }
    TORCH_CHECK(t.numel() == M, "plm.Decoder.segments: counts add up to ", M, " tokens, got ", t.numel());
    std::vector<Seq*> rows;
    std::vector<int64_t> pos;
    rows.reserve(M);
    pos.reserve(M);
    for (int64_t i = 0; i < S; i++) {
      grow_cache(*seqs[i], seqs[i]->len + cnt[i]);
      for (int64_t j = 0; j < cnt[i]; j++) {
        rows.push_back(seqs[i]);
        pos.push_back(seqs[i]->len + j);
      }
    }
    forward(rows, pos, t.data_ptr<int64_t>());
    for (int64_t i = 0; i < S; i++) seqs[i]->len += cnt[i];
    return logits(last);
  }

  // Prefill: tokens [T] appended to one sequence, in chunks; logits of the last token [V].
  at::Tensor prefill(int64_t id, const at::Tensor& tokens, int64_t chunk) {
    TORCH_CHECK(ready_, "plm.Decoder: call check() after loading the weights");
    const at::Tensor t = tokens.to(at::kLong).contiguous();
    TORCH_CHECK(t.dim() == 1 && t.numel() > 0, "plm.Decoder.prefill: expected a non-empty 1-D token tensor");
    Seq& s = seq(id);
    const int64_t T = t.numel();
    chunk = std::max<int64_t>(1, chunk);
    grow_cache(s, s.len + T);
    int64_t last = 0;
    for (int64_t c = 0; c < T; c += chunk) {
      const int64_t n = std::min(chunk, T - c);
      std::vector<Seq*> rows(n, &s);
      std::vector<int64_t> pos(n);
      for (int64_t i = 0; i < n; i++) pos[i] = s.len + i;
      forward(rows, pos, t.data_ptr<int64_t>() + c);
      s.len += n;
      last = n - 1;
    }
    return logits({last})[0];
  }

  // Tokens appended to one sequence in one forward, with the logits of every one of them [T, V]
  // (scoring a prompt: the log-probability of each token given those before it).
  at::Tensor prefill_all(int64_t id, const at::Tensor& tokens) {
    TORCH_CHECK(ready_, "plm.Decoder: call check() after loading the weights");
    const at::Tensor t = tokens.to(at::kLong).contiguous();
    TORCH_CHECK(t.dim() == 1 && t.numel() > 0, "plm.Decoder.prefill_all: expected a non-empty 1-D token tensor");
    Seq& s = seq(id);
    const int64_t n = t.numel();
    grow_cache(s, s.len + n);
    std::vector<Seq*> rows(n, &s);
    std::vector<int64_t> pos(n), all(n);
    for (int64_t i = 0; i < n; i++) pos[i] = s.len + i, all[i] = i;
    forward(rows, pos, t.data_ptr<int64_t>());
    s.len += n;
    return logits(all);
  }

  // sparse down projection counters: [rows, active neurons, neurons considered]
  std::vector<int64_t> sparse_stats() { return {stats_.rows, stats_.active, stats_.neurons}; }
  void reset_stats() { stats_ = SparseStats(); }

 private:
  int64_t qa_width() const { return H_ * (nope_ + rope_) + R_ + rope_; }

  Layer& at_layer(int64_t i) {
    TORCH_CHECK(i >= 0 && i < L_, "plm.Decoder: layer ", i, " outside [0, ", L_, ")");
    return layers_[i];
  }

  Seq& seq(int64_t id) {
    auto it = seqs_.find(id);
    TORCH_CHECK(it != seqs_.end(), "plm.Decoder: no sequence ", id);
    return it->second;
  }

  void alloc(Seq& s, int64_t cap) {
    // untouched capacity is address space, not resident memory
    s.cache = at::empty({L_, cap, D_}, cache_bf16_ ? at::kBFloat16 : at::kFloat);
    s.cap = cap;
  }

  void grow_cache(Seq& s, int64_t need) {
    if (need <= s.cap) return;
    const at::Tensor old = s.cache;
    alloc(s, std::max(need, 2 * s.cap));
    if (s.len) s.cache.narrow(1, 0, s.len).copy_(old.narrow(1, 0, s.len));
  }

  void write_cache(Seq& s, int64_t layer, int64_t pos, const float* c, const float* kr) {
    const int64_t off = (layer * s.cap + pos) * D_;
    if (cache_bf16_) {
      uint16_t* p = (uint16_t*)s.cache.data_ptr() + off;
      for (int64_t i = 0; i < R_; i++) p[i] = fp32_to_bf16(c[i]);
      for (int64_t i = 0; i < rope_; i++) p[R_ + i] = fp32_to_bf16(kr[i]);
    } else {
      float* p = s.cache.data_ptr<float>() + off;
      memcpy(p, c, R_ * sizeof(float));
      memcpy(p + R_, kr, rope_ * sizeof(float));
    }
  }

  void forward(const std::vector<Seq*>& rows, const std::vector<int64_t>& pos, const int64_t* tokens) {
    const int64_t M = (int64_t)rows.size(), d = d_, H = H_, R = R_, rd = rope_, nope = nope_, D = D_;
    const int64_t qh = nope + rd, nq = H * qh, nqa = qa_width();
    float* x = grow(x_, M * d);
    float* h = grow(h_, M * d);
    float* qa = grow(qa_, M * nqa);
    float* qn = grow(qn_, H * M * nope);
    float* qlat = grow(qlat_, M * H * R);
    float* qcat = grow(qcat_, M * H * D);
    float* olat = grow(olat_, H * M * R);
    float* ov = grow(ov_, M * H * vd_);
    float* u = grow(u_, M * std::max(I_, d));
    float* cs = grow(cs_, M * rd);
    for (int64_t r = 0; r < M; r++) {
      const int64_t id = tokens[r];
      TORCH_CHECK(id >= 0 && id < V_, "plm.Decoder: token id ", id, " outside the vocabulary [0, ", V_, ")");
      embed_.row(id, x + r * d);
      const float* f = inv_freq_.data_ptr<float>();
      for (int64_t i = 0; i < rd / 2; i++) {
        const float a = (float)pos[r] * f[i];
        cs[r * rd + 2 * i] = std::cos(a);
        cs[r * rd + 2 * i + 1] = std::sin(a);
      }
    }
    // Attention runs over fixed parts of ATTN_PART cached rows, merged by their log-sum-exp:
    // fixed so a row's arithmetic never depends on the batch or the thread count (a batched
    // step equals the rows alone, a prefill equals decode steps). Work items are (row, run of
    // parts) when rows are fewer than threads (a decode step: its parts spread over the
    // threads), else whole rows (a prefill chunk); each cached row is read once for all heads.
    const int64_t nt = at::get_num_threads();
    int64_t maxparts = 1;
    for (int64_t r = 0; r < M; r++) maxparts = std::max(maxparts, ceil_div(pos[r] + 1, ATTN_PART));
    const int64_t runs = M < nt ? std::min(maxparts, ceil_div(nt, M)) : 1;  // items per row
    const int64_t res = H * (R + 1);  // one part's result: out [H][R] | lse [H]
    const int64_t scr = attention_scratch_floats(H, D, R) + (runs > 1 ? 0 : maxparts * res);
    float* scratch = grow(attn_scratch_, nt * scr);
    float* part_out = runs > 1 ? grow(part_out_, M * maxparts * res) : nullptr;

    for (int64_t li = 0; li < L_; li++) {
      const Layer& l = layers_[li];
      for (int64_t r = 0; r < M; r++) rmsnorm(x + r * d, l.ln1.data_ptr<float>(), d, eps_, h + r * d);
      int64_t col = 0;
      for (const Mat& part : l.qa) {  // stacked projections write side by side
        part.forward(h, M, qa + col, nqa, work_);
        col += part.N;
      }
      for (int64_t r = 0; r < M; r++) {
        float* row = qa + r * nqa;
        float* c = row + nq;
        rmsnorm(c, l.kvn.data_ptr<float>(), R, eps_, c);  // in place: norm reads before writing
        rope(c + R, rd, cs + r * rd);
        write_cache(*rows[r], li, pos[r], c, c + R);
        for (int64_t hh = 0; hh < H; hh++) {
          float* q = row + hh * qh;
          rope(q + nope, rd, cs + r * rd);
          memcpy(qn + (hh * M + r) * nope, q, nope * sizeof(float));
          memcpy(qcat + (r * H + hh) * D + R, q + nope, rd * sizeof(float));
        }
      }
      l.wuk.forward(qn, M, qlat, H * R, work_);  // latent queries: q_nope @ W_UK per head
      for (int64_t r = 0; r < M; r++)
        for (int64_t hh = 0; hh < H; hh++) memcpy(qcat + (r * H + hh) * D, qlat + (r * H + hh) * R, R * sizeof(float));
      // parts [p0, p1) of row r's cache into a row buffer of `cap` parts: out [cap][H][R] | lse [cap][H]
      auto parts = [&](int64_t r, int64_t p0, int64_t p1, float* buf, int64_t cap, float* sc) {
        const int64_t t0 = p0 * ATTN_PART, t1 = std::min(pos[r] + 1, p1 * ATTN_PART);
        if (t1 <= t0) return;
        const Seq& s = *rows[r];
        const uint8_t* cache = (const uint8_t*)s.cache.data_ptr() + (li * s.cap + t0) * D * (cache_bf16_ ? 2 : 4);
        attention(qcat + r * H * D, H, D, R, cache, cache_bf16_, t1 - t0, ATTN_PART, scale_, buf + p0 * H * R,
                  buf + cap * H * R + p0 * H, sc);
      };
      if (runs > 1) {  // row r's buffer: part_out + r * maxparts * res
        parallel_run(M * runs, 1, [&](int64_t a, int64_t b, int tid) {
          for (int64_t it = a; it < b; it++) {
            const int64_t r = it / runs, k = it % runs, np = ceil_div(pos[r] + 1, ATTN_PART);
            parts(r, np * k / runs, np * (k + 1) / runs, part_out + r * maxparts * res, maxparts, scratch + tid * scr);
          }
        });
        for (int64_t r = 0; r < M; r++) merge_parts(part_out + r * maxparts * res, maxparts, ceil_div(pos[r] + 1, ATTN_PART), M, r, olat);
      } else {
        parallel_run(M, 1, [&](int64_t a, int64_t b, int tid) {
          float* sc = scratch + tid * scr;
          float* mine = sc + attention_scratch_floats(H, D, R);
          for (int64_t r = a; r < b; r++) {
            const int64_t np = ceil_div(pos[r] + 1, ATTN_PART);
            parts(r, 0, np, mine, np, sc);
            merge_parts(mine, np, np, M, r, olat);
          }
        });
      }
      l.wuv.forward(olat, M, ov, H * vd_, work_);  // attended latents @ W_UV per head
      l.o.forward(ov, M, h, d, work_);
      for (int64_t i = 0; i < M * d; i++) x[i] += h[i];
      for (int64_t r = 0; r < M; r++) rmsnorm(x + r * d, l.ln2.data_ptr<float>(), d, eps_, h + r * d);
      l.up.forward(h, M, u, I_, work_);
      relu2(u, M * I_);
      if (l.down.sparse) l.down.forward_sparse(u, M, h, d, work_, &stats_);
      else l.down.forward(u, M, h, d, work_);
      for (int64_t i = 0; i < M * d; i++) x[i] += h[i];
    }
  }

  // olat[h][M rows][R] row r = the attention parts' latents, each weighted by its share of
  // the softmax denominator (buf: out [cap][H][R] | lse [cap][H], np parts); one part: a copy
  void merge_parts(const float* buf, int64_t cap, int64_t np, int64_t M, int64_t r, float* olat) const {
    const int64_t H = H_, R = R_;
    const float* lse = buf + cap * H * R;
    for (int64_t hh = 0; hh < H; hh++) {
      float* o = olat + (hh * M + r) * R;
      if (np == 1) {
        memcpy(o, buf + hh * R, R * sizeof(float));
        continue;
      }
      float mx = -INFINITY;
      for (int64_t p = 0; p < np; p++) mx = std::max(mx, lse[p * H + hh]);
      std::fill(o, o + R, 0.f);
      float wsum = 0.f;
      for (int64_t p = 0; p < np; p++) {
        const float w = std::exp(lse[p * H + hh] - mx);
        wsum += w;
        const float* po = buf + (p * H + hh) * R;
        for (int64_t i = 0; i < R; i++) o[i] += w * po[i];
      }
      const float inv = 1.f / wsum;
      for (int64_t i = 0; i < R; i++) o[i] *= inv;
    }
  }

  // final norm + lm_head for the given rows of the last forward
  at::Tensor logits(const std::vector<int64_t>& which) {
    const int64_t n = (int64_t)which.size();
    float* h = grow(h_, n * d_);
    for (int64_t r = 0; r < n; r++) rmsnorm(x_.data() + which[r] * d_, norm_.data_ptr<float>(), d_, eps_, h + r * d_);
    at::Tensor out = at::empty({n, V_}, at::kFloat);
    embed_.forward(h, n, out.data_ptr<float>(), V_, work_);
    return out;
  }

  int64_t L_, d_, H_, nope_, rope_, vd_, R_, I_, V_, D_;
  float eps_, scale_;
  bool cache_bf16_;
  int64_t capacity_;
  bool ready_ = false;
  at::Tensor inv_freq_, norm_;
  Mat embed_;
  std::vector<Layer> layers_;
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
  SparseStats stats_;
  Work work_;
  std::vector<float> x_, h_, qa_, qn_, qlat_, qcat_, olat_, ov_, u_, cs_, attn_scratch_, part_out_;
};

}  // namespace plm

TORCH_LIBRARY_FRAGMENT(plm, m) {
  m.class_<plm::Decoder>("Decoder")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double,
                       at::Tensor, bool, int64_t>())
      .def("set_vector", &plm::Decoder::set_vector)
      .def("add_matrix", &plm::Decoder::add_matrix)
      .def("check", &plm::Decoder::check)
      .def("matrices", &plm::Decoder::matrices)
      .def("new_sequence", &plm::Decoder::new_sequence)
      .def("free_sequence", &plm::Decoder::free_sequence)
      .def("length", &plm::Decoder::length)
      .def("kv_bytes", &plm::Decoder::kv_bytes)
      .def("reserve", &plm::Decoder::reserve)
      .def("truncate", &plm::Decoder::truncate)
      .def("copy_prefix", &plm::Decoder::copy_prefix)
      .def("weight_bytes", &plm::Decoder::weight_bytes)
      .def("step", &plm::Decoder::step)
      .def("prefill", &plm::Decoder::prefill)
      .def("prefill_all", &plm::Decoder::prefill_all)
      .def("segments", &plm::Decoder::segments)
      .def("sparse_stats", &plm::Decoder::sparse_stats)
      .def("reset_stats", &plm::Decoder::reset_stats);
}
