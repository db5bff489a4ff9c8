"""A model worker: serves one checkpoint over the original PALO/LLaVA worker protocol.

Run ``python -m palo.serve.model_worker`` or ``python palo/serve/model_worker.py`` with the original flags, e.g.::

    python palo/serve/model_worker.py --host 0.0.0.0 --controller http://localhost:10000 --port 40000 \\
        --worker http://localhost:40000 --model-path MBZUAI/PALO-13B

(``--controller`` is an argparse abbreviation of ``--controller-address`` and ``--worker`` an alias of
``--worker-address``, as the PALO README writes them.) Endpoints (POST, JSON):

* ``/worker_generate_stream``: generation parameters in, NUL-delimited cumulative JSON chunks out
  (:mod:`palo.serve.protocol`). Malformed requests get HTTP 400 whose body is one error chunk.
* ``/worker_get_status``: ``{"model_names", "speed", "queue_length", "conv_mode", "engine"}`` (``conv_mode`` is an
  addition: the template the checkpoint was trained with, used by the controller's OpenAI-compatible API;
  ``engine`` another: waiting and running sequences, KV cache use and recent tokens/s).
  When ``--max-queue`` requests already wait, a new one gets HTTP 503 with ``Retry-After`` instead of queueing;
  requests being read (images decoded, at most :data:`READ_CONCURRENCY` at once) count as waiting.
* ``/model_details``: ``{"context_length"}`` (as LLaVA's worker).

Additions (GET): ``/health`` and ``/metrics`` (Prometheus text, :mod:`palo.serve.metrics`).

The worker registers with the controller and sends a heartbeat every ``--heart-beat-interval`` seconds (15), and
re-registers when the controller has forgotten it. Requests are batched continuously by :mod:`palo.engine` (a
request joins the running batch between decode steps); ``--engine static`` serves with the previous static batches
through ``model.generate`` instead.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout, not files next to this one
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # through palo.cli, before the imports below: a missing extra is one line
    from palo.cli import module_main

    sys.exit(module_main("palo.serve.model_worker"))

import argparse
import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, WORKER_HEART_BEAT_INTERVAL
from palo.engine.config import EngineConfig
from palo.engine.detokenizer import token_bytes
from palo.engine.errors import QueueFull
from palo.engine.llm_engine import LLMEngine
from palo.engine.sampling import TokenLogprob
from palo.model.builder import add_dtype_argument
from palo.remote_images import add_remote_image_args, policy_from_args
from palo.serve.engine import EngineBackend, GenerationEngine, PreparedRequest, PromptTooLong, RequestError, StreamEvent
from palo.serve.protocol import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST,
    OK,
    PROMPT_TOO_LONG_MSG,
    WORKER_ERROR,
    encode_chunk,
    error_chunk,
)
from palo.serve.tokenizer_api import detokenize, tokenize, tokenizer_info
from palo.serve.utils import build_logger, end_with_launcher, masked_args, refuse_unservable
from palo.serve.worker_base import BaseWorker, Rejected, add_address_arguments, create_app, serve

__all__ = ["ModelWorker", "build_parser", "create_app", "main"]

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
FULL_LOG_INTERVAL_S = 1.0  # the least time between two "queue full" log lines
# Requests whose images are decoded at once: decoding is CPU work (more threads than this gain little) and a
# decoded image at the size limit takes about a gigabyte until it is made into pixels.
READ_CONCURRENCY = 4


class ModelWorker(BaseWorker):
    """A worker that generates with one loaded model through an :class:`~palo.serve.engine.EngineBackend`.

    Registration, heartbeats and the concurrency limit are :class:`~palo.serve.worker_base.BaseWorker`'s; this
    class adds request preparation by the engine, the bounded wait queue (HTTP 503 beyond ``max_queue``) and the
    translation of engine events into protocol chunks.

    Args:
        engine: The generation engine of the loaded model.
        model_name: The name the worker registers under.
        controller_addr: The controller's base URL.
        worker_addr: This worker's base URL as the controller should reach it.
        limit_model_concurrency: Requests in the engine at once; more wait in the worker's queue.
        max_queue: Requests that may wait in the worker's queue; more get HTTP 503 with ``Retry-After``.
        conv_mode: The conversation template of the checkpoint (reported in the status).
        heart_beat_interval: Seconds between heartbeats.
        no_register: Do not register with a controller.
        logger: Where to log.
        worker_key: The controller's ``--worker-key``, sent with the registration and heartbeats.
    """

    title = "PALO model worker"

    def __init__(
        self,
        engine: EngineBackend,
        model_name: str,
        controller_addr: str,
        worker_addr: str,
        limit_model_concurrency: int = 5,
        max_queue: int = 256,
        conv_mode: str = "vicuna_v1",
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        no_register: bool = False,
        logger: Any = None,
        worker_key: str | None = None,
    ) -> None:
        super().__init__(model_name, controller_addr, worker_addr, conv_mode=conv_mode,
                         limit_model_concurrency=limit_model_concurrency, heart_beat_interval=heart_beat_interval,
                         no_register=no_register, logger=logger, worker_key=worker_key)
        self.engine = engine
        self.max_queue = max_queue
        self._full_logged = (-math.inf, 0)  # (time.monotonic of the last "queue full" line, refusals not logged since)
        self.served = 0
        # Requests read at once (images decoded: up to gigabytes each at the size limit), and those waiting to be.
        self._reading = asyncio.Semaphore(READ_CONCURRENCY)
        self.preparing = 0

    @property
    def llm_engine(self) -> LLMEngine | None:
        return self.engine.engine if isinstance(self.engine, GenerationEngine) else None  # --engine static: None

    def status_details(self) -> dict[str, Any]:
        return {"engine": {**self.engine.stats(), "worker_running": self.running, "worker_waiting": self.waiting,
                           "worker_preparing": self.preparing,
                           "rejected": self.rejected, "max_queue": self.max_queue}}

    def tokenizer_call(self, action: str, params: Any) -> dict[str, Any]:
        """The checkpoint's tokenizer: ``/worker_tokenize``, ``/worker_detokenize``, ``/worker_tokenizer_info``."""
        tokenizer = self.engine.tokenizer
        if action == "tokenize":
            return tokenize(tokenizer, params, self.engine.max_context)
        if action == "detokenize":
            return detokenize(tokenizer, params)
        return tokenizer_info(tokenizer, self.conv_mode, self.engine.max_context)

    def model_details(self) -> dict[str, Any]:
        return {"context_length": self.engine.max_context}

    def check_health(self) -> bool:
        """Whether the engine thread runs: a worker whose engine died sends no heartbeats, and ``/health`` is 503."""
        return self.engine.alive()

    def health(self) -> bool:
        return self.check_health()  # costs nothing here: no backend to probe

    def serving(self) -> bool:
        return self.check_health()  # a stopped engine answers nothing: requests must go elsewhere

    def start(self) -> None:
        """Start the engine and (unless ``no_register``) the registration/heartbeat thread."""
        self.engine.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.engine.close()

    # -- requests ------------------------------------------------------------------------------------------------
    async def prepare(self, params: Any) -> PreparedRequest:
        """Validate and tokenise a request (in a thread: images are decoded), or reject it."""
        # Before any work: a burst of large images must not all be decoded only to be refused.
        self._refuse_when_full(self.preparing)
        self.preparing += 1
        try:
            async with self._reading:
                prepared = await asyncio.to_thread(self.engine.prepare, params)
        except RequestError as exc:
            self.logger.info("rejected request: %s", exc)
            raise Rejected(error_chunk(str(exc), WORKER_ERROR, INVALID_REQUEST, exc.field)) from None
        except PromptTooLong as exc:
            # The original protocol: error code 0, the prompt followed by the message.
            self.logger.info("prompt too long: %s", exc)
            prompt = str(params.get("prompt") or "")  # none when it came as token ids
            raise Rejected(encode_chunk(prompt + PROMPT_TOO_LONG_MSG, OK, error_type=CONTEXT_LENGTH_EXCEEDED,
                                        detail=str(exc), finish_reason="length"), 200) from None
        finally:
            self.preparing -= 1
        self._refuse_when_full()
        self.served += 1
        self.logger.info("request %d: %d prompt tokens, %d images, max_new_tokens=%d", self.served,
                         prepared.prompt_tokens, 0 if prepared.images is None else len(prepared.images),
                         prepared.max_new_tokens)
        return prepared

    def _refuse_when_full(self, preparing: int = 0) -> None:
        """503 with Retry-After when a request would have to wait beyond the queue (``preparing``: requests being
        read, counted before a new one is)."""
        if self.running + self.waiting + preparing >= self.limit_model_concurrency + self.max_queue:
            self.rejected += 1
            # At most a line a second: the API asks again every 0.1 s for the later answers of an n > 1 request
            # while the workers are busy (hundreds of lines in a burst of a few dozen requests).
            last, unlogged = self._full_logged
            now = time.monotonic()
            if now - last < FULL_LOG_INTERVAL_S:
                self._full_logged = (last, unlogged + 1)
            else:
                self._full_logged = (now, 0)
                self.logger.warning("queue full (%d waiting, %d being read): answering 503%s", self.waiting, preparing,
                                    f" ({unlogged} more 503s since the last line)" if unlogged else "")
            raise Rejected(error_chunk(f"the worker is busy: {self.waiting + preparing} requests are already waiting;"
                                       f" retry in {RETRY_AFTER_S} s", WORKER_ERROR), 503,
                           {"Retry-After": str(RETRY_AFTER_S)})

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[bytes]:
        """Submit to the engine and relay its events as cumulative chunks (the prompt included)."""
        loop = asyncio.get_running_loop()
        # Events not yet read: at most the newest non-final one, then the last one (final or error). An event holds
        # the whole answer so far, so the one before it is stale once it comes: an unbounded queue of them held
        # memory growing with the square of the answer for a client that reads slowly, and then sent it every
        # stale chunk. Touched on the event loop only (the engine thread hands events over through
        # call_soon_threadsafe), so it needs no lock.
        pending: list[StreamEvent] = []
        arrived = asyncio.Event()

        def deliver(event: StreamEvent) -> None:
            if pending and _superseded(pending[-1], event):
                stale = pending.pop()
                if event.prompt_logprobs is None and stale.prompt_logprobs is not None:
                    event = dataclasses.replace(event, prompt_logprobs=stale.prompt_logprobs)  # sent once: keep it
            pending.append(event)
            arrived.set()

        job = None
        try:
            try:
                job = self.engine.submit(prepared, lambda event: loop.call_soon_threadsafe(deliver, event))
            except QueueFull as exc:  # only when --max-num-seqs and the engine queue are smaller than the limit
                yield error_chunk(f"the worker is busy: {exc}", WORKER_ERROR)
                return
            sent_logprobs = 0
            prompt_sent = False
            first = True
            while True:
                while not pending:
                    arrived.clear()
                    await arrived.wait()
                event = pending.pop(0)
                if event.error is not None:
                    # The engine logged the traceback where it caught the exception; this names the request.
                    self.logger.error("request failed in the engine: %s", event.error)
                    yield error_chunk(event.error, WORKER_ERROR)
                    return
                # In every chunk, so far: a client that ends the answer early (the API at a user stop string)
                # still reports what was generated.
                usage = {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": event.completion_tokens,
                         "cached_tokens": event.cached_tokens}
                logprobs = None
                if event.logprobs is not None:  # this chunk's new tokens (the lists may have grown since)
                    new = slice(sent_logprobs, event.completion_tokens)
                    logprobs = [logprob_entry(self.engine.tokenizer, token, entry) for token, entry in
                                zip(event.token_ids[new], event.logprobs[new])]
                    sent_logprobs = event.completion_tokens
                # The text a token-id prompt spells, which the stream's text starts with, once for its client.
                extra: dict[str, Any] = {"prompt": prepared.prompt} if prepared.prompt_from_ids and first else {}
                first = False
                if event.prompt_logprobs is not None and not prompt_sent:  # once, when the prompt is computed
                    extra["prompt_logprobs"] = prompt_logprob_entries(self.engine.tokenizer, prepared.input_ids,
                                                                      event.prompt_logprobs)
                    prompt_sent = True
                yield encode_chunk(prepared.prompt + event.text, OK, finish_reason=event.finish_reason, usage=usage,
                                   logprobs=logprobs, **extra)
                if event.finish_reason:
                    return
        finally:
            if job is not None:
                job.cancel()  # a no-op when it finished; stops generating for a client that went away


