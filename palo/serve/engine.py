"""Request handling in front of the generation engine: validation, tokenisation, images, streaming events.

:meth:`GenerationEngine.prepare` validates a worker request (the original generation parameters) and tokenises it
(any thread); :meth:`GenerationEngine.submit` hands it to :class:`palo.engine.LLMEngine`, which batches
continuously: a request joins the running batch between two decode steps and leaves it when it ends (end of
sequence, stop string, its own token budget, or its client went away), each with its own sampling settings. Greedy
answers are the tokens ``model.generate`` gives the request alone.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from palo.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, WORKER_SEED_RANGE
from palo.engine import EngineConfig, EngineRequest, LLMEngine, RequestOutput, SamplingParams
from palo.engine.sampling import MAX_LOGPROBS, TokenLogprob
from palo.mm_utils import ImageLoadError, load_image, load_image_from_base64, process_images, tokenizer_image_token
from palo.model.config import MultimodalSpec
from palo.model.multimodal import spliced_length
from palo.remote_images import RemoteImagePolicy, is_remote
from palo.serve.protocol import (
    SMALLEST_TOP_P,
    is_token_ids,
    parse_cache_salt,
    parse_logit_bias,
    parse_number,
    parse_stops,
    parse_structured_output,
)
from palo.serve.utils import route_logs

# The original worker's caps: at most 1024 new tokens, and a 2048-token context when the config does not say.
MAX_NEW_TOKENS_CAP = 1024
DEFAULT_CONTEXT = 2048
# Cap on images in one request, so one request cannot make the worker decode an unbounded number of images.
MAX_IMAGES_PER_REQUEST = 16
MAX_STOP_TOKEN_IDS = 64
# Longer prompts cannot fit any LLaMA context anyway; refuse them before spending time tokenising them.
MAX_PROMPT_CHARS = 1_000_000
# The logger palo.engine writes its failures to (with their tracebacks).
ENGINE_LOGGER = "palo.engine"


class RequestError(ValueError):
    """The request is malformed (HTTP 400): bad field types, images that cannot be read, a wrong image count.

    Args:
        message: What is wrong, for the client.
        field: The request field it is about (a worker field: the OpenAI API names its own one after it), if one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLong(ValueError):
    """The prompt leaves no room for new tokens in the model's context."""


@dataclass
class PreparedRequest:
    """A validated request, ready for generation.

    Attributes:
        prompt: The prompt as received (the stream's text starts with it).
        input_ids: Prompt ids, with ``IMAGE_TOKEN_INDEX`` where each image goes.
        images: Pixel values ``[k, 3, H, W]`` on the model's device, or None.
        max_new_tokens: The token budget after the context cap.
        sampling: The engine's sampling settings (token budget, temperature, top-p/k, stop, seed, penalties).
        stop: The protocol's stop string (the template's), or None; ``sampling.stop`` holds it and the client's.
        prompt_tokens: Context positions the prompt takes, image positions included.
        prompt_from_ids: Whether the prompt came as token ids (``prompt`` is then their text).
        cache_salt: Shares cached prompt blocks and image features only with requests of the same salt.
    """

    prompt: str
    input_ids: list[int]
    images: torch.Tensor | None
    max_new_tokens: int
    sampling: SamplingParams
    stop: str | None
    prompt_tokens: int
    prompt_from_ids: bool = False
    cache_salt: str | None = None


@dataclass
class StreamEvent:
    """What the engine tells a request's sink.

    Attributes:
        text: The generated text so far (without the prompt), or None on error.
        finish_reason: ``"stop"`` or ``"length"`` on the last event, else None.
        error: An error message; the request is over.
        completion_tokens: Tokens generated so far.
        logprobs: Per token generated, its log-probability and top alternatives, when the request asked: the
            request's growing list, of which this event covers the first ``completion_tokens`` (copying the answer
            so far into every event cost time quadratic in its length).
        token_ids: The tokens generated, along with ``logprobs`` (also the growing list).
        prompt_logprobs: Per prompt id, when the request asked and its prompt is computed (None for the first id and
            image placeholders).
        cached_tokens: Prompt positions whose KV came from the prefix cache (not computed for this request).
    """

    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0


Sink = Callable[[StreamEvent], None]


