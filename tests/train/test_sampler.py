"""Tests for the length-grouped samplers behind ``--group_by_modality_length``."""

from __future__ import annotations

import random

import pytest
import torch

from palo.train.sampler import (
    LengthGroupedSampler,
    PackedStepSampler,
    length_grouped_indices,
    modality_length_grouped_indices,
    plan_rows,
    split_to_even_chunks,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed_lengths(n_image: int, n_text: int, seed: int = 0) -> list[int]:
    """Distinct random word counts, positive for image samples and negative for text-only ones, interleaved.

    Distinct so that sorting by length has one answer and chunk membership can be recomputed exactly.
    """
    rng = random.Random(seed)
    sizes = rng.sample(range(1, 10 * (n_image + n_text) + 10), n_image + n_text)
    lengths = sizes[:n_image] + [-x for x in sizes[n_image:]]
    rng.shuffle(lengths)
    return lengths


def _leftover_size(count: int, megabatch: int) -> int:
    # The last megabatch of a modality is held back even when it is full (original behaviour).
    return count % megabatch or megabatch


# ---------------------------------------------------------------- split_to_even_chunks (hand-computed)


def test_greedy_split_fills_the_lightest_chunk() -> None:
    lengths = [10, 9, 8, 3, 2, 1]
    # 10->c0 [10,0]; 9->c1 [10,9]; 8->c1 [10,17]; 3->c0 [13,17]; 2->c0 (now full) ; 1->c1
    chunks = split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2)
    assert chunks == [[0, 3, 4], [1, 2, 5]]
    assert [sum(lengths[i] for i in c) for c in chunks] == [15, 18]


def test_greedy_split_stops_filling_a_full_chunk() -> None:
    # Without the quota, both short samples would go to chunk 1 next to nothing; the quota keeps sizes equal.
    chunks = split_to_even_chunks([0, 1, 2, 3], [100, 1, 1, 1], 2)
    assert chunks == [[0, 3], [1, 2]]


def test_split_is_strided_when_not_divisible() -> None:
    assert split_to_even_chunks([7, 6, 5, 4, 3], [1] * 8, 2) == [[7, 5, 3], [6, 4]]


def test_one_megabatch_end_to_end_is_seed_independent() -> None:
    # A single full megabatch of distinct lengths: the shuffle is undone by the sort, so the result is fixed.
    lengths = [3, 10, 1, 8, 2, 9]
    expected = [1, 0, 4, 5, 3, 2]  # by length: 10,9,8,3,2,1 -> greedy [[10,3,2],[9,8,1]]
    for seed in range(5):
        assert length_grouped_indices(lengths, batch_size=3, world_size=2, generator=_gen(seed)) == expected


# ---------------------------------------------------------------- permutation and grouping properties


@pytest.mark.parametrize("n_image,n_text", [(20, 13), (12, 6), (1, 1), (3, 40), (50, 0), (0, 17)])
@pytest.mark.parametrize("batch_size,world_size", [(3, 2), (1, 1), (4, 3)])
def test_output_is_a_permutation(n_image: int, n_text: int, batch_size: int, world_size: int) -> None:
    lengths = _mixed_lengths(n_image, n_text)
    n = len(lengths)
    order = modality_length_grouped_indices(lengths, batch_size, world_size, _gen(1))
    assert sorted(order) == list(range(n))
    order = length_grouped_indices(lengths, batch_size, world_size, _gen(1))
    assert sorted(order) == list(range(n))


