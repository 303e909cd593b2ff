"""Log-likelihood multiple-choice benchmarks: ARC-E/C, HellaSwag, PIQA, BoolQ, MMLU, CMMLU,
C-Eval, LogiQA, MathQA.

Each task reads ``<data-dir>/<task>/<split>.jsonl``: the Hugging Face dataset's own records
(the converters below map those fields to a prompt, choices and the gold index), or records
already in the normalised layout ``{"query": str, "choices": [str, ...], "gold": int}``
(optionally ``"subject"``, ``"id"``). Prompts, choices and few-shot layout follow
lm-evaluation-harness 0.4's task definitions, so numbers are comparable with it.

Scoring: each choice is scored as ``" " + choice`` after the prompt; ``acc`` takes the
highest log-likelihood, ``acc_norm`` the highest log-likelihood per character of the choice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from plm.errors import PLMError
from plm.data.hf import hf_config_names
from plm.eval.data import find_local, from_hf, load_hf_records
from plm.eval.lm import EvalLM
from plm.eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS
from plm.utils import iter_jsonl

LETTERS = "ABCDE"


@dataclass
class MCExample:
    query: str  # the prompt, ending just before the answer (no description or shots)
    choices: list[str]
    gold: int
    subject: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise PLMError(f"example {self.id or self.query[:40]!r}: needs at least two choices")
        if not 0 <= self.gold < len(self.choices):
            raise PLMError(f"example {self.id or self.query[:40]!r}: gold index {self.gold} is outside "
                           f"its {len(self.choices)} choices")


@dataclass(frozen=True)
class MCTask:
    name: str
    title: str  # the paper's column name
    hf_path: str
    hf_name: str | None
    split: str
    fewshot_split: str | None
    convert: Callable[[dict[str, Any]], MCExample]
    headline: str = "acc_norm"  # which metric the summary table shows (ASSUMED, see docs/eval.md)
    default_fewshot: int = 0
    describe: Callable[[str | None], str] | None = None  # per-subject task description
    hf_subjects: Sequence[str] | None = None  # HF configs to read one by one (no "all" config)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"


# ---- converters: one Hugging Face record -> MCExample --------------------------------------
def _need(r: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in r]
    if missing:
        raise PLMError(f"record lacks field(s) {', '.join(missing)}; has {', '.join(sorted(r)) or 'none'}")


def _letter_index(value: Any, n: int) -> int:
    if isinstance(value, bool):
        raise PLMError(f"answer {value!r} is not a choice letter or index")
    if isinstance(value, int):
        return value
    s = str(value).strip()
    if s.isdigit():
        return int(s)
    if len(s) == 1 and s.upper() in LETTERS[:n]:
        return LETTERS.index(s.upper())
    raise PLMError(f"answer {value!r} is not a choice letter or index")


def convert_arc(r: dict[str, Any]) -> MCExample:
    _need(r, "question", "choices", "answerKey")
    labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
    if r["answerKey"] not in labels:
        raise PLMError(f"answerKey {r['answerKey']!r} is not among the labels {labels}")
    return MCExample(f"Question: {r['question']}\nAnswer:", texts, labels.index(r["answerKey"]),
                     id=r.get("id"))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def convert_hellaswag(r: dict[str, Any]) -> MCExample:
    _need(r, "activity_label", "ctx_a", "ctx_b", "endings", "label")
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return MCExample(_hellaswag_clean(r["activity_label"] + ": " + ctx),
                     [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]), id=r.get("ind"))


def convert_piqa(r: dict[str, Any]) -> MCExample:
    _need(r, "goal", "sol1", "sol2", "label")
    return MCExample(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def convert_boolq(r: dict[str, Any]) -> MCExample:
    _need(r, "passage", "question")
    if "label" in r:  # super_glue/boolq: 0 = False, 1 = True
        gold = int(r["label"])
    elif "answer" in r:  # google/boolq: a bool
        gold = int(bool(r["answer"]))
    else:
        raise PLMError("BoolQ record has neither 'label' nor 'answer'")
    return MCExample(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], gold,
                     id=r.get("idx"))


def _lettered(question: str, options: Sequence[str], answer_cue: str) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\n" + answer_cue


def convert_mmlu(r: dict[str, Any]) -> MCExample:
    _need(r, "question", "choices", "answer")
    opts = list(r["choices"])
    return MCExample(_lettered(r["question"], opts, "Answer:"), list(LETTERS[:len(opts)]),
                     _letter_index(r["answer"], len(opts)), subject=r.get("subject"))


def convert_cmmlu(r: dict[str, Any]) -> MCExample:
    _need(r, "Question", "A", "B", "C", "D", "Answer")
    return MCExample(_lettered(r["Question"], [r[c] for c in "ABCD"], "答案："), list("ABCD"),
                     _letter_index(r["Answer"], 4), subject=r.get("subject"))


def convert_ceval(r: dict[str, Any]) -> MCExample:
    _need(r, "question", "A", "B", "C", "D", "answer")
    return MCExample(_lettered(r["question"], [r[c] for c in "ABCD"], "答案："), list("ABCD"),
                     _letter_index(r["answer"], 4), subject=r.get("subject"), id=r.get("id"))


def convert_logiqa(r: dict[str, Any]) -> MCExample:
    _need(r, "context", "options")
    question = r.get("question", r.get("query"))
    if question is None:
        raise PLMError("LogiQA record has neither 'question' nor 'query'")
    if "label" in r:  # EleutherAI/logiqa: a letter
        gold = _letter_index(r["label"], len(r["options"]))
    elif "correct_option" in r:  # lucasmccabe/logiqa: an index
        gold = int(r["correct_option"])
    else:
        raise PLMError("LogiQA record has neither 'label' nor 'correct_option'")
    prompt = f"Passage: {r['context']}\nQuestion: {question}\nChoices:\n"
    prompt += "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(r["options"])) + "Answer:"
    return MCExample(prompt, list(r["options"]), gold)


_MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def convert_mathqa(r: dict[str, Any]) -> MCExample:
    _need(r, "Problem", "options", "correct")
    choices = [c[4:].rstrip(" ,") for c in _MATHQA_OPTION.findall(r["options"])]
    if len(choices) != 5:
        raise PLMError(f"MathQA options do not parse into five choices: {r['options']!r}")
    return MCExample(f"Question: {r['Problem']}\nAnswer:", choices, "abcde".index(r["correct"].strip()))


def convert_normalised(r: dict[str, Any]) -> MCExample:
    return MCExample(str(r["query"]), [str(c) for c in r["choices"]], int(r["gold"]),
                     subject=r.get("subject"), id=None if r.get("id") is None else str(r["id"]))


def _mmlu_description(subject: str | None) -> str:
    if not subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _cmmlu_description(subject: str | None) -> str:
    if not subject:
        return ""
    return f"以下是关于{CMMLU_SUBJECTS.get(subject, subject)}的单项选择题，请直接给出正确答案的选项。\n\n"


def _ceval_description(subject: str | None) -> str:
    if not subject:
        return ""
    return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, subject)}的单项选择题，请选出其中的正确答案。\n\n"


MC_TASKS: dict[str, MCTask] = {t.name: t for t in [
    MCTask("arc_challenge", "ARC-C", "allenai/ai2_arc", "ARC-Challenge", "test", "train", convert_arc),
    MCTask("arc_easy", "ARC-E", "allenai/ai2_arc", "ARC-Easy", "test", "train", convert_arc),
    MCTask("mmlu", "MMLU", "cais/mmlu", "all", "test", "dev", convert_mmlu, headline="acc",
           default_fewshot=5, describe=_mmlu_description),
    MCTask("cmmlu", "CMMLU", "haonan-li/cmmlu", None, "test", "dev", convert_cmmlu, headline="acc",
           default_fewshot=5, describe=_cmmlu_description, hf_subjects=tuple(CMMLU_SUBJECTS)),
    MCTask("ceval", "C-Eval", "ceval/ceval-exam", None, "val", "dev", convert_ceval, headline="acc",
           default_fewshot=5, describe=_ceval_description, hf_subjects=tuple(CEVAL_SUBJECTS)),
    MCTask("mathqa", "MathQA", "allenai/math_qa", None, "test", "train", convert_mathqa),
    MCTask("boolq", "BoolQ", "aps/super_glue", "boolq", "validation", "train", convert_boolq,
           headline="acc"),
    MCTask("hellaswag", "HellaSwag", "Rowan/hellaswag", None, "validation", "train", convert_hellaswag),
    MCTask("logiqa", "LogiQA", "EleutherAI/logiqa", "logiqa", "test", "train", convert_logiqa),
    MCTask("piqa", "PIQA", "baber/piqa", None, "validation", "train", convert_piqa),
]}


def convert_record(task: MCTask, record: dict[str, Any], where: str) -> MCExample:
    try:
        if {"query", "choices", "gold"} <= record.keys():
            return convert_normalised(record)
        return task.convert(record)
    except PLMError as e:
        raise PLMError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PLMError(f"{where}: not a {task.name} record ({type(e).__name__}: {e})") from None


def _hf_split_records(task: MCTask, split: str) -> list[dict[str, Any]]:
    if task.hf_subjects is None:
        return load_hf_records(task.hf_path, task.hf_name, split)
    records = []
    subjects = task.hf_subjects or hf_config_names(task.hf_path)
    for subject in subjects:
        for r in load_hf_records(task.hf_path, subject, split):
            records.append({**r, "subject": subject})
    return records


def load_split(task: MCTask, split: str, data_dir: Path, source: str = "auto",
               limit: int | None = None) -> tuple[list[MCExample], str]:
    """The examples of one split and a description of where they came from."""
    local = find_local(data_dir, task.name, split) if source in ("auto", "local") else None
    if local is not None:
        out = []
        for lineno, r in iter_jsonl(local):
            if limit is not None and len(out) >= limit:
                break
            out.append(convert_record(task, r, f"{local}:{lineno}"))
        return out, str(local)
    hint = data_dir / task.name / f"{split}.jsonl"
    records = from_hf(task.name, hint, source, lambda: _hf_split_records(task, split),
                      hf=f"{task.hf_path}{'/' + task.hf_name if task.hf_name else ''} {split!r}")
    where = f"hf:{task.hf_path}{'/' + task.hf_name if task.hf_name else ''}:{split}"
    records = records[:limit] if limit is not None else records
    return [convert_record(task, r, f"{where}[{i}]") for i, r in enumerate(records)], where


def download(task: MCTask, data_dir: Path) -> list[Path]:
    """Write the task's evaluation and few-shot splits from Hugging Face into the local layout."""
    from plm.utils import write_jsonl

    written = []
    for split in dict.fromkeys(s for s in (task.split, task.fewshot_split) if s):
        path = data_dir / task.name / f"{split}.jsonl"
        write_jsonl(path, _hf_split_records(task, split))
        written.append(path)
    return written


