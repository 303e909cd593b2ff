"""The edge runtime: PLM decode on CPU with a latent MLA cache, a sparse relu² MLP,
weight-only quantisation and layer-wise loading, in plain PyTorch ops.

* Latent KV cache (`--kv latent`, the default): per token and layer only the normalised
  latent c (kv_lora_rank values) and the roped shared key (qk_rope_head_dim values) are kept,
  576 values for PLM-1.8B against 5120 for a decompressed cache. At decode time kv_b_proj is
  absorbed: the query side computes q_nope @ W_UK per head (a 512-d "latent query"), scores
  are taken directly against the cached latents, the attention-weighted latent is mapped
  through W_UV per head, then o_proj. Prefill chunks, where decompressing is cheaper, use the
  ordinary form on the same cache. The cache is one preallocated buffer.
* Sparse MLP (`--sparse auto|on|off`): relu² makes most activations exactly zero; during
  decode only the down_proj rows of active neurons are read (one fused embedding-bag gather
  per row); with a fitted activation predictor (plm.infer.sparsity) up_proj rows are skipped
  too. `auto` falls back to the dense kernel when the active fraction is high.
* Quantisation (`--quant int8|int4`): plm.infer.quant.
* Layer-wise loading (`--memory-budget`): plm.infer.layerwise.

`edge_step_fn(runtime)` is the `StepFn` that plugs the runtime into plm.infer.generate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from plm.errors import PLMError
from plm.infer.layerwise import LayerStore, MappedCheckpoint, parse_budget
from plm.infer.quant import (QUANT_MODES, DenseEmbedding, DenseLinear, Linear,
                             QuantEmbedding, make_linear)
from plm.model.cache import FullCache, LatentCache
from plm.model.checkpoint import DTYPES, load_config, read_headers, validate_checkpoint
from plm.model.config import PLMConfig
from plm.model.modeling import build_attention_mask, rope_cos_sin

KV_MODES = ("latent", "full")
BACKENDS = ("auto", "native", "torch")
NATIVE_QUANT = ("q8_0", "q4_0", "q4_k", "q4_k_m", "q6_k")  # llama.cpp block formats (q4_k_m: its mix): native only
SPARSE_MODES = ("auto", "on", "off")

LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                 "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight")


@dataclass
class EdgeOptions:
    dtype: str = "bfloat16"  # activations and unquantised weights
    kv: str = "latent"  # latent | full
    sparse: str = "auto"  # auto | on | off
    # none | int8 | int4 (PyTorch's packed kernels, or the native Q8_0 / Q4_0 blocks) | q8_0 | q4_0 |
    # q4_k | q6_k | q4_k_m (llama.cpp's blocks, q4_k_m its Q4_K/Q6_K mix: the native kernels only)
    quant: str = "none"
    # auto: the native C++ decoder (plm.infer.native) when it is built and the options need nothing
    # only the PyTorch path has (kv full, a memory budget, a predictor, float16); torch | native
    backend: str = "auto"
    # auto: gather the rows of active neurons while they are at most this share of the matrix
    # (summed over decode rows), else run the dense kernel. With the predictor: compute only
    # predicted up_proj rows while they are at most this share.
    sparse_threshold: float = 0.9
    sparse_max_rows: int = 8  # decode rows (batch x new tokens) the sparse path handles
    predictor: str | Path | None = None  # plm.infer.sparsity predictor file: skip up_proj rows too
    memory_budget: int | str | None = None  # bytes ('2GB'): stream layers that do not fit
    prefill_chunk: int = 512
    threads: int | None = None

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PLMError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.kv not in KV_MODES:
            raise PLMError(f"unknown --kv {self.kv!r}; choose from {', '.join(KV_MODES)}")
        if self.sparse not in SPARSE_MODES:
            raise PLMError(f"unknown --sparse {self.sparse!r}; choose from {', '.join(SPARSE_MODES)}")
        if self.quant not in QUANT_MODES + NATIVE_QUANT:
            raise PLMError(f"unknown --quant {self.quant!r}; choose from {', '.join(QUANT_MODES + NATIVE_QUANT)}")
        if self.backend not in BACKENDS:
            raise PLMError(f"unknown --backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if not 0 < self.sparse_threshold <= 1:
            raise PLMError(f"sparse_threshold must be in (0, 1], got {self.sparse_threshold}")
        if self.prefill_chunk < 1:
            raise PLMError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def native_blockers(self, config: PLMConfig) -> list[str]:
        """What only the PyTorch path does, among these options (empty: native can run them)."""
        out = []
        if self.kv != "latent":
            out.append("--kv full")
        if self.memory_budget:
            out.append("--memory-budget (layer-wise loading)")
        if self.predictor:
            out.append("--predictor")
        if self.dtype in ("float16", "fp16"):
            out.append("float16 activations")
        if config.rope_scaling:
            out.append("rope_scaling")
        return out

    @property
    def native_format(self) -> str:
        """The native decoder's weight format for these options."""
        if self.quant == "none":
            return "f32" if self.dtype in ("float32", "fp32") else "bf16"
        return {"int8": "q8_0", "int4": "q4_0"}.get(self.quant, self.quant)


