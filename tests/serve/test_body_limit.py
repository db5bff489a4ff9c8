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
    chunked = api.post("/v1/chat/completions", content=iter([b"x" * 1000] * 3))
    assert chunked.status_code == 413 and "more than 1,048 bytes" in chunked.json()["error"]["message"]
    # Both refusals are counted under the route they were sent to (the declared one was "other": it was answered
    # before the router had matched it).
    metrics = api.get("/metrics").text
    assert 'palo:api_requests_total{endpoint="/v1/chat/completions",status="413"} 2.0' in metrics

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


def _run_asgi(middleware: BodyLimit, pieces: list[tuple[float, bytes, bool]]) -> tuple[list[dict], float]:
    """Send a POST whose body comes as ``(delay_s, bytes, more_body)`` pieces; return what was sent back and when."""
    import asyncio
    import time

    sent: list[dict] = []

    async def main() -> float:
        queue = list(pieces)

        async def receive() -> dict:
            if not queue:
                await asyncio.sleep(3600)  # a disconnect that never comes
            delay, body, more = queue.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": body, "more_body": more}

        async def send(message: dict) -> None:
            sent.append(message)

        start = time.monotonic()
        await middleware({"type": "http", "method": "POST", "headers": []}, receive, send)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    return sent, elapsed


def _echo_app():
    read: list[bytes] = []

    async def app(scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        read.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app, read


def test_a_body_that_pauses_too_long_or_trickles_below_the_pace_is_408_and_a_steady_one_is_served():
    """A client that sends its body a byte at a time held its request (and its socket) open for good."""
    import json

    app, read = _echo_app()
    limit = BodyLimit(app, max_bytes=10_000, idle_s=0.3, grace_s=0.5, min_bytes_per_s=100)
    # A pause over idle_s.
    sent, elapsed = _run_asgi(limit, [(0.0, b"ab", True), (5.0, b"cd", False)])
    assert sent[0]["status"] == 408 and elapsed < 2
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_timeout" and "2 bytes" in error["message"] and "0.3 s" in error["message"]
    # Pieces each within idle_s, but a byte at a time: behind 100 bytes/s once the grace is over.
    sent, elapsed = _run_asgi(limit, [(0.2, b"x", True)] * 40 + [(0.2, b"x", False)])
    assert sent[0]["status"] == 408 and 0.5 < elapsed < 2.5
    assert read == []  # neither reached the endpoint
    # Steady pieces: 50 bytes every 0.2 s (250 bytes/s) for 2 s is served whole.
    sent, _ = _run_asgi(limit, [(0.2, b"y" * 50, True)] * 9 + [(0.2, b"y" * 50, False)])
    assert sent[0]["status"] == 200 and read == [b"y" * 500]
    # The defaults a service gets: a pause of up to 10 s, 4 KiB/s after 10 s.
    default = BodyLimit(app, max_bytes=1)
    assert (default.idle_s, default.grace_s, default.min_bytes_per_s) == (10.0, 10.0, 4096)


def test_the_pace_is_timed_from_when_the_service_reads_the_body():
    """A body already in, read late by its service (a busy event loop, an endpoint that reads after other work), was
    refused: past the pace's deadline the wait for the next piece was zero, and the receive was cancelled before it
    could return what had arrived."""
    import asyncio

    app, read = _echo_app()

    async def late_reader(scope, receive, send) -> None:
        await asyncio.sleep(0.8)  # longer than grace + idle below: the body arrived long before this
        await app(scope, receive, send)

    limit = BodyLimit(late_reader, max_bytes=10_000, idle_s=0.3, grace_s=0.5, min_bytes_per_s=100)
    sent, _ = _run_asgi(limit, [(0.0, b"z" * 10, True)] * 3 + [(0.0, b"z" * 10, False)])
    assert sent[0]["status"] == 200 and read == [b"z" * 40]


def test_a_client_that_leaves_while_its_body_is_read_is_499_not_a_server_error(caplog):
    """It was a 500 with a 50-line traceback in the log (twice: the app's and uvicorn's), and counted as a server
    error in the metrics: a soak test's clients that gave up early filled the logs with them."""
    import asyncio
    import logging

    from palo.serve import controller as controller_module

    controller = controller_module.Controller("shortest_queue", 30)
    app = controller_module.create_app(controller, read_timeout=5, api_key=None)
    sent: list[dict] = []

    async def leave_halfway() -> None:
        pieces = [{"type": "http.request", "body": b'{"model": "m", "mess', "more_body": True},
                  {"type": "http.disconnect"}]

        async def receive() -> dict:
            return pieces.pop(0) if pieces else await asyncio.Event().wait()

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8)}
        await app(scope, receive, send)

    with caplog.at_level(logging.ERROR):
        asyncio.run(leave_halfway())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = TestClient(app).get("/metrics").text
    assert 'endpoint="/v1/chat/completions",status="499"' in metrics, metrics
