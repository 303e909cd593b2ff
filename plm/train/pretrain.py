"""Pretraining from a recipe: tokenizer, data shards, model, multi-phase WSDC training.

Recipe sections (see recipes/tiny/pretrain.yaml):
  name, run_dir, seed
  tokenizer: "qwen2" | DIR | {dir: DIR, train: {inputs: [...], vocab_size: N}}
  model:     {preset: NAME, overrides: {...}} or {init_from: CHECKPOINT_DIR}
  data:      {SOURCE: {dir: DIR, inputs: [...], text_field: text}}   (inputs are prepared once)
  eval:      {sources: {SOURCE: weight}, batches: N}                 (held-out loss)
  train:     TrainConfig fields
  phases:    [{name, tokens, mixture: {SOURCE: weight}, schedule: {...}}]
Schedule lengths (warmup/stable/decay) are steps, or fractions of the phase's steps if < 1.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plm.data.mixture import MixtureLoader, MixturePhase
from plm.data.prepare import load_shards, prepare
from plm.data.tokenizer import Tokenizer, build_qwen2, train_bpe
from plm.errors import ConfigError
from plm.model.checkpoint import load_model
from plm.model.commands import padded_vocab
from plm.model.config import PLMConfig
from plm.model.modeling import PLMForCausalLM
from plm.recipe import section
from plm.train.dist import DistEnv, barrier, cleanup, init_distributed
from plm.train.plots import plot_training
from plm.train.schedule import ScheduleConfig
from plm.train.trainer import Phase, TrainConfig, Trainer, read_metrics


class LMBatches:
    """MixtureLoader (x, y) tuples as trainer batches, keeping its exact-resume state."""

    def __init__(self, loader: MixtureLoader) -> None:
        self.loader = loader

    def __next__(self) -> dict[str, torch.Tensor]:
        x, y = next(self.loader)
        return {"input_ids": x, "labels": y}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def run_dir_of(recipe: dict) -> Path:
    return Path(recipe.get("run_dir") or f"runs/{recipe.get('name', 'run')}")


def schedule_from(d: dict, steps: int, where: str) -> ScheduleConfig:
    """Schedule settings with lengths as steps or fractions (< 1) of the phase."""
    d = dict(d or {})
    kind = d.pop("kind", "wsdc")

    def length(key: str) -> int:
        v = d.pop(key, 0)
        if not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{where}.schedule.{key} must be a non-negative number, got {v!r}")
        return int(round(v * steps)) if isinstance(v, float) and v < 1 else int(v)

    w, s, dd = length("warmup"), length("stable"), length("decay")
    if kind in ("wsd", "cosine"):
        s = 0
    try:
        return ScheduleConfig(kind=kind, warmup_steps=w, stable_steps=s, decay_steps=dd if kind != "cosine" else 0,
                              total_steps=steps, **d)
    except TypeError as e:
        raise ConfigError(f"{where}.schedule: {e}") from None


def resolve_tokenizer(spec: Any, env: DistEnv) -> Tokenizer:
    if spec in (None, "qwen2"):
        return build_qwen2()
    if isinstance(spec, str):
        return Tokenizer.from_dir(spec)
    if not isinstance(spec, dict) or "dir" not in spec:
        raise ConfigError("tokenizer: expected 'qwen2', a directory, or {dir, train: {inputs, vocab_size}}")
    d = Path(spec["dir"])
    if not (d / "tokenizer.json").exists():
        if "train" not in spec:
            raise ConfigError(f"tokenizer: {d} has no tokenizer.json and no train settings")
        if env.is_main:
            from plm.data.commands import iter_text_files
            t = spec["train"]
            tok = train_bpe(iter_text_files(t["inputs"]), int(t.get("vocab_size", 8192)),
                            show_progress=bool(t.get("progress", True)))
            tok.save(d)
        barrier(env)
    return Tokenizer.from_dir(d)


def prepare_sources(data: dict, tok: Tokenizer, env: DistEnv, workers: int = 1) -> dict[str, Path]:
    dirs = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or "dir" not in spec:
            raise ConfigError(f"data.{name}: expected {{dir: ..., inputs: [...]}}")
        d = Path(spec["dir"])
        if spec.get("inputs") and env.is_main:
            # resumable: finished shards are verified and skipped
            prepare(list(spec["inputs"]), d, tok, text_field=spec.get("text_field", "text"), name=name,
                    workers=int(spec.get("workers", workers)), dedup=bool(spec.get("dedup", False)),
                    eos_id=tok.endoftext_id, shard_tokens=int(spec.get("shard_tokens", 1 << 26)))
        dirs[name] = d
    barrier(env)
    return dirs


def build_model(spec: dict, tok: Tokenizer, seed: int) -> PLMForCausalLM:
    if spec.get("init_from"):
        model = load_model(spec["init_from"], dtype=torch.float32)
        if model.config.vocab_size < tok.vocab_size:
            raise ConfigError(f"model.init_from {spec['init_from']}: vocab_size {model.config.vocab_size} "
                              f"is smaller than the tokenizer's {tok.vocab_size}")
        return model
    if "preset" not in spec:
        raise ConfigError("model: give a preset (and overrides) or init_from")
    cfg = PLMConfig.from_preset(spec["preset"], vocab_size=padded_vocab(tok.vocab_size),
                                bos_token_id=tok.endoftext_id, eos_token_id=tok.eos_token_id,
                                **(spec.get("overrides") or {}))
    torch.manual_seed(seed)
    return PLMForCausalLM(cfg)


def unigram_entropy(dirs: list[Path], weights: list[float]) -> float:
    """Entropy (nats/token) of the mixture's unigram distribution: the loss of a model
    that ignores context entirely."""
    dists = []
    for d in dirs:
        counts = sum(np.bincount(np.asarray(s), minlength=1 << 17)[: 1 << 17] for s in load_shards(d))
        dists.append(counts / counts.sum())
    p = sum(w * q for w, q in zip(np.array(weights) / sum(weights), dists))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pretrain(recipe: dict, resume: bool = True) -> dict:
    env = init_distributed(section(recipe, "train", False).get("device", "auto"))
    try:
        return _pretrain(recipe, env, resume)
    finally:
        cleanup(env)


def build_phases(recipe: dict, dirs: dict[str, Path], cfg: TrainConfig, world: int) -> list[Phase]:
    seed = int(recipe.get("seed", 0))
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    ev = section(recipe, "eval", False)
    phases = []
    for i, p in enumerate(section(recipe, "phases")):
        where = f"phases[{i}]"
        try:
            mixture = {k: (str(dirs[k]), float(w)) for k, w in p["mixture"].items()}
        except KeyError as e:
            raise ConfigError(f"{where}.mixture names {e}, which is not a data source") from None
        mp = MixturePhase(p.get("name", f"phase{i + 1}"), mixture, int(p["tokens"]))
        steps = mp.steps(cfg.seq_len, global_batch)

        def make_loader(rank: int, world_size: int, mbs: int, mp=mp, i=i) -> LMBatches:
            return LMBatches(MixtureLoader(mp.sources, cfg.seq_len, mbs,
                                           seed + 1000 * i, rank, world_size))

        make_eval = None
        if ev.get("sources"):
            esrc = {k: (str(dirs[k]), float(w)) for k, w in ev["sources"].items()}

            def make_eval(esrc=esrc) -> list[dict]:
                ld = MixtureLoader(esrc, cfg.seq_len, cfg.micro_batch_size, seed=12345)
                return [next(LMBatches(ld)) for _ in range(int(ev.get("batches", cfg.eval_batches)))]

        phases.append(Phase(mp.name, steps, schedule_from(p.get("schedule"), steps, where), make_loader,
                            make_eval, info={"tokens": mp.token_budget, "mixture": p["mixture"]}))
    return phases


def _pretrain(recipe: dict, env: DistEnv, resume: bool) -> dict:
    run_dir = run_dir_of(recipe)
    cfg = TrainConfig.from_dict(section(recipe, "train", False))
    seed = int(recipe.get("seed", 0))
    tok = resolve_tokenizer(recipe.get("tokenizer"), env)
    dirs = prepare_sources(section(recipe, "data"), tok, env)
    model = build_model(section(recipe, "model"), tok, seed)
    phases = build_phases(recipe, dirs, cfg, env.world_size)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        n = model.num_parameters()
        print(f"pretraining {n / 1e6:.2f}M parameters on {env.world_size} process(es), device {env.device}: "
              + ", ".join(f"{p.name} {p.steps} steps" for p in phases))
    trainer = Trainer(model, cfg, env, run_dir)
    summary = trainer.fit(phases, resume=resume)
    if not env.is_main:
        return summary
    final = run_dir / "final"
    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(latest, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
    tok.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    metrics = read_metrics(run_dir)
    plot_training(metrics, run_dir / "loss_lr.png", f"pretraining: {recipe.get('name', '')}")
    last = phases[-1].info["mixture"]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    summary.update({
        "final_dir": str(final),
        "parameters": model.num_parameters(),
        "unigram_entropy": unigram_entropy([dirs[k] for k in last], list(last.values())),
        "final_train_loss": float(np.mean(train_losses[-10:])) if train_losses else math.nan,
        "tokens": trainer.tokens_seen,
    })
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    if evals:
        summary["final_eval_loss"] = evals[-1]
    (run_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=2))
    return summary

