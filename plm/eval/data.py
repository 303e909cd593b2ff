"""Where evaluation data lives, and reading it: local JSONL first, Hugging Face datasets second.

Every benchmark has a local layout, ``<data-dir>/<task>/<split>.jsonl`` (or ``.jsonl.gz``),
holding the Hugging Face dataset's own records, one JSON object per line, so
``datasets.load_dataset(...)[split].to_json(path)`` (or ``plm eval --download``) makes one.
The data directory is ``--data-dir``, else ``$PLM_DATA``, else ``$PLM_SHARED_DATA``, else
``../shared/data`` next to the repository (where the shipped GSM8K and HumanEval live).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from plm.errors import PLMError

DATA_ENV = "PLM_DATA"
LEGACY_DATA_ENV = "PLM_SHARED_DATA"  # what the test-suite fixtures set; still honoured
SOURCES = ("auto", "local", "hf")


def default_data_dir() -> Path:
    """$PLM_DATA, else $PLM_SHARED_DATA, else <repo>/../shared/data."""
    for env in (DATA_ENV, LEGACY_DATA_ENV):
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a .jsonl or .jsonl.gz file."""
    if not path.is_file():
        raise PLMError(f"dataset file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PLMError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise PLMError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PLMError(f"cannot read {path}: {e}") from None


def find_local(data_dir: Path, task_dir: str, split: str) -> Path | None:
    """``<data_dir>/<task_dir>/<split>.jsonl`` or ``.jsonl.gz``, whichever exists."""
    for suffix in (".jsonl", ".jsonl.gz"):
        p = data_dir / task_dir / f"{split}{suffix}"
        if p.is_file():
            return p
    return None


def hf_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_hf_records(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Records of one split of a Hugging Face dataset (needs `datasets` and the network or its cache)."""
    try:
        import datasets
    except ImportError:
        raise PLMError("reading from Hugging Face needs the `datasets` package "
                       "(pip install 'plm[datasets]'), or use local files") from None
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, missing config, script datasets, ...: one clear line
        raise PLMError(f"cannot load Hugging Face dataset {path}"
                       f"{'/' + name if name else ''} split {split!r}: {type(e).__name__}: {e}") from None
    return [dict(r) for r in ds]


def hf_config_names(path: str) -> list[str]:
    try:
        import datasets
        return list(datasets.get_dataset_config_names(path))
    except Exception as e:
        raise PLMError(f"cannot list the configs of Hugging Face dataset {path}: {e}") from None


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


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
