"""Every table the project writes, rendered from typed rows: the pipeline's report.md, `plm eval`'s
results.md, ARIES's per-iteration table, the sparsity and export sections.

Result records that several layers pass around (held-out accuracy, an ARIES iteration) are
defined here, at the bottom, so the code that produces them and the code that reports them
share one type. This module imports nothing of plm's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


# ---- cells and tables ---------------------------------------------------------------------
def num(x: float | int | None, fmt: str = ".3f") -> str:
    if x is None:
        return "n/a"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines (and a blank line). `align`: one of "l"/"r" per column."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in (align or "l" * len(header))) + "|"
    return (["| " + " | ".join(header) + " |", rule]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


def relpath(p: str | Path, base: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ---- held-out verifiable accuracy ---------------------------------------------------------
@dataclass
class HeldoutResult:
    """Greedy accuracy on held-out verifiable tasks, directly and after `rounds` refinements."""

    n: int
    direct_acc: float
    style: str = "chat"
    rounds: int = 0
    refine_acc: float | None = None
    fixed: int | None = None  # refinement: wrong -> right
    broken: int | None = None  # refinement: right -> wrong
    direct_scores: list[float] | None = None  # per task (paired comparisons between models)
    refine_scores: list[float] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "HeldoutResult | None":
        return None if not d else _from_dict(cls, d)


@dataclass
class HeldoutRow:
    label: str
    result: HeldoutResult | None
    kind: str = "stage"  # stage | baseline (the DPO baseline's rows compare against SFT's last)


def heldout_table(rows: Sequence[HeldoutRow]) -> list[str]:
    """Accuracy stage over stage, with each row's gain over the row before (the baseline's first
    row against the last SFT row)."""
    out, prev, sft_last = [], None, None
    for i, row in enumerate(rows):
        r = row.result
        acc = None if r is None else 100 * r.direct_acc
        first_baseline = row.kind == "baseline" and (i == 0 or rows[i - 1].kind != "baseline")
        ref = sft_last if first_baseline else prev
        gain = "-" if acc is None or ref is None else f"{acc - ref:+.1f}"
        refine = "-" if r is None or r.refine_acc is None else pct(r.refine_acc)
        out.append([row.label, "n/a" if r is None else pct(r.direct_acc), refine, gain])
        if row.kind == "sft":
            sft_last = acc
        prev = acc
    return md_table(["model", "direct", "self-refine", "direct gain (points, vs the row before)"], out)


# ---- ARIES ----------------------------------------------------------------------------------
@dataclass
class AriesIteration:
    """One ARIES iteration (iteration 0 = the starting SFT model): what aries_metrics.jsonl holds."""

    iteration: int
    model: str = ""
    seconds: float = 0.0
    eval: HeldoutResult | None = None
    prompts: int | None = None
    pairs_kept: int | None = None
    # mean score of the sampled first and last answers: accuracy for a verifier ("acc"), a
    # reward model's score otherwise ("score")
    sample_metric: str = "acc"
    sample_initial: float | None = None
    sample_last: float | None = None
    chains_any_correct: float | None = None
    chains_all_correct: float | None = None
    chosen_is_refinement: float | None = None
    keep_pairs: int | None = None
    score_margin: float | None = None
    refinements: int | None = None
    generate_seconds: float | None = None
    ref_logp_seconds: float | None = None
    train_steps: int | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    pairs_trained: int | None = None
    reward_margin_direct: float | None = None
    reward_acc_direct: float | None = None
    reward_margin_refine: float | None = None
    reward_acc_refine: float | None = None
    train_seconds: float | None = None

    def as_record(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "eval"}
        if self.eval is not None:
            d["eval"] = self.eval.as_dict()
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "AriesIteration":
        d = dict(d)
        for metric in ("acc", "score"):  # records written before sample_metric existed
            if f"sample_{metric}_initial" in d:
                d.update(sample_metric=metric, sample_initial=d.pop(f"sample_{metric}_initial"),
                         sample_last=d.pop(f"sample_{metric}_last", None))
        row = _from_dict(cls, d)
        row.eval = HeldoutResult.from_dict(d.get("eval"))
        return row

    def summary(self) -> str:
        parts = [f"iteration {self.iteration}:"]
        if self.eval is not None:
            parts.append(f"direct {pct(self.eval.direct_acc)}")
            if self.eval.refine_acc is not None:
                parts.append(f"self-refine {pct(self.eval.refine_acc)}")
        if self.pairs_kept is not None:
            parts.append(f"pairs {self.pairs_kept}/{self.prompts}")
        if self.reward_margin_direct is not None:
            parts.append(f"margin direct {self.reward_margin_direct:.3f}")
        if self.reward_margin_refine is not None:
            parts.append(f"refine {self.reward_margin_refine:.3f}")
        return " ".join(parts + [f"({self.seconds:.0f}s)"])


def _sample_cell(x: float | None, metric: str) -> str:
    return ("-" if x is None else f"{100 * x:.1f}") if metric == "acc" else num(x)


def aries_table(rows: Sequence[AriesIteration]) -> list[str]:
    """ARIES, iteration by iteration: held-out accuracy, pairs, sampled score, DPO reward margins."""
    metric = next((r.sample_metric for r in rows if r.sample_initial is not None), "acc")
    unit = "acc %" if metric == "acc" else "reward score"
    out = []
    for r in rows:
        e = r.eval
        out.append([r.iteration, "-" if e is None else f"{100 * e.direct_acc:.1f}",
                    "-" if e is None or e.refine_acc is None else f"{100 * e.refine_acc:.1f}",
                    "-" if r.pairs_kept is None else f"{r.pairs_kept}/{r.prompts}",
                    _sample_cell(r.sample_initial, r.sample_metric), _sample_cell(r.sample_last, r.sample_metric),
                    "-" if r.reward_margin_direct is None else f"{r.reward_margin_direct:.3f}",
                    "-" if r.reward_margin_refine is None else f"{r.reward_margin_refine:.3f}",
                    f"{r.seconds:.0f}"])
    return md_table(["iteration", "direct acc %", "self-refine acc %", "pairs kept", f"sampled {unit} y0",
                     f"sampled {unit} y_K", "reward margin direct", "reward margin refine", "seconds"], out)


# ---- plm eval: the paper's table ------------------------------------------------------------
# PLM-1.8B-Instruct as published (shot counts and harness not public).
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
METRICS = ("acc", "acc_norm", "exact_match", "pass@1")


@dataclass
class TaskResult:
    """One benchmark's metrics as `plm eval` writes them into results.json."""

    name: str
    headline: str
    n: int
    metrics: dict[str, float]
    num_fewshot: int = 0
    mode: str = "loglikelihood"
    source: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_record(cls, name: str, r: dict[str, Any]) -> "TaskResult":
        return cls(name, r["headline"], r["n"], {m: r[m] for m in METRICS if m in r}, r.get("num_fewshot", 0),
                   r.get("mode", "loglikelihood"), r.get("source", ""), r.get("rounds") or [])

    @property
    def value(self) -> float:
        """The headline metric in percent."""
        return 100.0 * float(self.metrics[self.headline])


