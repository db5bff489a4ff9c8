"""The worker over real HTTP: status reports the engine, a full queue answers 503 with Retry-After, nothing is lost."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from serve_helpers import image_b64, make_image, served, vicuna_prompt

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.protocol import ChunkDecoder


@pytest.fixture(params=[2])
def gated_worker(world, request):
    """A worker (1 request in the engine at once, ``param`` may wait) whose engine steps only once the gate opens."""
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
                         max_queue=request.param, no_register=True)
    worker.start()
    try:
        with served(create_app(worker)) as url:
            try:
                yield url, gate, worker
            finally:
                gate.set()
    finally:
        worker.stop()


def _status(url: str) -> dict:
    return httpx.post(url + "/worker_get_status", timeout=10).json()


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_full_queue_answers_503_and_every_accepted_request_completes(gated_worker):
    url, gate, worker = gated_worker
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

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    worker.logger.addHandler(handler)
    try:
        for _ in range(4):  # as the API asks again for a later answer: counted each time, logged once a second
            refused = httpx.post(url + "/worker_generate_stream", json=params, timeout=10)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert "busy" in json.loads(refused.content.rstrip(b"\0"))["text"]
    finally:
        worker.logger.removeHandler(handler)
    assert 1 <= len([line for line in lines if "queue full" in line]) <= 2  # 2 if the 4 took over a second

    gate.set()
    for thread in threads:
        thread.join(60)
    texts = set()
    for status_code, chunks in answers.values():
        assert (status_code == 200 and chunks[-1]["error_code"] == 0
                and chunks[-1]["finish_reason"] in ("stop", "length"))
        texts.add(chunks[-1]["text"])
    assert len(answers) == 3 and len(texts) == 1  # the same greedy answer for the same request, every time
    after = _status(url)
    assert after["engine"]["rejected"] == 4 and after["queue_length"] == 0 and after["engine"]["kv_blocks_used"] == 0
    metrics = httpx.get(url + "/metrics", timeout=10).text  # the 503 is counted for Prometheus too
    assert 'palo:worker_requests_rejected_total{model_name="ckpt"} 4.0' in metrics


@pytest.mark.parametrize("gated_worker", [6], indirect=True)
def test_images_are_read_a_few_requests_at_a_time_and_a_burst_beyond_the_queue_is_refused_unread(gated_worker):
    """Reading a request decodes its images (about a gigabyte each at the size limit): at most READ_CONCURRENCY at
    once, and requests beyond the queue get their 503 before any is decoded."""
    from palo.serve.model_worker import READ_CONCURRENCY

    url, gate, worker = gated_worker
    reading, most, calls = [0], [0], [0]
    lock, release = threading.Lock(), threading.Event()
    prepare = worker.engine.prepare

    def slow_prepare(*args, **kwargs):
        with lock:
            calls[0] += 1
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        try:
            release.wait(60)
            return prepare(*args, **kwargs)
        finally:
            with lock:
                reading[0] -= 1

    worker.engine.prepare = slow_prepare
    params = {"prompt": vicuna_prompt("这是什么？"), "images": [image_b64(make_image("red"))], "temperature": 0,
              "max_new_tokens": 2}
    codes: list[int] = []

    def ask() -> None:
        codes.append(httpx.post(url + "/worker_generate_stream", json=params, timeout=60).status_code)

    threads = [threading.Thread(target=ask) for _ in range(7)]  # the engine's 1 place and 6 waiting: all fit
    for thread in threads:
        thread.start()
    _wait(lambda: _status(url)["engine"]["worker_preparing"] == 7, "seven requests being read")
    assert most[0] == reading[0] == READ_CONCURRENCY < 7
    refused = httpx.post(url + "/worker_generate_stream", json=params, timeout=10)  # an eighth: no room, unread
    assert refused.status_code == 503 and calls[0] == READ_CONCURRENCY
    release.set()
    gate.set()
    for thread in threads:
        thread.join(60)
    assert codes == [200] * 7 and most[0] == READ_CONCURRENCY and calls[0] == 7
    assert _status(url)["engine"]["worker_preparing"] == 0


@pytest.mark.parametrize("gated_worker", [0], indirect=True)
def test_the_controller_passes_a_busy_workers_503_on_with_retry_after(gated_worker):
    from palo.serve.controller import Controller
    from palo.serve.controller import create_app as controller_app

    worker_url, gate, _ = gated_worker
    controller = Controller()
    try:
        with served(controller_app(controller)) as url:
            assert httpx.post(url + "/register_worker", json={"worker_name": worker_url, "check_heart_beat": False},
                              timeout=10).status_code == 200
            body = {"model": "ckpt", "prompt": vicuna_prompt("Что это?", image=False), "temperature": 0,
                    "max_new_tokens": 4}
            first = threading.Thread(target=lambda: httpx.post(url + "/worker_generate_stream", json=body, timeout=60))
            first.start()
            _wait(lambda: _status(worker_url)["engine"]["worker_running"] == 1, "the first request in the engine")
            busy = httpx.post(url + "/worker_generate_stream", json=body, timeout=10)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            chat = httpx.post(url + "/v1/chat/completions", timeout=10, json={
                "model": "ckpt", "messages": [{"role": "user", "content": "Что это?"}], "max_tokens": 4})
            assert chat.status_code == 503 and chat.headers["Retry-After"] == "1"
            assert "busy" in chat.json()["error"]["message"]
            gate.set()
            first.join(60)
            ok = httpx.post(url + "/worker_generate_stream", json=body, timeout=60)
            assert ok.status_code == 200  # once the worker has room again, it serves
    finally:
        gate.set()


def test_a_client_that_disconnects_is_dropped_and_its_cache_freed(gated_worker):
    url, gate, worker = gated_worker
    engine = worker.engine.engine
    finished = []
    finish = engine._finish
    engine._finish = lambda seq, reason, error=None: (finished.append((reason, len(seq.output_ids))),
                                                      finish(seq, reason, error))
    gate.set()
    params = {"prompt": vicuna_prompt("এটা কি?"), "images": [image_b64(make_image("red"))], "temperature": 0,
              "max_new_tokens": 400}
    with httpx.stream("POST", url + "/worker_generate_stream", json=params, timeout=60) as response:
        for _ in response.iter_bytes():
            break  # the first chunk arrived: the request is generating; now hang up
    _wait(lambda: finished, "the engine dropping the request")
    reason, generated = finished[0]
    assert reason == "abort" and generated < 300, generated
    _wait(lambda: _status(url)["engine"]["kv_blocks_used"] == 0 and _status(url)["queue_length"] == 0,
          "the cache and the queue emptied")


def test_a_request_counts_in_the_queue_from_its_admission_not_from_its_streams_first_step(world):
    """A request was counted as waiting only once its response body began, after the response was sent: requests
    admitted in between each passed the queue check, and a full queue took more (4 of 8 rounds of a burst over real
    HTTP went over --max-queue). Here the streams never begin at all: only the admitted requests may pass, and a
    client that leaves before its stream's first step leaves nothing counted."""
    import asyncio

    from palo.serve.utils import StalledClientClosingResponse

    tokenizer, model, processor, context_len = load_pretrained_model(world.full_dir, device="cpu")
    engine = GenerationEngine(tokenizer, model, processor, context_len,
                              engine_config=EngineConfig(max_num_seqs=1, block_size=8))
    worker = ModelWorker(engine, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=1,
                         max_queue=2, no_register=True)
    body = json.dumps({"prompt": vicuna_prompt("hello", image=False), "temperature": 0, "max_new_tokens": 4}).encode()

    class Request:
        async def body(self) -> bytes:
            return body

    async def run():
        responses = [await worker._answer(Request()) for _ in range(4)]
        counted = worker.get_queue_length()
        for response in responses:
            if isinstance(response, StalledClientClosingResponse):
                await response._close()  # what the response does however it ends: here, before its first step
        return [r.status_code for r in responses], counted

    worker.start()
    try:
        codes, counted = asyncio.run(run())
    finally:
        worker.stop()
    assert codes == [200, 200, 200, 503] and counted == 3  # 1 slot + a queue of 2
    assert worker.waiting == 0 and worker.running == 0


