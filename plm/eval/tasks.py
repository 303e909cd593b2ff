"""Prompts with a way to check answers: the input of ARIES and of post-training evaluation.

A `Task` is a prompt x plus what a verifier needs: the reference final number (math) or a
`CodeProblem` with unit tests (code). Sources (a recipe's `prompts:` / `eval:` entries):
  {builder: arith, n, seed, skip, split, difficulty}  procedural math (plm.data.arith)
  {builder: tiny_code_tasks, n, seed}                 small Python-function tasks with asserts
  {path: FILE.jsonl | hf: NAME, config, split, format: qa}    GSM8K layout: question/answer '#### N'
  {path: FILE.jsonl | hf: NAME, config, split, format: mbpp}  MBPP layout: text/code/test_list
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plm.data.answers import extract_reference_answer
from plm.data.hf import load_hf_dataset
from plm.errors import PLMError
from plm.eval.code_tasks import CodeProblem, mbpp_problem
from plm.utils import read_jsonl

if TYPE_CHECKING:
    from plm.eval.config import TaskSource


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
    from plm.data.tiny import arith_problems
    return [Task(p.question, "math", str(p.answer), id=f"arith-{split}-{seed}-{skip + i}",
                 meta={"level": p.level, "template": p.template})
            for i, p in enumerate(arith_problems(n, seed, skip, split, difficulty))]


def code_tasks_from_tiny(n: int, seed: int = 0) -> list[Task]:
    from plm.data.tiny import tiny_code_tasks
    out = []
    for i, t in enumerate(tiny_code_tasks(n, seed)):
        prob = CodeProblem(task_id=f"tiny-code-{seed}-{i}", prompt=t["prompt"], test=t["tests"],
                           canonical_solution=t["solution"], source="mbpp")
        out.append(Task(t["prompt"], "code", None, prob, id=prob.task_id))
    return out


def load_tasks(src: TaskSource, where: str = "prompts") -> list[Task]:
    """The tasks of one source (a parsed `TaskSource`)."""
    if src.builder is not None:
        build = math_tasks_from_arith if src.builder == "arith" else code_tasks_from_tiny
        tasks = build(**src.builder_args())
    else:
        records = (read_jsonl(src.path) if src.path
                   else load_hf_dataset(src.hf, src.config, src.split or "train"))
        fields = {"question": "question", "answer": "answer", **src.fields}
        tasks = []
        for i, r in enumerate(records):
            if src.limit is not None and i >= src.limit:
                break
            r = dict(r)
            if src.format == "qa":
                missing = [f for f in (fields["question"], fields["answer"]) if f not in r]
                if missing:
                    raise PLMError(f"{where}: record {i} has no field {missing[0]!r} (found: {', '.join(r)}); "
                                   "map the names with fields: {question: ..., answer: ...}")
                ans = str(r[fields["answer"]])
                ref = extract_reference_answer(ans) if "####" in ans else ans.strip()
                tasks.append(Task(str(r[fields["question"]]), "math", ref, id=f"{where}-{i}"))
            else:
                prob = mbpp_problem(r, f"{where}[{i}]")
                tasks.append(Task(prob.prompt, "code", None, prob, id=prob.task_id))
    if src.limit is not None:
        tasks = tasks[:src.limit]
    if not tasks:
        raise PLMError(f"{where}: no prompts")
    return tasks


def load_task_pool(spec: TaskSource | list[TaskSource], seed: int = 0, where: str = "prompts") -> list[Task]:
    """One task source, or a list of them mixed in a seeded order (e.g. math and code prompts)."""
    if isinstance(spec, list):
        pool = [t for i, s in enumerate(spec) for t in load_tasks(s, f"{where}[{i}]")]
        random.Random(f"pool:{seed}").shuffle(pool)
        return pool
    return load_tasks(spec, where)
