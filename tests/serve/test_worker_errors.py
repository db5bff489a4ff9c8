"""A failure while answering is logged with its traceback where the worker logs, and the client still gets the
original protocol's error chunk (error code 1, the original error text first) instead of a cut stream."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from serve_helpers import image_b64, make_image, vicuna_prompt

from palo.engine import EngineConfig
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.protocol import SERVER_ERROR_MSG, WORKER_ERROR, iter_chunks
from palo.serve.static_engine import StaticBatchEngine

ADDRESS = "http://127.0.0.1:9"  # never contacted: the workers here do not register


class ListHandler(logging.Handler):
    """Keeps the formatted records (tracebacks included), like the worker's log file would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


@pytest.fixture
def worker_log():
    """A service logger as ``build_logger`` makes one: its own handler, not propagating to the root."""
    logger = logging.getLogger("test_worker_errors")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = ListHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)
    logging.getLogger("palo.engine").removeHandler(handler)  # GenerationEngine routes the engine's records here


def _engine(kind: str, loaded, logger: logging.Logger):
    tokenizer, model, processor, context_len = loaded
    if kind == "static":
        return StaticBatchEngine(tokenizer, model, processor, context_len, max_batch_size=2, batch_wait_ms=1,
                                 logger=logger)
    return GenerationEngine(tokenizer, model, processor, context_len, logger=logger,
                            engine_config=EngineConfig(max_num_seqs=2, block_size=8))


def _ask(worker: ModelWorker, params: dict) -> tuple[int, list[dict]]:
    with TestClient(create_app(worker)) as client:
        response = client.post("/worker_generate_stream", json=params)
    return response.status_code, list(iter_chunks([response.content]))


def _params() -> dict:
    return {"prompt": vicuna_prompt("ما هذا؟"), "images": [image_b64(make_image("green"))], "temperature": 0,
            "max_new_tokens": 8, "stop": "</s>"}


def _assert_error_chunk(status: int, chunks: list[dict], reason: str) -> None:
    assert status == 200  # as the original: the failure is reported inside the stream
    assert chunks and chunks[-1]["error_code"] == WORKER_ERROR, chunks
    assert chunks[-1]["text"].startswith(SERVER_ERROR_MSG) and reason in chunks[-1]["text"]


@pytest.mark.parametrize("kind", ["paged", "static"])
def test_an_engine_failure_reaches_the_worker_log_with_its_traceback(kind, loaded, worker_log, monkeypatch):
    logger, handler = worker_log
    model = loaded[1]

    def explode(*args, **kwargs):
        raise RuntimeError("the lm head exploded")

    monkeypatch.setattr(model.lm_head, "forward", explode)
    worker = ModelWorker(_engine(kind, loaded, logger), "ckpt", ADDRESS, ADDRESS, no_register=True, logger=logger)
    worker.start()
    try:
        status, chunks = _ask(worker, _params())
    finally:
        worker.stop()
    _assert_error_chunk(status, chunks, "the lm head exploded")
    assert "Traceback (most recent call last)" in handler.text, handler.text
    assert "in explode" in handler.text and "RuntimeError: the lm head exploded" in handler.text
    assert worker.get_queue_length() == 0


def test_a_failure_in_the_worker_itself_is_logged_and_answered(loaded, worker_log, monkeypatch):
    logger, handler = worker_log
    engine = _engine("paged", loaded, logger)
    worker = ModelWorker(engine, "ckpt", ADDRESS, ADDRESS, no_register=True, logger=logger)

    def broken_submit(prepared, sink):
        raise KeyError("no such slot")

    monkeypatch.setattr(engine, "submit", broken_submit)
    worker.start()
    try:
        status, chunks = _ask(worker, _params())
    finally:
        worker.stop()
    _assert_error_chunk(status, chunks, "no such slot")
    assert "generation failed" in handler.text and "in broken_submit" in handler.text
    assert "Traceback (most recent call last)" in handler.text
    assert (worker.running, worker.waiting) == (0, 0)  # the slot was given back


def test_a_failure_while_preparing_is_logged_and_answered(loaded, worker_log, monkeypatch):
    logger, handler = worker_log
    engine = _engine("paged", loaded, logger)
    worker = ModelWorker(engine, "ckpt", ADDRESS, ADDRESS, no_register=True, logger=logger)

    def broken_prepare(params):
        raise OSError("the image decoder is gone")

    monkeypatch.setattr(engine, "prepare", broken_prepare)
    worker.start()
    try:
        status, chunks = _ask(worker, _params())
    finally:
        worker.stop()
    _assert_error_chunk(status, chunks, "the image decoder is gone")
    assert "preparing a request failed" in handler.text and "in broken_prepare" in handler.text


def test_generation_errors_are_logged_with_their_traceback_on_a_propagating_logger(loaded, monkeypatch, caplog):
    """Without a service logger (tests, scripts) the records reach the root, traceback attached (caplog)."""
    engine = _engine("static", loaded, None)  # type: ignore[arg-type]
    worker = ModelWorker(engine, "ckpt", ADDRESS, ADDRESS, no_register=True)

    def explode(*args, **kwargs):
        raise RuntimeError("decoding broke")

    monkeypatch.setattr(loaded[1].lm_head, "forward", explode)
    worker.start()
    try:
        with caplog.at_level(logging.INFO):
            status, chunks = _ask(worker, _params())
    finally:
        worker.stop()
    _assert_error_chunk(status, chunks, "decoding broke")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert failures and "decoding broke" in caplog.text and "Traceback (most recent call last)" in caplog.text
