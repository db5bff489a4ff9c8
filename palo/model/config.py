"""Configuration of the PALO model.

On disk a PALO checkpoint's ``config.json`` is a LLaMA config plus flat ``mm_*`` keys (the original format, kept for
compatibility). Inside the project those keys are read once, through :class:`MultimodalSpec`, a typed and validated
view with the defaults the original code applies when a key is absent.

The module also owns the two prompt rules those keys imply, so that training, evaluation and serving cannot
disagree: what one image is in a prompt (:func:`image_placeholder`, ``<im_start><image><im_end>`` with
``mm_use_im_start_end``) and how many language-model positions it takes (:meth:`MultimodalSpec.tokens_per_image`,
from the tower's image and patch size and the projector, without running either).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlamaConfig

from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from palo.model.projectors import projector_num_tokens

# The CLIP hidden state PALO reads: the penultimate layer's output (before post_layernorm). Every released PALO and
# LLaVA-1.5 checkpoint stores -2 and every training script passes it, so it is also the training flag's default
# (palo.train.arguments; the original flag said -1, a value no script used). Loading reads the value config.json
# stores; a config that names a tower but lacks the key is refused rather than guessed, as the original did.
DEFAULT_VISION_SELECT_LAYER = -2


def image_placeholder(use_im_start_end: bool) -> str:
    """What one image is in a rendered prompt: ``<image>``, or ``<im_start><image><im_end>`` for checkpoints trained
    with ``mm_use_im_start_end`` (their two learned rows bracket the image features).

    Every prompt writer (training's renderer, ``model_vqa``, the worker, the chat CLI) goes through here.
    """
    if use_im_start_end:
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def expand_image_placeholders(text: str, use_im_start_end: bool) -> str:
    """``text`` with every ``<image>`` written as :func:`image_placeholder` says (unchanged without start/end)."""
    if not use_im_start_end:
        return text
    return text.replace(DEFAULT_IMAGE_TOKEN, image_placeholder(True))


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
    select_layer: int = DEFAULT_VISION_SELECT_LAYER
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

    @property
    def image_placeholder(self) -> str:
        """What one image is in this checkpoint's prompts (see :func:`image_placeholder`)."""
        return image_placeholder(self.use_im_start_end)

    def expand_image_placeholders(self, text: str) -> str:
        """``text`` with every ``<image>`` written as this checkpoint expects
        (see :func:`expand_image_placeholders`)."""
        return expand_image_placeholders(text, self.use_im_start_end)

    def tokens_per_image(self, vision_config: Any) -> int:
        """Language-model positions one image takes, from the tower's architecture alone (nothing is run).

        Args:
            vision_config: The CLIP vision config (anything with ``image_size`` and ``patch_size``).

        Returns:
            The projector's output rows for the tower's patch grid, plus the CLS row with ``cls_patch``: 576 for
            CLIP-L/14-336 with ``linear`` or ``mlp2x_gelu``, 144 with ``ldpnet``.
        """
        patches = (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2
        features = patches + (1 if self.select_feature == "cls_patch" else 0)
        return projector_num_tokens(self.projector_type, features)

    @classmethod
    def from_config(cls, config: Any) -> MultimodalSpec:
        """Read the ``mm_*`` keys of a config (also accepting the attribute name ``vision_tower``)."""
        tower = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
        select_feature = getattr(config, "mm_vision_select_feature", "patch") or "patch"
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} is not supported; use 'patch' or 'cls_patch'"
            )
        projector_type = getattr(config, "mm_projector_type", None) or "linear"
        if projector_type == "ldpnet" and select_feature == "cls_patch":  # found at the first image otherwise
            raise ValueError("mm_projector_type='ldpnet' needs mm_vision_select_feature='patch': LDP pools a square "
                             "grid of patch features, and 'cls_patch' adds the CLS feature to it")
        select_layer = getattr(config, "mm_vision_select_layer", None)
        if tower is not None and select_layer is None:
            raise ValueError(
                "config.json names a vision tower but has no mm_vision_select_layer "
                f"(PALO uses {DEFAULT_VISION_SELECT_LAYER})"
            )
        return cls(
            vision_tower=tower,
            select_layer=int(select_layer) if select_layer is not None else DEFAULT_VISION_SELECT_LAYER,
            select_feature=select_feature,
            projector_type=projector_type,
            mm_hidden_size=getattr(config, "mm_hidden_size", None),
            use_im_start_end=bool(getattr(config, "mm_use_im_start_end", False)),
            use_im_patch_token=bool(getattr(config, "mm_use_im_patch_token", True)),
            image_aspect_ratio=getattr(config, "image_aspect_ratio", None),
            max_length=getattr(config, "tokenizer_model_max_length", None),
            padding_side=getattr(config, "tokenizer_padding_side", "right") or "right",
        )
