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
    # The same prompts ran just before without scoring: their blocks keep no scores, so the first scored prompt is
    # computed in full (the later ones may take the system prompt from the scored ones before them).
    assert scored[0].cached_positions == 0
    again = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=1)) for ids, images in prompts])
    assert all(out.cached_positions > 0 for out in again)  # where the cache would have served them


def test_scored_prompts_take_the_blocks_and_scores_of_earlier_scored_ones(loaded):
    """Options of one image question (a multiple-choice document) scored together: all but the first take the
    shared image and question from the cache, with the scores kept with them, and every value is still the model's
    own; a prompt asking for more alternatives than were kept computes them again."""
    tokenizer, model, processor = loaded
    images = pixels(processor, model, ["red"])
    question = prompt_ids(tokenizer, QUESTIONS[6], 1)
    options = [question + tokenizer(text, add_special_tokens=False).input_ids
               for text in ("A red circle.", "دائرة حمراء", "红色的圆", "Un cercle rouge")]
    for max_prefill in (16, 512):  # the cached prefix ending inside a chunk and at one
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8,
                                                          max_prefill_tokens=max_prefill))
        outs = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=0, prompt_logprobs=2))
                                for ids in options])
        for ids, out in zip(options, outs):
            _check(out.prompt_logprobs, _reference(model, ids, images), 2, f"{max_prefill}")
        shared = len(question) - 1 + model.image_token_count  # positions of the image question
        assert outs[0].cached_positions == 0
        assert [out.cached_positions for out in outs[1:]] == [shared // 8 * 8] * 3
        fewer, = engine.generate([EngineRequest(options[0] + [5], images, SamplingParams(max_tokens=0,
                                                                                          prompt_logprobs=1))])
        assert fewer.cached_positions > 0
        _check(fewer.prompt_logprobs, _reference(model, options[0] + [5], images), 1, "fewer alternatives")
        more, = engine.generate([EngineRequest(options[0] + [5], images, SamplingParams(max_tokens=0,
                                                                                         prompt_logprobs=3))])
        assert more.cached_positions == 0
        _check(more.prompt_logprobs, _reference(model, options[0] + [5], images), 3, "more alternatives")


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
