"""The controller: keeps the registry of model workers and routes requests to them.

Run ``python -m palo.serve.controller`` or ``python palo/serve/controller.py --host 0.0.0.0 --port 10000``.
Endpoints (POST, JSON), as in the original PALO/LLaVA controller:

* ``/register_worker``, ``/receive_heart_beat``, ``/refresh_all_workers``: the worker registry. Workers that send no
  heartbeat for ``--heart-beat-expiration`` seconds (30) are dropped, and never chosen once expired.
* ``/list_models``, ``/get_worker_address``: dispatch by ``lottery`` or ``shortest_queue`` (default).
* ``/worker_generate_stream``: proxies a request to a worker of its ``model`` and re-emits the NUL-delimited stream.
  A missing worker gives exactly one error chunk (code 2); a worker that cannot be reached is dropped and the
  request retried on another worker of the model before code 3 is reported (docs/compat.md#serving).
* ``/worker_get_status``: the aggregate status, so a controller can register with a parent controller.

With ``--worker-key`` (or ``$PALO_WORKER_KEY``) the routes that change the registry or generate
(``/register_worker``, ``/receive_heart_beat``, ``/refresh_all_workers``, ``/worker_generate_stream``) require
``Authorization: Bearer <worker key>``, which this project's workers send; without it they are open, as in the
original. The read-only routes stay open either way (the web demo and the original clients call them).

It also serves the OpenAI-compatible API of :mod:`palo.serve.openai_api` (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``), optionally behind ``--api-key``, and ``GET /health`` and ``GET /metrics`` (Prometheus:
:class:`palo.serve.metrics.ControllerMetrics`).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout, not files next to this one
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # through palo.cli, before the imports below: a missing extra is one line
    from palo.cli import module_main

    sys.exit(module_main("palo.serve.controller"))

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from palo.constants import CONTROLLER_HEART_BEAT_EXPIRATION
from palo.serve.body_limit import BodyLimit, max_request_bytes
from palo.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from palo.serve.metrics import ControllerMetrics, RequestMetrics
from palo.serve.openai_api import create_openai_router, is_openai_path, openai_error
from palo.serve.protocol import (
    INVALID_REQUEST,
    KEEPALIVE_CHUNK,
    MODEL_NOT_FOUND,
    NO_WORKER,
    STREAM_MEDIA_TYPE,
    WORKER_ERROR,
    WORKER_UNREACHABLE,
    decode_json_body,
    error_chunk,
    shown,
)
from palo.serve.routing import HOPS_HEADER, MAX_HOPS, NoWorkerError, Router, WorkerUnreachableError
from palo.serve.tokenizer_api import create_tokenizer_router
from palo.serve.utils import (
    WORKER_KEY_ENV,
    StalledClientClosingResponse,
    bearer_matches,
    build_logger,
    describe_error,
    end_with_launcher,
    header_count,
    masked_args,
    refuse_unservable,
    serve_http,
    service_url_error,
    worker_key_arg,
)

STATUS_TIMEOUT_S = 5.0  # polling a worker's status (the original's value)
REFRESH_THREADS = 32  # workers polled at once by a refresh
DISPATCH_METHODS = ("lottery", "shortest_queue")
# The original protocol's routes that change the registry or generate: behind --worker-key when one is set.
WORKER_KEY_ROUTES = ("/register_worker", "/receive_heart_beat", "/refresh_all_workers", "/worker_generate_stream")
AUTHENTICATION_ERROR = "authentication_error"  # the error_type of a refused stream (OpenAI's name for a 401)
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}  # what a 401 must say it wants (RFC 9110)


@dataclasses.dataclass
class WorkerInfo:
    """What the controller knows about one worker."""

    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float
    conv_mode: str | None = None


MAX_QUEUE_LENGTH = 2**31 - 1  # past any real queue; a larger count (or a float's infinity) broke the load division
# Workers report speed 1 (the protocol's int); a bound keeps the sum over all workers finite (1e308 made the lottery's
# weights and the controller's own status, their sum, infinite: 500s).
MAX_SPEED = 1e9


def parse_queue_length(value: Any) -> int:
    """A worker's reported queue length: an integer from 0 to :data:`MAX_QUEUE_LENGTH`.

    Raises:
        ValueError: Saying what is wrong.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUEUE_LENGTH:
        raise ValueError(f"'queue_length' must be an integer from 0 to {MAX_QUEUE_LENGTH}, got {shown(value)}")
    return value


