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
    # Each chunk carries the entries of the tokens it counts, however far the engine has gone meanwhile.
    counted = [len([e for c in chunks[: i + 1] for e in c.get("logprobs", [])]) for i in range(len(chunks))]
    assert counted == [c["usage"]["completion_tokens"] for c in chunks]
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


def test_prompt_logprobs_score_every_prompt_id_once_and_max_new_tokens_0_scores_only(loaded):
    tokenizer = loaded[0]
    status, chunks = _ask(_worker(loaded), _params(prompt_logprobs=2, max_new_tokens=0))
    assert status == 200 and len(chunks) == 1
    chunk = chunks[0]
    assert chunk["text"] == _params()["prompt"] and chunk["finish_reason"] == "length"
    assert chunk["usage"]["completion_tokens"] == 0 and "logprobs" not in chunk
    engine = _worker(loaded).engine
    try:
        prepared = engine.prepare(_params(prompt_logprobs=2, max_new_tokens=0))
        direct = engine.generate([prepared])[0]
    finally:
        engine.close()
    entries = chunk["prompt_logprobs"]
    assert len(entries) == len(prepared.input_ids) == len(direct.prompt_logprobs)
    assert [e["id"] for e in entries] == prepared.input_ids
    assert entries[0] == {"id": prepared.input_ids[0], "token": tokenizer.convert_ids_to_tokens(prepared.input_ids[0]),
                          "logprob": None,
                          "bytes": list(tokenizer.convert_ids_to_tokens(prepared.input_ids[0]).encode()),
                          "top_logprobs": None}
    image = prepared.input_ids.index(-200)
    assert entries[image]["token"] == "<image>" and entries[image]["logprob"] is None
    scored = [(e, d) for e, d in zip(entries, direct.prompt_logprobs) if d is not None]
    assert len(scored) == len(entries) - 2
    assert [e["logprob"] for e, _ in scored] == pytest.approx([lp for _, (lp, _) in scored], abs=1e-6)
    assert all([t["id"] for t in e["top_logprobs"]] == [i for i, _ in d[1]] for e, d in scored)
    assert all(len(e["top_logprobs"]) == 2 for e, _ in scored)
    # With an answer: the prompt's entries come once, in the first chunk, then the answer streams as usual.
    status, chunks = _ask(_worker(loaded), _params(prompt_logprobs=0, max_new_tokens=8))
    assert status == 200 and [i for i, c in enumerate(chunks) if "prompt_logprobs" in c] == [0]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_prompt_sent_as_token_ids_is_used_as_it_is(loaded):
    tokenizer = loaded[0]
    prompt = vicuna_prompt("¿Qué hay aquí?").replace("<image>\n", "")
    ids = tokenizer(prompt).input_ids
    status, by_text = _ask(_worker(loaded), {"prompt": prompt, "temperature": 0, "max_new_tokens": 12})
    status_ids, by_ids = _ask(_worker(loaded), {"prompt_token_ids": ids, "temperature": 0, "max_new_tokens": 12,
                                               "prompt_logprobs": 1})
    assert status == status_ids == 200
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert by_ids[-1]["text"] == decoded + by_text[-1]["text"][len(prompt):]  # the same answer
    assert by_ids[-1]["usage"] == by_text[-1]["usage"]
    assert len(by_ids[0]["prompt_logprobs"]) == len(ids)  # no BOS added: the ids as sent
    no_bos = ids[1:]
    status, chunks = _ask(_worker(loaded), {"prompt_token_ids": no_bos, "max_new_tokens": 0, "prompt_logprobs": 0})
    assert status == 200 and len(chunks[0]["prompt_logprobs"]) == len(no_bos)
    assert chunks[0]["prompt_logprobs"][0]["token"] == tokenizer.convert_ids_to_tokens(no_bos[0]).replace("▁", " ")


@pytest.mark.parametrize(("params", "message"), [
    ({"prompt": "x", "prompt_token_ids": [1, 2]}, "not both"),
    ({"prompt_token_ids": []}, "non-empty list of token ids"),
    ({"prompt_token_ids": [1, 10**9]}, "non-empty list of token ids"),
    ({"prompt_token_ids": [1, "2"]}, "non-empty list of token ids"),
    ({"prompt_token_ids": [1, 2], "images": ["aGk="]}, "takes no images"),
    ({"prompt": "x", "max_new_tokens": 0}, "0 only with 'prompt_logprobs'"),
    ({"prompt": "x", "prompt_logprobs": 21}, "'prompt_logprobs' must be null or an integer"),
])
def test_bad_scoring_requests_are_refused_by_name(loaded, params, message):
    status, chunks = _ask(_worker(loaded), params)
    assert status == 400 and message in chunks[-1]["text"]


def test_the_static_engine_refuses_prompt_logprobs(loaded):
    status, chunks = _ask(_worker(loaded, static=True), _params(prompt_logprobs=0))
    assert status == 400 and "'prompt_logprobs' needs the paged engine" in chunks[-1]["text"]
