"""A model worker backed by an OpenAI-compatible server (vLLM, SGLang, or this project's own API).

In the spirit of LLaVA's ``sglang_worker.py``: it registers with the controller and heartbeats like
:mod:`palo.serve.model_worker`, but holds no model. Each ``/worker_generate_stream`` request of the original
protocol (a finished prompt with ``<image>`` placeholders, base64 images, ``temperature``, ``top_p``,
``max_new_tokens``, ``stop``; ``seed``, ``top_k``, ``min_p``, ``min_tokens``, ``stop_token_ids``, the penalties,
``logit_bias``, an answer shape and ``logprobs`` when set) becomes one streaming ``POST
{api_base}/chat/completions``, and the deltas are sent back as the original cumulative, NUL-delimited chunks (with
the backend's per-token log-probabilities when asked for). The controller, web UI and OpenAI API therefore mix
native and engine-backed workers freely.

The prompt is turned back into chat messages with the conversation template (``--conv-mode``, ``vicuna_v1`` for
PALO) and the messages are rendered again to check that the backend, which renders them with the exported chat
template (:mod:`palo.export.chat_template`, the same rules), sees exactly the prompt received; a prompt that does
not survive the round trip is refused with a clear error rather than silently changed. Images become
``data:image/...;base64,`` parts at the front of their user message, where PALO places them.

Backend health decides liveness: before every heartbeat the worker asks ``GET {api_base}/models``. While the
backend does not answer, the worker stops heartbeating (so the controller expires it and stops routing to it),
answers requests with an error chunk naming the backend, and registers again once the backend is back.

    python palo/serve/openai_worker.py --controller http://localhost:10000 --port 40001 \\
        --worker http://localhost:40001 --api-base http://localhost:8000/v1 --model-name PALO-13B
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # through palo.cli, before the imports below: a missing extra is one line
    from palo.cli import module_main

    sys.exit(module_main("palo.serve.openai_worker"))

import argparse
import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from palo.constants import DEFAULT_IMAGE_TOKEN, REMOTE_URL_SCHEMES, WORKER_HEART_BEAT_INTERVAL
from palo.conversation import SeparatorStyle, conv_templates
from palo.engine.detokenizer import first_stop, held_back
from palo.image_io import is_data_url
from palo.openai_client import token_count
from palo.serve.openai_api import MAX_TOP_LOGPROBS, APIError, render_messages
from palo.serve.protocol import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST,
    KEEPALIVE_CHUNK,
    OK,
    PROMPT_TOO_LONG_MSG,
    SMALLEST_TOP_P,
    WORKER_ERROR,
    encode_chunk,
    error_chunk,
    is_token_ids,
    parse_cache_salt,
    parse_logit_bias,
    parse_number,
    parse_stops,
    parse_structured_output,
    shown,
)
from palo.serve.utils import build_logger, masked_args, refuse_unservable, sse_lines
from palo.serve.worker_base import BaseWorker, Rejected, add_address_arguments, create_app, serve

__all__ = ["OpenAIWorker", "PromptFormatError", "build_parser", "create_app", "main", "prompt_to_messages"]

HEALTH_TIMEOUT_S = 5.0
MAX_NEW_TOKENS_CAP = 1024  # the original worker's cap
BACKEND_STOP_STRINGS = 4  # OpenAI's limit on a request's stop strings (this project's API keeps it)
INVALID_REQUEST_STATUSES = (400, 413, 422)  # a backend's answers that blame the request (FastAPI's 422 included)
MAX_BACKEND_MESSAGE_CHARS = 500
PROMPT_TOO_LONG_PREFIX = "the prompt is too long: "  # how this project's API begins a context_length_exceeded message


# Worker-protocol settings beyond the original's, forwarded to the backend: (accepted types, value that asks for
# nothing).
FORWARDED: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "seed": (int, None),
    "top_k": (int, 0),
    "presence_penalty": ((int, float), 0),
    "frequency_penalty": ((int, float), 0),
    "repetition_penalty": ((int, float), 1),
    "min_p": ((int, float), 0),
    "min_tokens": (int, 0),
}


class PromptFormatError(ValueError):
    """A worker-protocol request that cannot be forwarded faithfully (400).

    Args:
        message: What is wrong, for the client.
        field: The request field it is about, if one (the error chunk's ``param``, as the native worker's).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _parsed(field: str, parse: Any, *args: Any) -> Any:
    """``parse(*args)``, its ``ValueError`` a :class:`PromptFormatError` about ``field``."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise PromptFormatError(str(exc), field) from None


def _data_url(image_b64: str) -> str:
    if is_data_url(image_b64) or image_b64.lower().startswith(REMOTE_URL_SCHEMES):
        return image_b64  # a URL goes to the backend as it came: fetching it is the backend's to allow
    mime = "image/jpeg" if image_b64.startswith("/9j/") else "image/png"
    return f"data:{mime};base64,{image_b64}"


def prompt_to_messages(prompt: str, images: list[str], conv_mode: str) -> list[dict[str, Any]]:
    """Split a rendered ``TWO``-style prompt (``vicuna_v1``, ``llava_v1``) back into OpenAI chat messages.

    Args:
        prompt: The worker-protocol prompt, ending with an open assistant turn (``... ASSISTANT:``).
        images: The request's base64 images, in placeholder order.
        conv_mode: The template the prompt was rendered with.

    Returns:
        The messages: a ``system`` message only when the prompt's differs from the template's, then alternating
        user/assistant messages; user messages with images have list content (images first).

    Raises:
        PromptFormatError: If the prompt is not in that template's format, the image count differs from the
            placeholders, or rendering the messages again would not give back exactly ``prompt``.
    """
    conv = conv_templates[conv_mode]
    user, assistant = conv.roles
    if prompt.count(DEFAULT_IMAGE_TOKEN) != len(images):
        raise PromptFormatError(
            f"the prompt has {prompt.count(DEFAULT_IMAGE_TOKEN)} {DEFAULT_IMAGE_TOKEN} placeholders but "
            f"{len(images)} images were sent", "images")
    head = f"{conv.sep}{user}:"
    start = prompt.find(head)
    end = f"{assistant}:"
    if start < 0 or not prompt.endswith(end):
        raise PromptFormatError(f"the prompt is not a {conv_mode} prompt ending with an open '{end}' turn", "prompt")
    system = prompt[:start]
    messages: list[dict[str, Any]] = []
    if system != conv.system:
        messages.append({"role": "system", "content": system})
    pending = list(images)
    rounds = prompt[start + len(conv.sep):].split(conv.sep2)
    for index, round_text in enumerate(rounds):
        question, found, answer = round_text.partition(f"{conv.sep}{assistant}:")
        if not question.startswith(f"{user}:") or not found:
            raise PromptFormatError(f"round {index + 1} of the prompt is not '{user}: ...{conv.sep}{assistant}: ...'",
                                    "prompt")
        question = question[len(user) + 1:]
        question = question[1:] if question.startswith(" ") else question
        count = question.count(DEFAULT_IMAGE_TOKEN)
        bare = question
        while bare.startswith(DEFAULT_IMAGE_TOKEN + "\n"):
            bare = bare[len(DEFAULT_IMAGE_TOKEN) + 1:]
        if DEFAULT_IMAGE_TOKEN in bare:
            raise PromptFormatError(f"an {DEFAULT_IMAGE_TOKEN} placeholder is not at the front of its message; PALO "
                                    "places images there (the chat template cannot put it elsewhere)", "prompt")
        if count:
            content: Any = [{"type": "image_url", "image_url": {"url": _data_url(b64)}} for b64 in pending[:count]]
            content.append({"type": "text", "text": bare})
            del pending[:count]
        else:
            content = question
        messages.append({"role": "user", "content": content})
        last = index == len(rounds) - 1
        if last:
            if answer != "":
                raise PromptFormatError(f"the prompt must end with an open '{end}' turn", "prompt")
        else:
            messages.append({"role": "assistant", "content": answer[1:] if answer.startswith(" ") else answer})
    try:
        rendered, _, _ = render_messages(messages, conv_mode)
    except APIError as exc:
        raise PromptFormatError(str(exc), "prompt") from exc
    if rendered != prompt:
        raise PromptFormatError(f"the prompt does not round-trip through the {conv_mode} chat template, so the backend "
                                "would see a different prompt", "prompt")
    return messages


class OpenAIWorker(BaseWorker):
    """A worker that forwards each request to one backend model; heartbeats only while the backend is healthy.

    Registration, heartbeats and the concurrency limit are :class:`~palo.serve.worker_base.BaseWorker`'s; this
    class adds the backend health check and the translation of requests and streams.

    Args:
        api_base: The backend's OpenAI base URL (``http://host:port/v1``).
        api_key: Sent as ``Authorization: Bearer``; None sends none.
        model_name: The model name at the backend, and the name registered with the controller.
        controller_addr: The controller's base URL.
        worker_addr: This worker's base URL as the controller should reach it.
        conv_mode: The conversation template of the prompts (``TWO`` style).
        limit_model_concurrency: Requests forwarded at once (the backend batches them).
        heart_beat_interval: Seconds between heartbeats (and backend health checks).
        request_timeout: Seconds the backend may stay silent during one request.
        context_length: Reported by ``/model_details``.
        no_register: Do not register with a controller.
        logger: Where to log.
        worker_key: The controller's ``--worker-key``, sent with the registration and heartbeats.
    """

    title = "PALO OpenAI-backed worker"

    def __init__(self, api_base: str, api_key: str | None, model_name: str, controller_addr: str, worker_addr: str,
                 conv_mode: str = "vicuna_v1", limit_model_concurrency: int = 32,
                 heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL, request_timeout: float = 120.0,
                 context_length: int = 2048, no_register: bool = False, logger: Any = None,
                 worker_key: str | None = None) -> None:
        if conv_mode not in conv_templates or conv_templates[conv_mode].sep_style is not SeparatorStyle.TWO:
            raise ValueError(f"--conv-mode {conv_mode!r}: the OpenAI-backed worker handles TWO-style templates "
                             "(vicuna_v1, llava_v1), which PALO uses")
        super().__init__(model_name, controller_addr, worker_addr, conv_mode=conv_mode,
                         limit_model_concurrency=limit_model_concurrency, heart_beat_interval=heart_beat_interval,
                         no_register=no_register, logger=logger, worker_key=worker_key)
        self.api_base = api_base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.request_timeout = request_timeout
        self.context_length = context_length
        self.healthy = False  # until the first check: no heartbeat for a backend never seen
        self._backend: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    def status_details(self) -> dict[str, Any]:
        return {"backend": {"api_base": self.api_base, "reachable": self.healthy}}

    def serving(self) -> bool:
        # The last probe (free): a worker whose backend is down must not answer its status, or each controller
        # refresh (the web UI's page loads) re-registered it with a fresh heartbeat and requests kept reaching a
        # dead backend; its 503s also let the router try another worker of the model. A worker that registers
        # nowhere (no heartbeats, so no probes) keeps trying its backend.
        return self.healthy or self.no_register

    def unhealthy_message(self) -> str:
        return (f"the backend {self.api_base} is unreachable or does not serve {self.model_name!r}; "
                "the controller drops this worker until the backend is back")

    def model_details(self) -> dict[str, Any]:
        return {"context_length": self.context_length}

    def check_health(self) -> bool:
        """Whether the backend answers ``GET /models`` and serves ``model_name``."""
        try:
            response = self.http().get(self.api_base + "/models", headers=self.headers, timeout=HEALTH_TIMEOUT_S)
            response.raise_for_status()
            names = [m.get("id") for m in response.json().get("data", [])]
            ok = self.model_name in names
            if not ok:
                self.logger.warning("backend %s serves %s, not %s", self.api_base, names, self.model_name)
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.logger.warning("backend %s is not answering: %s", self.api_base, exc)
            ok = False
        if ok != self.healthy:
            self.logger.info("backend %s %s", self.api_base, "is up" if ok else "is down: no more heartbeats")
        return ok

    # -- requests ------------------------------------------------------------------------------------------------
    def backend_request(self, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(prompt, /chat/completions body)`` for worker-protocol ``params``.

        Raises:
            PromptFormatError: For a malformed request or a prompt that cannot be sent faithfully.
        """
        if not isinstance(params, dict):
            raise PromptFormatError("the request body must be a JSON object")
        for key in ("prompt_token_ids", "prompt_logprobs"):
            if params.get(key) is not None:  # a chat API neither takes token ids nor scores a prompt
                raise PromptFormatError(f"'{key}' is not supported by a worker that forwards to an OpenAI-compatible "
                                        "backend as chat messages", key)
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise PromptFormatError("'prompt' (a string) is required", "prompt")
        images = params.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise PromptFormatError("'images' must be a list of base64 strings", "images")
        # finite numbers, as the native worker takes them (an infinity reached the backend's JSON encoder)
        temperature = _parsed("temperature", parse_number, params, "temperature", 1.0)
        top_p = _parsed("top_p", parse_number, params, "top_p", 1.0)
        max_new_tokens = _parsed("max_new_tokens", parse_number, params, "max_new_tokens", 256, True)
        capped = params.get("cap_max_new_tokens", True)
        if not isinstance(capped, bool):
            raise PromptFormatError(f"'cap_max_new_tokens' must be true or false, got {shown(capped)}",
                                    "cap_max_new_tokens")
        # The original protocol's cap, or (the OpenAI API's requests) the context: the backend counts the prompt.
        max_new_tokens = min(max_new_tokens, MAX_NEW_TOKENS_CAP if capped else self.context_length)
        if max_new_tokens < 1:
            raise PromptFormatError("'max_new_tokens' must be positive", "max_new_tokens")
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": prompt_to_messages(prompt, images, self.conv_mode),
            # The original samples only above 0.001; below that it decodes greedily.
            "temperature": temperature if temperature > 0.001 else 0.0,
            "top_p": min(max(top_p, SMALLEST_TOP_P), 1.0),
            "max_tokens": max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        stop = params.get("stop")
        if stop is not None and not isinstance(stop, str):  # the protocol's one stop string, as the native worker
            raise PromptFormatError(f"'stop' must be a string, got {shown(stop)}", "stop")
        # the client's own stop strings go to the backend with the template's, to be applied under min_tokens
        stops = ([stop] if stop else []) + list(_parsed("stops", parse_stops, params.get("stops")))
        if stops:  # OpenAI's API (and this project's) takes up to 4; the rest are cut here as the text comes
            body["stop"] = stops
        # This project's extra settings go along only when they ask for something, so a backend that lacks one sees
        # the request it always saw; vLLM, SGLang and this project's API take them all (ranges are theirs to check).
        for key, (kind, default) in FORWARDED.items():
            value = params.get(key)
            if value is None or value == default:
                continue
            if (isinstance(value, bool) or not isinstance(value, kind)
                    or (isinstance(value, float) and not math.isfinite(value))):
                raise PromptFormatError(f"'{key}' must be {'an integer' if kind is int else 'a finite number'}, got "
                                        f"{shown(value)}", key)
            # an integer past a float's range (10**400) is refused as max_new_tokens is, not an OverflowError
            _parsed(key, parse_number, params, key, default)
            body[key] = value
        ignore_eos = params.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise PromptFormatError(f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
        if ignore_eos:
            body["ignore_eos"] = True
        stop_token_ids = params.get("stop_token_ids")
        if stop_token_ids:  # the backend's token ids, as for logit_bias
            if not is_token_ids(stop_token_ids):
                raise PromptFormatError(f"'stop_token_ids' must be a list of token ids, got {str(stop_token_ids)[:80]}",
                                        "stop_token_ids")
            body["stop_token_ids"] = stop_token_ids
        # vLLM keeps its own prefix cache per salt; sent only when asked for, like the settings above
        cache_salt = _parsed("cache_salt", parse_cache_salt, params.get("cache_salt"))
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        # the backend's token ids: forwarded as they are, for its own tokenizer
        logit_bias = _parsed("logit_bias", parse_logit_bias, params.get("logit_bias"))
        if logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in logit_bias.items()}
        # an answer shape goes as it was asked for: the backend (vLLM, SGLang, this API) takes each form
        _, shape_field = _parsed("structured", parse_structured_output, params)
        if shape_field is not None:
            top = shape_field.split(".")[0]
            body[top] = params[top]
        logprobs = params.get("logprobs")
        if logprobs is not None:  # k alternatives per token, as OpenAI's chat API asks for them
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise PromptFormatError(f"'logprobs' must be null or an integer from 0 to {MAX_TOP_LOGPROBS}, "
                                        f"got {logprobs!r}", "logprobs")
            body.update(logprobs=True, top_logprobs=logprobs)
        return prompt, body

    async def prepare(self, params: Any) -> tuple[str, dict[str, Any]]:
        """``(prompt, backend request body)``, or a rejection for a request that cannot be forwarded faithfully."""
        try:
            return self.backend_request(params)
        except PromptFormatError as exc:
            self.logger.info("rejected request: %s", exc)
            raise Rejected(error_chunk(f"invalid request: {exc}", WORKER_ERROR, INVALID_REQUEST, exc.field)) from None

    def generate(self, prepared: tuple[str, dict[str, Any]]) -> AsyncIterator[bytes]:
        return self._relay(*prepared)

    def backend_client(self) -> httpx.AsyncClient:
        """The kept-alive client for the backend, so that requests reuse its connections instead of opening one (and
        a TLS session) each. Made in the server's event loop, which an async client is bound to."""
        loop = asyncio.get_running_loop()
        if self._backend is None or self._backend[0] is not loop:
            timeout = httpx.Timeout(self.request_timeout, connect=HEALTH_TIMEOUT_S)
            # Idle connections are dropped before uvicorn's 5 s keep-alive would close them under a request.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=4.0)
            self._backend = (loop, httpx.AsyncClient(timeout=timeout, limits=limits))
        return self._backend[1]

    def _refusal(self, prompt: str, status: int, content: bytes) -> bytes:
        """The chunk for a backend's non-200 answer (``content``, its body) to a request for ``prompt``.

        The backend refuses the client's own mistakes (a corrupt image, a prompt over its context, a setting out of
        its range) with 400, 413 or 422; they are said as the client's, with the backend's message, so that this
        project's API answers 400 as the native worker makes it, not 502 "the model worker failed". A prompt over
        the context is answered as the native worker answers it. Anything else stays the backend's failure.
        """
        message, code = _backend_error(content)
        if status in INVALID_REQUEST_STATUSES:
            self.logger.info("backend %s refused the request (HTTP %d): %s", self.api_base, status, message)
            if code == CONTEXT_LENGTH_EXCEEDED:
                # This project's API as the backend already says what the front's API says before the detail.
                detail = message.removeprefix(PROMPT_TOO_LONG_PREFIX)
                return encode_chunk(prompt + PROMPT_TOO_LONG_MSG, OK, error_type=CONTEXT_LENGTH_EXCEEDED,
                                    detail=detail, finish_reason="length")
            return error_chunk(message, WORKER_ERROR, INVALID_REQUEST)
        self.logger.error("backend %s answered HTTP %d: %s", self.api_base, status, message)
        return error_chunk(f"the backend {self.api_base} answered HTTP {status}: {message}", WORKER_ERROR)

    async def _relay(self, prompt: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        text = ""
        finish: str | None = None
        usage: dict | None = None
        stops = body.get("stop") or []
        if len(stops) > BACKEND_STOP_STRINGS:
            body = {**body, "stop": stops[:BACKEND_STOP_STRINGS]}
        # The stop strings the backend was not sent end the answer here. A backend leaves its own out of the text,
        # so looking for them too changes nothing, except under min_tokens: there one may stand in the first tokens,
        # and that text stands.
        min_tokens = body.get("min_tokens") or 0
        local_stops = stops[BACKEND_STOP_STRINGS:] if min_tokens else stops
        searched = 0  # a stop string must end past this point of `text` to count (vLLM's min_tokens rule)
        logprobs: list[dict] = []  # the backend's entries not yet passed on
        pieces = 0  # non-empty content deltas relayed

        def take_logprobs() -> list[dict] | None:
            """The entries since the last chunk (each chunk carries its new tokens'), when they were asked for."""
            if not body.get("logprobs"):
                return None
            taken = logprobs[:]
            logprobs.clear()
            return taken
        try:
            async with self.backend_client().stream("POST", self.api_base + "/chat/completions", json=body,
                                                    headers=self.headers) as response:
                if response.status_code != 200:
                    yield self._refusal(prompt, response.status_code, await response.aread())
                    return
                done = False
                async for line in sse_lines(response.aiter_bytes()):
                    # After [DONE], read on to the body's end without using it: a response left unread closes
                    # its connection instead of returning it to the pool for the next request.
                    if done:
                        continue
                    if line.startswith(":"):  # a backend's keep-alive comment (it is busy, not gone): passed on,
                        yield KEEPALIVE_CHUNK  # so that our own readers' per-read timeouts wait as this one does
                        continue
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        yield error_chunk(f"the backend {self.api_base} failed: {event['error']}", WORKER_ERROR)
                        return
                    event_usage, choices = _event_parts(event)
                    usage = event_usage or usage
                    # Each piece holds a token at least: a backend sending more than max_tokens ignores the limit
                    # (it would be relayed without end), and the answer is cut there.
                    cut = any(delta for delta, _, _ in choices) and pieces == body["max_tokens"]
                    if cut:
                        self.logger.warning("backend %s sent more than max_tokens=%d pieces; answer cut there",
                                            self.api_base, body["max_tokens"])
                        finish = finish or "length"
                        break
                    stopped = False
                    for delta, choice_finish, choice_logprobs in choices:
                        finish = choice_finish or finish
                        logprobs.extend(choice_logprobs)
                        if delta:
                            text += delta
                            pieces += 1
                            cut = first_stop(text, local_stops, searched) if pieces > min_tokens else -1
                            if cut >= 0:
                                text, stopped = text[:cut], True
                                break
                            searched = len(text)
                            # A partial stop string at the end is held back: the relayed texts only ever grow.
                            yield encode_chunk(prompt + held_back(text, local_stops, final=False), OK,
                                               logprobs=take_logprobs())
                    if stopped:  # leaving the stream ends the backend's generation too
                        finish = "stop"
                        break
        except MalformedEvent as exc:  # the backend's fault, said as such (no traceback: nothing here broke)
            self.logger.error("backend %s sent a malformed event: %s", self.api_base, exc)
            yield error_chunk(f"the backend {self.api_base} sent a malformed event: {exc}", WORKER_ERROR)
            return
        except (httpx.HTTPError, ValueError) as exc:
            self.logger.error("backend %s failed: %r", self.api_base, exc)
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                # The backend cannot be reached: no heartbeat around requests until a periodic check finds it back.
                # A read timeout or a stream broken off is this request's failure (a long prefill, one bad
                # connection): taking the worker out for a heartbeat interval refused every request meanwhile.
                self.healthy = False
            yield error_chunk(f"the backend {self.api_base} is unreachable or broke off the stream "
                              f"({type(exc).__name__}: {exc})", WORKER_ERROR)
            return
        if finish is None:
            yield error_chunk(f"the backend {self.api_base} ended the stream without finishing", WORKER_ERROR)
            return
        # A stream left early (a stop string cut here, a backend past max_tokens) brought no usage: each relayed
        # piece holds a token at least, and the prompt's count is unknown (0, as for a backend that sends none).
        usage = usage or {"completion_tokens": pieces}
        reported = {key: token_count(usage.get(key)) or 0 for key in ("prompt_tokens", "completion_tokens")}
        details = usage.get("prompt_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
        # Only a backend that reports it (vLLM with --enable-prompt-tokens-details); unknown is left out, not 0.
        if cached is not None:
            reported["cached_tokens"] = cached
        yield encode_chunk(prompt + text, OK, finish_reason=finish, logprobs=take_logprobs(), usage=reported)


def _backend_error(content: bytes) -> tuple[str, str | None]:
    """``(message, code)`` of a backend's error body: OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
    or the flat ``{"message", "code", ...}`` of vLLM's and SGLang's older versions; for another body, its text (cut)
    and no code."""
    text = content.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else body
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        code = error.get("code")
        return error["message"][:MAX_BACKEND_MESSAGE_CHARS], code if isinstance(code, str) else None
    return text[:MAX_BACKEND_MESSAGE_CHARS], None


class MalformedEvent(ValueError):
    """A streamed event of the backend that is not a chat-completion chunk."""


def _event_parts(event: Any) -> tuple[dict | None, list[tuple[str, str | None, list]]]:
    """``(usage, [(new text, finish reason, log-probability entries) per choice])`` of one streamed chunk.

    Raises:
        MalformedEvent: Saying what is wrong, for a chunk of another shape.
    """
    if not isinstance(event, dict):
        raise MalformedEvent(f"expected a JSON object, got {str(event)[:80]}")
    usage = event.get("usage")
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise MalformedEvent(f"'choices' must be a list, got {str(choices)[:80]}")
    parts = []
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or not isinstance(delta, (dict, type(None))):
            raise MalformedEvent(f"a choice must be an object with a 'delta' object, got {str(choice)[:80]}")
        content = (delta or {}).get("content") or ""
        finish = choice.get("finish_reason")
        logprobs = choice.get("logprobs") or {}
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if (not isinstance(content, str) or not isinstance(finish, (str, type(None)))
                or not isinstance(entries, (list, type(None)))):
            raise MalformedEvent(f"a choice's content, finish_reason or logprobs is of the wrong type: "
                                 f"{str(choice)[:80]}")
        parts.append((content, finish, entries or []))
    return (usage if isinstance(usage, dict) else None), parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PALO worker backed by an OpenAI-compatible server (vLLM, SGLang)")
    add_address_arguments(parser)
    parser.add_argument("--api-base", type=str, required=True, help="the backend's OpenAI base URL, e.g. http://host:8000/v1")
    parser.add_argument("--api-key", type=str, default=os.environ.get("OPENAI_API_KEY"),
                        help="backend API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--model-name", type=str, required=True,
                        help="the model's name at the backend (vLLM --served-model-name), "
                             "also registered with the controller")
    parser.add_argument("--conv-mode", type=str, default="vicuna_v1", help="template of the prompts (PALO: vicuna_v1)")
    parser.add_argument("--limit-model-concurrency", type=int, default=32, help="requests forwarded at once")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds the backend may stay silent")
    parser.add_argument("--context-length", type=int, default=2048, help="reported by /model_details")
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL, help="seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unservable(parser, args)

    logger = build_logger("openai_worker", f"openai_worker_{uuid.uuid4().hex[:6]}.log")
    logger.info("args: %s", masked_args(args))
    try:
        worker = OpenAIWorker(args.api_base, args.api_key, args.model_name, args.controller_address,
                              args.worker_address, conv_mode=args.conv_mode,
                              limit_model_concurrency=args.limit_model_concurrency,
                              heart_beat_interval=args.heart_beat_interval, request_timeout=args.request_timeout,
                              context_length=args.context_length, no_register=args.no_register, logger=logger,
                              worker_key=args.worker_key)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(worker, args.host, args.port)
    return 0
