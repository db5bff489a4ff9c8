"""The engine end to end on the tiny checkpoint (CPU, float32): same tokens as ``model.generate``, every time."""

from __future__ import annotations

import dataclasses
import random
import sys
import threading
import time

import pytest
import torch
from engine_helpers import COLLIDING_BLOCKS, COLORS, QUESTIONS, pixels, prompt_ids, reference_tokens
from transformers import LogitsProcessor, LogitsProcessorList

from palo.engine import (
    EngineConfig,
    EngineRequest,
    LLMEngine,
    QueueFull,
    RequestTooLarge,
    SamplingParams,
    StructuredOutput,
)
from palo.engine.llm_engine import TokenRate
from palo.model.multimodal import ImagePlaceholderMismatch


def _mixed_requests(tokenizer, model, processor, count: int, seed: int = 0):
    """``count`` requests of mixed languages, 0/1/2 images of varied sizes, and answer lengths of 8 to 48 tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        num_images = i % 3
        colors = [rng.choice(COLORS) for _ in range(num_images)]
        sizes = [(rng.randint(40, 90), rng.randint(30, 80)) for _ in range(num_images)]
        ids = prompt_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)], num_images)
        requests.append((ids, pixels(processor, model, colors, sizes), rng.randint(8, 48)))
    return requests


def test_staggered_mixed_requests_give_exactly_the_tokens_of_generate(loaded):
    """32 requests arrive at staggered times while others run; each gets what ``model.generate`` gives it alone."""
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8, max_prefill_tokens=48))
    requests = _mixed_requests(tokenizer, model, processor, 32)
    expected = [reference_tokens(model, tokenizer, ids, images, n, engine.eos_ids) for ids, images, n in requests]
    finals: dict[int, object] = {}
    done = threading.Event()

    def on_output(i):
        def callback(output):
            if output.finished:
                finals[i] = output
                if len(finals) == len(requests):
                    done.set()
        return callback

    engine.start()
    try:
        for i, (ids, images, n) in enumerate(requests):
            engine.add_request(EngineRequest(ids, images, SamplingParams(max_tokens=n), on_output(i)))
            time.sleep(0.002 * (i % 5))  # some join a running batch, some arrive together
        assert done.wait(300), f"{len(finals)} of {len(requests)} finished"
    finally:
        engine.close()
    for i, tokens in enumerate(expected):
        assert finals[i].token_ids == tokens, f"request {i}"
        assert finals[i].finish_reason == ("length" if len(tokens) == requests[i][2] else "stop")
        assert finals[i].text == tokenizer.decode(tokens, skip_special_tokens=True)
    # Continuous batching really happened: steps decoded several sequences, and more than the first arrivals.
    assert max(engine.batch_sizes) > 1 and len(set(engine.batch_sizes)) > 2
    assert engine.stats()["kv_blocks_used"] == 0  # every finished sequence gave its blocks back


def test_chunked_prefill_gives_the_same_tokens_and_keeps_streams_flowing(loaded):
    tokenizer, model, processor = loaded
    ids = prompt_ids(tokenizer, QUESTIONS[8], 2)
    images = pixels(processor, model, ["red", "green"])
    expected = reference_tokens(model, tokenizer, ids, images, 12, set())
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=4, max_prefill_tokens=7,
                                                      enable_prefix_cache=False))
    short = prompt_ids(tokenizer, "Hi", 0)
    first = engine.add_request(EngineRequest(short, None, SamplingParams(max_tokens=80, ignore_eos=True)))
    while not first.output_ids:  # its own prompt goes in chunks of 7 too
        engine.step()
    long = engine.add_request(EngineRequest(ids, images, SamplingParams(max_tokens=12, ignore_eos=True)))
    chunks_needed = -(-long.prompt_len // 7)
    tokens_before = len(first.output_ids)
    for _ in range(chunks_needed - 1):
        engine.step()
    # While the long prompt was prefilled chunk by chunk, the running stream got a token every step.
    assert long.num_computed < long.prompt_len and len(long.output_ids) == 0
    assert len(first.output_ids) == tokens_before + chunks_needed - 1
    engine.run_until_done()
    assert long.output_ids == expected


@pytest.mark.parametrize("seed", range(6))
def test_random_settings_and_arrivals_give_the_tokens_of_generate(loaded, seed):
    """The features together, as a random mix: block sizes down to 1, prefill chunks of a few positions, caches too
    small for everyone, prefix hits on shared images and on a follow-up turn, requests cancelled mid-answer; every
    answer that was not cancelled is what ``model.generate`` gives alone, and every block comes back."""
    tokenizer, model, processor = loaded
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    config = EngineConfig(max_num_seqs=rng.choice([1, 3, 8]), block_size=block_size,
                          max_prefill_tokens=rng.choice([3, 7, 48]), enable_prefix_cache=seed % 3 != 2,
                          num_blocks=1 + 3 * -(-110 // block_size))  # about three sequences' worth
    engine = LLMEngine(model, tokenizer, config)
    images = {c: pixels(processor, model, [c]) for c in COLORS[:3]}
    requests = []
    for _ in range(10):
        colors = [rng.choice(COLORS[:3]) for _ in range(rng.choice([0, 1, 1, 2]))]
        ids = prompt_ids(tokenizer, rng.choice(QUESTIONS[:3]), len(colors))
        if colors and rng.random() < 0.3:  # a follow-up turn: the first turn's prompt is its prefix
            ids = ids + tokenizer("A red circle.</s>USER: " + QUESTIONS[8] + " ASSISTANT:",
                                  add_special_tokens=False).input_ids
        pixels_ = torch.cat([images[c] for c in colors]) if colors else None
        cancel = rng.randint(1, 20) if rng.random() < 0.2 else None
        requests.append((rng.randint(0, 20), ids, pixels_, rng.randint(1, 30), cancel))
    seqs = {}
    for step in range(2000):
        for i, (arrive, ids, pixels_, n, cancel) in enumerate(requests):
            if arrive == step:
                seqs[i] = engine.add_request(EngineRequest(ids, pixels_, SamplingParams(max_tokens=n)))
            elif cancel is not None and arrive + cancel == step:
                engine.abort(seqs[i])
        if step > 20 and not engine.has_work():
            break
        engine.step()
    assert len(seqs) == len(requests) and not engine.has_work()
    assert any(seq.num_cached for seq in seqs.values()) == config.enable_prefix_cache
    for i, (_, ids, pixels_, n, _) in enumerate(requests):
        if seqs[i].finish_reason != "abort":
            assert seqs[i].output_ids == reference_tokens(model, tokenizer, ids, pixels_, n, engine.eos_ids), i
    assert engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(loaded):
    tokenizer, model, processor = loaded
    ids = prompt_ids(tokenizer, QUESTIONS[1], 1)
    image = pixels(processor, model, ["purple"])
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    def run(extra: int, p=params):
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8))
        others = [EngineRequest(prompt_ids(tokenizer, QUESTIONS[k], 0), None,
                                SamplingParams(max_tokens=30, temperature=1.0, seed=k)) for k in range(extra)]
        outputs = engine.generate(others[: extra // 2] + [EngineRequest(ids, image, p)] + others[extra // 2:])
        return outputs[extra // 2].token_ids

    alone = run(0)
    assert run(5) == alone
    assert run(2, dataclasses.replace(params, seed=99)) != alone
    greedy = run(0, SamplingParams(max_tokens=24, ignore_eos=True))
    assert alone != greedy  # it really sampled


class _Penalties(LogitsProcessor):
    """The penalty rules written out for one row of ``model.generate``: the reference the engine must match.

    From embeddings (a prompt with images) transformers shows processors the new ids only; from ids, prompt + new.
    """

    def __init__(self, prompt: list[int], ids_hold_prompt: bool, params: SamplingParams) -> None:
        self.prompt, self.skip, self.params = prompt, len(prompt) if ids_hold_prompt else 0, params

    def __call__(self, input_ids, scores):
        answer = input_ids[0, self.skip:].tolist()
        scores = scores.clone()
        for token in {t for t in self.prompt if t >= 0} | set(answer):
            value = scores[0, token]
            r = self.params.repetition_penalty
            scores[0, token] = value / r if value > 0 else value * r
        for token in set(answer):
            scores[0, token] -= self.params.frequency_penalty * answer.count(token) + self.params.presence_penalty
        return scores


def test_penalised_requests_in_a_mixed_batch_give_the_tokens_of_generate_with_the_rules(loaded):
    tokenizer, model, processor = loaded
    settings = [dict(), dict(repetition_penalty=1.8), dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                dict(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=-0.5)]
    requests = [(ids, images, n, SamplingParams(max_tokens=n, **settings[i % len(settings)]))
                for i, (ids, images, n) in enumerate(_mixed_requests(tokenizer, model, processor, 10, seed=3))]
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    outputs = engine.generate([EngineRequest(ids, images, params) for ids, images, _, params in requests])

    def answer(ids, images, n, **kwargs):  # greedy, cut before end-of-sequence as the engine reports it
        new = model.generate(torch.tensor([ids]), images=images, max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, **kwargs)[0, len(ids):].tolist()
        return next((new[:k] for k, t in enumerate(new) if t in engine.eos_ids), new)

    changed = 0
    for i, ((ids, images, n, params), out) in enumerate(zip(requests, outputs)):
        rules = LogitsProcessorList([_Penalties(ids, images is None, params)])
        assert out.token_ids == answer(ids, images, n, logits_processor=rules), f"request {i}"
        changed += out.token_ids != answer(ids, images, n)
    assert changed >= 5  # the penalties really changed answers (8 of the 10 rows ask for one)
    # transformers' own repetition penalty, on a text prompt (where it sees the prompt too), agrees.
    ids = prompt_ids(tokenizer, QUESTIONS[2], 0)
    out = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=20, repetition_penalty=1.8))])[0]
    assert out.token_ids == answer(ids, None, 20, repetition_penalty=1.8)
    assert engine.stats()["kv_blocks_used"] == 0
    assert len(engine._penalties._free) == 4  # every finished request gave its row of counts back


def test_logprobs_are_the_models_own_for_each_token_and_only_for_requests_that_ask(loaded):
    """Per answer token: its log-probability and the step's k most likely, as ``model.generate``'s raw logits give
    them, for greedy and sampled, penalised or not, rows in one batch."""
    tokenizer, model, processor = loaded
    settings = [dict(logprobs=0), dict(logprobs=3), dict(), dict(logprobs=5, temperature=0.8, seed=4),
                dict(logprobs=2, frequency_penalty=1.0), dict(logprobs=20)]
    requests = [(ids, images, n, SamplingParams(max_tokens=n, **settings[i % len(settings)]))
                for i, (ids, images, n) in enumerate(_mixed_requests(tokenizer, model, processor, 6, seed=5))]
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    outputs = engine.generate([EngineRequest(ids, images, params) for ids, images, _, params in requests])
    for i, ((ids, images, _, params), out) in enumerate(zip(requests, outputs)):
        if params.logprobs is None:
            assert out.logprobs == [], f"request {i}"
            continue
        assert len(out.logprobs) == len(out.token_ids) > 0
        # The engine's own tokens fed back: the model's logits at each answer position.
        forced = torch.tensor([ids + out.token_ids])
        spliced = model.prepare_multimodal_inputs(forced, images, None)
        logits = model(inputs_embeds=spliced.inputs_embeds).logits[0, -len(out.token_ids) - 1:-1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for step, (token, (chosen, top)) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(chosen - expected[step, token].item()) < 1e-4, (i, step)
            values, indices = expected[step].topk(params.logprobs)
            assert [t for t, _ in top] == indices.tolist(), (i, step)
            assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=1e-4)
    greedy = [out for (_, _, _, p), out in zip(requests, outputs) if p.logprobs and p.greedy and not p.penalized]
    assert all(top[0][0] == token for out in greedy for token, (_, top) in zip(out.token_ids, out.logprobs))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_each_rows_logit_bias_gives_the_tokens_of_generate_with_that_bias(loaded):
    """Banning, nudging and forcing tokens row by row in one batch: each row's tokens are ``model.generate``'s with
    the same additive bias (its ``sequence_bias`` on single tokens), the other rows' are untouched, and the
    log-probabilities reported stay the model's own."""
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    requests = _mixed_requests(tokenizer, model, processor, 6, seed=7)
    plain = [reference_tokens(model, tokenizer, ids, images, n, engine.eos_ids) for ids, images, n in requests]
    assert all(plain[1:5]) and 42 not in engine.eos_ids
    eos = next(iter(engine.eos_ids))
    biases = [{}, {plain[1][0]: -100}, {plain[2][0]: -1.5, 7: 2.0, 300: 1.0}, {42: 100}, {eos: 100}, {}]
    outputs = engine.generate([
        EngineRequest(ids, images, SamplingParams(max_tokens=n, logit_bias=bias, logprobs=3 if i == 1 else None))
        for i, ((ids, images, n), bias) in enumerate(zip(requests, biases))])
    for i, ((ids, images, n), bias, out) in enumerate(zip(requests, biases, outputs)):
        rule = {"sequence_bias": [[[token], float(b)] for token, b in bias.items()]} if bias else {}
        assert out.token_ids == reference_tokens(model, tokenizer, ids, images, n, engine.eos_ids, **rule), i
    assert [out.token_ids != tokens for out, tokens in zip(outputs, plain)] == [False, True, True, True, True, False]
    assert outputs[3].token_ids == [42] * requests[3][2]
    assert outputs[4].token_ids == [] and outputs[4].finish_reason == "stop"  # pushed to end at once
    chosen, top = outputs[1].logprobs[0]
    assert top[0][0] == plain[1][0] != outputs[1].token_ids[0]  # the model's own favourite, banned
    assert chosen < top[0][1]
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(EngineRequest(requests[0][0], requests[0][1],
                                         SamplingParams(logit_bias={model.config.vocab_size: 1.0})))
    assert engine.stats()["kv_blocks_used"] == 0


