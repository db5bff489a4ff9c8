"""An OpenAI-compatible API (chat and text completions) on the controller, routed to model workers over the original
protocol.

* ``GET /v1/models``: the models of the live workers (``GET /v1/models/{model}``: one of them, or 404).
* ``POST /v1/chat/completions``: ``messages`` (``system``/``user``/``assistant``, consecutive messages of one role
  joined into one turn; a user message's ``content`` may
  be a list of ``text`` and ``image_url`` parts whose URLs are ``data:image/...;base64,`` URLs), ``stream`` (server-sent
  events ending with ``data: [DONE]``), ``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``),
  ``stop`` (a string or up to 4), ``seed`` (reproducible sampling), ``n``, ``top_k``, the presence, frequency and
  repetition penalties, ``logit_bias``, vLLM's ``min_p``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos`` and
  ``cache_salt`` (only requests with the same salt share the prefix cache), an answer shape (``response_format``
  or vLLM's ``guided_*`` / ``structured_outputs``), ``logprobs`` / ``top_logprobs``, ``stream_options.include_usage``.
* ``POST /v1/completions``: the legacy text completions: finished prompts sent as they are (no template, no
  images): ``prompt`` a string, a list of token ids, or a list of either (one answer, or ``n``, per prompt), the same
  settings, ``logprobs`` as a count of alternatives, and ``echo`` (the prompt before the answer; with ``logprobs``,
  the prompt's tokens scored too, the first one ``null``: how evaluation harnesses score a given text; with
  ``max_tokens`` 0 nothing is generated).

Chat messages are rendered with the conversation template the worker reports for its checkpoint (``vicuna_v1`` for
PALO; each image becomes an ``<image>`` line at the front of its message, as PALO was trained), and sent to a worker
as one ``/worker_generate_stream`` request whose ``stop`` is the template's stop string. Extra ``stop`` strings are
applied here, and the worker's stream is closed as soon as one appears. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with HTTP 400 (bad request), 401 (API key), 404 (unknown model),
502/503 (worker failures).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from palo.constants import DEFAULT_IMAGE_TOKEN, REMOTE_URL_SCHEMES, SEED_RANGE
from palo.conversation import MPT_SYSTEM_PREFIX, SeparatorStyle, conv_templates, stop_string
from palo.image_io import data_url_base64
from palo.serve.body_limit import CLIENT_CLOSED
from palo.serve.protocol import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST,
    OK,
    SMALLEST_TOP_P,
    STRUCTURED_FIELDS,
    decode_json_body,
    is_token_ids,
    parse_cache_salt,
    parse_logit_bias,
    parse_structured_output,
    shown,
    visible_text,
)
from palo.serve.routing import (
    NoWorkerError,
    Router,
    WorkerRegistry,
    WorkersBusyError,
    WorkerStream,
    WorkerUnreachableError,
)
from palo.serve.utils import StalledClientClosingResponse, bearer_matches, describe_error

DEFAULT_CONV_MODE = "vicuna_v1"
DEFAULT_MAX_TOKENS = 256  # the worker protocol's default
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for the legacy text completions
MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64  # the worker's limit
MAX_CHOICES = 16  # the most answers ("n") one request may ask for
MAX_COMPLETION_ANSWERS = 128  # the most answers one text completion request may ask for, over all its prompts


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI API's (``/v1/...``): its errors take OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return APIError(status, message, type_, param, code, headers).response()


class APIError(Exception):
    """An error returned in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


@dataclass
class GenerationRequest:
    """A validated chat or text completion request, as a prompt for the worker protocol."""

    model: str
    prompt: str
    images: list[str]
    temperature: float
    top_p: float
    max_tokens: int
    template_stop: str | None
    stops: list[str]
    stream: bool
    include_usage: bool
    seed: int | None = None
    n: int = 1
    top_k: int = 0  # 0: no limit
    penalties: dict[str, float] = field(default_factory=dict)  # only those that ask for something
    logprobs: int | None = None  # alternatives per token when log-probabilities are asked for
    prompt_token_ids: list[int] | None = None  # the prompt as token ids (then ``prompt`` is empty)
    echo: bool = False  # the answer's text (and logprobs) start with the prompt's
    prompt_logprobs: int | None = None  # the worker scores the prompt's tokens (for echo with logprobs)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias added to its logit
    shape: dict[str, Any] = field(default_factory=dict)  # the field that asks for a structured answer, as sent
    # vLLM's min_p, min_tokens, stop_token_ids, ignore_eos and cache_salt, those that ask for something
    extras: dict[str, Any] = field(default_factory=dict)
    _body: bytes | None = field(default=None, init=False, repr=False, compare=False)  # worker_body's shared part
    prompt_field: str = "messages"  # what the request's prompt was sent as (errors about it name it)
    # The answer continues the prompt's text (completions, a continued final message): its first word keeps its
    # space; a chat answer starts without one, as the original's.
    continuation: bool = False

    def param_of(self, field: Any) -> str | None:
        """The request parameter a worker's refusal is about, named as this request named it: the worker says
        ``prompt_token_ids`` or ``images`` for what came as ``prompt`` or ``messages``, ``max_new_tokens`` for
        ``max_tokens`` ... (None when the worker named none, or is of an earlier version)."""
        if not isinstance(field, str):
            return None
        if field in ("prompt", "prompt_token_ids", "images"):
            return self.prompt_field
        if field == "structured":
            return next(iter(self.shape), "response_format")
        return {"max_new_tokens": "max_tokens", "stops": "stop", "prompt_logprobs": "logprobs"}.get(field, field)

    def worker_body(self, choice: int = 0) -> bytes | tuple[bytes, ...]:
        """The worker request of answer ``choice`` (of ``n``), as JSON for :meth:`Router.open`.

        With a seed, answer i samples from ``seed + i`` (this project's workers sample reproducibly from it), so the
        answers differ and each is reproducible. What every answer shares (the prompt and its images) is encoded
        once and the same bytes are sent for each, its seed after them: n answers do not hold n copies of the
        images while they run.
        """
        if self._body is None:  # with a seed: without the closing brace, where each answer's seed goes
            whole = json.dumps(self._shared_params()).encode("utf-8")
            self._body = whole if self.seed is None else whole[:-1]
        if self.seed is None:
            return self._body
        return self._body, f', "seed": {self.seed + choice}}}'.encode()

    def _shared_params(self) -> dict[str, Any]:
        prompt: dict[str, Any] = ({"prompt": self.prompt} if self.prompt_token_ids is None else
                                  {"prompt_token_ids": self.prompt_token_ids})
        params = {
            "model": self.model,
            **prompt,
            "images": self.images,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_tokens,
            # Up to the context, as OpenAI's max_tokens (this project's workers otherwise cap it at the original's
            # 1024, and an answer asked for longer ended there as if at its limit); other workers ignore the field.
            "cap_max_new_tokens": False,
            "stop": self.template_stop,
        }
        if self.stops:  # this project's workers apply them (under min_tokens too); others ignore the field
            params["stops"] = self.stops
        if self.continuation:  # sent only when asked for, like the settings below
            params["continuation"] = True
        if self.top_k:
            params["top_k"] = self.top_k
        params.update(self.penalties)
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            params["prompt_logprobs"] = self.prompt_logprobs
        if self.logit_bias:  # sent only when it asks for something, like the penalties
            params["logit_bias"] = {str(token): bias for token, bias in self.logit_bias.items()}
        params.update(self.shape)
        params.update(self.extras)
        return params


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{key}' must be a number in [{low}, {high}], got {shown(value)}", param=key)
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits is <= inf, but no float
        raise APIError(400, f"'{key}' must be a number in [{low}, {high}], got an integer of {len(str(value))} "
                       "digits", param=key) from None


