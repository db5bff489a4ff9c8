"""PALO: a polyglot LLaVA-style vision-language model in 10 languages.

``import palo`` is cheap: it imports neither torch nor transformers. The model classes are loaded on first use
(PEP 562): ``palo.PaloForCausalLM``, ``palo.PaloConfig``, ``palo.LlavaLlamaForCausalLM`` and
``from palo import PaloForCausalLM`` import :mod:`palo.model`, and so do ``palo.model`` and the other subpackages
reached as attributes (``palo.conversation``, ``palo.serve``, ...).

Importing :mod:`palo.model` (directly, or through any of its modules such as ``palo.model.builder``, which every
loader, trainer, server and exporter uses) registers ``model_type`` ``palo`` and ``llava_llama`` with
transformers' ``AutoConfig`` and ``AutoModelForCausalLM``. ``import palo`` alone no longer does: code that calls
the Auto classes on a PALO folder without going through PALO's loader should ``import palo.model`` first.

``palo.LLM`` (:mod:`palo.llm`) answers many conversations at once on the generation engine. The command line is
:mod:`palo.cli` (``palo <verb>``, ``python -m palo``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from palo.llm import LLM
    from palo.model import LlavaLlamaForCausalLM, PaloConfig, PaloForCausalLM

__version__ = "0.1.0"
__all__ = ["LLM", "LlavaLlamaForCausalLM", "PaloConfig", "PaloForCausalLM", "__version__"]

_MODEL_EXPORTS = frozenset({"LlavaLlamaForCausalLM", "PaloConfig", "PaloForCausalLM"})
# Submodules reachable as attributes without importing them first, as when ``import palo`` loaded palo.model.
_SUBMODULES = frozenset({
    "cli", "constants", "conversation", "data", "engine", "eval", "export", "jsonl", "llm", "mm_utils", "model",
    "openai_client", "quickstart", "remote_images", "serve", "testing", "train", "utils",
})


def __getattr__(name: str) -> Any:
    if name in _MODEL_EXPORTS:
        value = getattr(importlib.import_module("palo.model"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name == "LLM":
        from palo.llm import LLM

        return LLM
    if name in _SUBMODULES:
        return importlib.import_module(f"palo.{name}")  # the import sets the attribute on this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_EXPORTS, *_SUBMODULES, "LLM"})
