"""Controller registry and dispatch, and the wire-format helpers, without processes."""

from __future__ import annotations

import json

import pytest

from palo.serve.controller import Controller
from palo.serve.protocol import ChunkDecoder, encode_chunk, error_chunk, visible_text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(*models: str, speed: int = 1, queue: int = 0) -> dict:
    return {"model_names": list(models), "speed": speed, "queue_length": queue}


def test_shortest_queue_counts_dispatched_requests():
    c = Controller("shortest_queue", clock=Clock())
    c.register_worker("http://a", True, status("m", queue=0))
    c.register_worker("http://b", True, status("m", queue=1))
    picks = [c.get_worker_address("m") for _ in range(4)]
    # a (0 < 1), then a and b tied at 1 take turns, then b is ahead (2 > 1), then tied again.
    assert picks == ["http://a", "http://b", "http://a", "http://b"]
    assert c.get_worker_address("other") == ""
    assert c.receive_heart_beat("http://b", 0) and not c.receive_heart_beat("http://zzz", 0)


def test_idle_workers_take_turns_when_heartbeats_reset_their_queues():
    # One request at a time, each answered before the next heartbeat: both queues read 0 every time.
    c = Controller("shortest_queue", clock=Clock())
    c.register_worker("http://a", True, status("m"))
    c.register_worker("http://b", True, status("m"))
    picks = []
    for _ in range(6):
        picks.append(c.get_worker_address("m"))
        assert c.receive_heart_beat("http://a", 0) and c.receive_heart_beat("http://b", 0)
    assert picks.count("http://a") == picks.count("http://b") == 3


def test_lottery_follows_speed():
    c = Controller("lottery", clock=Clock())
    c.register_worker("http://fast", True, status("m", speed=9))
    c.register_worker("http://slow", True, status("m", speed=1))
    picks = [c.get_worker_address("m") for _ in range(400)]
    assert 300 < picks.count("http://fast") < 400
    zero = Controller("lottery", clock=Clock())
    zero.register_worker("http://z", True, status("m", speed=0))
    assert zero.get_worker_address("m") == ""


def test_expiry_and_refresh():
    clock = Clock()
    statuses = {"http://a": status("m"), "http://b": None}
    c = Controller(heart_beat_expiration=30, clock=clock, status_fetcher=statuses.get)
    c.register_worker("http://a", True, None)  # polled
    c.register_worker("http://b", True, status("m"))
    c.register_worker("http://manual", False, status("m"))  # no heartbeat check: never expires
    assert c.worker_status() == {"model_names": ["m"], "speed": 3, "queue_length": 0}
    clock.now += 20
    c.receive_heart_beat("http://a", 2)
    clock.now += 15
    # b is stale: never chosen, and swept away.
    assert "http://b" not in {c.get_worker_address("m") for _ in range(10)}
    assert c.remove_stale_workers() == ["http://b"]
    c.refresh_all_workers()  # a answers, manual does not (its fetch gives None) -> dropped
    assert set(c.worker_info) == {"http://a"}
    assert not c.register_worker("http://bad", True, {"model_names": "x"})
    with pytest.raises(ValueError):
        Controller("round_robin")


def test_chunks_round_trip_and_split_anywhere():
    data = (encode_chunk("prompt ما", 0) + error_chunk("bad image", 1, "invalid_request")
            + encode_chunk("x", 0, usage=None))
    for cut in range(len(data)):
        decoder = ChunkDecoder()
        objs = decoder.feed(data[:cut]) + decoder.feed(data[cut:]) + decoder.close()
        assert [o["text"] for o in objs] == ["prompt ما", "bad image", "x"]
    assert (json.loads(encode_chunk("t", 0, finish_reason="stop")[:-1])
            == {"text": "t", "error_code": 0, "finish_reason": "stop"})
    # One byte at a time, and a chunk of a megabyte in 16 KB reads: the pieces of an unfinished chunk are kept and
    # joined once (its buffer was copied and scanned again at every read).
    decoder = ChunkDecoder()
    assert [o["text"] for b in range(len(data)) for o in decoder.feed(data[b:b + 1])] == ["prompt ما", "bad image", "x"]
    big = encode_chunk("y" * 2**20, 0) + encode_chunk("z", 0)
    decoder = ChunkDecoder()
    objs = [o for i in range(0, len(big), 16384) for o in decoder.feed(big[i:i + 16384])] + decoder.close()
    assert [o["text"] for o in objs] == ["y" * 2**20, "z"] and decoder.close() == []


