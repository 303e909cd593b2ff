"""plm: build, train, align, evaluate and ship PLM, the Peripheral Language Model."""
from plm.model.config import PLMConfig
from plm.model.modeling import PLMForCausalLM

__all__ = ["PLMConfig", "PLMForCausalLM"]
__version__ = "0.1.0"
