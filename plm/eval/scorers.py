"""Pluggable answer scorers for ARIES selection and evaluation.

Every scorer has `score_batch(tasks, answers) -> list[float]` and `score(task, answer) -> float`.
* `MathVerifier`   1.0 when the answer's final number equals the reference (plm.data.answers).
* `CodeVerifier`   1.0 when the answer's code passes the task's unit tests in the sandbox
                   (subprocess with time and memory limits, plm.eval.sandbox).
* `Verifier`       dispatches on task.kind to the two above: the rule-based scorer.
* `RewardModel`    a PLM checkpoint as a reward model: the length-normalised log-probability
                   of the answer given the prompt (ChatML), `RewardModel.score(prompt, answer)`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from plm.data.chat import IM_END, chat_prompt, direct_messages
from plm.errors import PLMError
from plm.data.answers import score_math, steps_consistent
from plm.eval.code_tasks import extract_code, score_completions
from plm.eval.tasks import Task

if TYPE_CHECKING:
    from plm.eval.config import ScorerSpec


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

    @classmethod
    def from_settings(cls, check_steps: bool = False, timeout_s: float = 5.0, memory_mb: int = 512,
                      workers: int | None = None) -> "Verifier":
        """The recipe's `scorer: {kind: verifier, ...}` settings."""
        return cls(CodeVerifier(timeout_s, memory_mb, workers), MathVerifier(check_steps))

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
    """A PLM checkpoint as a reward model: score = mean log p(answer tokens, then <|im_end|> |
    the ChatML prompt), through the evaluation engine (`plm.eval.lm.PLMEvalModel`).

    Simple but real: a stronger (e.g. later or larger) checkpoint judges how likely it would
    have been to give this answer; higher is better. Scores are continuous (use selection: reward).
    """

    binary = False

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 16, max_len: int = 1024) -> None:
        from plm.eval.lm import PLMEvalModel
        self.lm = PLMEvalModel.from_pretrained(checkpoint, device=device, batch_size=batch_size,
                                               max_length=max_len, progress=False)

    def score_texts(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        reqs = [self._split(chat_prompt(direct_messages(p)), a + IM_END) for p, a in zip(prompts, answers)]
        return [lp / len(cont) for (lp, _), (_, cont) in zip(self.lm.loglikelihood_tokens(reqs), reqs)]

    def _split(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """The chat's own token ids, cut where the prompt ends: the answer's tokens exactly as
        the model would have produced them (ChatML's special tokens keep the cut clean)."""
        tok = self.lm.tokenizer
        head, ids = tok.encode(prompt), tok.encode(prompt + response)
        if ids[:len(head)] == head and len(ids) > len(head):
            return head, ids[len(head):]
        return self.lm.encode_pair(prompt, response)

    def score(self, prompt, answer: str) -> float:  # type: ignore[override]
        """score(prompt, answer) -> float; `prompt` may be a Task."""
        p = prompt.prompt if isinstance(prompt, Task) else prompt
        return self.score_texts([p], [answer])[0]

    def score_batch(self, tasks: Sequence[Task], answers: Sequence[str]) -> list[float]:
        return self.score_texts([t.prompt for t in tasks], list(answers))


def build_scorer(spec: ScorerSpec) -> _Base:
    """The scorer a parsed `scorer:` section describes."""
    if spec.kind == "verifier":
        return Verifier.from_settings(**spec.args)
    if spec.kind == "math":
        return MathVerifier(**spec.args)
    if spec.kind == "code":
        return CodeVerifier(**spec.args)
    return RewardModel(**spec.args)