def test_min_tokens_holds_back_the_end_and_stop_token_ids_end_the_answer(loaded):
    """``min_tokens``: the tokens of ``model.generate`` with ``min_new_tokens`` (here with the end pushed up by a
    bias so that it matters); ``stop_token_ids``: the answer ends before the first of them."""
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    requests = _mixed_requests(tokenizer, model, processor, 3, seed=9)
    eos = next(iter(engine.eos_ids))
    plain = [reference_tokens(model, tokenizer, ids, images, n, engine.eos_ids) for ids, images, n in requests]
    stop_at = next(k for k in range(2, len(plain[1])) if plain[1][k] not in plain[1][:k])
    outputs = engine.generate([
        EngineRequest(*requests[0][:2], SamplingParams(max_tokens=12, min_tokens=5, logit_bias={eos: 100})),
        EngineRequest(*requests[1][:2], SamplingParams(max_tokens=requests[1][2],
                                                       stop_token_ids=[plain[1][stop_at], 999])),
        EngineRequest(*requests[2][:2], SamplingParams(max_tokens=requests[2][2], min_tokens=3))])
    ids, images, _ = requests[0]
    rule = {"sequence_bias": [[[eos], 100.0]], "min_new_tokens": 5}
    assert outputs[0].token_ids == reference_tokens(model, tokenizer, ids, images, 12, engine.eos_ids, **rule)
    assert len(outputs[0].token_ids) == 5 and outputs[0].finish_reason == "stop"
    assert outputs[1].token_ids == plain[1][:stop_at] and outputs[1].finish_reason == "stop"
    assert outputs[2].token_ids == plain[2]  # a row that never wanted to end early is untouched
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request(EngineRequest(ids, images, SamplingParams(stop_token_ids=[model.config.vocab_size])))
    with pytest.raises(ValueError, match="least number of tokens"):
        SamplingParams(min_tokens=2, structured=StructuredOutput("json_object"))