def _two(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def paper_table(results: Sequence[TaskResult], model_name: str) -> list[str]:
    """One row for this run, one for the published model, in the paper's column order. Averages
    are over the tasks this run has (the published 57.29 when all thirteen are present)."""
    names = [n for n, _ in PAPER_COLUMNS]
    ours = {r.name: r.value for r in results if r.name in names}
    k = len(ours)
    avg_ours = sum(ours.values()) / k if k else None
    pub_same = [PUBLISHED_PLM_1_8B_INSTRUCT[n] for n in ours]
    avg_pub = (PUBLISHED_AVERAGE if k == len(names) else sum(pub_same) / k) if k else PUBLISHED_AVERAGE
    suffix = "" if k in (0, len(names)) else f" ({k} of {len(names)})"
    rows = [[model_name] + [_two(ours.get(n)) for n in names] + [f"{_two(avg_ours)}{suffix}"],
            [PUBLISHED_NAME] + [_two(PUBLISHED_PLM_1_8B_INSTRUCT[n]) for n in names] + [f"{_two(avg_pub)}{suffix}"]]
    return md_table(["Model"] + [t for _, t in PAPER_COLUMNS] + ["Avg."], rows, "l" + "r" * (len(names) + 1))


def detail_table(results: Sequence[TaskResult]) -> list[str]:
    """Every metric of every task, with sample counts and settings (* = the headline)."""
    rows = [[r.name, m + (" *" if m == r.headline else ""), f"{100 * v:.2f}", r.n, r.num_fewshot, r.mode, r.source]
            for r in results for m, v in r.metrics.items()]
    return md_table(["Task", "Metric", "Value (%)", "n", "Shots", "Mode", "Source"], rows, "llrrrll")


def refinement_table(results: Sequence[TaskResult]) -> list[str]:
    """Accuracy per self-refinement round (+fixed/-broken vs the round before); [] when none refined."""
    refined = [r for r in results if r.rounds]
    if not refined:
        return []
    k = max(len(r.rounds) for r in refined)
    rows = [[r.name] + [f"{100 * e['accuracy']:.2f}" + (f" (+{e['fixed']}/-{e['broken']})" if "fixed" in e else "")
                        for e in r.rounds] for r in refined]
    return md_table(["Task"] + [("direct" if i == 0 else f"refine {i}") for i in range(k)], rows, "l" + "r" * k)


def eval_report(run: dict[str, Any]) -> str:
    """results.md of `plm eval`."""
    results = [TaskResult.from_record(n, r) for n, r in run["results"].items()]
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
            "final-number exact match for GSM8K; pass@1 for HumanEval and MBPP. All in percent.", ""]
    out += paper_table(results, run.get("name") or "this checkpoint") + ["## All metrics", ""]
    out += detail_table(results)
    refine = refinement_table(results)
    if refine:
        out += ["## Self-refinement (accuracy per round; +fixed/-broken versus the round before)", ""] + refine
    return "\n".join(out).rstrip() + "\n"


