"""Generation benchmarks: GSM8K (n-shot chain of thought, final-number exact match), HumanEval
and MBPP (pass@1 in the sandbox), each direct or self-refining.

Two prompt modes:
- ``completion`` (the default without --refine): the model continues a plain-text prompt,
  as lm-evaluation-harness does (GSM8K "Question: ...\\nAnswer:" with n worked examples,
  the HumanEval function header, MBPP with three solved examples).
- ``chat``: the request x is sent as a ChatML user turn (``direct_messages``).

Self-refinement (``refine=K``, always chat): answer x, then K times ask for an improved
answer through the ARIES template z(x, y_prev) (``refinement_messages``); every round is
scored, so the report shows accuracy per round.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from plm.data.chat import DEFAULT_REFINE_INSTRUCTION, direct_messages, refinement_messages
from plm.errors import PLMError
from plm.data.answers import extract_final_number, extract_reference_answer, numbers_equal
from plm.eval.code_tasks import (HUMANEVAL_STOP, MBPP_STOP, CodeProblem, extract_code, load_humaneval,
                                 load_mbpp, mbpp_problem, score_completions)
from plm.eval.data import find_local, from_hf, load_hf_records
from plm.eval.lm import EvalLM
from plm.infer.generate import truncate_at_stop
from plm.utils import iter_jsonl

MODES = ("completion", "chat")
GSM8K_CHAT_INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."
HUMANEVAL_CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                              "in a single ```python code block.")
MBPP_CHAT_INSTRUCTION = "Reply with the code in a single ```python code block."
MBPP_FEWSHOT_IDS = ("2", "3", "4")  # the MBPP paper's prompt examples
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass
class GenItem:
    id: str
    completion_prompt: str  # what the model continues in completion mode
    request: str  # x: the user turn in chat mode, and what refinement shows back
    reference: Any  # GSM8K: the canonical answer; code: the CodeProblem


@dataclass
class CodeLimits:
    timeout_s: float = 10.0
    memory_mb: int = 512
    workers: int | None = None


@dataclass(frozen=True)
class GenTask:
    name: str
    title: str
    metric: str
    max_new_tokens: int
    completion_stop: tuple[str, ...]
    default_fewshot: dict[str, int]  # per mode
    load: Callable[..., tuple[list[GenItem], str]]
    score: Callable[[Sequence[GenItem], Sequence[str], CodeLimits], list[dict[str, Any]]]


# ---- GSM8K ------------------------------------------------------------------------------
def _gsm8k_records(data_dir: Path, split: str, source: str) -> tuple[list[dict], str]:
    local = find_local(data_dir, "gsm8k", split) if source in ("auto", "local") else None
    if local is not None:
        return [r for _, r in iter_jsonl(local)], str(local)
    records = from_hf("gsm8k", data_dir / "gsm8k" / f"{split}.jsonl", source,
                      lambda: load_hf_records("openai/gsm8k", "main", split), hf="openai/gsm8k (main)")
    return records, f"hf:openai/gsm8k/main:{split}"


def gsm8k_shot(record: dict) -> str:
    """One worked example: the reference solution without its <<calculator>> annotations."""
    return f"Question: {record['question']}\nAnswer: {_CALCULATOR.sub('', record['answer'])}\n\n"


def load_gsm8k(data_dir: Path, source: str = "auto", limit: int | None = None, num_fewshot: int = 5,
               mode: str = "completion") -> tuple[list[GenItem], str]:
    records, where = _gsm8k_records(data_dir, "test", source)
    records = records[:limit] if limit is not None else records
    shots = ""
    if num_fewshot > 0:
        pool, _ = _gsm8k_records(data_dir, "train", source)
        if len(pool) < num_fewshot:
            raise PLMError(f"gsm8k: {num_fewshot}-shot needs {num_fewshot} training examples, found {len(pool)}")
        shots = "".join(gsm8k_shot(r) for r in pool[:num_fewshot])
    items = []
    for i, r in enumerate(records):
        if "question" not in r or "answer" not in r:
            raise PLMError(f"{where}: record {i} lacks 'question' or 'answer'")
        items.append(GenItem(id=str(i), completion_prompt=f"{shots}Question: {r['question']}\nAnswer:",
                             request=f"{shots}Question: {r['question']}\n{GSM8K_CHAT_INSTRUCTION}",
                             reference=extract_reference_answer(r["answer"])))
    return items, where


def score_gsm8k(items: Sequence[GenItem], outputs: Sequence[str], limits: CodeLimits) -> list[dict[str, Any]]:
    out = []
    for item, text in zip(items, outputs):
        got = extract_final_number(text)
        out.append({"correct": numbers_equal(got, item.reference), "extracted": got})
    return out


# ---- HumanEval ----------------------------------------------------------------------------
def _humaneval_problems(data_dir: Path, source: str) -> tuple[list[CodeProblem], str]:
    if source in ("auto", "local"):
        for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl", "test.jsonl", "test.jsonl.gz"):
            p = data_dir / "humaneval" / name
            if p.is_file():
                return load_humaneval(p), str(p)
    recs = from_hf("humaneval", data_dir / "humaneval" / "HumanEval.jsonl.gz", source,
                   lambda: load_hf_records("openai/openai_humaneval", None, "test"),
                   hf="openai/openai_humaneval")
    return [CodeProblem(task_id=r["task_id"], prompt=r["prompt"], test=r["test"],
                        canonical_solution=r["canonical_solution"], entry_point=r["entry_point"])
            for r in recs], "hf:openai/openai_humaneval:test"


def load_humaneval_items(data_dir: Path, source: str = "auto", limit: int | None = None,
                         num_fewshot: int = 0, mode: str = "completion") -> tuple[list[GenItem], str]:
    if num_fewshot:
        raise PLMError("humaneval is zero-shot; drop --num-fewshot for it")
    problems, where = _humaneval_problems(data_dir, source)
    problems = problems[:limit] if limit is not None else problems
    return [GenItem(id=p.task_id, completion_prompt=p.prompt,
                    request=f"{HUMANEVAL_CHAT_INSTRUCTION}\n\n```python\n{p.prompt}```", reference=p)
            for p in problems], where


def score_code(items: Sequence[GenItem], outputs: Sequence[str], limits: CodeLimits) -> list[dict[str, Any]]:
    problems = [it.reference for it in items]
    codes = [extract_code(o, p) for o, p in zip(outputs, problems)]
    passed = score_completions(problems, codes, timeout_s=limits.timeout_s, memory_mb=limits.memory_mb,
                               workers=limits.workers)
    return [{"correct": ok, "code": c} for ok, c in zip(passed, codes)]


# ---- MBPP ---------------------------------------------------------------------------------
def _mbpp_files(data_dir: Path, source: str) -> tuple[list[CodeProblem], list[CodeProblem], str]:
    """Test problems and few-shot problems: test.jsonl (+ prompt.jsonl) as Hugging Face's
    'full' config splits them, or the original mbpp.jsonl (test = ids 11-510)."""
    root = data_dir / "mbpp"
    if source in ("auto", "local"):
        test = find_local(data_dir, "mbpp", "test")
        if test is not None:
            prompt = find_local(data_dir, "mbpp", "prompt")
            return load_mbpp(test), load_mbpp(prompt) if prompt else [], str(test)
        orig = find_local(data_dir, "mbpp", "mbpp")
        if orig is not None:
            allp = load_mbpp(orig)
            return ([p for p in allp if p.task_id.isdigit() and 11 <= int(p.task_id) <= 510],
                    [p for p in allp if p.task_id.isdigit() and 1 <= int(p.task_id) <= 10], str(orig))
    raw = from_hf("mbpp", root / "test.jsonl", source,
                  lambda: {split: load_hf_records("google-research-datasets/mbpp", "full", split)
                           for split in ("test", "prompt")}, hf="google-research-datasets/mbpp (full)")
    got = {split: [mbpp_problem(r, f"hf:mbpp:{split}[{i}]") for i, r in enumerate(recs)]
           for split, recs in raw.items()}
    return got["test"], got["prompt"], "hf:google-research-datasets/mbpp/full:test"


def _mbpp_shot(p: CodeProblem) -> str:
    return f"{p.prompt}```python\n{p.canonical_solution.strip()}\n```\n\n"


def load_mbpp_items(data_dir: Path, source: str = "auto", limit: int | None = None, num_fewshot: int = 3,
                    mode: str = "completion") -> tuple[list[GenItem], str]:
    problems, pool, where = _mbpp_files(data_dir, source)
    problems = problems[:limit] if limit is not None else problems
    preferred = [p for p in pool if p.task_id in MBPP_FEWSHOT_IDS]
    pool = preferred + [p for p in pool if p not in preferred]
    if len(pool) < num_fewshot:
        raise PLMError(f"mbpp: {num_fewshot}-shot needs {num_fewshot} prompt examples (mbpp/prompt.jsonl), "
                       f"found {len(pool)}; use --num-fewshot mbpp=0")
    shots = "".join(_mbpp_shot(p) for p in pool[:num_fewshot])
    return [GenItem(id=p.task_id, completion_prompt=f"{shots}{p.prompt}```python\n",
                    request=f"{shots}{p.prompt}{MBPP_CHAT_INSTRUCTION}", reference=p)
            for p in problems], where


GEN_TASKS: dict[str, GenTask] = {t.name: t for t in [
    GenTask("gsm8k", "GSM8K", "exact_match", 256, ("Question:", "\n\n\n"),
            {"completion": 5, "chat": 0}, load_gsm8k, score_gsm8k),
    GenTask("humaneval", "HumanEval", "pass@1", 384, HUMANEVAL_STOP, {"completion": 0, "chat": 0},
            load_humaneval_items, score_code),
    GenTask("mbpp", "MBPP", "pass@1", 384, MBPP_STOP, {"completion": 3, "chat": 0},
            load_mbpp_items, score_code),
]}


def evaluate_generation(lm: EvalLM, task: GenTask, items: Sequence[GenItem], mode: str = "completion",
                        refine: int = 0, max_new_tokens: int | None = None,
                        limits: CodeLimits | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A benchmark task, direct or self-refining (see `refinement_rounds`). Returns the metrics
    (``task.metric`` is round 0's accuracy; with refinement also ``rounds`` and ``final``) and
    one record per item."""
    if not items:
        raise PLMError(f"{task.name}: no examples to evaluate")
    limits = limits or CodeLimits()
    rounds, samples = refinement_rounds(
        lm, items, lambda its, outs: task.score(its, outs, limits), mode=mode, refine=refine,
        max_new_tokens=max_new_tokens or task.max_new_tokens, completion_stop=task.completion_stop,
        label=task.name)
    metrics: dict[str, Any] = {task.metric: rounds[0]["accuracy"], "n": len(items),
                               "mode": "chat" if refine else mode}
    if refine:
        metrics["rounds"] = rounds
        metrics["final"] = rounds[-1]["accuracy"]
    return metrics, samples