def test_min_tokens_holds_back_stop_token_ids_as_it_does_the_end(loaded):
    """A stop id pushed up by a bias cannot end the answer before ``min_tokens`` tokens, any more than
    end-of-sequence can: the tokens are ``model.generate``'s with that id as a further end and ``min_new_tokens``."""
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    stop, eos = 42, next(iter(engine.eos_ids))
    assert stop not in engine.eos_ids
    out = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=12, min_tokens=5, stop_token_ids=[stop],
                                                                  logit_bias={stop: 100}))])[0]
    rule = {"sequence_bias": [[[stop], 100.0]], "min_new_tokens": 5, "eos_token_id": [eos, stop]}
    assert out.token_ids == reference_tokens(model, tokenizer, ids, None, 12, engine.eos_ids | {stop}, **rule)
    assert len(out.token_ids) == 5 and stop not in out.token_ids and out.finish_reason == "stop"


def test_a_cancelled_request_frees_its_cache_at_once(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=4, enable_prefix_cache=False))
    outputs = []
    seq = engine.add_request(EngineRequest(prompt_ids(tokenizer, QUESTIONS[0], 1), pixels(processor, model, ["red"]),
                                           SamplingParams(max_tokens=200, ignore_eos=True), outputs.append))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_used"] == len(seq.block_table) > 0
    engine.abort(seq.request_id)
    engine.step()
    assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.num_free == engine.blocks.usable_blocks
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert not engine.has_work()


