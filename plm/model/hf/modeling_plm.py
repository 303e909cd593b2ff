"""PLM (Peripheral Language Model) for Hugging Face transformers.

Standalone on purpose: plm copies this file and configuration_plm.py beside every checkpoint it
saves, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without plm
installed. It imports only torch and transformers. plm.model.modeling is the reference this file
mirrors (same math, same parameter names); tests/test_transformers.py holds the two equal.

PLM: Multi-head Latent Attention with a full-rank query, a KV latent with an RMSNorm, decoupled
RoPE on interleaved pairs (x[2i], x[2i+1]) with one rope key shared by all heads; a non-gated
squared-ReLU MLP; RMSNorm before attention, before the MLP and at the end; tied embeddings.
Works with transformers 4.57 and 5.x (the KV cache is transformers' Cache, e.g. DynamicCache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_plm import PLMConfig  # the file beside this one (transformers loads both)


class PLMRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in fp32 for stability under bf16
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, dim/2] for positions [B, T]: one frequency per interleaved pair; linear
    scaling divides positions by `factor`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    ang = (position_ids.float() / factor)[..., None] * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, heads, T, dim] (not the half-split of Llama)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def default_position_ids(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                         device: torch.device) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift RoPE."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past, past + T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1)[:, -T:].clamp(min=0)


def build_attention_mask(attention_mask: torch.Tensor | None, T: int, past: int,
                         device: torch.device) -> torch.Tensor | None:
    """SDPA mask [B, 1, T, past+T] (True = may attend) from a 2D padding mask [B, past+T]; None
    selects SDPA's fused causal path. A 4D mask (boolean or additive) is used as given."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    keep = (torch.arange(S, device=device)[None, :] <= q_pos)[None]  # causal [1, T, S]
    if attention_mask is not None:
        keep = keep & attention_mask[:, -S:].bool()[:, None, :]
        # a padding query would see no key at all (NaN, which reaches real tokens through V): let it see itself
        keep = keep | (torch.arange(S, device=device)[None, :] == q_pos)[None]
    return keep[:, None]


class PLMAttention(nn.Module):
    """Multi-head Latent Attention: keys and values come from a low-rank latent (kv_lora_rank)."""

    def __init__(self, config: PLMConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.kv_rank = c.num_attention_heads, c.kv_lora_rank
        self.nope, self.rope, self.vdim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = (self.nope + self.rope) ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = PLMRMSNorm(self.kv_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.vdim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                past_key_values: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q_nope, q_rope = self.q_proj(x).view(B, T, H, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, self.nope + self.vdim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        k_rope = apply_rope(k_rope.view(B, 1, T, self.rope), cos, sin)  # one rope key shared by all heads
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, self.rope)], dim=-1)
        if past_key_values is not None:  # cached decompressed: keys qk_nope+qk_rope wide, values v_head_dim
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.vdim))


class PLMMLP(nn.Module):
    """Non-gated squared ReLU: down(relu(up(x))**2)."""

    def __init__(self, config: PLMConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class PLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = PLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PLMAttention(config, layer_idx)
        self.post_attention_layernorm = PLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PLMMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        return h + self.mlp(self.post_attention_layernorm(h))


class PLMPreTrainedModel(PreTrainedModel):
    config_class = PLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True  # attention is always torch's SDPA; other implementations are not offered
    # the default _init_weights fits: Linear/Embedding normal(initializer_range), *RMSNorm ones


class PLMModel(PLMPreTrainedModel):
    def __init__(self, config: PLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would write the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        B, T = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, T, past, x.device)
        c = self.config
        cos, sin = rope_cos_sin(position_ids.expand(B, T), c.qk_rope_head_dim, c.rope_theta, c.rope_factor, x.dtype)
        mask = build_attention_mask(attention_mask, T, past, x.device)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else c.output_hidden_states
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, cos, sin, mask=mask, past_key_values=past_key_values if use_cache else None)
        x = self.norm(x)
        out = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None,
                                      hidden_states=tuple(hidden) + (x,) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


class PLMForCausalLM(PLMPreTrainedModel, GenerationMixin):
    # transformers 5 reads {tied: source}; 4.x iterates the keys
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PLMConfig) -> None:
        super().__init__(config)
        self.model = PLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head to embed_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        """labels: the same shape as input_ids, shifted inside the loss (position t predicts
        labels[t + 1]); -100 is ignored."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep])
        loss = None
        if labels is not None:  # transformers' causal-LM loss: shifts, ignores -100, fp32
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["PLMPreTrainedModel", "PLMModel", "PLMForCausalLM"]
