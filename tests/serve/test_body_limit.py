"""Request bodies over the cap get 413 before they are read whole, on the controller's and the workers' apps."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from palo.serve import body_limit
from palo.serve.body_limit import BodyLimit, max_request_bytes


def _app(max_bytes: int) -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    read: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        read.append(len(await request.body()))
        return {"bytes": read[-1]}

    return app, read


def test_a_body_over_the_cap_is_413_whether_declared_or_streamed():
    app, read = _app(1000)
    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}  # at the cap: served
    response = client.post("/echo", content=b"x" * 1001)  # Content-Length says it
    assert response.status_code == 413 and response.json()["error"] == {
        "message": "the request body is 1,001 bytes, over the limit of 1,000 bytes ($PALO_MAX_REQUEST_MB on the "
                   "server)", "type": "invalid_request_error", "param": None, "code": "request_too_large"}

    def chunks():  # no Content-Length: the bytes so far say it
        for _ in range(50):
            yield b"y" * 100

    response = client.post("/echo", content=chunks())
    assert response.status_code == 413 and "more than 1,000 bytes" in response.json()["error"]["message"]
    assert read == [1000]  # neither large body reached the endpoint
    assert client.post("/echo", content=b"{}").json() == {"bytes": 2}  # and the app still serves


def test_the_cap_comes_from_the_environment_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.delenv("PALO_MAX_REQUEST_MB", raising=False)
    assert max_request_bytes() == body_limit.DEFAULT_MAX_REQUEST_MB * 2**20
    monkeypatch.setenv("PALO_MAX_REQUEST_MB", "0.5")
    assert max_request_bytes() == 2**19
    for bad in ("0", "-3", "lots", "inf", "nan"):
        monkeypatch.setenv("PALO_MAX_REQUEST_MB", bad)
        with pytest.raises(ValueError, match="PALO_MAX_REQUEST_MB must be a positive number of megabytes"):
            max_request_bytes()


def test_the_controller_api_and_the_worker_apps_carry_the_cap(monkeypatch):
    from palo.serve import controller as controller_module
    from palo.serve.worker_base import create_app

    monkeypatch.setenv("PALO_MAX_REQUEST_MB", "0.001")  # 1,048 bytes
    controller = controller_module.Controller("shortest_queue", 30)
    api = TestClient(controller_module.create_app(controller, read_timeout=5, api_key=None))
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert api.post("/v1/chat/completions", json={"model": "m", "messages": "x"}).status_code == 400  # still served

    class Worker:  # what create_app reads of a BaseWorker when it builds the app
        title = "w"
        model_name = "m"
        llm_engine = None

    worker_app = create_app(Worker())
    assert any(m.cls is BodyLimit and m.kwargs["max_bytes"] == 1048 for m in worker_app.user_middleware)
    from palo.serve import model_worker, openai_worker

    monkeypatch.setenv("PALO_MAX_REQUEST_MB", "many")  # refused in one line before anything starts
    for main, extra in ((controller_module.main, []), (model_worker.main, ["--model-path", "nowhere"]),
                        (openai_worker.main, ["--api-base", "http://127.0.0.1:9/v1", "--model-name", "m"])):
        with pytest.raises(SystemExit) as info:
            main(["--port", "0", *extra])
        assert info.value.code == 2
