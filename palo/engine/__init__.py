"""The generation engine: continuous batching over a paged KV cache (see :mod:`palo.engine.llm_engine`).

Layout, one job per file: ``config`` (settings, cache sizing), ``sequence`` (a request's state), ``block_manager``
(paged blocks, prefix sharing), ``scheduler`` (waiting -> prefilling -> decoding), ``model_runner`` (the forward
passes over the cache), ``cuda_graphs`` (captured decode steps), ``sampling`` (per-request sampling on the device),
``structured`` (answers held to a JSON schema, a pattern or choices), ``detokenizer`` (incremental text, stop
strings) and ``llm_engine`` (the loop).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EngineConfig": "palo.engine.config",
    "SamplingParams": "palo.engine.sampling",
    "EngineRequest": "palo.engine.sequence",
    "RequestOutput": "palo.engine.sequence",
    "LLMEngine": "palo.engine.llm_engine",
    "QueueFull": "palo.engine.errors",
    "RequestTooLarge": "palo.engine.errors",
    "EngineClosed": "palo.engine.errors",
    "StructuredOutput": "palo.engine.structured",
    "GrammarError": "palo.engine.structured",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that the light modules (detokenizer, errors) can be imported without torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
