"""Length-grouped sampling for ``--group_by_modality_length`` (LLaVA/PALO training).

Padding is the main waste in a batch of conversations whose lengths vary by an order of magnitude, and mixing
image and text-only samples in one step makes some ranks run the vision tower while others idle. The sampler
therefore orders a dataset so that:

* every *global batch* (``world_size * batch_size`` consecutive indices, one ``batch_size`` chunk per rank) holds
  samples of a single modality — except one final batch that merges the leftovers of both modalities;
* within a global batch, samples are sorted by length and dealt to ranks so that each rank gets roughly the same
  total length (ranks wait for the slowest one, so balance matters more than per-rank homogeneity).

Lengths follow the dataset's ``modality_lengths`` convention: positive for samples with an image, negative for
text-only ones, never zero.

The algorithm and the order of its random draws are LLaVA's, so the same torch seed gives the same order; the
``generator``, when given, is used for every draw (docs/compat.md#training).

Typical use from a Trainer, where ``world_size`` counts every micro-batch that makes up one optimizer step::

    LengthGroupedSampler(
        batch_size=args.per_device_train_batch_size,
        world_size=args.world_size * args.gradient_accumulation_steps,
        lengths=train_dataset.modality_lengths,
        group_by_modality=True,
    )
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = [
    "LengthGroupedSampler",
    "PackedStepSampler",
    "plan_rows",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "split_to_even_chunks",
]


def _check_sizes(batch_size: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split indices into ``num_chunks`` chunks of equal size and roughly equal total length.

    Greedy: each index (in the given order, normally longest first) goes to the chunk with the smallest total so
    far, ties going to the lowest chunk number; a chunk that reaches its quota stops taking indices. When the
    indices cannot be split into equal-sized chunks (only the last, partial megabatch), chunks are strided
    instead: ``indices[i::num_chunks]``.

    Args:
        indices: Indices into ``lengths``, typically sorted by length descending.
        lengths: Non-negative length of each sample, indexed by the values in ``indices``.
        num_chunks: Number of chunks (ranks).

    Returns:
        ``num_chunks`` lists; each keeps the relative order of ``indices``.
    """
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]

    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals: list[float] = [0] * num_chunks
    for index in indices:
        lightest = totals.index(min(totals))
        chunks[lightest].append(index)
        totals[lightest] += lengths[index]
        if len(chunks[lightest]) == per_chunk:
            # A full chunk must never be picked again, whatever its total.
            totals[lightest] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Order sample indices so that each megabatch is length-sorted and balanced across ranks.

    The indices are randomly permuted, cut into megabatches of ``world_size * batch_size`` (the last one may be
    partial), each megabatch is sorted by length descending and split into ``world_size`` chunks by
    :func:`split_to_even_chunks`; the result is the concatenation of all chunks.

    This is the single-modality path; the sign of a length is ignored (absolute values are used), so an all
    text-only dataset in the ``modality_lengths`` convention is grouped correctly.

    Args:
        lengths: Length of each sample (sign ignored).
        batch_size: Per-device batch size.
        world_size: Number of batch-size chunks per global batch (ranks times gradient-accumulation steps).
        generator: Source of randomness; ``None`` uses torch's global RNG (seeded by the Trainer).

    Returns:
        A permutation of ``range(len(lengths))``.

    Raises:
        ValueError: If ``batch_size`` or ``world_size`` is below 1.
    """
    _check_sizes(batch_size, world_size)
    sizes = [abs(length) for length in lengths]
    permutation = torch.randperm(len(sizes), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    ordered: list[int] = []
    for start in range(0, len(permutation), megabatch_size):
        # Stable sort: among equal lengths the random order is kept.
        megabatch = sorted(permutation[start : start + megabatch_size], key=lambda i: sizes[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, sizes, world_size):
            ordered.extend(chunk)
    return ordered


def modality_length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Order sample indices so that every global batch is single-modality and length-homogeneous.

    Image samples (positive length) and text-only samples (negative length) are each ordered by
    :func:`length_grouped_indices` and cut into megabatches of ``world_size * batch_size``. All megabatches
    except the last of each modality are shuffled together; the two last ones (partial unless the modality's
    count divides evenly — the original keeps even a full last megabatch back) are merged into one final batch,
    sorted by index. If every sample has the same modality this falls back to :func:`length_grouped_indices`.

    Args:
        lengths: Per-sample length, positive for samples with an image, negative for text-only ones.
        batch_size: Per-device batch size.
        world_size: Number of batch-size chunks per global batch (ranks times gradient-accumulation steps).
        generator: Source of randomness; ``None`` uses torch's global RNG (seeded by the Trainer).

    Returns:
        A permutation of ``range(len(lengths))``.

    Raises:
        ValueError: If a length is zero (its modality is undefined), or ``batch_size`` / ``world_size`` < 1.
    """
    _check_sizes(batch_size, world_size)
    if any(length == 0 for length in lengths):
        raise ValueError("lengths must be non-zero: positive for image samples, negative for text-only samples")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)

    image_ids = [i for i, length in enumerate(lengths) if length > 0]
    text_ids = [i for i, length in enumerate(lengths) if length < 0]
    # Image modality first, then text: the order of random draws matches the original implementation.
    image_order = [
        image_ids[i]
        for i in length_grouped_indices([lengths[i] for i in image_ids], batch_size, world_size, generator)
    ]
    text_order = [
        text_ids[i] for i in length_grouped_indices([lengths[i] for i in text_ids], batch_size, world_size, generator)
    ]

    megabatch_size = world_size * batch_size
    image_megabatches = [image_order[i : i + megabatch_size] for i in range(0, len(image_order), megabatch_size)]
    text_megabatches = [text_order[i : i + megabatch_size] for i in range(0, len(text_order), megabatch_size)]

    leftover = image_megabatches[-1] + text_megabatches[-1]
    megabatches = image_megabatches[:-1] + text_megabatches[:-1]
    shuffle = torch.randperm(len(megabatches), generator=generator).tolist()
    ordered = [i for m in shuffle for i in megabatches[m]]
    # The mixed leftover goes last, so it is the only global batch with both modalities.
    ordered.extend(sorted(leftover))
    return ordered


