"""Learning-rate schedules: WSDC (PLM's), WSD and cosine, as pure functions of the step.

WSDC: the public record gives only its shape, so this definition is ASSUMED (every length and
level is a setting):

    warmup   t <  W            : peak * t / W
    stable   W <= t < W+S      : peak
    decay    W+S <= t < W+S+D  : peak -> floor, p = (t-W-S)/D in [0, 1)
                 linear  floor + (peak-floor) * (1 - p)
                 cosine  floor + (peak-floor) * 0.5 * (1 + cos(pi p))
                 1-sqrt  floor + (peak-floor) * (1 - sqrt(p))
                 exp     peak * (floor/peak) ** p          (needs floor > 0)
    constant t >= W+S+D        : floor

WSD is WSDC whose decay ends exactly at total_steps (S = total - W - D). Cosine is warmup
then a cosine decay to floor over the remaining total_steps - W steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plm.errors import ConfigError

KINDS = ("wsdc", "wsd", "cosine")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exp")


@dataclass
class ScheduleConfig:
    kind: str = "wsdc"
    peak_lr: float = 3e-4
    floor_lr: float = 3e-5
    warmup_steps: int = 0
    stable_steps: int = 0  # wsd: derived from total_steps; leave 0 or give the same value
    decay_steps: int = 0  # cosine: derived from total_steps
    decay_shape: str = "cosine"  # wsdc / wsd only; cosine kind is always cosine
    total_steps: int | None = None  # needed by wsd and cosine; wsdc uses it only for plots

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"schedule: {msg}")

        if self.kind not in KINDS:
            raise bad(f"unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise bad(f"unknown decay_shape {self.decay_shape!r}; choose one of {', '.join(DECAY_SHAPES)}")
        if not self.peak_lr > 0:
            raise bad(f"peak_lr must be > 0, got {self.peak_lr}")
        if self.floor_lr < 0:
            raise bad(f"floor_lr must be >= 0, got {self.floor_lr}")
        if self.floor_lr > self.peak_lr:
            raise bad(f"floor_lr ({self.floor_lr}) is above peak_lr ({self.peak_lr})")
        for name in ("warmup_steps", "stable_steps", "decay_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise bad(f"{name} must be a non-negative integer, got {value!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 0):
            raise bad(f"total_steps must be a non-negative integer, got {self.total_steps!r}")
        if self.kind in ("wsdc", "wsd") and self.decay_shape == "exp" and self.floor_lr == 0:
            raise bad("decay_shape 'exp' needs floor_lr > 0 (an exponential never reaches 0)")
        if self.kind in ("wsd", "cosine"):
            if self.total_steps is None:
                raise bad(f"kind {self.kind!r} needs total_steps")
            if self.kind == "wsd":
                stable = self.total_steps - self.warmup_steps - self.decay_steps
                if stable < 0:
                    raise bad(
                        f"warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) "
                        f"exceed total_steps ({self.total_steps})"
                    )
                if self.stable_steps not in (0, stable):
                    raise bad(
                        f"wsd derives stable_steps = total - warmup - decay = {stable}, "
                        f"but stable_steps = {self.stable_steps} was given"
                    )
            elif self.warmup_steps > self.total_steps:
                raise bad(f"warmup_steps ({self.warmup_steps}) exceed total_steps ({self.total_steps})")

    def phases(self) -> tuple[int, int, int, str]:
        """(warmup, stable, decay, shape) with the derived lengths of wsd and cosine filled in."""
        if self.kind == "wsdc":
            return self.warmup_steps, self.stable_steps, self.decay_steps, self.decay_shape
        assert self.total_steps is not None  # validate() guarantees it
        if self.kind == "wsd":
            stable = self.total_steps - self.warmup_steps - self.decay_steps
            return self.warmup_steps, stable, self.decay_steps, self.decay_shape
        return self.warmup_steps, 0, self.total_steps - self.warmup_steps, "cosine"

    def to_dict(self) -> dict:
        return asdict(self)


def _decay(shape: str, peak: float, floor: float, p: float) -> float:
    if shape == "linear":
        return floor + (peak - floor) * (1.0 - p)
    if shape == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return floor + (peak - floor) * (1.0 - math.sqrt(p))
    if shape == "exp":
        return peak * (floor / peak) ** p
    raise ConfigError(f"schedule: unknown decay_shape {shape!r}")


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """Learning rate at optimiser step `step` (0-based)."""
    if step < 0:
        raise ConfigError(f"schedule: step must be >= 0, got {step}")
    w, s, d, shape = cfg.phases()
    peak, floor = cfg.peak_lr, cfg.floor_lr
    if step < w:
        return peak * step / w
    if step < w + s:
        return peak
    if step < w + s + d:
        return _decay(shape, peak, floor, (step - w - s) / d)
    return floor  # held: a later phase can resume from a stable point


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose multiplier is lr_at / peak, with every param group's base lr set to peak.

    The multiplier is a closure (not a callable object) so the scheduler's state_dict holds
    only the step count; the schedule itself is rebuilt from the config on resume.
    """
    for group in optimizer.param_groups:
        group["lr"] = cfg.peak_lr
        group["initial_lr"] = cfg.peak_lr  # LambdaLR keeps an existing initial_lr; make it peak

    def multiplier(step: int) -> float:
        return lr_at(cfg, step) / cfg.peak_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def plot_schedule(cfg: ScheduleConfig, path_png: str | Path, steps: int | None = None) -> Path:
    """Write a PNG of lr against step; default span covers all phases plus a 10% tail."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, s, d, _ = cfg.phases()
    if steps is None:
        end = w + s + d
        steps = cfg.total_steps if cfg.kind != "wsdc" and cfg.total_steps else end + max(1, end // 10)
    if steps <= 0:
        raise ConfigError(f"plot_schedule: steps must be > 0, got {steps}")
    xs = list(range(steps + 1))
    ys = [lr_at(cfg, t) for t in xs]

    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys)
    for boundary in (w, w + s, w + s + d):
        if 0 < boundary < steps:
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=0.8)
    shape = "" if cfg.kind == "cosine" else f", {cfg.decay_shape} decay"
    ax.set_title(f"{cfg.kind}{shape}: peak {cfg.peak_lr:g}, floor {cfg.floor_lr:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
