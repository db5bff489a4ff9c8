"""Structured outputs in the engine: answers held to a JSON schema, a pattern or a list of choices, row by row."""

from __future__ import annotations

import json
import re

import pytest
from engine_helpers import QUESTIONS, pixels, prompt_ids, reference_tokens
from transformers import LogitsProcessor, LogitsProcessorList

from palo.engine import EngineConfig, EngineRequest, GrammarError, LLMEngine, SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "blue", "green"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "count"], "additionalProperties": False}
PATTERN = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["نعم", "لا", "是的", "peut-être"]
SHAPES = [StructuredOutput("json_schema", json.dumps(SCHEMA)), StructuredOutput("regex", PATTERN),
          StructuredOutput.choice(CHOICES), None]


class _Grammar(LogitsProcessor):
    """The reference: ``model.generate`` with the grammar's mask applied to its one row at every step."""

    def __init__(self, engine: LLMEngine, shape: StructuredOutput) -> None:
        import xgrammar

        self.xgr, self.matcher, self.calls = xgrammar, engine.structured_outputs().matcher(shape), 0
        self.bitmask = xgrammar.allocate_token_bitmask(1, engine.model.config.vocab_size)

    def __call__(self, input_ids, scores):
        if self.calls:  # the token chosen after the previous call
            assert self.matcher.accept_token(int(input_ids[0, -1]))
        self.calls += 1
        self.matcher.fill_next_token_bitmask(self.bitmask)
        scores = scores.clone()
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores


def _requests(tokenizer, model, processor, count: int):
    """``count`` prompts of mixed languages with 0-2 images."""
    out = []
    for i in range(count):
        n = i % 3
        out.append((prompt_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)], n),
                    pixels(processor, model, ["red", "blue"][:n], [(50, 40)] * n)))
    return out


def test_greedy_answers_take_their_shape_and_equal_generate_under_the_same_grammar(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    prompts = _requests(tokenizer, model, processor, 8)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(len(prompts))]
    outputs = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=40, structured=shape))
                               for (ids, images), shape in zip(prompts, shapes)])
    for i, ((ids, images), shape, out) in enumerate(zip(prompts, shapes, outputs)):
        if shape is None:  # rows without a shape answer as they would alone
            assert out.token_ids == reference_tokens(model, tokenizer, ids, images, 40, engine.eos_ids), i
            continue
        assert out.finish_reason == "stop", (i, out.text)  # ended because the shape was complete
        if shape.kind == "json_schema":
            value = json.loads(out.text)
            assert set(value) == {"color", "count"} and value["color"] in SCHEMA["properties"]["color"]["enum"]
            assert isinstance(value["count"], int) and 0 <= value["count"] <= 9
        elif shape.kind == "regex":
            assert re.fullmatch(PATTERN, out.text), out.text
        else:
            assert out.text in CHOICES
        rule = LogitsProcessorList([_Grammar(engine, shape)])
        assert out.token_ids == reference_tokens(model, tokenizer, ids, images, 40, engine.eos_ids,
                                                 logits_processor=rule), i
    assert engine.stats()["kv_blocks_used"] == 0


def test_sampled_answers_keep_their_shape_and_any_json_object_is_an_object(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8))
    ids, images = _requests(tokenizer, model, processor, 2)[1]
    picked = engine.generate([EngineRequest(ids, images, SamplingParams(
        max_tokens=16, temperature=1.5, seed=seed, structured=StructuredOutput.choice(CHOICES))) for seed in range(12)])
    assert all(out.text in CHOICES and out.finish_reason == "stop" for out in picked)
    assert len({out.text for out in picked}) > 1  # it really sampled among them
    anything = engine.generate([EngineRequest(ids, images, SamplingParams(
        max_tokens=64, temperature=0.7, seed=seed, structured=StructuredOutput("json_object"))) for seed in range(4)])
    for out in anything:  # a random model may not close it in time; when it does, it is an object
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_a_shape_that_does_not_compile_is_refused_when_submitted(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    ids, images = _requests(tokenizer, model, processor, 1)[0]
    for shape, reason in [(StructuredOutput("regex", "[0-9"), "regex"),
                          (StructuredOutput("json_schema", '{"type": "nope"}'), "json schema"),
                          (StructuredOutput("json_schema", "{not json"), "json schema")]:
        with pytest.raises(GrammarError, match=f"the {reason} cannot be used: .+"):
            engine.add_request(EngineRequest(ids, images, SamplingParams(structured=shape)))
    with pytest.raises(ValueError, match="end-of-sequence"):
        SamplingParams(structured=SHAPES[0], ignore_eos=True)
    with pytest.raises(ValueError, match="unknown structured output kind"):
        StructuredOutput("xml")
    assert engine.stats()["waiting"] == 0


def test_compiled_grammars_are_kept_only_up_to_the_bound(loaded, monkeypatch):
    """A server that meets ever new schemas keeps a bounded cache of compiled grammars."""
    from palo.engine import structured

    tokenizer, model, _ = loaded
    monkeypatch.setattr(structured, "GRAMMAR_CACHE_BYTES", 1 << 20)
    outputs = structured.StructuredOutputs(tokenizer, model.config.vocab_size, {tokenizer.eos_token_id})
    for i in range(200):
        outputs.matcher(StructuredOutput("regex", f"[a-z]{{{i + 1}}}-{i}"))
    kept = outputs._compiler.get_cache_size_bytes()
    # The bound, give or take the grammar just added (xgrammar evicts before it inserts); unbounded, these 200 would
    # keep about 37 MB.
    assert 0 < kept <= (1 << 20) + (256 << 10)
