"""The one generation engine behind the model worker: request validation, dynamic batching and streaming.

Requests are validated and tokenised by :meth:`GenerationEngine.prepare` (any thread), then queued with
:meth:`GenerationEngine.submit`. A single background thread owns the model: it waits for a request, keeps collecting
for ``batch_wait_ms`` (or until ``max_batch_size`` requests wait), left-pads the prompts of the requests that share
sampling settings, and runs **one** ``model.generate`` for all of them.

Streaming and stopping are done per row by one stopping criterion (:class:`_BatchTracker`) that transformers calls
after every decoding step with all ids so far: it decodes each row's new tokens, sends the row's own text to its
sink, and reports the row finished at its end-of-sequence token, its stop string, its own token budget or when its
client went away. transformers then pads that row while the others go on, so a batch gives each request the same
tokens as running it alone (greedy decoding; PALO's generate is pad-invariant with left padding).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from palo.mm_utils import ImageLoadError, left_pad, load_image_from_base64, process_images, tokenizer_image_token
from palo.serve.protocol import visible_text

# The original worker's caps: at most 1024 new tokens, and a 2048-token context when the config does not say.
MAX_NEW_TOKENS_CAP = 1024
DEFAULT_CONTEXT = 2048
# Sampling is switched on above this temperature (the original rule); below it decoding is greedy.
GREEDY_TEMPERATURE = 1e-3
# Cap on images in one request, so one request cannot make the worker decode an unbounded number of images.
MAX_IMAGES_PER_REQUEST = 16


class RequestError(ValueError):
    """The request is malformed (HTTP 400): bad field types, images that cannot be read, a wrong image count."""


class PromptTooLong(ValueError):
    """The prompt leaves no room for new tokens in the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. Requests are batched together only when these are equal."""

    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def do_sample(self) -> bool:
        return self.temperature > GREEDY_TEMPERATURE

    @property
    def key(self) -> tuple:
        return (True, self.temperature, self.top_p) if self.do_sample else (False,)


@dataclass
class PreparedRequest:
    """A validated request, ready for generation.

    Attributes:
        prompt: The prompt as received (the stream's text starts with it).
        input_ids: Prompt ids, with ``IMAGE_TOKEN_INDEX`` where each image goes.
        images: Pixel values ``[k, 3, H, W]`` on the model's device, or None.
        max_new_tokens: The token budget after the context cap.
        sampling: Temperature and top-p.
        stop: Stop string, or None (end-of-sequence only).
        prompt_tokens: Context positions the prompt takes, image positions included.
    """

    prompt: str
    input_ids: list[int]
    images: torch.Tensor | None
    max_new_tokens: int
    sampling: SamplingParams
    stop: str | None
    prompt_tokens: int


@dataclass
class StreamEvent:
    """What the engine tells a request's sink.

    Attributes:
        text: The generated text so far (without the prompt), or None on error.
        finish_reason: ``"stop"`` or ``"length"`` on the last event, else None.
        error: An error message; the request is over.
        completion_tokens: Tokens generated so far.
    """

    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0


Sink = Callable[[StreamEvent], None]


@dataclass
class Job:
    """A submitted request and its streaming state (owned by the engine thread once queued)."""

    request: PreparedRequest
    sink: Sink
    ids: list[int] = field(default_factory=list)
    shown: str = ""
    finished: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: stop generating for this request at the next step."""
        self.cancelled = True

    def emit(self, event: StreamEvent) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a closed event loop (client gone, shutdown) must not stop the batch
            self.cancelled = True


def _parse_float(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"'{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(f"'{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"'{key}' must be finite, got {value!r}")
    return number


def _parse_int(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"'{key}' must be an integer, got {value!r}")
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        raise RequestError(f"'{key}' must be an integer, got {value!r}") from None


class GenerationEngine:
    """Validates, batches and streams generation requests for one loaded model.

    Args:
        tokenizer: The model's tokenizer.
        model: A loaded :class:`~palo.model.palo_llama.PaloForCausalLM` (or a plain causal LM).
        image_processor: The CLIP processor, or None for a text-only model.
        context_len: Context size when the config has no ``max_position_embeddings``.
        max_batch_size: Most requests generated together.
        batch_wait_ms: How long to keep collecting requests after the first one arrives.
        logger: Optional logger; each batch is logged at INFO.
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
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or context_len or DEFAULT_CONTEXT)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.logger = logger
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for logs, tests and benchmarks
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- facts about the model -----------------------------------------------------------------------------------
    @property
    def is_multimodal(self) -> bool:
        """Whether the checkpoint has a vision tower (decided by its config, never by its name)."""
        return self.image_processor is not None and getattr(self.model, "vision_tower", None) is not None

    @property
    def image_token_count(self) -> int:
        """Context positions one image takes (576 for CLIP-L/336 + MLP projector, 144 with LDP)."""
        return int(getattr(self.model, "image_token_count", 0)) if self.is_multimodal else 0

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return {i for i in ids if i is not None}

    # -- request parsing -----------------------------------------------------------------------------------------
    def prepare(self, params: dict[str, Any]) -> PreparedRequest:
        """Validate a worker request (the original generation parameters) and tokenise it.

        Args:
            params: ``{"prompt", "images", "temperature", "top_p", "max_new_tokens", "stop"}``.

        Returns:
            The prepared request.

        Raises:
            RequestError: For malformed fields, unreadable images (invalid base64, not an image, over the pixel cap)
                or an image count that differs from the prompt's ``<image>`` placeholders.
            PromptTooLong: When the prompt (image positions included) leaves no room for new tokens.
        """
        if not isinstance(params, dict):
            raise RequestError("the request body must be a JSON object")
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("'prompt' is required and must be a string")
        images = params.get("images") or []
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise RequestError("'images' must be a list of base64-encoded PNG or JPEG strings")
        stop = params.get("stop")
        if stop is not None and not isinstance(stop, str):
            raise RequestError(f"'stop' must be a string, got {stop!r}")
        temperature = _parse_float(params, "temperature", 1.0)
        top_p = _parse_float(params, "top_p", 1.0)
        max_new_tokens = _parse_int(params, "max_new_tokens", 256)
        if temperature < 0:
            raise RequestError(f"'temperature' must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise RequestError(f"'max_new_tokens' must be at least 1, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, MAX_NEW_TOKENS_CAP)

        num_placeholders = prompt.count(DEFAULT_IMAGE_TOKEN)
        if images and not self.is_multimodal:
            raise RequestError("this model takes text only (its config has no vision tower); send no images")
        if self.is_multimodal and len(images) != num_placeholders:
            raise RequestError(
                f"{len(images)} image(s) for {num_placeholders} <image> placeholder(s) in the prompt; "
                "send exactly one image per <image>"
            )
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"{len(images)} images is over the limit of {MAX_IMAGES_PER_REQUEST} per request")

        if self.is_multimodal:
            text = prompt
            if getattr(self.model.config, "mm_use_im_start_end", False):
                text = text.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
            input_ids = tokenizer_image_token(text, self.tokenizer, IMAGE_TOKEN_INDEX)
        else:
            input_ids = self.tokenizer(prompt).input_ids
        prompt_tokens = len(input_ids) - len(images) + len(images) * self.image_token_count
        max_new_tokens = min(max_new_tokens, self.max_context - prompt_tokens)
        if max_new_tokens < 1:
            raise PromptTooLong(
                f"the prompt takes {prompt_tokens} of the model's {self.max_context} context positions"
                f" ({len(images)} image(s) x {self.image_token_count}); no room is left for an answer"
            )

        pixels = None
        if images:
            pil_images = []
            for i, data in enumerate(images):
                try:
                    pil_images.append(load_image_from_base64(data))
                except ImageLoadError as exc:
                    raise RequestError(f"image {i}: {exc}") from None
            pixels = process_images(pil_images, self.image_processor, self.model.config)
            if isinstance(pixels, list):
                pixels = torch.stack(pixels)
            pixels = pixels.to(self.model.device, dtype=self.model.dtype)
        return PreparedRequest(
            prompt=prompt,
            input_ids=input_ids,
            images=pixels,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p),
            stop=stop or None,
            prompt_tokens=prompt_tokens,
        )

    # -- queue ---------------------------------------------------------------------------------------------------
    def start(self) -> GenerationEngine:
        """Start the batching thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="palo-generation", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the batching thread after the current batch and wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: PreparedRequest, sink: Sink) -> Job:
        """Queue one request; its events go to ``sink`` from the engine thread."""
        return self.submit_many([request], [sink])[0]

    def submit_many(self, requests: Sequence[PreparedRequest], sinks: Sequence[Sink]) -> list[Job]:
        """Queue several requests at once (they can share a batch)."""
        jobs = [Job(request, sink) for request, sink in zip(requests, sinks)]
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

    def generate(self, requests: Sequence[PreparedRequest], timeout: float = 300.0) -> list[StreamEvent]:
        """Submit requests together and wait for their last events (for scripts, tests and benchmarks).

        Returns:
            The final event of each request, in order.
        """
        done = [threading.Event() for _ in requests]
        last: list[StreamEvent | None] = [None] * len(requests)

        def make_sink(i: int) -> Sink:
            def sink(event: StreamEvent) -> None:
                last[i] = event
                if event.finish_reason or event.error:
                    done[i].set()

            return sink

        self.start()
        self.submit_many(requests, [make_sink(i) for i in range(len(requests))])
        deadline = time.monotonic() + timeout
        for event in done:
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"generation did not finish within {timeout} s")
        return [e for e in last if e is not None]

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
            key = self._pending[0].request.sampling.key
            batch = [job for job in self._pending if job.request.sampling.key == key][: self.max_batch_size]
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
        self.batch_sizes.append(len(batch))
        if self.logger is not None:
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
        if sampling.do_sample:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        device = self.model.device
        try:
            self.model.generate(
                input_ids.to(device),
                images=torch.cat(images) if images else None,
                attention_mask=attention_mask.to(device),
                **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - any failure ends this batch's requests with an error, not the worker
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
        stops = [job.request.stop] if job.request.stop else []
        text = self.tokenizer.decode(job.ids, skip_special_tokens=True)
        shown, stopped = visible_text(text, stops, final=False)
        if eos_hit or stopped:
            self.finish(job, "stop", text)
        elif len(job.ids) >= job.request.max_new_tokens:
            self.finish(job, "length", text)
        elif shown != job.shown:
            job.shown = shown
            job.emit(StreamEvent(text=shown, completion_tokens=len(job.ids)))

    def finish(self, job: Job, reason: str, text: str | None = None) -> None:
        """Send a job's last event (its full text, cut at the stop string) and mark it finished."""
        if job.finished:
            return
        job.finished = True
        if job.cancelled:
            return
        if text is None:
            text = self.tokenizer.decode(job.ids, skip_special_tokens=True)
        stops = [job.request.stop] if job.request.stop else []
        shown, _ = visible_text(text, stops, final=True)
        job.shown = shown
        job.emit(StreamEvent(text=shown, finish_reason=reason, completion_tokens=len(job.ids)))
