"""Typed recipe sections for verifiable evaluation and prompts: `eval:` of SFT and ARIES, the
pipeline's eval stage, ARIES's `prompts:` and `scorer:`. Imports nothing heavy."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from plm.data.chat import DEFAULT_REFINE_INSTRUCTION
from plm.recipe import check


def check_kwargs(fn: Callable, kwargs: dict[str, Any], what: str, skip: tuple[str, ...] = ()) -> None:
    """Keys of `kwargs` must be parameters of `fn` (a builder's or scorer's own settings)."""
    params = [p for p in inspect.signature(fn).parameters if p not in ("self", *skip)]
    for k in kwargs:
        check(k in params, f"{k}: not a setting of {what} (settings: {', '.join(params) or 'none'})")


TASK_BUILDERS = ("arith", "tiny_code_tasks")


@dataclass
class TaskSource:
    """Prompts with a way to check answers:
      {builder: arith, n, seed, skip, split, difficulty}   procedural math
      {builder: tiny_code_tasks, n, seed}                  small Python functions with asserts
      {path: FILE.jsonl | hf: NAME, config, split, format: qa|mbpp, fields, limit}
    """

    builder: str | None = None
    path: str | None = None
    hf: str | None = None
    config: str | None = None
    split: str | None = None
    format: Literal["qa", "mbpp"] = "qa"
    fields: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    args: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})  # the builder's own

    def __post_init__(self) -> None:
        kinds = [k for k in ("builder", "path", "hf") if getattr(self, k)]
        check(len(kinds) == 1, "builder: give exactly one of builder:, path:, hf:")
        check(self.limit is None or self.limit >= 1, f"limit: must be >= 1, got {self.limit}")
        if self.builder is not None:
            check(self.builder in TASK_BUILDERS,
                  f"builder: unknown {self.builder!r}; known: {', '.join(TASK_BUILDERS)}")
            from plm.eval import tasks
            fn = tasks.math_tasks_from_arith if self.builder == "arith" else tasks.code_tasks_from_tiny
            check_kwargs(fn, self.builder_args(), f"builder {self.builder}")
        else:
            check(not self.args, f"{next(iter(self.args), '')}: unknown setting for a {kinds[0]}: source")

    def builder_args(self) -> dict[str, Any]:
        return {**self.args, **({"split": self.split} if self.split is not None else {})}


SCORER_KINDS = ("verifier", "math", "code", "reward_model")


@dataclass
class ScorerSpec:
    """`scorer:`: verifier (math final number + code unit tests; the rule-based default) | math |
    code | reward_model (a checkpoint's answer log-probability), each with its own settings."""

    kind: Literal["verifier", "math", "code", "reward_model"] = "verifier"
    args: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})

    def __post_init__(self) -> None:
        from plm.eval import scorers
        fn = {"verifier": scorers.Verifier.from_settings, "math": scorers.MathVerifier,
              "code": scorers.CodeVerifier, "reward_model": scorers.RewardModel}[self.kind]
        check_kwargs(fn, self.args, f"scorer {self.kind}")
        if self.kind == "reward_model":
            check("checkpoint" in self.args, "checkpoint: a reward_model scorer needs checkpoint: DIR")


@dataclass
class GenEvalSpec:
    """Held-out verifiable accuracy (`eval:` of SFT and ARIES, the pipeline's eval stage): greedy
    answers to `tasks`, directly and after `rounds` self-refinements through the template z."""

    tasks: TaskSource | list[TaskSource]
    rounds: int = 1
    max_new_tokens: int = 192
    batch_size: int = 64
    style: Literal["chat", "plain"] = "chat"  # plain: "Question: ...\nAnswer:" for base models
    instruction: str = DEFAULT_REFINE_INSTRUCTION
    bf16: bool | None = None  # autocast generation; None: on CUDA only (no faster on CPUs)
    scorer: str | ScorerSpec = "verifier"
    per_task: bool = False  # keep per-task scores (paired comparisons between models)

    def __post_init__(self) -> None:
        check(self.rounds >= 0, f"rounds: must be >= 0, got {self.rounds}")
        check(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        if isinstance(self.scorer, str):
            check(self.scorer in SCORER_KINDS, f"scorer: must be one of {', '.join(SCORER_KINDS)}, got {self.scorer!r}")
            self.scorer = ScorerSpec(kind=self.scorer)  # type: ignore[arg-type]
