"""A request's spliced prompt: laid out by the model's one splice contract, so the engine's positions are the
model's."""

from __future__ import annotations

import torch
from torch import nn

from palo.constants import IMAGE_TOKEN_INDEX as IMG
from palo.engine.sampling import SamplingParams
from palo.engine.sequence import EngineRequest, Sequence
from palo.model.multimodal import splice_image_features, spliced_length


def test_the_prompt_is_spliced_as_the_model_splices_it():
    n, dim = 3, 4
    ids = [1, IMG, 5, 6, IMG, 7]
    images = torch.randn(2, 3, 8, 8)
    seq = Sequence(EngineRequest(ids, images, SamplingParams(max_tokens=4)), tokens_per_image=n)
    assert seq.prompt_ids == [1, IMG, IMG, IMG, 5, 6, IMG, IMG, IMG, 7]
    assert seq.prompt_len == spliced_length(ids, n)
    assert seq.image_starts == [1, 6] and seq.num_images == 2
    assert seq.image_rows == {1: 0, 2: 1, 3: 2, 6: 3, 7: 4, 8: 5}
    # The rows the engine embeds position by position are the model's spliced embeddings.
    table = nn.Embedding(10, dim)
    features = torch.randn(2, n, dim)
    spliced = splice_image_features(torch.tensor([ids]), list(features), table).inputs_embeds[0]
    flat = features.reshape(-1, dim)
    rows = torch.stack([flat[seq.image_rows[p]] if t == IMG else table.weight[t]
                        for p, t in enumerate(seq.prompt_ids)])
    torch.testing.assert_close(rows, spliced)


def test_a_text_prompt_has_no_image_rows():
    seq = Sequence(EngineRequest([1, 2, 3], None, SamplingParams(max_tokens=4)), tokens_per_image=0)
    assert seq.prompt_ids == [1, 2, 3] and seq.image_rows == {} and seq.image_starts == [] and seq.num_images == 0
