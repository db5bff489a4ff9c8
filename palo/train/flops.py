"""Model FLOPs of a PALO training step, for MFU (model FLOPs utilisation).

MFU = the FLOPs the model *needs* for the tokens it trained on, per second, over the device's peak. Needed FLOPs
do not grow with padding, with attention across packed samples (there is none) or with recomputation (gradient
checkpointing, flash attention's backward), so MFU falls when those waste time. What is counted:

* every matrix multiply weight ``W`` (``nn.Linear``, LoRA's A and B included) of the language model (decoder and
  ``lm_head``; the embedding is a lookup, norms and activations are ignored), per real token:
  ``6·|W|`` if ``W`` trains (forward 2, gradient of the input 2, gradient of the weight 2),
  ``4·|W|`` if frozen (forward, and the input gradient that carries the loss down to what trains below it: the
  projector or the LoRA matrices, in every PALO recipe);
* attention in the language model, per layer and sample of length ``s``: causal ``QKᵀ`` and ``AV`` forward
  ``2·d·s·(s+1)``, three times that with the backward: ``6·d·s·(s+1)`` (``d`` = heads × head size), counted
  within each sample only;
* the projector, per image: three times its forward FLOPs (twice when frozen), its matrix multiplies and
  convolutions counted by torch on the feature rows it runs on (all 576 patches for LDP, which then pools them);
* the frozen vision tower, forward only: ``2·|W|`` per patch token (CLS included) plus non-causal attention
  ``4·d·T²`` per layer and image of ``T`` tokens, over the layers that run (up to ``mm_vision_select_layer``);
  its convolutional patch embedding (under 1% at CLIP-L/336) is left out.

Peak FLOP/s are the dense bf16 tensor-core figures of the device (:func:`peak_flops`), or ``PALO_PEAK_TFLOPS``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name(); the
# first key found wins, so the PCIe / NVL boards (lower clocks and power) come before their SXM namesakes.
PEAK_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0,
               "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(device: torch.device | None = None) -> float | None:
    """Peak FLOP/s of ``device``: ``PALO_PEAK_TFLOPS`` if set, else the table's entry for the GPU, else None."""
    if os.environ.get("PALO_PEAK_TFLOPS"):
        return float(os.environ["PALO_PEAK_TFLOPS"]) * 1e12
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def _linear_size(module: nn.Module) -> int:
    return int(module.in_features) * int(module.out_features)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _projector_forward_flops(config: Any, rows: int) -> float:
    """Forward FLOPs of the projector on one image's ``rows`` feature rows, counted by torch on a copy of it with
    no data (meta device: shapes only, so also under ZeRO-3, whose own parameters are partitioned).

    Counted rather than derived from the Linear weights: LDP (``ldpnet``) runs its MLP on all 576 patch rows
    before its convolutions (not counted by weights at all) reduce them to 144, so "weights x output rows" missed
    about 34 GFLOP per image at MobilePALO's size.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from palo.model.projectors import build_projector

    with torch.device("meta"):
        projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        features = torch.empty(1, rows, config.mm_hidden_size)
    with FlopCounterMode(display=False) as counted:
        projector(features)
    return float(counted.get_total_flops())


@dataclass
class FlopCounter:
    """Per-token and per-image FLOP coefficients of one model (see the module docstring).

    Attributes:
        lm_per_token: Linear-layer FLOPs of the language model per real token (forward and backward).
        lm_attention: ``6 · layers · d``: multiply by ``s·(s+1)`` per sample of length ``s``.
        image_flops: Vision tower (forward) and projector (forward and backward) per image.
    """

    lm_per_token: float
    lm_attention: float
    image_flops: float

    @classmethod
    def of(cls, model: nn.Module) -> FlopCounter:
        """Count the Linear weights of ``model`` (a PaloForCausalLM, possibly wrapped by PEFT)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        tower = getattr(base, "vision_tower", None)
        # The tower runs its layers up to the selected one only (PALO's -2 skips the last).
        vision_layers = tower.features.select_layer % (tower.config.num_hidden_layers + 1) if tower is not None else 0
        lm = vision = 0.0
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) and not hasattr(module, "in_features"):
                continue
            if not hasattr(module, "out_features") or hasattr(module, "base_layer"):
                continue  # a LoRA wrapper: its base layer and A/B matrices are counted themselves
            size = _linear_size(module)
            if "vision_tower" in name:
                match = re.search(r"\.layers\.(\d+)\.", name)
                if match and int(match.group(1)) < vision_layers:
                    vision += 2 * size
            elif "mm_projector" in name:
                continue  # counted whole below, on the rows it really runs on
            else:
                lm += (6 if _trains(module) else 4) * size
        config = base.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = 6.0 * config.num_hidden_layers * config.num_attention_heads * head_dim
        image = 0.0
        if tower is not None:
            tokens_in = tower.num_patches + 1  # patches and CLS go through every layer
            image = vision * tokens_in + 4.0 * vision_layers * tower.config.hidden_size * tokens_in**2
            trains = any(p.requires_grad for n, p in model.named_parameters() if "mm_projector" in n)
            image += _projector_forward_flops(config, tower.num_tokens) * (3 if trains else 2)
        return cls(lm_per_token=lm, lm_attention=attention, image_flops=image)

    def step(self, real_tokens: int, sample_lengths: torch.Tensor, num_images: int) -> float:
        """FLOPs of one forward+backward over ``real_tokens`` tokens in samples of ``sample_lengths``."""
        lengths = sample_lengths.double()
        return (self.lm_per_token * real_tokens + self.lm_attention * float((lengths * (lengths + 1)).sum())
                + self.image_flops * num_images)
