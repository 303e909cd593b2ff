"""One training loop for every stage (pretraining, SFT, ARIES-SFT): AdamW, gradient
accumulation, clipping, bf16 autocast on GPU, optional torch.compile (whole model or per block),
the chunked LM loss, flash attention with V padded on CUDA and activation checkpointing,
held-out eval, metrics JSONL, progress bar, plots, atomic checkpoints and exact resume, from one
CPU process to torchrun with DDP or FSDP2 (docs/gpu.md).

A run is a list of `Phase`s, each with its own data loader and schedule; the model carries
from one phase to the next, the optimizer state too unless `optimizer_state: reset`.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from plm.errors import PLMError
from plm.model.loss import chunked_lm_loss, lm_loss_sum, unwrap_model
from plm.model.modeling import PLMForCausalLM, set_attn_impl
from plm.train import checkpointing as ckpt
from plm.train.config import TrainConfig
from plm.utils import append_jsonl, cpu_has_native_bf16, read_jsonl, write_jsonl
from plm.train.dist import DistEnv, all_reduce_mean, barrier, wrap_model
from plm.train.schedule import ScheduleConfig, lr_at

# peak dense bf16 FLOP/s for MFU; other devices: set train.peak_flops
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


class Loader(Protocol):
    """An infinite batch iterator with exact-resume state."""

    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Phase:
    name: str
    steps: int
    schedule: ScheduleConfig
    # (rank, world_size, micro_batch_size) -> loader of dict batches {input_ids, labels, ...}
    make_loader: Callable[[int, int, int], Loader]
    make_eval_batches: Callable[[], list[dict[str, torch.Tensor]]] | None = None
    info: dict = field(default_factory=dict)


def flops_per_token(model: PLMForCausalLM, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (lm_head included) + attention."""
    c = model.config
    # every weight matrix once: the tied embedding counts as the lm_head matmul; norms are no matmul
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    attn = 6 * c.num_hidden_layers * c.num_attention_heads * seq_len * (c.qk_head_dim + c.v_head_dim) / 2
    return 6 * n + attn


def device_peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_FLOPS.items():
            if key in name:
                return v
    return None


def resolve_attention(attention: str, device: torch.device) -> str | None:
    """train.attention -> the attn_impl to set, or None to keep the model's own."""
    if attention == "auto":
        # v padded to 192 lets flash kernels run on CUDA (sdpa would fall back to the
        # memory-efficient kernel for q/k 192 vs v 128); elsewhere nothing to gain by default
        return "flash" if device.type == "cuda" else None
    return attention


def compile_model(model: torch.nn.Module, mode: bool | str) -> torch.nn.Module:
    """train.compile: the callable to run forward passes through.

    "block" compiles each decoder layer's forward in place: one graph serves every layer (same
    code and shapes), module hooks (FSDP2's all-gathers, DDP's) and activation checkpointing
    stay eager around it, and parameter names do not change. True / "model" wraps the whole
    (possibly DDP/FSDP-wrapped) model, as before."""
    if mode in (True, "model"):
        return torch.compile(model)
    if mode == "block":
        for layer in unwrap_model(model).model.layers:
            if not getattr(layer, "_plm_compiled", False):  # ARIES trains one model several times
                layer.forward = torch.compile(layer.forward)
                layer._plm_compiled = True
    return model