def _superseded(queued: StreamEvent, newer: StreamEvent) -> bool:
    """Whether ``newer`` makes ``queued`` (not yet read) redundant: ``queued`` is an in-progress event, and
    ``newer`` is no error.

    Events are cumulative: text, token count and the (shared, growing) logprob lists of the newer one cover the
    older's, and :meth:`ModelWorker.generate` slices a chunk's logprobs by what it has sent, so a skipped event loses
    nothing. A final or error event is never replaced. An error does not replace the text before it either: it has
    no text of its own, so the client keeps what was generated before it failed.
    """
    return queued.finish_reason is None and queued.error is None and newer.error is None


# Where a token's probability underflows to 0 its log-probability is reported as this (JSON has no -Infinity).
LOGPROB_FLOOR = -9999.0


def logprob_entry(tokenizer: Any, token_id: int, logprob: TokenLogprob) -> dict[str, Any]:
    """One answer token's log-probability in the shape of OpenAI's ``logprobs.content`` items: ``token`` (its text;
    bytes of a partial character as ``\\xNN``), ``bytes``, ``logprob`` and ``top_logprobs``."""

    def item(token: int, value: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": max(value, LOGPROB_FLOOR),
                "bytes": list(raw)}

    chosen, top = logprob
    return {**item(token_id, chosen), "top_logprobs": [item(t, v) for t, v in top]}


