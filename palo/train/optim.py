"""Optimizer parameter groups: weight decay where it belongs, and an optional separate projector learning rate.

Weight decay is not applied to biases or normalisation weights: shrinking a norm's scale towards zero (or a bias
towards zero) changes what the layer computes rather than regularising it. With LoRA fine-tuning the freshly
trained projector wants a smaller learning rate than the adapters (PALO's LoRA script uses ``2e-4`` for the
adapters and ``--mm_projector_lr 2e-5``), hence the optional projector groups.

The groups are plain dicts accepted by any ``torch.optim`` optimizer; keys other than ``params`` override the
optimizer's defaults for that group. An LR scheduler scales every group's ``lr`` by the same factor, so the
projector keeps its ratio to the base learning rate throughout warmup and decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["PROJECTOR_KEY", "decay_parameter_names", "is_norm_module", "parameter_groups"]

# Substring that marks a parameter as belonging to the multimodal projector (``model.mm_projector.*``).
PROJECTOR_KEY = "mm_projector"


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer whose parameters must not be decayed.

    Matches ``nn.LayerNorm`` and any class whose name contains ``Norm`` (``LlamaRMSNorm``, ``LayerNorm2d``,
    ``GroupNorm``, ...): model code defines its own norm classes, and a name check catches them without
    importing every model family.

    Args:
        module: Any module.

    Returns:
        True for normalisation layers.
    """
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay.

    A parameter is decayed unless it lives inside a normalisation module (at any depth, see
    :func:`is_norm_module`) or its name contains ``bias``. Trainability is not considered here.

    Args:
        model: The model whose ``named_parameters()`` names are returned.

    Returns:
        The set of decayed parameter names, as ``model.named_parameters()`` spells them.
    """
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        if is_norm_module(module):
            prefix = f"{module_name}." if module_name else ""
            no_decay.update(prefix + name for name, _ in module.named_parameters())
    return {name for name, _ in model.named_parameters() if name not in no_decay and "bias" not in name}


def parameter_groups(model: nn.Module, weight_decay: float, projector_lr: float | None) -> list[dict[str, Any]]:
    """Build optimizer parameter groups for training.

    Only trainable parameters (``requires_grad``) are included; shared (tied) parameters appear once. Without
    ``projector_lr`` there are two groups, in this order: decayed (``weight_decay``) and not decayed (0.0).
    With it there are four: decayed non-projector, not-decayed non-projector, decayed projector and
    not-decayed projector, the projector groups carrying ``lr = projector_lr``. A parameter is a projector
    parameter when its name contains ``mm_projector``. Empty groups are dropped (e.g. a frozen projector), so
    the list may be shorter.

    Args:
        model: The model to optimise.
        weight_decay: Weight decay of the decayed groups.
        projector_lr: Learning rate for the projector's parameters, or ``None`` to use the optimizer's.

    Returns:
        A list of ``{"params": [...], "weight_decay": float}`` dicts, projector groups also with ``"lr"``.
    """
    decay = decay_parameter_names(model)
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]

    def group(decayed: bool, projector: bool) -> list[nn.Parameter]:
        return [
            param
            for name, param in trainable
            if (name in decay) == decayed and (projector_lr is not None and PROJECTOR_KEY in name) == projector
        ]

    groups: list[dict[str, Any]] = [
        {"params": group(decayed=True, projector=False), "weight_decay": weight_decay},
        {"params": group(decayed=False, projector=False), "weight_decay": 0.0},
    ]
    if projector_lr is not None:
        groups += [
            {"params": group(decayed=True, projector=True), "weight_decay": weight_decay, "lr": projector_lr},
            {"params": group(decayed=False, projector=True), "weight_decay": 0.0, "lr": projector_lr},
        ]
    return [g for g in groups if g["params"]]
