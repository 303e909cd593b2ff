"""PNG plots of a run's metrics (loss and LR over all phases)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def plot_training(metrics: list[dict], path: str | Path, title: str = "training") -> Path:
    """Loss (train and held-out) and LR against optimizer step, one run's phases marked."""
    return plot_stages([("", metrics)], path, title)


def lr_series(metrics: list[dict]) -> tuple[list[int], list[float]]:
    """The learning rate at every optimizer step, from each phase's schedule record (the trainer
    logs one at the start of every phase), so a warmup shorter than log_every still shows; logs
    without them fall back to the logged values."""
    from plm.train.schedule import ScheduleConfig, lr_at

    phases = [m for m in metrics if "schedule" in m]
    if not phases:
        train = [m for m in metrics if "loss" in m]
        return [m["step"] for m in train], [m["lr"] for m in train]
    last = max((m["step"] for m in metrics if "loss" in m), default=0)
    xs, ys = [], []
    for m in phases:
        cfg = ScheduleConfig(**m["schedule"])
        for s in range(m["phase_steps"]):
            if m["step"] + s + 1 > last:
                break
            xs.append(m["step"] + s + 1)
            ys.append(lr_at(cfg, s))
    return xs, ys


def plot_stages(segments: list[tuple[str, list[dict]]], path: str | Path, title: str = "training") -> Path:
    """Several runs' metrics end to end (e.g. pretraining, SFT, each ARIES iteration) on one step
    axis, each segment in its own colour (their losses are different objectives), with every
    phase boundary marked."""
    fig = Figure(figsize=(10, 6))
    ax, ax_lr = fig.subplots(2, 1, sharex=True)
    offset, bounds = 0, []
    for i, (name, metrics) in enumerate(segments):
        train = [m for m in metrics if "loss" in m]
        if not train:
            continue
        evals = [m for m in metrics if "eval_loss" in m]
        color = f"C{i % 10}"
        prefix = f"{name}: " if name else ""
        ax.plot([offset + m["step"] for m in train], [m["loss"] for m in train], lw=0.8, color=color,
                label=f"{prefix}train loss")
        if evals:
            ax.plot([offset + m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", ms=3,
                    color=color, alpha=0.6, label=f"{prefix}held-out loss")
        lx, ly = lr_series(metrics)
        ax_lr.plot([offset + x for x in lx], ly, color=color)
        prev = None
        for m in train:
            if m["phase"] != prev:
                bounds.append((offset + m["step"] - 1, m["phase"]))
            prev = m["phase"]
        offset += max(m["step"] for m in train)
    for k, (x, phase) in enumerate(bounds):
        if k:
            for a in (ax, ax_lr):
                a.axvline(x, color="grey", ls="--", lw=0.6)
        ax.annotate(f" {phase}", (x, 1), xycoords=("data", "axes fraction"), va="top", fontsize=7, rotation=90)
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("optimizer step (end to end)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