def test_a_client_that_went_away_is_cancelled(loaded):
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=4))
    calls = []

    def gone(output):
        calls.append(output)
        raise ConnectionError("client disconnected")

    engine.add_request(EngineRequest(prompt_ids(tokenizer, "Hi", 0), None,
                                     SamplingParams(max_tokens=100, ignore_eos=True), gone))
    engine.run_until_done(max_steps=20)
    assert engine.stats()["kv_blocks_used"] == 0
    assert calls[-1].finish_reason == "abort" and len(calls[-1].token_ids) < 10


def test_each_streamed_output_keeps_the_tokens_it_was_sent_with(loaded):
    """Outputs kept by a client still show the answer as it was when each was sent, not as it grew later."""
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=4))
    outputs = []
    engine.add_request(EngineRequest(prompt_ids(tokenizer, "Describe the image.", 0), None,
                                     SamplingParams(max_tokens=12, ignore_eos=True), outputs.append))
    engine.run_until_done(max_steps=50)
    final = outputs[-1]
    assert final.finished and len(final.token_ids) == final.num_tokens == 12
    assert [o.num_tokens for o in outputs] == sorted({o.num_tokens for o in outputs}) and len(outputs) > 3
    for output in outputs:
        assert output.token_ids == final.token_ids[: output.num_tokens]
        assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)[: len(output.text)]


