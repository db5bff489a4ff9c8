"""``palo.testing.greedy``: the near-tie rule the batching tests use to compare answers (see its module doc)."""

from __future__ import annotations

import dataclasses

import torch

from palo.mm_utils import tokenizer_image_token
from palo.model.tokenizer import load_tokenizer
from palo.testing.greedy import NEAR_TIE, divergence_is_a_near_tie, greedy_trace

PROMPT = "A chat. USER: <image>\nWhat is in the picture? ASSISTANT:"


def test_answers_may_differ_only_where_the_model_is_at_a_near_tie(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    trace = greedy_trace(world.model, ids, pixels, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert len(trace.tokens) == len(trace.margins) == 10
    expected = world.model.generate(ids, images=pixels, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert trace.tokens == expected[0, ids.shape[1]:].tolist()  # recording changes nothing
    text = tokenizer.decode(trace.tokens, skip_special_tokens=True).strip()
    assert divergence_is_a_near_tie(trace, text, tokenizer)  # the same answer

    # Another answer that parts after a few steps where the model is decided: not explained by rounding ...
    step = next(k for k in range(2, 8) if min(trace.margins[k:k + 3]) > 10 * NEAR_TIE)
    agreed = tokenizer.decode(trace.tokens[:step], skip_special_tokens=True).strip()
    other = agreed + "§ something else"
    assert not divergence_is_a_near_tie(trace, other, tokenizer)
    # ... but it is when the model's two best tokens were that close at the parting step.
    tied = dataclasses.replace(trace, margins=[*trace.margins[:step], NEAR_TIE / 10, *trace.margins[step + 1:]])
    assert divergence_is_a_near_tie(tied, other, tokenizer)
    # An answer that stops where this one went on parted at that step too.
    assert not divergence_is_a_near_tie(trace, agreed, tokenizer)
    assert divergence_is_a_near_tie(tied, agreed, tokenizer)
