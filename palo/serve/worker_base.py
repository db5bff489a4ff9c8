"""What every worker does, whatever produces its answers: the controller link and the request flow around it.

A worker registers with the controller once its own server answers, heartbeats every ``heart_beat_interval`` seconds
(re-registering when the controller has forgotten it), and serves the original worker endpoints
(``/worker_generate_stream``, ``/worker_get_status``, ``/model_details``; and ``GET /health``, ``GET /metrics``).
Requests run under a concurrency limit (an asyncio semaphore); the ones waiting for it count in the queue length the
worker reports, and a heartbeat goes out when a request starts and when it ends, as in the original worker. Those
are coalesced: however many requests start or end together, one heartbeat reports the queue length as it is then, at
most every ``SOON_BEAT_GAP_S``. All controller traffic goes through one kept-alive HTTP client: a new client per
heartbeat costs tens of milliseconds of CPU (its TLS context), which under load took a large share of a small
machine from generation. With a worker key (``--worker-key`` or ``$PALO_WORKER_KEY``, the controller's own), the
registration and heartbeats carry ``Authorization: Bearer <worker key>``; a controller that runs with the key
refuses them without it.

Subclasses say only how they answer: :meth:`BaseWorker.prepare` checks a request (raising :class:`Rejected` to
answer at once) and :meth:`BaseWorker.generate` streams its chunks. Any other exception in either is logged with its
traceback and answered with the original protocol's error chunk (error code 1), so a failure never cuts a stream
short without a word and never goes unrecorded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from palo.constants import WORKER_HEART_BEAT_INTERVAL
from palo.serve.body_limit import BodyLimit, max_request_bytes
from palo.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from palo.serve.metrics import WorkerMetrics
from palo.serve.protocol import (
    INVALID_REQUEST,
    KEEPALIVE_CHUNK,
    STREAM_MEDIA_TYPE,
    WORKER_ERROR,
    decode_json_body,
    error_chunk,
)
from palo.serve.routing import UNHEALTHY_HEADER
from palo.serve.utils import (
    StalledClientClosingResponse,
    add_worker_key_argument,
    serve_http,
    service_url,
    worker_key_headers,
)

CONTROLLER_TIMEOUT_S = 5.0  # the original's timeout for registration and heartbeats
RETRY_INTERVAL_S = 5.0  # and its retry interval when the controller cannot be reached
# Seconds between keep-alives while a request waits for a place: half the shortest per-read timeout of a client (the
# web demo's 10 s, the original's).
QUEUE_KEEPALIVE_S = 5.0
LISTEN_TIMEOUT_S = 60.0  # how long to wait for this worker's own server before registering anyway
# Request heartbeats are at most this often: the ones asked for in between are folded into the next, which reports
# the queue length as it is then. Under load that keeps the heartbeat thread from taking the GIL from generation.
SOON_BEAT_GAP_S = 0.05


class Rejected(Exception):
    """A request answered at once, without generating (malformed, prompt too long, queue full).

    Args:
        chunk: The response body: one protocol chunk.
        status: The HTTP status.
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(self, chunk: bytes, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(chunk.decode("utf-8", "replace"))
        self.chunk = chunk
        self.status = status
        self.headers = headers

    def response(self) -> Response:
        return Response(self.chunk, self.status, media_type=STREAM_MEDIA_TYPE, headers=self.headers)


UNHEALTHY_MESSAGE = "the worker is unhealthy (its engine stopped); the controller drops it"


class BaseWorker(ABC):
    """Registration, heartbeats, the concurrency limit and the request flow of one worker.

    Args:
        model_name: The name the worker registers under.
        controller_addr: The controller's base URL.
        worker_addr: This worker's base URL as the controller should reach it.
        conv_mode: The conversation template of the model (reported in the status).
        limit_model_concurrency: Requests generating at once; more wait in the worker's queue.
        heart_beat_interval: Seconds between heartbeats.
        no_register: Do not register with a controller (and send no heartbeats).
        logger: Where to log (default: the subclass's module logger).
        worker_key: The controller's ``--worker-key``, sent with the registration and heartbeats (None: none).
    """

    title = "PALO worker"

    def __init__(
        self,
        model_name: str,
        controller_addr: str,
        worker_addr: str,
        conv_mode: str = "vicuna_v1",
        limit_model_concurrency: int = 5,
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        no_register: bool = False,
        logger: logging.Logger | None = None,
        worker_key: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.controller_addr = controller_addr.rstrip("/")
        self.worker_addr = worker_addr.rstrip("/")
        self.conv_mode = conv_mode
        self.limit_model_concurrency = limit_model_concurrency
        self.heart_beat_interval = heart_beat_interval
        self.no_register = no_register
        self.logger = logger or logging.getLogger(type(self).__module__)
        self.running = 0
        self.waiting = 0
        self.rejected = 0  # answered 503 by a worker whose own queue was full (ModelWorker's --max-queue)
        self.healthy = True  # the last check_health(); an unhealthy worker sends no heartbeats
        self._semaphore: asyncio.Semaphore | None = None
        self._stop = threading.Event()
        self._beat_soon = threading.Event()  # set by heart_beat_soon, consumed by the heartbeat thread
        self._http: httpx.Client | None = None
        self._http_lock = threading.Lock()
        # Sent only to the controller: the worker's probes of its own server need no key.
        self._controller_headers = worker_key_headers(worker_key)

    # -- what subclasses provide ---------------------------------------------------------------------------------
    @abstractmethod
    async def prepare(self, params: Any) -> Any:
        """Check a decoded ``/worker_generate_stream`` body and turn it into what :meth:`generate` takes.

        Raises:
            Rejected: To answer at once (bad request, prompt too long, queue full).
        """

    @abstractmethod
    def generate(self, prepared: Any) -> AsyncIterator[bytes]:
        """Stream the protocol chunks of one prepared request (called once it holds a concurrency slot)."""

    def tokenizer_call(self, action: str, params: Any) -> dict[str, Any]:
        """The served model's tokenizer (:mod:`palo.serve.tokenizer_api`): ``action`` is ``"tokenize"``,
        ``"detokenize"`` or ``"info"``.

        Raises:
            ValueError: For a malformed request.
            NotImplementedError: When this worker has no tokenizer of its own.
        """
        raise NotImplementedError(f"the worker {self.worker_addr} has no tokenizer of its own to serve")

    @abstractmethod
    def model_details(self) -> dict[str, Any]:
        """The ``/model_details`` answer (``{"context_length": n}``)."""

    def status_details(self) -> dict[str, Any]:
        """Keys added to the status after the original ones (e.g. the engine's counters)."""
        return {}

    @property
    def llm_engine(self) -> Any:
        """The continuous-batching :class:`~palo.engine.LLMEngine` this worker generates with, if any (its metrics
        are served at ``GET /metrics``)."""
        return None

    def check_health(self) -> bool:
        """Whether the worker can serve; checked before each periodic heartbeat (an unhealthy one sends none, so
        the controller expires it)."""
        return True

    def health(self) -> bool:
        """The ``GET /health`` answer: the last :meth:`check_health` (a worker whose check is cheap checks now)."""
        return self.healthy

    def unhealthy_message(self) -> str:
        """What a request and a status poll are told while :meth:`serving` is False."""
        return UNHEALTHY_MESSAGE

    def serving(self) -> bool:
        """Whether the worker can answer requests now, told at no cost and for certain (a worker whose engine
        stopped cannot); a worker that answers False refuses requests with 503 and its status too, so that a
        controller sends requests elsewhere and drops it. Default: True (a backend's failures are its answers')."""
        return True

    # -- controller side -----------------------------------------------------------------------------------------
    def get_queue_length(self) -> int:
        """Requests generating plus requests waiting for a slot (0 before the first request)."""
        return self.running + self.waiting

    def get_status(self) -> dict[str, Any]:
        return {
            "model_names": [self.model_name],
            "speed": 1,
            "queue_length": self.get_queue_length(),
            "conv_mode": self.conv_mode,
            **self.status_details(),
        }

    def http(self) -> httpx.Client:
        """The one HTTP client for the controller and this worker's own probes (thread-safe, kept alive)."""
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(timeout=CONTROLLER_TIMEOUT_S)
            return self._http

    def register_to_controller(self) -> bool:
        """Register with the controller; returns whether it accepted."""
        data = {"worker_name": self.worker_addr, "check_heart_beat": True, "worker_status": self.get_status()}
        try:
            response = self.http().post(self.controller_addr + "/register_worker", json=data,
                                        headers=self._controller_headers)
        except httpx.HTTPError as exc:
            self.logger.warning("registration with %s failed: %s", self.controller_addr, exc)
            return False
        if response.status_code != 200:
            self.logger.warning("registration refused: HTTP %s %s", response.status_code, response.text[:200])
            return False
        self.logger.info("registered with %s as %s", self.controller_addr, self.worker_addr)
        return True

    def _update_health(self) -> bool:
        self.healthy = bool(self.check_health())
        return self.healthy

    def send_heart_beat(self, probe: bool = True) -> None:
        """One heartbeat; retries every 5 s while the controller is unreachable; re-registers if it forgot us.

        Args:
            probe: Check the worker's health first; otherwise trust the last check (the heartbeats sent around
                each request must not probe a backend twice per request, nor revive a worker found unhealthy).
        """
        if self.no_register or not (self._update_health() if probe else self.healthy):
            return
        while not self._stop.is_set():
            try:
                response = self.http().post(
                    self.controller_addr + "/receive_heart_beat",
                    json={"worker_name": self.worker_addr, "queue_length": self.get_queue_length()},
                    headers=self._controller_headers,
                )
                exist = bool(response.json().get("exist"))
                break
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                self.logger.warning("heartbeat to %s failed: %s", self.controller_addr, exc)
                self._stop.wait(RETRY_INTERVAL_S)
        else:
            return
        if not exist:
            self.register_to_controller()

    def _wait_until_listening(self, timeout: float = LISTEN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                self.http().post(self.worker_addr + "/worker_get_status", timeout=1.0)
                return
            except httpx.HTTPError:
                self._stop.wait(0.05)

    def _heart_beat_loop(self) -> None:
        try:
            self._heart_beat_until_stopped()
        finally:
            with self._http_lock:
                if self._http is not None:
                    self._http.close()
                    self._http = None

    def _heart_beat_until_stopped(self) -> None:
        # Register once this server answers, so the controller never sends work to a port that is not open yet.
        self._wait_until_listening()
        if not self._update_health():
            self.logger.warning("not healthy yet: registering once a heartbeat finds it healthy")
        elif not self.register_to_controller():
            self.logger.warning("will retry registering with each heartbeat")
        next_probe = time.monotonic() + self.heart_beat_interval
        while not self._stop.is_set():
            # Periodic heartbeats check health first; the ones asked for around requests report the queue length
            # at once, however many were asked for while one was being sent.
            soon = self._beat_soon.wait(max(0.0, next_probe - time.monotonic()))
            if self._stop.is_set():
                break
            self._beat_soon.clear()
            due = time.monotonic() >= next_probe
            if due:
                next_probe = time.monotonic() + self.heart_beat_interval
            if soon or due:
                self.send_heart_beat(probe=due)
            if soon and not due:
                self._stop.wait(SOON_BEAT_GAP_S)

    def start(self) -> None:
        """Start the registration/heartbeat thread (unless ``no_register``)."""
        if not self.no_register:
            threading.Thread(target=self._heart_beat_loop, name="heart-beat", daemon=True).start()

    def stop(self) -> None:
        """Stop heartbeating (the heartbeat thread then closes the HTTP client it was using)."""
        self._stop.set()
        self._beat_soon.set()

    def heart_beat_soon(self) -> None:
        """Report the queue length now, from the heartbeat thread (when a request starts and ends)."""
        if not self.no_register:
            self._beat_soon.set()

    # -- requests ------------------------------------------------------------------------------------------------
    @property
    def semaphore(self) -> asyncio.Semaphore:
        # Made on first use, inside the server's event loop.
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit_model_concurrency)
        return self._semaphore

    async def generate_stream(self, request: Request) -> Response:
        """Handle ``/worker_generate_stream``."""
        response = await self._answer(request)
        if not isinstance(response, StalledClientClosingResponse):
            # Refused at once: the controller counted the request in this worker's queue when it sent it, and only a
            # heartbeat corrects that (a stream's start and end send theirs); refusals alone kept it counted up to a
            # heartbeat interval, so a stream of bad requests showed as a long queue.
            self.heart_beat_soon()
        return response

    async def _answer(self, request: Request) -> Response:
        if not self.serving():  # 503: the controller's router tries another worker of the model
            refusal = error_chunk(self.unhealthy_message(), WORKER_ERROR)
            return Rejected(refusal, 503, {UNHEALTHY_HEADER: "1"}).response()
        try:
            params = decode_json_body(await request.body())
        except ValueError as exc:
            return Rejected(error_chunk(str(exc), WORKER_ERROR, INVALID_REQUEST)).response()
        try:
            prepared = await self.prepare(params)
        except Rejected as exc:
            return exc.response()
        except Exception as exc:  # noqa: BLE001 - a bug or a device error answers this request, not the worker
            self.logger.exception("preparing a request failed")
            # The original answered every failure with status 200 and an error chunk (its checks ran in the stream).
            return Response(error_chunk(f"{type(exc).__name__}: {exc}", WORKER_ERROR), 200,
                            media_type=STREAM_MEDIA_TYPE)
        # Counted as waiting in the step whose queue check admitted it: counted only once its stream began, requests
        # admitted meanwhile (the response is sent first) each passed the check, and a full queue took a few more.
        self.waiting += 1
        started = [False]

        async def unless_started() -> None:
            if not started[0]:  # the client left before the stream's first step: its finally never runs
                self.waiting -= 1
                self.heart_beat_soon()

        return StalledClientClosingResponse(self._stream(prepared, started), media_type=STREAM_MEDIA_TYPE,
                                            logger=self.logger, on_close=unless_started)

    async def _stream(self, prepared: Any, started: list[bool]) -> AsyncIterator[bytes]:
        """The answer's chunks, once a concurrency slot is free; the request is already counted as waiting."""
        started[0] = True
        acquired = False
        slot: asyncio.Future | None = None
        try:
            if self.semaphore.locked():  # a wait: keep-alives until a place is free
                slot = asyncio.ensure_future(self.semaphore.acquire())
                while not (await asyncio.wait({slot}, timeout=QUEUE_KEEPALIVE_S))[0]:
                    yield KEEPALIVE_CHUNK  # nothing to say yet: readers with a per-read timeout keep waiting
                await slot
            else:  # a free place is taken in this step, as before: generation starts without a turn of the loop
                await self.semaphore.acquire()
            acquired = True
            self.waiting -= 1
            self.running += 1
            self.heart_beat_soon()
            # aclosing: a client that goes away closes the subclass's stream now (freeing what it holds), not
            # whenever the garbage collector finalizes it.
            async with aclosing(self.generate(prepared)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Exception as exc:  # noqa: BLE001 - the client gets the protocol's error chunk, the log the traceback
            self.logger.exception("generation failed")
            yield error_chunk(f"{type(exc).__name__}: {exc}", WORKER_ERROR)
        finally:
            if slot is not None and not acquired:
                if slot.done() and not slot.cancelled() and slot.exception() is None:
                    self.semaphore.release()  # the place came while the client was leaving (at a keep-alive)
                else:
                    slot.cancel()  # a place given just now is handed on by the cancelled acquire itself
            if acquired:
                self.running -= 1
                self.semaphore.release()
            else:
                self.waiting -= 1
            self.heart_beat_soon()


def create_app(worker: BaseWorker) -> FastAPI:
    """The worker's FastAPI application: the original worker endpoints."""
    app = FastAPI(title=worker.title)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes())
    metrics = WorkerMetrics(worker, worker.llm_engine)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        return await worker.generate_stream(request)

    @app.post("/worker_get_status")
    async def worker_get_status() -> JSONResponse:
        # An unhealthy worker must not look alive to a controller that polls it (its refresh re-registered a worker
        # whose engine had stopped, with a fresh heartbeat time, so it was never dropped).
        if not worker.serving():
            return JSONResponse({"error": worker.unhealthy_message(), **worker.status_details()}, status_code=503)
        return JSONResponse(worker.get_status())

    @app.get("/health")
    async def health() -> JSONResponse:  # what orchestrators probe (vLLM's and SGLang's path)
        ok = worker.health()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:  # Prometheus text format (vLLM's path)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/model_details")
    async def model_details() -> JSONResponse:
        return JSONResponse(worker.model_details())

    async def tokenizer_call(action: str, request: Request | None) -> JSONResponse:
        try:
            params = None if request is None else decode_json_body(await request.body())
            return JSONResponse(await asyncio.to_thread(worker.tokenizer_call, action, params))
        except ValueError as exc:  # not JSON, or a malformed request
            return JSONResponse({"error": str(exc)}, status_code=400)
        except NotImplementedError as exc:
            return JSONResponse({"error": str(exc)}, status_code=501)

    @app.post("/worker_tokenize")
    async def worker_tokenize(request: Request) -> JSONResponse:
        return await tokenizer_call("tokenize", request)

    @app.post("/worker_detokenize")
    async def worker_detokenize(request: Request) -> JSONResponse:
        return await tokenizer_call("detokenize", request)

    @app.post("/worker_tokenizer_info")
    async def worker_tokenizer_info() -> JSONResponse:
        return await tokenizer_call("info", None)

    return app


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every worker takes to find its controller and be found (the original's names and defaults)."""
    parser.add_argument("--host", type=str, default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=21002)
    # "--worker" spelled out: the README's abbreviation of --worker-address, which --worker-key made ambiguous.
    parser.add_argument("--worker-address", "--worker", type=service_url, default="http://localhost:21002",
                        help="the URL the controller reaches this worker at")
    parser.add_argument("--controller-address", type=service_url, default="http://localhost:21001")
    add_worker_key_argument(parser)


def serve(worker: BaseWorker, host: str, port: int) -> None:
    """Start the worker's background work, serve its endpoints until interrupted, then stop it."""
    worker.start()
    try:
        serve_http(create_app(worker), host, port)
    finally:
        worker.stop()