def test_cache_exhaustion_makes_requests_wait_not_fail(loaded):
    tokenizer, model, processor = loaded
    # 2 sequences' worth of blocks: 8 requests must take turns.
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8, num_blocks=1 + 2 * 12,
                                                      enable_prefix_cache=False))
    requests = _mixed_requests(tokenizer, model, processor, 8, seed=3)
    expected = [reference_tokens(model, tokenizer, ids, images, n, engine.eos_ids) for ids, images, n in requests]
    seen_running = []
    original = engine.step

    def step():
        original()
        seen_running.append(engine.scheduler.num_running)

    engine.step = step
    outputs = engine.generate([EngineRequest(ids, images, SamplingParams(max_tokens=n)) for ids, images, n in requests])
    assert [o.token_ids for o in outputs] == expected
    assert all(o.error is None for o in outputs)
    assert max(seen_running) <= 2 < len(requests)


def test_prefix_cache_hit_skips_the_tower_and_gives_identical_tokens(loaded, monkeypatch):
    tokenizer, model, processor = loaded
    image = pixels(processor, model, ["orange"])
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=4))
    calls = []
    encode = engine.runner.encode_images
    monkeypatch.setattr(engine.runner, "encode_images",
                        lambda seqs: (calls.extend(s.request_id for s in seqs), encode(seqs)))
    # One image asked in several languages: the system prompt and the image rows are shared.
    first_ids = prompt_ids(tokenizer, QUESTIONS[0], 1)
    first = engine.generate([EngineRequest(first_ids, image, SamplingParams(max_tokens=16))])[0]
    assert first.cached_positions == 0 and len(calls) == 1
    for question in QUESTIONS[1:4]:
        ids = prompt_ids(tokenizer, question, 1)
        out = engine.generate([EngineRequest(ids, image, SamplingParams(max_tokens=16))])[0]
        image_end = ids.index(-200) + model.image_token_count
        assert out.cached_positions >= image_end - engine.config.block_size, out.cached_positions
        assert out.token_ids == reference_tokens(model, tokenizer, ids, image, 16, engine.eos_ids)
    assert len(calls) == 1  # the vision tower ran once, for the first request
    # The same prompt again: everything but the last block is reused; identical answer.
    again = engine.generate([EngineRequest(first_ids, image, SamplingParams(max_tokens=16))])[0]
    assert again.cached_positions > 0.8 * again.prompt_positions and again.token_ids == first.token_ids
    # A different image with the same text does not hit the image rows.
    other = engine.generate([EngineRequest(first_ids, pixels(processor, model, ["black"]),
                                           SamplingParams(max_tokens=16))])[0]
    assert other.cached_positions < first_ids.index(-200) + engine.config.block_size


def test_a_prompt_made_to_collide_with_a_cached_one_gets_its_own_answer(loaded):
    """A client that picks its ids so that its first block hashes like another prompt's (under Python's ``hash``)
    must neither take that prompt's K/V nor leave its own for it."""
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=16))
    tail = [9, 10, 11]
    for ids in (COLLIDING_BLOCKS[0] + tail, COLLIDING_BLOCKS[1] + tail, COLLIDING_BLOCKS[0] + tail):
        out = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=8))])[0]
        assert out.token_ids == reference_tokens(model, tokenizer, ids, None, 8, engine.eos_ids)
    assert out.cached_positions == 16  # the first prompt again: its own block is still shared