class Job:
    """A submitted request: cancel it when its client goes away (its KV cache is freed at the next step)."""

    def __init__(self, engine: LLMEngine, request: PreparedRequest, sink: Sink) -> None:
        self.request = request
        self.sink = sink
        self._engine = engine
        self.seq = None

    def cancel(self) -> None:
        """Stop generating for this request (a no-op once it finished)."""
        if self.seq is not None:
            self._engine.abort(self.seq)


def _parse_number(params: dict[str, Any], key: str, default: float, integer: bool = False) -> float:
    """:func:`~palo.serve.protocol.parse_number`, its refusal a :class:`RequestError`."""
    try:
        return parse_number(params, key, default, integer)
    except ValueError as exc:
        raise RequestError(str(exc), key) from None


def _parsed(field: str, parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)``, its refusal a :class:`RequestError` about ``field``."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise RequestError(str(exc), field) from None


def _alternatives(params: dict[str, Any], key: str) -> int | None:
    """``params[key]`` as a count of log-probability alternatives per token (0 to 20), or None when absent."""
    value = params.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= MAX_LOGPROBS):
        raise RequestError(f"'{key}' must be null or an integer from 0 to {MAX_LOGPROBS} (alternatives per "
                           f"token), got {value!r}", key)
    return value


class EngineBackend(ABC):
    """What a model worker generates with: the request checks every engine shares, and the queue each implements.

    The worker calls :meth:`prepare` (any thread), then :meth:`submit` with a sink for the request's
    :class:`StreamEvent` s, and :meth:`stats` for its status. :class:`GenerationEngine` (continuous batching, the
    default) and :class:`palo.serve.static_engine.StaticBatchEngine` (``--engine static``) implement the queue.

    Args:
        tokenizer: The model's tokenizer.
        model: A loaded :class:`~palo.model.palo_llama.PaloForCausalLM` (or a plain causal LM).
        image_processor: The CLIP processor, or None for a text-only model.
        context_len: Context size when the config has no ``max_position_embeddings``.
        max_batch_size: Most sequences generated together.
        logger: Where to log (default: the implementation's module logger).
    """

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        image_processor: Any,
        context_len: int = DEFAULT_CONTEXT,
        max_batch_size: int = 8,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or context_len or DEFAULT_CONTEXT)
        self.max_batch_size = max_batch_size
        self.logger = logger or logging.getLogger(type(self).__module__)
        # http(s) image URLs are fetched under this policy (the worker's --allow-remote-images); None refuses them.
        self.remote_images: RemoteImagePolicy | None = None

    # -- facts about the model -----------------------------------------------------------------------------------
    @property
    def is_multimodal(self) -> bool:
        """Whether the checkpoint has a vision tower (decided by its config, never by its name)."""
        return self.image_processor is not None and getattr(self.model, "vision_tower", None) is not None

    @property
    def image_token_count(self) -> int:
        """Context positions one image takes (576 for CLIP-L/336 + MLP projector, 144 with LDP)."""
        return int(getattr(self.model, "image_token_count", 0)) if self.is_multimodal else 0

    # -- request parsing -----------------------------------------------------------------------------------------
    def decode_image(self, data: str) -> Any:
        """One image of a request: base64 (or a ``data:`` URL), or an http(s) URL fetched under the remote policy.

        Raises:
            ImageLoadError: If it cannot be read, or is a URL this worker does not fetch.
        """
        if not is_remote(data):
            return load_image_from_base64(data)
        if self.remote_images is None:
            raise ImageLoadError(f"{data[:200]}: this worker does not fetch image URLs (start it with "
                                 "--allow-remote-images), send the image as base64")
        return load_image(data, allow_remote=True, policy=self.remote_images)

    def prepare(self, params: dict[str, Any], images: Sequence[Any] | None = None,
                host_images: bool = False) -> PreparedRequest:
        """Validate a worker request (the original generation parameters) and tokenise it.

        Args:
            params: ``{"prompt", "images", "temperature", "top_p", "max_new_tokens", "stop"}`` (the original
                protocol), optionally ``"top_k"``, ``"seed"``, vLLM's ``"min_p"``, ``"min_tokens"``,
                ``"stop_token_ids"`` and ``"ignore_eos"``, the penalties ``"presence_penalty"``,
                ``"frequency_penalty"`` (OpenAI's, in [-2, 2]) and ``"repetition_penalty"`` (> 0), and
                ``"logprobs"`` (k alternatives per token: each chunk then carries its new tokens' log-probabilities),
                ``"prompt_logprobs"`` (the same for the prompt's ids, in the first chunk after the prompt is computed;
                ``max_new_tokens`` may then be 0 to score the prompt only), ``"logit_bias"`` (OpenAI's
                ``{"token id": bias}``), ``"stops"`` (the client's stop strings, besides ``"stop"``), an answer shape
                (``"response_format"``, ``"guided_json"``, ``"guided_regex"``, ``"guided_choice"`` or
                ``"structured_outputs"``, see
                :func:`~palo.serve.protocol.parse_structured_output`), ``"prompt_token_ids"`` instead of
                ``"prompt"`` (the prompt as token ids, used as they are; no images), vLLM's ``"cache_salt"`` and
                ``"continuation"`` (the answer's text continues the prompt's: a word-initial first token keeps its
                space, as raw completions need) and ``"cap_max_new_tokens"`` (false: ``max_new_tokens`` is capped
                at the context only, not at the original's 1024).
            images: The prompt's images already read (RGB PIL images, for :mod:`palo.llm`), instead of
                ``params["images"]``.
            host_images: Keep the pixels in host memory (the engine moves them to the device when it encodes
                them): for callers that prepare many requests before submitting them.

        Returns:
            The prepared request.

        Raises:
            RequestError: For malformed fields, unreadable images (invalid base64, not an image, over the pixel cap)
                or an image count that differs from the prompt's ``<image>`` placeholders.
            PromptTooLong: When the prompt (image positions included) leaves no room for new tokens.
        """
        if not isinstance(params, dict):
            raise RequestError("the request body must be a JSON object")
        token_ids = self._prompt_token_ids(params.get("prompt_token_ids"))
        prompt = params.get("prompt")
        if token_ids is not None:  # the stream's text starts with the prompt: here the text its ids spell
            if prompt is not None:
                raise RequestError("send either 'prompt' or 'prompt_token_ids', not both", "prompt")
            prompt = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        elif not isinstance(prompt, str):
            raise RequestError("'prompt' is required and must be a string", "prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptTooLong(f"the prompt has {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
        read = images is not None
        images = list(images) if read else params.get("images") or []
        if not read and (not isinstance(images, list) or not all(isinstance(x, str) for x in images)):
            raise RequestError("'images' must be a list of base64-encoded PNG or JPEG strings", "images")
        stop = params.get("stop")
        if stop is not None and not isinstance(stop, str):
            raise RequestError(f"'stop' must be a string, got {stop!r}", "stop")
        temperature = _parse_number(params, "temperature", 1.0)
        top_p = _parse_number(params, "top_p", 1.0)
        top_k = _parse_number(params, "top_k", 0, integer=True)
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not WORKER_SEED_RANGE[0] <= seed <= WORKER_SEED_RANGE[1]):
            raise RequestError(f"'seed' must be an integer in [{WORKER_SEED_RANGE[0]}, {WORKER_SEED_RANGE[1]}], "
                               f"got {seed!r}", "seed")
        if top_k == -1:  # vLLM's "no limit" (its LLM and its API), as the OpenAI API here takes it
            top_k = 0
        if top_k < 0:
            raise RequestError(f"'top_k' must be >= 0 (or -1: no limit), got {top_k}", "top_k")
        min_p = _parse_number(params, "min_p", 0.0)
        if not 0 <= min_p <= 1:
            raise RequestError(f"'min_p' must be in [0, 1], got {min_p}", "min_p")
        min_tokens = _parse_number(params, "min_tokens", 0, integer=True)
        ignore_eos = params.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError(f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
        continuation = params.get("continuation", False)
        if not isinstance(continuation, bool):
            raise RequestError(f"'continuation' must be true or false, got {continuation!r}", "continuation")
        capped = params.get("cap_max_new_tokens", True)
        if not isinstance(capped, bool):
            raise RequestError(f"'cap_max_new_tokens' must be true or false, got {capped!r}", "cap_max_new_tokens")
        stop_token_ids = params.get("stop_token_ids") or []
        vocab = int(self.model.config.vocab_size)
        if not is_token_ids(stop_token_ids, vocab, max_len=MAX_STOP_TOKEN_IDS, empty=True):
            raise RequestError(f"'stop_token_ids' must be a list of up to {MAX_STOP_TOKEN_IDS} token ids in "
                               f"[0, {vocab})", "stop_token_ids")
        max_new_tokens = _parse_number(params, "max_new_tokens", 256, integer=True)
        if temperature < 0:
            raise RequestError(f"'temperature' must be >= 0, got {temperature}", "temperature")
        if not 0 <= top_p <= 1:
            raise RequestError(f"'top_p' must be in [0, 1], got {top_p}", "top_p")
        top_p = top_p or SMALLEST_TOP_P
        penalties = {key: _parse_number(params, key, 0.0) for key in ("presence_penalty", "frequency_penalty")}
        for key, value in penalties.items():
            if not -2 <= value <= 2:
                raise RequestError(f"'{key}' must be in [-2, 2], got {value}", key)
        penalties["repetition_penalty"] = _parse_number(params, "repetition_penalty", 1.0)
        if penalties["repetition_penalty"] <= 0:
            raise RequestError(f"'repetition_penalty' must be > 0, got {penalties['repetition_penalty']}",
                               "repetition_penalty")
        logit_bias = _parsed("logit_bias", parse_logit_bias, params.get("logit_bias"), vocab)
        structured, _ = _parsed("structured", parse_structured_output, params)
        cache_salt = _parsed("cache_salt", parse_cache_salt, params.get("cache_salt"))
        stops = _parsed("stops", parse_stops, params.get("stops"))
        logprobs, prompt_logprobs = (_alternatives(params, key) for key in ("logprobs", "prompt_logprobs"))
        # No answer at all: only to score the prompt.
        least_tokens = 0 if prompt_logprobs is not None else 1
        if max_new_tokens < least_tokens:
            raise RequestError(f"'max_new_tokens' must be at least 1 (0 only with 'prompt_logprobs'), got "
                               f"{max_new_tokens}", "max_new_tokens")
        if capped:  # the original protocol's cap; the OpenAI API sends false: its max_tokens goes up to the context
            max_new_tokens = min(max_new_tokens, MAX_NEW_TOKENS_CAP)
        if not 0 <= min_tokens <= max_new_tokens:
            raise RequestError(f"'min_tokens' must be from 0 to max_new_tokens ({max_new_tokens}), got {min_tokens}",
                               "min_tokens")

        num_placeholders = prompt.count(DEFAULT_IMAGE_TOKEN)
        if images and token_ids is not None:
            raise RequestError("a 'prompt_token_ids' prompt takes no images; send the prompt as text with <image>",
                               "images")
        if images and not self.is_multimodal:
            raise RequestError("this model takes text only (its config has no vision tower); send no images", "images")
        if self.is_multimodal and len(images) != num_placeholders:
            raise RequestError(
                f"{len(images)} image(s) for {num_placeholders} <image> placeholder(s) in the prompt; "
                "send exactly one image per <image>", "images"
            )
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"{len(images)} images is over the limit of {MAX_IMAGES_PER_REQUEST} per request",
                               "images")

        if token_ids is not None:
            input_ids = token_ids
        elif self.is_multimodal:
            text = MultimodalSpec.from_config(self.model.config).expand_image_placeholders(prompt)
            input_ids = tokenizer_image_token(text, self.tokenizer, IMAGE_TOKEN_INDEX)
        else:
            input_ids = self.tokenizer(prompt).input_ids
        prompt_tokens = spliced_length(input_ids, self.image_token_count)
        max_new_tokens = min(max_new_tokens, self.max_context - prompt_tokens)
        if max_new_tokens < least_tokens:
            raise PromptTooLong(
                f"the prompt takes {prompt_tokens} of the model's {self.max_context} context positions"
                f" ({len(images)} image(s) x {self.image_token_count}); no room is left for an answer"
            )

        pixels = None
        if images:
            # One image at a time, decoded and made into pixels before the next is read: a request of 16 large
            # images holds one decoded image at a time, not 16 (gigabytes each at the size limit).
            rows = []
            for i, data in enumerate(images):
                try:
                    image = data if read else self.decode_image(data)
                except ImageLoadError as exc:
                    raise RequestError(f"image {i}: {exc}", "images") from None
                rows.append(process_images([image], self.image_processor, self.model.config)[0])
                del image
            pixels = torch.stack(rows).to("cpu" if host_images else self.model.device, dtype=self.model.dtype)
        try:  # combinations the engine refuses (a structured answer with min_tokens or ignore_eos)
            sampling = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      min_p=min_p, min_tokens=min(min_tokens, max_new_tokens),
                                      stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
                                      stop=((stop,) if stop else ()) + stops, seed=seed, logprobs=logprobs,
                                      prompt_logprobs=prompt_logprobs, logit_bias=logit_bias,
                                      structured=structured, continuation=continuation, **penalties)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return PreparedRequest(
            prompt=prompt,
            input_ids=input_ids,
            images=pixels,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stop or None,
            prompt_tokens=prompt_tokens,
            prompt_from_ids=token_ids is not None,
            cache_salt=cache_salt,
        )

    def _prompt_token_ids(self, value: Any) -> list[int] | None:
        """A prompt sent as token ids (used as they are: no BOS is added), or None when absent.

        Raises:
            RequestError: For anything but a non-empty list of the model's token ids.
        """
        if value is None:
            return None
        vocab = int(self.model.config.vocab_size)
        if not is_token_ids(value, vocab, max_len=MAX_PROMPT_CHARS):
            raise RequestError(f"'prompt_token_ids' must be a non-empty list of token ids in [0, {vocab}), at most "
                               f"{MAX_PROMPT_CHARS}", "prompt_token_ids")
        return value

    # -- queue (each engine's own) ---------------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> EngineBackend:
        """Start generating in the background (idempotent); returns the engine."""

    @abstractmethod
    def close(self, timeout: float = 30.0) -> None:
        """Stop the background thread; unfinished requests end with an error event or silently."""

    @abstractmethod
    def alive(self) -> bool:
        """Whether the background thread is generating (started, not closed, not died)."""

    @abstractmethod
    def submit(self, request: PreparedRequest, sink: Sink) -> Any:
        """Queue one request; its events go to ``sink`` from the engine thread.

        Returns:
            A handle whose ``cancel()`` stops generating for the request (its client went away).
        """

    @abstractmethod
    def queue_size(self) -> int:
        """Requests waiting to be generated."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters for the worker's status (at least ``waiting``)."""

    @property
    @abstractmethod
    def batch_sizes(self) -> Sequence[int]:
        """Requests generated together in each recent step or batch."""

    def submit_many(self, requests: Sequence[PreparedRequest], sinks: Sequence[Sink]) -> list[Any]:
        """Queue several requests: all of them or none.

        When one is refused (a full queue, a request too large) those queued before it are cancelled before the
        error propagates: the caller gets no handle for them, so nobody would ever cancel or read them.
        """
        jobs = []
        try:
            for request, sink in zip(requests, sinks):
                jobs.append(self.submit(request, sink))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    def generate(self, requests: Sequence[PreparedRequest], timeout: float | None = 300.0) -> list[StreamEvent]:
        """Submit requests together and wait for their last events (for scripts, tests and benchmarks).

        Args:
            requests: Prepared requests.
            timeout: Seconds to wait for all of them (None: no limit).

        Returns:
            The final event of each request, in order.

        Raises:
            TimeoutError: When the answers are not all in after ``timeout`` seconds; every request is cancelled
                first (as on any other error), so that none goes on generating for nobody.
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
        jobs = self.submit_many(requests, [make_sink(i) for i in range(len(requests))])
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for event in done:
                if not event.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"generation did not finish within {timeout} s")
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return [e for e in last if e is not None]


class GenerationEngine(EngineBackend):
    """Streams answers from one :class:`~palo.engine.LLMEngine` (continuous batching over a paged KV cache).

    Args:
        tokenizer, model, image_processor, context_len: As for :class:`EngineBackend`.
        max_batch_size: Most sequences decoded together (the engine's ``max_num_seqs``) unless ``engine_config``
            says otherwise.
        batch_wait_ms: Accepted for compatibility; continuous batching needs no collection window.
        logger: Optional logger; the engine's own records (a failed step's traceback) are sent to its handlers too.
        engine_config: Engine settings (KV cache size, prefill chunk, prefix cache, CUDA graphs).
    """

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        image_processor: Any,
        context_len: int = DEFAULT_CONTEXT,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        logger: logging.Logger | None = None,
        engine_config: EngineConfig | None = None,
    ) -> None:
        super().__init__(tokenizer, model, image_processor, context_len, max_batch_size, logger)
        if logger is not None:
            # LLMEngine logs a failed step with its traceback under its own name; the worker's log must have it.
            route_logs(ENGINE_LOGGER, logger)
        config = engine_config or EngineConfig(max_num_seqs=max_batch_size)
        if config.max_model_len is None or config.max_model_len > self.max_context:
            config = replace(config, max_model_len=self.max_context)
        self.engine = LLMEngine(model, tokenizer, config)
        # A cache smaller than the model's context (a small --kv-cache-gb) holds no longer sequence: requests are
        # sized by what it holds, answers trimmed to it and longer prompts refused as too long (400), and
        # /model_details says so. The engine refused them as too large, which the worker answered as a server error.
        blocks = self.engine.blocks
        self.max_context = min(self.engine.max_model_len, blocks.usable_blocks * blocks.block_size)
        self.max_batch_size = config.max_num_seqs
        self.eos_ids = self.engine.eos_ids

    @property
    def batch_sizes(self) -> Sequence[int]:
        """Sequences in each recent decode step."""
        return self.engine.batch_sizes

    def start(self) -> GenerationEngine:
        """Start the engine thread (idempotent)."""
        self.engine.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; unfinished requests end with an error."""
        self.engine.close(timeout)

    def alive(self) -> bool:
        return self.engine.is_running()

    def prepare(self, params: dict[str, Any], images: Sequence[Any] | None = None,
                host_images: bool = False) -> PreparedRequest:
        """As :meth:`EngineBackend.prepare`, and an answer shape is compiled here, so a schema or pattern that
        cannot be used is refused with the request (the engine reuses the compiled grammar)."""
        prepared = super().prepare(params, images, host_images)
        if prepared.sampling.structured is not None:
            try:
                self.engine.structured_outputs().matcher(prepared.sampling.structured)
            except ImportError:
                raise RequestError("structured outputs need the xgrammar package on the worker (pip install "
                                   "xgrammar)", "structured") from None
            except ValueError as exc:
                raise RequestError(str(exc), "structured") from None
        return prepared

    def submit(self, request: PreparedRequest, sink: Sink) -> Job:
        """Queue one request; its events go to ``sink`` from the engine thread.

        Raises:
            palo.engine.QueueFull: When the engine's waiting queue is full.
        """
        job = Job(self.engine, request, sink)
        job.seq = self.engine.add_request(EngineRequest(
            request.input_ids, request.images, request.sampling,
            on_output=lambda output: sink(_event(output, request.sampling.logprobs is not None)),
            cache_salt=request.cache_salt,
        ))
        return job

    def queue_size(self) -> int:
        """Requests waiting for a place in the running batch."""
        return self.engine.stats()["waiting"]

    def stats(self) -> dict[str, Any]:
        """The engine's queue, running sequences, KV use and tokens/s."""
        return self.engine.stats()


def _event(output: RequestOutput, with_logprobs: bool = False) -> StreamEvent:
    """The worker's view of an engine output (a cancelled request ends silently)."""
    if output.finish_reason == "error":
        return StreamEvent(text=None, error=output.error)
    reason = output.finish_reason if output.finish_reason in ("stop", "length") else None
    if output.finished and reason is None:  # aborted: the client is gone; tell it nothing new
        reason = "stop"
    return StreamEvent(text=output.text, finish_reason=reason, completion_tokens=output.num_tokens,
                       logprobs=output.answer_logprobs if with_logprobs else None,
                       token_ids=output.answer_ids if with_logprobs else None,
                       prompt_logprobs=output.prompt_logprobs, cached_tokens=output.cached_positions)
