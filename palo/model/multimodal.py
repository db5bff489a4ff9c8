"""The one contract for putting image features into a token sequence.

Training, evaluation and serving all call :func:`splice_image_features`: each ``IMAGE_TOKEN_INDEX`` (-200) in
``input_ids`` is replaced by the rows of the next image's projected features, whose labels are ``IGNORE_INDEX``.
It fails loudly when images and placeholders disagree instead of silently mis-aligning them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


class ImagePlaceholderMismatch(ValueError):
    """The number of images does not match the ``<image>`` placeholders of the prompts."""


@dataclass
class SplicedInputs:
    """Embeddings ready for the language model.

    Attributes:
        inputs_embeds: ``[B, L, D]``.
        attention_mask: ``[B, L]``, 1 on real positions.
        position_ids: ``[B, L]``, restarting at 0 on each sample's first real position.
        labels: ``[B, L]`` with ``IGNORE_INDEX`` on image rows and padding, or None.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None


def count_placeholders(input_ids: torch.Tensor) -> list[int]:
    """Number of image sentinels in each row of ``input_ids`` ``[B, T]``."""
    return (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist()


def splice_image_features(
    input_ids: torch.Tensor,
    image_features: Sequence[torch.Tensor],
    embed_tokens: nn.Module,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
) -> SplicedInputs:
    """Replace each image sentinel by that image's features and re-pad the batch.

    Images are consumed in order: row 0's placeholders first, left to right, then row 1's, and so on. For training
    batches that mix image and text-only samples, a text-only row may also be given one (dummy) image, which it
    consumes without using; its features enter the graph with zero weight so every projector parameter still gets a
    gradient on every rank.

    Args:
        input_ids: ``[B, T]`` token ids with ``IMAGE_TOKEN_INDEX`` at image positions; padded positions are those
            where ``attention_mask`` is 0.
        image_features: One tensor ``[n_i, D]`` per image, in order.
        embed_tokens: The language model's input embedding.
        attention_mask: ``[B, T]``; None means no padding.
        labels: ``[B, T]`` or None.
        padding_side: Where to pad the spliced sequences (``left`` for generation).
        max_length: Truncate each spliced sequence to this many positions (the original's
            ``tokenizer_model_max_length``); None keeps everything.

    Returns:
        The spliced batch.

    Raises:
        ImagePlaceholderMismatch: If the number of images is neither the number of placeholders nor that plus one
            per text-only row.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    batch_size = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()

    per_row = count_placeholders(input_ids.masked_fill(~attention_mask, 0))
    num_placeholders = sum(per_row)
    num_text_only = sum(1 for n in per_row if n == 0)
    if len(image_features) == num_placeholders:
        dummy_per_text_row = False
    elif len(image_features) == num_placeholders + num_text_only and num_text_only > 0:
        dummy_per_text_row = True
    else:
        raise ImagePlaceholderMismatch(
            f"Image features and image tokens do not match: {len(image_features)} image(s) for "
            f"{num_placeholders} <image> placeholder(s) (per prompt: {per_row}). Give exactly one image per "
            "<image> in the prompt."
        )

    # Sentinels are not vocabulary ids: embed a valid id there, the rows are replaced below anyway.
    text_embeds = embed_tokens(input_ids.clamp(min=0))
    hidden = text_embeds.shape[-1]
    device, dtype = text_embeds.device, text_embeds.dtype

    rows_embeds: list[torch.Tensor] = []
    rows_labels: list[torch.Tensor] = []
    next_image = 0
    for b in range(batch_size):
        keep = attention_mask[b]
        ids = input_ids[b][keep]
        embeds = text_embeds[b][keep]
        row_labels = labels[b][keep] if labels is not None else None
        positions = (ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0].tolist()
        pieces: list[torch.Tensor] = []
        label_pieces: list[torch.Tensor] = []
        start = 0
        for pos in positions:
            feats = image_features[next_image].to(device=device, dtype=dtype)
            next_image += 1
            if feats.dim() != 2 or feats.shape[-1] != hidden:
                raise ValueError(f"image features must be [n, {hidden}], got {tuple(feats.shape)}")
            pieces += [embeds[start:pos], feats]
            if row_labels is not None:
                label_pieces += [
                    row_labels[start:pos],
                    torch.full((feats.shape[0],), IGNORE_INDEX, dtype=row_labels.dtype, device=row_labels.device),
                ]
            start = pos + 1
        pieces.append(embeds[start:])
        if row_labels is not None:
            label_pieces.append(row_labels[start:])
        if not positions and dummy_per_text_row:
            # Zero-length slice: the dummy image joins the graph without changing the sequence.
            pieces.append(image_features[next_image].to(device=device, dtype=dtype)[:0])
            next_image += 1
        row = torch.cat(pieces, dim=0)
        row_lab = torch.cat(label_pieces, dim=0) if row_labels is not None else None
        if max_length is not None:
            row = row[:max_length]
            row_lab = row_lab[:max_length] if row_lab is not None else None
        rows_embeds.append(row)
        if row_lab is not None:
            rows_labels.append(row_lab)

    length = max(r.shape[0] for r in rows_embeds)
    out_embeds = torch.zeros(batch_size, length, hidden, device=device, dtype=dtype)
    out_mask = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    out_pos = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    out_labels = (
        torch.full((batch_size, length), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        if labels is not None
        else None
    )
    for b, row in enumerate(rows_embeds):
        n = row.shape[0]
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        out_embeds[b, span] = row
        out_mask[b, span] = 1
        out_pos[b, span] = torch.arange(n, device=device)
        if out_labels is not None:
            out_labels[b, span] = rows_labels[b]
    return SplicedInputs(inputs_embeds=out_embeds, attention_mask=out_mask, position_ids=out_pos, labels=out_labels)
