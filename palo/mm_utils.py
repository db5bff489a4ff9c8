"""Multimodal helpers with the original PALO/LLaVA entry points.

``tokenizer_image_token``, ``process_images``, ``expand2square``, ``get_model_name_from_path`` and
``KeywordsStoppingCriteria`` keep the original names and signatures so existing user code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from palo.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from palo.conversation import expand2square  # the one implementation; re-exported under LLaVA's name

# The loaders live with the other torch-free image code; they keep their LLaVA names here.
from palo.image_io import (  # noqa: F401
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    fit_square_canvas,
    load_image,
    load_image_from_base64,
    trim_for_centre_crop,
    viewed,
)
from palo.model.config import MultimodalSpec


def pad_color(image_processor: Any) -> tuple[int, ...]:
    """The ``pad`` background: the processor's mean times 255, truncated (122, 116, 104 for CLIP)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def preprocess_image(image: Image.Image, image_processor: Any, image_aspect_ratio: str | None) -> torch.Tensor:
    """Pixel values ``[3, H, W]`` of one image: ``pad`` squares it first (as PALO trained), anything else lets the
    CLIP processor resize the short side and centre-crop.

    The image is taken as a viewer shows it (:func:`palo.image_io.viewed`; the loaders have done so already, and it
    changes nothing twice), so a PIL image a caller opened itself is read as every other path reads it. The second
    copy this makes of a loaded image is kept on purpose: skipping it measured slower per request (docs/benchmarks.md).
    """
    image = viewed(image)
    if image_aspect_ratio == "pad":
        image = expand2square(fit_square_canvas(image, MAX_IMAGE_PIXELS), pad_color(image_processor))
    else:
        shortest_edge = _shortest_edge(image_processor)
        if shortest_edge:
            image = trim_for_centre_crop(image, shortest_edge, MAX_IMAGE_PIXELS)
    return image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def _shortest_edge(image_processor: Any) -> int | None:
    """The side the processor resizes the short side to (CLIP's 336), or None when it resizes to a fixed size."""
    size = getattr(image_processor, "size", None)
    edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return int(edge) if edge else None


def process_images(images: Sequence[Image.Image], image_processor: Any, model_cfg: Any) -> torch.Tensor | list:
    """Turn PIL images into CLIP pixel values following the model's ``image_aspect_ratio``.

    Args:
        images: PIL images.
        image_processor: The CLIP image processor of the model.
        model_cfg: The model config; ``image_aspect_ratio == "pad"`` pads to a square first, anything else (``square``,
            absent) lets the processor resize the short side and centre-crop.

    Returns:
        A tensor ``[N, 3, H, W]`` when all images share a shape (always, for CLIP), else a list of ``[3, H, W]``.
    """
    aspect = MultimodalSpec.from_config(model_cfg).image_aspect_ratio
    new_images = [preprocess_image(image, image_processor, aspect) for image in images]
    if new_images and all(x.shape == new_images[0].shape for x in new_images):
        return torch.stack(new_images, dim=0)
    return new_images


def left_pad(rows: Sequence[torch.Tensor | list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts (1-D ids) into ``[B, T]`` ids and attention mask, padded on the left for generation.

    Every prompt then ends at the last column, where generation continues; the model ignores masked positions, so
    a row gives the same tokens as generating it alone.
    """
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    width = max(r.shape[0] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[0]:] = row
        mask[i, width - row.shape[0]:] = 1
    return ids, mask


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenize a prompt, putting ``image_token_index`` where each ``<image>`` stands.

    Each text chunk between placeholders is tokenized on its own (as if it began a sequence, SentencePiece dummy
    prefix included), the output starts with one BOS, and exactly one sentinel sits between consecutive chunks. This
    is the rule training and inference both used in the original, so ids match the released checkpoints.

    Args:
        prompt: The rendered prompt.
        tokenizer: A tokenizer that prepends BOS.
        image_token_index: The sentinel id (``-200``).
        return_tensors: ``"pt"`` for a 1-D long tensor, None for a list.

    Returns:
        The ids.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def get_model_name_from_path(model_path: str) -> str:
    """The display name of a checkpoint: its last path component, or ``<parent>_<checkpoint-N>``."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop when every row has generated one of the keywords (e.g. the template's stop string).

    A row matches when its last ids equal a keyword's ids, or when the text decoded from its last new tokens
    contains a keyword.

    Args:
        keywords: Stop strings.
        tokenizer: The tokenizer used to encode them and decode the output.
        input_ids: The prompt ids ``[B, T]``; only tokens after them are checked.
    """

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor) -> None:
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids: list[torch.Tensor] = []
        self.max_keyword_len = 0
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.max_keyword_len = max(self.max_keyword_len, len(ids))
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.start_len = input_ids.shape[1]

    def _row_matches(self, row: torch.Tensor, num_new: int) -> bool:
        if num_new <= 0:
            return False
        for ids in self.keyword_ids:
            if num_new >= ids.shape[0] and torch.equal(row[-ids.shape[0]:].cpu(), ids):
                return True
        tail = min(num_new, self.max_keyword_len)
        text = self.tokenizer.decode(row[-tail:], skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.BoolTensor:
        """Per-row stop flags.

        Args:
            input_ids: ``[B, T + n]``, the prompt followed by the ``n`` tokens generated so far.

        Returns:
            ``[B]`` booleans, one per row: each row stops on its own, so batched generation gives the same text as
            one-by-one (docs/compat.md#serving).
        """
        num_new = input_ids.shape[1] - self.start_len
        flags = [self._row_matches(row, num_new) for row in input_ids]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
