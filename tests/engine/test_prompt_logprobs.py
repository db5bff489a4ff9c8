"""Prompt log-probabilities: how likely the model finds a given prompt, id by id (scoring, multiple choice)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import QUESTIONS, pixels, prompt_ids

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams


def _reference(model, ids: list[int], images: torch.Tensor | None) -> list[tuple[int, torch.Tensor] | None]:
    """Per input id: None for the first and for image placeholders, else ``(id, log-softmax of the model's logits
    at the position before it)``, from one plain forward pass over the whole spliced prompt."""
    spliced = model.prepare_multimodal_inputs(torch.tensor([ids]), images, None)
    logprobs = torch.log_softmax(model(inputs_embeds=spliced.inputs_embeds).logits[0].float(), dim=-1)
    out: list[tuple[int, torch.Tensor] | None] = []
    position = 0
    for i, token in enumerate(ids):
        if token == IMAGE_TOKEN_INDEX:
            out.append(None)
            position += model.image_token_count
            continue
        out.append(None if i == 0 else (token, logprobs[position - 1]))
        position += 1
    return out


def _check(entries, reference, k: int, label: str) -> None:
    assert len(entries) == len(reference), label
    for i, (entry, expected) in enumerate(zip(entries, reference)):
        if expected is None:
            assert entry is None, (label, i)
            continue
        token, logprobs = expected
        chosen, top = entry
        assert abs(chosen - logprobs[token].item()) < 1e-4, (label, i)
        values, indices = logprobs.topk(k)
        assert [t for t, _ in top] == indices.tolist(), (label, i)
        assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=1e-4), (label, i)


def test_prompt_logprobs_are_the_models_own_for_every_text_id_across_chunks_and_images(loaded):
    """Text and image prompts (0, 1 and 2 images), prefilled in chunks of 16 that cut through images, next to
    requests that ask for nothing: every text id after the first scored as one forward pass over the prompt scores
    it, the answers unchanged."""
    tokenizer, model, processor = loaded
    prompts = [(prompt_ids(tokenizer, QUESTIONS[i], i % 3), pixels(processor, model, ["red", "blue"][: i % 3]))
               for i in range(6)]
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8, max_prefill_tokens=16))
    plain = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=6)) for ids, images in prompts])
    scored = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=6, prompt_logprobs=3 + i % 2))
                              for i, (ids, images) in enumerate(prompts)])
    for i, ((ids, images), out, same) in enumerate(zip(prompts, scored, plain)):
        _check(out.prompt_logprobs, _reference(model, ids, images), 3 + i % 2, f"prompt {i}")
        assert out.token_ids == same.token_ids, f"prompt {i}"
        assert same.prompt_logprobs is None
        # The same prompts ran just before: a scored prompt is computed in full, never taken from the cache.
        assert out.cached_positions == 0, f"prompt {i}"
    again = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=1)) for ids, images in prompts])
    assert all(out.cached_positions > 0 for out in again)  # where the cache would have served them


def test_a_scored_prompt_can_ask_for_no_answer_and_still_fills_the_cache_for_others(loaded):
    tokenizer, model, processor = loaded
    ids, images = prompt_ids(tokenizer, QUESTIONS[2], 1), pixels(processor, model, ["green"])
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    only, = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=0, prompt_logprobs=0))])
    assert only.finished and only.finish_reason == "length" and only.token_ids == [] and only.text == ""
    _check(only.prompt_logprobs, _reference(model, ids, images), 0, "score only")
    assert all(top == [] for entry in only.prompt_logprobs if entry is not None for _, top in [entry])
    after, = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=4))])
    assert after.cached_positions > 0  # the scored prompt's blocks serve a later request
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