Score = Callable[[Sequence[GenItem], Sequence[str]], list[dict[str, Any]]]


def refinement_rounds(lm: EvalLM, items: Sequence[GenItem], score: Score, mode: str = "completion",
                      refine: int = 0, max_new_tokens: int = 256, completion_stop: Sequence[str] = (),
                      instruction: str = DEFAULT_REFINE_INSTRUCTION, label: str = "generate",
                      batch_size: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The one self-refinement evaluator: round 0 answers each item directly (its completion
    prompt, or its request as a ChatML user turn); rounds 1..refine ask for an improved answer
    through the ARIES template z(x, previous answer). Every round is scored with `score(items,
    outputs) -> [{"correct": ..., ...}]`. Chat answers are stripped of surrounding whitespace
    (the form a chat turn shows them in). Returns per-round {round, accuracy, fixed, broken}
    and one record per item with every round's prompt, output and score."""
    if refine < 0:
        raise PLMError(f"refine must be >= 0, got {refine}")
    if refine:
        mode = "chat"  # refinement is a conversation
    if mode not in MODES:
        raise PLMError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    samples: list[dict[str, Any]] = [{"id": it.id, "rounds": []} for it in items]
    rounds: list[dict[str, Any]] = []
    previous: list[str] = []
    for r in range(refine + 1):
        if r == 0 and mode == "completion":
            prompts, stop = [it.completion_prompt for it in items], tuple(completion_stop)
        elif r == 0:
            prompts, stop = [lm.chat_prompt(direct_messages(it.request)) for it in items], ()
        else:
            prompts, stop = [lm.chat_prompt(refinement_messages(it.request, prev, instruction))
                             for it, prev in zip(items, previous)], ()
        desc = label if not refine else f"{label} round {r}/{refine}"
        # the engine already cuts at stop strings; a model that does not still gets cut here
        kw = {"batch_size": batch_size} if batch_size else {}
        outputs = [truncate_at_stop(o, stop)[0] for o in lm.generate(prompts, max_new_tokens, stop=stop, desc=desc, **kw)]
        if mode == "chat":
            outputs = [o.strip() for o in outputs]
        scored = score(items, outputs)
        correct = [float(s["correct"]) for s in scored]
        entry: dict[str, Any] = {"round": r, "accuracy": sum(correct) / len(items)}
        if rounds:
            before = [float(s["rounds"][-1]["correct"]) for s in samples]
            entry["fixed"] = sum(1 for c, b in zip(correct, before) if c > b)
            entry["broken"] = sum(1 for c, b in zip(correct, before) if b > c)
        rounds.append(entry)
        for s, prompt, out, sc in zip(samples, prompts, outputs, scored):
            s["rounds"].append({"prompt": prompt, "output": out, **sc})
        previous = outputs
    return rounds, samples
