"""PLM in PyTorch: Multi-head Latent Attention + non-gated squared-ReLU MLP.

Module and parameter names follow the released Hugging Face checkpoint exactly, so
`state_dict()` keys are the safetensors tensor names of the released checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from plm.model.cache import FullCache
from plm.model.config import PLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16, as the reference implementations do
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float,
                 dtype: torch.dtype = torch.float32, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [B, T] -> [B, T, dim/2] (one frequency per interleaved pair);
    `factor` > 1 is linear RoPE scaling (positions divided by it)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / dim))
    ang = (position_ids.float() / factor)[..., None] * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) — llama.cpp's NORM rope, DeepSeek-V2 layout.

    x: [B, heads, T, dim]; cos/sin: [B, T, dim/2].
    """
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Explicit softmax(QK^T)V: the naive baseline the benchmarks compare SDPA against."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


# "sdpa": F.scaled_dot_product_attention on q/k of head dim 192 and v of 128. Flash kernels need
# one head dim for q, k and v, so SDPA runs memory-efficient attention on CUDA (math on CPU).
# "flash": v zero-padded to 192 so flash kernels apply; the padded output columns are zeros
# and are dropped, so the result is the same attention (tests/test_gpu_paths.py).
# "eager": the explicit softmax(QK^T)V baseline of the benchmarks.
ATTENTION = ("sdpa", "eager", "flash")


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTENTION:
        raise ValueError(f"attn_impl must be one of {ATTENTION}, got {attn_impl!r}")
    return attn_impl


