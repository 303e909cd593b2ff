"""PLM (Peripheral Language Model) configuration for Hugging Face transformers.

Standalone on purpose: plm copies this file beside every checkpoint it saves, so
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without plm installed. It imports
only transformers. The reference is plm.model.config.PLMConfig (the fields of config.json);
tests/test_transformers.py holds the two equal. Works with transformers 4.57 and 5.x.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class PLMConfig(PretrainedConfig):
    model_type = "plm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 2048, num_hidden_layers: int = 32,
                 num_attention_heads: int = 16, num_key_value_heads: int | None = None,
                 intermediate_size: int = 8192, q_lora_rank: int | None = None, kv_lora_rank: int = 512,
                 qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64, v_head_dim: int = 128,
                 hidden_act: str = "relu2", rms_norm_eps: float = 1e-6, rope_theta: float = 100000.0,
                 rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 4096,
                 initializer_range: float = 0.02, attention_bias: bool = False, use_cache: bool = True,
                 bos_token_id: int | None = 151643, eos_token_id: int | list[int] | None = 151643,
                 pad_token_id: int | None = None, tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        # Refuse what modeling_plm.py does not compute, rather than run different math silently.
        if q_lora_rank is not None:
            raise ValueError("PLM's query projection is full rank: q_lora_rank must be null")
        if hidden_act != "relu2":
            raise ValueError(f"PLM's MLP is squared ReLU: hidden_act must be 'relu2', got {hidden_act!r}")
        if attention_bias or kwargs.pop("mlp_bias", False):
            raise ValueError("PLM has no biases: attention_bias and mlp_bias must be false")
        if not tie_word_embeddings:
            raise ValueError("PLM ties lm_head to embed_tokens: tie_word_embeddings must be true")
        if kwargs.pop("rope_interleave", True) is not True:
            raise ValueError("PLM rotates interleaved pairs (x[2i], x[2i+1]): rope_interleave must be true")
        # MLA has no grouped KV heads; the field exists because tools read it (one "group" per head).
        if num_key_value_heads not in (None, num_attention_heads):
            raise ValueError(f"num_key_value_heads {num_key_value_heads} != num_attention_heads "
                             f"{num_attention_heads}: PLM's latent attention has no grouped KV heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.q_lora_rank = None
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_bias = False
        self.use_cache = use_cache
        # transformers 5 writes RoPE as rope_parameters (theta inside), 4.x as rope_theta + rope_scaling
        rope = dict(kwargs.pop("rope_parameters", None) or rope_scaling or {})
        self.rope_theta = float(rope.pop("rope_theta", rope_theta))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (PLM supports linear)")
        scaling = {"rope_type": "linear", "factor": float(rope["factor"])} if kind == "linear" else None
        if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):  # transformers 5
            self.rope_parameters = {"rope_type": kind, "rope_theta": self.rope_theta, **(scaling or {})}
        else:
            self.rope_scaling = scaling
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=True, **kwargs)

    @property
    def rope_factor(self) -> float:
        """Linear RoPE scaling: positions are divided by this (1 without scaling)."""
        rope = getattr(self, "rope_parameters", None) or getattr(self, "rope_scaling", None) or {}
        return float(rope["factor"]) if rope.get("rope_type", rope.get("type")) == "linear" else 1.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