class LengthGroupedSampler(Sampler[int]):
    """Sampler yielding a fresh length-grouped order of the dataset on every iteration (epoch).

    Each ``__iter__`` draws new random numbers from ``generator`` (or from torch's global RNG when it is
    ``None``), so epochs differ while a fixed seed makes the whole run reproducible.

    Args:
        batch_size: Per-device batch size.
        world_size: Number of batch-size chunks per global batch (ranks times gradient-accumulation steps).
        lengths: Per-sample lengths; with ``group_by_modality``, positive for image samples and negative for
            text-only ones (the dataset's ``modality_lengths``).
        group_by_modality: Keep global batches single-modality (:func:`modality_length_grouped_indices`);
            otherwise group by length only (:func:`length_grouped_indices`).
        generator: Source of randomness; ``None`` uses torch's global RNG.
        seed: If given, each epoch's order comes from a generator seeded with ``seed + epoch`` (see
            :meth:`set_epoch`) and nothing else: a run resumed mid-training sees exactly the order the
            uninterrupted run saw, whatever the global RNG went through before. Overrides ``generator``.

    Raises:
        ValueError: If ``lengths`` is missing, or ``batch_size`` / ``world_size`` < 1.
    """

    def __init__(
        self,
        batch_size: int,
        world_size: int,
        lengths: Sequence[int] | None = None,
        group_by_modality: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs the per-sample lengths")
        _check_sizes(batch_size, world_size)
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality
        self.generator = generator
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = modality_length_grouped_indices if self.group_by_modality else length_grouped_indices
        generator = self.generator
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(order(self.lengths, self.batch_size, self.world_size, generator))


def plan_rows(lengths: Sequence[int], capacity: int, order: Sequence[int], window: int = 4096) -> list[list[int]]:
    """Fill rows of ``capacity`` positions with samples, nearly full: best-fit decreasing within windows.

    ``order`` (a permutation of the sample indices) is cut into windows of ``window`` samples; in each, samples go
    longest first into the row whose free space fits them most tightly, or open a new row. Across a window of
    thousands of conversations only its last few rows stay partly empty, so padding is a small fraction of the
    positions. A sample of ``capacity`` positions or more has a row of its own.

    Args:
        lengths: Positions of each sample (images spliced in).
        capacity: Positions per row (``--model_max_length``).
        order: The order samples are taken in (the randomness of the plan).
        window: Samples packed together; larger packs tighter and costs ``O(window log window)`` each.

    Returns:
        Rows of sample indices; every index of ``order`` in exactly one row.
    """
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])  # stable: ties keep ``order``
        free: list[tuple[int, int]] = []  # (free positions, row) of this window's open rows, sorted
        for i in chunk:
            need = max(int(lengths[i]), 1)
            if need >= capacity:
                rows.append([i])
                continue
            k = bisect.bisect_left(free, (need, -1))
            if k == len(free):
                rows.append([i])
                bisect.insort(free, (capacity - need, len(rows) - 1))
            else:
                space, row = free.pop(k)
                rows[row].append(i)
                if space - need > 0:
                    bisect.insort(free, (space - need, row))
    return rows


