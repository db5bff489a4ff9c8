"""Failures inside the engine thread and at shutdown: every request gets exactly one final output, the ones a failure
does not belong to are unaffected, and a dead or closed engine refuses new requests instead of queueing them."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from engine_helpers import QUESTIONS, prompt_ids, reference_tokens

from palo.engine import EngineClosed, EngineConfig, EngineRequest, LLMEngine, SamplingParams, llm_engine

WAIT_S = 10.0  # far above what these tiny requests take: a final output not in by then never comes
PADDING = 8  # model ids past the tokenizer's


class Collector:
    """A request's ``on_output``: keeps every output the engine thread sends; ``done`` is set by the first final."""

    def __init__(self) -> None:
        self.outputs: list = []
        self.done = threading.Event()

    def __call__(self, output) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()

    @property
    def finals(self) -> list:
        return [o for o in self.outputs if o.finished]


def _engine(model, tokenizer, **config) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(**{"max_num_seqs": 4, "block_size": 8, **config}))


def _request(tokenizer, question: str, collector: Collector, **sampling) -> EngineRequest:
    return EngineRequest(prompt_ids(tokenizer, question, 0), None, SamplingParams(**sampling), on_output=collector)


def _wait_all(collectors: list[Collector]) -> list[int]:
    """Indices of the collectors whose final output did not come within ``WAIT_S`` seconds in all."""
    deadline = time.monotonic() + WAIT_S
    return [i for i, c in enumerate(collectors) if not c.done.wait(max(0.0, deadline - time.monotonic()))]


def _assert_drained(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert (stats["waiting"], stats["running"], stats["kv_blocks_used"]) == (0, 0, 0)
    assert not engine._by_id


@pytest.fixture(scope="module")
def padded(loaded):
    """A copy of the tiny model with ``PADDING`` ids past its tokenizer (as checkpoints pad their vocabulary to a
    multiple of 64): an id the model can be made to produce but the tokenizer cannot decode. The new rows are zero,
    so the copy answers the real ids exactly as before and never picks a padded one on its own."""
    tokenizer, model, _ = loaded
    model = copy.deepcopy(model)
    model.resize_token_embeddings(len(tokenizer) + PADDING, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer):] = 0
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    return tokenizer, model.eval()


# -- a token the tokenizer cannot decode ------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_token_the_tokenizer_lacks_ends_its_request_once_and_leaves_the_others_alone(padded, monkeypatch, phase):
    """Before, the detokenizer raised again while the request was being finished (in its end-of-answer flush),
    after it had left the scheduler and before its final output: the error escaped the step, the request never got
    a final output (its caller hung) and every other request of the step was failed with "engine step failed".
    Now it ends with its own error and the text streamed so far, and the others answer as they do alone."""
    tokenizer, model = padded
    bad_id = len(tokenizer) + 3
    engine = _engine(model, tokenizer, enable_prefix_cache=False)  # all three prompts prefilled in one step
    if phase == "prefill":  # reachable from outside: a bias on an id of the model's (padded) vocabulary
        bad_sampling = {"logit_bias": {bad_id: 100.0}}
    else:  # the model itself picks the padded id, at the answer's 4th token (a decode step shared with the others)
        bad_sampling = {"seed": 13}
        real_sample_each = engine._sample_each

        def sample_each(logits, seqs):
            tokens, logprobs, refused = real_sample_each(logits, seqs)
            for i, seq in enumerate(seqs):
                if seq.sampling.seed == 13 and len(seq.output_ids) == 3:
                    tokens[i] = bad_id
            return tokens, logprobs, refused

        monkeypatch.setattr(engine, "_sample_each", sample_each)
    innocent, bad = [Collector(), Collector()], Collector()
    # The bad request first: its failure came before the others' tokens of the same step.
    engine.add_request(_request(tokenizer, QUESTIONS[1], bad, max_tokens=8, ignore_eos=True, **bad_sampling))
    for question, collector in zip((QUESTIONS[0], QUESTIONS[2]), innocent):
        engine.add_request(_request(tokenizer, question, collector, max_tokens=8))
    engine.start()
    try:
        assert _wait_all([bad, *innocent]) == []
        assert engine.is_running()
    finally:
        engine.close()
    assert [len(c.finals) for c in (bad, *innocent)] == [1, 1, 1]  # the thread has ended: no output comes later
    final = bad.finals[0]
    assert final.finish_reason == "error" and "out of range" in final.error
    streamed = [o for o in bad.outputs if not o.finished]
    assert len(streamed) == (0 if phase == "prefill" else 3)
    assert final.text == (streamed[-1].text if streamed else "") and final.delta == ""
    for question, collector in zip((QUESTIONS[0], QUESTIONS[2]), innocent):
        expected = reference_tokens(model, tokenizer, prompt_ids(tokenizer, question, 0), None, 8, engine.eos_ids)
        assert all(t < len(tokenizer) for t in expected)  # the padded rows are never the model's own choice
        assert collector.finals[0].error is None and collector.finals[0].token_ids == expected
    _assert_drained(engine)


# -- the error handler itself failing ---------------------------------------------------------------------------


