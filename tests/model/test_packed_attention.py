"""Packed batches through the one splice contract and the language model: positions restart per sample and no
position attends across samples, for every attention kernel available on this machine."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from palo.constants import IGNORE_INDEX
from palo.constants import IMAGE_TOKEN_INDEX as IMG
from palo.model.builder import load_pretrained_model
from palo.model.multimodal import splice_image_features
from palo.testing import tiny_data
from palo.train.dataset import DataCollator, LazySupervisedDataset, PackedDataCollator
from palo.train.trainer import PaloTrainer

D = 4


def test_plan_restarts_positions_per_sample_and_numbers_the_padding():
    table = nn.Embedding(50, D)
    # Row 0: a 3-token sample with an image (3 rows each), then a 2-token sample; row 1: one 2-token sample + padding.
    ids = torch.tensor([[5, IMG, 6, 7, 8], [9, 10, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]])
    out = splice_image_features(ids, [torch.zeros(3, D)], table, attention_mask=mask, packed_position_ids=positions)
    assert out.packed
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert out.attention_mask.tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    # Without packing the same rows are one sample each.
    plain = splice_image_features(ids, [torch.zeros(3, D)], table, attention_mask=mask)
    assert plain.position_ids.tolist() == [list(range(7)), [0, 1, 0, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def loaded(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    return tokenizer, model.eval(), processor


@pytest.fixture(scope="module")
def items(loaded, tmp_path_factory):
    tokenizer, model, processor = loaded
    data = tiny_data.write_dataset(str(tmp_path_factory.mktemp("packdata")), num_samples=12)
    dataset = LazySupervisedDataset(data, tokenizer, "v1", image_folder=os.path.join(os.path.dirname(data), "images"),
                                    image_processor=processor, image_aspect_ratio="pad", model_max_length=512,
                                    image_tokens=model.image_token_count)
    return [dataset[i] for i in range(len(dataset))]  # image and text-only samples, single- and multi-turn


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Per-token cross-entropy of each sample's answer tokens, in order."""
    target, mask = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    losses = nn.functional.cross_entropy(logits[:, :-1][mask], target[mask], reduction="none")
    owner = samples[:, 1:][mask]
    return [losses[owner == i] for i in range(count)]


def _alone(model, item) -> tuple[torch.Tensor, torch.Tensor]:
    images = item["image"][None] if "image" in item else None
    out = model(input_ids=item["input_ids"][None], labels=item["labels"][None], images=images)
    return out.logits, out.spliced_labels


def _packed(model, items, max_length=256):
    collator = PackedDataCollator(pad_token_id=0, max_length=max_length, image_tokens=model.image_token_count)
    batch = collator(items)
    batch.pop("languages")
    out = model(**batch)
    samples = PaloTrainer._sample_of_position(out.spliced_attention_mask, out.spliced_position_ids)
    return batch, out, samples


# FlexAttention compiles a kernel per new shape, which on CPU takes ~4-10 s each; so each sample's lone run (the
# reference: one sample, nothing to separate) is computed once with SDPA and shared by every kernel's packed run.
# (flash_attention_2 needs CUDA and half precision, where 1e-5 does not hold; the flattening of packed rows around
# its varlen kernel is tested below with an exact PyTorch stand-in for the kernel.)
@pytest.fixture(scope="module")
def alone_losses(loaded, items):
    """Per-token losses of each sample run alone (SDPA), by dataset index."""
    _, model, _ = loaded
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        losses = []
        for item in items:
            logits, labels = _alone(model, item)
            losses.append(_token_losses(logits, labels, torch.zeros_like(labels), 1)[0])
    assert all(len(x) > 0 for x in losses)
    return losses


