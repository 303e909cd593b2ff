"""Run a pipeline recipe end to end: parse it and every stage recipe it names (so a mistake in
any of them fails before the first stage starts), run the stages, write RUN/report.md."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from plm.align.config import AriesRecipe, SFTRecipe
from plm.pipeline.config import PipelineRecipe, RecipeStage
from plm.pipeline.engine import Context, run_pipeline, stage_times
from plm.pipeline.stages import STAGES
from plm.recipe import find_recipe, load_recipe
from plm.report import pipeline_report
from plm.train.config import PretrainRecipe
from plm.utils import atomic_write_text

STAGE_RECIPES = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "aries": AriesRecipe}


def resolve_recipe_path(path: str | Path) -> Path:
    """A pipeline recipe file, or a folder holding pipeline.yaml (here or among the shipped recipes)."""
    p = find_recipe(path)
    return p / "pipeline.yaml" if p.is_dir() else p


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineRecipe, Context]:
    """The typed pipeline recipe and a context holding every stage recipe, parsed with
    `vars.run` set to the pipeline's run folder and the stage's own `set:` overrides."""
    recipe = load_recipe(resolve_recipe_path(path), PipelineRecipe, overrides)
    ctx = Context(recipe.run_path)
    for name, cls in STAGE_RECIPES.items():
        s = recipe.stages.get(name)
        if not isinstance(s, RecipeStage):
            continue
        sets = [f"vars.run={ctx.run_dir}"] + list(s.set)
        ctx.recipes[name] = load_recipe(recipe.stage_recipe_path(s), cls, sets)
        if name == "aries" and s.baseline:  # the lambda = 0 DPO baseline with the same budget
            ctx.recipes["aries-baseline"] = load_recipe(recipe.stage_recipe_path(s), cls, sets + list(s.baseline))
    return recipe, ctx


def run(path: str | Path, overrides: list[str] | None = None, start_from: str | None = None) -> Path:
    """`plm pipeline`: every stage, then RUN/report.md; returns the report's path."""
    recipe, ctx = load_pipeline(path, overrides)
    run_pipeline(recipe.stages, STAGES, ctx, start_from)
    return write_report(recipe, ctx)


def write_report(recipe: PipelineRecipe, ctx: Context) -> Path:
    r, run_dir = ctx.results, ctx.run_dir
    host = (f"{datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
            f"({platform.machine()}, {os.cpu_count()} cores)")
    md = pipeline_report(recipe.name, r, run_dir, stage_times(run_dir, list(recipe.stages)), host,
                         training_plot(r, run_dir))
    path = atomic_write_text(run_dir / "report.md", md)
    print(f"report: {path}")
    return path


def training_plot(r: dict, run_dir: Path) -> Path | None:
    """One PNG of loss and LR over every training phase of the run (pretrain, SFT, ARIES)."""
    from plm.train.plots import plot_stages
    from plm.train.trainer import read_metrics
    segments = []
    for stage, label in (("pretrain", "pretraining"), ("sft", "SFT")):
        ck = (r.get(stage) or {}).get("checkpoint")
        if ck and (Path(ck).parent / "metrics.jsonl").exists():
            segments.append((label, read_metrics(Path(ck).parent)))
    ck = (r.get("aries") or {}).get("checkpoint")
    if ck:
        for it in sorted(Path(ck).parent.glob("iter-*"), key=lambda p: int(p.name.split("-")[1])):
            if (it / "metrics.jsonl").exists():
                segments.append((f"ARIES {it.name}", read_metrics(it)))
    if not segments:
        return None
    return plot_stages(segments, run_dir / "loss_lr_all.png", "loss and learning rate over all training phases")