def set_attn_impl(model: nn.Module, attn_impl: str) -> None:
    """Switch every PLMAttention of `model` to `attn_impl` (the weights are the same for all)."""
    check_attn_impl(attn_impl)
    for m in model.modules():
        if isinstance(m, PLMAttention):
            m.attn_impl = attn_impl


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> str:
    """The SDPA backend F.scaled_dot_product_attention picks for these inputs: "FLASH_ATTENTION",
    "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH", ...

    SDPA takes the first enabled backend, in its priority order, whose constraints the inputs
    meet; this runs the inputs under each backend alone, in that order, and names the first
    that accepts them (a few small attention calls: pass inputs of the real shape, batch 1)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {int(getattr(SDPBackend, n)): n for n in
             ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE")
             if hasattr(SDPBackend, n)}
    order = torch._C._get_sdp_priority_order() if hasattr(torch._C, "_get_sdp_priority_order") else \
        [int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION), int(SDPBackend.MATH)]
    enabled = {"FLASH_ATTENTION": torch.backends.cuda.flash_sdp_enabled(),
               "EFFICIENT_ATTENTION": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "CUDNN_ATTENTION": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)(),
               "MATH": torch.backends.cuda.math_sdp_enabled()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each refusal warns why; the answer is the point here
        for b in order:
            name = names.get(int(b))
            if name is None or not enabled.get(name, False):
                continue
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
                return name
            except RuntimeError:
                continue
    return "none"


def attention_backend(config: PLMConfig, attn_impl: str = "sdpa", seq_len: int = 2048,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      masked: bool = False) -> str:
    """Which kernel a PLMAttention with `attn_impl` runs at this shape, device and dtype
    ("eager" for the explicit baseline; masked: with a padding/packing mask instead of the
    causal fast path)."""
    if check_attn_impl(attn_impl) == "eager":
        return "eager"
    c = config
    H, qk = c.num_attention_heads, c.qk_head_dim
    q = torch.randn(1, H, seq_len, qk, device=device, dtype=dtype)
    k = torch.randn_like(q)
    v = torch.randn(1, H, seq_len, qk if attn_impl == "flash" else c.v_head_dim, device=device, dtype=dtype)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None] if masked else None
    return sdpa_backend(q, k, v, attn_mask=mask, is_causal=not masked)


class PLMAttention(nn.Module):
    def __init__(self, config: PLMConfig, layer_idx: int, attn_impl: str = "sdpa") -> None:
        super().__init__()
        c = config
        self.attn_impl = check_attn_impl(attn_impl)  # see ATTENTION
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.nope, self.rope, self.vdim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        self.scale = c.softmax_scale
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.vdim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: FullCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, self.nope + self.vdim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.vdim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, 1, T, self.rope), cos, sin)  # one key shared by all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, self.rope)], dim=-1)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        if self.attn_impl == "eager":
            out = eager_attention(q, k, v, mask, self.scale)
        else:
            if self.attn_impl == "flash":
                v = F.pad(v, (0, q.shape[-1] - self.vdim))  # zeros: their output columns are dropped
            if mask is None:
                # no padding, no past: the fused causal path
                out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            out = out[..., :self.vdim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.vdim))


class PLMMLP(nn.Module):
    """Non-gated squared ReLU: down(relu(up(x))**2). ~90% of activations are exactly zero."""

    def __init__(self, config: PLMConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class PLMDecoderLayer(nn.Module):
    def __init__(self, config: PLMConfig, layer_idx: int, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PLMAttention(config, layer_idx, attn_impl)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PLMMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: FullCache | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class PLMModel(nn.Module):
    def __init__(self, config: PLMConfig, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PLMDecoderLayer(config, i, attn_impl) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: FullCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(past + T)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, "
                             f"expected past ({past}) + new ({T})")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.qk_rope_head_dim, c.rope_theta, x.dtype, c.rope_factor)
        mask = build_attention_mask(attention_mask, T, past, input_ids.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


def default_position_ids(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                         device: torch.device) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift RoPE."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past, past + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos[:, past:].clamp(min=0)


def build_attention_mask(attention_mask: torch.Tensor | None, T: int, past: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, T, past+T] (True = may attend), or None for the fused causal path.

    Accepts a 2D padding mask [B, past+T] (1 = real token) or a ready 4D boolean mask
    (e.g. block-diagonal masks for packed samples).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    causal = torch.arange(S, device=device)[None, :] <= q_pos  # [T, S]
    if attention_mask is None:
        return causal[None, None]
    keep = causal[None] & attention_mask.bool()[:, None, :]  # [B, T, S]
    # a padding query would see no key at all (NaN softmax): let it see itself
    keep |= (torch.arange(S, device=device)[None, :] == q_pos)[None]
    return keep[:, None]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class PLMForCausalLM(nn.Module):
    """PLM with tied input/output embeddings: `model(input_ids).logits`."""

    def __init__(self, config: PLMConfig, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = PLMModel(config, attn_impl)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: stored once
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: FullCache | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """labels: as in transformers, the same shape as input_ids and shifted here (position t
        predicts labels[t + 1]); -100 = ignore. The mean over predicted tokens is the loss.

        logits_to_keep > 0 computes logits for the last N positions only (decoding).
        """
        h = self.model(input_ids, attention_mask, position_ids, cache)
        hk = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = self.lm_head(hk)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None, grammar=None) -> torch.Tensor:
        """transformers-style generation: the prompts (a batch, left- or right-padded with
        `attention_mask`) followed by their continuations, [B, prompt + new], finished rows
        padded with `pad_token_id`. Greedy unless `do_sample`; stops at `eos_token_id`
        (default: the config's). `grammar` (plm.model.grammar.Grammar, an extension): every
        continuation stays inside it, e.g. JSON valid under a schema."""
        from plm.model.generation import GenerationConfig, generate_tokens, model_step_fn

        eos = self.config.eos_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                               top_p=top_p, top_k=top_k, min_p=min_p or 0.0, repetition_penalty=repetition_penalty,
                               stop_token_ids=eos, seed=seed, grammar=grammar)
        new: list[list[int]] = [[] for _ in prompts]
        for row, tok in generate_tokens(model_step_fn(self), prompts, cfg, pad_id=pad):
            new[row].append(tok)
        for row, ids in enumerate(new):  # keep the stop token, as transformers does
            if len(ids) < max_new_tokens and eos:
                ids.append(eos[0])
        width = max(len(x) for x in new) if new else 0
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + width), pad, dtype=torch.long)
        out[:, :input_ids.shape[1]] = input_ids.cpu()
        for row, ids in enumerate(new):
            out[row, input_ids.shape[1]:input_ids.shape[1] + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out.to(input_ids.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    # checkpoint I/O lives in plm.model.checkpoint; these are the familiar entry points
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", torch_dtype: torch.dtype | str | None = None,
                        **hub) -> "PLMForCausalLM":
        """A checkpoint folder or a Hugging Face hub id (downloaded once, then read from the cache).
        The weights keep their stored dtype unless `dtype` (or transformers' `torch_dtype`) says
        otherwise ("auto" = stored)."""
        from plm.model.checkpoint import load_model
        from plm.model.hub import resolve_model
        dtype = dtype if dtype is not None else torch_dtype
        return load_model(resolve_model(path, **hub), dtype=None if dtype == "auto" else dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "4GB",
                        dtype: torch.dtype | None = None) -> None:
        from plm.model.checkpoint import save_model
        save_model(self, path, max_shard_size=max_shard_size, dtype=dtype)
