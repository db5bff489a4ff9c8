"""Configuration of the PALO model.

On disk a PALO checkpoint's ``config.json`` is a LLaMA config plus flat ``mm_*`` keys (the original format, kept for
compatibility). Inside the project those keys are read once, through :class:`MultimodalSpec`, a typed and validated
view with the defaults the original code applies when a key is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlamaConfig


class PaloConfig(LlamaConfig):
    """A LLaMA config carrying the multimodal ``mm_*`` keys (``model_type`` ``palo``)."""

    model_type = "palo"


class LlavaLlamaConfig(PaloConfig):
    """The same format as written by LLaVA-1.5 (``model_type`` ``llava_llama``)."""

    model_type = "llava_llama"


@dataclass(frozen=True)
class MultimodalSpec:
    """The multimodal settings of a checkpoint, with the original load-time defaults.

    Attributes:
        vision_tower: ``mm_vision_tower`` (hub id or path); None for a text-only LLaMA.
        select_layer: ``mm_vision_select_layer``.
        select_feature: ``mm_vision_select_feature`` (``patch`` or ``cls_patch``).
        projector_type: ``mm_projector_type`` (default ``linear``).
        mm_hidden_size: The vision feature width (the projector's input).
        use_im_start_end: Wrap each ``<image>`` in ``<im_start>``/``<im_end>`` tokens.
        use_im_patch_token: Add ``<im_patch>`` to the tokenizer at load. The original defaults this to **true** when
            the key is missing, which grows the vocabulary by one row; kept for identical ids and logits.
        image_aspect_ratio: ``pad`` or anything else (CLIP's resize and centre crop).
        max_length: ``tokenizer_model_max_length``: spliced sequences are truncated to it (None: no truncation).
        padding_side: ``tokenizer_padding_side`` used when batching spliced sequences in training.
    """

    vision_tower: str | None
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "linear"
    mm_hidden_size: int | None = None
    use_im_start_end: bool = False
    use_im_patch_token: bool = True
    image_aspect_ratio: str | None = None
    max_length: int | None = None
    padding_side: str = "right"

    @property
    def is_multimodal(self) -> bool:
        return self.vision_tower is not None

    @classmethod
    def from_config(cls, config: Any) -> MultimodalSpec:
        """Read the ``mm_*`` keys of a config (also accepting the attribute name ``vision_tower``)."""
        tower = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
        select_feature = getattr(config, "mm_vision_select_feature", "patch") or "patch"
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} is not supported; use 'patch' or 'cls_patch'"
            )
        select_layer = getattr(config, "mm_vision_select_layer", None)
        if tower is not None and select_layer is None:
            raise ValueError("config.json names a vision tower but has no mm_vision_select_layer (PALO uses -2)")
        return cls(
            vision_tower=tower,
            select_layer=int(select_layer) if select_layer is not None else -2,
            select_feature=select_feature,
            projector_type=getattr(config, "mm_projector_type", None) or "linear",
            mm_hidden_size=getattr(config, "mm_hidden_size", None),
            use_im_start_end=bool(getattr(config, "mm_use_im_start_end", False)),
            use_im_patch_token=bool(getattr(config, "mm_use_im_patch_token", True)),
            image_aspect_ratio=getattr(config, "image_aspect_ratio", None),
            max_length=getattr(config, "tokenizer_model_max_length", None),
            padding_side=getattr(config, "tokenizer_padding_side", "right") or "right",
        )