def image_part_data(part: dict) -> str:
    """An ``image_url`` part's image: its base64 data, or its http(s) URL."""
    if part.get("type") != "image_url":
        raise APIError(400, f"unsupported content part {str(part)[:80]}", param="messages")
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise APIError(400, "an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}",
                       param="messages")
    if url.lower().startswith(REMOTE_URL_SCHEMES):
        return url  # the worker fetches it if it runs with --allow-remote-images, and refuses it by name otherwise
    data = data_url_base64(url)
    if data is None:
        raise APIError(400, "image URLs must be base64 data URLs (data:image/png;base64,...) or http(s) URLs",
                       param="messages")
    return data


def _content(message: dict, index: int, images_allowed: bool,
             read_image: Callable[[dict], Any] = image_part_data) -> tuple[str, list[Any]]:
    """The text of a message and its images (what ``read_image`` makes of each image part: base64 by default),
    images first as ``<image>`` lines."""
    content = message.get("content")
    assistant = message.get("role") == "assistant"
    if content is None:
        if not assistant:  # OpenAI's: only an assistant message may come without content
            raise APIError(400, f"messages[{index}].content is required", param="messages")
        # An earlier answer that refused, sent back as it came: its words are what the assistant said.
        refusal = message.get("refusal")
        if not isinstance(refusal, str):
            return "", []
        _no_placeholder(refusal, index)
        return refusal, []
    if isinstance(content, str):
        _no_placeholder(content, index)
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts", param="messages")
    texts: list[str] = []
    images: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and assistant and isinstance(part.get("refusal"), str):  # OpenAI's assistant part
            texts.append(part["refusal"])
        elif kind in ("image_url", "image"):  # "image": the Python API's local images (palo.llm); the API refuses it
            if not images_allowed:
                raise APIError(400, f"messages[{index}]: only user messages can hold images", param="messages")
            try:
                images.append(read_image(part))
            except APIError as exc:
                raise APIError(400, f"messages[{index}]: {exc}", param="messages") from None
        else:
            raise APIError(400, f"messages[{index}]: unsupported content part {str(part)[:80]}", param="messages")
    text = "\n".join(texts)
    _no_placeholder(text, index)
    return (DEFAULT_IMAGE_TOKEN + "\n") * len(images) + text, images


def _no_placeholder(text: str, index: int) -> None:
    """Refuse ``<image>`` in a message's text: the prompt carries images as that text, so it would be taken for one
    (as in the original's and vLLM's LLaVA prompts), and the request failed with a count of placeholders its sender
    never wrote."""
    if DEFAULT_IMAGE_TOKEN in text:
        raise APIError(400, f"messages[{index}]: the text holds {DEFAULT_IMAGE_TOKEN!r}, which this model's prompts "
                            "keep for images; send each image as an image_url part (it goes before the text)",
                       param="messages")


def render_messages(messages: Any, conv_mode: str, continue_final: bool = False,
                    read_image: Callable[[dict], Any] = image_part_data) -> tuple[str, list[Any], str | None]:
    """Render OpenAI chat messages with a conversation template.

    Args:
        messages: The request's ``messages``.
        conv_mode: A key of :data:`palo.conversation.conv_templates`.
        continue_final: The last message is the assistant's, left open to be continued (vLLM's
            ``continue_final_message``): the prompt ends with its content, as the template renders an answer, without
            the separator that would close it (``... ASSISTANT: <content>`` in the Vicuna template).
        read_image: Makes an image part into the image to send (default: its base64 data, or an http(s) URL);
            raises :class:`APIError` for a part it does not take.

    Returns:
        ``(prompt, images in prompt order, the template's stop string)``.

    Consecutive messages of one role are one turn, their texts joined by a newline (the template alternates
    user and assistant turns).

    Raises:
        APIError: If the messages are malformed, do not start with the user (after an optional system message) or do
            not end with a user message (an assistant message with ``continue_final``), or the template cannot
            render them (a LLaMA-2 template needs text in the first user message).
    """
    try:
        return _render_messages(messages, conv_mode, continue_final, read_image)
    except ValueError as exc:  # the template's own refusal: the request's fault, not the server's
        raise APIError(400, f"the {conv_mode} template cannot render these messages: {exc}", param="messages") from None