@pytest.mark.parametrize(
    ("text", "final", "expected"),
    [
        ("hello ###", False, ("hello ", True)),
        ("hello #", False, ("hello ", False)),  # might become the stop string: held back
        ("hello #", True, ("hello #", False)),
        ("abc\ufffd", False, ("abc", False)),  # half a character
        ("a###b###", True, ("a", True)),
    ],
)
def test_visible_text(text, final, expected):
    assert visible_text(text, ["###"], final) == expected


@pytest.mark.parametrize("bad, why", [
    ("busy", "JSON object"),
    ({"model_names": "m", "speed": 1, "queue_length": 0}, "model_names"),
    ({"model_names": ["m", 5], "speed": 1, "queue_length": 0}, "model_names"),
    ({"model_names": [], "speed": 1, "queue_length": 0}, "model_names"),
    ({"model_names": ["m"], "speed": "fast", "queue_length": 0}, "speed"),
    ({"model_names": ["m"], "speed": -1, "queue_length": 0}, "speed"),
    ({"model_names": ["m"], "speed": 1, "queue_length": "long"}, "queue_length"),
    ({"model_names": ["m"], "speed": 1, "queue_length": 2.5}, "queue_length"),
])
def test_a_malformed_worker_status_registers_nothing_and_says_why(bad, why):
    from palo.serve.controller import parse_worker_status

    with pytest.raises(ValueError, match=why):
        parse_worker_status(bad)
    c = Controller()
    assert not c.register_worker("http://w", True, bad)
    assert c.list_models() == []
    assert c.register_worker("http://w", True, status("m", speed=2.5)) and c.list_models() == ["m"]


def test_the_register_endpoint_answers_400_with_the_reason():
    from fastapi.testclient import TestClient

    from palo.serve.controller import create_app

    controller = Controller(status_fetcher=lambda name: None)  # a worker that cannot be reached
    with TestClient(create_app(controller)) as client:
        bad = {"worker_name": "http://w", "check_heart_beat": True,
               "worker_status": {"model_names": [5], "speed": 1, "queue_length": 0}}
        response = client.post("/register_worker", json=bad)
        assert response.status_code == 400 and "model_names" in response.json()["error"]
        response = client.post("/register_worker", json={"worker_name": "http://w", "check_heart_beat": "maybe"})
        assert response.status_code == 400
        response = client.post("/register_worker", json={"worker_name": "http://w", "check_heart_beat": True})
        assert response.status_code == 400 and "no status from http://w" in response.json()["error"]
        assert client.post("/list_models").json() == {"models": []}
        good = {"worker_name": "http://w", "check_heart_beat": True, "worker_status": status("m")}
        assert client.post("/register_worker", json=good).status_code == 200
        assert client.post("/list_models").json() == {"models": ["m"]}


def test_a_registration_loop_is_ended_not_relayed_for_good():
    """A controller registered as its own worker (or a ring of controllers) relayed a request to itself until the
    entry expired, or for good without heartbeat checks; the relay count ends it with a 508 that says why."""
    import time

    import httpx
    from serve_helpers import served

    from palo.serve.controller import create_app
    from palo.serve.routing import MAX_HOPS

    controller = Controller("shortest_queue")
    with served(create_app(controller)) as url:
        assert httpx.post(url + "/register_worker", timeout=10, json={
            "worker_name": url, "check_heart_beat": False,
            "worker_status": {"model_names": ["loop"], "speed": 1, "queue_length": 0}}).status_code == 200
        start = time.monotonic()
        answer = httpx.post(url + "/worker_generate_stream", json={"model": "loop", "prompt": "hi"}, timeout=60)
        assert time.monotonic() - start < 30
        assert answer.status_code == 508
        assert f"the request went through {MAX_HOPS} relays" in answer.text and "form a loop" in answer.text


