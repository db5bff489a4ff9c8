"""Export PALO checkpoints to other runtimes' formats (``palo export``).

:mod:`palo.export.hf_llava` writes a transformers ``LlavaForConditionalGeneration`` folder (weights, config,
processor, tokenizer, chat template) that vLLM and SGLang also serve; :mod:`palo.export.gguf` writes the two GGUF
files (language model, vision tower + projector) that llama.cpp's multimodal tools load.
"""

from palo.export.gguf import GGUFExportResult, export_gguf
from palo.export.hf_llava import ExportError, ExportResult, export_hf_llava

__all__ = ["ExportError", "ExportResult", "GGUFExportResult", "export_gguf", "export_hf_llava"]