@pytest.mark.parametrize("implementation", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
@torch.no_grad()
def test_packed_per_token_loss_equals_each_sample_run_alone(loaded, items, alone_losses, implementation):
    _, model, _ = loaded
    model.set_attn_implementation(implementation)
    try:
        batch, out, samples = _packed(model, items)
        assert batch["input_ids"].shape[0] < len(items)  # really packed: several samples share rows
        packed = _token_losses(out.logits, out.spliced_labels, samples, len(items))
        order = [i for row in _ROWS for i in row]
        assert sorted(order) == list(range(len(items)))
        for k, i in enumerate(order):
            torch.testing.assert_close(packed[k], alone_losses[i], rtol=0, atol=1e-5)
        # The batch loss is the mean over every answer token of every sample, as without packing.
        torch.testing.assert_close(out.loss, torch.cat([alone_losses[i] for i in order]).mean(), rtol=0, atol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


_ROWS: list[list[int]] = []


@pytest.fixture(autouse=True)
def _record_rows(monkeypatch):
    """Record which samples the collator put in which row (the order its ``languages`` follow)."""
    import palo.train.dataset as dataset

    original = dataset.pack_rows

    def recording(lengths, capacity):
        rows = original(lengths, capacity)
        _ROWS[:] = rows
        return rows

    monkeypatch.setattr(dataset, "pack_rows", recording)


@torch.no_grad()
def test_changing_one_packed_sample_leaves_the_others_logits_unchanged(loaded, items):
    _, model, _ = loaded
    _, before, samples = _packed(model, items)
    rows = [list(r) for r in _ROWS]
    row = next(r for r in rows if len(r) >= 3)
    victim = row[1]  # in the middle of its row: samples before and after it share the row
    changed = [dict(x) for x in items]
    ids = changed[victim]["input_ids"].clone()
    text = (ids != IMG).nonzero().flatten()[1:]
    ids[text] = (ids[text] + 7) % 900 + 3  # other tokens, same length
    changed[victim]["input_ids"] = ids
    if "image" in changed[victim]:
        changed[victim]["image"] = torch.randn_like(changed[victim]["image"])
    _, after, samples_after = _packed(model, changed)
    assert [list(r) for r in _ROWS] == rows and torch.equal(samples, samples_after)
    order = [i for r in rows for i in r]
    position_sample = torch.tensor(order)[samples]  # dataset index of each position's sample
    real = before.spliced_attention_mask.bool()
    others = real & (position_sample != victim)
    mine = real & (position_sample == victim)
    assert others.sum() > 0 and mine.sum() > 0
    torch.testing.assert_close(after.logits[others], before.logits[others], rtol=0, atol=1e-6)
    assert (after.logits[mine] - before.logits[mine]).abs().max() > 1e-2  # the change itself is visible


@torch.no_grad()
def test_labels_are_identical_with_and_without_packing(loaded, items):
    _, model, _ = loaded
    batch, out, samples = _packed(model, items)
    order = [i for r in _ROWS for i in r]
    padded = DataCollator(pad_token_id=0)(items)
    padded.pop("languages")
    reference = model(**padded)
    for k, i in enumerate(order):
        real = reference.spliced_attention_mask[i].bool()
        expected = reference.spliced_labels[i][real]
        got = out.spliced_labels[(samples == k) & out.spliced_attention_mask.bool()]
        assert got.tolist() == expected.tolist()
        assert (expected != IGNORE_INDEX).any()
    # And before the splice: each sample's ids and labels are copied as they are.
    starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    flat_ids = batch["input_ids"][batch["attention_mask"].bool()]
    flat_labels = batch["labels"][batch["attention_mask"].bool()]
    assert int(starts.sum()) == len(items)
    assert flat_ids.tolist() == torch.cat([items[i]["input_ids"] for i in order]).tolist()
    assert flat_labels.tolist() == torch.cat([items[i]["labels"] for i in order]).tolist()


def test_packing_rows_respect_the_length_and_keep_over_long_samples_alone():
    from palo.train.dataset import pack_rows

    rows = pack_rows([100, 30, 250, 60, 300, 90, 10], 256)
    assert sorted(i for r in rows for i in r) == list(range(7))
    lengths = [100, 30, 250, 60, 300, 90, 10]
    for row in rows:
        assert sum(lengths[i] for i in row) <= 256 or len(row) == 1
    assert [4] in rows  # 300 > 256: alone, truncated by the model as without packing
    assert len(rows) == 4  # 300 | 250 | 100 + 90 + 60 | 30 + 10: the fewest rows these lengths allow


def _varlen_stand_in(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                     **kwargs):
    """flash-attn's varlen kernel as transformers drives it, in PyTorch: one row ``[1, H, N, d]``, each sample found
    where ``position_ids`` restart at 0 and attended causally on its own (exact SDPA per sample)."""
    assert query.shape[0] == 1 and attention_mask is None and position_ids is not None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    parts = [nn.functional.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                        is_causal=True, scale=scaling)
             for a, b in zip(starts, starts[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def flash_stand_in(monkeypatch):
    """Registers :func:`_varlen_stand_in` as ``flash_attention_2`` (flash-attn needs CUDA) and returns a function that
    puts a model on it without the installation check; what the model does *around* the kernel (flattening the packed
    rows into one, unflattening logits and per-token losses) is the code under test."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", _varlen_stand_in)

    def use(model, implementation):
        model.config._attn_implementation = implementation

    return use


@torch.no_grad()
def test_flash_path_flattens_packed_rows_and_restores_logits(loaded, items, flash_stand_in):
    _, model, _ = loaded
    try:
        batch, reference, _ = _packed(model, items)
        assert batch["input_ids"].shape[0] >= 2  # several rows: the flattening joins them
        flash_stand_in(model, "flash_attention_2")
        _, flat, _ = _packed(model, items)
    finally:
        model.set_attn_implementation("sdpa")
    assert flat.logits.shape == reference.logits.shape
    torch.testing.assert_close(flat.logits, reference.logits, rtol=0, atol=1e-5)
    assert torch.equal(flat.spliced_labels, reference.spliced_labels)
    torch.testing.assert_close(flat.loss, reference.loss, rtol=0, atol=1e-6)


def test_flash_path_with_the_fused_head_restores_each_rows_token_losses(world, items, flash_stand_in,
                                                                          liger_stand_in):
    """With Liger's fused head the flattened row yields one run of per-token losses, which must be cut back into the
    rows: each row's losses in place, and nothing learnt from a row's last position predicting the next row's first."""
    from palo.model.kernels import apply_liger_kernels
    from palo.testing import tiny

    model = tiny.build_palo_model(world.config, world.clip_dir, seed=1)
    apply_liger_kernels(model)
    model.train()  # the fused head only runs in training (the tiny configs have no dropout)
    with torch.no_grad():
        batch, reference, _ = _packed(model, items)
        flash_stand_in(model, "flash_attention_2")
        _, flat, _ = _packed(model, items)
    rows, length = batch["input_ids"].shape[0], reference.spliced_labels.shape[1]
    assert rows >= 2 and reference.logits is None and flat.logits is None
    assert liger_stand_in["hidden"].shape[0] == rows * length - 1  # the head saw one flattened row
    assert flat.token_losses.shape == reference.token_losses.shape == (rows, length - 1)
    torch.testing.assert_close(flat.token_losses, reference.token_losses, rtol=0, atol=1e-5)
    learnt = reference.spliced_labels[:, 1:] != IGNORE_INDEX
    assert flat.token_losses[~learnt].eq(0).all() and flat.token_losses[learnt].gt(0).all()
    torch.testing.assert_close(flat.loss, reference.loss, rtol=0, atol=1e-6)