def test_a_worker_stream_closes_to_the_end_when_its_closer_is_cancelled():
    """httpcore's clean-up of a closed response, cut short by a cancellation, left the connection in the pool for
    good with its socket open; closing a worker stream finishes whatever its caller does meanwhile."""
    import asyncio

    from palo.serve.routing import WorkerStream

    class Response:
        status_code = 200
        finished = False

        async def aclose(self) -> None:
            await asyncio.sleep(0.05)
            Response.finished = True

    async def scenario() -> None:
        closer = asyncio.ensure_future(WorkerStream("http://worker", Response()).aclose())
        await asyncio.sleep(0.01)
        closer.cancel()
        await asyncio.sleep(0.1)
        assert closer.cancelled() and Response.finished

    asyncio.run(scenario())


@pytest.mark.parametrize("name", ["localhost:40000", "http://[::1", "http://127.0.0.1:1/\x00", "ftp://w", "http://"])
def test_a_worker_name_that_is_not_an_http_url_is_refused_at_registration(name):
    """A worker started with ``--worker localhost:40000`` (no scheme) was registered and took every other request,
    each failing with "missing an 'http://' protocol"; a malformed URL made the register endpoint answer 500."""
    from fastapi.testclient import TestClient

    from palo.serve.controller import create_app

    controller = Controller(status_fetcher=lambda worker: status("m"))
    with TestClient(create_app(controller)) as client:
        for worker_status in (status("m"), None):  # given, or polled from the worker
            response = client.post("/register_worker", json={"worker_name": name, "check_heart_beat": True,
                                                             "worker_status": worker_status})
            assert response.status_code == 400 and "'worker_name' must be the worker's base URL" in response.text
        assert client.post("/list_models").json() == {"models": []}


def test_a_worker_whose_address_reaches_nothing_is_dropped_and_the_request_goes_to_another():
    """An address httpx refuses to send to (an entry from before registration checked it) was neither dropped nor
    skipped: the request failed with 503 although a good worker served the model."""
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import Response
    from serve_helpers import served

    from palo.serve.controller import create_app

    good = FastAPI()

    @good.post("/worker_generate_stream")
    async def answer():
        return Response(encode_chunk("hello", 0))

    controller = Controller("shortest_queue")
    with served(good) as good_url, served(create_app(controller)) as url:
        controller.register_worker(good_url, True, status("m", queue=5))  # busier: the bad one is tried first
        controller.register_worker("http://placeholder", True, status("m"))
        controller.worker_info["localhost:40000"] = controller.worker_info.pop("http://placeholder")  # no scheme
        answer = httpx.post(url + "/worker_generate_stream", json={"model": "m", "prompt": "hi"}, timeout=30)
        assert answer.status_code == 200 and b"hello" in answer.content
        assert list(controller.worker_info) == [good_url]


def test_tied_workers_take_turns_per_model_when_requests_for_models_alternate():
    """One rotation counter shared by all models: requests for another model in between bumped it, so with
    alternating traffic every request for ``a`` went to the same one of its two idle workers."""
    c = Controller("shortest_queue", clock=Clock())
    for name, model in (("http://a1", "a"), ("http://a2", "a"), ("http://b1", "b")):
        c.register_worker(name, True, status(model))
    picks = []
    for _ in range(10):
        for model in ("a", "b"):
            worker = c.get_worker_address(model)
            picks.append(worker)
            assert c.receive_heart_beat(worker, 0)  # answered before the next request: idle again
    assert picks.count("http://a1") == picks.count("http://a2") == 5


@pytest.mark.parametrize("method", ["lottery", "shortest_queue"])
def test_a_worker_of_speed_zero_takes_no_requests_under_either_method(method):
    c = Controller(method, clock=Clock())
    c.register_worker("http://zero", True, status("m", speed=0))
    assert c.get_worker_address("m") == ""
    c.register_worker("http://a", True, status("m"))
    assert {c.get_worker_address("m") for _ in range(20)} == {"http://a"}


def test_a_speed_that_would_overflow_the_sums_is_refused():
    """Two workers of speed 1e308 were registered; then the lottery and the controller's own status (their sum,
    infinite) answered 500."""
    from palo.serve.controller import MAX_SPEED

    c = Controller("lottery", clock=Clock())
    assert not c.register_worker("http://a", True, status("m", speed=1e308))
    assert c.register_worker("http://a", True, status("m", speed=MAX_SPEED))
    assert c.register_worker("http://b", True, status("m", speed=MAX_SPEED))
    assert c.get_worker_address("m") in {"http://a", "http://b"}
    json.dumps(c.worker_status(), allow_nan=False)