def parse_worker_status(status: Any) -> dict[str, Any]:
    """The parts of a worker's ``/worker_get_status`` answer the registry keeps, checked.

    Raises:
        ValueError: Saying what is wrong, for a status that is not a JSON object with ``model_names`` (a non-empty
            list of model names), ``speed`` (a number from 0 to :data:`MAX_SPEED`; 0: the worker takes no requests)
            and ``queue_length`` (an integer >= 0).
    """
    if not isinstance(status, dict):
        raise ValueError(f"the worker status must be a JSON object, got {status!r:.80}")
    names = status.get("model_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"'model_names' must be a non-empty list of model names, got {names!r:.80}")
    speed, queue = status.get("speed"), status.get("queue_length")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed <= MAX_SPEED:
        raise ValueError(f"'speed' must be a number from 0 to {MAX_SPEED:g}, got {shown(repr(speed))}")
    queue = parse_queue_length(queue)
    conv_mode = status.get("conv_mode")
    return {"model_names": names, "speed": speed, "queue_length": queue,
            "conv_mode": conv_mode if isinstance(conv_mode, str) else None}


class Controller:
    """The worker registry and dispatch (no HTTP here; see :func:`create_app`).

    Args:
        dispatch_method: ``lottery`` or ``shortest_queue``.
        heart_beat_expiration: Seconds without a heartbeat after which a worker is dropped.
        clock: Time source (tests pass a fake one).
        status_fetcher: ``worker_name -> status dict or None``; the default polls ``/worker_get_status``.
        logger: Where to log.
    """

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION,
        clock: Callable[[], float] = time.monotonic,
        status_fetcher: Callable[[str], dict | None] | None = None,
        logger: Any = None,
    ) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = heart_beat_expiration
        self.clock = clock
        self.status_fetcher = status_fetcher or self._fetch_status
        self.logger = logger or logging.getLogger(__name__)
        self.worker_info: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._turns: dict[str, int] = {}  # per model: rotates among its equally loaded workers

    # -- registry ------------------------------------------------------------------------------------------------
    def _fetch_status(self, worker_name: str) -> dict | None:
        try:
            response = httpx.post(worker_name + "/worker_get_status", timeout=STATUS_TIMEOUT_S)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            self.logger.warning("status of %s unavailable: %s", worker_name, exc)
            return None

    def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or update a worker; with no status given, poll the worker for it.

        Returns:
            Whether the worker was registered (False when its status could not be obtained or is malformed).
        """
        return self.register(worker_name, check_heart_beat, worker_status) is None

    def register(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> str | None:
        """:meth:`register_worker`, returning why a worker was refused (None when it was registered)."""
        if (error := service_url_error(worker_name)) is not None:
            return f"'worker_name' must be the worker's base URL: {error}"
        worker_name = worker_name.rstrip("/")
        if worker_status is None:
            worker_status = self.status_fetcher(worker_name)
            if worker_status is None:
                return f"no status from {worker_name} (POST /worker_get_status failed)"
        try:
            info = WorkerInfo(**parse_worker_status(worker_status), check_heart_beat=bool(check_heart_beat),
                              last_heart_beat=self.clock())
        except ValueError as exc:
            self.logger.warning("not registering %s: %s", worker_name, exc)
            return str(exc)
        with self._lock:
            known = worker_name in self.worker_info
            self.worker_info[worker_name] = info
        self.logger.info("%s worker %s serving %s", "updated" if known else "registered", worker_name, info.model_names)
        return None

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            if self.worker_info.pop(worker_name, None) is not None:
                self.logger.info("removed worker %s", worker_name)

    def refresh_all_workers(self) -> None:
        """Re-register every known worker by polling it; drop the ones that do not answer.

        The workers are polled together, so the refresh takes one status timeout however many hang (one by one,
        seven hung workers took 35 s and the web UI, which refreshes on each page load, gave up with no model).
        """
        started = self.clock()
        with self._lock:
            known = list(self.worker_info.items())
        if not known:
            return
        with concurrent.futures.ThreadPoolExecutor(min(len(known), REFRESH_THREADS), "refresh-workers") as pool:
            statuses = list(pool.map(self.status_fetcher, [name for name, _ in known]))
        for (name, info), status in zip(known, statuses):
            fresh = None
            if status is not None:
                try:
                    fresh = WorkerInfo(**parse_worker_status(status), check_heart_beat=info.check_heart_beat,
                                       last_heart_beat=self.clock())
                except ValueError as exc:
                    self.logger.warning("dropping %s: %s", name, exc)
            with self._lock:
                # The polls take up to a status timeout: what happened to a worker meanwhile is newer than its poll
                # and wins. A removal stays (the worker died after answering), a registration stays (it came back
                # after its poll failed), a heartbeat's queue length stays.
                if self.worker_info.get(name) is not info or info.last_heart_beat > started:
                    continue
                if fresh is None:
                    del self.worker_info[name]
                else:
                    self.worker_info[name] = fresh
            if fresh is None:
                self.logger.info("removed worker %s (no usable status)", name)

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """Record a heartbeat; False tells the worker to register again."""
        with self._lock:
            info = self.worker_info.get(str(worker_name).rstrip("/"))
            if info is None:
                return False
            info.queue_length = int(queue_length)
            info.last_heart_beat = self.clock()
            return True

    def _alive(self, info: WorkerInfo, now: float) -> bool:
        return not info.check_heart_beat or now - info.last_heart_beat <= self.heart_beat_expiration

    def remove_stale_workers(self) -> list[str]:
        """Drop workers whose last heartbeat is older than the expiration; returns their names."""
        now = self.clock()
        with self._lock:
            stale = [name for name, info in self.worker_info.items() if not self._alive(info, now)]
            for name in stale:
                del self.worker_info[name]
        for name in stale:
            self.logger.info("worker %s expired (no heartbeat for %.1f s)", name, self.heart_beat_expiration)
        return stale

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.heart_beat_expiration / 2, CONTROLLER_HEART_BEAT_EXPIRATION))
        while not self._stop.wait(interval):
            self.remove_stale_workers()

    def start(self) -> None:
        threading.Thread(target=self._sweep_loop, name="expire-workers", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # -- queries -------------------------------------------------------------------------------------------------
    def _live_workers(self, model_name: str | None = None) -> list[tuple[str, WorkerInfo]]:
        now = self.clock()
        with self._lock:
            return [
                (name, info)
                for name, info in self.worker_info.items()
                if self._alive(info, now) and (model_name is None or model_name in info.model_names)
            ]

    def list_models(self) -> list[str]:
        return sorted({m for _, info in self._live_workers() for m in info.model_names})

    def conv_mode(self, model_name: str) -> str | None:
        """The conversation template reported by a worker of the model (None if unknown)."""
        return next((info.conv_mode for _, info in self._live_workers(model_name) if info.conv_mode), None)

    def get_worker_address(self, model_name: str, exclude: set[str] | frozenset = frozenset(),
                           count: bool = True) -> str:
        """Choose a live worker for a model; ``""`` when there is none.

        ``lottery`` draws with probability proportional to speed. ``shortest_queue`` takes the smallest
        ``queue_length / speed`` and counts the request against that worker until its next heartbeat; workers tied
        for the smallest take turns, each model's among its own (docs/compat.md#serving). Under both, a worker of
        speed 0 takes no requests. ``count=False`` for a request that is not generation (tokenizing): the worker
        sends no heartbeat for it, so the count would stand until its next periodic one.
        """
        candidates = [(n, i) for n, i in self._live_workers(model_name) if n not in exclude and i.speed > 0]
        if not candidates:
            return ""
        if self.dispatch_method == "lottery":
            return random.choices([n for n, _ in candidates], weights=[info.speed for _, info in candidates])[0]
        load = {name: info.queue_length / info.speed for name, info in candidates}
        lightest = min(load.values())
        tied = sorted((n, i) for n, i in candidates if load[n] == lightest)
        with self._lock:
            # One counter per model: a shared one, bumped by another model's requests in between, kept landing on
            # the same one of this model's idle workers.
            turn = self._turns.get(model_name, 0)
            self._turns[model_name] = turn + 1
            name, info = tied[turn % len(tied)]
            if count:
                info.queue_length += 1
        return name

    def model_load(self) -> dict[str, tuple[int, int]]:
        """Per model: its live workers and their queue lengths summed (for ``GET /metrics``)."""
        load: dict[str, tuple[int, int]] = {}
        for _, info in self._live_workers():
            for model in info.model_names:
                workers, queue = load.get(model, (0, 0))
                load[model] = (workers + 1, queue + info.queue_length)
        return load

    def worker_status(self) -> dict[str, Any]:
        """The aggregate status (a controller can act as a worker of a parent controller)."""
        workers = self._live_workers()
        return {
            "model_names": sorted({m for _, info in workers for m in info.model_names}),
            "speed": sum(info.speed for _, info in workers),
            "queue_length": sum(info.queue_length for _, info in workers),
        }


def worker_key_refusal(authorization: str, worker_key: str | None) -> str | None:
    """Why a request to one of :data:`WORKER_KEY_ROUTES` is refused; None when it may go on.

    Args:
        authorization: The request's ``Authorization`` header ("" when absent).
        worker_key: The controller's ``--worker-key``; None or "" accepts every request, as the original did.
    """
    if not worker_key or bearer_matches(authorization, worker_key):
        return None
    return ("missing or wrong worker key: this controller runs with --worker-key, so workers and tools must send "
            f"'Authorization: Bearer <worker key>' (their --worker-key or ${WORKER_KEY_ENV})")


class KeyedRouter(Router):
    """A :class:`Router` whose requests to workers carry the controller's worker key.

    A worker registered with this controller may itself be a controller (one level down) that runs with the same
    ``--worker-key``: without the key its ``/worker_generate_stream`` would refuse every relayed request. Plain
    workers ignore the header. Only workers that were registered with the key (it is required to register) get it.

    Args:
        registry: The worker registry.
        read_timeout: Seconds to wait for each piece of a worker's answer.
        worker_key: Sent as ``Authorization: Bearer``.
    """

    def __init__(self, registry: Controller, read_timeout: float, worker_key: str) -> None:
        super().__init__(registry, read_timeout)
        self.worker_key = worker_key

    @property
    def client(self) -> httpx.AsyncClient:
        fresh = self._client is None
        client = super().client
        if fresh:  # the base class makes the client on first use; its requests' own headers merge with these
            client.headers["Authorization"] = f"Bearer {self.worker_key}"
        return client


def _no_worker_message(controller: Controller, model: Any) -> str:
    return f"no live worker serves model {model!r}; available models: {controller.list_models()}"


def create_app(controller: Controller, read_timeout: float = 120.0, api_key: str | None = None,
               prompt_tokens_details: bool = False, worker_key: str | None = None) -> FastAPI:
    """The controller's FastAPI application (original endpoints plus the OpenAI-compatible API).

    Args:
        controller: The registry.
        read_timeout: Seconds to wait for each piece of a worker's stream.
        api_key: If set, ``/v1/*`` and the tokenizer routes require ``Authorization: Bearer <api_key>``.
        prompt_tokens_details: Report ``usage.prompt_tokens_details.cached_tokens`` on ``/v1/*``.
        worker_key: If set, :data:`WORKER_KEY_ROUTES` require ``Authorization: Bearer <worker_key>`` (401
            otherwise, the registry untouched), and requests relayed to workers carry it.
    """
    router = KeyedRouter(controller, read_timeout, worker_key) if worker_key else Router(controller, read_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        controller.start()
        try:
            yield
        finally:
            controller.stop()
            await router.aclose()

    app = FastAPI(title="PALO controller", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes())
    metrics = ControllerMetrics(controller)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: a refused oversized body counts too

    async def json_body(request: Request) -> Any:
        try:
            return decode_json_body(await request.body() or b"null")
        except ValueError as exc:
            raise _BadJson(str(exc)) from None

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # keeps serving after any bug
        controller.logger.exception("error handling %s", request.url.path)
        if is_openai_path(request.url.path):
            return openai_error(500, f"{type(exc).__name__}: {exc}", "server_error")
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        """An unknown path or a wrong method: under /v1 in OpenAI's error shape (its clients read
        ``error.message``), FastAPI's own elsewhere."""
        if not is_openai_path(request.url.path):
            return await http_exception_handler(request, exc)
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} is not allowed for {request.url.path}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return openai_error(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(_BadJson)
    async def _bad_json(request: Request, exc: _BadJson) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    def key_refusal(request: Request) -> str | None:
        """Why a request to one of :data:`WORKER_KEY_ROUTES` is refused (None: go on); checked before its body is
        read, so that a refused request costs nothing and changes nothing."""
        reason = worker_key_refusal(request.headers.get("authorization", ""), worker_key)
        if reason is not None:  # the address only: whatever the request sent as a key is never logged
            controller.logger.warning("refused %s from %s: missing or wrong worker key", request.url.path,
                                      request.client.host if request.client else "an unknown address")
        return reason

    def unauthorized(request: Request) -> JSONResponse | None:
        """The 401 of a JSON registry route called without the worker key, in the shape its other errors take."""
        reason = key_refusal(request)
        return None if reason is None else JSONResponse({"error": reason}, 401, headers=UNAUTHORIZED_HEADERS)

    @app.get("/health")
    async def health() -> JSONResponse:  # the controller (and its API) answers; the models it can route to
        return JSONResponse({"status": "ok", "models": controller.list_models()})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:  # Prometheus text format (vLLM's path)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Response:
        if (refusal := unauthorized(request)) is not None:
            return refusal
        data = await json_body(request)
        if (not isinstance(data, dict) or not isinstance(data.get("worker_name"), str) or not data["worker_name"]
                or not isinstance(data.get("check_heart_beat", False), bool)):
            return JSONResponse({"error": "expected {'worker_name': URL, 'check_heart_beat': bool, 'worker_status'}"},
                                status_code=400)
        refused = await run_in_threadpool(controller.register, data["worker_name"],
                                          data.get("check_heart_beat", False), data.get("worker_status"))
        if refused is not None:
            return JSONResponse({"error": f"not registered: {refused}"}, status_code=400)
        return JSONResponse(None)

    @app.post("/refresh_all_workers")
    async def refresh_all_workers(request: Request) -> Response:
        if (refusal := unauthorized(request)) is not None:
            return refusal
        await run_in_threadpool(controller.refresh_all_workers)
        return JSONResponse(None)

    @app.post("/list_models")
    async def list_models() -> Response:
        return JSONResponse({"models": controller.list_models()})

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> Response:
        data = await json_body(request)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str):
            return JSONResponse({"error": "expected {'model': name}"}, status_code=400)
        return JSONResponse({"address": controller.get_worker_address(model)})

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> Response:
        if (refusal := unauthorized(request)) is not None:
            return refusal
        data = await json_body(request)
        if not isinstance(data, dict) or not isinstance(data.get("worker_name"), str):
            return JSONResponse({"error": "expected {'worker_name': URL, 'queue_length': int}"}, status_code=400)
        try:
            exist = controller.receive_heart_beat(data["worker_name"], parse_queue_length(data.get("queue_length", 0)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"exist": exist})

    @app.post("/worker_get_status")
    async def worker_get_status() -> Response:
        return JSONResponse(controller.worker_status())

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        if (reason := key_refusal(request)) is not None:  # one error chunk, as this route's other refusals
            return Response(error_chunk(reason, WORKER_ERROR, AUTHENTICATION_ERROR), 401,
                            media_type=STREAM_MEDIA_TYPE, headers=UNAUTHORIZED_HEADERS)
        body = await request.body()
        try:
            params = decode_json_body(body)
        except ValueError as exc:
            return Response(error_chunk(str(exc), WORKER_ERROR, INVALID_REQUEST), 400, media_type=STREAM_MEDIA_TYPE)
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(model, str):
            return Response(error_chunk("'model' is required and must be a string", NO_WORKER, INVALID_REQUEST), 400,
                            media_type=STREAM_MEDIA_TYPE)
        hops = header_count(request.headers.get(HOPS_HEADER)) or 0
        if hops >= MAX_HOPS:  # a worker registration that points back at a controller on the way
            return Response(error_chunk(f"the request went through {hops} relays: the workers registered for "
                                        f"{model!r} form a loop", WORKER_UNREACHABLE), 508,
                            media_type=STREAM_MEDIA_TYPE)
        try:
            stream = await router.open(model, body, hops)
        except NoWorkerError:
            return Response(error_chunk(_no_worker_message(controller, model), NO_WORKER, MODEL_NOT_FOUND), 404,
                            media_type=STREAM_MEDIA_TYPE)
        except WorkerUnreachableError as exc:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            return Response(error_chunk(str(exc), WORKER_UNREACHABLE), 503, media_type=STREAM_MEDIA_TYPE,
                            headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                # Re-encoded whole, so a cut stream never yields half a chunk; the worker's keep-alives pass on.
                async for obj in stream.chunks(keepalives=True):
                    yield KEEPALIVE_CHUNK if obj is None else json.dumps(obj, ensure_ascii=False).encode() + b"\0"
            except (httpx.HTTPError, ValueError) as exc:
                controller.logger.warning("stream from %s failed: %s", stream.worker, describe_error(exc))
                yield error_chunk(f"worker {stream.worker} failed: {describe_error(exc)}", WORKER_UNREACHABLE)
            finally:
                await stream.aclose()

        # As the worker's and the API's streams: a client that stops reading is dropped, and a client that left
        # is noticed between two writes (a plain stream wrote every chunk at hand to the dead socket).
        # on_close: a client that left before the first chunk cancels the stream before relay() starts, and then
        # its finally never runs: the upstream stayed open and the worker generated the whole answer for nobody.
        return StalledClientClosingResponse(relay(), status_code=stream.status_code, media_type=STREAM_MEDIA_TYPE,
                                            logger=controller.logger, on_close=stream.aclose)

    app.include_router(create_openai_router(controller, router, api_key, prompt_tokens_details))
    app.include_router(create_tokenizer_router(controller, router, api_key))
    return app


class _BadJson(ValueError):
    """The request body is not JSON."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PALO controller (original protocol + OpenAI-compatible API)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--dispatch-method", type=str, choices=DISPATCH_METHODS, default="shortest_queue")
    parser.add_argument("--heart-beat-expiration", type=float, default=CONTROLLER_HEART_BEAT_EXPIRATION,
                        help="seconds without a heartbeat before a worker is dropped")
    parser.add_argument("--read-timeout", type=float, default=120.0,
                        help="seconds to wait for each piece of a worker's stream")
    parser.add_argument("--api-key", type=str, default=os.environ.get("PALO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PALO_API_KEY, else open)")
    parser.add_argument("--worker-key", type=worker_key_arg, default=os.environ.get(WORKER_KEY_ENV),
                        help="require 'Authorization: Bearer KEY' on /register_worker, /receive_heart_beat, "
                             "/refresh_all_workers and /worker_generate_stream; give the workers the same key "
                             f"(default: ${WORKER_KEY_ENV}, else open as in the original)")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="report usage.prompt_tokens_details.cached_tokens on /v1/* (prompt positions read from "
                             "the prefix cache); off by default: without cache_salt it hints at others' prompts")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unservable(parser, args)
    end_with_launcher()

    logger = build_logger("controller", "controller.log")
    logger.info("args: %s", masked_args(args))
    controller = Controller(args.dispatch_method, args.heart_beat_expiration, logger=logger)
    app = create_app(controller, read_timeout=args.read_timeout, api_key=args.api_key,
                     prompt_tokens_details=args.enable_prompt_tokens_details, worker_key=args.worker_key)
    serve_http(app, args.host, args.port)
    return 0
