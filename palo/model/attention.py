"""Which attention kernel the language model runs, chosen once and checked before anything loads.

``sdpa`` (PyTorch's scaled-dot-product attention, the default), ``flash_attention_2`` (the flash-attn package,
CUDA only; the original ``train_mem.py`` meant it), ``flex_attention`` (PyTorch FlexAttention, which turns packed
batches' document masks into block-sparse work) or ``eager`` (plain matmuls, the reference). All four are exact for
packed batches: transformers builds the document mask from the restarting positions for the first three mask
kinds, and flash-attn gets varlen boundaries (see :mod:`palo.model.palo_llama`).
"""

from __future__ import annotations

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flex_attention", "eager")


class AttentionUnavailableError(ImportError):
    """The chosen attention implementation is not installed (or not usable on this machine)."""


def check_attn_implementation(name: str) -> str:
    """Return ``name`` if it can run here.

    Raises:
        ValueError: If ``name`` is not one of :data:`ATTN_IMPLEMENTATIONS`.
        AttentionUnavailableError: If its package or device is missing, saying what to install.
    """
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, not {name!r}")
    if name == "flash_attention_2" and not is_flash_attn_2_available():
        raise AttentionUnavailableError(
            "attn_implementation flash_attention_2 needs the flash-attn package and a CUDA GPU "
            "(pip install flash-attn --no-build-isolation); use sdpa or flex_attention otherwise"
        )
    if name == "flex_attention" and not is_torch_flex_attn_available():
        raise AttentionUnavailableError("attn_implementation flex_attention needs PyTorch >= 2.5; use sdpa otherwise")
    return name


def check_trainable_on(name: str, device_type: str) -> None:
    """Refuse, before anything loads, an attention that cannot run backward on ``device_type``.

    FlexAttention has no backward on the CPU in the PyTorch versions this project runs on (inference works); asked
    for, a CPU training run passed every check and stopped at its first step. The installed PyTorch is asked with a
    one-head probe, so a version that gains it trains.

    Raises:
        AttentionUnavailableError: Saying what to use instead.
    """
    if name != "flex_attention" or device_type != "cpu":
        return
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    probe = torch.zeros(1, 1, 16, 16, requires_grad=True)
    try:
        flex_attention(probe, probe, probe).sum().backward()
    except NotImplementedError as exc:
        raise AttentionUnavailableError(f"attn_implementation flex_attention cannot train on the CPU ({exc}); use "
                                        "sdpa or eager there (FlexAttention trains on CUDA)") from None

