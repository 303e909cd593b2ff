"""Batched answering and self-refinement through the template z, and held-out accuracy.

Accuracy is reported two ways (REFERENCE §4, "inference can be direct, or self-refining"):
  direct: greedy answer to x;  refine: greedy answer, then `rounds` greedy refinements through
  z(x, previous answer); the last answer is scored.
The base (pretrained, not chat-tuned) model is asked in its pretraining layout
"Question: ...\\nAnswer:" (style: plain); it has no refinement score.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from plm.align.tasks import Task
from plm.align.template import DEFAULT_REFINE_INSTRUCTION, direct_messages, refinement_messages
from plm.data.tokenizer import Tokenizer
from plm.infer.generate import GenerationConfig, generate


@dataclass
class SampleConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 192
    batch_size: int = 64
    seed: int = 0
    bf16: bool = False  # autocast generation (CUDA, or CPUs with bf16 support)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SampleConfig":
        from plm.errors import ConfigError
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"sampling: unknown setting(s) {unknown}")
        return cls(**d)


def _autocast(model, on: bool):
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


@torch.no_grad()
def complete(model, tok: Tokenizer, texts: Sequence[str], cfg: SampleConfig, seed_offset: int = 0) -> list[str]:
    """Generate a continuation of each text; batches are formed from similar lengths."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    try:
        for bi, start in enumerate(range(0, len(order), cfg.batch_size)):
            idx = order[start:start + cfg.batch_size]
            gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, seed=cfg.seed + seed_offset * 1000 + bi)
            with _autocast(model, cfg.bf16):
                res = generate(model, tok, [texts[i] for i in idx], gcfg)
            for i, t in zip(idx, res.texts):
                out[i] = t.strip()
    finally:
        model.train(was_training)
    return out


def chat_prompt(tok: Tokenizer, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def answer(model, tok: Tokenizer, tasks: Sequence[Task], cfg: SampleConfig, seed_offset: int = 0,
           system: str | None = None) -> list[str]:
    return complete(model, tok, [chat_prompt(tok, direct_messages(t.prompt, system)) for t in tasks],
                    cfg, seed_offset)


def refine(model, tok: Tokenizer, tasks: Sequence[Task], previous: Sequence[str], cfg: SampleConfig,
           seed_offset: int = 0, instruction: str = DEFAULT_REFINE_INSTRUCTION,
           system: str | None = None) -> list[str]:
    texts = [chat_prompt(tok, refinement_messages(t.prompt, p, instruction, system))
             for t, p in zip(tasks, previous)]
    return complete(model, tok, texts, cfg, seed_offset)


def chains(model, tok: Tokenizer, tasks: Sequence[Task], rounds: int, cfg: SampleConfig, seed_offset: int = 0,
           instruction: str = DEFAULT_REFINE_INSTRUCTION, system: str | None = None) -> list[list[str]]:
    """y_0 ~ p(.|x), then y_k ~ p(.|z(x, y_{k-1})) for k = 1..rounds; every step batched."""
    cur = answer(model, tok, tasks, cfg, seed_offset, system)
    out = [[a] for a in cur]
    for k in range(1, rounds + 1):
        cur = refine(model, tok, tasks, cur, cfg, seed_offset + k, instruction, system)
        for c, a in zip(out, cur):
            c.append(a)
    return out


def evaluate(model, tok: Tokenizer, tasks: Sequence[Task], scorer, rounds: int = 1, max_new_tokens: int = 192,
             batch_size: int = 64, style: str = "chat", instruction: str = DEFAULT_REFINE_INSTRUCTION,
             bf16: bool = False, keep_samples: int = 0, per_task: bool = False) -> dict:
    """Greedy held-out accuracy: {n, direct_acc, refine_acc (chat style), fixed, broken}, plus
    `samples` (the first keep_samples) and per-task score lists (per_task) on request."""
    cfg = SampleConfig(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16)
    if style == "plain":
        texts = [f"Question: {t.prompt}\nAnswer:" for t in tasks]
        outs = [[a] for a in complete(model, tok, texts, cfg)]
        rounds = 0
    elif style == "chat":
        outs = chains(model, tok, tasks, rounds, cfg, instruction=instruction)
    else:
        raise ValueError(f"style must be chat or plain, got {style!r}")
    scores = [scorer.score_batch(tasks, [c[k] for c in outs]) for k in range(rounds + 1)]
    n = len(tasks)
    res = {"n": n, "direct_acc": sum(scores[0]) / n, "style": style, "rounds": rounds}
    if rounds:
        res["refine_acc"] = sum(scores[-1]) / n
        # how refinement moved answers: fixed (wrong -> right) and broken (right -> wrong)
        res["fixed"] = sum(1 for a, b in zip(scores[0], scores[-1]) if b > a)
        res["broken"] = sum(1 for a, b in zip(scores[0], scores[-1]) if a > b)
    if per_task:  # for paired comparisons between models on the same tasks
        res["direct_scores"] = [int(x) for x in scores[0]]
        if rounds:
            res["refine_scores"] = [int(x) for x in scores[-1]]
    if keep_samples:
        res["samples"] = [{"prompt": t.prompt, "reference": t.reference, "answers": c,
                           "scores": [s[i] for s in scores]}
                          for i, (t, c) in enumerate(zip(tasks[:keep_samples], outs))]
    return res