def _render_messages(messages: Any, conv_mode: str, continue_final: bool,
                     read_image: Callable[[dict], Any]) -> tuple[str, list[Any], str | None]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    conv = conv_templates.get(conv_mode, conv_templates[DEFAULT_CONV_MODE]).copy()
    images: list[Any] = []
    last_role: str | None = None  # of the last turn: "user" or "assistant"
    turn: list[str] = []  # the last turn's texts and separators, joined once it is complete (linear in the messages)
    tail = ""  # the last non-empty text of the turn: whether the next needs a newline before it

    def close_turn() -> None:
        nonlocal tail
        if turn:
            conv.messages[-1][1] = "".join(turn)
            turn.clear()
        tail = ""

    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role in ("system", "developer"):
            if last_role is not None:
                raise APIError(400, "a system message may only come before the conversation's first turn",
                               param="messages")
            text, _ = _content(message, index, images_allowed=False)
            if index:  # a system and a developer message (as some clients send): one system prompt, a line each
                conv.system += "\n" + text
                continue
            prefix = MPT_SYSTEM_PREFIX if conv.sep_style is SeparatorStyle.MPT else ""
            conv.system = prefix + text
            continue
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{index}]: unsupported role {role!r}", param="messages")
        for key in ("tool_calls", "function_call"):  # rendered as an empty answer, the model would see none of it
            if message.get(key):
                raise APIError(400, f"messages[{index}]: '{key}' is not supported by this server (no tools)",
                               param="messages")
        if last_role is None and role != "user":
            raise APIError(400, f"messages[{index}]: the first message after the system message must be the user's",
                           param="messages")
        text, message_images = _content(message, index, images_allowed=role == "user", read_image=read_image)
        images.extend(message_images)
        if role == last_role:  # one turn in several messages (an image, then the question): joined by a newline
            turn.extend(("" if not tail or tail.endswith("\n") else "\n", text))
            tail = text or tail
            continue
        close_turn()
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], text)
        turn.append(text)
        tail = text
        last_role = role
    close_turn()
    if continue_final:
        if last_role != "assistant":
            raise APIError(400, "with 'continue_final_message' the last message must be an assistant message",
                           param="messages")
        segments = conv.get_prompt_segments()
        answer = conv.messages[-1][1]
        if not answer:  # an empty answer is an open assistant turn
            conv.messages[-1][1] = None
            return conv.get_prompt(), images, stop_string(conv)
        # The last piece is the answer as rendered (after the template's space, if any) and the separator that
        # closes it: keep it up to the answer's end.
        last = segments[-1][0]
        end = last.index(answer) + len(answer)
        return "".join(text for text, _ in segments[:-1]) + last[:end], images, stop_string(conv)
    if last_role != "user":
        raise APIError(400, "the last message must be a user message", param="messages")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), images, stop_string(conv)


MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and the engine's
# A request's later answers wait this long for places on busy workers (its first is refused at once), asking again
# every BUSY_POLL_S.
BUSY_WAIT_S = 30.0
BUSY_POLL_S = 0.1
DISCONNECT_POLL_S = 0.25  # how often a request gathering a whole answer checks that its client is still there
READER_STOP_GRACE_S = 5.0  # how long an answer's reader may take to end once its worker stream was closed
PENALTY_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}

# Features of the chat API this server does not implement, each with the values that ask for nothing: a request that
# asks for one gets a 400 naming it, instead of an answer that silently lacks it (no tools, no audio ...).
NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "web_search_options": lambda v: v is None,  # any object, even {}, asks for a web search first
}


def _model(body: Any, not_implemented: dict[str, Callable[[Any], bool]]) -> str:
    """The requested model, once the body is an object that asks for nothing this server lacks."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required and must be a non-empty string", param="model")
    for key, asks_nothing in not_implemented.items():
        if key in body and not asks_nothing(body[key]):
            raise APIError(400, f"'{key}' is not supported by this server (got {str(body[key])[:80]})", param=key)
    return model


INT32_MAX = 2**31 - 1


def _generation_fields(body: dict, default_max_tokens: int, least_max_tokens: int = 1) -> dict[str, Any]:
    """The sampling and streaming fields both endpoints take, validated (:class:`GenerationRequest` keywords)."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be an integer from 1 to {MAX_CHOICES}, got {n!r}", param="n")
    # The newer name wins; null is "not given" for each (OpenAI's schema), as in vLLM.
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < least_max_tokens:
        floor = "a positive integer" if least_max_tokens else "an integer >= 0"
        raise APIError(400, f"'{max_key}' must be {floor}, got {shown(max_tokens)}", param=max_key)
    # Any larger count means "up to the context" (the worker caps it there); past 2**31 it need not be carried,
    # and at hundreds of digits the worker's number parsing could not.
    max_tokens = min(max_tokens, INT32_MAX)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} strings", param="stop")
    stream = body.get("stream")
    if stream is None:  # null: not given (OpenAI's schema allows it)
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {body['stream']!r}", param="stream")
    options = body.get("stream_options")
    if options is not None:  # OpenAI's rules: an object, and only with a stream
        if not stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool | None):
            raise APIError(400, f"'stream_options' must be {{'include_usage': true | false}}, got {options!r}",
                           param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"'seed' must be a 64-bit signed integer, got {seed!r}", param="seed")
    # Not OpenAI's, but vLLM's and SGLang's (-1 or 0: no limit), which clients send in the body's extra fields.
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise APIError(400, f"'top_k' must be a positive integer, or 0 or -1 for no limit, got {shown(top_k)}",
                       param="top_k")
    top_k = min(top_k, INT32_MAX)  # beyond the vocabulary it keeps every candidate, whatever its size
    # OpenAI's two in [-2, 2], and vLLM's and SGLang's repetition penalty (> 0; transformers' rule over the prompt's
    # text and the answer). Only those that ask for something are sent, so a worker that lacks them sees no change.
    penalties = {key: _number(body, key, PENALTY_DEFAULTS[key], low, high)
                 for key, (low, high) in (("presence_penalty", (-2.0, 2.0)), ("frequency_penalty", (-2.0, 2.0)),
                                          ("repetition_penalty", (0.0, math.inf)))}
    if penalties["repetition_penalty"] == 0:
        raise APIError(400, "'repetition_penalty' must be > 0, got 0", param="repetition_penalty")
    # vLLM's further sampling settings, sent to the worker only when they ask for something.
    extras: dict[str, Any] = {}
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    if min_p:
        extras["min_p"] = min_p
    min_tokens = body.get("min_tokens")
    if min_tokens is not None:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
            raise APIError(400, f"'min_tokens' must be an integer from 0 to max_tokens ({max_tokens}), got "
                                f"{min_tokens!r}", param="min_tokens")
        if min_tokens:
            extras["min_tokens"] = min_tokens
    ignore_eos = body.get("ignore_eos")  # what vLLM's and SGLang's serving benchmarks send for fixed lengths
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise APIError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    if ignore_eos:
        extras["ignore_eos"] = True
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        if not is_token_ids(stop_token_ids, max_len=MAX_STOP_TOKEN_IDS, empty=True):
            raise APIError(400, f"'stop_token_ids' must be a list of up to {MAX_STOP_TOKEN_IDS} token ids",
                           param="stop_token_ids")
        if stop_token_ids:
            extras["stop_token_ids"] = stop_token_ids
    try:  # vLLM's: which requests may share cached prompt blocks and image features with this one
        cache_salt = parse_cache_salt(body.get("cache_salt"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="cache_salt") from None
    if cache_salt is not None:
        extras["cache_salt"] = cache_salt
    try:  # ids are checked against the model's vocabulary by its worker
        logit_bias = parse_logit_bias(body.get("logit_bias"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="logit_bias") from None
    try:  # whether a schema or pattern compiles is the worker's to say (it compiles it)
        _, shape_field = parse_structured_output(body)
    except ValueError as exc:
        raise APIError(400, str(exc), param=next(k for k in STRUCTURED_FIELDS if body.get(k) is not None)) from None
    shape_key = None if shape_field is None else shape_field.split(".")[0]
    return dict(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or SMALLEST_TOP_P,
        max_tokens=max_tokens,
        stops=[s for s in stops if s],
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        seed=seed,
        n=n,
        top_k=top_k,
        penalties={key: value for key, value in penalties.items() if value != PENALTY_DEFAULTS[key]},
        logit_bias=logit_bias,
        extras=extras,
        shape={} if shape_key is None else {shape_key: body[shape_key]},
    )


def _alternatives(body: dict, key: str) -> int | None:
    """``body[key]`` as a count of log-probability alternatives (0 to 20), or None when absent."""
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"'{key}' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {value!r}", param=key)
    return value


def parse_chat_request(body: Any, conv_mode_for: Callable[[str], str | None]) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body.

    Args:
        body: The decoded JSON body.
        conv_mode_for: ``model -> conversation template`` (None: the PALO default).

    Raises:
        APIError: For malformed requests.
    """
    model = _model(body, NOT_IMPLEMENTED)
    fields = _generation_fields(body, DEFAULT_MAX_TOKENS)
    flags = {}
    for key, default in (("continue_final_message", False), ("add_generation_prompt", True)):
        value = body.get(key, default)
        if not isinstance(value, bool):
            raise APIError(400, f"'{key}' must be true or false, got {value!r}", param=key)
        flags[key] = value
    if flags["continue_final_message"] == flags["add_generation_prompt"]:
        raise APIError(400, "set 'continue_final_message' true together with 'add_generation_prompt' false (to "
                            "continue the last assistant message), or neither", param="add_generation_prompt")
    prompt, images, template_stop = render_messages(body.get("messages"), conv_mode_for(model) or DEFAULT_CONV_MODE,
                                                    continue_final=flags["continue_final_message"])
    prompt_logprobs = _alternatives(body, "prompt_logprobs")
    if prompt_logprobs is not None and fields["stream"]:
        raise APIError(400, "'prompt_logprobs' is not supported with 'stream'", param="prompt_logprobs")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise APIError(400, f"'logprobs' must be true or false, got {logprobs!r}", param="logprobs")
    top_logprobs = _alternatives(body, "top_logprobs")
    if top_logprobs and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return GenerationRequest(model=model, prompt=prompt, images=images, template_stop=template_stop,
                             logprobs=(top_logprobs or 0) if logprobs else None, prompt_logprobs=prompt_logprobs,
                             continuation=flags["continue_final_message"], **fields)


# The legacy text completion's features this server does not implement, with the values that ask for nothing.
COMPLETION_NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "suffix": lambda v: not v,
}


def _prompts(value: Any) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each a non-empty string or list of token ids (OpenAI's four forms)."""
    if isinstance(value, str) or is_token_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or is_token_ids(p) for p in value):
        prompts = value
    else:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                       param="prompt")
    if any(p == "" for p in prompts):
        raise APIError(400, "a prompt must not be empty", param="prompt")
    return prompts


