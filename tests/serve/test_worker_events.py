"""How the worker relays engine events to a stream: a client that reads slowly holds at most the newest event."""

from __future__ import annotations

import asyncio
import threading

import pytest
from serve_helpers import vicuna_prompt

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker
from palo.serve.protocol import iter_chunks

ADDRESS = "http://127.0.0.1:9"  # never contacted: the worker here does not register
PROMPT = vicuna_prompt("Describe the picture in detail.", image=False)


@pytest.fixture(scope="module")
def engine(world):
    tokenizer, model, processor, context_len = load_pretrained_model(world.full_dir, device="cpu")
    # No prefix cache: each run of the same request reports the same usage (cached_tokens 0).
    config = EngineConfig(max_num_seqs=2, block_size=8, enable_prefix_cache=False)
    engine = GenerationEngine(tokenizer, model, processor, context_len, engine_config=config).start()
    yield engine
    engine.close()


def _read(engine: GenerationEngine, params: dict, lag: bool) -> tuple[list[dict], list[dict]]:
    """The chunks one request's stream gives, split into those read before and after the reader lagged.

    Args:
        engine: The engine the worker serves with.
        params: The request.
        lag: Read the first chunk, then nothing until the engine has handed the worker its last event (a slow
            client); else read each chunk as it comes.

    Returns:
        The chunks read before the lag (all of them when ``lag`` is false) and those read after it.
    """
    worker = ModelWorker(engine, "ckpt", ADDRESS, ADDRESS, no_register=True)
    last_handed = threading.Event()
    submit = engine.submit

    def submit_watched(prepared, sink):  # tells the test when the engine has sent the request's last event
        def watched(event):
            sink(event)
            if event.finish_reason or event.error:
                last_handed.set()

        return submit(prepared, watched)

    async def read() -> tuple[list[bytes], list[bytes]]:
        stream = worker.generate(engine.prepare(params))
        before = [await stream.__anext__()]
        if lag:
            # The worker's sink hands each event to this loop (call_soon_threadsafe) before the watcher above sets
            # the flag, and to_thread's result comes back the same way after: once it is back, every event of the
            # answer has been delivered to the stream and none read.
            assert await asyncio.to_thread(last_handed.wait, 60)
        after = [chunk async for chunk in stream]
        return (before, after) if lag else (before + after, [])

    engine.submit = submit_watched
    try:
        before, after = asyncio.run(read())
    finally:
        del engine.submit  # the class's own again
    return list(iter_chunks(before)), list(iter_chunks(after))


def _answer(chunks: list[dict]) -> tuple:
    """What a client makes of a stream: the last chunk's text, finish reason and usage, and the logprob entries of
    all chunks in order."""
    return (chunks[-1]["text"], chunks[-1].get("finish_reason"), chunks[-1]["usage"],
            [entry for chunk in chunks for entry in chunk.get("logprobs") or []])


@pytest.mark.parametrize("extra", [{}, {"min_tokens": 30, "stop": "TAIL"}], ids=["length", "stop+min_tokens"])
def test_a_lagging_reader_holds_the_newest_event_only_and_gets_the_same_answer(engine, extra):
    """Before, every engine event waited in an unbounded queue for the reader; each holds the whole answer so far,
    so a client that stopped reading held memory growing with the square of the answer (and was then sent every
    stale chunk). Now it holds at most the newest in-progress event and the last one, and what it reads after the
    lag (text, finish reason, usage, each token's logprob once) is what a reader that kept up got."""
    params = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "logprobs": 2}
    if "stop" in extra:
        # A stop string the answer repeats (the tiny model loops): min_tokens lets it end the answer only after
        # the 30th token, not where it first comes.
        text = _answer(_read(engine, params, lag=False)[0])[0][len(PROMPT):].replace("\ufffd", "")
        extra = {**extra, "stop": text[-2:]}
        assert text.find(extra["stop"]) < len(text) // 2
    params.update(extra)
    prompt_reader, _ = _read(engine, params, lag=False)
    first, after_lag = _read(engine, params, lag=True)
    assert len(prompt_reader) > 10  # the engine streamed many events, one per token or so
    assert 1 <= len(after_lag) <= 2, len(after_lag)  # all of them would have waited (and been sent) before
    lagged = first + after_lag
    assert _answer(lagged) == _answer(prompt_reader)
    assert _answer(lagged)[1] == ("stop" if "stop" in extra else "length")
    assert _answer(lagged)[2]["completion_tokens"] >= 30
    # Each chunk carries the logprobs of the tokens it newly counts, skipped events or not.
    for chunks in (prompt_reader, lagged):
        counted = [sum(len(c.get("logprobs") or []) for c in chunks[: i + 1]) for i in range(len(chunks))]
        assert counted == [c["usage"]["completion_tokens"] for c in chunks]
