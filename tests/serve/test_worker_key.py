"""``--worker-key``: the controller's registry and generation routes of the original protocol behind a bearer key.

The security audit registered a worker of its own for a served model through the open ``/register_worker`` (and
re-registered the real worker with ``speed`` 0), after which authenticated ``/v1`` traffic went to it. With a worker
key those routes answer 401 and change nothing, and this project's workers and tools send the key; without one
everything is open as in the original (the rest of the serving tests cover that).

All in this process: controllers and workers served on 127.0.0.1 by threads (``serve_helpers.served``), the workers
:class:`BaseWorker` subclasses that hold no model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient
from serve_helpers import free_port, served, wait_until

from palo.serve import controller as controller_module
from palo.serve import openai_worker, register_worker, test_message
from palo.serve.controller import Controller, create_app
from palo.serve.protocol import iter_chunks
from palo.serve.worker_base import BaseWorker
from palo.serve.worker_base import create_app as create_worker_app

KEY = "worker-secret"
GOOD = {"Authorization": f"Bearer {KEY}"}
MODEL = "m"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(model: str = MODEL, speed: float = 1, queue: int = 0) -> dict:
    return {"model_names": [model], "speed": speed, "queue_length": queue}


def registry(controller: Controller) -> dict:
    """The registry as plain data, to compare before and after a request."""
    return {name: dataclasses.asdict(info) for name, info in controller.worker_info.items()}


class EchoWorker(BaseWorker):
    """Answers every request with its prompt and `` answer`` (one chunk)."""

    async def prepare(self, params):
        return params

    async def generate(self, prepared):
        yield json.dumps({"text": prepared.get("prompt", "") + " answer", "error_code": 0}).encode() + b"\0"

    def model_details(self):
        return {"context_length": 64}


def recording_worker(seen: list[dict]) -> FastAPI:
    """A worker of :data:`MODEL` that records each generation request's headers."""
    app = FastAPI()

    @app.post("/worker_get_status")
    async def worker_status():
        return status()

    @app.post("/worker_generate_stream")
    async def generate(request: Request):
        seen.append(dict(request.headers))
        prompt = json.loads(await request.body())["prompt"]
        return Response(json.dumps({"text": prompt + " answer", "error_code": 0}).encode() + b"\0")

    return app


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    """Each test sets $PALO_WORKER_KEY itself where it wants it (the one it ran under must not count)."""
    monkeypatch.delenv("PALO_WORKER_KEY", raising=False)


# -- the controller ----------------------------------------------------------------------------------------------------
@pytest.fixture
def keyed():
    """A controller with a worker key and one registered worker, whose status polls are counted."""
    polls: list[str] = []

    def fetch(name: str) -> dict:
        polls.append(name)
        return status()

    clock = Clock()
    controller = Controller(clock=clock, status_fetcher=fetch)
    assert controller.register_worker("http://127.0.0.1:9", True, status())
    with TestClient(create_app(controller, worker_key=KEY)) as client:
        yield client, controller, clock, polls


BAD_CREDENTIALS = {
    "none": {},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "a prefix of the key": {"Authorization": f"Bearer {KEY[:-1]}"},
    "no scheme": {"Authorization": KEY},
    "another scheme": {"Authorization": f"Basic {KEY}"},
    "empty bearer": {"Authorization": "Bearer "},
}


@pytest.mark.parametrize("headers", list(BAD_CREDENTIALS.values()), ids=list(BAD_CREDENTIALS))
def test_without_the_key_the_registry_routes_answer_401_and_change_nothing(keyed, headers):
    """The audit's hijack, step by step: each request is refused and the registry stays as it was."""
    client, controller, clock, polls = keyed
    before = registry(controller)
    clock.now += 5  # a heartbeat that went through would record this time
    attacks = [
        ("/register_worker", {"worker_name": "http://attacker:1", "check_heart_beat": False,
                              "worker_status": status()}),
        ("/register_worker", {"worker_name": "http://127.0.0.1:9", "check_heart_beat": True,
                              "worker_status": status(speed=0)}),  # the real worker, taken out of dispatch
        ("/register_worker", {"worker_name": "http://attacker:1", "check_heart_beat": False, "worker_status": None}),
        ("/receive_heart_beat", {"worker_name": "http://127.0.0.1:9", "queue_length": 1000}),
        ("/refresh_all_workers", None),
    ]
    for path, body in attacks:
        answer = client.post(path, json=body, headers=headers)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "missing or wrong worker key" in answer.json()["error"]
        assert "Authorization: Bearer <worker key>" in answer.json()["error"]
    answer = client.post("/worker_generate_stream", json={"model": MODEL, "prompt": "my secret question"},
                         headers=headers)
    assert answer.status_code == 401 and answer.headers["content-type"] == "application/octet-stream"
    [chunk] = list(iter_chunks([answer.content]))  # the protocol's one error chunk
    assert chunk["error_code"] == 1 and chunk["error_type"] == "authentication_error"
    assert "missing or wrong worker key" in chunk["text"]
    assert registry(controller) == before  # nothing registered, re-registered, beaten, refreshed or dropped
    assert polls == []  # no worker was polled (the refresh, a registration with a null status)
    assert client.post("/list_models").json() == {"models": [MODEL]}
    assert client.post("/get_worker_address", json={"model": MODEL}).json() == {"address": "http://127.0.0.1:9"}