def parse_completion_request(body: Any) -> list[GenerationRequest]:
    """Validate a ``/v1/completions`` body: one request per prompt, each sent to the model as it is (no template, no
    images: a prompt with ``<image>`` placeholders is refused by the worker; token ids go as they are, no BOS
    added), ``logprobs`` as the count of alternatives per token, ``echo`` the prompt (and its scored tokens) before
    the answer.

    Raises:
        APIError: For malformed requests.
    """
    model = _model(body, COMPLETION_NOT_IMPLEMENTED)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be true or false, got {echo!r}", param="echo")
    fields = _generation_fields(body, DEFAULT_COMPLETION_MAX_TOKENS, least_max_tokens=0 if echo else 1)
    prompts = _prompts(body.get("prompt"))
    if len(prompts) * fields["n"] > MAX_COMPLETION_ANSWERS:
        raise APIError(400, f"{len(prompts)} prompts x n={fields['n']} answers is over the limit of "
                            f"{MAX_COMPLETION_ANSWERS} per request", param="prompt")
    best_of = body.get("best_of")
    if best_of is not None and best_of != fields["n"]:
        raise APIError(400, f"'best_of' is not supported by this server unless it equals n (got {best_of!r})",
                       param="best_of")
    logprobs = _alternatives(body, "logprobs")
    # The worker scores the prompt only for an echo that shows logprobs, or that generates nothing (a worker
    # generates nothing only for a request that scores its prompt).
    prompt_logprobs = logprobs if echo and logprobs is not None else 0 if echo and not fields["max_tokens"] else None
    return [GenerationRequest(model=model, prompt=p if isinstance(p, str) else "", images=[], template_stop=None,
                              logprobs=logprobs, prompt_token_ids=None if isinstance(p, str) else p,
                              echo=bool(echo), prompt_logprobs=prompt_logprobs, prompt_field="prompt",
                              continuation=True, **fields)
            for p in prompts]


@dataclass
class Piece:
    """An answer so far, as read from its worker stream.

    Attributes:
        text: The text to show (cut at a user stop string).
        finish: ``finish_reason`` on the last piece, else None.
        usage: The worker's token counts, on its last chunk.
        logprobs: Per token so far, OpenAI's ``logprobs.content`` items (when the request asked for them).
        prompt_logprobs: The worker's entry for each prompt token (with its ``id``), once it sent them.
    """

    text: str
    finish: str | None = None
    usage: dict | None = None
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] | None = None


