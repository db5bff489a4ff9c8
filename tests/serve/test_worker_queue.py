"""The worker over real HTTP: status reports the engine, a full queue answers 503 with Retry-After, nothing is lost."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn
from serve_helpers import free_port, image_b64, make_image, vicuna_prompt

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.protocol import ChunkDecoder


@pytest.fixture()
def gated_worker(world):
    """A worker (1 request in the engine at once, 2 may wait) whose engine steps only once the gate opens."""
    tokenizer, model, processor, context_len = load_pretrained_model(world.full_dir, device="cpu")
    engine = GenerationEngine(tokenizer, model, processor, context_len,
                              engine_config=EngineConfig(max_num_seqs=1, block_size=8))
    gate = threading.Event()
    step = engine.engine.step

    def gated_step():
        gate.wait(60)
        step()

    engine.engine.step = gated_step
    worker = ModelWorker(engine, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=1,
                         max_queue=2, no_register=True)
    worker.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url, gate
    finally:
        gate.set()
        server.should_exit = True
        thread.join(10)
        worker.stop()


def _status(url: str) -> dict:
    return httpx.post(url + "/worker_get_status", timeout=10).json()


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_full_queue_answers_503_and_every_accepted_request_completes(gated_worker):
    url, gate = gated_worker
    params = {"prompt": vicuna_prompt("ما هذا؟"), "images": [image_b64(make_image("green"))], "temperature": 0,
              "max_new_tokens": 12}
    answers: dict[int, list] = {}

    def ask(i: int) -> None:
        with httpx.stream("POST", url + "/worker_generate_stream", json=params, timeout=60) as response:
            decoder = ChunkDecoder()
            chunks = [c for data in response.iter_bytes() for c in decoder.feed(data)]
            answers[i] = [response.status_code, chunks]

    threads = [threading.Thread(target=ask, args=(0,))]
    threads[0].start()
    _wait(lambda: _status(url)["engine"]["worker_running"] == 1, "the first request entering the engine")
    for i in (1, 2):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
    _wait(lambda: _status(url)["engine"]["worker_waiting"] == 2, "two requests waiting")
    status = _status(url)
    assert status["queue_length"] == 3 and status["engine"]["max_queue"] == 2
    assert {"running", "waiting", "kv_blocks_total", "kv_blocks_used", "tokens_per_s"} <= set(status["engine"])

    refused = httpx.post(url + "/worker_generate_stream", json=params, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "busy" in json.loads(refused.content.rstrip(b"\0"))["text"]

    gate.set()
    for thread in threads:
        thread.join(60)
    texts = set()
    for status_code, chunks in answers.values():
        assert status_code == 200 and chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] in ("stop", "length")
        texts.add(chunks[-1]["text"])
    assert len(answers) == 3 and len(texts) == 1  # the same greedy answer for the same request, every time
    after = _status(url)
    assert after["engine"]["rejected"] == 1 and after["queue_length"] == 0 and after["engine"]["kv_blocks_used"] == 0