@pytest.mark.parametrize("n_image,n_text", [(20, 13), (12, 6), (31, 29), (7, 60)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_global_batch_is_single_modality(n_image: int, n_text: int, seed: int) -> None:
    batch_size, world_size = 3, 2
    megabatch = batch_size * world_size
    lengths = _mixed_lengths(n_image, n_text, seed)
    order = modality_length_grouped_indices(lengths, batch_size, world_size, _gen(seed))

    tail = _leftover_size(n_image, megabatch) + _leftover_size(n_text, megabatch)
    body, final = order[: len(order) - tail], order[len(order) - tail :]
    assert len(body) % megabatch == 0
    for start in range(0, len(body), megabatch):
        signs = {lengths[i] > 0 for i in body[start : start + megabatch]}
        assert len(signs) == 1, f"mixed global batch at {start}"
    # The merged leftover holds both modalities and is sorted by index.
    assert final == sorted(final)
    assert {lengths[i] > 0 for i in final} == {True, False}


def test_full_megabatches_of_both_modalities_are_interleaved() -> None:
    lengths = _mixed_lengths(60, 60)
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=2, generator=_gen(0))
    kinds = [lengths[order[s]] > 0 for s in range(0, 112, 4)]  # first sample of each full global batch
    assert any(kinds[i] != kinds[i + 1] for i in range(len(kinds) - 1)) and len(set(kinds)) == 2
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


@pytest.mark.parametrize("group_by_modality", [True, False])
def test_chunks_come_from_the_length_sorted_megabatch(group_by_modality: bool) -> None:
    batch_size, world_size = 4, 3
    megabatch = batch_size * world_size
    lengths = _mixed_lengths(5 * megabatch, 4 * megabatch, seed=3)
    fn = modality_length_grouped_indices if group_by_modality else length_grouped_indices
    order = fn(lengths, batch_size, world_size, _gen(3))
    n_full = len(order) // megabatch - (2 if group_by_modality else 0)  # the merged leftover is not chunked
    for m in range(n_full):
        mega = order[m * megabatch : (m + 1) * megabatch]
        chunks = [mega[c * batch_size : (c + 1) * batch_size] for c in range(world_size)]
        for chunk in chunks:
            sizes = [abs(lengths[i]) for i in chunk]
            assert sizes == sorted(sizes, reverse=True)
        # Regrouping the megabatch by length gives back the same chunks: they are the greedy split of it.
        resorted = sorted(mega, key=lambda i: abs(lengths[i]), reverse=True)
        expected = split_to_even_chunks(resorted, [abs(x) for x in lengths], world_size)
        assert [sorted(c) for c in chunks] == [sorted(c) for c in expected]


def test_a_full_last_megabatch_is_still_held_back() -> None:
    # 6 image + 6 text samples with megabatch 6: both are "last" megabatches, so all merge into one sorted batch.
    lengths = [5, -5, 4, -4, 3, -3, 2, -2, 1, -1, 6, -6]
    order = modality_length_grouped_indices(lengths, batch_size=3, world_size=2, generator=_gen(0))
    assert order == list(range(12))


# ---------------------------------------------------------------- fallbacks, determinism, errors


def test_single_modality_falls_back_to_length_grouping() -> None:
    lengths = _mixed_lengths(37, 0)
    assert modality_length_grouped_indices(lengths, 3, 2, _gen(4)) == length_grouped_indices(lengths, 3, 2, _gen(4))
    negative = [-x for x in lengths]
    # Text-only datasets are grouped by absolute length, exactly like the image-only one.
    assert modality_length_grouped_indices(negative, 3, 2, _gen(4)) == length_grouped_indices(lengths, 3, 2, _gen(4))


def test_deterministic_under_a_fixed_seed() -> None:
    lengths = _mixed_lengths(40, 25)
    a = modality_length_grouped_indices(lengths, 4, 2, _gen(7))
    b = modality_length_grouped_indices(lengths, 4, 2, _gen(7))
    c = modality_length_grouped_indices(lengths, 4, 2, _gen(8))
    assert a == b
    assert a != c


def test_global_rng_is_used_without_a_generator() -> None:
    lengths = _mixed_lengths(40, 25)
    torch.manual_seed(11)
    a = modality_length_grouped_indices(lengths, 4, 2, None)
    torch.manual_seed(11)
    b = modality_length_grouped_indices(lengths, 4, 2, None)
    assert a == b


def test_rejects_zero_length_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0, -2], 1, 1, None)
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_indices([1, 2], 0, 1, None)
    with pytest.raises(ValueError, match="world_size"):
        LengthGroupedSampler(batch_size=1, world_size=0, lengths=[1])
    with pytest.raises(ValueError, match="lengths"):
        LengthGroupedSampler(batch_size=1, world_size=1)


def test_empty_dataset() -> None:
    assert length_grouped_indices([], 2, 2, _gen(0)) == []
    assert modality_length_grouped_indices([], 2, 2, _gen(0)) == []


# ---------------------------------------------------------------- the Sampler


@pytest.mark.parametrize("group_by_modality", [True, False])
def test_sampler_yields_a_fresh_permutation_each_epoch(group_by_modality: bool) -> None:
    lengths = _mixed_lengths(30, 30)
    sampler = LengthGroupedSampler(4, 2, lengths, group_by_modality=group_by_modality, generator=_gen(5))
    assert len(sampler) == 60
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(60))
    assert first != second

    fn = modality_length_grouped_indices if group_by_modality else length_grouped_indices
    assert first == fn(lengths, 4, 2, _gen(5))
    replay = LengthGroupedSampler(4, 2, lengths, group_by_modality=group_by_modality, generator=_gen(5))
    assert [list(replay), list(replay)] == [first, second]