async def _answers(stream: WorkerStream, chat: GenerationRequest, logger: logging.Logger) -> AsyncIterator[Piece]:
    """The answer so far, ending early at a user stop string.

    The worker's error chunks and a broken stream become :class:`APIError`, as does a worker that sends no
    log-probabilities when they were asked for. The worker stream is closed when this ends, however it ends; closing
    it early (at a user stop string) also stops the worker generating. With ``echo`` the text starts with the
    prompt's, and the log-probabilities with the prompt's tokens.
    """
    shown = ""
    logprobs: list[dict] = []
    answer_entries = 0  # of which the answer's
    prompt = chat.prompt  # what the worker's text starts with (for token ids: their text, in its first chunk)
    prompt_entries: list[dict] | None = None
    final: Piece | None = None
    usage: dict | None = None
    try:
        async for obj in stream.chunks():
            if final is not None:
                continue  # read to the body's end, so that the connection goes back to the pool for the next request
            error_type = obj.get("error_type")
            if error_type == CONTEXT_LENGTH_EXCEEDED:
                raise APIError(400, f"the prompt is too long: {obj.get('detail', '')}".strip(),
                               code="context_length_exceeded", param=chat.prompt_field)
            if obj.get("error_code", OK) != OK:
                if error_type == INVALID_REQUEST:
                    field, param = obj.get("param"), chat.param_of(obj.get("param"))
                    message = str(obj.get("text"))
                    if param is not None and param != field:  # named as the client named it: 'prompt', not the
                        message = message.replace(f"'{field}'", f"'{param}'")  # worker's 'prompt_token_ids'
                    raise APIError(400, message, param=param)
                raise APIError(502, f"the model worker failed: {obj.get('text')}", type_="server_error")
            if isinstance(obj.get("prompt"), str):
                prompt = obj["prompt"]
            text = str(obj.get("text", ""))
            text = text[len(prompt):] if text.startswith(prompt) else text
            # This project's workers send usage so far in every chunk, others in the last only: keep the latest.
            finish, usage = obj.get("finish_reason"), obj.get("usage") or usage
            if "prompt_logprobs" in obj and prompt_entries is None:
                prompt_entries = list(obj["prompt_logprobs"] or [])
            if chat.logprobs is not None:
                # One growing list per answer: each piece is used before the next chunk is read, and its readers
                # track how many entries they have passed on. An echo's prompt entries come first, in the first
                # chunk.
                if chat.echo and "prompt_logprobs" in obj:
                    logprobs.extend(prompt_entries or [])
                new = obj.get("logprobs") or []
                logprobs.extend(new)
                answer_entries += len(new)
            # The worker ends the answer at the client's stop strings; cutting at them again changes nothing, and
            # serves a worker that does not take them, except under min_tokens, where one may stand in the first
            # tokens (such a worker ignores min_tokens too).
            shown, stopped = visible_text(text, () if chat.extras.get("min_tokens") else chat.stops,
                                          final=finish is not None)
            if chat.echo:
                shown = prompt + shown
            if stopped:  # closing the stream now stops the worker generating
                yield Piece(shown, "stop", usage, logprobs, prompt_entries)
                return
            if finish is not None:
                tokens = (usage or {}).get("completion_tokens")
                if chat.prompt_logprobs is not None and not prompt_entries:
                    raise APIError(502, f"the model worker {stream.worker} sent no log-probabilities for the prompt "
                                        "(a worker of an earlier version sends none)", type_="server_error")
                if chat.logprobs is not None and (answer_entries != tokens if tokens is not None else
                                                  shown and not answer_entries):
                    raise APIError(502, f"the model worker {stream.worker} sent log-probabilities for {answer_entries}"
                                        f" of {tokens or 'its'} tokens (a worker of an earlier version sends none)",
                                   type_="server_error")
                final = Piece(shown, finish, usage, logprobs, prompt_entries)
                continue
            yield Piece(shown, None, usage, logprobs, prompt_entries)
        # No final chunk: the worker ended without one.
        yield final or Piece(shown, "stop", None, logprobs, prompt_entries)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken worker stream must become an API error, not a crash
        if not stream.stopped:
            logger.exception("stream from worker %s failed", stream.worker)
        raise APIError(502, f"the model worker failed: {describe_error(exc)}", type_="server_error") from None
    finally:
        await stream.aclose()


def _usage(usages: list[dict | None], n: int = 1, details: bool = False) -> dict[str, Any]:
    """Usage of a request's answers (``n`` per prompt, prompt by prompt): each prompt once (its answers have the
    same), the answers' tokens summed.

    With ``details`` (the server's ``--enable-prompt-tokens-details``), ``prompt_tokens_details.cached_tokens``:
    per prompt, the prompt positions its answers read from the prefix cache instead of computing (the least over its
    ``n`` answers: the later ones find the first one's blocks), summed over the prompts. Left out when a worker did
    not say (a backend that does not report it).
    """
    groups = [[u or {} for u in usages[first:first + n]] for first in range(0, len(usages), n)]
    prompt = sum(max((int(u.get("prompt_tokens", 0)) for u in group), default=0) for group in groups)
    completion = sum(int((u or {}).get("completion_tokens", 0)) for u in usages)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if details and usages and all("cached_tokens" in u for group in groups for u in group):
        usage["prompt_tokens_details"] = {"cached_tokens": sum(min(int(u["cached_tokens"]) for u in group)
                                                               for group in groups)}
    return usage


def check_api_key(authorization: str, api_key: str | None) -> None:
    """Accept ``Authorization: Bearer <api_key>`` (anything when no key is configured).

    Raises:
        APIError: 401 for a missing or wrong key.
    """
    if api_key and not bearer_matches(authorization, api_key):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")


def list_models(registry: WorkerRegistry, authorization: str, api_key: str | None,
                model: str | None = None) -> Response:
    """The ``GET /v1/models`` answer, or with ``model`` the ``GET /v1/models/{model}`` one (404 when not served)."""
    try:
        check_api_key(authorization, api_key)
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "palo"} for m in registry.list_models()]
        if model is None:
            return JSONResponse({"object": "list", "data": data})
        for entry in data:
            if entry["id"] == model:
                return JSONResponse(entry)
        raise APIError(404, f"the model {model!r} does not exist or has no live worker; available: "
                            f"{[entry['id'] for entry in data]}", param="model", code="model_not_found")
    except APIError as exc:
        return exc.response()


async def open_chat(chat: GenerationRequest, registry: WorkerRegistry, router: Router, choice: int = 0,
                    busy_until: float | None = None) -> WorkerStream:
    """Send a request (its answer ``choice``) to a worker of its model.

    Args:
        busy_until: While every worker is busy, ask again every ``BUSY_POLL_S`` until this ``time.monotonic``
            moment (None: refuse at once).

    Raises:
        APIError: 404 when no live worker serves the model, 503 (with ``Retry-After`` when the workers are busy)
            when none answers.
    """
    body = chat.worker_body(choice)
    while True:
        try:
            return await router.open(chat.model, body)
        except NoWorkerError:
            raise APIError(404, f"the model {chat.model!r} does not exist or has no live worker; available: "
                                f"{registry.list_models()}", param="model", code="model_not_found") from None
        except WorkerUnreachableError as exc:
            left = 0.0 if busy_until is None else busy_until - time.monotonic()
            if isinstance(exc, WorkersBusyError) and left > 0:
                await asyncio.sleep(min(BUSY_POLL_S, left))
                continue
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            raise APIError(503, str(exc), type_="server_error", headers=headers) from None


