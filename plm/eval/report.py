"""The results table in the paper's layout, beside the published PLM-1.8B-Instruct numbers."""
from __future__ import annotations

from typing import Any

# REFERENCE §5: PLM-1.8B-Instruct as published (shot counts and harness not public).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"), ("mmlu", "MMLU"), ("cmmlu", "CMMLU"),
    ("ceval", "C-Eval"), ("gsm8k", "GSM8K"), ("mathqa", "MathQA"), ("humaneval", "HumanEval"),
    ("mbpp", "MBPP"), ("boolq", "BoolQ"), ("hellaswag", "HellaSwag"), ("logiqa", "LogiQA"),
    ("piqa", "PIQA"),
)
PUBLISHED_PLM_1_8B_INSTRUCT: dict[str, float] = {
    "arc_challenge": 51.14, "arc_easy": 78.18, "mmlu": 51.18, "cmmlu": 48.18, "ceval": 44.93,
    "gsm8k": 60.73, "mathqa": 33.23, "humaneval": 64.60, "mbpp": 60.40, "boolq": 77.86,
    "hellaswag": 68.17, "logiqa": 30.12, "piqa": 76.01,
}
PUBLISHED_AVERAGE = 57.29
PUBLISHED_NAME = "PLM-1.8B-Instruct (published)"


def headline(result: dict[str, Any]) -> float:
    """The one number of a task result that the paper-layout table shows, in percent."""
    return 100.0 * float(result[result["headline"]])


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def paper_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown: one row for this run, one for the published model, in the paper's column order.

    Averages are over the tasks this run has; the published row's average is over the same
    tasks (and 57.29, the published figure, when all thirteen are present).
    """
    names = [n for n, _ in PAPER_COLUMNS]
    ours = {n: headline(results[n]) for n in names if n in results}
    header = "| Model | " + " | ".join(t for _, t in PAPER_COLUMNS) + " | Avg. |"
    rule = "|---|" + "---:|" * (len(PAPER_COLUMNS) + 1)
    k = len(ours)
    avg_ours = sum(ours.values()) / k if k else None
    pub_same = [PUBLISHED_PLM_1_8B_INSTRUCT[n] for n in ours]
    avg_pub = (PUBLISHED_AVERAGE if k == len(names) else sum(pub_same) / k) if k else PUBLISHED_AVERAGE
    suffix = "" if k in (0, len(names)) else f" ({k} of {len(names)})"
    row_ours = f"| {model_name} | " + " | ".join(_fmt(ours.get(n)) for n in names) + f" | {_fmt(avg_ours)}{suffix} |"
    row_pub = (f"| {PUBLISHED_NAME} | " + " | ".join(_fmt(PUBLISHED_PLM_1_8B_INSTRUCT[n]) for n in names)
               + f" | {_fmt(avg_pub)}{suffix} |")
    return "\n".join([header, rule, row_ours, row_pub])


def detail_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: every metric of every task, with sample counts and settings."""
    lines = ["| Task | Metric | Value (%) | n | Shots | Mode | Source |", "|---|---|---:|---:|---:|---|---|"]
    for name, r in results.items():
        metrics = [m for m in ("acc", "acc_norm", "exact_match", "pass@1") if m in r]
        for m in metrics:
            mark = " *" if m == r["headline"] else ""
            lines.append(f"| {name} | {m}{mark} | {100 * r[m]:.2f} | {r['n']} | {r.get('num_fewshot', 0)} | "
                         f"{r.get('mode', 'loglikelihood')} | {r.get('source', '')} |")
    return "\n".join(lines)


def refinement_table(results: dict[str, dict[str, Any]]) -> str | None:
    """Markdown: accuracy per self-refinement round, or None when no task refined."""
    refined = {n: r for n, r in results.items() if r.get("rounds")}
    if not refined:
        return None
    k = max(len(r["rounds"]) for r in refined.values())
    lines = ["| Task | " + " | ".join(("direct" if i == 0 else f"refine {i}") for i in range(k)) + " |",
             "|---|" + "---:|" * k]
    for name, r in refined.items():
        cells = []
        for e in r["rounds"]:
            extra = f" (+{e['fixed']}/-{e['broken']})" if "fixed" in e else ""
            cells.append(f"{100 * e['accuracy']:.2f}{extra}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(run: dict[str, Any]) -> str:
    results = run["results"]
    limit = run["config"].get("limit")
    out = [f"# Evaluation of `{run['model']}`", ""]
    if limit is not None:
        out += [f"**--limit {limit}: at most {limit} examples per task; not comparable with the "
                "published numbers.**", ""]
    if run.get("truncated_inputs"):
        out += [f"**{run['truncated_inputs']} input(s) exceeded the model window and were cut from the "
                "left.**", ""]
    out += ["Headline metric per task (the paper does not say which; see docs/eval.md): "
            "acc_norm for ARC, HellaSwag, PIQA, LogiQA, MathQA; acc for MMLU, CMMLU, C-Eval, BoolQ; "
            "final-number exact match for GSM8K; pass@1 for HumanEval and MBPP. All in percent.", "",
            paper_table(results, run.get("name") or "this checkpoint"), "", "## All metrics", "",
            detail_table(results)]
    refine = refinement_table(results)
    if refine:
        out += ["", "## Self-refinement (accuracy per round; +fixed/-broken versus the round before)", "",
                refine]
    return "\n".join(out) + "\n"
