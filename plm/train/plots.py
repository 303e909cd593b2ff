"""PNG plots of a run's metrics (loss and LR over all phases)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def plot_training(metrics: list[dict], path: str | Path, title: str = "training") -> Path:
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig = Figure(figsize=(9, 6))
    ax, ax_lr = fig.subplots(2, 1, sharex=True)
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], lw=0.8, label="train loss")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="held-out loss")
    ax_lr.plot([m["step"] for m in train], [m["lr"] for m in train], color="tab:orange")
    # phase boundaries
    prev = None
    for m in train:
        if prev is not None and m["phase"] != prev:
            for a in (ax, ax_lr):
                a.axvline(m["step"], color="grey", ls="--", lw=0.7)
            ax.text(m["step"], ax.get_ylim()[1], f" {m['phase']}", va="top", fontsize=8)
        prev = m["phase"]
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.set_title(title)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