class ChatShape:
    """How a chat completion is written: ``chat.completion`` objects, ``delta`` chunks, ``logprobs.content``."""

    whole_object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def chunk(self, index: int, text: str, finish: str | None, logprobs: list[dict] | None) -> dict:
        choice: dict[str, Any] = {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs, "refusal": None}
        return choice

    def whole(self, index: int, piece: Piece, logprobs: list[dict] | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": piece.text},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": piece.finish or "stop"}

    def whole_extras(self, request: GenerationRequest, first: Piece) -> dict:
        """vLLM's ``prompt_logprobs`` and ``prompt_token_ids`` when the prompt was scored."""
        if request.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": [_vllm_prompt_logprob(e) for e in first.prompt_logprobs or []],
                "prompt_token_ids": [e.get("id") for e in first.prompt_logprobs or []]}


class CompletionShape:
    """How a legacy text completion is written: ``text_completion`` objects and the legacy ``logprobs`` lists
    (``tokens``, ``token_logprobs``, ``top_logprobs`` as ``{token: logprob}``, ``text_offset``), continued across
    an answer's chunks."""

    whole_object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self) -> None:
        # Per answer: the characters its tokens so far decode to, a decoder holding the bytes of a character that a
        # token began and the next ends, and how many of those characters come before the text (see _lead).
        self._offsets: dict[int, int] = {}
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        self._leads: dict[int, int] = {}

    def _legacy(self, index: int, text: str, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None
        if index not in self._leads:
            self._leads[index] = _lead(text, entries)
        lead = self._leads[index]
        decoder = self._decoders.setdefault(index, codecs.getincrementaldecoder("utf-8")("replace"))
        offsets = []
        for entry in entries:
            # A character offset into the text: a token's text counts its characters, and a token with part of a
            # character (its ``token`` spells the bytes as "\\xe0") counts the character once, where it is whole.
            spelt = self._offsets.get(index, 0)
            offsets.append(max(0, spelt - lead))
            self._offsets[index] = spelt + len(decoder.decode(_token_bytes(entry)))
        # An echoed prompt's first token (and an image placeholder) has no probability: null, as OpenAI's and vLLM's.
        # The token's own log-probability is always among its alternatives ("up to logprobs+1 elements", OpenAI's
        # reference; vLLM's too), also with logprobs 0.
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top_logprobs"] is None else
                                 {**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                                 for e in entries],
                "text_offset": offsets}

    def opening(self, index: int) -> dict | None:
        return None

    def chunk(self, index: int, text: str, finish: str | None, logprobs: list[dict] | None) -> dict:
        return {"index": index, "text": text, "logprobs": self._legacy(index, text, logprobs), "finish_reason": finish}

    def whole(self, index: int, piece: Piece, logprobs: list[dict] | None) -> dict:
        return {"index": index, "text": piece.text, "logprobs": self._legacy(index, piece.text, logprobs),
                "finish_reason": piece.finish or "stop"}

    def whole_extras(self, request: GenerationRequest, first: Piece) -> dict:
        return {}  # an echo carries the prompt's scores in each choice's logprobs


def _lead(text: str, entries: list[dict]) -> int:
    """How many characters the first tokens spell before where the text begins: an echoed prompt's tokens start
    with the BOS token (``<s>``) and SentencePiece's space before the first word, neither of which is in the text,
    so without this every ``text_offset`` of an echo pointed 4 characters past its token. 0 when the tokens spell
    the text from its start (an answer), or when the text's start is not found among them."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    spelt = "".join(decoder.decode(_token_bytes(entry)) for entry in entries)
    probe = text[:16]
    if not probe or spelt.startswith(probe):
        return 0
    return max(0, spelt.find(probe))


def _token_bytes(entry: dict) -> bytes:
    """A log-probability entry's token as bytes: its ``bytes`` (a backend may send none, or ones that are not)."""
    with contextlib.suppress(TypeError, ValueError):
        if entry.get("bytes") is not None:
            return bytes(entry["bytes"])
    return str(entry["token"]).encode("utf-8", "surrogatepass")


def _vllm_prompt_logprob(entry: dict) -> dict | None:
    """A prompt token's entry as vLLM's ``prompt_logprobs`` items: ``{token id: {logprob, rank, decoded_token}}``,
    the prompt's own token first and then the most likely ones (rank 1 ...; the own token's rank is null when it is
    not among them); None for the first token and an image placeholder."""
    if entry.get("logprob") is None:
        return None
    ranked = {str(top["id"]): {"logprob": top["logprob"], "rank": rank, "decoded_token": top["token"]}
              for rank, top in enumerate(entry.get("top_logprobs") or [], 1)}
    own = str(entry["id"])
    return {own: ranked.pop(own, {"logprob": entry["logprob"], "rank": None, "decoded_token": entry["token"]}),
            **ranked}


Shape = ChatShape | CompletionShape