def build_context(task: MCTask, example: MCExample, shots: Sequence[MCExample]) -> str:
    """Description, then each shot answered with its gold choice, then the query."""
    desc = task.describe(example.subject) if task.describe else ""
    parts = [s.query + task.target_delimiter + s.choices[s.gold] + task.fewshot_delimiter for s in shots]
    return desc + "".join(parts) + example.query


def select_shots(example: MCExample, pool: Sequence[MCExample], n: int) -> list[MCExample]:
    """The first ``n`` few-shot examples (of the same subject when subjects are known)."""
    if n <= 0:
        return []
    same = [s for s in pool if s.subject == example.subject and s is not example
            and s.query != example.query]
    return same[:n]


def evaluate_mc(lm: EvalLM, task: MCTask, examples: Sequence[MCExample],
                fewshot_pool: Sequence[MCExample] = (), num_fewshot: int = 0
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """acc and acc_norm of ``lm`` on ``examples``, and one record per example."""
    if not examples:
        raise PLMError(f"{task.name}: no examples to evaluate")
    requests, spans = [], []
    contexts = []
    for ex in examples:
        shots = select_shots(ex, fewshot_pool, num_fewshot)
        if num_fewshot and len(shots) < num_fewshot:
            raise PLMError(f"{task.name}: {num_fewshot}-shot needs {num_fewshot} few-shot examples"
                           f"{' for subject ' + repr(ex.subject) if ex.subject else ''}, found {len(shots)}")
        ctx = build_context(task, ex, shots)
        contexts.append(ctx)
        spans.append((len(requests), len(ex.choices)))
        requests.extend((ctx, task.target_delimiter + c) for c in ex.choices)
    scores = lm.loglikelihood(requests, desc=task.name)
    if len(scores) != len(requests):
        raise PLMError(f"{task.name}: model returned {len(scores)} scores for {len(requests)} requests")
    samples, acc, acc_norm = [], 0, 0
    for ex, ctx, (start, n) in zip(examples, contexts, spans):
        lls = [float(s[0]) for s in scores[start:start + n]]
        normed = [ll / max(1, len(c)) for ll, c in zip(lls, ex.choices)]
        pred = max(range(n), key=lambda k: lls[k])
        pred_norm = max(range(n), key=lambda k: normed[k])
        acc += pred == ex.gold
        acc_norm += pred_norm == ex.gold
        samples.append({"id": ex.id, "subject": ex.subject, "gold": ex.gold, "pred": pred,
                        "pred_norm": pred_norm, "loglikelihoods": lls,
                        "greedy": [bool(s[1]) for s in scores[start:start + n]],
                        "acc": pred == ex.gold, "acc_norm": pred_norm == ex.gold,
                        "context_tail": ctx[-200:], "choices": ex.choices})
    n_ex = len(examples)
    return {"acc": acc / n_ex, "acc_norm": acc_norm / n_ex, "n": n_ex,
            "num_fewshot": num_fewshot}, samples
