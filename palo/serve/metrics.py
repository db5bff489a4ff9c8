"""Prometheus metrics of one worker (``GET /metrics``), named after vLLM's with the ``palo:`` prefix.

Each worker serves its own: the controller routes, it does not generate. Scrape every worker (its ``--worker``
address) and sum by ``model_name`` for a model's totals. What is measured:

* per request, from the engine's last output of each: its end (``palo:request_success_total`` by
  ``finished_reason``: stop, length, abort, error), its prompt and answer sizes (``palo:prompt_tokens_total`` counts
  context positions, image positions included; ``palo:generation_tokens_total`` answer tokens, as the API's
  ``usage.completion_tokens``), and histograms of time to first token, end-to-end latency, prompt and answer size;
* read at each scrape: requests running and waiting (in the engine, and in the worker's queue before it), KV-cache
  use, prefix-cache hits and queries (prompt positions), images run through the vision tower, 503 answers of a full
  queue.

A worker without the continuous-batching engine (``--engine static``, the OpenAI-backed worker) reports the
worker-level figures only.
"""

from __future__ import annotations

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
