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