def test_a_request_waiting_for_a_place_outlives_its_readers_per_read_timeout(gated_worker, monkeypatch):
    """A queued request sent nothing until it had a place: a reader's per-read timeout (the web demo's 10 s, the API's
    --read-timeout) failed it, as "the model worker failed: " with no reason, while it was only waiting its turn. The
    worker now sends empty chunks while it waits, and the controller's relay passes them on."""
    from palo.serve import worker_base
    from palo.serve.controller import Controller
    from palo.serve.controller import create_app as controller_app

    monkeypatch.setattr(worker_base, "QUEUE_KEEPALIVE_S", 0.1)
    worker_url, gate, _ = gated_worker
    controller = Controller()
    body = {"model": "ckpt", "prompt": vicuna_prompt("Что это?", image=False), "temperature": 0, "max_new_tokens": 4}
    results: dict[str, object] = {}

    def ask(name: str, url: str) -> None:
        try:
            with httpx.stream("POST", url + "/worker_generate_stream", json=body,
                              timeout=httpx.Timeout(1.0, connect=10)) as response:
                data = b"".join(response.iter_bytes())
            results[name] = (response.status_code, data)
        except httpx.HTTPError as exc:
            results[name] = exc

    with served(controller_app(controller)) as url:
        assert httpx.post(url + "/register_worker", json={"worker_name": worker_url, "check_heart_beat": False},
                          timeout=10).status_code == 200
        first = threading.Thread(target=lambda: httpx.post(worker_url + "/worker_generate_stream", json=body,
                                                           timeout=60))
        first.start()
        _wait(lambda: _status(worker_url)["engine"]["worker_running"] == 1, "the first request in the engine")
        waiting = [threading.Thread(target=ask, args=("direct", worker_url)),
                   threading.Thread(target=ask, args=("relayed", url))]
        for thread in waiting:
            thread.start()
        _wait(lambda: _status(worker_url)["engine"]["worker_waiting"] == 2, "two requests waiting")
        time.sleep(2.5)  # over twice the readers' timeout
        gate.set()
        for thread in [first, *waiting]:
            thread.join(60)
    for name in ("direct", "relayed"):
        status, data = results[name]  # an exception here: the reader timed out
        assert status == 200 and data.startswith(b"\0\0"), (name, data[:20])
        chunks = ChunkDecoder().feed(data)
        assert chunks and chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] in ("stop", "length")


