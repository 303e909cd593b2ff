"""Training checkpoints: the model in the released layout plus `trainer_state.pt`
(optimizer, step, data position, RNG), written atomically.

A checkpoint is first written to `checkpoints/.tmp-step-N/` and then renamed to
`checkpoints/step-N/`; a rename is atomic, so a directory named `step-*` is always complete and
a crash at any moment leaves the previous one loadable. Works for plain, DDP and FSDP2 models
through torch.distributed.checkpoint's full (gathered) state dicts.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from plm.errors import CheckpointError
from plm.model.checkpoint import load_model, save_state_dict
from plm.model.config import PLMConfig
from plm.utils import publish_dir

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save(run_dir: str | Path, tag: str, model: torch.nn.Module, config: PLMConfig,
         optimizer: torch.optim.Optimizer, trainer_state: dict, env, keep_last: int) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the final path on rank 0."""
    msd = get_model_state_dict(model, options=_FULL)
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not env.is_main:
        return None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / tag, root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_state_dict(msd, config, tmp)
    kill_at = os.environ.get("PLM_TEST_KILL_IN_SAVE")  # the crash-during-write test: step N
    if kill_at and tag == f"step-{int(kill_at):07d}":
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save({"optimizer": osd, "trainer": trainer_state}, tmp / STATE_FILE)
    if final.exists():  # re-saving the same step (e.g. a rerun): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: str | Path) -> dict | None:
    """The newest complete checkpoint as {path, model_state, optimizer, trainer}, or None."""
    root = Path(run_dir) / "checkpoints"
    if root.exists():
        for stale in root.glob(".tmp-*"):  # an interrupted write: never a valid checkpoint
            shutil.rmtree(stale, ignore_errors=True)
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    path = dirs[-1]
    model = load_model(path, dtype=None)
    try:
        st = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise CheckpointError(f"{path / STATE_FILE}: cannot read trainer state ({e})") from None
    if not isinstance(st, dict) or "optimizer" not in st or "trainer" not in st:
        raise CheckpointError(f"{path / STATE_FILE}: not a plm trainer state")
    st["path"] = path
    st["model_state"] = model.state_dict()
    return st


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    msd = dict(state["model_state"])
    try:
        set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{state['path']}: does not match this model/optimizer ({e})") from None


def export_model(src: str | Path, dst: str | Path, tokenizer) -> Path:
    """A training checkpoint as a released model folder (no trainer state), with its tokenizer,
    published atomically over any earlier `dst`."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
    tokenizer.save(tmp)
    return publish_dir(tmp, dst)
