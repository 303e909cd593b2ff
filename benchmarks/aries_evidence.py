"""Post-training evidence on the tiny embedded default: held-out accuracy on the verifiable math
task (arith TEST split) after pretraining, SFT phase 1, SFT phase 2, each ARIES iteration, and the
lambda = 0 iterative-DPO baseline given the same budget.

    python benchmarks/aries_evidence.py                      # runs under runs/tiny
    python benchmarks/aries_evidence.py --root runs/tiny-evidence --pretrained PATH
    python benchmarks/aries_evidence.py --reuse              # reuse finished runs, re-tabulate
    python benchmarks/aries_evidence.py --reuse --seeds 3    # + ARIES and DPO with seeds 1, 2

Runs `plm sft recipes/tiny/sft.yaml`, `plm aries recipes/tiny/aries.yaml`, the same with
`aries.chain=refine` (pairs drawn from chains of the model's own refinements) and with
lambda = 0 (the iterative-DPO baseline, same prompts, generations and training budget), each
under ROOT (sft/, aries/, aries-refine/, aries-dpo/), from the pretrained model (default
ROOT/pretrain/final: plm data corpus --out runs/tiny/corpus && plm pretrain
recipes/tiny/pretrain.yaml). The runs evaluate on 200 held-out problems per stage; the script
then re-evaluates SFT phase 2 and every final model on a larger held-out set (--big-n, default
1000) with paired confidence intervals, writes ROOT/evidence/evidence.json and evidence.md, and
prints the tables. With --seeds N, ARIES and the DPO baseline are repeated with seeds 1..N-1 (sampling,
pair order; ROOT/aries-s1/, ...): the spread between seeds is training noise, which the paired
intervals (evaluation noise of one model pair) do not include.
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
    ap.add_argument("--root", default="runs/tiny", help="where the runs go (sft/, aries/, aries-dpo/, evidence/)")
    ap.add_argument("--pretrained", default=None, help="pretrained model (default ROOT/pretrain/final)")
    ap.add_argument("--sft-recipe", default="recipes/tiny/sft.yaml")
    ap.add_argument("--aries-recipe", default="recipes/tiny/aries.yaml")
    ap.add_argument("--big-n", type=int, default=1000, help="held-out problems for the final comparison")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs instead of training afresh")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every plm aries run")
    ap.add_argument("--seeds", type=int, default=1, help="run ARIES and the DPO baseline with seeds 0..N-1")
    args = ap.parse_args()

    import dataclasses

    from plm.align.config import SFTRecipe
    from plm.eval.heldout import evaluate_checkpoint
    from plm.recipe import load_recipe

    plm = [sys.executable, "-m", "plm"]
    root = Path(args.root)
    pretrained = Path(args.pretrained) if args.pretrained else root / "pretrain" / "final"
    out = REPO / root / "evidence"
    out.mkdir(parents=True, exist_ok=True)
    sft_r = load_recipe(REPO / args.sft_recipe, SFTRecipe)
    sft_dir = root / "sft"
    # (label, run folder, extra settings): the recipe as it is, ARIES with the paper's sampling
    # (chains of the model's own refinements), and the lambda = 0 iterative-DPO baseline
    variants = [("ARIES", "aries", []), ("ARIES, refinement chains", "aries-refine", ["aries.chain=refine"]),
                ("DPO baseline (lambda=0)", "aries-dpo", ["aries.lambda=0"])]
    seeds = list(range(max(1, args.seeds)))
    fresh = [] if args.reuse else ["--no-resume"]
    extra = sum((["--set", s] for s in args.set), [])
    if not (REPO / pretrained / "config.json").exists():
        sys.exit(f"{pretrained} not found: run `plm data corpus --out runs/tiny/corpus && "
                 "plm pretrain recipes/tiny/pretrain.yaml` first")
    sft_dir = REPO / sft_dir
    dirs = {label: REPO / root / sub for label, sub, _ in variants}

    timings = {}
    timings["sft"] = run(plm + ["sft", args.sft_recipe, "--set", f"model.init_from={pretrained}",
                                "--set", f"run_dir={sft_dir}"] + fresh)
    base = ["aries", args.aries_recipe, "--set", f"model.init_from={sft_dir / 'final'}"]
    for label, _, sets in variants:
        timings[label] = run(plm + base + ["--set", f"run_dir={dirs[label]}"] + sum((["--set", x] for x in sets), [])
                             + fresh + extra)
    # more seeds for the two runs the verdict is about (ARIES and the DPO baseline)
    seeds_of = {label: seeds if label in ("ARIES", "DPO baseline (lambda=0)") else [0] for label in dirs}
    seeded = {}  # (label, seed) -> run folder, seed 0 being the runs above
    for label, sub, sets in variants:
        seeded[(label, 0)] = dirs[label]
        for sd in seeds_of[label][1:]:
            seeded[(label, sd)] = REPO / root / f"{sub}-s{sd}"
            run(plm + base + ["--set", f"run_dir={seeded[(label, sd)]}", "--set", f"seed={sd}"]
                + sum((["--set", x] for x in sets), []) + fresh + extra)

    ev = sft_r.eval
    t = time.time()
    base_eval = evaluate_checkpoint(REPO / pretrained, ev, style="plain").as_dict()
    timings["eval_pretrained"] = time.time() - t
    sft_sum = json.loads((sft_dir / "sft_summary.json").read_text())
    metrics = {label: [json.loads(x) for x in (d / "aries_metrics.jsonl").read_text().splitlines() if x.strip()]
               for label, d in dirs.items()}
    phases = list(sft_sum["eval"])

    rows = [{"stage": "pretrained (base, 'Question:/Answer:' prompt)", **base_eval}]
    for i, p in enumerate(phases):
        rows.append({"stage": f"SFT phase {i + 1} ({p})", **sft_sum["eval"][p]})
    for name, rs in metrics.items():
        for r in rs[1:]:  # iteration 0 is SFT phase 2
            rows.append({"stage": f"{name} iteration {r['iteration']}", **r["eval"], "pairs_kept": r.get("pairs_kept"),
                         "prompts": r.get("prompts"), "reward_margin_direct": r.get("reward_margin_direct"),
                         "reward_margin_refine": r.get("reward_margin_refine")})
    n = rows[0]["n"]
    verdict = {"ci95_at_50pct": ci95(0.5, n)}
    # the final comparison on a larger held-out set, paired on the same problems
    big_ev = dataclasses.replace(ev, tasks=dataclasses.replace(ev.tasks, args={**ev.tasks.args, "n": args.big_n}),
                                 per_task=True)

    def final_name(label: str, sd: int) -> str:
        return f"{label} final" + (f" (seed {sd})" if sd else "")

    t = time.time()
    finals = {"SFT phase 2": sft_dir / phases[-1],
              **{final_name(label, sd): seeded[(label, sd)] / "final" for label, _, _ in variants for sd in seeds_of[label]}}
    big = {name: evaluate_checkpoint(path, big_ev).as_dict() for name, path in finals.items()}
    timings["eval_big"] = time.time() - t
    comparisons = {}
    dpo = "DPO baseline (lambda=0)"
    pairs = [(final_name(label, sd), "SFT phase 2") for label in dirs for sd in seeds_of[label]] + \
        [(final_name(label, sd), final_name(dpo, sd)) for label in dirs if label != dpo for sd in seeds_of[label]]
    for a, b in pairs:
        for mode in ("direct", "refine"):
            d = [x - y for x, y in zip(big[a][f"{mode}_scores"], big[b][f"{mode}_scores"])]
            mean = sum(d) / len(d)
            std = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1))
            comparisons[f"{a} - {b} ({mode})"] = {"diff": mean, "ci95": 1.96 * std / math.sqrt(len(d))}
    verdict.update({k: v for k, v in comparisons.items()})
    # over seeds: the mean paired difference and its range (training noise)
    over_seeds = {}
    if len(seeds) > 1:
        for label in (lb for lb in dirs if len(seeds_of[lb]) > 1):
            for ref in ("SFT phase 2", dpo):
                if label == ref:
                    continue
                for mode in ("direct", "refine"):
                    ds = [comparisons[f"{final_name(label, sd)} - "
                                      f"{ref if ref == 'SFT phase 2' else final_name(ref, sd)} ({mode})"]["diff"]
                          for sd in seeds]
                    over_seeds[f"{label} - {ref} ({mode})"] = {"mean": sum(ds) / len(ds), "min": min(ds), "max": max(ds)}
        verdict["over_seeds"] = over_seeds
    post = timings["sft"] + timings["ARIES"]
    lines = [f"Held-out accuracy (%) on {n} arith TEST-split problems (difficulty {ev.tasks.args.get('difficulty', 'mixed')}, "
             f"greedy; self-refine = answer, then {ev.rounds} refinement(s) through z). "
             f"95% CI half-width at 50%: ±{100 * verdict['ci95_at_50pct']:.1f} points.",
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
    lines += ["", f"Final comparison on {args.big_n} held-out problems (same problems for every model):", "",
              "| model | direct | self-refine | refinement fixed / broke |", "|---|---|---|---|"]
    for name, r in big.items():
        lines.append(f"| {name} | {pct(r['direct_acc'])} | {pct(r['refine_acc'])} | {r['fixed']} / {r['broken']} |")
    lines += ["", "| paired difference (points) | direct | self-refine |", "|---|---|---|"]
    for a, b in pairs:
        cell = [f"{100 * comparisons[f'{a} - {b} ({m})']['diff']:+.1f} ± {100 * comparisons[f'{a} - {b} ({m})']['ci95']:.1f}"
                for m in ("direct", "refine")]
        lines.append(f"| {a} − {b} | {cell[0]} | {cell[1]} |")
    if over_seeds:
        lines += ["", f"Over {len(seeds)} seeds (mean paired difference on the {args.big_n} problems, and its range):", "",
                  "| difference (points) | direct | self-refine |", "|---|---|---|"]
        for key in dict.fromkeys(k.rsplit(" (", 1)[0] for k in over_seeds):
            cell = [f"{100 * over_seeds[f'{key} ({m})']['mean']:+.1f} ({100 * over_seeds[f'{key} ({m})']['min']:+.1f} "
                    f"to {100 * over_seeds[f'{key} ({m})']['max']:+.1f})" for m in ("direct", "refine")]
            lines.append(f"| {key.replace(' - ', ' − ')} | {cell[0]} | {cell[1]} |")
    lines += ["", "Runs reused (--reuse): the wall times below are of the reuse checks, not of training."] if args.reuse else []
    lines += ["",
              f"Wall time on this machine: plm sft {timings['sft']:.0f} s, plm aries {timings['ARIES']:.0f} s "
              f"(post-training total {post:.0f} s = {post / 60:.1f} min); ARIES with refinement chains "
              f"{timings['ARIES, refinement chains']:.0f} s; DPO baseline {timings['DPO baseline (lambda=0)']:.0f} s."]
    md = "\n".join(lines)
    for r in big.values():
        r.pop("direct_scores", None), r.pop("refine_scores", None)
    result = {"rows": rows, "big_eval": big, "verdict": verdict, "timings_s": timings, "cpu_count": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv)}
    (out / "evidence.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "evidence.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
