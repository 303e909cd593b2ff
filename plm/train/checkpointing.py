"""Training checkpoints: the model in the released layout plus `trainer_state.pt` (optimizer,
step, data position, RNG), written so that a crash at any moment loses no finished work.

The protocol (`save`):
  1. write every file into `checkpoints/.tmp-step-N/` (each file written to a temporary name,
     fsynced and renamed; safetensors, then trainer_state.pt);
  2. write the marker `COMPLETE` last: a folder holding it is a whole checkpoint;
  3. publish: an existing `step-N` (a rerun saving the same step) is renamed to
     `.old-step-N`, the new folder renamed to `step-N`, then the old one removed;
  4. prune: only checkpoints older than the one just written, keeping `keep_last` in all.
`load_latest` first repairs what a crash can leave (a complete `.tmp-` folder is published, an
`.old-` folder whose `step-N` is missing is put back, incomplete `.tmp-` folders are removed),
then loads the newest checkpoint that reads; a damaged one (truncated, emptied, deleted files)
is skipped with a warning in favour of the next older one. Works for plain, DDP and FSDP2
models through torch.distributed.checkpoint's full (gathered) state dicts.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from plm.errors import CheckpointError, PLMError
from plm.model.checkpoint import load_model, save_state_dict
from plm.model.config import PLMConfig
from plm.utils import atomic_path, atomic_write_text, fsync_dir, publish_dir, recover_dir

STATE_FILE = "trainer_state.pt"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
CRASH_POINTS = ("model", "state", "marker", "publish", "prune")


def _crash(tag: str, point: str) -> None:
    """PLM_TEST_KILL_IN_SAVE=STEP:POINT (or STEP, meaning "model"): SIGKILL this process at that
    point of saving step STEP; the crash tests inject a kill at every step of the protocol."""
    spec = os.environ.get("PLM_TEST_KILL_IN_SAVE")
    if not spec:
        return
    step, _, where = spec.partition(":")
    if tag == f"step-{int(step):07d}" and (where or "model") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


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
    _crash(tag, "model")
    with atomic_path(tmp / STATE_FILE) as p:
        torch.save({"optimizer": osd, "trainer": trainer_state}, p)
    _crash(tag, "state")
    atomic_write_text(tmp / MARKER, tag + "\n")
    fsync_dir(tmp)
    _crash(tag, "marker")
    publish_dir(tmp, final)
    _crash(tag, "publish")
    older = [d for d in checkpoint_dirs(run_dir) if step_of(d) < step_of(final)]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
        _crash(tag, "prune")
    return final


def repair(run_dir: str | Path) -> None:
    """Finish or undo what a crash inside `save` left behind (see the module docstring)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return
    for old in root.glob(".old-step-*"):
        target = root / old.name[len(".old-"):]
        if not recover_dir(target):  # the new step-N is in place: the old copy is garbage
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        target = root / tmp.name[len(".tmp-"):]
        if (tmp / MARKER).exists() and not target.exists():
            tmp.rename(target)  # written in full, killed before the rename
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def clear(run_dir: str | Path) -> list[Path]:
    """Remove every checkpoint of a run (a fresh start over an old run folder); returns what went."""
    root = Path(run_dir) / "checkpoints"
    gone = checkpoint_dirs(run_dir)
    if root.exists():
        shutil.rmtree(root)
    return gone


def _read(path: Path) -> dict:
    model = load_model(path, dtype=None)
    try:
        st = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise CheckpointError(f"{path / STATE_FILE}: cannot read trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(st, dict) or "optimizer" not in st or "trainer" not in st:
        raise CheckpointError(f"{path / STATE_FILE}: not a plm trainer state")
    st["path"] = path
    st["model_state"] = model.state_dict()
    return st


def load_latest(run_dir: str | Path) -> dict | None:
    """The newest checkpoint that reads, as {path, model_state, optimizer, trainer}; None when the
    run has none. A damaged newer one is skipped (with a warning); all damaged is an error."""
    repair(run_dir)
    dirs = checkpoint_dirs(run_dir)
    errors = []
    for path in reversed(dirs):
        try:
            st = _read(path)
        except (CheckpointError, PLMError, OSError) as e:
            errors.append(f"{path.name}: {e}")
            print(f"warning: checkpoint {path} is damaged ({e}); trying the one before it", file=sys.stderr)
            continue
        return st
    if errors:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint can be read: " + "; ".join(errors))
    return None


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
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STATE_FILE, MARKER))
    tokenizer.save(tmp)
    return publish_dir(tmp, dst)