def test_the_read_only_routes_stay_open(keyed):
    """The web demo and the original clients call /list_models and /get_worker_address without any key."""
    client = keyed[0]
    assert client.post("/list_models").json() == {"models": [MODEL]}
    assert client.post("/get_worker_address", json={"model": MODEL}).json()["address"] == "http://127.0.0.1:9"
    assert client.post("/worker_get_status").json()["model_names"] == [MODEL]
    assert client.get("/health").json() == {"status": "ok", "models": [MODEL]}
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/models").status_code == 200  # the OpenAI API follows --api-key, not the worker key


def test_with_the_key_the_registry_routes_work(keyed):
    client, controller, clock, polls = keyed
    other = {"worker_name": "http://127.0.0.1:8", "check_heart_beat": True, "worker_status": status("other")}
    assert client.post("/register_worker", headers=GOOD, json=other).status_code == 200
    assert client.post("/list_models").json() == {"models": [MODEL, "other"]}
    clock.now += 5
    answer = client.post("/receive_heart_beat", headers=GOOD, json={"worker_name": "http://127.0.0.1:9",
                                                                     "queue_length": 3})
    assert answer.json() == {"exist": True}
    assert controller.worker_info["http://127.0.0.1:9"].queue_length == 3
    assert controller.worker_info["http://127.0.0.1:9"].last_heart_beat == clock.now
    assert client.post("/refresh_all_workers", headers=GOOD).status_code == 200
    assert sorted(polls) == ["http://127.0.0.1:8", "http://127.0.0.1:9"]
    # A key-holder's bad input is still told what is wrong with it (400), not refused as unauthorized.
    assert client.post("/register_worker", headers=GOOD, json={"worker_name": 3}).status_code == 400
    assert client.post("/receive_heart_beat", headers=GOOD, json=[]).status_code == 400
    assert client.post("/worker_generate_stream", headers=GOOD, json={"prompt": "no model"}).status_code == 400


def test_the_api_key_and_the_worker_key_are_not_interchangeable():
    controller = Controller()
    controller.register_worker("http://127.0.0.1:9", True, status())
    with TestClient(create_app(controller, api_key="api-secret", worker_key=KEY)) as client:
        assert client.get("/v1/models", headers=GOOD).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer api-secret"}).status_code == 200
        answer = client.post("/register_worker", headers={"Authorization": "Bearer api-secret"},
                             json={"worker_name": "http://attacker:1", "worker_status": status()})
        assert answer.status_code == 401 and set(controller.worker_info) == {"http://127.0.0.1:9"}


def test_generation_through_the_keyed_controller_and_a_keyed_controller_below_it():
    """The relay carries the key: a controller registered as a worker of another, both with the key, answers the
    requests its parent relays to it (without the key it refused them all)."""
    seen: list[dict] = []
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(served(recording_worker(seen)))
        child_controller = Controller()
        child = stack.enter_context(served(create_app(child_controller, worker_key=KEY)))
        parent_controller = Controller()
        parent = stack.enter_context(served(create_app(parent_controller, worker_key=KEY)))
        for url, name in ((child, worker), (parent, child)):  # null status: the controller polls it
            answer = httpx.post(url + "/register_worker", headers=GOOD, timeout=30,
                                json={"worker_name": name, "check_heart_beat": False, "worker_status": None})
            assert answer.status_code == 200, answer.text
        refused = httpx.post(parent + "/worker_generate_stream", json={"model": MODEL, "prompt": "hi"}, timeout=30)
        assert refused.status_code == 401 and seen == []
        answer = httpx.post(parent + "/worker_generate_stream", json={"model": MODEL, "prompt": "hi"}, headers=GOOD,
                            timeout=30)
        assert answer.status_code == 200, answer.text
        assert [chunk["text"] for chunk in iter_chunks([answer.content])] == ["hi answer"]
        assert len(seen) == 1  # through both controllers, each relay with the key
        assert set(child_controller.worker_info) == {worker} and set(parent_controller.worker_info) == {child}


