"""Hugging Face datasets, the one way in: an optional dependency (`pip install 'plm[datasets]'`)
that needs the network or its cache; every failure becomes one clear line."""
from __future__ import annotations

from typing import Any, Iterable

from plm.errors import PLMError


def hf_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_hf_dataset(name: str, config: str | None = None, split: str = "train",
                    streaming: bool = False) -> Iterable[dict[str, Any]]:
    """The records of one split of a Hugging Face dataset."""
    try:
        import datasets
    except ImportError:
        raise PLMError(f"the Hugging Face dataset {name!r} needs the `datasets` package "
                       "(pip install 'plm[datasets]') and network access or its cache; "
                       "or use local files") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # network, unknown name, missing config, gated dataset: one clear line
        raise PLMError(f"cannot load Hugging Face dataset {name}{'/' + config if config else ''} "
                       f"split {split!r}: {type(e).__name__}: {e}") from None


def hf_config_names(name: str) -> list[str]:
    try:
        import datasets
        return list(datasets.get_dataset_config_names(name))
    except Exception as e:
        raise PLMError(f"cannot list the configs of Hugging Face dataset {name}: {e}") from None