class Trainer:
    def __init__(self, model: PLMForCausalLM, cfg: TrainConfig, env: DistEnv, run_dir: str | Path,
                 loss_fn: Callable | None = None, on_save: Callable[[Path], None] | None = None) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.raw_model = model
        # the LM loss (pretraining, SFT) unless a stage brings its own (ARIES)
        self.loss_fn = loss_fn or (chunked_lm_loss(cfg.loss_chunk) if cfg.loss_chunk else lm_loss_sum)
        self.on_save = on_save
        self.autocast = use_bf16(cfg.precision, env.device)
        model.to(env.device)
        attn = resolve_attention(cfg.attention, env.device)
        if attn is not None:
            set_attn_impl(model, attn)
        if cfg.activation_checkpointing:
            model.model.gradient_checkpointing = True
        self.model = wrap_model(model, env, cfg.distributed)
        if cfg.deterministic or (cfg.deterministic is None and env.device.type == "cpu"):
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.fwd = compile_model(self.model, cfg.compile)
        self.optimizer = self._make_optimizer()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.global_step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run wrote (rank 0)
        self.peak = device_peak_flops(env.device, cfg.peak_flops)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on norms
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=1.0, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps)
        if self.cfg.fused_optimizer:
            try:
                return torch.optim.AdamW(groups, fused=True, **kw)
            except (RuntimeError, TypeError):
                pass
        return torch.optim.AdamW(groups, **kw)

    # ---- logging -----------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.env.is_main:
            append_jsonl(self.metrics_path, record)

    def _truncate_metrics(self, step: int) -> None:
        """Start the metrics log at `step` (a resume, or 0 for a fresh run): records an earlier or
        interrupted run wrote past it, and a torn last line, are dropped, so no step appears twice."""
        if self.env.is_main and self.metrics_path.exists():
            write_jsonl(self.metrics_path, [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step])

    # ---- one optimiser step --------------------------------------------------
    def train_step(self, loader: Loader, lr: float) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
        global_tokens = float(all_reduce_mean(torch.tensor(float(local_tokens)), env)) * env.world_size
        if global_tokens == 0:
            raise PLMError("a training batch has no labelled tokens (all labels are -100)")
        total = torch.zeros((), device=env.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(env.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            ctx = self.model.no_sync() if (hasattr(self.model, "no_sync") and not sync) else _null()
            with ctx, torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss_sum, _ = self.loss_fn(self.fwd, batch)
                # DDP averages gradients over ranks: scale so the result is the global token mean
                (loss_sum * env.world_size / global_tokens).backward()
            total += loss_sum.detach()
        gnorm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                 if cfg.grad_clip > 0 else _grad_norm(self.model))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(all_reduce_mean(total, env)) * env.world_size / global_tokens
        return {"loss": loss, "grad_norm": float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm),
                "tokens": int(global_tokens)}

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
        self.model.eval()
        tot, n = 0.0, 0
        for b in batches:
            b = {k: v.to(self.env.device) for k, v in b.items()}
            with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                s, c = self.loss_fn(self.model, b)
            tot += float(s)
            n += c
        self.model.train()
        return tot / max(n, 1)

    # ---- the run -----------------------------------------------------------
    def fit(self, phases: list[Phase], resume: bool = True) -> dict:
        cfg, env = self.cfg, self.env
        if not phases:
            raise PLMError("nothing to train: no phases")
        start_phase, start_step, loader_state = 0, 0, None
        if not resume and env.is_main:  # a fresh start: an earlier run's checkpoints would be taken for ours
            gone = ckpt.clear(self.run_dir)
            if gone:
                print(f"starting over: removed {len(gone)} earlier checkpoint(s) of {self.run_dir} "
                      f"(up to {gone[-1].name})")
        barrier(env)
        state = ckpt.load_latest(self.run_dir) if resume else None
        if state is not None:
            ckpt.restore(state, self.model, self.optimizer)
            start_phase, start_step = state["trainer"]["phase"], state["trainer"]["phase_step"]
            self.global_step = state["trainer"]["global_step"]
            self.tokens_seen = state["trainer"].get("tokens_seen", 0)
            loader_state = state["trainer"]["loader"]
            _set_rng(state["trainer"]["rng"])
            self._truncate_metrics(self.global_step)
            if env.is_main:
                print(f"resumed from {state['path']} (phase {phases[start_phase].name}, step {start_step})")
        else:  # a fresh start: a log left by an earlier attempt would repeat its steps
            self._truncate_metrics(0)
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        fpt = flops_per_token(self.raw_model, cfg.seq_len)
        summary = {"phases": []}
        self.model.train()
        for pi in range(start_phase, len(phases)):
            phase = phases[pi]
            step0 = start_step if pi == start_phase else 0
            if pi > 0 and step0 == 0 and cfg.optimizer_state == "reset":
                self.optimizer.state.clear()
            loader = phase.make_loader(env.rank, env.world_size, cfg.micro_batch_size)
            if step0 > 0 and loader_state is not None:
                loader.load_state_dict(loader_state)
            eval_batches = phase.make_eval_batches() if phase.make_eval_batches else None
            if step0 == 0:  # the schedule itself, so plots show the LR of every step
                self.log({"phase": phase.name, "step": self.global_step, "phase_steps": phase.steps,
                          "schedule": asdict(phase.schedule)})
            bar = tqdm(total=phase.steps, initial=step0, desc=f"{phase.name}", unit="step",
                       disable=not (env.is_main and cfg.progress), dynamic_ncols=True)
            t_last, tok_since = time.perf_counter(), 0
            for s in range(step0, phase.steps):
                lr = lr_at(phase.schedule, s)
                m = self.train_step(loader, lr)
                if not math.isfinite(m["loss"]):
                    raise PLMError(f"phase {phase.name}, step {s + 1}: loss is {m['loss']}; "
                                   "lower the learning rate or check the data")
                self.global_step += 1
                self.tokens_seen += m["tokens"]
                tok_since += m["tokens"]
                done = s + 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == phase.steps:
                    now = time.perf_counter()
                    tps = tok_since / max(now - t_last, 1e-9)
                    rec = {"phase": phase.name, "step": self.global_step, "phase_step": done, "loss": m["loss"],
                           "lr": lr, "grad_norm": m["grad_norm"], "tokens": m["tokens"], "tokens_seen": self.tokens_seen,
                           "tokens_per_s": tps, "mfu": (tps * fpt / (self.peak * env.world_size)) if self.peak else None}
                    self.log(rec)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    t_last, tok_since = now, 0
                if eval_batches and cfg.eval_every and done % cfg.eval_every == 0 and done != phase.steps:
                    self.log({"phase": phase.name, "step": self.global_step, "eval_loss": self.evaluate(eval_batches)})
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != phase.steps:
                    self.save(pi, done, loader)
                _test_kill_hook(self.global_step)
            bar.close()
            rec = {"phase": phase.name, "steps": phase.steps, "global_step": self.global_step,
                   "tokens_seen": self.tokens_seen}
            if eval_batches:
                rec["eval_loss"] = self.evaluate(eval_batches)
                self.log({"phase": phase.name, "step": self.global_step, "eval_loss": rec["eval_loss"]})
            summary["phases"].append(rec)
            # a phase-end checkpoint: the next phase (or a rerun) starts from here
            self.save(pi + 1, 0, None) if pi + 1 < len(phases) else self.save(pi, phase.steps, loader)
            loader_state = None
        return summary

    def save(self, phase: int, phase_step: int, loader: Loader | None) -> Path | None:
        trainer_state = {"phase": phase, "phase_step": phase_step, "global_step": self.global_step,
                         "tokens_seen": self.tokens_seen,
                         "loader": loader.state_dict() if loader is not None else None,
                         "rng": _get_rng(), "config": asdict(self.cfg)}
        path = ckpt.save(self.run_dir, f"step-{self.global_step:07d}", self.model, self.raw_model.config,
                         self.optimizer, trainer_state, self.env, self.cfg.keep_last)
        if path is not None:
            self.last_checkpoint = path
            if self.on_save is not None:
                self.on_save(path)
        barrier(self.env)
        return path


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for `precision`: "auto" means on CUDA, and on CPUs with bf16 in hardware."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _get_rng() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _test_kill_hook(step: int) -> None:
    """PLM_TEST_KILL_AT_STEP=N: SIGKILL this process after step N (the resume tests' crash)."""
    at = os.environ.get("PLM_TEST_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    p = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(p, torn_tail_ok=True) if p.exists() else []

