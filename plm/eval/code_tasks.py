"""HumanEval and MBPP: load problems, turn generations into check programs, score in the sandbox."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from plm.errors import PLMError
from plm.eval.data import default_data_dir
from plm.eval.sandbox import run_many
from plm.utils import iter_jsonl as _read_jsonl

SHARED_DATA_ENV = "PLM_SHARED_DATA"  # also honoured: $PLM_DATA (checked first)

# The Codex paper's stop sequences: a completion continues the prompt's function body,
# so any new top-level statement means the model has moved on.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# MBPP generations are whole solutions (helper defs allowed); stop where tests or demos start.
MBPP_STOP = ("\nassert ", "\nif __name__", "\nprint(", "\n```")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def shared_data_dir() -> Path:
    """Where benchmark data lives (see plm.eval.data.default_data_dir)."""
    return default_data_dir()


@dataclass(frozen=True)
class CodeProblem:
    """One code-generation problem.

    HumanEval: ``prompt`` is the signature and docstring the model continues, ``test``
    defines ``check(candidate)``. MBPP: ``prompt`` is the task text plus its asserts (the
    model needs them to learn the function name), ``test`` is the asserts, and
    ``entry_point`` is None.
    """

    task_id: str
    prompt: str
    test: str
    canonical_solution: str
    entry_point: str | None = None
    setup_code: str = ""
    source: str = "humaneval"  # or "mbpp"

    def program(self, completion: str) -> str:
        """The program that exits 0 exactly when ``completion`` solves this problem."""
        if self.source == "humaneval":
            # A fenced full function after the prompt simply redefines it; that is fine.
            return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"
        return f"{completion}\n\n{self.setup_code}\n\n{self.test}\n"


def _require(record: dict[str, Any], fields: Sequence[str], path: Path, lineno: int) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise PLMError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")


def load_humaneval(path: str | Path | None = None) -> list[CodeProblem]:
    """HumanEval problems from ``HumanEval.jsonl(.gz)``; default ``<shared>/humaneval/``."""
    path = Path(path) if path is not None else shared_data_dir() / "humaneval" / "HumanEval.jsonl.gz"
    problems = []
    for lineno, r in _read_jsonl(path):
        _require(r, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), path, lineno)
        problems.append(CodeProblem(task_id=str(r["task_id"]), prompt=r["prompt"], test=r["test"],
                                    canonical_solution=r["canonical_solution"],
                                    entry_point=r["entry_point"], source="humaneval"))
    return problems


def mbpp_problem(r: dict[str, Any], where: str = "MBPP record") -> CodeProblem:
    """One MBPP record (fields task_id, text, code, test_list[, test_setup_code]) as a problem."""
    missing = [f for f in ("task_id", "text", "code", "test_list") if f not in r]
    if missing:
        raise PLMError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(r["test_list"], list) or not r["test_list"]:
        raise PLMError(f"{where}: test_list must be a non-empty list of asserts")
    test = "\n".join(r["test_list"])
    return CodeProblem(
        task_id=str(r["task_id"]),
        prompt=f"{r['text']}\nYour code should pass these tests:\n{test}\n",
        test=test,
        canonical_solution=r["code"],
        setup_code=r.get("test_setup_code") or "",
        source="mbpp",
    )


def load_mbpp(path: str | Path) -> list[CodeProblem]:
    """MBPP problems from a JSONL file (fields task_id, text, code, test_list[, test_setup_code])."""
    path = Path(path)
    return [mbpp_problem(r, f"{path}:{lineno}") for lineno, r in _read_jsonl(path)]


def extract_code(generation: str, problem: CodeProblem) -> str:
    """The usable code in a model generation.

    A ```python fence wins (chat-style answers); otherwise the raw continuation is cut at
    the first stop sequence for the problem's benchmark.
    """
    fenced = _FENCE.search(generation)
    if fenced:
        return fenced.group(1)
    stops = HUMANEVAL_STOP if problem.source == "humaneval" else MBPP_STOP
    cut = min((i for i in (generation.find(s) for s in stops) if i >= 0), default=len(generation))
    return generation[:cut]


def score_completions(
    problems: Sequence[CodeProblem],
    completions: Sequence[str],
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    workers: int | None = None,
) -> list[bool]:
    """Whether each completion passes its problem's tests, run in the sandbox."""
    if len(problems) != len(completions):
        raise PLMError(f"got {len(completions)} completions for {len(problems)} problems")
    programs = [p.program(c) for p, c in zip(problems, completions)]
    return [r.passed for r in run_many(programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)]


def pass_at_1(results: Sequence[bool]) -> float:
    """Fraction of problems solved with one sample each."""
    if not results:
        raise PLMError("pass@1 needs at least one result")
    return sum(map(bool, results)) / len(results)
