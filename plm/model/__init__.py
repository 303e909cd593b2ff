"""The PLM model: config (no torch), modeling (the reference PyTorch model), checkpoints."""
from __future__ import annotations

from typing import Any

__all__ = ["PLMConfig", "PLMForCausalLM", "PRESETS"]


def __getattr__(name: str) -> Any:
    # lazy: `import plm.model.config` must not pull in torch (recipes are checked before it loads)
    if name in ("PLMConfig", "PRESETS"):
        from plm.model import config
        return getattr(config, name)
    if name == "PLMForCausalLM":
        from plm.model.modeling import PLMForCausalLM
        return PLMForCausalLM
    raise AttributeError(f"module 'plm.model' has no attribute {name!r}")
