"""`transformers` classes of OLMo2 with the RAT+ decaying memory.

Importing this package registers `model_type="olmo2_memory"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM` (safe to import twice), and marks the classes for `save_pretrained` to copy the
configuration and modeling files next to the weights, so that a saved directory loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without this package.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_olmo2_memory import Olmo2MemoryConfig
from .modeling_olmo2_memory import (
    Olmo2MemoryCache,
    Olmo2MemoryCacheLayer,
    Olmo2MemoryForCausalLM,
    Olmo2MemoryModel,
    Olmo2MemoryPreTrainedModel,
)

AutoConfig.register(Olmo2MemoryConfig.model_type, Olmo2MemoryConfig, exist_ok=True)
AutoModel.register(Olmo2MemoryConfig, Olmo2MemoryModel, exist_ok=True)
AutoModelForCausalLM.register(Olmo2MemoryConfig, Olmo2MemoryForCausalLM, exist_ok=True)
Olmo2MemoryConfig.register_for_auto_class("AutoConfig")
Olmo2MemoryForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "Olmo2MemoryCache",
    "Olmo2MemoryCacheLayer",
    "Olmo2MemoryConfig",
    "Olmo2MemoryForCausalLM",
    "Olmo2MemoryModel",
    "Olmo2MemoryPreTrainedModel",
]
