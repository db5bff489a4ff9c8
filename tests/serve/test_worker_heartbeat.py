"""A worker's link to the controller: registration, heartbeats around requests (latest queue length, coalesced),
periodic heartbeats that check health, and one kept-alive HTTP client for all of it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from serve_helpers import free_port, served, wait_until

import palo.serve.utils as serve_utils
import palo.serve.worker_base as worker_base
from palo.serve.worker_base import BaseWorker, Rejected, create_app


class GatedWorker(BaseWorker):
    """Answers one chunk per request once ``gate`` opens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.ok = True

    async def prepare(self, params):
        return params

    async def generate(self, prepared):
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        yield b'{"text": "done", "error_code": 0}\0'

    def model_details(self):
        return {"context_length": 64}

    def check_health(self) -> bool:
        return self.ok


@pytest.fixture
def link(monkeypatch):
    """A recording controller and a factory of gated workers registered with it; counts HTTP clients made."""
    beats: list[int] = []
    registrations: list[dict] = []
    controller = FastAPI()

    @controller.post("/register_worker")
    async def register(request: Request):
        registrations.append(await request.json())
        return {}

    @controller.post("/receive_heart_beat")
    async def heart_beat(request: Request):
        beats.append((await request.json())["queue_length"])
        return {"exist": True}

    clients = []

    class CountedClient(httpx.Client):
        def __init__(self, *args, **kwargs):
            clients.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(worker_base.httpx, "Client", CountedClient)
    with contextlib.ExitStack() as stack:
        curl = stack.enter_context(served(controller))

        def make(interval: float, concurrency: int = 2) -> tuple[GatedWorker, str]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            worker = GatedWorker("gated", curl, url, limit_model_concurrency=concurrency, heart_beat_interval=interval)
            stack.callback(worker.stop)
            stack.callback(worker.gate.set)  # runs first: no request left waiting on the gate
            stack.enter_context(served(create_app(worker), port))
            worker.start()
            wait_until(lambda: registrations, 30, "the worker's registration")
            return worker, url

        yield make, beats, registrations, clients


def test_requests_send_their_queue_length_through_one_kept_alive_client(link):
    make, beats, registrations, clients = link
    worker, url = make(interval=1000.0, concurrency=10)  # no periodic heartbeat here: every beat is a request's
    assert len(registrations) == 1 and registrations[0]["worker_name"] == url
    done = []

    def ask() -> None:
        with httpx.stream("POST", url + "/worker_generate_stream", json={}, timeout=60) as response:
            done.append(response.read())

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    wait_until(lambda: 10 in beats, 30, "a heartbeat with all 10 requests running")
    worker.gate.set()
    for thread in threads:
        thread.join(30)
    assert len(done) == 10
    wait_until(lambda: beats and beats[-1] == 0 and worker.get_queue_length() == 0, 30, "the final heartbeat")
    time.sleep(0.3)
    assert beats[-1] == 0  # the controller's last word is the idle queue
    assert 2 <= len(beats) <= 20  # one per start and end at the most, coalesced when they come together
    assert len(clients) == 1  # registration, probes and every heartbeat shared one client


class RefusingWorker(GatedWorker):
    async def prepare(self, params):
        if params.get("bad"):
            raise Rejected(b'{"text": "no", "error_code": 1}\0', 400)
        return params


def test_a_request_refused_at_once_sends_the_queue_length_too():
    """The controller counts a request in its worker's queue when it sends it; a refused one (bad image, prompt too
    long, queue full, not JSON) sent no heartbeat, so the count stayed up until the periodic one."""
    beats: list[int] = []
    controller = FastAPI()

    @controller.post("/register_worker")
    async def register():
        return {}

    @controller.post("/receive_heart_beat")
    async def heart_beat(request: Request):
        beats.append((await request.json())["queue_length"])
        return {"exist": True}

    with served(controller) as curl:
        port = free_port()
        worker = RefusingWorker("refusing", curl, f"http://127.0.0.1:{port}", heart_beat_interval=1000.0)
        with served(create_app(worker), port) as url:
            worker.start()
            try:
                for body in ({"bad": True}, "not json"):
                    count = len(beats)
                    sent = ({"json": body} if isinstance(body, dict) else {"content": body})
                    assert httpx.post(url + "/worker_generate_stream", timeout=30, **sent).status_code == 400
                    wait_until(lambda: len(beats) > count, 30, "a heartbeat after the refusal")  # noqa: B023
                    assert beats[-1] == 0
            finally:
                worker.stop()


def test_periodic_heartbeats_check_health_and_an_unhealthy_worker_goes_quiet(link):
    make, beats, _, clients = link
    worker, _ = make(interval=0.2)
    wait_until(lambda: len(beats) >= 3, 30, "periodic heartbeats")
    worker.ok = False
    time.sleep(1.0)  # the next periodic heartbeat finds it unhealthy and sends nothing (one in flight lands)
    count = len(beats)
    worker.heart_beat_soon()  # nor does a request's heartbeat revive it
    time.sleep(0.6)
    assert len(beats) == count
    worker.ok = True
    wait_until(lambda: len(beats) > count, 30, "heartbeats once healthy again")
    assert len(clients) == 1


