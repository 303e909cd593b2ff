"""Pretraining from a typed `PretrainRecipe` (plm.train.config; see recipes/tiny/pretrain.yaml):
tokenizer, data shards, model, multi-phase WSDC training, final model in the released layout.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from plm.data.mixture import MixtureLoader, MixturePhase
from plm.data.prepare import iter_text_files, load_shards, prepare
from plm.data.tokenizer import Tokenizer, build_qwen2, train_bpe
from plm.errors import ConfigError
from plm.model.checkpoint import load_model
from plm.model.config import padded_vocab
from plm.model.hub import resolve_model
from plm.model.modeling import PLMForCausalLM
from plm.train.config import DataSource, ModelSpec, PretrainRecipe, TokenizerSpec, TrainConfig
from plm.train.checkpointing import export_model
from plm.train.dist import DistEnv, barrier, distributed
from plm.train.plots import plot_training
from plm.train.trainer import Phase, Trainer, read_metrics
from plm.utils import atomic_write_json


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


def resolve_tokenizer(spec: str | TokenizerSpec | None, env: DistEnv) -> Tokenizer:
    """"qwen2", a tokenizer folder, or {dir, train}: a BPE trained (by rank 0) on first use."""
    if spec in (None, "qwen2"):
        return build_qwen2()
    if isinstance(spec, str):
        return Tokenizer.from_dir(spec)
    d = Path(spec.dir)
    if not (d / "tokenizer.json").exists():
        if spec.train is None:
            raise ConfigError(f"tokenizer: {d} has no tokenizer.json and no train: settings")
        if env.is_main:
            t = spec.train
            tok = train_bpe(iter_text_files(t.inputs), t.vocab_size, show_progress=t.progress)
            tok.save(d)
        barrier(env)
    return Tokenizer.from_dir(d)


def prepare_sources(data: dict[str, DataSource], tok: Tokenizer, env: DistEnv) -> dict[str, Path]:
    """Token shards of every source, prepared once (resumable: finished shards are verified and skipped)."""
    dirs = {}
    for name, src in data.items():
        d = Path(src.dir)
        if src.inputs and env.is_main:
            prepare(list(src.inputs), d, tok, text_field=src.text_field, name=name, workers=src.workers,
                    dedup=src.dedup, eos_id=tok.endoftext_id, shard_tokens=src.shard_tokens)
        dirs[name] = d
    barrier(env)
    return dirs


def build_model(spec: ModelSpec, tok: Tokenizer, seed: int) -> PLMForCausalLM:
    """A checkpoint to continue from, or a fresh model of a preset shape sized to the tokenizer."""
    if spec.init_from:
        model = load_model(resolve_model(spec.init_from), dtype=torch.float32)
        if model.config.vocab_size < tok.vocab_size:
            raise ConfigError(f"model.init_from: {spec.init_from} has vocab_size {model.config.vocab_size}, "
                              f"smaller than the tokenizer's {tok.vocab_size}")
        return model
    cfg = spec.config(vocab_size=padded_vocab(tok.vocab_size), bos_token_id=tok.endoftext_id,
                      eos_token_id=tok.eos_token_id)
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


def pretrain(recipe: PretrainRecipe, resume: bool = True) -> dict:
    with distributed(recipe.train.device) as env:
        return _pretrain(recipe, env, resume)


def build_phases(recipe: PretrainRecipe, dirs: dict[str, Path], cfg: TrainConfig, world: int) -> list[Phase]:
    seed = recipe.seed
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    ev = recipe.eval
    phases = []
    for i, p in enumerate(recipe.phases):
        mp = MixturePhase(p.name, {k: (str(dirs[k]), w) for k, w in p.mixture.items()}, p.tokens)
        steps = mp.steps(cfg.seq_len, global_batch)

        def make_loader(rank: int, world_size: int, mbs: int, mp=mp, i=i) -> LMBatches:
            return LMBatches(MixtureLoader(mp.sources, cfg.seq_len, mbs, seed + 1000 * i, rank, world_size))

        make_eval = None
        if ev is not None and ev.sources:
            esrc = {k: (str(dirs[k]), w) for k, w in ev.sources.items()}

            def make_eval(esrc=esrc) -> list[dict]:
                ld = MixtureLoader(esrc, cfg.seq_len, cfg.micro_batch_size, seed=12345)
                return [next(LMBatches(ld)) for _ in range(ev.batches)]

        try:
            schedule = p.schedule.build(steps)
        except ConfigError as e:
            raise ConfigError(f"phases[{i}].schedule.{e}") from None
        phases.append(Phase(mp.name, steps, schedule, make_loader, make_eval,
                            info={"tokens": mp.token_budget, "mixture": p.mixture}))
    return phases


def _pretrain(recipe: PretrainRecipe, env: DistEnv, resume: bool) -> dict:
    run_dir = recipe.run_path
    cfg = recipe.train
    tok = resolve_tokenizer(recipe.tokenizer, env)
    dirs = prepare_sources(recipe.data, tok, env)
    model = build_model(recipe.model, tok, recipe.seed)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"train.seq_len: {cfg.seq_len} is longer than the model's max_position_embeddings "
                          f"({model.config.max_position_embeddings})")
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
    final = export_model(trainer.last_checkpoint, run_dir / "final", tok)
    metrics = read_metrics(run_dir)
    plot_training(metrics, run_dir / "loss_lr.png", f"pretraining: {recipe.name}")
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
    atomic_write_json(run_dir / "pretrain_summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=2))
    return summary

