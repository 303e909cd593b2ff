"""`plm sft`: supervised fine-tuning in phases (ASSUMED split, REFERENCE §4: phase 1 general
instructions, phase 2 math and code) on the shared trainer.

Recipe sections (see recipes/tiny/sft.yaml):
  name, run_dir, seed
  model:     {init_from: CHECKPOINT_DIR}            the pretrained model
  tokenizer: DIR | qwen2 (default: the init_from directory)
  data:      {SOURCE: {path: | hf: | builder: ...}} (plm.align.data)
  train:     TrainConfig fields (seq_len = packed row length)
  phases:    [{name, sources: {SOURCE: weight}, epochs | steps, schedule: {...}}]
             weight = how many times each sample appears per epoch (0.5 = a seeded half)
  eval:      {math: {builder: arith, split: test, n: 200, ...}, rounds: 1, max_new_tokens: 192}
             held-out verifiable accuracy of every phase's final model (optional)
Outputs: RUN_DIR/<phase name>/ (model + tokenizer at the end of each phase), RUN_DIR/final
(= the last phase), metrics.jsonl, sft_summary.json.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import torch

from plm.align.data import Encoded, SFTLoader, encode_chat, load_source, steps_for, summarize
from plm.data.tokenizer import Tokenizer
from plm.errors import ConfigError
from plm.recipe import section
from plm.train.dist import DistEnv, barrier, cleanup, init_distributed
from plm.train.trainer import Phase, TrainConfig, Trainer, read_metrics


def run_dir_of(recipe: dict, default: str) -> Path:
    return Path(recipe.get("run_dir") or f"runs/{recipe.get('name', default)}")


def tokenizer_for(recipe: dict, env: DistEnv) -> Tokenizer:
    from plm.train.pretrain import resolve_tokenizer
    spec = recipe.get("tokenizer")
    if spec is None:
        init = section(recipe, "model").get("init_from")
        if not init:
            raise ConfigError("tokenizer: not given and model.init_from is not set")
        spec = str(init)
    return resolve_tokenizer(spec, env)


def export(src: Path, dst: Path, tok: Tokenizer) -> Path:
    """A checkpoint directory as a released model (no trainer state) with its tokenizer; atomic."""
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
    tok.save(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def weighted(samples: list, weight: float, seed: int) -> list:
    """Each sample `weight` times (fractions: a seeded subset)."""
    if weight < 0:
        raise ConfigError(f"source weight must be >= 0, got {weight}")
    whole, frac = int(weight), weight - int(weight)
    out = list(samples) * whole
    if frac > 0:
        idx = list(range(len(samples)))
        random.Random(seed).shuffle(idx)
        out += [samples[i] for i in sorted(idx[: int(round(frac * len(samples)))])]
    return out


def build_sft_phases(recipe: dict, tok: Tokenizer, cfg: TrainConfig, world: int) -> tuple[list[Phase], dict]:
    from plm.train.pretrain import schedule_from
    seed = int(recipe.get("seed", 0))
    data = section(recipe, "data")
    phases_spec = section(recipe, "phases")
    used = {s for p in phases_spec for s in (p.get("sources") or {})}
    unknown = sorted(used - set(data))
    if unknown:
        raise ConfigError(f"phases name data source(s) {unknown} that data: does not define")
    encoded: dict[str, list[Encoded]] = {}
    info: dict = {"sources": {}}
    for name in sorted(used):
        chats = load_source(name, data[name], seed)
        encoded[name] = [encode_chat(tok, c, cfg.seq_len) for c in chats]
        info["sources"][name] = summarize(encoded[name])
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    phases = []
    for i, p in enumerate(phases_spec):
        where = f"phases[{i}]"
        name = p.get("name", f"sft{i + 1}")
        if not p.get("sources"):
            raise ConfigError(f"{where}: sources: {{SOURCE: weight}} is required")
        samples: list[Encoded] = []
        for s, w in p["sources"].items():
            samples += weighted(encoded[s], float(w), seed + i)
        pseed = seed + 1000 * i
        rows = SFTLoader(samples, cfg.seq_len, 1, tok.pad_token_id, pseed).num_rows()
        if "steps" in p:
            steps = int(p["steps"])
        else:
            steps = steps_for(rows, float(p.get("epochs", 1)), global_batch)

        def make_loader(rank: int, world_size: int, mbs: int, samples=samples, pseed=pseed) -> SFTLoader:
            return SFTLoader(samples, cfg.seq_len, mbs, tok.pad_token_id, pseed, rank, world_size)

        phases.append(Phase(name, steps, schedule_from(p.get("schedule"), steps, where), make_loader,
                            info={"samples": len(samples), "rows": rows, "epochs": p.get("epochs"),
                                  "sources": p["sources"]}))
    return phases, info


def sft(recipe: dict, resume: bool = True) -> dict:
    env = init_distributed(section(recipe, "train", False).get("device", "auto"))
    try:
        return _sft(recipe, env, resume)
    finally:
        cleanup(env)


def _sft(recipe: dict, env: DistEnv, resume: bool) -> dict:
    from plm.train.pretrain import build_model
    t0 = time.time()
    run_dir = run_dir_of(recipe, "sft")
    cfg = TrainConfig.from_dict(section(recipe, "train", False))
    seed = int(recipe.get("seed", 0))
    tok = tokenizer_for(recipe, env)
    mspec = section(recipe, "model")
    if not mspec.get("init_from"):
        raise ConfigError("model.init_from: SFT starts from a pretrained checkpoint")
    model = build_model(mspec, tok, seed)
    phases, info = build_sft_phases(recipe, tok, cfg, env.world_size)
    ends, total = {}, 0
    for p in phases:
        total += p.steps
        ends[total] = p.name
    if env.is_main:
        if not resume:  # a fresh run: stale checkpoints would be taken for newer ones and pruned wrongly
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"SFT of {model.num_parameters() / 1e6:.2f}M parameters on {env.world_size} process(es), "
              f"device {env.device}: " + ", ".join(f"{p.name} {p.steps} steps ({p.info['samples']} samples)"
                                                 for p in phases))

    def on_save(path: Path) -> None:
        m = re.match(r"step-(\d+)$", path.name)
        if m and int(m.group(1)) in ends:
            export(path, run_dir / ends[int(m.group(1))], tok)

    barrier(env)
    trainer = Trainer(model, cfg, env, run_dir, on_save=on_save)
    summary = trainer.fit(phases, resume=resume)
    summary["data"] = info
    summary["train_seconds"] = time.time() - t0
    if not env.is_main:
        return summary
    ev = recipe.get("eval")
    if ev:
        summary["eval"] = {}
        for p in phases:
            summary["eval"][p.name] = evaluate_checkpoint(run_dir / p.name, ev, cfg, env)
            print(f"{p.name}: held-out accuracy " + _fmt_acc(summary["eval"][p.name]))
            trainer.log({"phase": p.name, "step": trainer.global_step, "eval": summary["eval"][p.name]})
    export(run_dir / phases[-1].name, run_dir / "final", tok)  # after eval: its cached eval.json goes along
    summary["final_dir"] = str(run_dir / "final")
    summary["seconds"] = time.time() - t0
    try:
        from plm.train.plots import plot_training
        plot_training(read_metrics(run_dir), run_dir / "loss_lr.png", f"SFT: {recipe.get('name', '')}")
    except Exception as e:  # a plot is a convenience; never fail a finished run over it
        print(f"(no plot: {e})")
    (run_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _fmt_acc(r: dict) -> str:
    s = f"direct {100 * r['direct_acc']:.1f}%"
    if "refine_acc" in r:
        s += f", self-refine {100 * r['refine_acc']:.1f}%"
    return s + f" (n={r['n']})"


def eval_settings(ev: dict) -> dict:
    known = {"tasks", "rounds", "max_new_tokens", "batch_size", "style", "instruction", "bf16", "scorer", "per_task"}
    unknown = sorted(set(ev) - known)
    if unknown:
        raise ConfigError(f"eval: unknown setting(s) {unknown}; known: {sorted(known)}")
    if "tasks" not in ev:
        raise ConfigError("eval.tasks: the held-out prompts, e.g. {builder: arith, split: test, n: 200}")
    return ev


def evaluate_checkpoint(path: str | Path, ev: dict, cfg: TrainConfig | None = None, env: DistEnv | None = None,
                        style: str | None = None) -> dict:
    """Held-out accuracy of a saved model under the recipe's eval: settings (cached in eval.json)."""
    from plm.align.evaluate import evaluate
    from plm.align.scorers import build_scorer
    from plm.align.tasks import load_task_pool
    from plm.align.template import DEFAULT_REFINE_INSTRUCTION
    from plm.model.checkpoint import load_model
    ev = eval_settings(dict(ev))
    path = Path(path)
    device = env.device if env is not None else torch.device("cpu")
    # bf16 autocast generation on CUDA only by default: on CPUs it is no faster
    bf16 = bool(ev.get("bf16", device.type == "cuda" and (cfg is None or cfg.precision != "fp32")))
    key = json.dumps({**ev, "style": style or ev.get("style", "chat"), "bf16": bf16}, sort_keys=True, default=str)
    cache = path / "eval.json"
    if cache.exists():
        got = json.loads(cache.read_text())
        if got.get("key") == key:
            return got["result"]
    model = load_model(path, dtype="float32", device=device)
    tok = Tokenizer.from_dir(path)
    tasks = load_task_pool(ev["tasks"], 0, "eval.tasks")
    res = evaluate(model, tok, tasks, build_scorer(ev.get("scorer", "verifier")), rounds=int(ev.get("rounds", 1)),
                   max_new_tokens=int(ev.get("max_new_tokens", 192)), batch_size=int(ev.get("batch_size", 64)),
                   style=style or ev.get("style", "chat"), instruction=ev.get("instruction", DEFAULT_REFINE_INSTRUCTION),
                   bf16=bf16, per_task=bool(ev.get("per_task", False)))
    cache.write_text(json.dumps({"key": key, "result": res}, indent=2))
    return res
