"""`plm sft`: supervised fine-tuning in phases (ASSUMED split: phase 1 general instructions,
phase 2 math and code) on the shared trainer, from a typed `SFTRecipe` (plm.align.config; see
recipes/tiny/sft.yaml).

Outputs: RUN_DIR/<phase name>/ (model + tokenizer at the end of each phase), RUN_DIR/final
(= the last phase), metrics.jsonl, loss_lr.png, sft_summary.json.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

from plm.align.config import SFTRecipe
from plm.align.data import Encoded, SFTLoader, encode_chat, load_source, steps_for, summarize
from plm.data.tokenizer import Tokenizer
from plm.errors import ConfigError
from plm.eval.heldout import evaluate_checkpoint
from plm.train.checkpointing import export_model
from plm.train.dist import DistEnv, barrier, distributed
from plm.train.pretrain import build_model, resolve_tokenizer
from plm.train.trainer import Phase, TrainConfig, Trainer, read_metrics
from plm.utils import atomic_write_json


def tokenizer_for(recipe, env: DistEnv) -> Tokenizer:
    """The recipe's tokenizer, by default the one beside model.init_from."""
    from plm.model.hub import resolve_model
    return resolve_tokenizer(recipe.tokenizer or str(resolve_model(recipe.model.init_from)), env)


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


def build_sft_phases(recipe: SFTRecipe, tok: Tokenizer, cfg: TrainConfig, world: int) -> tuple[list[Phase], dict]:
    seed = recipe.seed
    used = {s for p in recipe.phases for s in p.sources}
    encoded: dict[str, list[Encoded]] = {}
    info: dict = {"sources": {}}
    for name in sorted(used):
        chats = load_source(name, recipe.data[name], seed)
        encoded[name] = [encode_chat(tok, c, cfg.seq_len) for c in chats]
        info["sources"][name] = summarize(encoded[name])
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    phases = []
    for i, p in enumerate(recipe.phases):
        samples: list[Encoded] = []
        for s, w in p.sources.items():
            samples += weighted(encoded[s], w, seed + i)
        pseed = seed + 1000 * i
        rows = SFTLoader(samples, cfg.seq_len, 1, tok.pad_token_id, pseed).num_rows()
        steps = p.steps if p.steps is not None else steps_for(rows, p.epochs or 1.0, global_batch)

        def make_loader(rank: int, world_size: int, mbs: int, samples=samples, pseed=pseed) -> SFTLoader:
            return SFTLoader(samples, cfg.seq_len, mbs, tok.pad_token_id, pseed, rank, world_size)

        try:
            schedule = p.schedule.build(steps)
        except ConfigError as e:
            raise ConfigError(f"phases[{i}].schedule.{e}") from None
        phases.append(Phase(p.name, steps, schedule, make_loader,
                            info={"samples": len(samples), "rows": rows, "epochs": p.epochs, "sources": p.sources}))
    return phases, info


def sft(recipe: SFTRecipe, resume: bool = True) -> dict:
    with distributed(recipe.train.device) as env:
        return _sft(recipe, env, resume)


def _sft(recipe: SFTRecipe, env: DistEnv, resume: bool) -> dict:
    t0 = time.time()
    run_dir = recipe.run_path
    cfg = recipe.train
    tok = tokenizer_for(recipe, env)
    model = build_model(recipe.model, tok, recipe.seed)
    phases, info = build_sft_phases(recipe, tok, cfg, env.world_size)
    ends, total = {}, 0
    for p in phases:
        total += p.steps
        ends[total] = p.name
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"SFT of {model.num_parameters() / 1e6:.2f}M parameters on {env.world_size} process(es), "
              f"device {env.device}: " + ", ".join(f"{p.name} {p.steps} steps ({p.info['samples']} samples)"
                                                 for p in phases))

    def on_save(path: Path) -> None:
        m = re.match(r"step-(\d+)$", path.name)
        if m and int(m.group(1)) in ends:
            export_model(path, run_dir / ends[int(m.group(1))], tok)

    barrier(env)
    trainer = Trainer(model, cfg, env, run_dir, on_save=on_save)
    summary = trainer.fit(phases, resume=resume)
    summary["data"] = info
    summary["train_seconds"] = time.time() - t0
    if not env.is_main:
        return summary
    if recipe.eval:
        summary["eval"] = {}
        for p in phases:
            res = evaluate_checkpoint(run_dir / p.name, recipe.eval, env.device.type,
                                      bf16=_eval_bf16(recipe.eval.bf16, cfg, env))
            summary["eval"][p.name] = res.as_dict()
            print(f"{p.name}: held-out accuracy " + format_accuracy(res))
            trainer.log({"phase": p.name, "step": trainer.global_step, "eval": res.as_dict()})
    export_model(run_dir / phases[-1].name, run_dir / "final", tok)
    summary["final_dir"] = str(run_dir / "final")
    summary["seconds"] = time.time() - t0
    try:
        from plm.train.plots import plot_training
        plot_training(read_metrics(run_dir), run_dir / "loss_lr.png", f"SFT: {recipe.name}")
    except Exception as e:  # a plot is a convenience; never fail a finished run over it
        print(f"(no plot: {e})")
    atomic_write_json(run_dir / "sft_summary.json", summary)
    return summary


def _eval_bf16(setting: bool | None, cfg: TrainConfig, env: DistEnv) -> bool:
    """bf16 autocast generation: on CUDA by default (unless training is fp32); on CPUs it is no faster."""
    if setting is not None:
        return setting
    return env.device.type == "cuda" and cfg.precision != "fp32"


def format_accuracy(r) -> str:
    s = f"direct {100 * r.direct_acc:.1f}%"
    if r.refine_acc is not None:
        s += f", self-refine {100 * r.refine_acc:.1f}%"
    return s + f" (n={r.n})"
