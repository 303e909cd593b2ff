"""PLMConfig: every field of the released PLM config.json, validated, with presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plm.errors import ConfigError

ACTIVATIONS = ("relu2",)  # PLM's MLP is non-gated squared ReLU; others are not PLM.


@dataclass
class PLMConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    q_lora_rank: int | None = None  # None = full-rank query projection (PLM)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "relu2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100000.0
    # None (PLM) or {"rope_type": "linear", "factor": F}: positions divided by F (context extension)
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "plm"
    architectures: list[str] = field(default_factory=lambda: ["PLMForCausalLM"])
    # keys we do not model (auto_map, rope_scaling, use_cache, ...) survive load/save
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer by a latent (absorbed-MLA) cache."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def full_cache_dim(self) -> int:
        """Values cached per token per layer by a decompressed K/V cache."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def rope_factor(self) -> float:
        """Linear RoPE scaling: positions are divided by this (1 without scaling)."""
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"PLMConfig.{name} must be a positive integer, got {v!r}")
        if self.model_type != "plm":
            raise ConfigError(f"PLMConfig.model_type must be 'plm', got {self.model_type!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"PLMConfig.hidden_act {self.hidden_act!r} is not supported "
                              f"(PLM uses one of {ACTIVATIONS})")
        if self.q_lora_rank is not None:
            raise ConfigError("PLMConfig.q_lora_rank must be null: PLM's query projection is "
                              f"full rank (got {self.q_lora_rank!r})")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"PLMConfig.qk_rope_head_dim must be even for RoPE pairs, "
                              f"got {self.qk_rope_head_dim}")
        if not (0 < self.rms_norm_eps < 1):
            raise ConfigError(f"PLMConfig.rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"PLMConfig.rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            factor = self.rope_scaling.get("factor")
            if kind != "linear":
                raise ConfigError(f"PLMConfig.rope_scaling type {kind!r} is not supported (supported: linear); "
                                  "running it without its scaling would compute different attention")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
                raise ConfigError(f"PLMConfig.rope_scaling.factor must be a positive number, got {factor!r}")
        if self.attention_bias:
            raise ConfigError("PLMConfig.attention_bias must be false: PLM has no biases")
        if not self.tie_word_embeddings:
            raise ConfigError("PLMConfig.tie_word_embeddings must be true: PLM ties lm_head "
                              "to embed_tokens")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                raise ConfigError(f"PLMConfig.{name}={v} is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")
        for e in self.eos_ids:
            if not (0 <= e < self.vocab_size):
                raise ConfigError(f"PLMConfig.eos_token_id={e} is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")

    # ---- (de)serialisation ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = dict(self.extra)
        out.update(d)
        # what other readers assume when these are absent: MLA has one KV "group" per head (a port
        # of PLM to transformers defaults num_key_value_heads to 16), and transformers 5 says dtype
        out["num_key_value_heads"] = self.num_attention_heads
        out["dtype"] = self.torch_dtype
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "PLMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "plm") != "plm":
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'plm'")
        d = _normalise(dict(d), source)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PLMConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PLMConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - config_fields() - {"rope_interleave", "rope_parameters", "dtype"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a PLM config field (known: {', '.join(sorted(config_fields()))})")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name}")

    def replace(self, **changes: Any) -> "PLMConfig":
        return dataclasses.replace(self, **changes)


def _normalise(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Fields other writers of PLM configs use, mapped onto ours; any that would change the math
    in a way we do not implement is an error, never silently ignored."""
    if d.pop("rope_interleave", True) is not True:
        raise ConfigError(f"{source}: rope_interleave: false (half-split RoPE) is not supported; PLM rotates "
                          "interleaved pairs (x[2i], x[2i+1]) as llama.cpp and the released model do")
    params = d.pop("rope_parameters", None)  # transformers 5
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
        params = dict(params)
        theta = params.pop("rope_theta", None)
        if theta is not None:
            if "rope_theta" in d and d["rope_theta"] != theta:
                raise ConfigError(f"{source}: rope_theta {d['rope_theta']} and rope_parameters.rope_theta {theta} "
                                  "disagree")
            d["rope_theta"] = theta
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            if d.get("rope_scaling") not in (None, params):
                raise ConfigError(f"{source}: rope_scaling and rope_parameters disagree")
            d["rope_scaling"] = params
    if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type")) == "default":
        d["rope_scaling"] = None
    kv = d.pop("num_key_value_heads", None)
    if kv is not None and kv != d.get("num_attention_heads", PLMConfig.num_attention_heads):
        raise ConfigError(f"{source}: num_key_value_heads {kv} differs from num_attention_heads "
                          f"{d.get('num_attention_heads')}: PLM's latent attention has no grouped KV heads")
    if "dtype" in d:  # transformers 5's name for torch_dtype
        dtype = d.pop("dtype")
        if d.get("torch_dtype") not in (None, dtype) and dtype is not None:
            raise ConfigError(f"{source}: dtype {dtype!r} and torch_dtype {d['torch_dtype']!r} disagree")
        if dtype is not None:
            d["torch_dtype"] = dtype
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias: true is not PLM (its MLP has no biases)")
    return d


def config_fields() -> set[str]:
    """The config.json fields PLMConfig models (what `model.overrides` may set)."""
    return {f.name for f in dataclasses.fields(PLMConfig)} - {"extra", "model_type", "architectures"}


# The released shape exactly, plus small shapes that keep PLM's proportions for CPU work.
PRESETS: dict[str, dict[str, Any]] = {
    "plm-1.8b": {},
    # ~0.5B body: same ratios at a quarter of the width (GPU experiments)
    "plm-300m": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=8,
                     intermediate_size=4096, kv_lora_rank=256, qk_nope_head_dim=64,
                     qk_rope_head_dim=32, v_head_dim=64),
    # small presets for CPU work; vocab defaults to Qwen2's, `plm init` shrinks it with
    # a small tokenizer
    "plm-tiny": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=1024, kv_lora_rank=64, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024),
    "plm-micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512),
}


# Fraction of relu² MLP neurons inactive per token in PLM-1.8B (public summary of the paper);
# `plm sparsity` measures it for a real checkpoint.
DEFAULT_INACTIVE = 0.909


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n ids, padded as the released model pads 151646 -> 151936."""
    return 151936 if n == 151646 else -(-n // multiple) * multiple


def model_info(cfg: PLMConfig, inactive: float = DEFAULT_INACTIVE, weight_bytes: float = 2.0) -> dict:
    """Parameter, activation and memory figures derived from the config alone."""
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    emb = cfg.vocab_size * d
    attn = (d * cfg.num_attention_heads * cfg.qk_head_dim + d * cfg.latent_cache_dim + cfg.kv_lora_rank
            + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            + cfg.num_attention_heads * cfg.v_head_dim * d)
    mlp = 2 * d * cfg.intermediate_size
    norms = 2 * d
    total = emb + L * (attn + mlp + norms) + d
    active = total - L * inactive * mlp
    return {
        "total_parameters": total,
        "non_embedding_parameters": total - emb,
        "activated_parameters_per_token": int(active),
        "assumed_inactive_mlp_fraction": inactive,
        "kv_values_per_token_per_layer": {"latent": cfg.latent_cache_dim, "decompressed": cfg.full_cache_dim},
        "kv_bytes_per_token_bf16": {"latent": cfg.latent_cache_dim * L * 2,
                                    "decompressed": cfg.full_cache_dim * L * 2},
        "kv_cache_reduction": round(cfg.full_cache_dim / cfg.latent_cache_dim, 2),
        "weight_memory_bytes": {"bf16": total * 2, "f32": total * 4, "q8_0": int(total * 34 / 32),
                                "checkpoint_dtype": int(total * weight_bytes)},
    }
