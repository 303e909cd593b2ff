from plm.model.config import PRESETS, PLMConfig
from plm.model.modeling import KVCache, PLMForCausalLM

__all__ = ["PLMConfig", "PLMForCausalLM", "KVCache", "PRESETS"]
