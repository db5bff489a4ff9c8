"""Liger's fused Triton kernels for the language model (``--use_liger_kernel True``), on CUDA only.

Applied to the LLaMA inside PALO: RMSNorm, RoPE and SwiGLU modules are swapped for Liger's, and the causal-LM
head becomes Liger's fused linear + cross-entropy, which computes the loss chunk by chunk so the
``[tokens x vocabulary]`` logits are never materialised. transformers' own ``use_liger_kernel`` cannot do this for
PALO: it picks kernels by ``model_type`` (``palo`` is not one it knows) and, given an instance, would replace the
whole ``forward`` of the model, image splice included; here only the language-model call after the splice changes.

The head (:func:`fused_causal_lm_forward`) asks Liger for the per-token losses (``reduction="none"``) and reduces
them as transformers' loss does, so the output carries ``token_losses`` in place of logits and training still logs
``loss_<language>``.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM

from palo.constants import IGNORE_INDEX

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

    if not hasattr(model, "causal_lm_forward"):  # a text-only LLaMA: Liger's own forward is the whole forward
        apply_liger_kernel_to_llama(model=model)
        return

    # Module swaps on this instance; the causal-LM forward is handled below, not by replacing model.forward.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    model.causal_lm_forward = MethodType(fused_causal_lm_forward, model)
    logger.info("Liger kernels applied: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy")


def fused_causal_lm_forward(self: Any, labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                            **kwargs: Any) -> Any:
    """The LLaMA forward with Liger's fused linear cross-entropy head, in training with labels.

    Elsewhere (evaluation, generation, no labels) it is LLaMA's own forward, logits included. In training the loss
    is transformers': the sum of the per-token losses over ``num_items_in_batch`` (the Trainer's count under
    gradient accumulation) or over the labelled tokens.

    Args:
        labels: ``[B, L]`` spliced labels (``IGNORE_INDEX`` where nothing is learnt).
        num_items_in_batch: Labelled tokens of the whole accumulated batch, when the Trainer passes it.
        **kwargs: The LLaMA model's arguments (embeddings, mask, positions ...).

    Returns:
        transformers' causal-LM output with ``logits`` None and ``token_losses`` ``[B, L - 1]``: the loss of
        predicting each next token (0 where its label is ignored).
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from palo.model.palo_llama import PaloCausalLMOutput

    if not (self.training and labels is not None):
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return LlamaForCausalLM.forward(self, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state[:, :-1]
    target = labels[:, 1:].to(hidden.device)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
    token_losses = loss_fn(self.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1),
                           self.lm_head.bias).view(target.shape)
    if num_items_in_batch is None:
        denominator = (target != IGNORE_INDEX).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=token_losses.device)
    loss = token_losses.sum() / denominator
    return PaloCausalLMOutput(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                              hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                              token_losses=token_losses)
