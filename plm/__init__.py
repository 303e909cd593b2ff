"""plm: build, train, align, evaluate and ship PLM, the Peripheral Language Model."""
from __future__ import annotations

from typing import Any

__all__ = ["PLMConfig", "PLMForCausalLM"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # lazy, so `plm --help` and config checks start without importing torch
    if name in __all__:
        import plm.model
        return getattr(plm.model, name)
    raise AttributeError(f"module 'plm' has no attribute {name!r}")
