"""The typed pipeline recipe (`plm pipeline RECIPE`, recipes/tiny/pipeline.yaml): which stages
run, each stage's settings, and the stage recipes they drive. Imports nothing heavy.

A stage that runs a stage recipe (pretrain, sft, aries) names its YAML with `recipe:` (relative
to the pipeline file) and may override its settings with `set: [KEY=VALUE, ...]`; the pipeline
sets the stage recipe's `vars.run` to its own run folder, so every path built from ${run}
lands inside this run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plm.eval.config import GenEvalSpec
from plm.recipe import check, parse


@dataclass
class CorpusStage:
    code_bytes: int = 6_000_000
    math_problems: int = 20_000
    math_test: int = 500
    seed: int = 0


@dataclass
class TokenizerStage:
    vocab_size: int = 4096
    inputs: list[str] = field(default_factory=list)  # default: the corpus's code, docs and math

    def __post_init__(self) -> None:
        check(self.vocab_size >= 259, f"vocab_size: must be at least 259 (bytes + specials), got {self.vocab_size}")


@dataclass
class RecipeStage:
    recipe: str
    set: list[str] = field(default_factory=list)


@dataclass
class AriesStage(RecipeStage):
    baseline: list[str] = field(default_factory=list)  # extra --set for the lambda = 0 DPO baseline run


@dataclass
class PerplexitySpec:
    data: str  # a prepared token folder
    seq_len: int = 256
    batch: int = 8
    batches: int = 4


@dataclass
class EvalStage:
    math: GenEvalSpec | None = None  # the pretrained model, plain prompts
    code: GenEvalSpec | None = None  # every post-trained checkpoint
    perplexity: PerplexitySpec | None = None  # every checkpoint


@dataclass
class SparsityStage:
    tokens: int = 4096
    seq_len: int = 256
    data: list[str] = field(default_factory=list)  # default: the corpus's math test split
    text_field: str = "answer"
    checkpoint: str | None = None  # default: the most trained checkpoint


@dataclass
class ExportStage:
    types: list[str] = field(default_factory=lambda: ["f32", "f16", "q8_0"])
    check_tokens: int = 64
    greedy_tokens: int = 32
    checkpoint: str | None = None


@dataclass
class BenchStage:
    """The edge benchmark on the run's model: any setting of plm.bench.edge.EdgeBenchSettings
    (threads, contexts, decode_tokens, contention, engines, ...)."""

    checkpoint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})

    def __post_init__(self) -> None:
        import dataclasses

        from plm.bench.edge import EdgeBenchSettings
        known = {f.name for f in dataclasses.fields(EdgeBenchSettings)} - {"ckpt", "out", "workdir", "command"}
        for k in self.settings:
            check(k in known, f"{k}: not a setting of the edge benchmark (settings: {', '.join(sorted(known))})")
        parse(EdgeBenchSettings, self.settings, "")  # types and values


STAGE_SETTINGS: dict[str, type] = {
    "corpus": CorpusStage, "tokenizer": TokenizerStage, "pretrain": RecipeStage, "sft": RecipeStage,
    "aries": AriesStage, "eval": EvalStage, "sparsity": SparsityStage, "export": ExportStage, "bench": BenchStage,
}


@dataclass
class PipelineRecipe:
    name: str = "pipeline"
    vars: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> its settings, in STAGE_SETTINGS order
    source: str = field(default="", metadata={"internal": True})

    def __post_init__(self) -> None:
        check(bool(self.stages), "stages: name at least one stage")
        typed = {}
        for name, value in self.stages.items():
            check(name in STAGE_SETTINGS, f"stages.{name}: unknown stage; stages are: {', '.join(STAGE_SETTINGS)}")
            typed[name] = parse(STAGE_SETTINGS[name], value or {}, f"stages.{name}")
        self.stages = {n: typed[n] for n in STAGE_SETTINGS if n in typed}

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def stage_recipe_path(self, stage: RecipeStage) -> Path:
        """A stage recipe's file: relative paths are relative to the pipeline recipe's folder."""
        p = Path(stage.recipe)
        return p if p.is_absolute() or not self.source else Path(self.source).parent / p
