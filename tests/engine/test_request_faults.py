"""One bad request, or one that fails, must cost its own caller only: refused at the door when its input is wrong,
failed alone when something breaks for it in the engine thread, and never left running when its caller gives up."""

from __future__ import annotations

import threading

import pytest
import torch
from engine_helpers import QUESTIONS, pixels, prompt_ids, reference_tokens

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine import EngineConfig, EngineRequest, LLMEngine, RequestTooLarge, SamplingParams, llm_engine, sequence


def _engine(loaded, **config) -> LLMEngine:
    tokenizer, model, _ = loaded
    return LLMEngine(model, tokenizer, EngineConfig(**{"max_num_seqs": 4, "block_size": 8, **config}))


def _finals(engine: LLMEngine, requests: list[EngineRequest]) -> list:
    """Queue ``requests`` (recording each one's last output), step until all are done, return the last outputs."""
    finals: list = [None] * len(requests)
    for i, request in enumerate(requests):
        request.on_output = lambda output, i=i: finals.__setitem__(i, output) if output.finished else None
        engine.add_request(request)
    engine.run_until_done()
    return finals


def _assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_work() and engine.stats()["waiting"] == 0
    assert engine.stats()["kv_blocks_used"] == 0 and not engine._by_id


# -- bug 1: a malformed image -----------------------------------------------------------------------------------


def test_images_the_tower_cannot_take_are_refused_at_the_door(loaded):
    """Before, a wrong-size image was queued and failed in the prefill, together with the other requests of its
    step; now add_request refuses it (and wrong-dtype or wrong-rank pixels) and nothing is queued."""
    tokenizer, model, processor = loaded
    engine = _engine(loaded)
    ids = prompt_ids(tokenizer, QUESTIONS[0], 1)
    good = pixels(processor, model, ["red"])
    wrong_size = torch.zeros(1, 3, good.shape[2] + 8, good.shape[3] + 8)
    with pytest.raises(ValueError, match=r"images are \[3, 64, 64\].*vision tower takes \[3, 56, 56\]"):
        engine.add_request(EngineRequest(ids, wrong_size))
    with pytest.raises(ValueError, match="floating-point"):
        engine.add_request(EngineRequest(ids, good.to(torch.uint8)))
    with pytest.raises(ValueError, match=r"\[k, 3, H, W\]"):
        engine.add_request(EngineRequest(ids, good[0]))
    _assert_idle(engine)


def test_an_image_the_tower_rejects_fails_only_its_own_request_in_a_shared_prefill(loaded):
    """Before, one image the tower could not encode failed every request prefilled in the same step, text-only
    ones included; now the step runs its requests one at a time and only the bad one fails."""
    tokenizer, model, processor = loaded
    engine = _engine(loaded)
    engine.image_shape = None  # a tower whose size the door does not know: the engine thread must cope
    text_ids, image_ids = prompt_ids(tokenizer, QUESTIONS[2], 0), prompt_ids(tokenizer, QUESTIONS[0], 1)
    good = pixels(processor, model, ["red"])
    bad = torch.zeros(1, 3, good.shape[2] + 8, good.shape[3] + 8)
    finals = _finals(engine, [EngineRequest(text_ids, None, SamplingParams(max_tokens=6)),
                              EngineRequest(image_ids, good, SamplingParams(max_tokens=6)),
                              EngineRequest(prompt_ids(tokenizer, QUESTIONS[1], 1), bad, SamplingParams(max_tokens=6))])
    assert finals[2].finish_reason == "error" and "56" in finals[2].error
    for output, (ids, images) in zip(finals[:2], [(text_ids, None), (image_ids, good)]):
        assert output.error is None
        assert output.token_ids == reference_tokens(model, tokenizer, ids, images, 6, engine.eos_ids)
    _assert_idle(engine)