def test_an_error_emptying_the_cuda_cache_fails_only_the_failed_requests(loaded, monkeypatch):
    """Before, ``torch.cuda.empty_cache()`` raising in the error handler (a sticky CUDA error) escaped it and killed
    the engine thread: the next request was accepted and never answered. Now it is logged: the requests of the
    failed step end with its error and the engine goes on serving."""
    tokenizer, model, _ = loaded
    engine = _engine(model, tokenizer)
    real_decode = engine.runner.decode
    broken = [True]

    def decode(seqs):
        if broken[0]:
            broken[0] = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_decode(seqs)

    def empty_cache():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "decode", decode)
    monkeypatch.setattr(llm_engine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(llm_engine.torch.cuda, "empty_cache", empty_cache)
    engine.start()
    try:
        failed = Collector()
        engine.add_request(_request(tokenizer, QUESTIONS[0], failed, max_tokens=6))
        assert _wait_all([failed]) == []
        later = Collector()
        engine.add_request(_request(tokenizer, QUESTIONS[1], later, max_tokens=6))
        assert _wait_all([later]) == []
        assert engine.is_running()
    finally:
        engine.close()
    assert len(failed.finals) == 1 and "illegal memory access" in failed.finals[0].error
    expected = reference_tokens(model, tokenizer, prompt_ids(tokenizer, QUESTIONS[1], 0), None, 6, engine.eos_ids)
    assert len(later.finals) == 1 and later.finals[0].error is None and later.finals[0].token_ids == expected
    _assert_drained(engine)


def test_when_the_engine_thread_dies_every_request_ends_and_new_ones_are_refused(loaded, monkeypatch):
    """Before, an error raised by the step's error handler itself ended the engine thread without its shutdown:
    running, waiting and newly added requests never got a final output, and add_request went on accepting requests
    nobody would run. Now the thread's end, whatever causes it, closes the engine and ends them all with an error."""
    tokenizer, model, _ = loaded
    engine = _engine(model, tokenizer, max_num_seqs=2)
    inside, gate = threading.Event(), threading.Event()

    def decode(seqs):  # held, so that a request can be added while the thread is busy; then it fails
        inside.set()
        gate.wait(WAIT_S)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fail(seqs, exc):
        raise RuntimeError("the error handler broke")

    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    monkeypatch.setattr(engine.runner, "decode", decode)
    monkeypatch.setattr(engine, "_fail", fail)
    collectors = [Collector() for _ in range(4)]
    for question, collector in zip(QUESTIONS, collectors[:3]):  # two run, one waits for a place
        engine.add_request(_request(tokenizer, question, collector, max_tokens=6))
    engine.start()
    try:
        assert inside.wait(WAIT_S)
        engine.add_request(_request(tokenizer, QUESTIONS[3], collectors[3], max_tokens=6))  # still in the inbox
        gate.set()
        missing = _wait_all(collectors)
        engine._thread.join(WAIT_S)
        assert not engine._thread.is_alive() and not engine.is_running()
        assert [str(exc) for exc in died] == ["the error handler broke"]
        assert missing == []
        with pytest.raises(EngineClosed):
            engine.add_request(_request(tokenizer, QUESTIONS[4], Collector(), max_tokens=6))
    finally:
        gate.set()
        engine.close()
    for collector in collectors:
        assert len(collector.finals) == 1 and collector.finals[0].error == "the engine was shut down"
    _assert_drained(engine)


# -- close() ----------------------------------------------------------------------------------------------------


def test_close_before_start_ends_the_requests_already_added(loaded):
    """Before, close() on an engine whose thread was never started left the requests already added without a final
    output (no thread ran the shutdown) and counted as waiting. Now close() ends them itself, once."""
    tokenizer, model, _ = loaded
    engine = _engine(model, tokenizer)
    collectors = [Collector(), Collector()]
    for question, collector in zip(QUESTIONS, collectors):
        engine.add_request(_request(tokenizer, question, collector, max_tokens=6))
    engine.close()
    assert [len(c.finals) for c in collectors] == [1, 1]  # at once, in close() itself
    assert all(c.finals[0].error == "the engine was shut down" for c in collectors)
    _assert_drained(engine)
    with pytest.raises(EngineClosed):
        engine.add_request(_request(tokenizer, QUESTIONS[2], Collector(), max_tokens=6))
    engine.start()  # a thread started after close ends at once, without ending anything a second time
    engine._thread.join(WAIT_S)
    engine.close()
    assert [len(c.outputs) for c in collectors] == [1, 1]


def test_close_while_requests_wait_in_the_inbox_leaves_nothing_counted_as_waiting(loaded, monkeypatch):
    """Before, the shutdown ended the requests still in the inbox (added during the last step) but kept them
    there: stats() counted them as waiting forever. Now the inbox is emptied as they are ended."""
    tokenizer, model, _ = loaded
    engine = _engine(model, tokenizer, max_num_seqs=2)
    real_decode = engine.runner.decode
    inside, gate = threading.Event(), threading.Event()

    def decode(seqs):  # held inside a step, so that the requests added meanwhile stay in the inbox
        inside.set()
        gate.wait(WAIT_S)
        return real_decode(seqs)

    monkeypatch.setattr(engine.runner, "decode", decode)
    running = Collector()
    engine.add_request(_request(tokenizer, QUESTIONS[0], running, max_tokens=6))
    engine.start()
    inbox = [Collector() for _ in range(3)]
    try:
        assert inside.wait(WAIT_S)
        for question, collector in zip(QUESTIONS[1:], inbox):
            engine.add_request(_request(tokenizer, question, collector, max_tokens=6))
        closer = threading.Thread(target=engine.close)
        closer.start()
        while not engine._closed:  # close() has landed while the step is still held
            closer.join(0.01)
    finally:
        gate.set()
    closer.join(WAIT_S)
    assert not engine._thread.is_alive()
    for collector in (running, *inbox):
        assert len(collector.finals) == 1 and collector.finals[0].error == "the engine was shut down"
    _assert_drained(engine)