def test_requests_with_another_cache_salt_share_neither_prefix_nor_image_features(loaded):
    """vLLM's cache_salt: a client outside a salt's group cannot tell from its own timings what was asked in it."""
    tokenizer, model, processor = loaded
    image = pixels(processor, model, ["pink"])
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=4))
    ids = prompt_ids(tokenizer, QUESTIONS[5], 1)
    expected = reference_tokens(model, tokenizer, ids, image, 8, engine.eos_ids)

    def ask(salt) -> tuple[float, int]:
        """(share of the prompt taken from the cache, images run through the tower so far)"""
        out = engine.generate([EngineRequest(ids, image, SamplingParams(max_tokens=8), cache_salt=salt)])[0]
        assert out.token_ids == expected
        return out.cached_positions / out.prompt_positions, engine.stats()["images_encoded"]

    assert ask("team-a") == (0, 1)
    assert ask("team-b") == (0, 2)  # neither the prompt's blocks nor the image's features
    assert ask(None) == (0, 3)
    for salt in ("team-a", None):  # within a salt (or among requests without one): both shared
        shared, encoded = ask(salt)
        assert shared > 0.8 and encoded == 3


@pytest.mark.parametrize("block_size", [4, 8])
def test_questions_on_one_image_arriving_together_compute_its_prefix_once(loaded, monkeypatch, block_size):
    """LLaVA-Bench's shape: several questions per image, all submitted at once. The first question of each image
    computes the system prompt and the image rows; the others wait for them and take them from the cache, and the
    vision tower runs once per image, also when the image's last rows share a block with the question (blocks of 8:
    position 52 ends the image and its newline) and the followers compute those rows themselves."""
    tokenizer, model, processor = loaded
    requests = [(prompt_ids(tokenizer, QUESTIONS[(3 * i + k) % len(QUESTIONS)], 1), color)
                for i, color in enumerate(["red", "green", "purple"]) for k in range(3)]
    images = {color: pixels(processor, model, [color]) for color in ("red", "green", "purple")}

    def run(prefix_cache: bool):
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=16, block_size=block_size,
                                                          max_prefill_tokens=64, enable_prefix_cache=prefix_cache))
        prefilled = []
        prefill = engine.runner.prefill
        monkeypatch.setattr(engine.runner, "prefill",
                            lambda chunks: (prefilled.extend(c.end - c.start for c in chunks), prefill(chunks))[1])
        outputs = engine.generate([EngineRequest(ids, images[color], SamplingParams(max_tokens=12))
                                   for ids, color in requests])
        return outputs, engine.stats()["images_encoded"], sum(prefilled), engine.eos_ids

    shared, towers, positions, eos_ids = run(True)
    alone, towers_alone, positions_alone, _ = run(False)
    for (ids, color), out in zip(requests, shared):
        assert out.token_ids == reference_tokens(model, tokenizer, ids, images[color], 12, eos_ids)
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]
    assert towers == 3 and towers_alone == 9  # the vision tower ran once per image
    image_end = requests[0][0].index(-200) + model.image_token_count
    shared_end = (image_end + 1) // block_size * block_size  # the image and its newline, in whole blocks
    assert all(o.cached_positions >= shared_end for k, o in enumerate(shared) if k % 3)
    assert positions <= positions_alone - 6 * shared_end


def test_the_image_cache_keeps_the_last_images_features(loaded):
    tokenizer, model, processor = loaded
    ids = [prompt_ids(tokenizer, QUESTIONS[k], 1) for k in range(5)]
    images = [pixels(processor, model, [color]) for color in ("red", "green", "blue")]
    order = [0, 1, 0, 2, 0]  # the first image is used again, so the least recently used one goes first

    def encoded(size: int) -> tuple[int, list[list[int]]]:
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=64, image_cache_size=size))
        outputs = [engine.generate([EngineRequest(ids[k], images[i], SamplingParams(max_tokens=6))])[0].token_ids
                   for k, i in enumerate(order)]
        return engine.stats()["images_encoded"], outputs

    # Blocks of 64 hold the whole prompt: nothing is shared as KV, only the features can be.
    assert encoded(3)[0] == 3 and encoded(2)[0] == 3 and encoded(1)[0] == 5 and encoded(0)[0] == 5
    assert encoded(3)[1] == encoded(0)[1]
    with pytest.raises(ValueError, match="image_cache_size"):
        EngineConfig(image_cache_size=-1)


