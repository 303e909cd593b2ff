"""Post-training evidence on the tiny embedded default: held-out accuracy on the verifiable math
task (arith TEST split) after pretraining, SFT phase 1, SFT phase 2, each ARIES iteration, and the
lambda = 0 iterative-DPO baseline given the same budget.

    python benchmarks/aries_evidence.py            # runs plm sft, plm aries, plm aries (lambda=0)
    python benchmarks/aries_evidence.py --reuse    # only (re)evaluates runs that already exist

Needs runs/tiny/pretrain/final (plm data corpus --out runs/tiny/corpus && plm pretrain
recipes/tiny/pretrain.yaml). Writes OUT/evidence.json and OUT/evidence.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}")
    return time.time() - t


def ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="runs/tiny/pretrain/final")
    ap.add_argument("--sft-recipe", default="recipes/tiny/sft.yaml")
    ap.add_argument("--aries-recipe", default="recipes/tiny/aries.yaml")
    ap.add_argument("--out", default="runs/tiny/evidence")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs instead of training afresh")
    ap.add_argument("--set", action="append", default=[], help="extra --set for both plm aries runs")
    args = ap.parse_args()

    from plm.align.sft import evaluate_checkpoint
    from plm.recipe import load_recipe

    plm = [sys.executable, "-m", "plm"]
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    sft_r = load_recipe(REPO / args.sft_recipe)
    aries_r = load_recipe(REPO / args.aries_recipe, args.set)
    sft_dir = REPO / sft_r["run_dir"]
    aries_dir = REPO / aries_r["run_dir"]
    dpo_dir = aries_dir.with_name(aries_dir.name + "-dpo")
    fresh = [] if args.reuse else ["--no-resume"]
    if not (REPO / args.pretrained / "config.json").exists():
        sys.exit(f"{args.pretrained} not found: run `plm data corpus --out runs/tiny/corpus && "
                 "plm pretrain recipes/tiny/pretrain.yaml` first")

    timings = {}
    timings["sft"] = run(plm + ["sft", args.sft_recipe] + fresh)
    timings["aries"] = run(plm + ["aries", args.aries_recipe] + fresh + sum((["--set", s] for s in args.set), []))
    timings["dpo"] = run(plm + ["aries", args.aries_recipe, "--set", "aries.lambda=0", "--set", f"run_dir={dpo_dir.relative_to(REPO)}"]
                         + fresh + sum((["--set", s] for s in args.set), []))

    ev = sft_r["eval"]
    t = time.time()
    base = evaluate_checkpoint(REPO / args.pretrained, ev, style="plain")
    timings["eval_pretrained"] = time.time() - t
    sft_sum = json.loads((sft_dir / "sft_summary.json").read_text())
    a_rows = [json.loads(x) for x in (aries_dir / "aries_metrics.jsonl").read_text().splitlines() if x.strip()]
    d_rows = [json.loads(x) for x in (dpo_dir / "aries_metrics.jsonl").read_text().splitlines() if x.strip()]
    phases = list(sft_sum["eval"])

    rows = [{"stage": "pretrained (base, 'Question:/Answer:' prompt)", **base}]
    for i, p in enumerate(phases):
        rows.append({"stage": f"SFT phase {i + 1} ({p})", **sft_sum["eval"][p]})
    for name, rs in (("ARIES (lambda=1)", a_rows), ("DPO baseline (lambda=0)", d_rows)):
        for r in rs[1:]:
            rows.append({"stage": f"{name} iteration {r['iteration']}", **r["eval"], "pairs_kept": r.get("pairs_kept"),
                         "prompts": r.get("prompts"), "reward_margin_direct": r.get("reward_margin_direct"),
                         "reward_margin_refine": r.get("reward_margin_refine")})
    n = rows[0]["n"]
    sft2 = sft_sum["eval"][phases[-1]]
    a_last, d_last = a_rows[-1]["eval"], d_rows[-1]["eval"]
    verdict = {
        "aries_minus_sft2_direct": a_last["direct_acc"] - sft2["direct_acc"],
        "aries_minus_sft2_refine": a_last["refine_acc"] - sft2["refine_acc"],
        "aries_minus_dpo_direct": a_last["direct_acc"] - d_last["direct_acc"],
        "aries_minus_dpo_refine": a_last["refine_acc"] - d_last["refine_acc"],
        "ci95_at_50pct": ci95(0.5, n),
    }
    post = timings["sft"] + timings["aries"]
    lines = [f"Held-out accuracy (%) on {n} arith TEST-split problems (greedy; self-refine = answer, then "
             f"{ev.get('rounds', 1)} refinement(s) through z). 95% CI half-width at 50%: ±{100 * verdict['ci95_at_50pct']:.1f} points.",
             "",
             "| stage | direct | self-refine | refinement fixed / broke | pairs kept | reward margin (direct / refine) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fb = f"{r['fixed']} / {r['broken']}" if "fixed" in r else "-"
        pk = f"{r['pairs_kept']}/{r['prompts']}" if r.get("pairs_kept") is not None else "-"
        rm = "-"
        if r.get("reward_margin_direct") is not None:
            rm = f"{r['reward_margin_direct']:.2f} / " + (f"{r['reward_margin_refine']:.2f}"
                                                         if r.get("reward_margin_refine") is not None else "-")
        lines.append(f"| {r['stage']} | {pct(r['direct_acc'])} | {pct(r.get('refine_acc'))} | {fb} | {pk} | {rm} |")
    lines += ["",
              f"Wall time: plm sft {timings['sft']:.0f} s, plm aries {timings['aries']:.0f} s "
              f"(post-training total {post:.0f} s = {post / 60:.1f} min); DPO baseline {timings['dpo']:.0f} s.",
              f"ARIES final vs SFT phase 2: direct {100 * verdict['aries_minus_sft2_direct']:+.1f}, "
              f"self-refine {100 * verdict['aries_minus_sft2_refine']:+.1f} points.",
              f"ARIES final vs DPO final: direct {100 * verdict['aries_minus_dpo_direct']:+.1f}, "
              f"self-refine {100 * verdict['aries_minus_dpo_refine']:+.1f} points."]
    md = "\n".join(lines)
    result = {"rows": rows, "verdict": verdict, "timings_s": timings, "cpu_threads": os.cpu_count(),
              "command": "python benchmarks/aries_evidence.py" + (" --reuse" if args.reuse else "")}
    (out / "evidence.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "evidence.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
