"""Held-out verifiable accuracy of a checkpoint on `Task`s (arithmetic, small code tasks, GSM8K-
layout files): what SFT and ARIES report after each phase and iteration, and the pipeline's
eval stage. Runs on the benchmarks' engine (`refinement_rounds` over `PLMEvalModel`).

Accuracy is reported two ways (inference "can be direct, or self-refining"): direct, the greedy
answer to x; refine, the greedy answer and then `rounds` greedy refinements through z(x,
previous answer), the last answer scored. A base (pretrained, not chat-tuned) model is asked in
its pretraining layout "Question: ...\\nAnswer:" (style: plain) and has no refinement score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from plm.eval.config import GenEvalSpec
from plm.eval.gen_tasks import GenItem, refinement_rounds
from plm.eval.lm import EvalLM
from plm.eval.scorers import Scorer, build_scorer
from plm.eval.tasks import Task, load_task_pool
from plm.recipe import to_dict
from plm.report import HeldoutResult
from plm.utils import atomic_write_json, cache_dir, sha256_path, short_hash


def task_items(tasks: Sequence[Task]) -> list[GenItem]:
    return [GenItem(id=t.id, completion_prompt=f"Question: {t.prompt}\nAnswer:", request=t.prompt, reference=t)
            for t in tasks]


def evaluate_tasks(lm: EvalLM, tasks: Sequence[Task], scorer: Scorer, rounds: int = 1, max_new_tokens: int = 192,
                   style: str = "chat", instruction: str | None = None, per_task: bool = False,
                   keep_samples: int = 0, batch_size: int | None = None) -> HeldoutResult:
    """Greedy held-out accuracy of `lm` on `tasks`, directly and (chat style) after `rounds`
    self-refinements."""
    items = task_items(tasks)

    def score(its: Sequence[GenItem], outs: Sequence[str]) -> list[dict[str, Any]]:
        return [{"correct": s} for s in scorer.score_batch([it.reference for it in its], outs)]

    kw = {"instruction": instruction} if instruction else {}
    per_round, samples = refinement_rounds(lm, items, score, mode="completion" if style == "plain" else "chat",
                                           refine=rounds if style == "chat" else 0, max_new_tokens=max_new_tokens,
                                           label="held-out", batch_size=batch_size, **kw)
    scores = [[r["correct"] for r in s["rounds"]] for s in samples]
    res = HeldoutResult(n=len(tasks), direct_acc=per_round[0]["accuracy"], style=style, rounds=len(per_round) - 1)
    if res.rounds:
        res.refine_acc, res.fixed, res.broken = (per_round[-1]["accuracy"], per_round[-1]["fixed"],
                                                 per_round[-1]["broken"])
    if per_task:
        res.direct_scores = [float(s[0]) for s in scores]
        if res.rounds:
            res.refine_scores = [float(s[-1]) for s in scores]
    if keep_samples:
        res.samples = [{"prompt": t.prompt, "reference": t.reference, "answers": [r["output"] for r in s["rounds"]],
                        "scores": sc} for t, s, sc in zip(tasks[:keep_samples], samples, scores)]
    return res


def evaluate_checkpoint(path: str | Path, spec: GenEvalSpec, device: str = "cpu", style: str | None = None,
                        bf16: bool | None = None, use_cache: bool = True) -> HeldoutResult:
    """Held-out accuracy of a saved model under `spec`. Results are cached by the checkpoint's
    content and the settings (in the cache folder, $PLM_CACHE), so an unchanged model (e.g. the
    SFT model as ARIES's iteration 0) is scored once."""
    import torch

    from plm.data.tokenizer import Tokenizer
    from plm.eval.lm import PLMEvalModel
    from plm.model.checkpoint import load_model

    path = Path(path)
    style = style or spec.style
    bf16 = spec.bf16 if bf16 is None else bf16
    if bf16 is None:  # autocast generation on CUDA only: on CPUs it is no faster
        bf16 = torch.device(device).type == "cuda"
    key = short_hash({"model": sha256_path(path), "spec": to_dict(spec), "style": style, "bf16": bf16})
    cache = cache_dir("eval", f"{key}.json")
    if use_cache and cache.exists():
        try:
            return HeldoutResult.from_dict(json.loads(cache.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass  # a damaged cache entry is recomputed
    model = load_model(path, dtype="float32", device=device)
    lm = PLMEvalModel(model, Tokenizer.from_dir(path), batch_size=spec.batch_size,
                      max_length=model.config.max_position_embeddings, progress=False, autocast_bf16=bf16)
    tasks = load_task_pool(spec.tasks, 0, "eval.tasks")
    res = evaluate_tasks(lm, tasks, build_scorer(spec.scorer), rounds=spec.rounds, max_new_tokens=spec.max_new_tokens,
                         style=style, instruction=spec.instruction, per_task=spec.per_task)
    if use_cache:
        atomic_write_json(cache, res.as_dict())
    return res