# -- the workers and tools ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def keyed_controller(controller: Controller | None = None):
    """A served controller with :data:`KEY`; yields its URL and registry."""
    controller = controller or Controller(heart_beat_expiration=30)
    with served(create_app(controller, worker_key=KEY)) as url:
        yield url, controller


@contextlib.contextmanager
def started_worker(controller_url: str, worker_key: str | None, model: str = MODEL):
    port = free_port()
    worker = EchoWorker(model, controller_url, f"http://127.0.0.1:{port}", heart_beat_interval=0.2,
                        worker_key=worker_key)
    with served(create_worker_app(worker), port):
        worker.start()
        try:
            yield worker
        finally:
            worker.stop()


def test_a_worker_with_the_key_registers_heartbeats_and_serves_through_the_controller():
    with keyed_controller() as (url, controller), started_worker(url, KEY) as worker:
        wait_until(lambda: worker.worker_addr in controller.worker_info, 30, "the worker's registration")
        first = controller.worker_info[worker.worker_addr].last_heart_beat
        wait_until(lambda: controller.worker_info[worker.worker_addr].last_heart_beat > first, 30, "a heartbeat")
        answer = httpx.post(url + "/worker_generate_stream", json={"model": MODEL, "prompt": "hi"}, headers=GOOD,
                            timeout=30)
        assert [chunk["text"] for chunk in iter_chunks([answer.content])] == ["hi answer"]


@pytest.mark.parametrize("worker_key", [None, "not-the-key"], ids=["no key", "wrong key"])
def test_a_worker_without_the_key_is_not_registered(worker_key, caplog):
    with keyed_controller() as (url, controller), started_worker(url, worker_key) as worker:
        with caplog.at_level(logging.WARNING):
            wait_until(lambda: any("registration refused: HTTP 401" in r.getMessage() for r in caplog.records), 30,
                       "the refused registration")
            wait_until(lambda: sum("refused /receive_heart_beat" in r.getMessage() for r in caplog.records) >= 2, 30,
                       "refused heartbeats")
        assert controller.worker_info == {} and worker.worker_addr
        assert not any("not-the-key" in r.getMessage() for r in caplog.records)  # the key sent is never logged


def test_register_worker_and_test_message_send_the_key(monkeypatch, capsys):
    """The tools that talk to the controller: by flag, and by $PALO_WORKER_KEY (a cluster started with it set)."""
    seen: list[dict] = []
    with served(recording_worker(seen)) as worker, keyed_controller() as (url, controller):
        assert register_worker.main(["--controller-address", url, "--worker-name", worker]) == 1
        assert "HTTP 401" in capsys.readouterr().err and controller.worker_info == {}
        assert register_worker.main(["--controller-address", url, "--worker", worker, "--worker-key", KEY]) == 0
        assert f"registered {worker}; the controller now serves ['{MODEL}']" in capsys.readouterr().out
        controller.worker_info.clear()
        monkeypatch.setenv("PALO_WORKER_KEY", KEY)
        assert register_worker.main(["--controller-address", url, "--worker-name", worker]) == 0
        assert set(controller.worker_info) == {worker}
        # test_message: refresh through the controller (keyed), then the stream from the worker it names.
        assert test_message.main(["--controller-address", url, "--model-name", MODEL, "--max-new-tokens", "4"]) == 0
        assert set(controller.worker_info) == {worker} and len(seen) == 1
        assert seen[0]["authorization"] == f"Bearer {KEY}"  # the address may be a keyed controller's
        # and straight at a keyed controller, as the worker address
        assert test_message.main(["--controller-address", url, "--worker", url, "--model-name", MODEL]) == 0
        monkeypatch.delenv("PALO_WORKER_KEY")
        assert test_message.main(["--controller-address", url, "--worker", url, "--model-name", MODEL]) == 1
        assert "missing or wrong worker key" in capsys.readouterr().err