# ---- sparsity -------------------------------------------------------------------------------
@dataclass
class SparsityRow:
    layer: int
    exact_zero: float
    mean_active: float


def sparsity_section(rows: Sequence[SparsityRow], tokens: int, mean_exact_zero: float, png: str) -> list[str]:
    out = ["## Activation sparsity (relu² MLP)", "",
           f"Measured on {tokens} held-out tokens of the final checkpoint: mean exactly-zero fraction "
           f"**{100 * mean_exact_zero:.1f}%** (PLM-1.8B: about 90.9%).", ""]
    out += md_table(["layer", "exact zeros", "active neurons/token"],
                    [[r.layer, pct(r.exact_zero), f"{r.mean_active:.1f}"] for r in rows], "lrr")
    return out + [f"![sparsity per layer]({png})", ""]


# ---- the pipeline's report.md ---------------------------------------------------------------
def _posttrain_rows(r: dict[str, Any]) -> list[HeldoutRow]:
    rows = []
    base = (r.get("eval") or {}).get("math_pretrain_plain")
    if base:
        rows.append(HeldoutRow("after pretraining (plain prompt)", HeldoutResult.from_dict(base)))
    for phase, e in ((r.get("sft") or {}).get("eval") or {}).items():
        rows.append(HeldoutRow(f"after {phase}", HeldoutResult.from_dict(e), "sft"))
    for key, label, kind in (("rows", "after ARIES iteration {}", "stage"),
                             ("baseline_rows", "DPO baseline (lambda 0), iteration {}", "baseline")):
        for rec in (r.get("aries") or {}).get(key, []):
            it = AriesIteration.from_record(rec)
            if it.eval is not None and it.iteration > 0:  # iteration 0 is the SFT model, already listed
                rows.append(HeldoutRow(label.format(it.iteration), it.eval, kind))
    return rows


def _posttrain_section(r: dict[str, Any]) -> list[str]:
    """Held-out accuracy on the arith test split, stage over stage, and the ARIES iterations."""
    rows = _posttrain_rows(r)
    if not rows:
        return []
    n = next((x.result.n for x in rows if x.kind == "sft" and x.result), None)
    noise = f" {n} problems, so a 95% interval is about ±{196 * (0.25 / n) ** 0.5:.0f} points." if n else ""
    out = ["## Post-training: held-out math accuracy", "",
           "Verifiable arithmetic word problems of the held-out test split (never trained on), greedy; "
           "self-refine = one more round through the ARIES refinement template." + noise, ""]
    out += heldout_table(rows)
    its = [AriesIteration.from_record(x) for x in (r.get("aries") or {}).get("rows", [])]
    its = [x for x in its if x.pairs_kept is not None]
    if its:
        metric = its[0].sample_metric
        unit = "acc" if metric == "acc" else "reward score"
        cell = pct if metric == "acc" else num
        out += md_table(["ARIES iteration", "pairs kept", f"sampled {unit} y0", f"sampled {unit} yK",
                         "reward margin (direct)", "reward margin (refine)"],
                        [[x.iteration, f"{x.pairs_kept}/{x.prompts}", cell(x.sample_initial), cell(x.sample_last),
                          num(x.reward_margin_direct), num(x.reward_margin_refine)] for x in its])
    return out