def test_a_refresh_polls_the_workers_together():
    """One by one, each hung worker cost the refresh a status timeout (seven: 35 s), and the web UI, which refreshes
    on each page load, gave up and offered no model at all."""
    import threading

    started = threading.Barrier(4, timeout=10)

    def fetch(name):
        started.wait()  # every poll is under way at once, or this times out (BrokenBarrierError)
        return status("m") if name == "http://good" else None

    c = Controller(status_fetcher=fetch, clock=Clock())
    for name in ("http://good", "http://hung1", "http://hung2", "http://hung3"):
        c.register_worker(name, True, status("m"))
    c.refresh_all_workers()
    assert set(c.worker_info) == {"http://good"}


def test_a_refresh_never_undoes_what_happened_while_it_polled():
    """The refresh acted on polls up to a status timeout old: a worker removed after answering its poll came back
    (the API then routed to a dead worker), a worker that registered again after its poll failed was removed, and a
    heartbeat's queue length was overwritten by the older polled one."""
    clock = Clock()
    c = Controller(heart_beat_expiration=30, clock=clock)

    def fetch(name):
        if name == "http://died":  # answered, then was dropped (its stream failed)
            c.remove_worker(name)
            return status("m")
        if name == "http://back":  # did not answer, then restarted and registered
            c.register_worker(name, True, status("m", queue=2))
            return None
        if name == "http://busy":  # a heartbeat with a newer queue length arrived during the poll
            clock.now += 1
            c.receive_heart_beat(name, 7)
            return status("m", queue=0)
        return {"http://fine": status("m", "n", queue=3), "http://gone": None}[name]

    c.status_fetcher = fetch
    for name in ("http://died", "http://back", "http://busy", "http://fine", "http://gone"):
        c.register_worker(name, True, status("m"))
    c.refresh_all_workers()
    assert set(c.worker_info) == {"http://back", "http://busy", "http://fine"}
    assert c.worker_info["http://back"].queue_length == 2 and c.worker_info["http://busy"].queue_length == 7
    assert c.worker_info["http://fine"].queue_length == 3 and c.worker_info["http://fine"].model_names == ["m", "n"]


def test_a_relay_count_that_is_not_an_ascii_number_is_ignored():
    """``"²".isdigit()`` is True but ``int("²")`` raises: the header (byte 0xB2, latin-1 on the wire) made the relay
    endpoint answer 500."""
    import http.client
    import urllib.parse

    from serve_helpers import served

    from palo.serve.controller import create_app

    with served(create_app(Controller())) as url:
        where = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        body = b'{"model": "m", "prompt": "hi"}'
        connection.putrequest("POST", "/worker_generate_stream")
        for name, value in (("Content-Type", b"application/json"), ("Content-Length", str(len(body)).encode()),
                            ("X-PALO-Relay-Hops", b"\xb2")):
            connection.putheader(name, value)
        connection.endheaders(body)
        answer = connection.getresponse()
        assert answer.status == 404 and b"no live worker serves model 'm'" in answer.read()
        connection.close()


@pytest.mark.parametrize("service, flag", [
    ("model_worker", "--worker-address"), ("model_worker", "--controller-address"),
    ("openai_worker", "--worker"), ("gradio_web_server", "--controller"), ("test_message", "--controller-address"),
    ("test_message", "--worker"),
])
def test_a_service_given_an_address_without_a_scheme_says_so_at_startup(service, flag, capsys):
    """``--worker localhost:40000`` started a worker that registered an address nothing could be sent to."""
    import importlib

    parser = importlib.import_module(f"palo.serve.{service}").build_parser()
    required = {"model_worker": [], "openai_worker": ["--api-base", "http://b/v1", "--model-name", "m"],
                "gradio_web_server": [], "test_message": []}[service]
    with pytest.raises(SystemExit):
        parser.parse_args([*required, flag, "localhost:40000"])
    assert "'localhost:40000' is not an http:// or https:// URL" in capsys.readouterr().err
    parser.parse_args([*required, flag, "http://localhost:40000"])