def test_the_web_demo_sends_the_key_with_its_refresh_and_its_streams():
    """The demo refreshes the workers before it lists the models: a keyed controller refused that refresh, and the
    demo listed no models (the quickstart's UI included)."""
    from palo.serve import gradio_web_server as web

    seen: list[dict] = []
    with served(recording_worker(seen)) as worker, keyed_controller() as (url, controller):
        assert controller.register_worker(worker, False, status())
        assert web.WebServer(url).get_model_list() == []  # refused: the refresh raised
        server = web.WebServer(url, worker_key=KEY)
        assert server.get_model_list() == [MODEL]
        *_, state = server.http_bot(server.add_text(None, "hello", None), MODEL, 0.2, 0.7, 8)
        assert seen and seen[-1]["authorization"] == f"Bearer {KEY}"  # the worker may be a keyed controller
    assert web.build_parser().parse_args(["--worker-key", KEY]).worker_key == KEY


# -- flags -------------------------------------------------------------------------------------------------------------
def test_the_controller_takes_the_key_from_its_flag_or_the_environment_and_never_logs_it(monkeypatch, caplog):
    apps = []
    monkeypatch.setattr(controller_module, "serve_http", lambda app, host, port: apps.append(app))
    monkeypatch.setattr(controller_module, "build_logger", lambda *names: logging.getLogger("test-worker-key"))
    monkeypatch.setenv("PALO_WORKER_KEY", KEY)
    with caplog.at_level(logging.INFO, logger="test-worker-key"):
        assert controller_module.main(["--port", str(free_port())]) == 0
    assert KEY not in caplog.text and "'worker_key': '***'" in caplog.text
    with TestClient(apps[0]) as client:
        assert client.post("/refresh_all_workers").status_code == 401
        assert client.post("/refresh_all_workers", headers=GOOD).status_code == 200
    assert controller_module.build_parser().parse_args(["--worker-key", "other"]).worker_key == "other"
    monkeypatch.setenv("PALO_WORKER_KEY", "")  # set but empty: no key, as the original
    assert controller_module.build_parser().parse_args([]).worker_key is None
    monkeypatch.delenv("PALO_WORKER_KEY")
    assert controller_module.build_parser().parse_args([]).worker_key is None


@pytest.mark.parametrize("bad", ["two words", "clé", "tab\there"])
def test_a_key_that_cannot_go_in_a_header_is_refused_at_startup(bad, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        controller_module.build_parser().parse_args(["--worker-key", bad])
    assert "must be printable ASCII without spaces" in capsys.readouterr().err
    monkeypatch.setenv("PALO_WORKER_KEY", bad)
    with pytest.raises(SystemExit):
        register_worker.build_parser().parse_args(["--worker-name", "http://w"])
    assert "$PALO_WORKER_KEY" in capsys.readouterr().err


def test_the_openai_worker_passes_the_key_on_and_never_logs_it(monkeypatch, caplog):
    workers = []
    monkeypatch.setattr(openai_worker, "serve", lambda worker, host, port: workers.append(worker))
    monkeypatch.setattr(openai_worker, "build_logger", lambda *names: logging.getLogger("test-worker-key-openai"))
    monkeypatch.setenv("PALO_WORKER_KEY", KEY)
    with caplog.at_level(logging.INFO, logger="test-worker-key-openai"):
        assert openai_worker.main(["--port", str(free_port()), "--api-base", "http://127.0.0.1:9/v1",
                                   "--model-name", MODEL, "--api-key", "backend-secret"]) == 0
    assert KEY not in caplog.text and "backend-secret" not in caplog.text and "'worker_key': '***'" in caplog.text
    assert workers[0]._controller_headers == GOOD


def test_the_model_worker_takes_the_key_and_keeps_the_readmes_worker_flag(monkeypatch):
    from palo.serve.model_worker import build_parser

    monkeypatch.setenv("PALO_WORKER_KEY", KEY)
    args = build_parser().parse_args(["--controller", "http://c:1", "--worker", "http://w:2"])
    assert (args.controller_address, args.worker_address, args.worker_key) == ("http://c:1", "http://w:2", KEY)
    assert build_parser().parse_args(["--worker-key", "other"]).worker_key == "other"