def test_sampler_drives_a_dataloader() -> None:
    lengths = _mixed_lengths(10, 7)
    sampler = LengthGroupedSampler(2, 2, lengths, group_by_modality=True, generator=_gen(0))
    loader = torch.utils.data.DataLoader(list(range(17)), batch_size=2, sampler=sampler)
    seen = torch.cat(list(loader)).tolist()
    assert sorted(seen) == list(range(17))


def test_seeded_sampler_order_depends_only_on_seed_and_epoch():
    lengths = [5, -3, 7, -2, 4, 6, -8, 9, 1, -1, 3, 2]
    sampler = LengthGroupedSampler(batch_size=2, world_size=2, lengths=lengths, group_by_modality=True, seed=11)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(12345)  # a resumed run's global RNG is elsewhere: the order must not care
    torch.rand(100)
    again = LengthGroupedSampler(batch_size=2, world_size=2, lengths=lengths, group_by_modality=True, seed=11)
    again.set_epoch(1)
    assert list(again) == first
    again.set_epoch(2)
    assert list(again) != first and sorted(again) == sorted(first)


# -- --packing_rows: rows planned over the dataset -----------------------------------------------------------------
def _llava_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Spliced lengths like LLaVA-665K at CLIP-L/336 (576 image rows): mostly short image questions, some long
    multi-turn image conversations, some text-only chats."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.rand(n, generator=g).tolist()
    out = []
    for u in kinds:
        if u < 0.60:
            low, high = 576 + 30, 576 + 120
        elif u < 0.85:
            low, high = 576 + 150, 576 + 900
        elif u < 0.95:
            low, high = 300, 1500
        else:
            low, high = 20, 80
        out.append(int(torch.randint(low, high + 1, (1,), generator=g)))
    return out


def test_plan_rows_puts_every_sample_in_one_row_within_capacity():
    lengths = [5, 9, 3, 12, 7, 1, 10, 4, 4, 20]
    rows = plan_rows(lengths, 12, list(range(len(lengths))), window=4)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= 12
    assert [9] in rows and [3] in rows  # at or over capacity: a row of its own


def test_packed_steps_cover_each_sample_once_per_epoch_and_reshuffle():
    lengths = _llava_like_lengths(600)
    sampler = PackedStepSampler(lengths, capacity=2048, rows_per_step=4, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        steps = list(sampler)
        assert len(steps) == len(sampler)
        keys = [key for step in steps for key in step]
        assert sorted(i for i, _ in keys) == list(range(len(lengths)))
        for step in steps:
            rows = {}
            for i, k in step:
                rows.setdefault(k, []).append(i)
            assert len(rows) <= 4
            assert all(len(r) == 1 or sum(lengths[i] for i in r) <= 2048 for r in rows.values())
        epochs.append(steps)
    assert epochs[0] != epochs[1]
    again = PackedStepSampler(lengths, capacity=2048, rows_per_step=4, seed=3)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # the seed and the epoch decide, nothing else


def test_packed_steps_waste_under_two_percent_on_a_llava_like_mix():
    """The training-throughput target: padding under 2 % of the positions of LLaVA-665K-like steps, where
    --packing alone (16 samples a step) left 11 % (docs/benchmarks.md)."""
    sampler = PackedStepSampler(_llava_like_lengths(20000), capacity=2048, rows_per_step=8, seed=0)
    assert sampler.padding_fraction() < 0.02


def test_packed_steps_reach_set_epoch_and_two_ranks_through_accelerate():
    """accelerate deals the global steps to ranks (steps of any size) and forwards set_epoch to the sampler."""
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    lengths = _llava_like_lengths(300, seed=1)
    sampler = PackedStepSampler(lengths, capacity=2048, rows_per_step=2, seed=5)
    sampler.set_epoch(2)
    ranks = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    seen = {i for steps in ranks for step in steps for i, _ in step}
    assert seen == set(range(len(lengths)))
    for wrapped in (sampler, SkipBatchSampler(sampler, 1)):
        sampler.set_epoch(0)
        target = getattr(wrapped, "batch_sampler", wrapped)
        target.sampler.set_epoch(4)  # the attribute path accelerate's DataLoaderShard.set_epoch takes
        assert sampler.epoch == 4
