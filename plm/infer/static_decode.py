"""GPU decode: a static preallocated latent cache and absorbed MLA in fixed shapes, so one decode
step is one CUDA graph.

Batch-1 decode of PLM-1.8B reads 3.65 GB of bf16 weights per token: an H200 (4.8 TB/s) could
do about 1,300 tokens/s, and a plain eager loop does 13-25, because it launches thousands of
small kernels per token and the GPU waits for Python. Here:

* The cache is allocated once: per layer [batch, capacity, kv_lora_rank + qk_rope_head_dim]
  (576 values per token for PLM-1.8B; plm.infer.runtime's latent layout) and a [batch,
  capacity] mask of the positions that hold real tokens. A decode step writes its column with
  `index_copy_` at a position held in a tensor, and attends over the whole capacity with the
  mask; shapes never change from step to step.
* Attention is absorbed as in plm.infer.runtime's latent branch: the query's no-rope half is
  mapped through kv_b_proj's key half (a 512-d latent query per head), scored against the
  cached latents plus the shared rope key, and the attended latent goes through kv_b_proj's
  value half; nothing is decompressed.
* One decoder layer is a function of tensors only (`decode_layer`): `torch.compile` traces it
  once for every layer (the weights are arguments), fusing its norms, rope and softmax. On CUDA
  the whole step (embedding, the layers, the final norm and the lm_head) is captured in a
  `torch.cuda.CUDAGraph` and replayed: one launch per token. Inputs (token ids, positions, the
  column) travel in one small tensor copied into the graph's input buffer.
* A prompt (prefill) runs eagerly in the decompressed form, as the reference does, and writes
  its latents into the same cache.

`StaticDecoder` serves one batch size; `StaticRuntime` keeps one per batch size and hands out
`StepFn`s for plm.infer.generate (Engine's CUDA path). Greedy tokens equal the reference
model's in float32 (tests/test_gpu_paths.py); in bfloat16 both round differently, as any two
kernels do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plm.errors import PLMError
from plm.model.config import PLMConfig
from plm.model.modeling import (
    apply_rope,
    build_attention_mask,
    default_position_ids,
    rope_cos_sin,
)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm: normalise in fp32, round to the input dtype, scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [d]
    kv_norm: torch.Tensor  # [R]
    w_qa: torch.Tensor  # [H*(nope+rope) + R + rope, d]: q_proj and kv_a_proj_with_mqa stacked
    w_kvb: torch.Tensor  # [H*(nope+v), R]: kv_b_proj (prefill decompresses with it)
    w_uk: torch.Tensor  # [H, nope, R]: kv_b_proj's key half, absorbed into the query
    w_uv: torch.Tensor  # [H, R, v]: kv_b_proj's value half, applied to the attended latent
    w_o: torch.Tensor  # [d, H*v]
    ln2: torch.Tensor  # [d]
    w_up: torch.Tensor  # [I, d]
    w_down: torch.Tensor  # [d, I]

    def decode_args(self) -> tuple[torch.Tensor, ...]:
        return (self.ln1, self.kv_norm, self.w_qa, self.w_uk, self.w_uv, self.w_o, self.ln2, self.w_up, self.w_down)

    def nbytes(self) -> int:
        """Bytes a decode step reads (w_kvb is prefill only: w_uk and w_uv are its two halves)."""
        return sum(t.numel() * t.element_size() for t in self.decode_args())


def decode_layer(x: torch.Tensor, cache: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, ln1: torch.Tensor, kv_norm: torch.Tensor,
                 w_qa: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, w_o: torch.Tensor,
                 ln2: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, eps: float, scale: float,
                 rope_dim: int) -> torch.Tensor:
    """One decoder layer for one new token per row, in static shapes.

    x [B, d]; cache [B, C, R + rope] (this layer's; column `slot` is written here); valid [B, C]
    (True where a real token is cached, the new column included); slot [1] long; cos/sin
    [B, 1, rope/2]. Returns the layer's output [B, d].
    """
    B = x.shape[0]
    H, nope, R = w_uk.shape
    h = _rms(x, ln1, eps)
    qa = F.linear(h, w_qa)
    q = qa[:, :H * (nope + rope_dim)].view(B, H, nope + rope_dim)
    q_nope, q_rope = q[..., :nope], q[..., nope:]
    c = _rms(qa[:, H * (nope + rope_dim):-rope_dim], kv_norm, eps)  # the normalised latent [B, R]
    q_rope = apply_rope(q_rope[:, :, None], cos, sin)[:, :, 0]  # [B, H, rope]
    k_rope = apply_rope(qa[:, None, None, -rope_dim:], cos, sin).view(B, rope_dim)  # one key for all heads
    cache.index_copy_(1, slot, torch.cat([c, k_rope], dim=-1)[:, None])
    # absorbed: q_nope . (W_UK c) = (q_nope W_UK) . c, per head
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
    scores = torch.bmm(torch.cat([q_lat, q_rope], dim=-1), cache.transpose(1, 2)).float() * scale  # [B, H, C]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = scores.softmax(-1).to(x.dtype)
    o_lat = torch.bmm(p, cache[..., :R])  # [B, H, R]: the attended latent
    o = torch.bmm(o_lat.transpose(0, 1), w_uv).transpose(0, 1)  # [B, H, v]
    x = x + F.linear(o.reshape(B, -1), w_o)
    return x + F.linear(F.relu(F.linear(_rms(x, ln2, eps), w_up)).square(), w_down)


def layer_weights(model, dtype: torch.dtype) -> list[LayerWeights]:
    """Each layer's weights from a PLMForCausalLM, in `dtype` on the model's device (views of
    the model's own tensors where no conversion is needed)."""
    c = model.config
    H, nope, vd, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    out = []
    for layer in model.model.layers:
        a = layer.self_attn

        def w(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(dtype)

        kvb = w(a.kv_b_proj.weight)
        kv3 = kvb.view(H, nope + vd, R)
        out.append(LayerWeights(
            ln1=w(layer.input_layernorm.weight), kv_norm=w(a.kv_a_layernorm.weight),
            w_qa=torch.cat([w(a.q_proj.weight), w(a.kv_a_proj_with_mqa.weight)]).contiguous(),
            w_kvb=kvb, w_uk=kv3[:, :nope].contiguous(), w_uv=kv3[:, nope:].transpose(1, 2).contiguous(),
            w_o=w(a.o_proj.weight), ln2=w(layer.post_attention_layernorm.weight),
            w_up=w(layer.mlp.up_proj.weight), w_down=w(layer.mlp.down_proj.weight)))
    return out


class StaticDecoder:
    """Decode for a fixed batch size and capacity: prefill eagerly, then one token per row per
    step through `decode_layer` (compiled, and on CUDA one captured graph).

    compile: torch.compile `decode_layer` (default: on CUDA); cuda_graph: capture the decode
    step (default: on CUDA). Call `reset()` before a new batch of sequences; then `__call__`
    is a plm.infer.generate StepFn (ids [B, T], mask [B, past + T] -> logits [B, 1, V] fp32).
    """

    def __init__(self, model, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None,
                 compile: bool | None = None, cuda_graph: bool | None = None) -> None:
        c: PLMConfig = model.config
        self.config = c
        self.device = model.device
        self.dtype = dtype or model.dtype
        self.batch = batch
        self.capacity = capacity or c.max_position_embeddings
        cuda = self.device.type == "cuda"
        self.compiled = cuda if compile is None else compile
        self.use_graph = cuda if cuda_graph is None else cuda_graph
        if self.use_graph and not cuda:
            raise PLMError("CUDA graphs need a CUDA device")
        self.layers = layer_weights(model, self.dtype)
        self.embed = model.model.embed_tokens.weight.detach().to(self.dtype)
        self.norm = model.model.norm.weight.detach().to(self.dtype)
        self.eps, self.scale, self.rope_dim = c.rms_norm_eps, c.softmax_scale, c.qk_rope_head_dim
        width = c.kv_lora_rank + c.qk_rope_head_dim
        kw = dict(device=self.device)
        # zeros, never empty: masked columns get probability 0, and 0 x NaN would still be NaN
        self.cache = [torch.zeros(batch, self.capacity, width, dtype=self.dtype, **kw) for _ in self.layers]
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, **kw)
        # decode inputs, one tensor so one host-to-device copy: ids [B], positions [B],
        # the new column's validity [B], the column [1]
        self.inputs = torch.zeros(3 * batch + 1, dtype=torch.long, **kw)
        self.logits: torch.Tensor | None = None  # the graph's output buffer [B, V] fp32
        self.length = 0
        self.owner: object | None = None  # the StepFn using this decoder now (StaticRuntime)
        self._layer = torch.compile(decode_layer, fullgraph=True) if self.compiled else decode_layer
        self._graph: torch.cuda.CUDAGraph | None = None

    # ---- sizes ---------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads: every layer's matrices and the lm_head (the tied
        embedding; the lookup's few rows are left out)."""
        return sum(L.nbytes() for L in self.layers) + (self.embed.numel() + self.norm.numel()) * self.embed.element_size()

    def cache_bytes_read(self) -> int:
        """Cache bytes one decode step reads: every layer's whole [B, capacity, 576] buffer."""
        return sum(t.numel() * t.element_size() for t in self.cache)

    # ---- state ---------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
        for t in self.cache:
            t.zero_()

    # ---- decode --------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        """The decode step on `self.inputs` (what the graph captures): logits [B, V] fp32."""
        B = self.batch
        ids, pos = self.inputs[:B], self.inputs[B:2 * B]
        col_valid, slot = self.inputs[2 * B:3 * B].bool(), self.inputs[3 * B:]
        self.valid.index_copy_(1, slot, col_valid[:, None])
        x = F.embedding(ids, self.embed)
        c = self.config
        cos, sin = rope_cos_sin(pos[:, None], self.rope_dim, c.rope_theta, self.dtype, c.rope_factor)
        for L, cache in zip(self.layers, self.cache):
            x = self._layer(x, cache, self.valid, slot, cos, sin, *L.decode_args(),
                            eps=self.eps, scale=self.scale, rope_dim=self.rope_dim)
        return F.linear(_rms(x, self.norm, self.eps), self.embed).float()

    def _capture(self) -> None:
        """Warm up (compiles, cuBLAS handles) on a side stream, then capture one step."""
        saved = self.inputs.clone()
        self.inputs.zero_()
        self.inputs[3 * self.batch] = self.capacity - 1  # warm-up writes land in a column reset() clears
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._step()
        self.inputs.copy_(saved)
        self.valid[:, -1] = False
        for t in self.cache:
            t[:, -1] = 0

    def prepare(self) -> None:
        """Compile and capture now rather than at the first decode step (benchmarks)."""
        if self.use_graph and self._graph is None:
            self._capture()

    def decode(self) -> torch.Tensor:
        """One step on the current `inputs`: logits [B, V] fp32 (on CUDA graphs, the graph's own
        output buffer, overwritten by the next step)."""
        if self.use_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            return self.logits
        return self._step()

    def start_greedy(self, logits: torch.Tensor) -> None:
        """After a prefill without padding: the first decode step's inputs, set on the device
        (benchmarks)."""
        B = self.batch
        self.inputs[:B] = logits.argmax(-1)
        self.inputs[B:3 * B] = torch.tensor([self.length, 1], device=self.device).repeat_interleave(B)
        self.inputs[3 * B] = self.length

    def advance_greedy(self, logits: torch.Tensor) -> None:
        """Feed each row's argmax back as its next token, on the device (benchmarks: no host
        round trip between steps)."""
        B = self.batch
        self.inputs[:B] = logits.argmax(-1)
        self.inputs[B:2 * B] += 1
        self.inputs[3 * B] += 1
        self.length += 1

    # ---- prefill -------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """T new tokens per row after the cached ones (ids [B, T], mask [B, past + T] or None):
        the reference's decompressed attention, latents written to the cache. Logits of the
        last position [B, V] fp32."""
        B, T = ids.shape
        past = self.length
        S = past + T
        c = self.config
        H, nope, vd, R, rd = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank, self.rope_dim
        pos = default_position_ids(mask, B, T, past, self.device)
        attn_mask = build_attention_mask(mask, T, past, self.device)
        self.valid[:, past:S] = True if mask is None else mask[:, past:].bool()
        cos, sin = rope_cos_sin(pos, rd, c.rope_theta, self.dtype, c.rope_factor)
        x = F.embedding(ids, self.embed)
        for L, cache in zip(self.layers, self.cache):
            h = _rms(x, L.ln1, self.eps)
            qa = F.linear(h, L.w_qa)
            q = qa[..., :H * (nope + rd)].view(B, T, H, nope + rd).transpose(1, 2)
            q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
            latent = _rms(qa[..., H * (nope + rd):-rd], L.kv_norm, self.eps)
            k_rope = apply_rope(qa[..., -rd:].reshape(B, 1, T, rd), cos, sin).view(B, T, rd)
            cache[:, past:S] = torch.cat([latent, k_rope], dim=-1)
            kv = F.linear(cache[:, :S, :R], L.w_kvb).view(B, S, H, nope + vd).transpose(1, 2)
            k = torch.cat([kv[..., :nope], cache[:, None, :S, R:].expand(B, H, S, rd)], dim=-1)
            out = F.scaled_dot_product_attention(q, k, kv[..., nope:], attn_mask=attn_mask,
                                                 is_causal=attn_mask is None and T > 1, scale=self.scale)
            x = x + F.linear(out.transpose(1, 2).reshape(B, T, H * vd), L.w_o)
            x = x + F.linear(F.relu(F.linear(_rms(x, L.ln2, self.eps), L.w_up)).square(), L.w_down)
        self.length = S
        return F.linear(_rms(x[:, -1], self.norm, self.eps), self.embed).float()

    # ---- the StepFn ----------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = new_ids.shape
        past = self.length
        if B != self.batch:
            raise PLMError(f"this decoder serves batches of {self.batch}, got {B}")
        if mask.shape[1] != past + T:
            raise PLMError(f"mask covers {mask.shape[1]} positions, expected past ({past}) + new ({T})")
        if past + T > self.capacity:
            raise PLMError(f"{past + T} positions do not fit the decode cache ({self.capacity}; "
                           f"the model's context window is {self.config.max_position_embeddings})")
        if T > 1:
            full = bool(mask.all())
            return self.prefill(new_ids.to(self.device), None if full and past == 0 else mask.to(self.device))[:, None]
        m = mask.long()
        packed = torch.cat([new_ids[:, 0].long().cpu(), (m.sum(1) - 1).clamp(min=0).cpu(), m[:, -1].cpu(),
                            torch.tensor([past])])
        self.inputs.copy_(packed, non_blocking=True)
        logits = self.decode()
        self.length += 1
        return logits[:, None].clone()


class StaticRuntime:
    """Static decoders of one model, one per batch size (built, compiled and captured on first
    use), handing out StepFns. One generation at a time per batch size: a second StepFn of the
    same batch size takes the decoder over, and the first then refuses to continue."""

    def __init__(self, model, capacity: int | None = None, dtype: torch.dtype | None = None,
                 compile: bool | None = None, cuda_graph: bool | None = None) -> None:
        self.model = model
        self.config = model.config
        self.kw = dict(capacity=capacity, dtype=dtype, compile=compile, cuda_graph=cuda_graph)
        self.decoders: dict[int, StaticDecoder] = {}

    def decoder(self, batch: int) -> StaticDecoder:
        if batch not in self.decoders:
            self.decoders[batch] = StaticDecoder(self.model, batch, **self.kw)
        return self.decoders[batch]

    def new_step(self):
        """A fresh StepFn for plm.infer.generate."""
        token = object()
        state: dict[str, StaticDecoder] = {}

        def step(new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if "dec" not in state:
                dec = self.decoder(new_ids.shape[0])
                dec.reset()
                dec.owner = token
                state["dec"] = dec
            dec = state["dec"]
            if dec.owner is not token:
                raise PLMError("another generation of the same batch size took over this decoder; "
                               "run one at a time per batch size")
            return dec(new_ids, mask)

        return step