def _eval_section(r: dict[str, Any]) -> list[str]:
    e = r.get("eval")
    if not e:
        return []
    stages = [st for st in ("pretrain", "sft", "aries") if st in e.get("code", {}) or st in e.get("perplexity", {})]
    rows = []
    for st in stages:
        code = HeldoutResult.from_dict(e["code"].get(st))
        rows.append([st, pct(code.direct_acc if code else None), num((e["perplexity"].get(st) or {}).get("perplexity"), ".2f")])
    return ["## Evaluation", ""] + md_table(["checkpoint", "code task pass@1", "held-out perplexity (math text)"], rows)


def pipeline_report(name: str, r: dict[str, Any], run_dir: Path, times: dict[str, float], host: str,
                    training_plot: Path | None = None) -> str:
    """report.md of `plm pipeline`: every figure from the stage results `r` (stage -> results)."""
    md = [f"# PLM pipeline report: {name}", "",
          f"Generated {host}. Every figure below was written by this run's stages (manifests in `stages/`).", "",
          "## Stages", ""]
    md += md_table(["stage", "time (s)"], [[k, num(v, ".1f")] for k, v in times.items()]
                   + [["**total**", num(sum(times.values()), ".1f")]])
    if "corpus" in r:
        c = r["corpus"]
        md += ["## Data", ""]
        md += md_table(["source", "documents", "characters"],
                       [["code (stdlib sources)", c["code"]["files"], f"{c['code']['chars']:,}"],
                        ["docs (pydoc topics)", c["docs"]["files"], f"{c['docs']['chars']:,}"],
                        ["math (arith train split)", c["math"]["problems"], f"{c['math']['chars']:,}"],
                        ["math held-out (test split)", c["math_test"]["problems"], ""]])
    if "tokenizer" in r:
        md += [f"Tokenizer: byte-level BPE, {r['tokenizer']['vocab_size']} ids, "
               f"{r['tokenizer']['chars_per_token']:.2f} characters/token on a docs sample.", ""]
    if "pretrain" in r:
        s = r["pretrain"]["summary"]
        ev = s.get("final_eval_loss")
        md += ["## Pretraining", "",
               f"{s['parameters'] / 1e6:.2f}M parameters, {s['tokens']:,} tokens. "
               f"Unigram entropy of the final mixture: **{s['unigram_entropy']:.3f}** nats/token; "
               f"final train loss **{s['final_train_loss']:.3f}**, held-out loss **{num(ev)}** "
               f"(perplexity {num(2.718281828 ** ev, '.1f') if ev else 'n/a'}).", ""]
        md += md_table(["phase", "steps", "tokens seen (cum.)", "held-out loss"],
                       [[p["phase"], p["steps"], f"{p.get('tokens_seen', 0):,}", num(p.get("eval_loss"))]
                        for p in s["phases"]])
    if training_plot:
        md += [f"![loss and learning rate over all phases]({relpath(training_plot, run_dir)})", "",
               "Loss and learning rate end to end: pretraining's three phases (LM loss), SFT's two phases "
               "(loss on assistant tokens) and each ARIES iteration (preference + ARIES-SFT loss); "
               "the losses are different objectives, so each stage has its own colour.", ""]
    md += _posttrain_section(r)
    md += _eval_section(r)
    if "sparsity" in r:
        sp = r["sparsity"]
        md += sparsity_section([_from_dict(SparsityRow, x) for x in sp["layers"]], sp["tokens"],
                               sp["mean_exact_zero"], sp.get("png", "sparsity/sparsity.png"))
    if (r.get("bench") or {}).get("report_md"):
        md += [r["bench"]["report_md"], ""]
    if "export" in r:
        e = r["export"]
        chk = e["llama_cpp_agreement"]
        md += ["## GGUF export and llama.cpp agreement", ""]
        md += md_table(["file", "size"], [[relpath(v["path"], run_dir), f"{v['bytes'] / 1e6:.2f} MB"]
                                           for v in e["files"].values()])
        md += [f"llama.cpp on the f32 GGUF vs our PyTorch model, {chk['prompt_tokens']}-token held-out prompt: "
               f"max |logit diff| {chk['max_abs_logit_diff']:.2e} ({chk['relative_diff']:.1e} of the largest "
               f"logit); greedy {chk['greedy_tokens']} tokens identical: **{chk['greedy_identical']}**.", ""]
    return "\n".join(md).rstrip() + "\n"
