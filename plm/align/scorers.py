"""Pluggable answer scorers for ARIES selection and evaluation.

Every scorer has `score_batch(tasks, answers) -> list[float]` and `score(task, answer) -> float`.
* `MathVerifier`   1.0 when the answer's final number equals the reference (plm.eval.answers).
* `CodeVerifier`   1.0 when the answer's code passes the task's unit tests in the sandbox
                   (subprocess with time and memory limits, plm.eval.sandbox).
* `Verifier`       dispatches on task.kind to the two above: the rule-based scorer.
* `RewardModel`    a PLM checkpoint as a reward model: the length-normalised log-probability
                   of the answer given the prompt (ChatML), `RewardModel.score(prompt, answer)`.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from plm.align.tasks import Task
from plm.errors import ConfigError, PLMError


class Scorer(Protocol):
    binary: bool  # scores are verifier correctness (0/1)

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]: ...


class _Base:
    binary = True

    def score(self, task: Task, answer: str) -> float:
        return self.score_batch([task], [answer])[0]


class MathVerifier(_Base):
    """Final-number match, the same extraction as GSM8K evaluation. With `check_steps`, every
    spelled-out step "a op b = r" of the answer must also be right: a small model often lands on
    the right number through wrong working, and such an answer is a poor "chosen" example."""

    def __init__(self, check_steps: bool = False) -> None:
        self.check_steps = check_steps

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]:
        from plm.eval.answers import score_math, steps_consistent
        out = []
        for t, a in zip(tasks, answers, strict=True):
            if t.reference is None:
                raise PLMError(f"math task {t.id or t.prompt[:40]!r} has no reference answer")
            ok = score_math(a, t.reference) and (not self.check_steps or steps_consistent(a))
            out.append(1.0 if ok else 0.0)
        return out


class CodeVerifier(_Base):
    """Unit tests in the sandbox: a fenced ```python block (or the raw text) must pass them."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, workers: int | None = None) -> None:
        self.timeout_s, self.memory_mb, self.workers = timeout_s, memory_mb, workers

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]:
        from plm.eval.code_tasks import extract_code, score_completions
        if not tasks:
            return []
        probs = [t.code for t in tasks]
        if any(p is None for p in probs):
            raise PLMError("a code task has no unit tests")
        codes = [extract_code(a, p) for a, p in zip(answers, probs, strict=True)]
        passed = score_completions(probs, codes, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                                   workers=self.workers)
        return [1.0 if ok else 0.0 for ok in passed]


class Verifier(_Base):
    """Math and code verification by task kind (rule-based selection's correctness)."""

    def __init__(self, code: CodeVerifier | None = None, math: MathVerifier | None = None) -> None:
        self.math, self.code = math or MathVerifier(), code or CodeVerifier()

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]:
        out: list[float] = [0.0] * len(tasks)
        for kind, scorer in (("math", self.math), ("code", self.code)):
            idx = [i for i, t in enumerate(tasks) if t.kind == kind]
            for i, s in zip(idx, scorer.score_batch([tasks[i] for i in idx], [answers[i] for i in idx])):
                out[i] = s
        unknown = {t.kind for t in tasks} - {"math", "code"}
        if unknown:
            raise PLMError(f"no verifier for task kind(s) {sorted(unknown)}")
        return out


class RewardModel(_Base):
    """A PLM checkpoint as a reward model: score = mean log p(answer tokens | ChatML prompt).

    Simple but real: a stronger (e.g. later or larger) checkpoint judges how likely it would
    have been to give this answer; higher is better. Scores are continuous (use selection: reward).
    """

    binary = False

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 16, max_len: int = 1024,
                 tokenizer: str | None = None) -> None:
        from plm.data.tokenizer import Tokenizer
        from plm.model.checkpoint import load_model
        self.model = load_model(checkpoint, dtype=torch.float32, device=device).eval()
        self.tok = Tokenizer.from_dir(tokenizer or checkpoint)
        self.batch_size, self.max_len = batch_size, max_len

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        from plm.align.data import encode_prompt_response, pad_batch
        from plm.align.losses import sequence_logps
        from plm.align.template import direct_messages
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = [encode_prompt_response(self.tok, direct_messages(p), a, self.max_len)
                   for p, a in zip(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])]
            b = {k: v.to(self.model.device) for k, v in pad_batch(enc, self.tok.pad_token_id).items()}
            lp = sequence_logps(self.model, b["input_ids"], b["labels"], b["attention_mask"])
            n = (b["labels"] != -100).sum(-1).clamp(min=1)
            out += (lp / n).tolist()
        return out

    def score(self, prompt, answer: str) -> float:  # type: ignore[override]
        """score(prompt, answer) -> float; `prompt` may be a Task."""
        p = prompt.prompt if isinstance(prompt, Task) else prompt
        return self.score_texts([p], [answer])[0]

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]:
        return self.score_texts([t.prompt for t in tasks], list(answers))


def build_scorer(spec: dict | str | None) -> _Base:
    """scorer: verifier (default) | math | code | {kind: reward_model, checkpoint: DIR} |
    {kind: verifier, timeout_s, memory_mb, check_steps}."""
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec or {"kind": "verifier"})
    kind = spec.pop("kind", "verifier")
    try:
        if kind == "verifier":
            steps = bool(spec.pop("check_steps", False))
            return Verifier(CodeVerifier(**spec), MathVerifier(steps))
        if kind == "math":
            return MathVerifier(**spec)
        if kind == "code":
            return CodeVerifier(**spec)
        if kind == "reward_model":
            if "checkpoint" not in spec:
                raise ConfigError("scorer: reward_model needs checkpoint: DIR")
            return RewardModel(**spec)
    except TypeError as e:
        raise ConfigError(f"scorer: {e}") from None
    raise ConfigError(f"scorer.kind must be verifier, math, code or reward_model, got {kind!r}")
