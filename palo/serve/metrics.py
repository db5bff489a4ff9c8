"""Prometheus metrics (``GET /metrics``) of a worker and of the controller, named after vLLM's with the ``palo:``
prefix.

Each worker serves its own (:class:`WorkerMetrics`): the controller routes, it does not generate. Scrape every
worker (its ``--worker`` address) and sum by ``model_name`` for a model's totals. What is measured:

* per request, from the engine's last output of each: its end (``palo:request_success_total`` by
  ``finished_reason``: stop, length, abort, error), its prompt and answer sizes (``palo:prompt_tokens_total`` counts
  context positions, image positions included; ``palo:generation_tokens_total`` answer tokens, as the API's
  ``usage.completion_tokens``), and histograms of time to first token, end-to-end latency, prompt and answer size;
* read at each scrape: requests running and waiting (in the engine, and in the worker's queue before it), KV-cache
  use, prefix-cache hits and queries (prompt positions), images run through the vision tower, 503 answers of a full
  queue.

A worker without the continuous-batching engine (``--engine static``, the OpenAI-backed worker) reports the
worker-level figures only.

The controller's (:class:`ControllerMetrics`) are what its clients see: requests by endpoint and HTTP status
(``palo:api_requests_total``: a busy worker's 503, an unknown model's 404, a wrong key's 401), seconds until each
answer starts (``palo:api_response_start_seconds``; for a streamed answer, until its headers), and at each scrape the
live workers and their reported queue lengths per model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from palo.engine import LLMEngine, RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets for the same histograms (seconds; then positions / tokens).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class WorkerMetrics:
    """The metrics of one worker, in a registry of their own (several workers may share a process in tests).

    Args:
        worker: The worker (:class:`~palo.serve.worker_base.BaseWorker`): its model name, queue and rejections.
        engine: Its continuous-batching engine, whose finished requests are observed from now on; None for a worker
            without one.
    """

    def __init__(self, worker: Any, engine: LLMEngine | None = None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = worker.model_name
        labels = ["model_name"]
        self.requests = Counter("palo:request_success", "Requests ended, by finished_reason (stop, length, abort, "
                                "error).", labels + ["finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("palo:prompt_tokens", "Context positions of ended requests' prompts (image "
                                     "positions included).", labels, registry=self.registry)
        self.generation_tokens = Counter("palo:generation_tokens", "Answer tokens of ended requests.", labels,
                                         registry=self.registry)
        self.ttft = Histogram("palo:time_to_first_token_seconds", "Seconds from a request's arrival in the engine to "
                              "its first token.", labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("palo:e2e_request_latency_seconds", "Seconds from a request's arrival in the engine "
                                 "to its end.", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_size = Histogram("palo:request_prompt_tokens", "Context positions of a request's prompt.", labels,
                                     buckets=SIZE_BUCKETS, registry=self.registry)
        self.answer_size = Histogram("palo:request_generation_tokens", "Answer tokens of a request.", labels,
                                     buckets=SIZE_BUCKETS, registry=self.registry)
        self.registry.register(_Snapshot(worker, engine))
        if engine is not None:
            engine.finish_observers.append(self.observe)

    def observe(self, output: RequestOutput) -> None:
        """Count one ended request (called from the engine thread with its last output)."""
        name = self.model_name
        self.requests.labels(name, output.finish_reason or "error").inc()
        self.prompt_tokens.labels(name).inc(output.prompt_positions)
        self.generation_tokens.labels(name).inc(output.num_tokens)
        self.prompt_size.labels(name).observe(output.prompt_positions)
        self.answer_size.labels(name).observe(output.num_tokens)
        if output.first_token_s is not None:
            self.ttft.labels(name).observe(output.first_token_s)
        if output.latency_s is not None:
            self.latency.labels(name).observe(output.latency_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """The figures read at scrape time: queue, KV cache, prefix cache, vision tower, rejections."""

    def __init__(self, worker: Any, engine: LLMEngine | None) -> None:
        self.worker = worker
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        name = [self.worker.model_name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(name, value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(name, value)
            return family

        yield gauge("palo:worker_requests_running", "Requests holding one of the worker's concurrency slots.",
                    self.worker.running)
        yield gauge("palo:worker_requests_waiting", "Requests waiting for one of the worker's concurrency slots.",
                    self.worker.waiting)
        yield counter("palo:worker_requests_rejected", "Requests answered 503 because the queue was full.",
                      self.worker.rejected)
        if self.engine is None:
            return
        stats = self.engine.stats()
        yield gauge("palo:num_requests_running", "Requests in the engine's running batch.", stats["running"])
        yield gauge("palo:num_requests_waiting", "Requests in the engine waiting for a place or KV blocks.",
                    stats["waiting"])
        total = stats["kv_blocks_total"]  # at least 1: the engine refuses a cache without a usable block
        yield gauge("palo:kv_cache_usage_perc", "Fraction of the KV cache's blocks in use (1 = full).",
                    stats["kv_blocks_used"] / total)
        yield gauge("palo:kv_cache_blocks", "KV-cache blocks (each of block_size positions).", total)
        blocks = self.engine.blocks
        yield counter("palo:prefix_cache_queries", "Prompt positions looked up in the prefix cache.", blocks.queries)
        yield counter("palo:prefix_cache_hits", "Prompt positions served from the prefix cache.", blocks.hits)
        yield counter("palo:images_encoded", "Images run through the vision tower.", stats["images_encoded"])


# Seconds until an answer starts: routing and validation are milliseconds, a whole (unstreamed) answer seconds.
RESPONSE_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ControllerMetrics:
    """The controller's metrics, in a registry of their own.

    Args:
        controller: The :class:`~palo.serve.controller.Controller` (its live workers, read at each scrape).
    """

    def __init__(self, controller: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("palo:api_requests", "HTTP requests answered, by endpoint (the route's path; "
                                "'other' for a path no route has) and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.response_start = Histogram("palo:api_response_start_seconds", "Seconds from a request's arrival to the "
                                        "start of its answer (a streamed answer: its headers).", ["endpoint"],
                                        buckets=RESPONSE_START_BUCKETS, registry=self.registry)
        self.registry.register(_Workers(controller))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting each HTTP request by endpoint and status into :class:`ControllerMetrics`.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one wraps streamed answers and hides a client's
    disconnection from the handler, which the OpenAI API needs to stop generating for a client that left.

    Args:
        app: The application it wraps.
        metrics: Where the counts go.
    """

    def __init__(self, app: Any, metrics: ControllerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the client gets when the application fails before it answers

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.response_start.labels(_endpoint(scope)).observe(time.monotonic() - started)
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(_endpoint(scope), str(status)).inc()


def _endpoint(scope: dict) -> str:
    """The route a request matched, as its path template (``/v1/models/{model:path}``), or ``other``: the label set
    stays as small as the application's routes, whatever paths clients try."""
    route = scope.get("route")  # set by the router once it has matched
    return str(getattr(route, "path", None) or "other")


class _Workers(Collector):
    """Live workers and their reported queue lengths, per model, read at scrape time."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("palo:workers", "Live workers serving each model.", labels=["model_name"])
        queued = GaugeMetricFamily("palo:workers_queue_length", "Requests queued at a model's workers, as their "
                                   "heartbeats last reported (plus those routed to them since).",
                                   labels=["model_name"])
        for model, (count, queue) in sorted(self.controller.model_load().items()):
            workers.add_metric([model], count)
            queued.add_metric([model], queue)
        yield workers
        yield queued
