"""Models by Hugging Face hub id: `PLM-Team/PLM-1.8B-Instruct` is downloaded once with
`huggingface_hub` into its cache (`HF_HOME`, or `cache_dir`) and read from there afterwards;
with `HF_HUB_OFFLINE=1` only the cache is used."""
from __future__ import annotations

import os
import re
from pathlib import Path

from plm.errors import PLMError

# what a PLM checkpoint folder holds: config, weights, tokenizer, the transformers code beside it
FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "tokenizer*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | Path) -> bool:
    """"org/name" that is not a path on this machine."""
    s = str(name)
    return bool(_REPO_ID.match(s)) and not Path(s).exists() and not s.startswith((".", "~"))


def resolve_model(name: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                  local_files_only: bool | None = None) -> Path:
    """A local folder (or file) as it is; a hub id as the folder of its snapshot in the cache."""
    if not is_hub_id(name):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise PLMError(f"{name}: loading a model by hub id needs the huggingface_hub package "
                       "(pip install huggingface_hub), or give a local folder") from None
    offline = local_files_only if local_files_only is not None else \
        os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(str(name), revision=revision, cache_dir=cache_dir, allow_patterns=FILES,
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise PLMError(f"{name}: not in the local Hugging Face cache and {why}; download it once with network "
                       "access (plm generate NAME does), or give a local folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise PLMError(f"{name}: no such model on the Hugging Face hub ({type(e).__name__})") from None
    except Exception as e:  # network errors, gated repositories, ...: one clear line
        raise PLMError(f"{name}: cannot download from the Hugging Face hub: {type(e).__name__}: {e}") from None
    return Path(path)