class FloodingWorker(GatedWorker):
    """Streams 1 MB chunks until its stream is closed (an answer far larger than any socket buffer)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closed = threading.Event()

    async def generate(self, prepared):
        try:
            while True:
                yield b"x" * (1 << 20) + b"\0"
                await asyncio.sleep(0)
        finally:
            self.closed.set()


def test_a_client_that_stops_reading_loses_its_stream_and_its_place(monkeypatch):
    """Its place was held for as long as its socket stayed open; the next request waited behind it."""
    import socket

    monkeypatch.setattr(serve_utils, "WRITE_TIMEOUT_S", 1.0)
    worker = FloodingWorker("m", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=1,
                            no_register=True)
    with served(create_app(worker)) as url:
        host, port = url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)))
        try:
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            silent.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 2\r\n\r\n{}")
            wait_until(lambda: worker.running == 1, 10, "the stream starting")
            wait_until(worker.closed.is_set, 30, "the stalled stream closed")  # never read: dropped
            wait_until(lambda: worker.running == 0, 10, "its place freed")
            # The place is free again: the next client is served (and reads, so it is not dropped).
            worker.closed.clear()
            with httpx.stream("POST", url + "/worker_generate_stream", json={}, timeout=10) as response:
                assert response.status_code == 200 and len(next(response.iter_bytes())) > 0
        finally:
            silent.close()
    worker.stop()


def test_a_large_piece_is_sent_in_timed_slices_so_a_slow_steady_reader_is_not_dropped(monkeypatch):
    """A piece of the stream was sent, and timed, whole: a client reading steadily at its own pace was dropped as
    stalled once one piece took longer than the limit to drain (the OpenAI API's coalesced events can be large)."""
    import logging

    monkeypatch.setattr(serve_utils, "WRITE_TIMEOUT_S", 0.3)
    big = bytes(range(256)) * 4096  # 1 MiB: 1 s for this client to read, well over the limit as one send
    sent: list[dict] = []

    async def pieces():
        yield big
        yield b"end"

    async def steady_client(message: dict) -> None:  # reads 1 MiB/s, never pausing
        await asyncio.sleep(len(message.get("body", b"")) / 2**20)
        sent.append(message)

    response = serve_utils.StalledClientClosingResponse(pieces(), logger=logging.getLogger("test"))
    asyncio.run(response.stream_response(steady_client))
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == big + b"end"  # all of it, in order
    assert max(len(m["body"]) for m in bodies) <= serve_utils.SEND_SLICE_BYTES
    assert all(m["more_body"] for m in bodies[:-1]) and not bodies[-1]["more_body"]


def test_the_event_loop_runs_between_two_writes_of_a_stream(monkeypatch):
    """A write that finds the client gone only schedules the connection's loss; until the loop runs it, every piece
    at hand went to the dead socket (asyncio warned from the fifth: 326 lines in 300 requests through the
    controller's relay). ``wait_for`` gave the loop a turn by accident up to Python 3.11; here it does not, as
    from 3.12."""
    import logging

    async def wait_for(awaitable, timeout):  # Python 3.12's: no task, no turn of the loop
        return await awaitable

    monkeypatch.setattr(serve_utils.asyncio, "wait_for", wait_for)
    turns: list[int] = []

    async def pieces():
        for k in range(4):
            yield b"x%d" % k

    async def send(message: dict) -> None:  # what a transport's write does: work for the loop, at its next turn
        if message["type"] == "http.response.body":
            turns.append(len(turns))
            asyncio.get_running_loop().call_soon(lambda: turns.append(-1))

    response = serve_utils.StalledClientClosingResponse(pieces(), logger=logging.getLogger("test"))
    asyncio.run(response.stream_response(send))
    writes = [k for k in turns if k >= 0]
    assert len(writes) == 5  # four pieces and the end
    assert all(turns[turns.index(k) + 1] == -1 for k in writes[:-1])  # each write's callback ran before the next


def test_a_stream_cancelled_because_its_client_left_is_closed_at_once():
    """Starlette cancels a stream whose client left (its task group's scope) and leaves the iterator as it was: the
    worker's place, the engine's job generating for nobody and the relay's upstream were freed only when the
    garbage collector found the iterator (here, where something still holds the response, never)."""
    import logging

    import anyio

    closed: list[bool] = []

    async def pieces():
        try:
            while True:
                yield b"x"
        finally:
            await asyncio.sleep(0)  # closing may wait on I/O (the upstream's close)
            closed.append(True)

    async def send(message: dict) -> None:
        await asyncio.sleep(0.001)

    response = serve_utils.StalledClientClosingResponse(pieces(), logger=logging.getLogger("test"))

    async def client_leaves() -> None:
        async with anyio.create_task_group() as group:  # as StreamingResponse.__call__ runs it
            group.start_soon(response.stream_response, send)
            await asyncio.sleep(0.05)
            group.cancel_scope.cancel()  # what its disconnect listener does
        assert closed == [True]  # now, not when the loop shuts down (which closes every generator left)

    asyncio.run(client_leaves())


def test_the_controllers_relay_drops_a_client_that_stops_reading(monkeypatch):
    """The controller relayed the original protocol with a plain stream: it alone kept a client that read nothing
    (or had left) and the worker's answer to it, for as long as the worker sent."""
    import json
    import logging
    import socket

    from palo.serve import controller as controller_module

    class JsonFlood(FloodingWorker):  # chunks the relay can parse
        async def generate(self, prepared):
            try:
                while True:
                    yield json.dumps({"text": "x" * (1 << 20), "error_code": 0}).encode() + b"\0"
                    await asyncio.sleep(0)
            finally:
                self.closed.set()

    class PatientWorkerStream(serve_utils.StalledClientClosingResponse):
        """The worker's side waits on the relay for long: under load its own 1 s could run out first (the relay
        reads nothing while it waits on its client), and the worker, not the relay, ended the stream."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.write_timeout = 60.0

    monkeypatch.setattr(serve_utils, "WRITE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(worker_base, "StalledClientClosingResponse", PatientWorkerStream)
    worker = JsonFlood("m", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=1, no_register=True)
    controller = controller_module.Controller("shortest_queue", 30)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # the controller's own log, however set up
    controller.logger.addHandler(handler)
    with served(create_app(worker)) as worker_url, \
            served(controller_module.create_app(controller, read_timeout=30, api_key=None)) as url:
        assert controller.register_worker(worker_url, False, {"model_names": ["m"], "speed": 1, "queue_length": 0})
        host, port = url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)))
        try:
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            body = b'{"model": "m"}'
            silent.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: worker.running == 1, 10, "the stream starting")
            wait_until(worker.closed.is_set, 30, "the relay dropping its stalled client, closing the worker stream")
        finally:
            silent.close()
    worker.stop()
    controller.logger.removeHandler(handler)
    assert any("read nothing" in message for message in warnings)


def test_the_controllers_relay_closes_the_worker_stream_of_a_client_that_left_before_the_first_chunk():
    """A client that closed its socket right after sending cancelled the relay's stream before the relay's
    generator started, and closing a generator that never started skips its finally: the controller kept the
    worker's stream open, and the worker generated the whole answer for nobody."""
    import json
    import socket

    from palo.serve import controller as controller_module

    class Trickle(FloodingWorker):  # small chunks, slowly: no buffer ever fills, so nothing but a close ends it
        async def generate(self, prepared):
            try:
                while True:
                    await asyncio.sleep(0.05)
                    yield json.dumps({"text": "x", "error_code": 0}).encode() + b"\0"
            finally:
                self.closed.set()

    worker = Trickle("m", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=4, no_register=True)
    controller = controller_module.Controller("shortest_queue", 30)
    with served(create_app(worker)) as worker_url, \
            served(controller_module.create_app(controller, read_timeout=30, api_key=None)) as url:
        assert controller.register_worker(worker_url, False, {"model_names": ["m"], "speed": 1, "queue_length": 0})
        host, port = url.removeprefix("http://").split(":")
        body = b'{"model": "m"}'
        with socket.create_connection((host, int(port))) as gone:
            gone.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(worker.closed.is_set, 15, "the relay closing the worker stream of a client that left")
        wait_until(lambda: worker.running == 0, 10, "the worker's place freed")
    worker.stop()


def test_a_dropped_clients_socket_is_reset_once_its_close_cannot_flush(monkeypatch):
    """A client that reads nothing has its stream dropped (its place freed), but uvicorn's close waited for the unsent
    bytes, so the socket stayed open as long as the client did: one file per such client, for good."""
    import socket

    import uvicorn

    monkeypatch.setattr(serve_utils, "WRITE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(serve_utils, "CLOSE_FLUSH_S", 0.5)
    worker = FloodingWorker("m", "http://127.0.0.1:9", "http://127.0.0.1:9", limit_model_concurrency=1,
                            no_register=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="critical",
                                           http=serve_utils._idle_closing_protocol()))  # as serve_http runs it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "a test server")
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 2\r\n\r\n{}")
        wait_until(worker.closed.is_set, 30, "the stalled stream dropped")
        time.sleep(1.5)  # past the close's grace
        client.settimeout(30)
        with pytest.raises(ConnectionResetError):  # what the kernel held, then the reset: not megabytes, then FIN
            while client.recv(1 << 16):
                pass
        client.close()
    finally:
        server.should_exit = True
        thread.join(10)
    worker.stop()
