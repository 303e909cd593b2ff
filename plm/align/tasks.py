"""Prompts with a way to check answers: the input of ARIES and of post-training evaluation.

A `Task` is a prompt x plus what a verifier needs: the reference final number (math) or a
`CodeProblem` with unit tests (code). Sources (a recipe's `prompts:` / `eval:` entries):
  {builder: arith, n, seed, skip, split, difficulty}  procedural math (plm.data.arith)
  {builder: tiny_code_tasks, n, seed}                 small Python-function tasks with asserts
  {path: FILE.jsonl | hf: NAME, config, split, format: qa}    GSM8K layout: question/answer '#### N'
  {path: FILE.jsonl | hf: NAME, config, split, format: mbpp}  MBPP layout: text/code/test_list
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plm.errors import ConfigError, PLMError


@dataclass(frozen=True)
class Task:
    prompt: str
    kind: str = "math"  # math | code
    reference: str | None = None  # math: the final answer
    code: Any = None  # code: plm.eval.code_tasks.CodeProblem
    id: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def math_tasks_from_arith(n: int, seed: int = 0, skip: int = 0, split: str = "train",
                          difficulty: int | None = None) -> list[Task]:
    from plm.align.tiny_data import arith_problems
    return [Task(p.question, "math", str(p.answer), id=f"arith-{split}-{seed}-{skip + i}",
                 meta={"level": p.level, "template": p.template})
            for i, p in enumerate(arith_problems(n, seed, skip, split, difficulty))]


def code_tasks_from_tiny(n: int, seed: int = 0) -> list[Task]:
    from plm.align.tiny_data import tiny_code_tasks
    from plm.eval.code_tasks import CodeProblem
    out = []
    for i, t in enumerate(tiny_code_tasks(n, seed)):
        prob = CodeProblem(task_id=f"tiny-code-{seed}-{i}", prompt=t["prompt"], test=t["tests"],
                           canonical_solution=t["solution"], source="mbpp")
        out.append(Task(t["prompt"], "code", None, prob, id=prob.task_id))
    return out


def load_tasks(spec: dict, where: str = "prompts") -> list[Task]:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    spec = dict(spec)
    limit = spec.pop("limit", None)
    if "builder" in spec:
        b = spec.pop("builder")
        try:
            if b == "arith":
                tasks = math_tasks_from_arith(**spec)
            elif b == "tiny_code_tasks":
                tasks = code_tasks_from_tiny(**spec)
            else:
                raise ConfigError(f"{where}: unknown builder {b!r}; known: arith, tiny_code_tasks")
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif spec.get("path") or spec.get("hf"):
        from plm.align.data import load_hf, read_jsonl
        records = (read_jsonl(spec["path"]) if spec.get("path")
                   else load_hf(spec["hf"], spec.get("config"), spec.get("split", "train")))
        fmt = spec.get("format", "qa")
        fields = {"question": "question", "answer": "answer", **(spec.get("fields") or {})}
        tasks = []
        for i, r in enumerate(records):
            if limit is not None and i >= int(limit):
                break
            r = dict(r)
            if fmt == "qa":
                from plm.eval.answers import extract_reference_answer
                ans = str(r[fields["answer"]])
                ref = extract_reference_answer(ans) if "####" in ans else ans.strip()
                tasks.append(Task(str(r[fields["question"]]), "math", ref, id=f"{where}-{i}"))
            elif fmt == "mbpp":
                from plm.eval.code_tasks import mbpp_problem
                prob = mbpp_problem(r, f"{where}[{i}]")
                tasks.append(Task(prob.prompt, "code", None, prob, id=prob.task_id))
            else:
                raise ConfigError(f"{where}: format must be qa or mbpp, got {fmt!r}")
    else:
        raise ConfigError(f"{where}: give builder:, path: or hf:")
    if limit is not None:
        tasks = tasks[: int(limit)]
    if not tasks:
        raise PLMError(f"{where}: no prompts")
    return tasks


def load_task_pool(spec: dict | list, seed: int = 0, where: str = "prompts") -> list[Task]:
    """One task source, or a list of them mixed in a seeded order (e.g. math and code prompts)."""
    if isinstance(spec, list):
        import random
        pool = [t for i, s in enumerate(spec) for t in load_tasks(s, f"{where}[{i}]")]
        random.Random(f"pool:{seed}").shuffle(pool)
        return pool
    return load_tasks(spec, where)