# Steps whose rows are sorted by length together (see PackedStepSampler.steps).
STEP_WINDOW = 32


class PackedStepSampler:
    """A batch sampler for ``--packing True --packing_rows R``: each step is ``R`` nearly full rows.

    Without it, a packed step holds ``per_device_train_batch_size`` samples, whatever rows they fill; here the
    whole dataset is planned into rows of ``capacity`` positions once (:func:`plan_rows`, seeded), and every epoch
    deals the rows, in a fresh seeded order, into steps of ``R`` rows of similar length: the number of samples per
    step varies, the positions per step hardly do, and padding is what separates a step's rows from its longest
    one. Every sample is seen once per epoch.

    It yields the same global list of steps on every rank; accelerate deals them to the ranks (and pads the last
    round with the first steps, as for any batch sampler). Each step is a list of ``(sample index, row)`` keys for
    :class:`palo.train.dataset.RowTaggedDataset`, so the collator keeps the planned rows.

    Args:
        lengths: Spliced length of each sample (``LazySupervisedDataset.token_lengths``).
        capacity: Positions per row (``--model_max_length``).
        rows_per_step: Rows per step and device (``--packing_rows``).
        seed: The plan and each epoch's order come from ``seed`` (and the epoch) only, so a resumed run sees the
            steps the uninterrupted run saw.
        window: See :func:`plan_rows`.

    Raises:
        ValueError: If ``rows_per_step`` or ``capacity`` is below 1, or there are no samples.
    """

    def __init__(self, lengths: Sequence[int], capacity: int, rows_per_step: int, seed: int = 0,
                 window: int = 4096) -> None:
        if rows_per_step < 1 or capacity < 1:
            raise ValueError(f"rows_per_step and capacity must be at least 1, got {rows_per_step} and {capacity}")
        if len(lengths) == 0:
            raise ValueError("no samples to pack")
        self.capacity = capacity
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.epoch = 0
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.rows = plan_rows(lengths, capacity, order, window)
        self.lengths = [int(n) for n in lengths]
        self.row_lengths = [sum(min(self.lengths[i], capacity) for i in row) for row in self.rows]

    @property
    def sampler(self) -> PackedStepSampler:
        """Itself: accelerate forwards ``set_epoch`` to ``batch_sampler.sampler`` through its wrappers."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order :meth:`__iter__` yields (called by the Trainer and by :class:`EpochCallback`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.rows_per_step)

    def steps(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Epoch ``epoch``'s steps: the planned rows in a seeded order, ``rows_per_step`` at a time.

        A batch is as wide as its longest row, so rows of similar length go together: the rows are shuffled, taken
        ``STEP_WINDOW`` steps' worth at a time, sorted by length within that window and cut into steps; then the
        steps are shuffled. Which rows share a step changes every epoch; the width a step pads to hardly exceeds
        its rows.
        """
        generator = torch.Generator().manual_seed(self.seed + 1 + epoch)
        order = torch.randperm(len(self.rows), generator=generator).tolist()
        window = self.rows_per_step * STEP_WINDOW
        grouped: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda r: -self.row_lengths[r])
            grouped.extend(chunk[k:k + self.rows_per_step] for k in range(0, len(chunk), self.rows_per_step))
        steps = []
        for s in torch.randperm(len(grouped), generator=generator).tolist():
            steps.append([(i, k) for k, r in enumerate(grouped[s]) for i in self.rows[r]])
        return steps

    def padding_fraction(self) -> float:
        """Padding among all positions of the batches (each ``rows_per_step`` x its longest row), over one epoch."""
        real = padded = 0
        for step in self.steps(self.epoch):
            loads: dict[int, int] = {}
            for i, k in step:
                loads[k] = loads.get(k, 0) + min(self.lengths[i], self.capacity)
            real += sum(loads.values())
            padded += len(loads) * max(loads.values())
        return 1 - real / padded

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.steps(self.epoch))
