"""`RUN/report.md`: every number comes from the stage manifests the run wrote."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from plm.pipeline import Context, stage_times


def _f(x, fmt: str = ".3f") -> str:
    if x is None:
        return "n/a"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _rel(p: str | Path, run_dir: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(p)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _posttrain_section(r: dict) -> list[str]:
    """Held-out accuracy on the arith test split, stage over stage."""
    rows: list[list] = []
    base = (r.get("eval") or {}).get("math_pretrain_plain")
    if base:
        rows.append(["after pretraining (plain prompt)", _pct(base["direct_acc"]), "-"])
    for phase, e in ((r.get("sft") or {}).get("eval") or {}).items():
        rows.append([f"after {phase}", _pct(e.get("direct_acc")), _pct(e.get("refine_acc"))])
    for row in (r.get("aries") or {}).get("rows", []):
        e = row.get("eval") or {}
        if e and row["iteration"] > 0:  # iteration 0 is the SFT model, already listed
            rows.append([f"after ARIES iteration {row['iteration']}", _pct(e.get("direct_acc")),
                         _pct(e.get("refine_acc"))])
    for row in (r.get("aries") or {}).get("baseline_rows", []):
        e = row.get("eval") or {}
        if e and row["iteration"] > 0:
            rows.append([f"DPO baseline (lambda 0), iteration {row['iteration']}", _pct(e.get("direct_acc")),
                         _pct(e.get("refine_acc"))])
    if not rows:
        return []
    n = next((e.get("n") for e in ((r.get("sft") or {}).get("eval") or {}).values() if e.get("n")), None)
    noise = f" {n} problems, so a 95% interval is about ±{196 * (0.25 / n) ** 0.5:.0f} points." if n else ""
    out = ["## Post-training: held-out math accuracy", "",
           "Verifiable arithmetic word problems of the held-out test split (never trained on), greedy; "
           "self-refine = one more round through the ARIES refinement template." + noise, ""]
    # stage-over-stage gain in direct accuracy (the baseline's rows against SFT phase 2's)
    prev, sft_last = None, None
    for row in rows:
        acc = float(row[1].rstrip("%")) if row[1] not in ("n/a", "-") else None
        ref = sft_last if row[0].startswith("DPO baseline") and "iteration 1" in row[0] else prev
        row.append("-" if acc is None or ref is None else f"{acc - ref:+.1f}")
        if row[0].startswith("after sft"):
            sft_last = acc
        prev = acc
    out += _table(["model", "direct", "self-refine", "direct gain (points, vs the row before)"], rows)
    aries_rows = [x for x in (r.get("aries") or {}).get("rows", []) if "pairs_kept" in x]
    if aries_rows:
        out += _table(["ARIES iteration", "pairs kept", "sampled acc y0", "sampled acc yK", "reward margin (direct)",
                       "reward margin (refine)"],
                      [[x["iteration"], f"{x['pairs_kept']}/{x['prompts']}", _pct(x.get("sample_acc_initial")),
                        _pct(x.get("sample_acc_last")), _f(x.get("reward_margin_direct")),
                        _f(x.get("reward_margin_refine"))] for x in aries_rows])
    return out


def _eval_section(r: dict) -> list[str]:
    e = r.get("eval")
    if not e:
        return []
    out = ["## Evaluation", ""]
    stages = sorted(set(e.get("code", {})) | set(e.get("perplexity", {})),
                    key=["pretrain", "sft", "aries"].index)
    out += _table(["checkpoint", "code task pass@1", "held-out perplexity (math text)"],
                  [[st, _pct((e["code"].get(st) or {}).get("direct_acc")),
                    _f((e["perplexity"].get(st) or {}).get("perplexity"), ".2f")] for st in stages])
    return out


def _training_plot(r: dict, run_dir: Path) -> Path | None:
    """One PNG of loss and LR over every training phase of the run (pretrain, SFT, ARIES)."""
    from plm.train.plots import plot_stages
    from plm.train.trainer import read_metrics
    segments = []
    for stage, label in (("pretrain", "pretraining"), ("sft", "SFT")):
        ck = (r.get(stage) or {}).get("checkpoint")
        if ck and (Path(ck).parent / "metrics.jsonl").exists():
            segments.append((label, read_metrics(Path(ck).parent)))
    ck = (r.get("aries") or {}).get("checkpoint")
    if ck:
        for it in sorted(Path(ck).parent.glob("iter-*"), key=lambda p: int(p.name.split("-")[1])):
            if (it / "metrics.jsonl").exists():
                segments.append((f"ARIES {it.name}", read_metrics(it)))
    if not segments:
        return None
    return plot_stages(segments, run_dir / "loss_lr_all.png", "loss and learning rate over all training phases")


def write_report(ctx: Context) -> Path:
    r, run_dir = ctx.results, ctx.run_dir
    order = list(ctx.recipe.get("stages") or {})
    times = dict(sorted(stage_times(run_dir).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    md = [f"# PLM pipeline report: {ctx.recipe.get('name', '')}", "",
          f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} cores). Every figure below was written by this run's "
          "stages (manifests in `stages/`).", ""]
    md += ["## Stages", ""]
    md += _table(["stage", "time (s)"], [[k, _f(v, ".1f")] for k, v in times.items()]
                 + [["**total**", _f(sum(times.values()), ".1f")]])

    if "corpus" in r:
        c = r["corpus"]
        md += ["## Data", ""]
        md += _table(["source", "documents", "characters"],
                     [["code (stdlib sources)", c["code"]["files"], f"{c['code']['chars']:,}"],
                      ["docs (pydoc topics)", c["docs"]["files"], f"{c['docs']['chars']:,}"],
                      ["math (arith train split)", c["math"]["problems"], f"{c['math']['chars']:,}"],
                      ["math held-out (test split)", c["math_test"]["problems"], ""]])
    if "tokenizer" in r:
        md += [f"Tokenizer: byte-level BPE, {r['tokenizer']['vocab_size']} ids, "
               f"{r['tokenizer']['chars_per_token']:.2f} characters/token on a docs sample.", ""]

    if "pretrain" in r:
        s = r["pretrain"]["summary"]
        md += ["## Pretraining", "",
               f"{s['parameters'] / 1e6:.2f}M parameters, {s['tokens']:,} tokens. "
               f"Unigram entropy of the final mixture: **{s['unigram_entropy']:.3f}** nats/token; "
               f"final train loss **{s['final_train_loss']:.3f}**, held-out loss "
               f"**{_f(s.get('final_eval_loss'))}** (perplexity {_f(2.718281828 ** s['final_eval_loss'], '.1f') if s.get('final_eval_loss') else 'n/a'}).", ""]
        md += _table(["phase", "steps", "tokens seen (cum.)", "held-out loss"],
                     [[p["phase"], p["steps"], f"{p.get('tokens_seen', 0):,}", _f(p.get("eval_loss"))]
                      for p in s["phases"]])
    plot = _training_plot(r, run_dir)
    if plot:
        md += [f"![loss and learning rate over all phases]({_rel(plot, run_dir)})", "",
               "Loss and learning rate end to end: pretraining's three phases (LM loss), SFT's two phases "
               "(loss on assistant tokens) and each ARIES iteration (preference + ARIES-SFT loss); "
               "the losses are different objectives, so each stage has its own colour.", ""]

    md += _posttrain_section(r)
    md += _eval_section(r)
    for key in ("sparsity", "bench"):
        if key in r and r[key].get("report_md"):
            md += [r[key]["report_md"], ""]

    if "export" in r:
        e = r["export"]
        chk = e["llama_cpp_agreement"]
        md += ["## GGUF export and llama.cpp agreement", ""]
        md += _table(["file", "size"], [[_rel(v["path"], run_dir), f"{v['bytes'] / 1e6:.2f} MB"]
                                         for v in e["files"].values()])
        md += [f"llama.cpp on the f32 GGUF vs our PyTorch model, {chk['prompt_tokens']}-token held-out prompt: "
               f"max |logit diff| {chk['max_abs_logit_diff']:.2e} ({chk['relative_diff']:.1e} of the largest "
               f"logit); greedy {chk['greedy_tokens']} tokens identical: **{chk['greedy_identical']}**.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    print(f"report: {path}")
    return path

