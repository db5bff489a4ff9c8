"""splice_image_features: the one contract for images in a sequence, checked against hand-built expectations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from palo.constants import IGNORE_INDEX
from palo.constants import IMAGE_TOKEN_INDEX as IMG
from palo.model.multimodal import ImagePlaceholderMismatch, splice_image_features

D = 4


@pytest.fixture
def embed() -> nn.Embedding:
    table = nn.Embedding(50, D)
    with torch.no_grad():
        table.weight.copy_(torch.arange(50 * D, dtype=torch.float32).view(50, D))  # row t is recognisable
    return table


def feats(value: float, n: int = 3) -> torch.Tensor:
    return torch.full((n, D), value)


def test_rows_with_zero_one_and_two_images_left_padded(embed):
    ids = torch.tensor([[0, 0, 5, IMG, 6], [7, IMG, 8, IMG, 9], [0, 0, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    labels = torch.tensor([[0, 0, 5, IGNORE_INDEX, 6], [7, IGNORE_INDEX, 8, IGNORE_INDEX, 9], [0, 0, 10, 11, 12]])
    images = [feats(-1), feats(-2), feats(-3)]
    out = splice_image_features(ids, images, embed, attention_mask=mask, labels=labels, padding_side="left")
    # Row lengths: 2 + 3 = 5, 3 + 6 = 9, 3. Batch length 9, padded on the left.
    assert out.inputs_embeds.shape == (3, 9, D)
    assert out.attention_mask.tolist() == [[0] * 4 + [1] * 5, [1] * 9, [0] * 6 + [1] * 3]
    assert out.position_ids.tolist() == [[0] * 4 + list(range(5)), list(range(9)), [0] * 6 + list(range(3))]
    e = embed.weight
    expected_row0 = torch.stack([torch.zeros(D)] * 4 + [e[5], *feats(-1), e[6]])
    torch.testing.assert_close(out.inputs_embeds[0], expected_row0)
    expected_row1 = torch.stack([e[7], *feats(-2), e[8], *feats(-3), e[9]])
    torch.testing.assert_close(out.inputs_embeds[1], expected_row1)
    torch.testing.assert_close(out.inputs_embeds[2, 6:], e[10:13])
    assert out.labels.tolist()[1] == [7, -100, -100, -100, 8, -100, -100, -100, 9]
    assert out.labels.tolist()[0] == [-100] * 4 + [5, -100, -100, -100, 6]
    assert out.padded


def test_unpadded_batch_says_so(embed):
    out = splice_image_features(torch.tensor([[1, IMG], [IMG, 2]]), [feats(0), feats(1)], embed)
    assert not out.padded and out.attention_mask.all()


def test_right_padding_and_truncation(embed):
    ids = torch.tensor([[1, IMG, 2, 3], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = splice_image_features(ids, [feats(-1, n=5)], embed, attention_mask=mask, max_length=4)
    assert out.inputs_embeds.shape == (2, 4, D)  # row 0 is 1 + 5 + 2 = 8, truncated to 4
    torch.testing.assert_close(out.inputs_embeds[0], torch.stack([embed.weight[1], *feats(-1, n=3)]))
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_image_at_start_and_end(embed):
    ids = torch.tensor([[IMG, 3, IMG]])
    out = splice_image_features(ids, [feats(-1, 2), feats(-2, 2)], embed)
    torch.testing.assert_close(out.inputs_embeds[0], torch.stack([*feats(-1, 2), embed.weight[3], *feats(-2, 2)]))


def test_dummy_images_for_text_only_rows_reach_the_graph(embed):
    ids = torch.tensor([[1, IMG, 2], [3, 4, 5]])
    real = feats(1.0).requires_grad_()
    dummy = feats(0.0).requires_grad_()
    out = splice_image_features(ids, [real, dummy], embed)
    out.inputs_embeds.sum().backward()
    assert dummy.grad is not None and torch.count_nonzero(dummy.grad) == 0
    assert torch.all(real.grad == 1)
    torch.testing.assert_close(out.inputs_embeds[1, :3], embed.weight[3:6])


def test_mismatch_is_loud(embed):
    ids = torch.tensor([[1, IMG, 2, IMG]])
    with pytest.raises(ImagePlaceholderMismatch, match="Image features and image tokens do not match: 1 image"):
        splice_image_features(ids, [feats(0)], embed)
    with pytest.raises(ImagePlaceholderMismatch, match="3 image"):
        splice_image_features(ids, [feats(0)] * 3, embed)
    # A sentinel hidden under padding does not count.
    with pytest.raises(ImagePlaceholderMismatch, match=r"per prompt: \[1\]"):
        splice_image_features(ids, [feats(0)] * 2, embed, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="padding_side"):
        splice_image_features(ids, [feats(0)] * 2, embed, padding_side="middle")


@pytest.mark.parametrize("tokens_per_image", [0, 1, 3, 7])
def test_spliced_length_is_the_length_plan_splice_lays_out(tokens_per_image):
    from palo.model.multimodal import plan_splice, spliced_length

    rows = [[1, 5, 6], [1, IMG, 5, 6], [1, 5, IMG, 6, IMG], [IMG]]
    for row in rows:
        images = row.count(IMG)
        if images and not tokens_per_image:
            continue  # a text-only model's prompts carry no sentinel
        planned = plan_splice(torch.tensor([row]), images, tokens_per_image).length
        # The sentinel is replaced by the image rows, never counted as a position of its own.
        assert spliced_length(row, tokens_per_image) == planned == len(row) + images * (tokens_per_image - 1)
        assert spliced_length(torch.tensor(row), tokens_per_image) == planned


@pytest.mark.parametrize("tokens_per_image", [1, 3, 7])
def test_ids_within_cuts_the_ids_where_the_models_truncation_cuts_the_splice(tokens_per_image):
    from palo.model.multimodal import ids_within, plan_splice, spliced_length

    for row in ([1, 5, 6, 7], [1, IMG, 5, 6], [1, 5, IMG, 6, IMG, 8]):
        ids = torch.tensor(row)
        for limit in range(1, spliced_length(row, tokens_per_image) + 2):
            keep = ids_within(ids, tokens_per_image, limit)
            whole = plan_splice(ids[None], row.count(IMG), tokens_per_image, max_length=limit)
            cut = ids[:keep]
            part = plan_splice(cut[None], int((cut == IMG).sum()), tokens_per_image, max_length=limit)
            # The same text lands at the same positions; nothing the cut kept is dropped by the model but image rows.
            assert (part.text_src, part.text_dst) == (whole.text_src, whole.text_dst)
            assert part.image_dst == whole.image_dst
            if keep < len(row):  # the next id would start at the limit or later
                assert spliced_length(row[:keep + 1], tokens_per_image) - (
                    tokens_per_image if row[keep] == IMG else 1) >= limit
