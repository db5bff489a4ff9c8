"""The one contract for putting image features into a token sequence.

Training, evaluation and serving all go through here: each ``IMAGE_TOKEN_INDEX`` (-200) in ``input_ids`` is
replaced by the rows of the next image's projected features, whose labels are ``IGNORE_INDEX``. A mismatch
between images and placeholders fails loudly instead of silently mis-aligning them.

The work is split in two so that a GPU never waits on the host:

1. :func:`plan_splice` reads ``input_ids`` and the attention mask on the host (the only device-to-host copy, made
   before the vision tower is launched) and decides where every text token and image row goes;
2. :func:`apply_splice` builds the batch with two indexed copies on the device, with no further synchronisation.

Packed batches (training with ``--packing``) hold several samples per row. They go through the same two steps: given
the rows' ``position_ids`` (0 where each sample starts), the plan restarts the spliced positions at the same samples,
an image's rows belonging to the sample of its placeholder, and numbers each row's padding tail from 0 as a sample
of its own. The positions alone then say which positions may attend to which, which is how transformers builds a
document mask (or flash-attn's varlen boundaries) when it is given no attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
        padded: Whether any position is padding. When not, the language model can be given no mask at all, which
            keeps it on its fast causal path (a mask of ones makes it check the mask on the device first).
        packed: Rows hold several samples (and padding numbered as a sample of its own): the language model must be
            given ``position_ids`` and no attention mask, so that it masks by sample.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    padded: bool = True
    packed: bool = False


@dataclass
class SplicePlan:
    """Where every position of the spliced batch comes from (host-side index lists).

    Attributes:
        batch_size: B.
        length: L, the padded length of the spliced batch.
        text_src: Flat indices ``b * T + t`` of the text tokens kept, in output order.
        text_dst: Flat output indices ``b * L + j`` of those tokens.
        image_src: Flat indices ``i * n + r`` into the stacked image features ``[N * n, D]``.
        image_dst: Flat output indices of those image rows.
        real_dst: Flat output indices of every real (non-padding) position.
        positions: Position id of each entry of ``real_dst``.
        pad_dst: Packed plans only: flat output indices of the padding.
        pad_positions: Packed plans only: position id of each entry of ``pad_dst`` (each row's tail counts from 0).
        dummy_images: Images given to text-only rows (training batches), used only to keep them in the graph.
        num_images: N.
        tokens_per_image: n.
    """

    batch_size: int
    length: int
    text_src: list[int]
    text_dst: list[int]
    image_src: list[int]
    image_dst: list[int]
    real_dst: list[int]
    positions: list[int]
    dummy_images: list[int]
    num_images: int
    tokens_per_image: int
    pad_dst: list[int] = field(default_factory=list)
    pad_positions: list[int] = field(default_factory=list)
    packed: bool = False


def spliced_length(input_ids: torch.Tensor | Sequence[int], tokens_per_image: int) -> int:
    """Positions one prompt takes once its images are spliced in: each sentinel becomes ``tokens_per_image`` rows.

    That is ``len(input_ids) + images * (tokens_per_image - 1)``: the sentinel itself is replaced, not kept. Every
    length check before generation or training (context budgets, truncation, packing) uses this, so none can count
    the sentinel as well as the image rows.

    Args:
        input_ids: One prompt's ids (a list or a 1-D tensor) with ``IMAGE_TOKEN_INDEX`` where each image goes.
        tokens_per_image: Rows one image takes (``MultimodalSpec.tokens_per_image``; 0 for text-only models,
            whose prompts have no sentinel).

    Returns:
        The spliced length, as :func:`plan_splice` lays the prompt out (before any ``max_length`` truncation).
    """
    if isinstance(input_ids, torch.Tensor):
        images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        length = int(input_ids.numel())
    else:
        images = sum(1 for token in input_ids if token == IMAGE_TOKEN_INDEX)
        length = len(input_ids)
    return length + images * (tokens_per_image - 1)


def ids_within(input_ids: torch.Tensor, tokens_per_image: int, positions: int) -> int:
    """How many leading ids of one prompt start within its first ``positions`` spliced positions.

    Where truncating the spliced sequence to ``positions`` (the model's ``max_length``) cuts the prompt: cutting its
    ids there beforehand leaves the model nothing to drop but, at most, the last rows of an image that starts inside
    and ends past the limit (rows that carry no label).

    Args:
        input_ids: ``[T]`` one prompt's ids, ``IMAGE_TOKEN_INDEX`` where each image goes.
        tokens_per_image: Rows one image takes.
        positions: The spliced positions to keep.

    Returns:
        The number of ids to keep (``T`` when the whole prompt fits).
    """
    widths = torch.where(input_ids == IMAGE_TOKEN_INDEX, tokens_per_image, 1)
    starts = widths.cumsum(0) - widths  # the spliced position each id starts at, increasing
    return int((starts < positions).sum())


def no_room_for_answer(input_ids: torch.Tensor | Sequence[int], tokens_per_image: int, positions: int) -> str | None:
    """Why a prompt cannot be answered within the model's ``positions`` (its spliced length fills them), or None.

    For the tools that generate with ``model.generate`` (which would run past the positions) or report per question
    before the engine sees the prompt.
    """
    length = spliced_length(input_ids, tokens_per_image)
    if length < positions:
        return None
    images = sum(1 for token in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)
                 if token == IMAGE_TOKEN_INDEX)
    return (f"the prompt takes {length} of the model's {positions} positions ({images} image(s)); no room is left "
            "for an answer")


def plan_splice(
    input_ids: torch.Tensor,
    num_images: int,
    tokens_per_image: int,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> SplicePlan:
    """Decide the layout of the spliced batch.

    Images are consumed in order: row 0's placeholders first, left to right, then row 1's, and so on. For training
    batches that mix image and text-only samples, each text-only row may also be given one (dummy) image, which it
    consumes without using.

    Args:
        input_ids: ``[B, T]`` with ``IMAGE_TOKEN_INDEX`` at image positions.
        num_images: N, the number of images given.
        tokens_per_image: n, rows per image after the projector (576, or 144 with LDP).
        attention_mask: ``[B, T]``; 0 marks padding. None means no padding.
        padding_side: Where to pad the spliced sequences (``left`` for generation).
        max_length: Truncate each spliced sequence to this many positions (the original's
            ``tokenizer_model_max_length``); None keeps everything.
        position_ids: ``[B, T]`` for a packed batch: 0 at the first token of each sample, counting up within it.
            The spliced positions then restart at the same samples and the padding is numbered as a sample of its
            own (see the module docstring). Right padding only. None: one sample per row.

    Returns:
        The plan.

    Raises:
        ImagePlaceholderMismatch: If N is neither the number of placeholders nor that plus one per text-only row.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    packed = position_ids is not None
    if packed and padding_side != "right":
        raise ValueError("packed batches are padded on the right")
    ids = input_ids.detach().to("cpu")
    mask = (attention_mask.detach().to("cpu").bool() if attention_mask is not None
            else torch.ones_like(ids, dtype=torch.bool))
    batch_size, width = ids.shape
    rows = [ids[b][mask[b]].tolist() for b in range(batch_size)]
    kept = [mask[b].nonzero(as_tuple=True)[0].tolist() for b in range(batch_size)]
    if packed:
        starts = position_ids.detach().to("cpu") == 0
        row_starts = [starts[b][mask[b]].tolist() for b in range(batch_size)]
    per_row = [row.count(IMAGE_TOKEN_INDEX) for row in rows]
    num_placeholders = sum(per_row)
    text_only_rows = [b for b, n in enumerate(per_row) if n == 0]
    if num_images == num_placeholders:
        dummy_rows: set[int] = set()
    elif text_only_rows and num_images == num_placeholders + len(text_only_rows):
        dummy_rows = set(text_only_rows)
    else:
        raise ImagePlaceholderMismatch(
            f"Image features and image tokens do not match: {num_images} image(s) for {num_placeholders} <image> "
            f"placeholder(s) (per prompt: {per_row}). Give exactly one image per <image> in the prompt."
        )

    # Per row: the source of each output position, as ("t", flat text index) or ("i", flat image-row index).
    layouts: list[tuple[list[int], list[int]]] = []  # (text (src, local pos) pairs, image (src, local pos) pairs)
    lengths: list[int] = []
    dummy_images: list[int] = []
    sample_starts: list[list[int]] = []  # per row: the spliced index where each sample starts (packed plans)
    next_image = 0
    for b in range(batch_size):
        text: list[tuple[int, int]] = []
        image: list[tuple[int, int]] = []
        pos = 0
        row_sample_starts = [0]
        for k, (token, t) in enumerate(zip(rows[b], kept[b])):
            if packed and k > 0 and row_starts[b][k]:
                row_sample_starts.append(pos)
            if token == IMAGE_TOKEN_INDEX:
                base = next_image * tokens_per_image
                image.extend((base + r, pos + r) for r in range(tokens_per_image))
                pos += tokens_per_image
                next_image += 1
            else:
                text.append((b * width + t, pos))
                pos += 1
        if b in dummy_rows:
            dummy_images.append(next_image)
            next_image += 1
        if max_length is not None and pos > max_length:
            text = [x for x in text if x[1] < max_length]
            image = [x for x in image if x[1] < max_length]
            pos = max_length
        layouts.append((text, image))
        lengths.append(pos)
        sample_starts.append(row_sample_starts)

    length = max(lengths) if lengths else 0
    plan = SplicePlan(batch_size, length, [], [], [], [], [], [], dummy_images, num_images, tokens_per_image,
                      packed=packed)
    for b, ((text, image), n) in enumerate(zip(layouts, lengths)):
        offset = b * length + (length - n if padding_side == "left" else 0)
        plan.text_src += [src for src, _ in text]
        plan.text_dst += [offset + p for _, p in text]
        plan.image_src += [src for src, _ in image]
        plan.image_dst += [offset + p for _, p in image]
        plan.real_dst += range(offset, offset + n)
        if packed:
            bounds = [s for s in sample_starts[b] if s < n] + [n]
            for start, stop in zip(bounds, bounds[1:]):
                plan.positions += range(stop - start)
            plan.pad_dst += range(offset + n, offset + length)
            plan.pad_positions += range(length - n)
        else:
            plan.positions += range(n)
    return plan


def apply_splice(
    plan: SplicePlan,
    input_ids: torch.Tensor,
    image_features: torch.Tensor | Sequence[torch.Tensor],
    embed_tokens: nn.Module,
    labels: torch.Tensor | None = None,
) -> SplicedInputs:
    """Build the spliced batch on the device of ``input_ids``.

    Args:
        plan: From :func:`plan_splice` for the same ``input_ids``.
        input_ids: ``[B, T]``.
        image_features: ``[N, n, D]``, or N tensors ``[n, D]``.
        embed_tokens: The language model's input embedding.
        labels: ``[B, T]`` or None.

    Returns:
        The spliced batch.
    """
    # Sentinels are not vocabulary ids: embed a valid id there; those rows are never copied.
    text_embeds = embed_tokens(input_ids.clamp(min=0))
    device, dtype, hidden = text_embeds.device, text_embeds.dtype, text_embeds.shape[-1]
    if not isinstance(image_features, torch.Tensor):
        image_features = (torch.stack(list(image_features)) if len(image_features)
                          else text_embeds.new_zeros(0, plan.tokens_per_image, hidden))
    if image_features.shape[0] != plan.num_images or image_features.shape[1:] != (plan.tokens_per_image, hidden):
        raise ValueError(
            f"image features must be [{plan.num_images}, {plan.tokens_per_image}, {hidden}], "
            f"got {tuple(image_features.shape)}"
        )
    features = image_features.to(device=device, dtype=dtype).reshape(-1, hidden)

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    batch_size, length = plan.batch_size, plan.length
    flat = text_embeds.new_zeros(batch_size * length, hidden)
    flat[index(plan.text_dst)] = text_embeds.reshape(-1, hidden)[index(plan.text_src)]
    if plan.image_dst:
        flat[index(plan.image_dst)] = features[index(plan.image_src)]
    inputs_embeds = flat.view(batch_size, length, hidden)
    if plan.dummy_images:
        # A dummy image joins the graph with zero weight, so every projector parameter gets a gradient on every
        # rank even in a batch of text-only samples (distributed training needs that).
        dummy = image_features[plan.dummy_images].to(device=device, dtype=dtype)
        inputs_embeds = inputs_embeds + (dummy * 0).sum()  # weighted first: a float16 sum can overflow to inf

    real = index(plan.real_dst)
    attention_mask = torch.zeros(batch_size * length, dtype=torch.long, device=device)
    attention_mask[real] = 1
    position_ids = torch.zeros(batch_size * length, dtype=torch.long, device=device)
    position_ids[real] = index(plan.positions)
    if plan.pad_dst:
        position_ids[index(plan.pad_dst)] = index(plan.pad_positions)
    spliced_labels = None
    if labels is not None:
        spliced_labels = torch.full((batch_size * length,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        spliced_labels[index(plan.text_dst).to(labels.device)] = (
            labels.reshape(-1)[index(plan.text_src).to(labels.device)]
        )
        spliced_labels = spliced_labels.view(batch_size, length)
    return SplicedInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask.view(batch_size, length),
        position_ids=position_ids.view(batch_size, length),
        labels=spliced_labels,
        padded=len(plan.real_dst) != batch_size * length,
        packed=plan.packed,
    )


def splice_image_features(
    input_ids: torch.Tensor,
    image_features: torch.Tensor | Sequence[torch.Tensor],
    embed_tokens: nn.Module,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
    packed_position_ids: torch.Tensor | None = None,
) -> SplicedInputs:
    """Plan and apply in one call (see :func:`plan_splice` and :func:`apply_splice`).

    Args:
        input_ids: ``[B, T]`` token ids with ``IMAGE_TOKEN_INDEX`` at image positions.
        image_features: ``[N, n, D]`` or N tensors ``[n, D]``, in order.
        embed_tokens: The language model's input embedding.
        attention_mask: ``[B, T]``; None means no padding.
        labels: ``[B, T]`` or None.
        padding_side: ``left`` or ``right``.
        max_length: Truncation length of each spliced sequence, or None.
        packed_position_ids: ``[B, T]``, 0 where each sample of a packed row starts (``position_ids`` of
            :func:`plan_splice`); None for one sample per row.

    Returns:
        The spliced batch.
    """
    num_images = len(image_features)
    tokens = image_features[0].shape[0] if num_images else 0
    plan = plan_splice(input_ids, num_images, tokens, attention_mask, padding_side, max_length, packed_position_ids)
    return apply_splice(plan, input_ids, image_features, embed_tokens, labels)