class AnswerReader:
    """Reads one answer's pieces from its worker as they come, keeping the newest (a piece holds the whole answer
    so far), so that no answer's worker ever waits on this process.

    Reading a request's answers one after another deadlocked when they outnumbered the worker's free places: the
    later answers waited for places held by earlier ones, which could not finish while nobody read them (their
    streams stalled until the worker dropped them, 60 s later). Answers of one request, and prompts of one text
    completion, now all read at once.

    Args:
        stream: The answer's worker stream; the reader owns it and closes it.
        chat: The request it answers.
        logger: Where a broken stream is logged.
        changed: Set whenever this (or another answer of the same request) has something new.
    """

    def __init__(self, stream: WorkerStream, chat: GenerationRequest, logger: logging.Logger,
                 changed: asyncio.Event) -> None:
        self.changed = changed
        self._stream = stream
        self._newest: Piece | None = None
        self._taken: Piece | None = None
        self._error: BaseException | None = None
        self._started = asyncio.Event()  # a first piece came, or the answer ended without one
        self._done = asyncio.Event()
        self._ran = False
        self._closing: asyncio.Future | None = None
        self._task = asyncio.ensure_future(self._read(_answers(stream, chat, logger)))
        self._task.add_done_callback(self._close_unread)

    def _close_unread(self, task: asyncio.Future) -> None:
        # Cancelled before its first step (the event loop shut down): _answers never ran, so neither did its closing
        # of the worker stream, which would generate for nobody.
        if not self._ran:
            self._started.set()
            self._done.set()
            self.changed.set()
            self.cancel()

    async def _read(self, pieces: AsyncIterator[Piece]) -> None:
        self._ran = True
        try:
            async for piece in pieces:
                self._newest = piece
                self._started.set()
                self.changed.set()
        except Exception as exc:  # noqa: BLE001 - handed to whoever takes the answer's pieces
            self._error = exc
        finally:
            self._started.set()
            self._done.set()
            self.changed.set()
            await pieces.aclose()  # type: ignore[attr-defined]  # an async generator

    def take(self) -> Piece | None:
        """The newest piece if it is newer than the last one taken, else None.

        The piece's ``logprobs`` (a list the answer keeps extending) hold exactly its tokens' entries as long as the
        caller uses it before its next ``await``: the reader stores a piece at once after extending them.

        Raises:
            Exception: The answer's error (an :class:`APIError`), once every piece before it was taken.
        """
        if self._newest is not self._taken:
            self._taken = self._newest
            return self._taken
        if self._error is not None:
            raise self._error
        return None

    async def first(self) -> Piece:
        """Wait for the answer's first piece.

        Raises:
            Exception: The answer's error, when it failed before its first piece.
        """
        await self._started.wait()
        if self._newest is None:  # _answers always yields a piece before it ends, unless it failed
            raise self._error or APIError(502, "the model worker sent nothing", type_="server_error")
        return self._newest

    async def last(self) -> Piece:
        """Wait for the answer's end; its last piece."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._newest is not None  # _answers ends with a piece unless it failed
        return self._newest

    def cancel(self) -> None:
        """Stop reading: the worker stream is closed, which stops its generation, and the reader ends on it.

        The stream is closed in a task of its own that nothing cancels, never by cancelling the reader: the reader
        may be inside httpx's closing of the response at the body's end, and a cancellation landing there cut
        httpcore's clean-up short (its shield does not hold against ``Task.cancel``), so the router's pool kept the
        connection and its socket for good; the controller's open files grew with every such client that left.

        Synchronous, so that cleanup running inside a cancelled scope (a client that left) still stops every
        answer of the request.
        """
        if self._closing is None:
            self._stream.stopped = True
            self._closing = asyncio.ensure_future(self._stop())

    async def _stop(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            # The reader's pending read fails on the closed connection and it ends by itself. Had it been closing
            # the response at that moment, that close is its own and ends too; only a reader that notices nothing
            # within the grace is cancelled, safely now that the pool has the connection back.
            if not self._task.done():
                await asyncio.wait({self._task}, timeout=READER_STOP_GRACE_S)
                self._task.cancel()

    async def closed(self) -> None:
        """Wait until the reader has stopped (its worker stream closed)."""
        if self._closing is not None:
            await asyncio.wait({self._closing})
        await asyncio.wait({self._task})  # its end is not raised here


def _cancel_all(answers: list[AnswerReader]) -> None:
    for answer in answers:
        answer.cancel()


async def _close_all(answers: list[AnswerReader]) -> None:
    """Stop every answer and wait until their worker streams are closed (where the caller's task may still wait:
    not inside a cancelled scope, where :func:`_cancel_all` is all there is)."""
    _cancel_all(answers)
    for answer in answers:
        await answer.closed()


class _AnswerStream(StalledClientClosingResponse):
    """The streamed completion's response: a client that reads nothing for ``WRITE_TIMEOUT_S`` is dropped (the
    answers are read from their workers whatever the client does, so the worker no longer sees the stall), and the
    answers stop however the response ends, also when the client left before its first event."""

    def __init__(self, events: AsyncIterator[bytes], answers: list[AnswerReader], logger: logging.Logger) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                         logger=logger)
        self.answers = answers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the stream never started: a client that left at once cancels it before its first step
            _cancel_all(self.answers)


async def _sse_events(answers: list[AnswerReader], request: GenerationRequest, shape: Shape, completion_id: str,
                      created: int, details: bool = False) -> AsyncIterator[bytes]:
    """The streamed completion: per answer its opening chunk (chat: the role), content chunks and its finish
    chunk (each chunk carrying its answer's ``index``, answers interleaved as their text comes), then the optional
    usage and ``[DONE]``.

    With log-probabilities asked for, each content chunk carries those of the tokens that arrived since the last
    one; tokens whose text is still held back (half a character, a possible stop string) go with a later chunk,
    and any left at the end with the finish chunk.

    Args:
        answers: The request's answers, each read since it was opened (:func:`_open_answers`).
        details: Whether the usage chunk carries ``prompt_tokens_details`` (see :func:`_usage`).

    An error after the first piece can no longer change the HTTP status; it is sent as an ``{"error": ...}`` event.
    """

    def event(choice: dict | None, usage: dict | None = None) -> bytes:
        chunk: dict[str, Any] = {"id": completion_id, "object": shape.chunk_object, "created": created,
                                 "model": request.model, "choices": [] if choice is None else [choice]}
        if usage is not None or request.include_usage:
            # OpenAI: with include_usage "all other chunks will also include a usage field, but with a null value"
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"

    for index in range(len(answers)):
        opening = shape.opening(index)
        if opening is not None:
            yield event(opening)
    sent = [""] * len(answers)
    sent_logprobs = [0] * len(answers)
    usages: list[dict | None] = [None] * len(answers)
    unfinished = list(range(len(answers)))
    changed = answers[0].changed  # shared by the request's answers

    def new_logprobs(index: int, piece: Piece) -> list[dict] | None:
        if request.logprobs is None:
            return None
        new, sent_logprobs[index] = piece.logprobs[sent_logprobs[index]:], len(piece.logprobs)
        return new

    try:
        while unfinished:
            changed.clear()  # before looking: what comes while the chunks below are sent sets it again
            for index in list(unfinished):
                piece = answers[index].take()
                if piece is None:
                    continue
                # Both chunks are built before the first is sent: after an await the answer's logprobs list may
                # hold entries of a newer piece.
                chunks = []
                if piece.text.startswith(sent[index]) and len(piece.text) > len(sent[index]):
                    chunks.append(shape.chunk(index, piece.text[len(sent[index]):], None, new_logprobs(index, piece)))
                    sent[index] = piece.text
                if piece.finish is not None:
                    usages[index] = piece.usage
                    chunks.append(shape.chunk(index, "", piece.finish, new_logprobs(index, piece) or None))
                    unfinished.remove(index)
                for chunk in chunks:
                    yield event(chunk)
            if unfinished and not changed.is_set():
                await changed.wait()
    except APIError as exc:
        yield b"data: " + json.dumps(exc.body, ensure_ascii=False).encode("utf-8") + b"\n\n"
        return
    finally:
        _cancel_all(answers)
    if request.include_usage:
        yield event(None, usage=_usage(usages, request.n, details))
    yield b"data: [DONE]\n\n"


async def _open_answers(requests: list[GenerationRequest], registry: WorkerRegistry,
                        router: Router) -> list[AnswerReader]:
    """Open each request's ``n`` answers on workers (request by request: answer ``i`` of prompt ``p`` is choice
    ``p * n + i``, as OpenAI numbers them), each read from as soon as it is open, and wait for the first piece of
    each.

    A busy worker refuses the first answer at once (503, so the client backs off); the later ones wait up to
    ``BUSY_WAIT_S`` for places, which the answers already placed free as they finish. Refusing them instead made
    requests that arrive together each hold some places and all fail, over and over as their clients retried.

    Raises:
        APIError: When any answer cannot be opened or fails before its first piece (the first such in choice order;
            the others are closed).
    """
    changed = asyncio.Event()
    answers: list[AnswerReader] = []
    deadline: float | None = None
    try:
        for chat in requests:
            for choice in range(chat.n):
                stream = await open_chat(chat, registry, router, choice, busy_until=deadline)
                answers.append(AnswerReader(stream, chat, registry.logger, changed))
                if deadline is None:
                    deadline = time.monotonic() + BUSY_WAIT_S
        firsts = await asyncio.gather(*(answer.first() for answer in answers), return_exceptions=True)
        for first in firsts:
            if isinstance(first, BaseException):
                raise first
        return answers
    except BaseException:
        await _close_all(answers)
        raise


T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


async def _unless_gone(work: Awaitable[T], disconnected: Callable[[], Awaitable[bool]] | None) -> T:
    """``await work``, cancelled (and :class:`ClientGone` raised) once ``disconnected()`` says the client left.

    A streamed answer stops with its client by itself (the server cancels the stream); a whole answer is gathered
    here first, and without this its workers went on generating for nobody until every answer was complete.
    """
    if disconnected is None:
        return await work
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone


async def _lasts(answers: list[AnswerReader]) -> list[Piece]:
    """Every answer's last piece, in order; the first answer to fail raises its error at once.

    Gathering them all first held an early failure until the slowest answer was complete: the client waited for
    an error, and that answer was generated in full for nobody (a streamed request already ends at the error).
    """
    waits = [asyncio.ensure_future(answer.last()) for answer in answers]
    try:
        for done in asyncio.as_completed(waits):
            await done
    finally:
        for wait in waits:
            wait.cancel()  # only the waits (on an event); the caller stops the answers themselves
    return [wait.result() for wait in waits]


async def _complete(body: bytes, authorization: str, registry: WorkerRegistry, router: Router,
                    api_key: str | None, parse: Callable[[Any], list[GenerationRequest]], shape: Shape,
                    disconnected: Callable[[], Awaitable[bool]] | None = None, details: bool = False) -> Response:
    """A completion in ``shape``: JSON, or server-sent events when ``stream`` is set.

    Errors before the first piece of the answer get their HTTP status (:class:`APIError`); the worker is asked
    only once the request is valid. ``disconnected`` (the request's ``is_disconnected``) stops the workers of a
    client that left before its whole answer was ready. ``details``: usage with ``prompt_tokens_details``.
    """
    try:
        check_api_key(authorization, api_key)
        try:
            decoded = decode_json_body(body)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        requests = parse(decoded)
        answers = await _unless_gone(_open_answers(requests, registry, router), disconnected)
    except APIError as exc:
        return exc.response()
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)

    request = requests[0]  # the settings all of them share (model, stream, n, logprobs)
    completion_id = shape.id_prefix + uuid.uuid4().hex
    created = int(time.time())
    if request.stream:
        return _AnswerStream(_sse_events(answers, request, shape, completion_id, created, details), answers,
                             registry.logger)
    try:
        finals = await _unless_gone(_lasts(answers), disconnected)
    except ClientGone:
        await _close_all(answers)  # closes each worker stream, which stops its generation
        return Response(status_code=CLIENT_CLOSED)
    except APIError as exc:  # one answer failed: the others are not wanted any more
        await _close_all(answers)
        return exc.response()
    except BaseException:
        _cancel_all(answers)
        raise
    return JSONResponse({
        "id": completion_id, "object": shape.whole_object, "created": created, "model": request.model,
        "choices": [shape.whole(index, piece, None if request.logprobs is None else piece.logprobs)
                    for index, piece in enumerate(finals)],
        "usage": _usage([piece.usage for piece in finals], request.n, details),
        **shape.whole_extras(request, finals[0]),
    })


async def chat_completion(body: bytes, authorization: str, registry: WorkerRegistry, router: Router,
                          api_key: str | None, disconnected: Callable[[], Awaitable[bool]] | None = None,
                          prompt_tokens_details: bool = False) -> Response:
    """The ``POST /v1/chat/completions`` answer: a JSON completion, or server-sent events when ``stream`` is set."""
    return await _complete(body, authorization, registry, router, api_key,
                           lambda decoded: [parse_chat_request(decoded, registry.conv_mode)], ChatShape(),
                           disconnected, prompt_tokens_details)


async def text_completion(body: bytes, authorization: str, registry: WorkerRegistry, router: Router,
                          api_key: str | None, disconnected: Callable[[], Awaitable[bool]] | None = None,
                          prompt_tokens_details: bool = False) -> Response:
    """The ``POST /v1/completions`` answer (OpenAI's legacy text completions, as vLLM and SGLang serve them)."""
    return await _complete(body, authorization, registry, router, api_key, parse_completion_request,
                           CompletionShape(), disconnected, prompt_tokens_details)


def create_openai_router(registry: WorkerRegistry, router: Router, api_key: str | None = None,
                         prompt_tokens_details: bool = False) -> APIRouter:
    """The ``/v1`` routes: thin adapters from HTTP to :func:`list_models`, :func:`chat_completion` and
    :func:`text_completion`.

    Args:
        registry: The controller's worker registry (models, templates).
        router: Opens streams on the workers.
        api_key: If set, requests must send ``Authorization: Bearer <api_key>``.
        prompt_tokens_details: Report ``usage.prompt_tokens_details.cached_tokens`` (vLLM's
            ``--enable-prompt-tokens-details``; off by default: the count tells a client which prompts others sent,
            unless they use ``cache_salt``).
    """
    routes = APIRouter(prefix="/v1")

    @routes.get("/models")
    async def models(request: Request) -> Response:
        return list_models(registry, request.headers.get("authorization", ""), api_key)

    @routes.get("/models/{model:path}")  # a name may hold a slash ("org/PALO-7B")
    async def model(model: str, request: Request) -> Response:
        return list_models(registry, request.headers.get("authorization", ""), api_key, model)

    @routes.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat_completion(await request.body(), request.headers.get("authorization", ""), registry,
                                     router, api_key, request.is_disconnected, prompt_tokens_details)

    @routes.post("/completions")
    async def completions(request: Request) -> Response:
        return await text_completion(await request.body(), request.headers.get("authorization", ""), registry,
                                     router, api_key, request.is_disconnected, prompt_tokens_details)

    return routes
