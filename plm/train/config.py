"""Typed sections of training recipes (`plm pretrain`; `train:` and `schedule:` of every stage).

Parsed once by `plm.recipe.load_recipe`; every error names its setting. Imports nothing heavy,
so a recipe is checked before any model or data is touched. See recipes/tiny/pretrain.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from plm.errors import ConfigError
from plm.recipe import RecipeBase, check


@dataclass
class TrainConfig:
    """The shared trainer's settings (`train:`)."""

    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    # auto: bf16 autocast on CUDA and on CPUs with bf16 in hardware (AVX-512 BF16, AMX), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile: true or "model" = the whole model as one graph; "block" = each decoder layer's
    # forward on its own (one compile shared by every layer, FSDP2's hooks and activation
    # checkpointing stay outside the graphs: the usual choice on GPUs); false = eager
    compile: bool | Literal["block", "model"] = False
    # tokens per chunk of the chunked linear + cross entropy (plm.model.loss.chunked_lm_loss):
    # the [tokens, vocab] logits (10 GB in fp32 for 4 x 4096 tokens of PLM's 151,936-word
    # vocabulary) never exist whole, only [loss_chunk, vocab]. 0 = off (the model's logits).
    # Applies to the LM loss of pretraining and SFT; ARIES keeps its own loss.
    loss_chunk: int = 0
    # attention kernel (plm.model.modeling.ATTENTION): "auto" = "flash" on CUDA (v padded to the
    # q/k head dim so flash kernels apply), the model's own elsewhere; or sdpa | flash | eager
    attention: Literal["auto", "sdpa", "flash", "eager"] = "auto"
    # deterministic kernels (torch.use_deterministic_algorithms): a rerun gives the same weights.
    # Compiled CPU kernels otherwise accumulate some gradients with atomics, in a varying order.
    # None = on for CPU, off for CUDA (where the deterministic kernels cost speed)
    deterministic: bool | None = None
    activation_checkpointing: bool = False
    fused_optimizer: bool = True  # fused AdamW where the device supports it
    distributed: Literal["none", "ddp", "fsdp"] = "ddp"  # only used under torchrun
    eval_every: int = 0  # steps; 0 = only at phase ends
    eval_batches: int = 4
    log_every: int = 1
    ckpt_every: int = 0  # steps; 0 = only at phase ends
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    peak_flops: float | None = None
    optimizer_state: Literal["carry", "reset"] = "carry"  # between phases
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch_size", "grad_accum", "eval_batches", "log_every", "keep_last"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"{name}: must be a positive integer, got {v!r}")
        for name in ("eval_every", "ckpt_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"{name}: must be a whole number of steps >= 0, got {v!r}")
        check(self.precision in ("auto", "fp32", "bf16"), f"precision: must be auto, fp32 or bf16, got {self.precision!r}")
        check(self.compile in (True, False, "block", "model"),
              f"compile: must be true, false, block or model, got {self.compile!r}")
        check(isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool) and self.loss_chunk >= 0,
              f"loss_chunk: must be a whole number of tokens >= 0 (0 = off), got {self.loss_chunk!r}")
        check(self.attention in ("auto", "sdpa", "flash", "eager"),
              f"attention: must be auto, sdpa, flash or eager, got {self.attention!r}")
        check(self.distributed in ("none", "ddp", "fsdp"),
              f"distributed: must be none, ddp or fsdp, got {self.distributed!r}")
        check(self.optimizer_state in ("carry", "reset"),
              f"optimizer_state: must be carry or reset, got {self.optimizer_state!r}")
        check(0 <= self.beta1 < 1, f"beta1: must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, f"beta2: must be in [0, 1), got {self.beta2}")
        check(self.eps > 0, f"eps: must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        check(self.peak_flops is None or self.peak_flops > 0, f"peak_flops: must be > 0, got {self.peak_flops}")


@dataclass
class ScheduleSpec:
    """A phase's learning-rate schedule as written in a recipe (`schedule:`). warmup, stable and
    decay are whole numbers of steps, or fractions (< 1) of the phase's steps."""

    kind: Literal["wsdc", "wsd", "cosine"] = "wsdc"
    peak_lr: float = 3e-4
    floor_lr: float = 3e-5
    warmup: float = 0
    stable: float = 0
    decay: float = 0
    decay_shape: Literal["linear", "cosine", "1-sqrt", "exp"] = "cosine"

    def __post_init__(self) -> None:
        for name in ("warmup", "stable", "decay"):
            v = getattr(self, name)
            check(v >= 0, f"{name}: must be >= 0, got {v}")
            check(v < 1 or float(v).is_integer(),
                  f"{name}: {v} is neither a fraction of the phase (< 1) nor a whole number of steps")
        check(self.peak_lr > 0, f"peak_lr: must be > 0, got {self.peak_lr}")
        check(0 <= self.floor_lr <= self.peak_lr, f"floor_lr: must be in [0, peak_lr = {self.peak_lr}], got {self.floor_lr}")
        check(not (self.decay_shape == "exp" and self.floor_lr == 0 and self.kind != "cosine"),
              "floor_lr: decay_shape 'exp' needs floor_lr > 0 (an exponential never reaches 0)")

    def steps_of(self, name: str, steps: int) -> int:
        v = getattr(self, name)
        return int(round(v * steps)) if v < 1 else int(v)

    def build(self, steps: int):
        """The `ScheduleConfig` of a phase of `steps` optimizer steps. Raises ConfigError
        ("warmup: ...") when the lengths do not fit in the phase."""
        from plm.train.schedule import ScheduleConfig

        w, s, d = (self.steps_of(n, steps) for n in ("warmup", "stable", "decay"))
        if self.kind in ("wsd", "cosine"):
            s = 0
        if self.kind == "cosine":
            d = 0
        check(w < steps or steps == 0,
              f"warmup: {w} steps is not shorter than the phase ({steps} steps): the LR would never reach peak_lr")
        fractions = [getattr(self, n) for n in ("warmup", "stable", "decay") if 0 < getattr(self, n) < 1]
        if self.kind == "wsdc" and len(fractions) == 3:
            check(sum(fractions) <= 1 + 1e-9, f"decay: warmup + stable + decay fractions sum to "
                                              f"{sum(fractions):.3g}, more than the whole phase")
        elif self.kind == "wsdc":
            check(w + s + d <= steps + 1, f"decay: warmup + stable + decay = {w + s + d} steps, longer than "
                                          f"the phase ({steps} steps)")
        try:
            return ScheduleConfig(kind=self.kind, peak_lr=self.peak_lr, floor_lr=self.floor_lr, warmup_steps=w,
                                  stable_steps=s, decay_steps=d, decay_shape=self.decay_shape, total_steps=steps)
        except ConfigError as e:
            raise ConfigError(str(e).removeprefix("schedule: ")) from None


@dataclass
class ModelSpec:
    """`model:`: a preset shape (+ config overrides) to train from scratch, or a checkpoint."""

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        from plm.model.config import PRESETS, config_fields

        check((self.preset is None) != (self.init_from is None), "preset: give a preset (and overrides) or init_from")
        if self.preset is not None:
            check(self.preset in PRESETS, f"preset: unknown {self.preset!r}; choose from {', '.join(PRESETS)}")
        known = config_fields()
        for k in self.overrides:
            check(k in known, f"overrides.{k}: not a PLM config field (known: {', '.join(sorted(known))})")
        check(not (self.overrides and self.init_from), "overrides: only apply to a preset, not to init_from")

    def config(self, **fixed: Any):
        """The PLMConfig of a preset model (`fixed` adds tokenizer-derived fields)."""
        from plm.model.config import PLMConfig

        try:
            return PLMConfig.from_preset(self.preset, **{**self.overrides, **fixed})
        except ConfigError as e:
            raise ConfigError(f"overrides: {e}") from None


@dataclass
class TokenizerTrain:
    inputs: list[str] = field(default_factory=list)
    vocab_size: int = 8192
    progress: bool = True

    def __post_init__(self) -> None:
        check(bool(self.inputs), "inputs: list the text files or folders to train on")
        check(self.vocab_size >= 256 + 3, f"vocab_size: must be at least 259 (bytes + specials), got {self.vocab_size}")


@dataclass
class TokenizerSpec:
    """`tokenizer: {dir, train}`: a trained BPE, trained on first use when `dir` holds none."""

    dir: str
    train: TokenizerTrain | None = None


@dataclass
class DataSource:
    """One pretraining source (`data.NAME:`): its token-shard folder, and the inputs it is
    prepared from (once; resumable)."""

    dir: str
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"
    workers: int = 1
    dedup: bool = False
    shard_tokens: int = 1 << 26

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"workers: must be >= 1, got {self.workers}")
        check(self.shard_tokens >= 1, f"shard_tokens: must be >= 1, got {self.shard_tokens}")


def _check_weights(weights: dict[str, float], name: str) -> None:
    check(bool(weights), f"{name}: give at least one SOURCE: weight")
    for k, w in weights.items():
        check(w >= 0, f"{name}.{k}: a weight must be >= 0, got {w}")
    check(sum(weights.values()) > 0, f"{name}: the weights sum to 0")


@dataclass
class LossEval:
    """`eval:` of pretraining: held-out loss on a mixture of sources."""

    sources: dict[str, float] = field(default_factory=dict)
    batches: int = 4

    def __post_init__(self) -> None:
        if self.sources:
            _check_weights(self.sources, "sources")
        check(self.batches >= 1, f"batches: must be >= 1, got {self.batches}")


@dataclass
class PretrainPhase:
    name: str
    tokens: int
    mixture: dict[str, float]
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)

    def __post_init__(self) -> None:
        check(self.tokens > 0, f"tokens: must be > 0, got {self.tokens}")
        _check_weights(self.mixture, "mixture")


@dataclass
class PretrainRecipe(RecipeBase):
    """`plm pretrain RECIPE`: tokenizer, data shards, model, multi-phase WSDC training."""

    tokenizer: str | TokenizerSpec = "qwen2"  # "qwen2", a tokenizer folder, or {dir, train}
    model: ModelSpec | None = None  # required
    data: dict[str, DataSource] = field(default_factory=dict)
    eval: LossEval | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PretrainPhase] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.model is not None, "model: required: {preset: NAME, overrides: {...}} or {init_from: DIR}")
        check(bool(self.phases), "phases: at least one phase is needed")
        check(bool(self.data), "data: at least one data source is needed")
        known = ", ".join(self.data)
        for i, p in enumerate(self.phases):
            for k in p.mixture:
                check(k in self.data, f"phases[{i}].mixture.{k}: not a data source (data: {known})")
        for k in (self.eval.sources if self.eval else {}):
            check(k in self.data, f"eval.sources.{k}: not a data source (data: {known})")
        if self.model.preset is not None:
            limit = self.model.config().max_position_embeddings
            check(self.train.seq_len <= limit, f"train.seq_len: {self.train.seq_len} is longer than the model's "
                                               f"max_position_embeddings ({limit})")