# -- bug 2: prompt ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, -5, 1000, 1007, 2.0, "7", True])
def test_a_prompt_id_outside_the_vocabulary_is_refused_at_the_door(loaded, bad):
    """Before, a negative id jammed the engine for good (its admission raised at every step) or, with the prefix
    cache off, was silently read as id 0; an id >= vocab failed its prefill step. Now add_request names it."""
    tokenizer, model, _ = loaded
    assert model.config.vocab_size == 1000
    engine = _engine(loaded, enable_prefix_cache=False)  # the silent case: no prefix-cache keys to trip on
    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    ids[3] = bad
    with pytest.raises(ValueError, match=r"input_ids\[3\]"):
        engine.add_request(EngineRequest(ids, None, SamplingParams(max_tokens=4)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest([], None, SamplingParams(max_tokens=4)))
    _assert_idle(engine)
    # The image placeholder is the one negative id allowed, and ids of any integer type are taken.
    ok = [torch.tensor(t) for t in prompt_ids(tokenizer, QUESTIONS[0], 0)]
    assert _finals(engine, [EngineRequest(ok, None, SamplingParams(max_tokens=2))])[0].error is None
    with pytest.raises(ValueError, match="1 <image>"):
        engine.add_request(EngineRequest([1, IMAGE_TOKEN_INDEX, 5], None))


def test_a_request_whose_admission_raises_fails_alone_and_the_engine_goes_on(loaded, monkeypatch):
    """Before, an error while admitting the head of the queue escaped step() and came back at every step: the
    request never left the queue, nothing behind it ran, and the thread failed every running request."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded)
    can_allocate = engine.blocks.can_allocate

    def poisoned(seq, positions):
        if seq.request_id == "poison":
            raise IndexError("list index out of range")
        return can_allocate(seq, positions)

    monkeypatch.setattr(engine.blocks, "can_allocate", poisoned)
    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    running = EngineRequest(ids, None, SamplingParams(max_tokens=8, ignore_eos=True))
    running.on_output = lambda output: outputs.append(output) if output.finished else None
    outputs: list = []
    engine.add_request(running)
    engine.step()  # running before the bad one arrives
    finals = _finals(engine, [EngineRequest(ids, None, SamplingParams(max_tokens=4), request_id="poison"),
                              EngineRequest(ids, None, SamplingParams(max_tokens=4))])
    assert finals[0].finish_reason == "error" and "IndexError" in finals[0].error
    assert finals[1].error is None and outputs[0].finish_reason == "length" and outputs[0].num_tokens == 8
    _assert_idle(engine)


def test_a_token_its_grammar_refuses_fails_only_that_request(loaded):
    """Before, a grammar refusing a sampled token raised out of step() and failed the whole running batch."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded)

    class Refusing:
        def accept_token(self, token: int) -> bool:
            return False

    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    finals = [None, None]
    seqs = []
    for i in range(2):
        seqs.append(engine.add_request(EngineRequest(
            ids, None, SamplingParams(max_tokens=5, ignore_eos=True),
            on_output=lambda output, i=i: finals.__setitem__(i, output) if output.finished else None)))
    while not all(seq.output_ids for seq in seqs):  # both decoding: the refusal comes in a shared decode step
        engine.step()
    seqs[1].matcher = Refusing()
    engine.run_until_done()
    assert finals[1].finish_reason == "error" and "grammar refused" in finals[1].error
    assert finals[0].error is None and finals[0].num_tokens == 5
    _assert_idle(engine)


@pytest.mark.parametrize("where", ["sample", "token_logprobs"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_sampling_that_raises_for_one_request_fails_only_that_request(loaded, monkeypatch, phase, where):
    """Before, an error while sampling a step's tokens failed every request of the step; now the step samples its
    rows again one at a time and only the request it belongs to fails. The others answer exactly what they answer
    without it, penalties and log-probabilities included (nothing is counted twice by the second sampling)."""
    tokenizer, _, _ = loaded
    real_sample, real_token_logprobs = llm_engine.sample, llm_engine.token_logprobs
    armed = [phase == "prefill"]
    poison_row: list[bool] = []  # whether the batch being sampled holds the poisoned request

    def sample(logits, params, generators, **kwargs):
        poison_row[:] = [any(p.seed == 13 for p in params)]
        if armed[0] and where == "sample" and poison_row[0]:
            raise RuntimeError("probability tensor contains nan")
        return real_sample(logits, params, generators, **kwargs)

    def token_logprobs(logits, tokens, top):
        if armed[0] and where == "token_logprobs" and poison_row[0]:
            raise RuntimeError("probability tensor contains nan")
        return real_token_logprobs(logits, tokens, top)

    monkeypatch.setattr(llm_engine, "sample", sample)
    monkeypatch.setattr(llm_engine, "token_logprobs", token_logprobs)
    good = [SamplingParams(max_tokens=6, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0),
            SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)]
    prompts = [prompt_ids(tokenizer, q, 0) for q in QUESTIONS[:3]]

    def requests(poisoned: bool) -> list[EngineRequest]:
        made = [EngineRequest(ids, None, params) for ids, params in zip(prompts, good)]
        if poisoned:
            made.append(EngineRequest(prompts[2], None, SamplingParams(max_tokens=6, ignore_eos=True, seed=13)))
        return made

    # Without the prefix cache the three prompts (one system prompt) are prefilled in one step, not one after another.
    alone = _finals(_engine(loaded, enable_prefix_cache=False), requests(poisoned=False))
    engine = _engine(loaded, enable_prefix_cache=False)
    finals = [None] * 3
    for i, request in enumerate(requests(poisoned=True)):
        request.on_output = lambda output, i=i: finals.__setitem__(i, output) if output.finished else None
        poisoned = engine.add_request(request)
    engine.step()  # one step prefills all three and samples their first tokens together
    assert all(seq.output_ids for seq in engine.scheduler.decoding) and len(engine.scheduler.decoding) == (
        2 if phase == "prefill" else 3)
    tokens_before = len(poisoned.output_ids)
    armed[0] = True
    engine.run_until_done()
    assert finals[2].finish_reason == "error" and "probability tensor contains nan" in finals[2].error
    assert finals[2].num_tokens == tokens_before == (0 if phase == "prefill" else 2)  # prefill and a decode step
    for output, expected in zip(finals[:2], alone):
        assert output.error is None and output.token_ids == expected.token_ids
        assert output.answer_logprobs == expected.answer_logprobs
    _assert_idle(engine)


# -- bug 3: generate() leaving requests behind ------------------------------------------------------------------


def test_generate_cancels_what_it_queued_when_a_later_request_is_refused(loaded):
    """Before, generate([good, too_long]) raised but left ``good`` queued; a later, unrelated generate() ran it
    and fired its callback."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded, max_model_len=64)
    seen: list = []
    good = EngineRequest(prompt_ids(tokenizer, QUESTIONS[0], 0)[:20], None, SamplingParams(max_tokens=5),
                         lambda output: seen.append(output.finish_reason) if output.finished else None)
    with pytest.raises(RequestTooLarge):
        engine.generate([good, EngineRequest(list(range(3, 80)), None, SamplingParams(max_tokens=5))])
    assert seen == ["abort"]
    _assert_idle(engine)
    engine.generate([EngineRequest(prompt_ids(tokenizer, QUESTIONS[1], 0)[:20], None, SamplingParams(max_tokens=5))])
    assert seen == ["abort"]


def test_generate_cancels_its_requests_when_it_times_out(loaded):
    """Before, a generate() that timed out left its requests generating in the background thread to the end."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded).start()
    ended = threading.Event()
    last: list = []

    def on_output(output) -> None:
        if output.finished:
            last.append(output)
            ended.set()

    try:
        request = EngineRequest(prompt_ids(tokenizer, QUESTIONS[0], 0), None,
                                SamplingParams(max_tokens=400, ignore_eos=True), on_output)
        with pytest.raises(TimeoutError):
            engine.generate([request], timeout=0.05)
        assert ended.wait(30)
    finally:
        engine.close()
    assert last[0].finish_reason == "abort" and last[0].num_tokens < 400


def test_generate_leaves_the_callers_requests_as_they_are(loaded):
    """Before, generate() put its collecting callback on the caller's request: one request object given twice (n
    samples of one prompt) sent both sequences' outputs to the last callback, so both answers were one of them (and
    with the background thread generate returned when the first finished); given again to a later generate(), the
    callbacks stacked."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded)
    seen: list[str] = []
    caller = lambda output: seen.append(output.request_id) if output.finished else None  # noqa: E731
    request = EngineRequest(prompt_ids(tokenizer, QUESTIONS[0], 0), None,
                            SamplingParams(max_tokens=5, ignore_eos=True), caller)
    submitted: list = []
    add_request = engine.add_request
    engine.add_request = lambda r: submitted.append(add_request(r)) or submitted[-1]
    finals = engine.generate([request, request])
    assert request.on_output is caller
    assert [f.request_id for f in finals] == [s.request_id for s in submitted] and len(set(seen)) == 2
    assert [f.token_ids for f in finals] == [s.output_ids for s in submitted]
    engine.generate([request])
    assert len(seen) == 3  # the caller's callback once more, not once per earlier generate()
    _assert_idle(engine)


# -- bug 4: duplicate request ids -------------------------------------------------------------------------------


def test_a_request_id_still_in_flight_is_refused_and_abort_by_id_reaches_its_request(loaded):
    """Before, a second request under a live id was accepted; when the first finished it unregistered the second,
    so abort(id) did nothing and the second ran all its tokens."""
    tokenizer, _, _ = loaded
    engine = _engine(loaded)
    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    finals: dict[str, object] = {}

    def request(name: str, max_tokens: int) -> EngineRequest:
        return EngineRequest(ids, None, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                             lambda output: finals.__setitem__(name, output) if output.finished else None,
                             request_id="dup")

    engine.add_request(request("long", 300))
    with pytest.raises(ValueError, match="'dup' is already in flight"):
        engine.add_request(request("second", 2))
    for _ in range(3):
        engine.step()
    engine.abort("dup")
    engine.run_until_done()
    assert set(finals) == {"long"} and finals["long"].finish_reason == "abort" and finals["long"].num_tokens < 300
    _assert_idle(engine)
    # Once finished, the id is free again; an automatic id a caller took is numbered past it, never refused.
    engine.add_request(request("again", 2))
    upcoming = next(sequence._ids) + 2  # the automatic id of the request after the next one
    engine.add_request(EngineRequest(ids, None, SamplingParams(max_tokens=2), request_id=f"req-{upcoming}"))
    automatic = engine.add_request(EngineRequest(ids, None, SamplingParams(max_tokens=2)))
    assert automatic.seq_id == upcoming and automatic.request_id == f"req-{upcoming}.1"
    engine.run_until_done()
    assert finals["again"].finish_reason == "length"