def test_streamed_chunks_concatenate_to_the_final_text(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    streams: dict[int, list] = {0: [], 1: [], 2: []}
    requests = [EngineRequest(prompt_ids(tokenizer, QUESTIONS[k], 1), pixels(processor, model, [COLORS[i]]),
                              SamplingParams(max_tokens=40, ignore_eos=True), streams[i].append)
                for i, k in enumerate((1, 8, 5))]  # Chinese, Bengali, Japanese questions
    engine.generate(requests)
    for outputs in streams.values():
        final = outputs[-1]
        assert final.finished and "".join(o.delta for o in outputs) == final.text
        assert final.text == tokenizer.decode(final.token_ids, skip_special_tokens=True)
        for earlier, later in zip(outputs, outputs[1:]):
            assert later.text.startswith(earlier.text)  # cumulative texts only ever grow
        assert len(outputs) > 5  # streamed, not one final event


def test_stop_strings_and_the_model_length_end_answers(loaded):
    tokenizer, model, _ = loaded
    ids = prompt_ids(tokenizer, QUESTIONS[2], 0)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    free = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=30, ignore_eos=True))])[0]
    stop = free.text[len(free.text) // 2:][:2]
    cut = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True))])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    short = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8, max_model_len=len(ids) + 5))
    out = short.generate([EngineRequest(ids, None, SamplingParams(max_tokens=30, ignore_eos=True))])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_strings_are_looked_for_only_after_min_tokens(loaded):
    """vLLM's rule: a stop string in the first ``min_tokens`` tokens' text does not end the answer; the first one
    that ends after it does (even one that began before it)."""
    tokenizer, model, _ = loaded
    ids = prompt_ids(tokenizer, QUESTIONS[1], 0)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    free = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=40, ignore_eos=True))])[0]
    texts = [tokenizer.decode(free.token_ids[:k], skip_special_tokens=True) for k in range(41)]
    cases = 0
    for stop in sorted({free.text[i:i + n] for n in (1, 2) for i in range(len(free.text) - n + 1)}):
        first = free.text.find(stop)
        for min_tokens in (3, 8, 15):
            start = len(texts[min_tokens]) - len(stop) + 1  # occurrences ending after the first min_tokens' text
            later = free.text.find(stop, max(start, 0))
            if not (0 <= first < start and later >= 0) or "\ufffd" in texts[min_tokens]:
                continue
            cases += 1
            out = engine.generate([EngineRequest(ids, None, SamplingParams(
                max_tokens=40, stop=(stop,), ignore_eos=True, min_tokens=min_tokens))])[0]
            assert out.finish_reason == "stop" and out.text == free.text[:later], (stop, min_tokens)
            assert len(out.token_ids) > min_tokens
        if cases >= 6:
            break
    assert cases >= 3  # the answer held stop strings both before and after min_tokens


def test_stop_strings_count_from_the_token_after_min_tokens(loaded):
    """The boundary of vLLM's rule: with ``min_tokens=k`` stop strings are looked for once the answer holds more than
    k tokens, in text that ends after the first k tokens' text. A stop string that is exactly token k's text (and
    occurs nowhere else) never ends the answer; one that is exactly token k + 1's text ends it there."""
    tokenizer, model, _ = loaded
    ids = prompt_ids(tokenizer, QUESTIONS[0], 0)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    free = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=20, ignore_eos=True))])[0]
    texts = [tokenizer.decode(free.token_ids[:n], skip_special_tokens=True) for n in range(21)]
    own = [texts[n][len(texts[n - 1]):] for n in range(1, 21)]  # own[n - 1]: what token n adds to the text

    def unique(text):
        return text and "\ufffd" not in text and free.text.count(text) == 1

    k = next(k for k in range(2, 19) if unique(own[k - 1]) and unique(own[k]))
    at_k, after_k = engine.generate([
        EngineRequest(ids, None, SamplingParams(max_tokens=20, ignore_eos=True, min_tokens=k, stop=(own[k - 1],))),
        EngineRequest(ids, None, SamplingParams(max_tokens=20, ignore_eos=True, min_tokens=k, stop=(own[k],)))])
    assert at_k.finish_reason == "length" and at_k.text == free.text
    assert after_k.finish_reason == "stop" and after_k.text == texts[k] and len(after_k.token_ids) == k + 1


