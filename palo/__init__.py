"""PALO: a polyglot LLaVA-style vision-language model in 10 languages.

``import palo`` registers the PALO model classes with transformers' Auto classes.
"""

from palo.model import LlavaLlamaForCausalLM, PaloConfig, PaloForCausalLM

__version__ = "0.1.0"
__all__ = ["LlavaLlamaForCausalLM", "PaloConfig", "PaloForCausalLM", "__version__"]
