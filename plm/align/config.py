"""Typed recipes of post-training: `plm sft` (two-phase SFT) and `plm aries` (ARIES preference
learning). Parsed once by `plm.recipe.load_recipe`; imports nothing heavy. See
recipes/tiny/sft.yaml and recipes/tiny/aries.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from plm.data.chat import DEFAULT_REFINE_INSTRUCTION
from plm.eval.config import SCORER_KINDS, GenEvalSpec, ScorerSpec, TaskSource, check_kwargs
from plm.recipe import RecipeBase, check
from plm.train.config import ModelSpec, ScheduleSpec, TrainConfig


@dataclass
class SFTSource:
    """One SFT data source (`data.NAME:`), a list of chats:
      {path: FILE.jsonl, format: chat|alpaca|qa}     local JSONL; format guessed when omitted
      {hf: NAME, config, split, format}              a Hugging Face dataset
      {builder: NAME, ...its settings}               an offline builder (plm.data.tiny.BUILDERS)
    common: fields: {instruction, input, output, question, answer, messages}, system, limit."""

    path: str | None = None
    hf: str | None = None
    builder: str | None = None
    config: str | None = None
    split: str = "train"
    format: Literal["chat", "alpaca", "qa"] | None = None
    fields: dict[str, str] = field(default_factory=dict)
    system: str | None = None
    limit: int | None = None
    args: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})  # the builder's own

    def __post_init__(self) -> None:
        kinds = [k for k in ("path", "hf", "builder") if getattr(self, k)]
        check(len(kinds) == 1, "path: give exactly one of path:, hf:, builder:")
        check(self.limit is None or self.limit >= 1, f"limit: must be >= 1, got {self.limit}")
        if self.builder is not None:
            from plm.data.tiny import BUILDERS
            check(self.builder in BUILDERS, f"builder: unknown {self.builder!r}; known: {', '.join(sorted(BUILDERS))}")
            check_kwargs(BUILDERS[self.builder], self.args, f"builder {self.builder}")
        else:
            check(not self.args, f"{next(iter(self.args), '')}: unknown setting for a {kinds[0]}: source")


@dataclass
class SFTPhase:
    """One SFT phase: sources with weights (how many times each sample appears per epoch; 0.5 =
    a seeded half), and its length as epochs or steps."""

    name: str
    sources: dict[str, float]
    epochs: float | None = None  # default 1
    steps: int | None = None
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources: give at least one SOURCE: weight")
        for k, w in self.sources.items():
            check(w >= 0, f"sources.{k}: a weight must be >= 0, got {w}")
        check(self.epochs is None or self.steps is None, "steps: give epochs or steps, not both")
        check(self.epochs is None or self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        check(self.steps is None or self.steps >= 1, f"steps: must be >= 1, got {self.steps}")


def _check_init(model: ModelSpec | None, what: str) -> None:
    check(model is not None and model.init_from is not None,
          f"model.init_from: {what} starts from a checkpoint: model: {{init_from: DIR}}")


@dataclass
class SFTRecipe(RecipeBase):
    """`plm sft RECIPE`: supervised fine-tuning in phases (ASSUMED split: phase 1 general
    instructions, phase 2 math and code), loss on assistant tokens only."""

    model: ModelSpec | None = None  # {init_from: the pretrained model}; the tokenizer comes with it
    tokenizer: str | None = None  # default: the init_from folder
    data: dict[str, SFTSource] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[SFTPhase] = field(default_factory=list)
    eval: GenEvalSpec | None = None  # held-out accuracy after each phase

    def __post_init__(self) -> None:
        _check_init(self.model, "SFT")
        check(bool(self.phases), "phases: at least one phase is needed")
        for i, p in enumerate(self.phases):
            for k in p.sources:
                check(k in self.data, f"phases[{i}].sources.{k}: not a data source "
                                      f"(data: {', '.join(self.data) or 'none'})")


@dataclass
class AriesConfig:
    """`aries:`: the ARIES loop's settings."""

    iterations: int = 3
    prompts_per_iteration: int = 256  # fresh prompts each iteration (cycling through the pool)
    refinements: int = 2  # K refinement rounds after the initial answer
    beta: float = 0.1
    lam: float = field(default=1.0, metadata={"alias": "lambda"})  # 0 = the iterative-DPO baseline
    sft_weight: float = 0.0  # weight of the token-normalised ARIES-SFT term
    # refine: y_k ~ p(.|z(x, y_{k-1})); direct: K+1 independent answers to x;
    # auto: refine when lambda > 0, direct when lambda = 0 (plain iterative DPO)
    chain: Literal["auto", "refine", "direct"] = "auto"
    selection: Literal["rule", "reward"] = "rule"
    # ASSUMED: share of pairs whose refinement context shows the CHOSEN answer,
    # DPO(z(x, y_w); y_w > y_l): "keep a right answer" rather than only "fix a wrong one"
    keep: float = 0.0
    min_margin: float = 0.0  # reward selection: smallest score gap kept
    epochs: float = 1.0  # passes over each iteration's pairs
    max_len: int = 1024  # tokens per pair sequence (the context's head is cut first)
    instruction: str = DEFAULT_REFINE_INSTRUCTION
    system: str | None = None
    ref_batch_size: int = 16  # pairs per reference-log-prob forward
    schedule: ScheduleSpec = field(default_factory=lambda: ScheduleSpec(
        peak_lr=1e-5, floor_lr=1e-6, warmup=0.1, stable=0.6, decay=0.3))

    def __post_init__(self) -> None:
        check(self.iterations >= 1, f"iterations: must be >= 1, got {self.iterations}")
        check(self.prompts_per_iteration >= 1, f"prompts_per_iteration: must be >= 1, got {self.prompts_per_iteration}")
        check(self.refinements >= 0, f"refinements: must be >= 0, got {self.refinements}")
        check(self.beta > 0, f"beta: must be > 0, got {self.beta}")
        check(self.lam >= 0, f"lambda: must be >= 0, got {self.lam}")
        check(self.sft_weight >= 0, f"sft_weight: must be >= 0, got {self.sft_weight}")
        check(0.0 <= self.keep <= 1.0, f"keep: a share of pairs in [0, 1], got {self.keep}")
        check(self.min_margin >= 0, f"min_margin: must be >= 0, got {self.min_margin}")
        check(self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        check(self.max_len >= 8, f"max_len: must be >= 8 tokens, got {self.max_len}")
        check(self.ref_batch_size >= 1, f"ref_batch_size: must be >= 1, got {self.ref_batch_size}")

    @property
    def refine_chains(self) -> bool:
        return self.chain == "refine" or (self.chain == "auto" and self.lam > 0)

    @property
    def contexts(self) -> int:
        """Sequences per pair: the refinement context is only needed when lambda > 0."""
        return 4 if self.lam > 0 else 2


@dataclass
class SampleConfig:
    """`sampling:`: how ARIES samples answers and refinements."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 192
    batch_size: int = 64
    seed: int = 0
    bf16: bool | None = None  # autocast generation; None: on CUDA (unless train.precision is fp32)

    def __post_init__(self) -> None:
        check(self.temperature >= 0, f"temperature: must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class AriesRecipe(RecipeBase):
    """`plm aries RECIPE`: iterative self-refinement preference learning from an SFT model."""

    model: ModelSpec | None = None  # {init_from: the SFT model}
    tokenizer: str | None = None  # default: the init_from folder
    prompts: TaskSource | list[TaskSource] | None = None  # required
    scorer: str | ScorerSpec = "verifier"
    aries: AriesConfig = field(default_factory=AriesConfig)
    sampling: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GenEvalSpec | None = None  # held-out accuracy of every iteration's model

    def __post_init__(self) -> None:
        _check_init(self.model, "ARIES")
        check(self.prompts is not None, "prompts: required: the task source(s) ARIES samples answers to")
        if isinstance(self.scorer, str):
            check(self.scorer in SCORER_KINDS, f"scorer: must be one of {', '.join(SCORER_KINDS)}, got {self.scorer!r}")
            self.scorer = ScorerSpec(kind=self.scorer)  # type: ignore[arg-type]
        check(not (self.aries.selection == "rule" and self.scorer.kind == "reward_model"),
              "aries.selection: rule needs a verifier scorer; use selection: reward with a reward model")
