"""The pipeline's stages, each a thin call into the library function that owns the work.

Each takes the run context and its typed settings (plm.pipeline.config) and returns its
results (numbers for the report) plus "outputs": the paths it wrote, which the engine
checksums into the stage manifest.
"""
from __future__ import annotations

from pathlib import Path

from plm.errors import ConfigError
from plm.pipeline.config import (AriesStage, BenchStage, CorpusStage, EvalStage, ExportStage, PerplexitySpec,
                                 RecipeStage, SparsityStage, TokenizerStage)
from plm.pipeline.engine import Context, Stage
from plm.recipe import parse


def corpus(ctx: Context, s: CorpusStage) -> dict:
    from plm.data.corpus import write_embedded_corpus
    out = ctx.path("corpus")
    info = write_embedded_corpus(out, code_bytes=s.code_bytes, math_problems=s.math_problems,
                                 math_test=s.math_test, seed=s.seed)
    return {**info, "outputs": [out]}


def tokenizer(ctx: Context, s: TokenizerStage) -> dict:
    from plm.data.prepare import iter_text_files
    from plm.data.tokenizer import train_bpe
    c = ctx.path("corpus")
    inputs = s.inputs or [str(c / "code"), str(c / "docs"), str(c / "math")]
    tok = train_bpe(iter_text_files(inputs), s.vocab_size)
    out = ctx.path("tokenizer")
    tok.save(out)
    sample = (c / "docs" / "assert.txt").read_text() if (c / "docs" / "assert.txt").exists() else "print(1 + 2)"
    return {"vocab_size": tok.vocab_size, "chars_per_token": len(sample) / max(1, len(tok.encode(sample))),
            "outputs": [out]}


def pretrain(ctx: Context, s: RecipeStage) -> dict:
    from plm.train.pretrain import pretrain as run
    summary = run(ctx.recipes["pretrain"])
    final = Path(summary["final_dir"])
    return {"summary": summary, "checkpoint": str(final), "outputs": [final]}


def sft(ctx: Context, s: RecipeStage) -> dict:
    from plm.align.sft import sft as run
    summary = run(ctx.recipes["sft"])
    return {"eval": summary.get("eval", {}), "phases": summary.get("phases", []),
            "checkpoint": summary["final_dir"], "outputs": [Path(summary["final_dir"])]}


def aries(ctx: Context, s: AriesStage) -> dict:
    from plm.align.aries import aries as run
    summary = run(ctx.recipes["aries"])
    out = {"rows": summary["rows"], "checkpoint": summary["final_dir"], "outputs": [Path(summary["final_dir"])]}
    if "aries-baseline" in ctx.recipes:  # the lambda = 0 iterative-DPO baseline with the same budget
        out["baseline_rows"] = run(ctx.recipes["aries-baseline"])["rows"]
    return out


def evaluate(ctx: Context, s: EvalStage) -> dict:
    """Held-out math (pretrained model, plain prompts), a code task and held-out perplexity for
    every trained checkpoint of the run."""
    from plm.eval.heldout import evaluate_checkpoint
    ckpts = {st: ctx.results[st]["checkpoint"] for st in ("pretrain", "sft", "aries") if st in ctx.results}
    out: dict = {"math_pretrain_plain": None, "code": {}, "perplexity": {}}
    if "pretrain" in ckpts and s.math:
        out["math_pretrain_plain"] = evaluate_checkpoint(ckpts["pretrain"], s.math, style="plain").as_dict()
    for st, ck in ckpts.items():
        if s.code and st != "pretrain":
            out["code"][st] = evaluate_checkpoint(ck, s.code).as_dict()
        if s.perplexity:
            out["perplexity"][st] = heldout_perplexity(ck, s.perplexity)
    return out


def heldout_perplexity(ckpt: str, s: PerplexitySpec) -> dict:
    from plm.eval.perplexity import token_perplexity
    return token_perplexity(ckpt, s.data, s.seq_len, s.batch, s.batches)


def export(ctx: Context, s: ExportStage) -> dict:
    """GGUF files for llama.cpp, and the agreement check on the f32 export."""
    from plm.data.tokenizer import Tokenizer
    from plm.export.gguf import export_gguf
    from plm.export.llama_check import compare_with_llama_cpp
    from plm.model.modeling import PLMForCausalLM

    ckpt = Path(s.checkpoint or latest_checkpoint(ctx))
    out = ctx.path("export")
    files = {t: export_gguf(ckpt, out / f"model-{t}.gguf", t) for t in s.types}
    if "f32" not in files:
        raise ConfigError("stages.export.types: the llama.cpp agreement check needs the f32 export")
    tok = Tokenizer.from_dir(ckpt)
    test = (ctx.path("corpus", "math_test.jsonl").read_text().splitlines()[0]
            if ctx.path("corpus", "math_test.jsonl").exists() else "def f(x):\n    return x")
    prompt = tok.encode(test)[: s.check_tokens]
    check = compare_with_llama_cpp(PLMForCausalLM.from_pretrained(ckpt), files["f32"], prompt, s.greedy_tokens)
    return {"checkpoint": str(ckpt), "files": {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in files.items()},
            "llama_cpp_agreement": check, "outputs": list(files.values())}


def sparsity(ctx: Context, s: SparsityStage) -> dict:
    """relu² activation sparsity per layer of the final checkpoint (JSON + PNG)."""
    from plm.infer.sparsity import sparsity_report
    ckpt = s.checkpoint or latest_checkpoint(ctx)
    out = ctx.path("sparsity")
    rep = sparsity_report(ckpt, s.data or [str(ctx.path("corpus", "math_test.jsonl"))], out, tokens=s.tokens,
                          seq_len=s.seq_len, text_field=s.text_field)
    return {"tokens": rep.tokens, "mean_exact_zero": rep.mean_exact_zero,
            "layers": [vars(x) for x in rep.layers], "png": "sparsity/sparsity.png",
            "outputs": [out / "sparsity.json"]}


def bench(ctx: Context, s: BenchStage) -> dict:
    """The edge runtime against llama.cpp on the final checkpoint (plm.bench.edge)."""
    from plm.bench.edge import DEFAULT_ENGINES, SPARSE_ENGINES, EdgeBenchSettings, run
    ckpt = s.checkpoint or latest_checkpoint(ctx)
    out = ctx.path("bench")
    test = ctx.path("corpus", "math_test.jsonl")  # quantisation quality on held-out text of the run's domain
    held_out = {"data": [str(test)], "text_field": "answer"} if test.exists() else {}
    engines = ",".join(DEFAULT_ENGINES + SPARSE_ENGINES)  # a trained model: its real sparsity
    settings = parse(EdgeBenchSettings, {"contexts": "64,256,1000", "engines": engines, **held_out, **s.settings,
                                         "ckpt": ckpt, "out": str(out), "workdir": str(out / "work"),
                                         "command": "plm pipeline (bench stage)"}, "stages.bench")
    results, md = run(settings)
    return {"report_md": "## Edge runtime against llama.cpp\n\n" + md.replace("(edge.png)", "(bench/edge.png)"),
            "summary": results.get("summary", {}), "outputs": [out / "edge.json"]}


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
