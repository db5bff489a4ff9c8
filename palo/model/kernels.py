"""Liger's fused Triton kernels for the language model (``--use_liger_kernel True``), on CUDA only.

Applied to the LLaMA inside PALO: RMSNorm, RoPE and SwiGLU modules are swapped for Liger's, and the causal-LM
head becomes Liger's fused linear + cross-entropy, which computes the loss chunk by chunk so the
``[tokens x vocabulary]`` logits are never materialised. transformers' own ``use_liger_kernel`` cannot do this for
PALO: it picks kernels by ``model_type`` (``palo`` is not one it knows) and, given an instance, would replace the
whole ``forward`` of the model, image splice included; here only the language-model call after the splice changes.

Without logits, training logs no ``loss_<language>`` (the per-language losses are computed from the logits).
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
from torch import nn

logger = logging.getLogger(__name__)


def liger_available() -> tuple[bool, str]:
    """Whether Liger kernels can run here, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (Liger's kernels are Triton GPU kernels)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False, "the liger-kernel package is not installed (pip install liger-kernel)"
    return True, ""


def apply_liger_kernels(model: nn.Module) -> None:
    """Patch ``model`` (a PaloForCausalLM or a plain LLaMA, before PEFT wraps it) with Liger's kernels, in place."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from liger_kernel.transformers.model.llama import lce_forward

    if not hasattr(model, "causal_lm_forward"):  # a text-only LLaMA: Liger's own forward is the whole forward
        apply_liger_kernel_to_llama(model=model)
        return

    # Module swaps on this instance; the causal-LM forward is handled below, not by replacing model.forward.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    model.causal_lm_forward = MethodType(lce_forward, model)
    logger.info("Liger kernels applied: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy")
