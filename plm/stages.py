"""The pipeline's stages, each a thin call into the area that owns the work.

Each returns its results (numbers for the report) plus "outputs": the paths it wrote,
which the pipeline checksums into the stage manifest.
"""
from __future__ import annotations

from pathlib import Path

from plm.errors import ConfigError, PLMError
from plm.pipeline import Context, Stage
from plm.recipe import load_recipe


def _recipe(ctx: Context, s: dict, extra: list[str] | None = None) -> dict:
    """The stage's recipe with `vars.run` set to the pipeline's run folder (so every path the
    recipe builds from ${run} lands inside this run), then the stage's own `set:` overrides."""
    if "recipe" not in s:
        raise ConfigError("stages: this stage needs 'recipe: path/to/recipe.yaml'")
    return load_recipe(s["recipe"], [f"vars.run={ctx.run_dir}"] + list(s.get("set", [])) + list(extra or []))


def corpus(ctx: Context, s: dict) -> dict:
    from plm.data.corpus import write_embedded_corpus
    out = ctx.path("corpus")
    info = write_embedded_corpus(out, code_bytes=int(s.get("code_bytes", 6_000_000)),
                                 math_problems=int(s.get("math_problems", 20_000)),
                                 math_test=int(s.get("math_test", 500)), seed=int(s.get("seed", 0)))
    return {**info, "outputs": [out]}


def tokenizer(ctx: Context, s: dict) -> dict:
    from plm.data.commands import iter_text_files
    from plm.data.tokenizer import train_bpe
    c = ctx.path("corpus")
    inputs = s.get("inputs") or [str(c / "code"), str(c / "docs"), str(c / "math")]
    tok = train_bpe(iter_text_files(inputs), int(s.get("vocab_size", 4096)))
    out = ctx.path("tokenizer")
    tok.save(out)
    sample = (c / "docs" / "assert.txt").read_text() if (c / "docs" / "assert.txt").exists() else "print(1 + 2)"
    return {"vocab_size": tok.vocab_size, "chars_per_token": len(sample) / max(1, len(tok.encode(sample))),
            "outputs": [out]}


def pretrain(ctx: Context, s: dict) -> dict:
    from plm.train.pretrain import pretrain as run
    summary = run(_recipe(ctx, s))
    final = Path(summary["final_dir"])
    return {"summary": summary, "checkpoint": str(final), "outputs": [final]}


def sft(ctx: Context, s: dict) -> dict:
    from plm.align.sft import sft as run
    summary = run(_recipe(ctx, s))
    return {"eval": summary.get("eval", {}), "phases": summary.get("phases", []),
            "checkpoint": summary["final_dir"], "outputs": [Path(summary["final_dir"])]}


def aries(ctx: Context, s: dict) -> dict:
    from plm.align.aries import aries as run
    recipe = _recipe(ctx, s)
    summary = run(recipe)
    out = {"rows": summary["rows"], "checkpoint": summary["final_dir"], "outputs": [Path(summary["final_dir"])]}
    if s.get("baseline"):  # the lambda = 0 iterative-DPO baseline with the same budget
        base = _recipe(ctx, s, s["baseline"])
        out["baseline_rows"] = run(base)["rows"]
    return out


def evaluate(ctx: Context, s: dict) -> dict:
    """Held-out math (pretrained model, plain prompts), a code task and held-out perplexity for
    every trained checkpoint of the run."""
    from plm.align.sft import evaluate_checkpoint
    ckpts = {st: ctx.results[st]["checkpoint"] for st in ("pretrain", "sft", "aries") if st in ctx.results}
    out: dict = {"math_pretrain_plain": None, "code": {}, "perplexity": {}}
    if "pretrain" in ckpts and s.get("math"):
        out["math_pretrain_plain"] = evaluate_checkpoint(ckpts["pretrain"], {**s["math"], "rounds": 0}, style="plain")
    for st, ck in ckpts.items():
        if s.get("code") and st != "pretrain":
            out["code"][st] = evaluate_checkpoint(ck, s["code"])
        if s.get("perplexity"):
            out["perplexity"][st] = heldout_perplexity(ck, s["perplexity"])
    return out


def heldout_perplexity(ckpt: str, s: dict) -> dict:
    import math

    import torch

    from plm.data.mixture import MixtureLoader
    from plm.model.modeling import PLMForCausalLM
    from plm.train.trainer import lm_loss_sum
    model = PLMForCausalLM.from_pretrained(ckpt)
    loader = MixtureLoader({"heldout": (s["data"], 1.0)}, int(s.get("seq_len", 256)), int(s.get("batch", 8)), seed=99)
    tot, n = 0.0, 0
    with torch.no_grad():
        for _ in range(int(s.get("batches", 4))):
            x, y = next(loader)
            ls, c = lm_loss_sum(model, {"input_ids": x, "labels": y})
            tot, n = tot + float(ls), n + c
    return {"loss": tot / n, "perplexity": math.exp(tot / n), "tokens": n}


