"""The PALO model: vision tower, projectors, the multimodal causal LM and its loader.

Importing this package registers ``model_type`` ``palo`` and ``llava_llama`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads PALO and LLaVA-1.5 checkpoints after ``import palo.model``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from palo.model.config import LlavaLlamaConfig, MultimodalSpec, PaloConfig
from palo.model.palo_llama import LlavaLlamaForCausalLM, PaloForCausalLM, PaloModel

AutoConfig.register("palo", PaloConfig, exist_ok=True)
AutoConfig.register("llava_llama", LlavaLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(PaloConfig, PaloForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(LlavaLlamaConfig, LlavaLlamaForCausalLM, exist_ok=True)

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "MultimodalSpec",
    "PaloConfig",
    "PaloForCausalLM",
    "PaloModel",
]
