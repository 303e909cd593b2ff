"""Where evaluation data lives, and reading it: local JSONL first, Hugging Face datasets second.

Every benchmark has a local layout, ``<data-dir>/<task>/<split>.jsonl`` (or ``.jsonl.gz``),
holding the Hugging Face dataset's own records, one JSON object per line, so
``datasets.load_dataset(...)[split].to_json(path)`` (or ``plm eval --download``) makes one.
The data directory is ``--data-dir``, else ``$PLM_DATA`` (``$PLM_SHARED_DATA`` is read too), else
``~/.cache/plm/data`` (``$PLM_CACHE/data``); ``plm eval --download`` fills it where the network
allows, and a missing task says where it looked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from plm.data.hf import hf_available, load_hf_dataset
from plm.errors import PLMError
from plm.utils import cache_dir

DATA_ENV = "PLM_DATA"
LEGACY_DATA_ENV = "PLM_SHARED_DATA"  # what the test-suite fixtures set; still honoured
SOURCES = ("auto", "local", "hf")


def default_data_dir() -> Path:
    """$PLM_DATA, else $PLM_SHARED_DATA, else the cache folder's data/ (~/.cache/plm/data)."""
    for env in (DATA_ENV, LEGACY_DATA_ENV):
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser()
    return cache_dir("data")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def find_local(data_dir: Path, task_dir: str, split: str) -> Path | None:
    """``<data_dir>/<task_dir>/<split>.jsonl`` or ``.jsonl.gz``, whichever exists."""
    for suffix in (".jsonl", ".jsonl.gz"):
        p = data_dir / task_dir / f"{split}{suffix}"
        if p.is_file():
            return p
    return None


def load_hf_records(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Records of one split of a Hugging Face dataset (needs `datasets` and the network or its cache)."""
    return [dict(r) for r in load_hf_dataset(path, name, split)]


def from_hf(task: str, local_hint: Path, source: str, load, hf: str = ""):
    """``load()`` from Hugging Face for a task with no local file; in ``auto`` mode a failure
    also names the local file that would have been read. ``hf`` names the dataset for messages."""
    if source == "local" or (source == "auto" and not hf_available()):
        what = f"the Hugging Face {hf} records, one JSON object per line; " if hf else ""
        raise PLMError(f"{task}: no local data at {local_hint} ({what}set --data-dir or $PLM_DATA, or "
                       f"`plm eval --download --tasks {task}` where the network allows; see docs/eval.md)")
    try:
        return load()
    except PLMError as e:
        if source == "auto":
            raise PLMError(f"{task}: no local data at {local_hint}, and {e}") from None
        raise
