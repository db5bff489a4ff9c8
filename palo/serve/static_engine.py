"""The previous worker engine, kept as a baseline and a fallback: static batches through ``model.generate``.

``palo-worker --engine static`` serves with it (for a model the paged engine cannot run, and for the serving
benchmark's same-run baseline). A single background thread waits for a request, keeps collecting for
``batch_wait_ms`` (or until ``max_batch_size`` requests wait), left-pads the prompts of the requests that share
sampling settings, and runs **one** ``model.generate`` for all of them: a request that arrives meanwhile waits for
the whole batch, and a batch runs until its longest row ends. Request validation is
:class:`palo.serve.engine.EngineBackend`'s, as for the default engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from palo.engine.detokenizer import IncrementalDetokenizer, prompt_context, visible_text
from palo.engine.sampling import SamplingParams, apply_penalties, prompt_token_set
from palo.mm_utils import left_pad
from palo.serve.engine import DEFAULT_CONTEXT, EngineBackend, PreparedRequest, RequestError, Sink, StreamEvent
from palo.serve.protocol import parse_structured_output

# The error a request still queued when the engine closes ends with (the paged engine's words).
SHUT_DOWN = "the engine was shut down"


@dataclass
class Job:
    """A submitted request and its streaming state (owned by the engine thread once queued)."""

    request: PreparedRequest
    sink: Sink
    ids: list[int] = field(default_factory=list)
    shown: str = ""
    finished: bool = False
    cancelled: bool = False
    context: list[int] = field(default_factory=list)  # prompt ids a continuation's text is decoded after
    detokenizer: IncrementalDetokenizer | None = None  # made at the first call of text()

    def text(self, tokenizer: Any, final: bool = False) -> str:
        """The answer's text so far (after the prompt's, for a continuation), as the paged engine decodes it.

        Incremental: decoding the whole answer again at every step made a step's host time grow with the answer
        (129 ms at 8,000 tokens for 8 rows in the audit's measurement). A trailing half character is held back
        until ``final``.
        """
        if self.detokenizer is None:
            self.detokenizer = IncrementalDetokenizer(tokenizer, context=self.context)
        detokenizer = self.detokenizer
        for token in self.ids[len(detokenizer.ids) - len(self.context):]:
            detokenizer.push(token)
        if final:
            detokenizer.flush()
        return detokenizer.text

    def cancel(self) -> None:
        """The client went away: stop generating for this request at the next step."""
        self.cancelled = True

    def emit(self, event: StreamEvent) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a closed event loop (client gone, shutdown) must not stop the batch
            self.cancelled = True


class StaticBatchEngine(EngineBackend):
    """Batches and streams generation requests for one loaded model, one ``model.generate`` per batch.

    Args:
        tokenizer, model, image_processor, context_len: As for :class:`~palo.serve.engine.EngineBackend`.
        max_batch_size: Most requests generated together.
        batch_wait_ms: How long to keep collecting requests after the first one arrives.
        logger: Optional logger; each batch is logged at INFO, a failed batch at ERROR with its traceback.
    """

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        image_processor: Any,
        context_len: int = DEFAULT_CONTEXT,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        logger: Any = None,
    ) -> None:
        super().__init__(tokenizer, model, image_processor, context_len, max_batch_size, logger)
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(configured if isinstance(configured, (list, tuple)) else [configured])
        self.eos_ids = {i for i in eos if i is not None}
        self._batch_sizes: deque[int] = deque(maxlen=1000)
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def batch_sizes(self):
        """Requests in each recent ``model.generate`` batch."""
        return self._batch_sizes

    def stats(self) -> dict[str, Any]:
        return {"waiting": self.queue_size(), "engine": "static"}

    def prepare(self, params: dict[str, Any], images: Sequence[Any] | None = None,
                host_images: bool = False) -> PreparedRequest:
        """As :meth:`EngineBackend.prepare`, refusing what ``model.generate`` batches cannot stream here."""
        prepared = super().prepare(params, images, host_images)
        # Each setting against its own default: logprobs=0 asks for the chosen tokens' logprobs, min_tokens=0 asks
        # for nothing.
        defaults = SamplingParams()
        for key in ("logprobs", "prompt_logprobs", "logit_bias", "structured", "min_p", "min_tokens",
                    "stop_token_ids", "ignore_eos"):
            if getattr(prepared.sampling, key) != getattr(defaults, key):
                name = parse_structured_output(params)[1] if key == "structured" else key
                raise RequestError(f"'{name}' needs the paged engine; this worker runs --engine static", key)
        return prepared

    # -- queue ---------------------------------------------------------------------------------------------------
    def start(self) -> StaticBatchEngine:
        """Start the batching thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="palo-generation", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the batching thread after the current batch and wait for it.

        The batch being generated runs to its end; every request still queued (a batch being collected in the
        ``batch_wait_ms`` window included) ends at once with the error ``"the engine was shut down"``, as on the
        paged engine. Before, they were left in the queue with no last event, and their callers waited for ever
        (or to :meth:`~palo.serve.engine.EngineBackend.generate`'s timeout).

        Args:
            timeout: Seconds to wait for the batching thread (the current batch) to end.
        """
        with self._cond:
            self._closed = True
            # Taken under the lock: the batching thread takes no job from here once it sees _closed, and submit
            # refuses new ones, so each queued job is answered exactly once, here.
            abandoned, self._pending = self._pending, []
            self._cond.notify_all()
        # Answered before the join, not after: the current batch may run for a long time, and these requests will
        # never be generated. Sinks are thread-safe (the worker's hands the event to its event loop).
        for job in abandoned:
            if not job.finished and not job.cancelled:  # a cancelled request's client is gone: tell it nothing
                job.finished = True
                job.emit(StreamEvent(text=None, error=SHUT_DOWN))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def submit(self, request: PreparedRequest, sink: Sink) -> Job:
        """Queue one request; its events go to ``sink`` from the engine thread."""
        return self.submit_many([request], [sink])[0]

    def submit_many(self, requests: Sequence[PreparedRequest], sinks: Sequence[Sink]) -> list[Job]:
        """Queue several requests at once (they can share a batch)."""
        jobs = [Job(request, sink, context=prompt_context(self.tokenizer, request.input_ids)
                    if request.sampling.continuation else []) for request, sink in zip(requests, sinks)]
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._pending.extend(jobs)
            self._cond.notify_all()
        return jobs

    def queue_size(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._pending)

    # -- batching loop -------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:  # closed while collecting: close() has answered (and removed) the queued jobs
                return None
            key = _sampling_key(self._pending[0].request)
            batch = [job for job in self._pending if _sampling_key(job.request) == key][: self.max_batch_size]
            chosen = set(map(id, batch))
            self._pending = [job for job in self._pending if id(job) not in chosen]
        return [job for job in batch if not job.cancelled]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self._batch_sizes.append(len(batch))
        self.logger.info("generating a batch of %d request(s)", len(batch))
        input_ids, attention_mask = left_pad([job.request.input_ids for job in batch], self.pad_id)
        width = input_ids.shape[1]
        images = [job.request.images for job in batch if job.request.images is not None]
        sampling = batch[0].request.sampling
        tracker = _BatchTracker(batch, width, self.tokenizer, self.eos_ids)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(job.request.max_new_tokens for job in batch),
            stopping_criteria=StoppingCriteriaList([tracker]),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            use_cache=True,
        )
        if not sampling.greedy:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)  # 0: no limit, as for the paged engine
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if any(job.request.sampling.penalized for job in batch):
            kwargs["logits_processor"] = LogitsProcessorList([_RowPenalties(batch)])
        device = self.model.device
        seed = None if sampling.greedy else sampling.seed
        try:
            # A seed restarts the process's random stream for this batch (one request, see _sampling_key) and puts
            # it back after, so other requests' draws are no more predictable than without it.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                self.model.generate(
                    input_ids.to(device),
                    images=torch.cat(images) if images else None,
                    attention_mask=attention_mask.to(device),
                    **kwargs,
                )
        except Exception as exc:  # noqa: BLE001 - any failure ends this batch's requests with an error, not the worker
            # The requests get one line each; the traceback is kept here, once per batch.
            self.logger.exception("generating a batch of %d request(s) failed", len(batch))
            message = f"{type(exc).__name__}: {exc}"
            for job in batch:
                if not job.finished:
                    job.finished = True
                    job.emit(StreamEvent(text=None, error=message))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        for job in batch:  # rows still open when generation ended (e.g. the shared length limit)
            tracker.finish(job, "length" if len(job.ids) >= job.request.max_new_tokens else "stop")


def _sampling_key(request: PreparedRequest) -> tuple:
    """Requests share a ``model.generate`` batch only when they sample alike (penalties are applied per row). A
    seeded sampled request is batched alone: its draws come from the one stream its seed starts, which rows in a
    batch would share."""
    sampling = request.sampling
    if sampling.greedy:
        return (False,)
    return (True, sampling.temperature, sampling.top_p, sampling.top_k, None if sampling.seed is None else id(request))


class _RowPenalties(LogitsProcessor):
    """Each row's presence, frequency and repetition penalties, by the paged engine's rule
    (:func:`palo.engine.sampling.apply_penalties`), inside one ``model.generate`` batch.

    transformers shows processors prompt + new ids for a text batch but only the new ids for a batch with images
    (it generates from embeddings), so the new ids are counted by calls, and the prompts come from the requests.
    """

    def __init__(self, jobs: list[Job]) -> None:
        self.params = [job.request.sampling for job in jobs]
        self.prompts = [prompt_token_set(job.request.input_ids) for job in jobs]
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, input_ids.shape[1] - self.calls:].tolist() if self.calls else [[] for _ in self.params]
        self.calls += 1
        return apply_penalties(scores, self.params, self.prompts, new).to(scores.dtype)


class _BatchTracker(StoppingCriteria):
    """Per-row streaming and stopping for one batch (transformers calls it after every decoding step).

    Args:
        jobs: The batch's jobs, one per row.
        prompt_width: Columns of the (left-padded) prompt; later columns are new tokens.
        tokenizer: For decoding.
        eos_ids: End-of-sequence ids.
    """

    def __init__(self, jobs: list[Job], prompt_width: int, tokenizer: Any, eos_ids: set[int]) -> None:
        self.jobs = jobs
        self.prompt_width = prompt_width
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.seen = 0  # new columns already processed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.BoolTensor:
        """Consume the newest columns of ``input_ids`` ``[B, prompt_width + n]``; return ``[B]`` finished flags."""
        columns = input_ids[:, self.prompt_width + self.seen:].tolist()  # the one host sync per step
        self.seen += len(columns[0]) if columns else 0
        for job, new_ids in zip(self.jobs, columns):
            if not job.finished:
                self._advance(job, new_ids)
        return torch.tensor([job.finished for job in self.jobs], dtype=torch.bool, device=input_ids.device)

    def _advance(self, job: Job, new_ids: list[int]) -> None:
        if job.cancelled:
            job.finished = True
            return
        eos_hit = False
        for token in new_ids:
            if token in self.eos_ids:
                eos_hit = True
                break
            job.ids.append(token)
        stops = job.request.sampling.stop
        shown, stopped = visible_text(job.text(self.tokenizer), stops, final=False)
        if eos_hit or stopped:
            self.finish(job, "stop")
        elif len(job.ids) >= job.request.max_new_tokens:
            self.finish(job, "length")
        elif shown != job.shown:
            job.shown = shown
            job.emit(StreamEvent(text=shown, completion_tokens=len(job.ids)))

    def finish(self, job: Job, reason: str) -> None:
        """Send a job's last event (its full text, cut at the stop string) and mark it finished."""
        if job.finished:
            return
        job.finished = True
        if job.cancelled:
            return
        stops = job.request.sampling.stop
        shown, _ = visible_text(job.text(self.tokenizer, final=True), stops, final=True)
        job.shown = shown
        job.emit(StreamEvent(text=shown, finish_reason=reason, completion_tokens=len(job.ids)))