def export(ctx: Context, s: dict) -> dict:
    """GGUF files for llama.cpp, and the agreement check on the f32 export."""
    from plm.data.tokenizer import Tokenizer
    from plm.export.gguf import export_gguf
    from plm.export.llama_check import compare_with_llama_cpp
    from plm.model.modeling import PLMForCausalLM

    ckpt = Path(s.get("checkpoint") or latest_checkpoint(ctx))
    out = ctx.path("export")
    files = {t: export_gguf(ckpt, out / f"model-{t}.gguf", t) for t in s.get("types", ["f32", "f16", "q8_0"])}
    tok = Tokenizer.from_dir(ckpt)
    test = (ctx.path("corpus", "math_test.jsonl").read_text().splitlines()[0]
            if ctx.path("corpus", "math_test.jsonl").exists() else "def f(x):\n    return x")
    prompt = tok.encode(test)[: int(s.get("check_tokens", 64))]
    check = compare_with_llama_cpp(PLMForCausalLM.from_pretrained(ckpt), files["f32"], prompt,
                                   int(s.get("greedy_tokens", 32)))
    return {"checkpoint": str(ckpt), "files": {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in files.items()},
            "llama_cpp_agreement": check, "outputs": list(files.values())}


def sparsity(ctx: Context, s: dict) -> dict:
    """relu² activation sparsity per layer of the final checkpoint (JSON + PNG)."""
    import json

    from plm.cli import main as cli
    ckpt = s.get("checkpoint") or latest_checkpoint(ctx)
    out = ctx.path("sparsity")
    args = ["sparsity", ckpt, "--out", str(out), "--tokens", str(s.get("tokens", 4096)),
            "--seq-len", str(s.get("seq_len", 256))]
    for d in s.get("data") or [str(ctx.path("corpus", "math_test.jsonl"))]:
        args += ["--data", d]
    args += ["--text-field", s.get("text_field", "answer")]
    if cli(args) != 0:
        raise PLMError("plm sparsity failed")
    rep = json.loads((out / "sparsity.json").read_text())
    layers = rep.get("layers", [])
    md = ["## Activation sparsity (relu² MLP)", "",
          f"Measured on {rep.get('tokens')} held-out tokens of the final checkpoint: mean exactly-zero "
          f"fraction **{100 * rep.get('mean_exact_zero', 0):.1f}%** (PLM-1.8B: about 90.9%).", ""]
    md += ["| layer | exact zeros | active neurons/token |", "|---|---:|---:|"]
    md += [f"| {x['layer']} | {100 * x['exact_zero']:.1f}% | {x['mean_active']:.1f} |" for x in layers]
    md += ["", "![sparsity per layer](sparsity/sparsity.png)"]
    return {"mean_exact_zero": rep.get("mean_exact_zero"), "layers": layers, "report_md": "\n".join(md),
            "outputs": [out / "sparsity.json"]}


def bench(ctx: Context, s: dict) -> dict:
    """The edge runtime against llama.cpp on the final checkpoint (benchmarks/edge.py)."""
    import json
    import subprocess
    import sys

    ckpt = s.get("checkpoint") or latest_checkpoint(ctx)
    out = ctx.path("bench")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "edge.py"
    cmd = [sys.executable, str(script), "--ckpt", ckpt, "--out", str(out), "--workdir", str(out / "work"),
           "--threads", str(s.get("threads", 2)), "--contexts", str(s.get("contexts", "64,256,1000")),
           "--decode-tokens", str(s.get("decode_tokens", 16)), "--trained"]
    # quantisation quality on held-out text of the run's own domain (the math test split)
    test = ctx.path("corpus", "math_test.jsonl")
    if test.exists():
        cmd += ["--data", str(test), "--text-field", "answer"]
    cmd += list(s.get("args", []))
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise PLMError(f"benchmarks/edge.py exited with {r.returncode}")
    md = (out / "edge.md").read_text() if (out / "edge.md").exists() else ""
    md = md.replace("(edge.png)", "(bench/edge.png)")
    res = json.loads((out / "edge.json").read_text())
    return {"report_md": "## Edge runtime against llama.cpp\n\n" + md, "summary": res.get("summary", {}),
            "outputs": [out / "edge.json"]}


def latest_checkpoint(ctx: Context) -> str:
    """The most trained checkpoint so far: ARIES, else SFT, else pretraining."""
    for stage in ("aries", "sft", "pretrain"):
        r = ctx.results.get(stage)
        if r and r.get("checkpoint"):
            return r["checkpoint"]
    raise ConfigError("no trained checkpoint yet: run the pretrain stage first")


STAGES = [
    Stage("corpus", corpus, "write the embedded offline corpus (stdlib code, docs, arithmetic problems)"),
    Stage("tokenizer", tokenizer, "train the byte-level BPE tokenizer on the corpus"),
    Stage("pretrain", pretrain, "pretrain: three phases, each with its own WSDC schedule"),
    Stage("sft", sft, "supervised fine-tuning: phase 1 general, phase 2 math and code"),
    Stage("aries", aries, "ARIES self-refinement preference learning (and the lambda = 0 DPO baseline)"),
    Stage("eval", evaluate, "held-out math, a code task and perplexity for every checkpoint"),
    Stage("sparsity", sparsity, "relu² activation sparsity per layer"),
    Stage("export", export, "GGUF export and llama.cpp agreement check"),
    Stage("bench", bench, "edge runtime vs llama.cpp: speed, KV-cache and memory"),
]