def prompt_logprob_entries(tokenizer: Any, input_ids: list[int],
                           logprobs: list[TokenLogprob | None]) -> list[dict[str, Any]]:
    """Per prompt id, an entry as :func:`logprob_entry` makes them, with the token ``id`` in it and in each of its
    ``top_logprobs``; the first id and image placeholders (``id`` -200), which have no probability, get ``logprob``
    and ``top_logprobs`` None."""
    entries = []
    for token, entry in zip(input_ids, logprobs):
        if entry is not None:
            item = logprob_entry(tokenizer, token, entry)
            for top, (top_id, _) in zip(item["top_logprobs"], entry[1]):
                top["id"] = top_id
            entries.append({"id": token, **item})
            continue
        raw = DEFAULT_IMAGE_TOKEN.encode() if token == IMAGE_TOKEN_INDEX else token_bytes(tokenizer, token)
        entries.append({"id": token, "token": raw.decode("utf-8", "backslashreplace"), "logprob": None,
                        "bytes": list(raw), "top_logprobs": None})
    return entries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PALO model worker (original protocol)")
    add_address_arguments(parser)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--model-name", type=str, default=None, help="default: derived from --model-path")
    parser.add_argument("--device", type=str, default="cuda", help="cuda, cuda:N, cpu, mps (cuda falls back to cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--multi-modal", action="store_true", help="deprecated: multimodality is read from the config")
    parser.add_argument("--limit-model-concurrency", type=int, default=32,
                        help="requests in the engine at once (the original's default was 5, when each batch ran "
                             "to its longest row; continuous batching makes room for more)")
    parser.add_argument("--stream-interval", type=int, default=1, help="accepted for compatibility; unused")
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--use-flash-attn", action="store_true")
    parser.add_argument("--vision-tower", type=str, default=None, help="override mm_vision_tower (a local CLIP folder)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for a place; beyond it HTTP 503 with Retry-After")
    # http(s) image URLs in requests (the OpenAI API passes them through): refused unless allowed, then fetched
    # under palo.remote_images' rules (public addresses only, size and time limits).
    add_remote_image_args(parser.add_argument_group("image URLs in requests"))
    engine = parser.add_argument_group("generation engine")
    engine.add_argument("--engine", choices=["paged", "static"], default="paged",
                        help="paged: continuous batching over a paged KV cache (default); static: the previous "
                             "static batches through model.generate")
    engine.add_argument("--max-num-seqs", "--max-batch-size", dest="max_batch_size", type=int, default=32,
                        help="most sequences decoded together (also capped by --limit-model-concurrency)")
    engine.add_argument("--kv-cache-gb", type=float, default=None,
                        help="KV cache size in GiB (default: --gpu-memory-utilization on CUDA; on CPU room for "
                             "--max-num-seqs full-length sequences)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of the GPU's memory for weights, KV cache and activations together")
    engine.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's)")
    engine.add_argument("--max-prefill-tokens", type=int, default=2048,
                        help="prompt positions prefilled per step; longer prompts go in chunks")
    engine.add_argument("--block-size", type=int, default=16, help="positions per KV block")
    engine.add_argument("--no-prefix-cache", action="store_true",
                        help="do not reuse the KV of repeated prompt prefixes, nor the features of repeated images")
    engine.add_argument("--image-cache-size", type=int, default=32,
                        help="images whose projected features are kept for later prompts (0: none)")
    engine.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    engine.add_argument("--attention", choices=["auto", "sdpa", "triton"], default="auto",
                        help="decode attention: triton reads the paged cache in place (auto: on CUDA when installed)")
    engine.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="--engine static only: how long to collect requests for one batch")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL, help="seconds")
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The paged engine's settings from the worker's flags."""
    return EngineConfig(
        max_num_seqs=min(args.max_batch_size, max(1, args.limit_model_concurrency)), max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
        max_prefill_tokens=args.max_prefill_tokens, enable_prefix_cache=not args.no_prefix_cache,
        cuda_graphs=not args.no_cuda_graphs, max_waiting=max(1, args.limit_model_concurrency),
        attention=args.attention, image_cache_size=args.image_cache_size,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from palo.conversation import conv_mode_for_checkpoint
    from palo.mm_utils import get_model_name_from_path
    from palo.model.builder import CheckpointError, load_pretrained_model
    from palo.model.vision_tower import VisionTowerError

    # Settings that cannot work are refused before the model loads, in one line (argparse's exit status 2).
    refuse_unservable(parser, args)
    end_with_launcher()
    try:
        if args.engine == "paged":
            engine_config(args)
        remote_images = policy_from_args(args) if args.allow_remote_images else None
    except ValueError as exc:
        parser.error(str(exc))

    worker_id = uuid.uuid4().hex[:6]
    logger = build_logger("model_worker", f"model_worker_{worker_id}.log")
    logger.info("args: %s", masked_args(args))
    if args.multi_modal:
        logger.warning("--multi-modal is deprecated and ignored: multimodality is read from the checkpoint's config")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("no CUDA device: running on cpu")
        device = "cpu"
    model_name = args.model_name or get_model_name_from_path(args.model_path)
    logger.info("loading %s on worker %s", model_name, worker_id)
    try:
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit, device=device,
            vision_tower=args.vision_tower, use_flash_attn=args.use_flash_attn, dtype=args.dtype,
        )
    except (CheckpointError, VisionTowerError, ValueError) as exc:  # ValueError: a config value it cannot take
        logger.error("cannot load %s: %s", args.model_path, exc)
        print(f"palo-worker: error: {exc}", file=sys.stderr)
        return 2
    if args.engine == "static":
        from palo.serve.static_engine import StaticBatchEngine

        engine = StaticBatchEngine(tokenizer, model, image_processor, context_len,
                                   max_batch_size=min(args.max_batch_size, max(1, args.limit_model_concurrency)),
                                   batch_wait_ms=args.batch_wait_ms, logger=logger)
    else:
        engine = GenerationEngine(tokenizer, model, image_processor, context_len, logger=logger,
                                  engine_config=engine_config(args))
    engine.remote_images = remote_images
    logger.info("multimodal: %s, %d positions per image, context %d; engine %s", engine.is_multimodal,
                engine.image_token_count, engine.max_context, engine.stats())
    worker = ModelWorker(
        engine, model_name, args.controller_address, args.worker_address,
        limit_model_concurrency=args.limit_model_concurrency,
        max_queue=args.max_queue,
        conv_mode=conv_mode_for_checkpoint(model.config),
        heart_beat_interval=args.heart_beat_interval,
        no_register=args.no_register,
        logger=logger,
        worker_key=args.worker_key,
    )
    serve(worker, args.host, args.port)
    return 0