def test_a_client_that_leaves_while_its_request_waits_frees_nothing_it_did_not_hold(gated_worker, monkeypatch):
    """The waiting request now sends keep-alives, so its client can leave in the middle of one: the place it waited
    for is given up (or handed on, when it came just then), and the worker serves the next request."""
    from palo.serve import worker_base

    monkeypatch.setattr(worker_base, "QUEUE_KEEPALIVE_S", 0.05)
    url, gate, worker = gated_worker
    body = {"model": "ckpt", "prompt": vicuna_prompt("Что это?", image=False), "temperature": 0, "max_new_tokens": 4}
    first = threading.Thread(target=lambda: httpx.post(url + "/worker_generate_stream", json=body, timeout=60))
    first.start()
    _wait(lambda: _status(url)["engine"]["worker_running"] == 1, "the first request in the engine")
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=60) as response:
        seen = b""
        for data in response.iter_bytes():
            seen += data
            if len(seen) >= 3:
                break  # three keep-alives: leave while still waiting
    assert seen[:3] == b"\0\0\0"
    _wait(lambda: _status(url)["engine"]["worker_waiting"] == 0, "the left request no longer waiting")
    gate.set()
    first.join(60)
    answer = httpx.post(url + "/worker_generate_stream", json=body, timeout=60)
    assert answer.status_code == 200 and ChunkDecoder().feed(answer.content)[-1]["error_code"] == 0
    _wait(lambda: _status(url)["queue_length"] == 0 and worker.semaphore._value == 1, "the worker idle, its place free")
