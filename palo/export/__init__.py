"""Export PALO checkpoints to other runtimes' formats (``palo export``).

:mod:`palo.export.hf_llava` writes a transformers ``LlavaForConditionalGeneration`` folder (weights, config,
processor, tokenizer, chat template) that vLLM and SGLang also serve.
"""

from palo.export.hf_llava import ExportError, ExportResult, export_hf_llava

__all__ = ["ExportError", "ExportResult", "export_hf_llava"]