# ---------------------------------------------------------------------------------------
# caches


# ---------------------------------------------------------------------------------------
# sparse down projection


class RowDown:
    """down_proj stored neuron-major (row i = the d weights neuron i writes), so an active
    neuron's weights are one contiguous row. out[r] = sum_i a[r, i] * W^T[i] is an embedding
    bag with per-sample weights: only the rows listed are read. int8 rows use FBGEMM's
    row-wise 8-bit embedding bag (a float scale and bias per neuron row)."""

    def __init__(self, w_down: torch.Tensor, quant: str, dtype: torch.dtype) -> None:
        wt = w_down.t()
        self.dtype = dtype
        self.in_features, self.out_features = wt.shape
        self.int8 = quant in ("int8", "int4")
        if self.int8:
            self.w = torch.ops.quantized.embedding_bag_byte_prepack(wt.float().contiguous())
        else:
            self.w = wt.to(dtype).contiguous()
        self.threads = max(1, torch.get_num_threads())

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def bag(self, idx: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.int8:
            out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.w, idx, offsets, False, 0, False, weights.float(), None, False)
            return out.to(self.dtype)
        return F.embedding_bag(idx, self.w, offsets, mode="sum", per_sample_weights=weights.to(self.dtype))

    def gather(self, a: torch.Tensor, active: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """a [M, k], active [M, k] bool (a's non-zeros); idx [k] maps a's columns to neurons
        (None: all I neurons). Reads only the rows of active neurons."""
        M = a.shape[0]
        rows, cols = active.nonzero(as_tuple=True)
        weights = a[rows, cols]
        if idx is not None:
            cols = idx[cols]
        n = cols.numel()
        if n == 0:
            return torch.zeros(M, self.out_features, dtype=self.dtype)
        if M == 1:  # one bag per thread: bags run in parallel
            nb = min(self.threads, max(1, n // 64))
            offsets = torch.arange(nb) * (n // nb)
            out = self.bag(cols, weights, offsets)
            return out.sum(0, keepdim=True) if nb > 1 else out
        counts = active.sum(1)
        return self.bag(cols, weights, torch.cumsum(counts, 0) - counts)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """Dense a [M, I] @ W^T [I, d]: one row through the gather kernel over every neuron (the
        fastest dense read of this layout), several rows as a matrix product (int8 rows
        dequantised blockwise)."""
        if a.shape[0] == 1:
            return self.gather(a, torch.ones_like(a, dtype=torch.bool))
        if not self.int8:
            return a @ self.w
        out = torch.zeros(a.shape[0], self.out_features, dtype=torch.float32)
        for s in range(0, self.in_features, 1024):
            blk = self.w[s:s + 1024]
            q = blk[:, :-8].float()
            sb = blk[:, -8:].contiguous().view(torch.float32)  # [n, 2]: scale, bias
            out += a[:, s:s + 1024].float() @ (q * sb[:, :1] + sb[:, 1:])
        return out.to(self.dtype)


class StackedLinear(Linear):
    """Two projections of the same input, outputs concatenated (for streamed layers, whose
    weights are views of the file and are not copied into one matrix)."""

    def __init__(self, a: Linear, b: Linear) -> None:
        self.a, self.b = a, b
        self.out_features, self.in_features = a.out_features + b.out_features, a.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)

    def nbytes(self) -> int:
        return self.a.nbytes() + self.b.nbytes()


@dataclass
class Predictor:
    """Low-rank activation predictor for one layer: neuron i is predicted active when
    (x @ A @ B)[i] > -margin, x the MLP input (after its RMSNorm)."""

    A: torch.Tensor  # [d, r]
    B: torch.Tensor  # [r, I]
    margin: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B > -self.margin


# ---------------------------------------------------------------------------------------
# layers


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    kv_norm: torch.Tensor
    qa: Linear  # q_proj and kv_a_proj_with_mqa stacked: one matrix-vector product
    w_uk_t: torch.Tensor  # [H, rank, nope]: kv_b_proj's key half (transposed), absorbed into the query
    w_uv: torch.Tensor  # [H, v, rank]: kv_b_proj's value half, applied to the attended latent
    o: Linear
    up: Linear
    down: Linear | RowDown
    predictor: Predictor | None = None

    def nbytes(self) -> int:
        t = [self.ln1, self.ln2, self.kv_norm, self.w_uk_t, self.w_uv]
        n = sum(x.numel() * x.element_size() for x in t)
        return n + sum(m.nbytes() for m in (self.qa, self.o, self.up, self.down))


@dataclass
class SparseStats:
    decode_mlp_calls: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    active: int = 0  # sum over calls of active neurons (per row)
    neurons: int = 0  # sum over calls of neurons considered (per row)
    predicted: int = 0  # up_proj rows computed under the predictor

    def active_fraction(self) -> float:
        return self.active / self.neurons if self.neurons else float("nan")

    def as_dict(self) -> dict:
        return {"decode_mlp_calls": self.decode_mlp_calls, "sparse_calls": self.sparse_calls,
                "dense_calls": self.dense_calls, "active_fraction": self.active_fraction(),
                "predicted_rows_fraction": self.predicted / self.neurons if self.neurons else float("nan")}


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # one fused op (float accumulation, one rounding); the reference rounds twice in bf16
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm; for a batch of one, mm (about twice as fast on CPU for these decode shapes)."""
    return torch.mm(a[0], b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


class EdgeRuntime:
    """PLM inference for CPU decode. Build with `from_model` or `from_checkpoint`."""

    def __init__(self, config: PLMConfig, options: EdgeOptions, embed, final_norm: torch.Tensor,
                 layers: LayerStore) -> None:
        self.config, self.opts = config, options
        self.dtype = options.torch_dtype
        self.embed = embed
        self.final_norm = final_norm
        self.layers = layers
        self.ckpt: MappedCheckpoint | None = None
        self.stats = SparseStats()
        c = config
        self.H, self.nope, self.rope_dim, self.vdim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                       c.qk_rope_head_dim, c.v_head_dim)
        self.rank, self.eps, self.scale = c.kv_lora_rank, c.rms_norm_eps, c.softmax_scale

    # ---- construction -----------------------------------------------------------
    @staticmethod
    def _sparse_enabled(opts: EdgeOptions) -> bool:
        return opts.sparse != "off"

    @classmethod
    def _build_layer(cls, get, config: PLMConfig, opts: EdgeOptions, predictor: Predictor | None,
                     streamed: bool = False) -> LayerWeights:
        dt = opts.torch_dtype
        quant = "none" if streamed else opts.quant
        sparse = cls._sparse_enabled(opts) and not streamed
        up_quant = "int8" if (quant == "int4" and predictor is not None) else quant  # int4 has no row access
        down_w = get("mlp.down_proj.weight")
        if sparse:
            down = RowDown(down_w, quant, dt)
        else:
            down = make_linear(down_w, quant, dt)

        def vec(name):
            return get(name).to(dt).contiguous() if not streamed else get(name).to(dt)

        def lin_of(w, q=quant):
            if streamed and q == "none" and w.dtype == dt:
                return DenseLinear(w)  # zero-copy view of the mapped file
            return make_linear(w, q, dt)

        def lin(name, q=quant):
            return lin_of(get(name), q)

        H, nope = config.num_attention_heads, config.qk_nope_head_dim
        wq, wa = get("self_attn.q_proj.weight"), get("self_attn.kv_a_proj_with_mqa.weight")
        qa = make_linear(torch.cat([wq, wa]), quant, dt) if not streamed else StackedLinear(lin_of(wq), lin_of(wa))
        kvb = get("self_attn.kv_b_proj.weight").view(H, nope + config.v_head_dim, config.kv_lora_rank)
        return LayerWeights(
            ln1=vec("input_layernorm.weight"), ln2=vec("post_attention_layernorm.weight"),
            kv_norm=vec("self_attn.kv_a_layernorm.weight"),
            qa=qa,
            w_uk_t=kvb[:, :nope].transpose(1, 2).to(dt).contiguous(), w_uv=kvb[:, nope:].to(dt).contiguous(),
            o=lin("self_attn.o_proj.weight"),
            up=lin("mlp.up_proj.weight", up_quant), down=down,
            predictor=predictor if sparse else None)

    @classmethod
    def _from_getter(cls, config: PLMConfig, opts: EdgeOptions, get_global, get_layer,
                     ckpt: MappedCheckpoint | None = None, get_streamed=None) -> "EdgeRuntime":
        opts.validate()
        if opts.threads:
            torch.set_num_threads(opts.threads)
        dt = opts.torch_dtype
        if opts.quant != "none" and dt == torch.float16:
            raise PLMError("quantised weights run with bfloat16 or float32 activations, not float16")
        predictors = load_predictors(opts.predictor, config, dt) if opts.predictor else None
        emb_w = get_global("model.embed_tokens.weight")
        embed = QuantEmbedding(emb_w, dt) if opts.quant != "none" else DenseEmbedding(emb_w, dt)
        final_norm = get_global("model.norm.weight").to(dt).contiguous()

        def build(i: int, streamed: bool = False):
            getter = get_streamed if streamed else get_layer
            layer = cls._build_layer(lambda n: getter(i, n), config, opts,
                                     predictors[i] if predictors else None, streamed)
            return layer

        budget = parse_budget(opts.memory_budget)
        resident = None
        if budget is not None:
            if ckpt is None:
                raise PLMError("a memory budget needs a checkpoint directory to stream layers from")
            resident = _layers_within_budget(config, opts, ckpt, budget, embed.nbytes())
        store = LayerStore(config.num_hidden_layers, lambda i: [f"model.layers.{i}.{n}" for n in LAYER_TENSORS],
                           build, lambda i: build(i, streamed=True), ckpt, resident)
        return cls(config, opts, embed, final_norm, store)

    @classmethod
    def from_model(cls, model, options: EdgeOptions | None = None, **kw) -> "EdgeRuntime":
        """From an in-memory PLMForCausalLM (tests, or after training)."""
        opts = options or EdgeOptions(**kw)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        return cls._from_getter(model.config, opts, lambda n: sd[n],
                                lambda i, n: sd[f"model.layers.{i}.{n}"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, options: EdgeOptions | None = None, **kw) -> "EdgeRuntime":
        """From a checkpoint directory, read through mmap one tensor at a time (peak memory is
        the runtime's own weights, not a second full copy of the model)."""

        opts = options or EdgeOptions(**kw)
        opts.validate()
        config = load_config(path)
        ckpt = MappedCheckpoint(path)
        validate_checkpoint(path, config, read_headers(path))

        def get(name):  # resident weights: a private copy, then the file pages are released
            t = ckpt.view(name).clone()
            ckpt.release([name])
            return t

        rt = cls._from_getter(config, opts, get, lambda i, n: get(f"model.layers.{i}.{n}"), ckpt,
                              get_streamed=lambda i, n: ckpt.view(f"model.layers.{i}.{n}"))
        rt.ckpt = ckpt
        return rt

    # ---- sizes -------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of weights held resident (streamed layers excluded)."""
        return (self.embed.nbytes() + self.final_norm.numel() * self.final_norm.element_size()
                + sum(layer.nbytes() for layer in self.layers.resident))

    def new_cache(self, batch: int = 1, capacity: int | None = None):
        cap = capacity or self.config.max_position_embeddings
        cls = LatentCache if self.opts.kv == "latent" else FullCache
        return cls(self.config, batch, cap, self.dtype)

    # ---- forward -----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, cache,
                all_logits: bool = False) -> torch.Tensor:
        """Process new tokens ids [B, T] (mask [B, past+T] or None) into the cache; return the
        float32 logits of the last position [B, V] (all_logits: of every position, [B, T, V])."""
        B, T = ids.shape
        past = cache.length
        if mask is not None and mask.shape[1] != past + T:
            raise PLMError(f"mask covers {mask.shape[1]} positions, expected past ({past}) + new ({T})")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: plain causal attention
        cache.reserve(past + T)
        chunk = self.opts.prefill_chunk
        x, outs = None, []
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            x = self._forward_chunk(ids[:, s:e], None if mask is None else mask[:, :past + e], cache)
            if all_logits:
                outs.append(self.embed.logits(_rmsnorm(x, self.final_norm, self.eps)).float())
        if all_logits:
            return torch.cat(outs, dim=1)
        h = _rmsnorm(x[:, -1], self.final_norm, self.eps)
        return self.embed.logits(h).float()

    def _forward_chunk(self, ids: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        B, T = ids.shape
        past = cache.length
        if mask is None:
            pos = torch.arange(past, past + T).expand(B, T)
            attn_mask = None if T == 1 else build_attention_mask(None, T, past, ids.device)
        else:
            pos = (mask.long().cumsum(-1) - 1)[:, past:].clamp(min=0)
            attn_mask = build_attention_mask(mask, T, past, ids.device)  # [B, 1, T, S] bool
        cos, sin = rope_cos_sin(pos, self.rope_dim, self.config.rope_theta, torch.float32, self.config.rope_factor)
        freqs = torch.complex(cos, sin)  # [B, T, rope/2]: one rotation per interleaved pair
        x = self.embed.lookup(ids)
        for i in range(self.config.num_hidden_layers):
            layer = self.layers.get(i)
            x = x + self._attention(layer, i, _rmsnorm(x, layer.ln1, self.eps), freqs, attn_mask, cache,
                                    causal=mask is None and past == 0 and T > 1)
            x = x + self._mlp(layer, i, _rmsnorm(x, layer.ln2, self.eps))
            self.layers.done(i)
        cache.advance(T)
        return x

    def _attention(self, L: LayerWeights, li: int, h: torch.Tensor, freqs: torch.Tensor, attn_mask, cache,
                   causal: bool) -> torch.Tensor:
        B, T, d = h.shape
        H, nope, rd, R, vd = self.H, self.nope, self.rope_dim, self.rank, self.vdim
        M = B * T
        qa = L.qa(h.reshape(M, d))  # [M, H*(nope+rd) + R + rd]
        q = qa[:, :H * (nope + rd)].view(B, T, H, nope + rd)
        q_nope = q[..., :nope]
        c = _rmsnorm(qa[:, H * (nope + rd):-rd], L.kv_norm, self.eps).view(B, T, R)
        # rope on the query heads and the shared key head together (interleaved pairs, as complex numbers)
        rot = torch.cat([q[..., nope:], qa[:, -rd:].view(B, T, 1, rd)], dim=2)  # [B, T, H+1, rd]
        rot = torch.view_as_real(torch.view_as_complex(rot.float().view(B, T, H + 1, rd // 2, 2))
                                 * freqs[:, :, None]).flatten(-2).to(self.dtype)
        q_rope, k_rope = rot[:, :, :H], rot[:, :, H]  # [B, T, H, rd], [B, T, rd]
        if cache.kind == "full":
            k_nope, v = self._decompress(L, c)
            k = torch.cat([k_nope, k_rope[:, None].expand(B, H, T, rd)], dim=-1)
            K, V = cache.write(li, k, v)
            qf = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
            out = F.scaled_dot_product_attention(qf, K, V, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                                 scale=self.scale)
            return L.o(out.transpose(1, 2).reshape(M, H * vd)).view(B, T, d)

        KV = cache.write(li, c, k_rope)  # [B, S, R + rd]
        S = KV.shape[1]
        # absorbed cost ~ T*H*S*(2R+rd); decompressed ~ S*R*H*(nope+v) + T*H*S*(nope+rd+v)
        absorbed = T * H * S * (2 * R + rd) + 2 * T * H * nope * R <= \
            S * R * H * (nope + vd) + T * H * S * (nope + rd + vd)
        if absorbed:
            # latent query: q_nope @ W_UK per head, as W_UK^T @ q_nope^T (weights as the left operand)
            qn_t = q_nope.reshape(M, H, nope).permute(1, 2, 0)  # [H, nope, M]
            q_lat = torch.bmm(L.w_uk_t, qn_t).permute(2, 0, 1)  # [M, H, R]
            qcat = torch.cat([q_lat, q_rope.reshape(M, H, rd)], dim=-1).view(B, T * H, R + rd)
            scores = _bmm(qcat, KV.transpose(1, 2)).float().view(B, T, H, S)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask.permute(0, 2, 1, 3), float("-inf"))
            elif T > 1:  # causal within the chunk
                keep = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
                scores = scores.masked_fill(~keep[None, :, None, :], float("-inf"))
            p = (scores * self.scale).softmax(-1).to(self.dtype).view(B, T * H, S)
            o_lat = _bmm(p, KV[..., :R]).view(M, H, R).permute(1, 2, 0)  # [H, R, M]
            o = torch.bmm(L.w_uv, o_lat)  # [H, v, M]: W_UV per head
            return L.o(o.permute(2, 0, 1).reshape(M, H * vd)).view(B, T, d)
        # decompress the cached latents (cheaper for long prefill chunks)
        Cs, KRs = KV[..., :R], KV[..., R:]
        k_nope, v = self._decompress(L, Cs)
        k = torch.cat([k_nope, KRs[:, None].expand(B, H, S, rd)], dim=-1)
        qf = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                             scale=self.scale)
        return L.o(out.transpose(1, 2).reshape(M, H * vd)).view(B, T, d)

    def _decompress(self, L: LayerWeights, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents c [B, S, R] -> k_nope [B, H, S, nope], v [B, H, S, v] (kv_b_proj)."""
        B, S, R = c.shape
        k_nope = F.linear(c, L.w_uk_t.transpose(1, 2).reshape(-1, R)).view(B, S, self.H, self.nope)
        v = F.linear(c, L.w_uv.view(-1, R)).view(B, S, self.H, self.vdim)
        return k_nope.transpose(1, 2), v.transpose(1, 2)

    def _mlp(self, L: LayerWeights, li: int, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        M = B * T
        h2 = h.reshape(M, d)
        down = L.down
        if not isinstance(down, RowDown) or M > self.opts.sparse_max_rows:
            return down(F.relu(L.up(h2)).square()).view(B, T, d)  # prefill / sparse off: dense
        st = self.stats
        I = down.in_features
        st.decode_mlp_calls += 1
        st.neurons += M * I
        if L.predictor is not None:
            idx = L.predictor(h2).any(0).nonzero().squeeze(1)  # predicted-active neurons
            st.predicted += idx.numel() * M
            if self.opts.sparse == "auto" and idx.numel() > self.opts.sparse_threshold * I:
                a = F.relu(L.up(h2)).square()  # predictor says most fire: dense is cheaper
            else:
                a_sel = F.relu(L.up.rows(idx, h2)).square()  # only the predicted rows of up_proj
                act = a_sel != 0
                n_act = int(act.sum())
                st.active += n_act
                st.sparse_calls += 1
                return down.gather(a_sel, act, idx).view(B, T, d)
        else:
            a = F.relu(L.up(h2)).square()
        act = a != 0
        n_act = int(act.sum())
        st.active += n_act
        if self.opts.sparse == "on" or n_act <= self.opts.sparse_threshold * I:
            st.sparse_calls += 1
            return down.gather(a, act).view(B, T, d)  # reads only the rows of active neurons
        st.dense_calls += 1
        return down(a).view(B, T, d)


def _layers_within_budget(config: PLMConfig, opts: EdgeOptions, ckpt: MappedCheckpoint, budget: int,
                          global_bytes: int) -> int:
    """How many leading layers stay resident within `budget` bytes of weights, keeping room
    for one streamed layer in flight (its pages are resident while it computes)."""
    elt = opts.torch_dtype.itemsize
    per_layer, stream_slot = [], 0
    for i in range(config.num_hidden_layers):
        names = [f"model.layers.{i}.{t}" for t in LAYER_TENSORS]
        n = sum(math.prod(ckpt.shape(k)) for k in names)
        per_layer.append(n * (1 if opts.quant in ("int8", "int4") else elt))
        stream_slot = max(stream_slot, sum(ckpt.nbytes(k) for k in names))
    left = budget - global_bytes
    if left < 0:
        raise PLMError(f"memory budget {budget / 1e9:.2f} GB is below the embedding and norms alone "
                       f"({global_bytes / 1e9:.2f} GB)")
    n = 0
    total = sum(per_layer)
    if total <= left:
        return config.num_hidden_layers
    left -= stream_slot
    while n < len(per_layer) and per_layer[n] <= left:
        left -= per_layer[n]
        n += 1
    return n


def load_predictors(path: str | Path, config: PLMConfig, dtype: torch.dtype) -> list[Predictor]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise PLMError(f"{path}: predictor file not found (fit one with `plm sparsity DIR --fit-predictor`)")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # not a safetensors file, truncated, ...
        raise PLMError(f"{path}: not a predictor file ({type(e).__name__}: {e})") from None
    with f:
        meta = f.metadata() or {}
        n = int(meta.get("layers", -1))
        if n != config.num_hidden_layers:
            raise PLMError(f"{path}: predictor has {n} layers, the model {config.num_hidden_layers}")
        out = []
        for i in range(n):
            A, B = f.get_tensor(f"layers.{i}.A"), f.get_tensor(f"layers.{i}.B")
            if A.shape[0] != config.hidden_size or B.shape[1] != config.intermediate_size:
                raise PLMError(f"{path}: predictor layer {i} has shape {tuple(A.shape)}x{tuple(B.shape)}, "
                               f"not a predictor for this model")
            margin = float(f.get_tensor(f"layers.{i}.margin"))
            out.append(Predictor(A.to(dtype).contiguous(), B.to(dtype).contiguous(), margin))
    return out


# ---------------------------------------------------------------------------------------
# generation glue


def edge_step_fn(runtime: EdgeRuntime, capacity: int | None = None):
    """The StepFn for plm.infer.generate: (new_ids [B, T], mask [B, past+T]) -> logits [B, 1, V].

    The cache is created on the first call for that batch size, with `capacity` positions
    (default: the model's max_position_embeddings); it grows if a sequence runs past it.
    """
    state: dict[str, object] = {}

    def step(new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if "cache" not in state:
            cap = capacity or max(runtime.config.max_position_embeddings, mask.shape[1])
            state["cache"] = runtime.new_cache(new_ids.shape[0], cap)
        return runtime.forward(new_ids.cpu(), mask.cpu(), state["cache"])[:, None]

    step.state = state  # type: ignore[attr-defined]  (benchmarks read the cache size)
    return step


def load_runtime(path: str | Path, options: EdgeOptions | None = None, **kw) -> EdgeRuntime:
    return EdgeRuntime.from_checkpoint(path, options, **kw)
