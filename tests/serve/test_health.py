"""``GET /health`` (the path orchestrators probe on vLLM and SGLang): a worker answers 503 when its engine thread is
not running (not started, stopped, or died), and then sends no heartbeats; the controller answers with its models."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from serve_helpers import served

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve import controller as controller_module
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.static_engine import StaticBatchEngine


class Die(BaseException):
    """Not an Exception: the engine loop does not catch it, so its thread ends (a bug that kills the thread)."""


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


def _health(worker: ModelWorker) -> tuple[int, dict]:
    response = TestClient(create_app(worker)).get("/health")
    return response.status_code, response.json()


@pytest.mark.parametrize("kind", ["paged", "static"])
def test_a_workers_health_follows_its_engine_thread(loaded, kind):
    tokenizer, model, processor, context_len = loaded
    engine = (GenerationEngine(tokenizer, model, processor, context_len, engine_config=EngineConfig(max_num_seqs=2))
              if kind == "paged" else StaticBatchEngine(tokenizer, model, processor, context_len))
    worker = ModelWorker(engine, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
    assert _health(worker) == (503, {"status": "unhealthy"})  # not started
    worker.start()
    try:
        assert _health(worker) == (200, {"status": "ok"}) and worker.check_health()
    finally:
        worker.stop()
    assert _health(worker)[0] == 503 and not worker.check_health()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, on purpose
def test_a_worker_whose_engine_thread_died_is_unhealthy(loaded):
    tokenizer, model, processor, context_len = loaded
    engine = GenerationEngine(tokenizer, model, processor, context_len, engine_config=EngineConfig(max_num_seqs=2))

    def die():
        raise Die

    engine.engine.step = die
    worker = ModelWorker(engine, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
    worker.start()
    try:
        assert _health(worker)[0] == 200
        prepared = engine.prepare({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 2})
        engine.submit(prepared, lambda event: None)  # the next step kills the thread
        deadline = time.monotonic() + 10
        while engine.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _health(worker) == (503, {"status": "unhealthy"}) and not worker.check_health()
        # Nor does it look alive to a controller that polls it, nor take requests (a 503 sends them elsewhere).
        client = TestClient(create_app(worker))
        status = client.post("/worker_get_status")
        assert status.status_code == 503 and "unhealthy" in status.json()["error"]
        answer = client.post("/worker_generate_stream", json={"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 2})
        assert answer.status_code == 503 and b"unhealthy" in answer.content
        controller = controller_module.Controller("shortest_queue", 30)
        status = {"model_names": ["ckpt"], "speed": 1, "queue_length": 0}
        with served(create_app(worker)) as url:
            controller.register_worker(url, True, status)
            controller.refresh_all_workers()  # what the web demo's page loads call: it revived the dead worker
            assert controller.list_models() == []
            # A request relayed to it drops it at once: "no worker" (404), not "busy, retry" until heartbeats expire.
            controller.register_worker(url, True, status)
            relay = TestClient(controller_module.create_app(controller, read_timeout=5, api_key=None))
            answer = relay.post("/worker_generate_stream", json={"model": "ckpt", "prompt": "USER: hi ASSISTANT:"})
            assert answer.status_code == 404 and controller.list_models() == []
    finally:
        worker.stop()


def test_the_controller_answers_health_with_its_models():
    controller = controller_module.Controller("shortest_queue", 30)
    client = TestClient(controller_module.create_app(controller, read_timeout=5, api_key="secret"))
    response = client.get("/health")  # no key needed: a probe carries none
    assert response.status_code == 200 and response.json() == {"status": "ok", "models": []}
