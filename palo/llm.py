"""Batched generation in Python: ``LLM(path).chat(conversations)`` on the continuous-batching engine.

What vLLM's ``LLM`` is to its users, for PALO checkpoints: load once, then hand over many conversations at once and
get their answers back in order, generated together by :mod:`palo.engine` (paged KV cache, prefix cache: one image
asked in 10 languages computes its features and shared prompt once)::

    from palo.llm import LLM

    llm = LLM("MBZUAI/PALO-7B")                          # the checkpoint's own template (vicuna_v1 for PALO)
    photo = {"type": "image", "image": "photo.jpg"}      # a path or a PIL image
    answers = llm.chat([[{"role": "user", "content": [photo, {"type": "text", "text": question}]}]
                        for question in ("¿Qué es?", "这是什么？", "यह क्या है?")], max_tokens=128)
    print([a.text for a in answers])

Messages are OpenAI's chat messages, rendered exactly as the OpenAI API renders them
(:func:`palo.serve.openai_api.render_messages`); an image part is OpenAI's ``{"type": "image_url", "image_url":
{"url": "data:image/...;base64,..."}}`` or, for local use, ``{"type": "image", "image": <path or PIL image>}``.
:meth:`LLM.generate` takes finished prompts (``<image>`` where each image goes) instead. The settings are the
worker's (``max_tokens``, ``temperature`` (default 0: greedy, as ``model.generate``), ``top_p``, ``top_k``, ``stop``,
``seed``, ``min_p``, ``min_tokens``, the penalties, ``logit_bias``, ``logprobs``, ``response_format`` ...), checked
as the worker checks them: a bad conversation raises ``ValueError`` naming it before anything is generated.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 256
# How often a call whose requests find the engine's queue full of others' looks again for room.
QUEUE_RETRY_S = 0.02

# The settings :meth:`LLM.chat` and :meth:`LLM.generate` pass on to the engine, besides their own arguments: exactly
# the request fields :meth:`palo.serve.engine.EngineBackend.prepare` reads and whose effect an :class:`Answer` shows.
# Anything else is refused, since the engine would otherwise drop it without a word (a misspelt ``top_pp``, vLLM's
# ``n``). Left out on purpose: ``prompt_logprobs`` (an Answer has no place for them), ``stops`` (``stop`` is the
# argument), ``continuation`` (decided by chat vs generate) and ``prompt_token_ids`` (prompts are given as text).
SETTINGS = frozenset({
    "top_p", "top_k", "min_p", "seed", "min_tokens", "ignore_eos", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs", "cache_salt",
})


def _token_budget(max_tokens: int | None, settings: dict[str, Any]) -> int:
    """Check ``settings`` and return the answer's token budget; ``settings`` loses the keys handled here.

    Args:
        max_tokens: The ``max_tokens`` argument (None when not given).
        settings: The other keyword arguments of :meth:`LLM.chat` / :meth:`LLM.generate`.

    Returns:
        The most tokens per answer.

    Raises:
        ValueError: For a setting the engine does not take, ``n`` other than 1, or both ``max_tokens`` and its
            alias ``max_new_tokens``.
    """
    if "images" in settings or "prompt" in settings:
        raise ValueError("give prompts and images as arguments, not as settings")
    if "max_new_tokens" in settings:  # the name model.generate and the worker use for the same budget
        if max_tokens is not None:
            raise ValueError("give max_tokens or its alias max_new_tokens, not both")
        max_tokens = settings.pop("max_new_tokens")
    n = settings.pop("n", 1)
    if n != 1:
        raise ValueError(f"n={n!r}: one answer per conversation or prompt is generated; list it n times (with "
                         "different seeds when sampling) for several answers")
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))}; the settings are max_tokens "
                         f"(max_new_tokens), temperature, stop, timeout and {', '.join(sorted(SETTINGS))}")
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number of at least 1, got {max_tokens!r}")
    return max_tokens


def _checked(temperature: Any, timeout: Any) -> float:
    """``temperature`` as a number (None: 0, the default, greedy), once it and ``timeout`` are numbers.

    Raises:
        ValueError: For a temperature or a timeout that is not a number (a timeout of "5" failed deep inside).
    """
    for name, value in (("temperature", temperature), ("timeout", timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name} must be a number, got {value!r}")
    return 0.0 if temperature is None else float(temperature)


@dataclass
class Answer:
    """One generated answer.

    Attributes:
        text: The answer (the template's stop string and any ``stop`` left out).
        finish_reason: ``"stop"`` (end of sequence or a stop string) or ``"length"`` (the token budget).
        prompt_tokens: Context positions the prompt took, image positions included.
        completion_tokens: Tokens generated.
        cached_tokens: Prompt positions read from the prefix cache instead of computed.
        logprobs: Per answer token its log-probability and alternatives, when ``logprobs`` was asked for.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[Any] | None = None


def _is_list(value: Any) -> bool:
    """Whether ``value`` is a sequence of items (a list, a tuple ...): not a string, bytes or an image."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _require_engine() -> None:
    """The engine's request handling and chat rendering are the server's (palo.serve): the serve extra's packages.

    Raises:
        MissingExtra: Naming them, where the import of ``starlette`` deep in the serving code failed.
    """
    from palo.extras import require

    require("palo.LLM", "serve", packages=("fastapi", "starlette", "anyio"))


class LLM:
    """A loaded checkpoint and its generation engine (see the module docstring).

    Args:
        model_path: A local checkpoint folder or a hub id (through the local Hugging Face cache).
        model_base: The base LLM of a LoRA or projector-only checkpoint.
        device: ``cuda``, ``cuda:N`` or ``cpu`` (default: CUDA when there is one).
        load_8bit, load_4bit: Quantise the LLM with bitsandbytes.
        conv_mode: The conversation template (default: the one the checkpoint was trained with, from its config,
            never from the folder's name: ``vicuna_v1`` for PALO, ``llava_v1`` for LLaVA-1.5; see
            :func:`palo.conversation.conv_mode_for_checkpoint`). Give it for a checkpoint trained with another one.
        engine_config: Engine settings (``max_num_seqs``, KV cache size, prefix cache ...); the worker's defaults.
        vision_tower: A local CLIP folder instead of ``mm_vision_tower``.
        allow_remote_images: Fetch http(s) image URLs (off: as the worker without ``--allow-remote-images``).
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or a torch dtype; None or ``"auto"``: float16 on CUDA,
            float32 elsewhere.
    """

    def __init__(self, model_path: str, model_base: str | None = None, *, device: str | None = None,
                 load_8bit: bool = False, load_4bit: bool = False, conv_mode: str | None = None,
                 engine_config: Any = None, vision_tower: str | None = None,
                 allow_remote_images: bool = False, dtype: Any = None) -> None:
        import torch

        from palo.mm_utils import get_model_name_from_path
        from palo.model.builder import load_pretrained_model

        _require_engine()  # before the checkpoint loads (minutes for a 7B), not after
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            model_path, model_base, get_model_name_from_path(model_path), load_8bit, load_4bit, device=device,
            vision_tower=vision_tower, dtype=dtype)
        self._setup(tokenizer, model, image_processor, context_len, conv_mode, engine_config, allow_remote_images)

    @classmethod
    def from_loaded(cls, tokenizer: Any, model: Any, image_processor: Any, context_len: int = 2048, *,
                    conv_mode: str | None = None, engine_config: Any = None,
                    allow_remote_images: bool = False) -> LLM:
        """An :class:`LLM` around what :func:`~palo.model.builder.load_pretrained_model` returned."""
        _require_engine()
        llm = cls.__new__(cls)
        llm._setup(tokenizer, model, image_processor, context_len, conv_mode, engine_config, allow_remote_images)
        return llm

    def _setup(self, tokenizer: Any, model: Any, image_processor: Any, context_len: int, conv_mode: str | None,
               engine_config: Any, allow_remote_images: bool) -> None:
        from palo.conversation import conv_mode_for_checkpoint, conv_templates
        from palo.engine import EngineConfig
        from palo.remote_images import RemoteImagePolicy
        from palo.serve.engine import GenerationEngine

        if conv_mode is not None and conv_mode not in conv_templates:
            raise ValueError(f"unknown conv_mode {conv_mode!r}; one of {', '.join(sorted(conv_templates))}")
        self.tokenizer, self.model = tokenizer, model
        self.conv_mode = conv_mode or conv_mode_for_checkpoint(model.config)
        self.backend = GenerationEngine(tokenizer, model, image_processor, context_len,
                                        engine_config=engine_config or EngineConfig())
        self.backend.remote_images = RemoteImagePolicy() if allow_remote_images else None
        # An LLM dropped without close() (a notebook cell run again) stopped nothing: its engine thread ran on and
        # held the model and the KV cache until the process ended. The finaliser holds the backend, not the LLM.
        self._finalizer = weakref.finalize(self, self.backend.close)

    def close(self) -> None:
        """Stop the engine's thread and free the KV cache; later calls raise :class:`palo.engine.EngineClosed`.
        Also done when the object is garbage-collected, or at the end of a ``with`` block."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation ----------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], *, max_tokens: int | None = None,
             temperature: float = 0.0, stop: str | Sequence[str] | None = None, timeout: float | None = None,
             **settings: Any) -> list[Answer]:
        """Answer chat conversations, generated together.

        Args:
            messages: One conversation (a list of OpenAI chat messages) or a list of them.
            max_tokens: Most tokens per answer (default 256; up to the model's context); ``max_new_tokens``, the
                name ``model.generate`` uses, is taken as its alias.
            temperature: 0 (or None) for greedy decoding.
            stop: Strings that end an answer (besides the template's), left out of it.
            timeout: Seconds to wait for all answers (default: no limit).
            **settings: The worker's other settings (:data:`SETTINGS`: ``top_p``, ``top_k``, ``seed``, ``min_p``,
                ``presence_penalty``, ``logit_bias``, ``logprobs``, ``response_format``, ``cache_salt`` ...), and
                ``n=1`` (one answer each: any other ``n`` is refused).

        Returns:
            One :class:`Answer` per conversation, in order.

        Raises:
            ValueError: A malformed conversation, an unreadable image, a setting out of range or a prompt with no
                room for an answer (the message names the conversation), or a setting the engine does not take
                (a misspelt name, ``n`` other than 1, both ``max_tokens`` and ``max_new_tokens``). Nothing is
                generated then.
        """
        from palo.serve.openai_api import APIError, render_messages

        max_tokens = _token_budget(max_tokens, settings)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for index, conversation in enumerate(conversations):
            try:
                prompt, images, template_stop = render_messages(list(conversation), self.conv_mode,
                                                                read_image=self._read_image)
            except APIError as exc:
                raise ValueError(f"conversation {index}: {exc}") from None
            prompts.append((prompt, images, template_stop))
        return self._run(prompts, "conversation", max_tokens, temperature, stop, timeout, settings)

    def generate(self, prompts: str | Sequence[str], images: Sequence[Sequence[Any]] | None = None, *,
                 max_tokens: int | None = None, temperature: float = 0.0,
                 stop: str | Sequence[str] | None = None, timeout: float | None = None,
                 **settings: Any) -> list[Answer]:
        """Continue finished prompts (no template is applied), generated together.

        Args:
            prompts: One prompt or several, ``<image>`` where each image goes.
            images: Per prompt, a list of its images in order (paths or PIL images), e.g. ``[["photo.png"]]`` for
                one prompt with one image; None for none at all.
            max_tokens, temperature, stop, timeout, settings: As for :meth:`chat`.

        Returns:
            One :class:`Answer` per prompt, in order.

        Raises:
            ValueError: As for :meth:`chat`, naming the prompt; also when a prompt's entry in ``images`` is not
                a list (a bare path or image).
        """
        from palo.serve.openai_api import APIError

        max_tokens = _token_budget(max_tokens, settings)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is not None and not _is_list(images):
            raise ValueError(f"images must be a list with one list of images per prompt (images=[[...]]), got "
                             f"{type(images).__name__}")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts; give one per prompt")
        rows = []
        for index, prompt in enumerate(prompts):
            own = None if images is None else images[index]
            if own is not None and not _is_list(own):
                # A path string would otherwise be read one character at a time, and a PIL image is no sequence.
                raise ValueError(f"prompt {index}: its images must be a list, got {type(own).__name__} {own!r:.80}; "
                                 "give a list of images per prompt, e.g. images=[['photo.png']] for one prompt")
            own = list(own or [])
            try:
                rows.append((prompt, [self._read_image({"type": "image", "image": image}) for image in own], None))
            except APIError as exc:
                raise ValueError(f"prompt {index}: {exc}") from None
        return self._run(rows, "prompt", max_tokens, temperature, stop, timeout, settings)

    def _run(self, rows: list[tuple[str, list[Any], str | None]], what: str, max_tokens: int, temperature: float,
             stop: str | Sequence[str] | None, timeout: float | None, settings: dict[str, Any]) -> list[Answer]:
        from palo.serve.engine import PromptTooLong, RequestError

        temperature = _checked(temperature, timeout)
        extra = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in extra):
            raise ValueError(f"'stop' must be a string or a list of non-empty strings, got {stop!r}")
        prepared = []
        for index, (prompt, images, template_stop) in enumerate(rows):
            # A prompt's answer continues its text ("is" + " The"), as vLLM's generate; a conversation's starts
            # without a space, as the original's chat answers.
            # max_tokens goes up to the context, as the OpenAI API's (the worker's own default caps it at the
            # original's 1024, and a longer answer asked for ended there as if at its budget).
            params = {"continuation": what == "prompt", **settings, "prompt": prompt, "max_new_tokens": max_tokens,
                      "cap_max_new_tokens": False, "temperature": temperature, "stop": template_stop}
            try:  # every request is checked before any is submitted; pixels wait in host memory, as vLLM's do
                request = self.backend.prepare(params, images, host_images=True)
            except (RequestError, PromptTooLong) as exc:
                raise ValueError(f"{what} {index}: {exc}") from None
            if extra:  # the engine ends an answer at any of its stop strings
                request.sampling = dataclasses.replace(request.sampling, stop=request.sampling.stop + extra)
            prepared.append(request)
        events = self._generate(prepared, timeout)
        answers = []
        for request, event in zip(prepared, events):
            if event.error is not None:
                raise RuntimeError(f"generation failed: {event.error}")
            answers.append(Answer(text=event.text or "", finish_reason=event.finish_reason or "stop",
                                  prompt_tokens=request.prompt_tokens, completion_tokens=event.completion_tokens,
                                  cached_tokens=event.cached_tokens, logprobs=event.logprobs))
        return answers

    def _generate(self, requests: list[Any], timeout: float | None) -> list[Any]:
        """Submit ``requests`` keeping at most the engine's waiting limit in flight (a list longer than its queue
        would be refused), and return each one's last event, in order. An exception here (a time-out, Ctrl-C)
        cancels what is still running."""
        import queue
        import time

        from palo.engine.errors import QueueFull

        finished: queue.Queue[int] = queue.Queue()
        last: list[Any] = [None] * len(requests)

        def sink_for(index: int) -> Any:
            def sink(event: Any) -> None:
                last[index] = event
                if event.finish_reason or event.error:
                    finished.put(index)

            return sink

        window = self.backend.engine.config.max_waiting
        deadline = None if timeout is None else time.monotonic() + timeout
        self.backend.start()
        jobs: dict[int, Any] = {}
        submitted = 0
        try:
            while submitted < len(requests) or jobs:
                full = False
                while submitted < len(requests) and len(jobs) < window:
                    try:
                        jobs[submitted] = self.backend.submit(requests[submitted], sink_for(submitted))
                    except QueueFull:
                        # Requests of others fill the queue (another thread's call, or a cancelled call's that the
                        # engine has not dropped yet): wait for room, as for the window, instead of failing.
                        full = True
                        break
                    submitted += 1
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if full and not jobs:  # none of ours to wait for: look again shortly
                    wait = QUEUE_RETRY_S if wait is None else min(wait, QUEUE_RETRY_S)
                try:
                    index = finished.get(timeout=wait)
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"generation did not finish within {timeout} s") from None
                    continue
                jobs.pop(index)
        finally:
            for job in jobs.values():
                job.cancel()
        return last

    def _read_image(self, part: dict) -> Any:
        """An image part as an RGB PIL image: ``image_url`` (base64 data URL, or http(s) with
        ``allow_remote_images``) or ``image`` (a path, or a PIL image)."""
        from PIL import Image

        from palo.image_io import MAX_IMAGE_PIXELS, viewed
        from palo.mm_utils import ImageLoadError, load_image
        from palo.serve.openai_api import APIError, image_part_data

        try:
            if part.get("type") == "image_url":  # base64, or a URL fetched under the remote policy (or refused)
                return self.backend.decode_image(image_part_data(part))
            image = part.get("image", part.get("path"))
            if isinstance(image, Image.Image):
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(f"{image.width}x{image.height} pixels is over the limit of "
                                         f"{MAX_IMAGE_PIXELS:,}; resize the image first")
                return viewed(image)
            if isinstance(image, (str, os.PathLike)):
                return load_image(os.fspath(image))
            raise APIError(400, "an image part needs {'type': 'image', 'image': <a path or a PIL image>}, got "
                           f"{type(image).__name__}")
        except ImageLoadError as exc:
            raise APIError(400, str(exc)) from None