def test_bad_requests_are_refused_with_clear_errors(loaded):
    tokenizer, model, processor = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8, num_blocks=20, max_waiting=2))
    ids = prompt_ids(tokenizer, QUESTIONS[0], 2)
    with pytest.raises(ImagePlaceholderMismatch, match="1 image.*2 <image>"):
        engine.add_request(EngineRequest(ids, pixels(processor, model, ["red"])))
    with pytest.raises(RequestTooLarge, match="no room"):
        engine.add_request(EngineRequest([1] * model.config.max_position_embeddings))
    with pytest.raises(RequestTooLarge, match="KV blocks"):
        engine.add_request(EngineRequest(prompt_ids(tokenizer, "Hi", 0), None, SamplingParams(max_tokens=400)))
    for _ in range(2):
        engine.add_request(EngineRequest(prompt_ids(tokenizer, "Hi", 0), None, SamplingParams(max_tokens=4)))
    with pytest.raises(QueueFull):
        engine.add_request(EngineRequest(prompt_ids(tokenizer, "Hi", 0), None, SamplingParams(max_tokens=4)))
    engine.run_until_done()  # the accepted ones still finish
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(loaded, monkeypatch):
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    original = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda chunks: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = engine.generate([EngineRequest(prompt_ids(tokenizer, "Hi", 0), None, SamplingParams(max_tokens=4))])[0]
    assert failed.finish_reason == "error" and "boom" in failed.error
    assert engine.stats()["kv_blocks_used"] == 0
    monkeypatch.setattr(engine.runner, "prefill", original)
    ok = engine.generate([EngineRequest(prompt_ids(tokenizer, "Hi", 0), None, SamplingParams(max_tokens=4))])[0]
    assert ok.error is None and len(ok.token_ids) > 0


def test_text_only_llm_runs_too(world):
    from transformers import LlamaForCausalLM

    from palo.model.tokenizer import PaloLlamaTokenizer

    tokenizer = PaloLlamaTokenizer.from_pretrained(world.base_dir)
    model = LlamaForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32).eval()
    ids = tokenizer("USER: Bonjour ! ASSISTANT:").input_ids
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    out = engine.generate([EngineRequest(ids, None, SamplingParams(max_tokens=10))])[0]
    assert out.token_ids == reference_tokens(model, tokenizer, ids, None, 10, engine.eos_ids)


def test_tokens_per_s_counts_the_tokens_of_the_last_window(loaded):
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    requests = [EngineRequest(prompt_ids(tokenizer, q, 0), None, SamplingParams(max_tokens=n, ignore_eos=True))
                for q, n in zip(QUESTIONS, (5, 9, 6))]
    engine.generate(requests)
    assert engine.stats()["tokens_per_s"] == round(20 / engine.token_rate.window, 2)


def test_token_rate_forgets_what_left_the_window_and_holds_no_more():
    rate = TokenRate(window=10.0)
    for t in range(100):  # one token a second for 100 s
        rate.record(float(t))
    assert len(rate) == 11  # seconds 89 to 99: an offline run never asking the rate keeps no more than this
    assert rate.per_second(99.0) == 1.1
    assert rate.per_second(104.5) == 0.5  # seconds 95 to 99
    assert rate.per_second(200.0) == 0.0 and len(rate) == 0


def test_token_rate_is_read_from_many_threads_while_the_engine_records():
    # The worker's heart-beat thread and its status requests read the rate at once; unguarded, two readers pruning
    # the same old entries popped from an empty deque.
    rate = TokenRate(window=10.0)
    for _ in range(50_000):
        rate.record(0.0)
    errors: list[BaseException] = []
    start = threading.Barrier(9)

    def read() -> None:
        start.wait()
        try:
            for k in range(200):
                rate.per_second(100.0 + k)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def write() -> None:
        start.wait()
        for k in range(2_000):
            rate.record(100.0 + k / 10)

    threads = [threading.Thread(target=read) for _ in range(8)] + [threading.Thread(target=write)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to make any race show
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert rate.per_second(300.0) == 10.0  # the writer's last 100 tokens, 290.0 to 299.9


def test_finish_observers_see_each_last_output_and_cannot_fail_a_request(loaded):
    tokenizer, model, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8))
    seen = []

    def broken(output) -> None:
        raise RuntimeError("a metrics bug")

    engine.finish_observers.extend([broken, seen.append])
    requests = [EngineRequest(prompt_ids(tokenizer, q, 0), None, SamplingParams(max_tokens=4)) for q in QUESTIONS[:3]]
    outputs = engine.generate(requests)
    assert all(o.error is None and o.finished for o in outputs)
    assert sorted(o.request_id for o in seen) == sorted(o.request_id for o in outputs)
    assert all(o.latency_s >= o.first_token_s > 0 for o in seen)
