"""Log-probabilities through the worker protocol: each chunk carries its new tokens' entries in OpenAI's shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serve_helpers import image_b64, make_image, vicuna_prompt

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.protocol import iter_chunks
from palo.serve.static_engine import StaticBatchEngine

ADDRESS = "http://127.0.0.1:9"  # never contacted: the workers here do not register


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


def _ask(worker: ModelWorker, params: dict) -> tuple[int, list[dict]]:
    worker.start()
    try:
        with TestClient(create_app(worker)) as client:
            response = client.post("/worker_generate_stream", json=params)
    finally:
        worker.stop()
    return response.status_code, list(iter_chunks([response.content]))


def _worker(loaded, static: bool = False) -> ModelWorker:
    tokenizer, model, processor, context_len = loaded
    engine = (StaticBatchEngine(tokenizer, model, processor, context_len) if static else
              GenerationEngine(tokenizer, model, processor, context_len,
                               engine_config=EngineConfig(max_num_seqs=2, block_size=8)))
    return ModelWorker(engine, "ckpt", ADDRESS, ADDRESS, no_register=True)


def _params(**extra) -> dict:
    return {"prompt": vicuna_prompt("এই ছবিতে কী আছে?"), "images": [image_b64(make_image("green"))],
            "temperature": 0, "max_new_tokens": 24, "stop": "</s>", **extra}


def test_chunks_carry_each_new_tokens_logprob_and_alternatives(loaded):
    worker = _worker(loaded)
    status, chunks = _ask(worker, _params(logprobs=3))
    assert status == 200 and chunks[-1]["error_code"] == 0
    entries = [entry for chunk in chunks for entry in chunk.get("logprobs", [])]
    assert sum(1 for chunk in chunks if chunk.get("logprobs")) > 1  # streamed with the text, not all at the end
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"] > 0
    # The tokens' own bytes, joined, are the answer (a word-initial space aside; a stray byte decodes to U+FFFD).
    answer = chunks[-1]["text"][len(_params()["prompt"]):]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace").lstrip(" ") == answer.lstrip(" ")
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 3
        values = [top["logprob"] for top in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and entry["top_logprobs"][0] == {
            k: entry[k] for k in ("token", "logprob", "bytes")}  # greedy: the chosen token is the most likely
    # The values are the engine's own for this request.
    engine = _worker(loaded).engine
    try:
        direct = engine.generate([engine.prepare(_params(logprobs=3))])[0]
    finally:
        engine.close()
    assert [e["logprob"] for e in entries] == pytest.approx([lp for lp, _ in direct.logprobs], abs=1e-6)


def test_no_logprobs_unless_asked_and_bad_values_or_the_static_engine_are_refused(loaded):
    status, chunks = _ask(_worker(loaded), _params())
    assert status == 200 and not any("logprobs" in chunk for chunk in chunks)
    for bad in (21, -1, "3", True, 1.5):
        status, chunks = _ask(_worker(loaded), _params(logprobs=bad))
        assert status == 400 and "'logprobs' must be null or an integer from 0 to 20" in chunks[-1]["text"], bad
    status, chunks = _ask(_worker(loaded, static=True), _params(logprobs=0))
    assert status == 400 and "--engine static" in chunks[-1]["text"]
