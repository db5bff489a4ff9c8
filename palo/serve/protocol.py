"""The original PALO/LLaVA serving wire format, shared by the controller, the model worker and their clients.

A streaming response is a sequence of UTF-8 JSON objects, each followed by one NUL byte. Each object holds
``text`` (cumulative, *including the prompt*) and ``error_code``:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     OK (also used for the original "prompt too long" message)
1     the worker failed, or rejected the request (bad image, wrong image count...)
2     the controller found no worker for the model
3     the controller could not reach the worker, or the worker timed out
====  ==========================================================================

This implementation may add keys that original clients ignore: ``finish_reason`` and ``usage`` on a worker's last
chunk, and ``error_type`` on errors (used by the OpenAI-compatible API to pick an HTTP status).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from palo.constants import MAX_LOGIT_BIAS
from palo.engine.detokenizer import visible_text  # noqa: F401 - the stop-string rule lives with the engine
from palo.engine.structured import StructuredOutput  # torch-free, like the detokenizer

# Texts of the original demo; kept verbatim because clients display them (and some match on them).
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
MODERATION_MSG = "YOUR INPUT VIOLATES OUR CONTENT MODERATION GUIDELINES. PLEASE TRY AGAIN."
PROMPT_TOO_LONG_MSG = "Exceeds max token length. Please start a new conversation, thanks."

# The Content-Type of the NUL-delimited streams (and of single error chunks answered at once).
STREAM_MEDIA_TYPE = "application/octet-stream"
# An empty chunk, which clients skip (the original protocol's do too): a worker sends one every few seconds while a
# request waits for a place, so that a reader's per-read timeout (the web demo's 10 s, the API's --read-timeout) does
# not fail a request that is only waiting its turn.
KEEPALIVE_CHUNK = b"\0"
# top_p 0 (the original web demo's slider starts there; OpenAI's API allows it) keeps the most likely token only:
# the sampler keeps its first candidate and then none while the mass before the next is over this.
SMALLEST_TOP_P = 1e-6

OK = 0
WORKER_ERROR = 1
NO_WORKER = 2
WORKER_UNREACHABLE = 3

# Values of the extra ``error_type`` key.
INVALID_REQUEST = "invalid_request"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
SERVER_ERROR = "server_error"
MODEL_NOT_FOUND = "model_not_found"


def encode_chunk(text: str, error_code: int = OK, **extra: Any) -> bytes:
    """One stream chunk: the JSON object followed by the NUL delimiter.

    Args:
        text: The cumulative text (prompt included) or an error message.
        error_code: See the module table.
        **extra: Additional keys (``finish_reason``, ``usage``, ``error_type``); None values are left out.

    Returns:
        The bytes to write.
    """
    body = {"text": text, "error_code": error_code}
    body.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\0"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400: valid JSON, but a float past a double's range is read as inf
        raise ValueError(f"the number {literal[:40]} is out of range (over 1.8e308)")
    return value


def decode_json_body(body: bytes) -> Any:
    """A request body parsed as JSON, for every endpoint that takes one.

    Raises:
        ValueError: Saying why, for a body that is not JSON (``invalid JSON body: ...``; NaN and Infinity
            included, and numbers past a double's range), is nested too deeply for the parser, or holds a lone
            surrogate escape (``"\\ud800"``): valid JSON syntax, but text no UTF-8 encoder downstream (tokenizer,
            log, response) can handle.
    """
    try:
        # UTF-8 only (RFC 8259 between systems; a byte-order mark is let pass): json.loads alone also reads UTF-16
        # and UTF-32, whose escapes the surrogate check below, which reads the bytes, would not see.
        text = body.decode("utf-8-sig") if isinstance(body, (bytes, bytearray)) else body
        # NaN and Infinity are Python's extensions, not JSON: refused here, they cannot be passed on (httpx will
        # not encode them to a worker) and no field takes them.
        # A number too large for a double (1e400) is refused too: it was read as inf, which the API then named as
        # an "Infinity" the client never sent, and the tokenizer endpoints could not encode back (a 500).
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("invalid JSON body: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid JSON body: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise ValueError(f"invalid JSON body: {exc}") from None
    raw = body if isinstance(body, (bytes, bytearray)) else body.encode("utf-8", "replace")
    if _SURROGATE_ESCAPE.search(raw):  # escaped surrogate pairs (emoji) are fine; only lone halves are refused
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid JSON body: a string holds a lone surrogate escape (\\ud800-\\udfff), which "
                             "is not Unicode text") from None
    return value


def shown(value: Any, limit: int = 40) -> str:
    """A value as an error message quotes it: whole, or its start and how long it is (a cut 400-digit number
    would read as another number)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_number(params: dict[str, Any], key: str, default: float, integer: bool = False) -> float:
    """``params[key]`` as a finite number (JSON numbers or numeric strings, as the original worker took them);
    ``integer`` truncates it, as ``int(float(x))`` did there.

    Raises:
        ValueError: Naming the field, for anything else (a list, a bool, ``"inf"``, an integer of 400 digits).
    """
    value = params.get(key, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"'{key}' must be {kind}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError(f"'{key}' must be finite, got an integer of {len(str(value))} digits") from None
    except ValueError:
        raise ValueError(f"'{key}' must be {kind}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"'{key}' must be finite, got {value!r}")
    return int(number) if integer else number


def is_token_ids(value: Any, vocab: int | None = None, max_len: int | None = None, empty: bool = False) -> bool:
    """Whether ``value`` is a list of token ids (JSON integers, not booleans, from 0), each below ``vocab`` when a
    vocab size is given, at most ``max_len`` of them, and not empty unless ``empty``."""
    return (isinstance(value, list) and (empty or bool(value)) and (max_len is None or len(value) <= max_len)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (vocab is None or t < vocab)
                    for t in value))


_TOKEN_KEY = re.compile(r"[0-9]{1,9}")


def parse_logit_bias(value: Any, vocab: int | None = None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (``{"token id": bias}``, each bias in [-100, 100]) as ``{id: bias}``.

    JSON object keys are strings; Python callers may use integers. Ids are checked against ``vocab`` when given.

    Args:
        value: The field as sent (None or ``{}``: no bias).
        vocab: The model's vocabulary size, when known here.

    Returns:
        ``{token id: bias}``, without zero biases (they change nothing).

    Raises:
        ValueError: Saying what is wrong, for anything else.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'logit_bias' must be an object mapping token ids to numbers, got {str(value)[:80]}")
    bias: dict[int, float] = {}
    for key, number in value.items():
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            token = key
        elif isinstance(key, str) and _TOKEN_KEY.fullmatch(key):
            token = int(key)
        else:
            raise ValueError(f"'logit_bias' keys must be token ids (non-negative integers), got {str(key)[:40]!r}")
        if vocab is not None and token >= vocab:
            raise ValueError(f"'logit_bias' token id {token} is not in the model's vocabulary [0, {vocab})")
        if (isinstance(number, bool) or not isinstance(number, (int, float))
                or not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS):  # also refuses NaN
            raise ValueError(f"'logit_bias' values must be numbers in [-100, 100], got {number!r} for token {token}")
        if token in bias:
            raise ValueError(f"'logit_bias' names token {token} twice")
        bias[token] = float(number)
    return {token: b for token, b in bias.items() if b}


# Stop strings a request may add to the template's (OpenAI's limit is 4; lmms-eval's ``until`` lists may be longer).
MAX_STOP_STRINGS = 16


def parse_stops(value: Any) -> tuple[str, ...]:
    """This project's ``stops``: the client's own stop strings, applied by the worker besides the protocol's one
    ``stop`` (the template's), so that ``min_tokens`` holds for them too and the answer ends with its usage.

    Args:
        value: The field as sent (absent: None).

    Returns:
        The non-empty strings, in order.

    Raises:
        ValueError: Unless it is absent or a list of at most ``MAX_STOP_STRINGS`` strings.
    """
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in value):
        raise ValueError(f"'stops' must be a list of up to {MAX_STOP_STRINGS} strings, got {shown(value)}")
    return tuple(s for s in value if s)


MAX_CACHE_SALT_CHARS = 1_024


def parse_cache_salt(value: Any) -> str | None:
    """vLLM's ``cache_salt``: requests share cached prompt blocks and image features only with requests that send
    the same salt (none: with every request that sends none).

    Args:
        value: The field as sent.

    Returns:
        The salt, or None when absent.

    Raises:
        ValueError: Unless it is absent or a non-empty string of at most ``MAX_CACHE_SALT_CHARS`` characters.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters, "
                         f"got {str(value)[:40]!r}")
    return value


# The fields that ask for a structured answer: OpenAI's, and vLLM's older and newer extras. At most one per request.
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs")
MAX_STRUCTURE_CHARS = 100_000  # a schema, pattern or choice list, as text
MAX_CHOICES_LISTED = 256


def parse_structured_output(body: dict[str, Any]) -> tuple[StructuredOutput | None, str | None]:
    """The shape ``body`` asks its answer to take, and the field that asked for it.

    Takes OpenAI's ``response_format`` (``{"type": "text"}``, ``{"type": "json_object"}``, ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``), vLLM's ``guided_json`` (a schema, as an object or text),
    ``guided_regex`` and ``guided_choice`` (a list of strings), and vLLM's newer ``structured_outputs`` (one of
    ``json``, ``regex``, ``choice``). Whether a schema or pattern compiles is for the engine to say.

    Returns:
        ``(None, None)`` when nothing is asked for (absent fields, ``{"type": "text"}``).

    Raises:
        ValueError: Naming the field, for a malformed one or more than one.
    """
    asked = [key for key in STRUCTURED_FIELDS if body.get(key) is not None
             and not (key == "response_format" and body[key] == {"type": "text"})]
    if not asked:
        return None, None
    if len(asked) > 1:
        raise ValueError(f"ask for one answer shape, not {' and '.join(repr(k) for k in asked)}")
    key = asked[0]
    value = body[key]
    if key == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object":
            return StructuredOutput("json_object"), key
        if kind == "json_schema":
            spec = value.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("'response_format' of type json_schema needs 'json_schema': {'name': ..., 'schema': "
                                 "{...}}")
            return StructuredOutput("json_schema", _text(json.dumps(schema, ensure_ascii=False), key)), key
        raise ValueError(f"'response_format' must be {{'type': 'text' | 'json_object' | 'json_schema'}}, got "
                         f"{str(value)[:80]}")
    if key == "structured_outputs":
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("json", "regex", "choice"):
            raise ValueError("'structured_outputs' must hold exactly one of 'json', 'regex' or 'choice'")
        (sub, value), = value.items()
        key = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}[sub]
        asked_as = f"structured_outputs.{sub}"
    else:
        asked_as = key
    if key == "guided_json":
        if isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str):
            raise ValueError(f"'{asked_as}' must be a JSON schema (an object, or its text)")
        return StructuredOutput("json_schema", _text(value, asked_as)), asked_as
    if key == "guided_regex":
        if not isinstance(value, str) or not value:
            raise ValueError(f"'{asked_as}' must be a non-empty regular expression")
        return StructuredOutput("regex", _text(value, asked_as)), asked_as
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES_LISTED
            or not all(isinstance(c, str) and c for c in value)):
        raise ValueError(f"'{asked_as}' must be a list of 1 to {MAX_CHOICES_LISTED} non-empty strings")
    return StructuredOutput("choice", _text(json.dumps(value, ensure_ascii=False), asked_as)), asked_as


def _text(spec: str, key: str) -> str:
    if len(spec) > MAX_STRUCTURE_CHARS:
        raise ValueError(f"'{key}' is {len(spec)} characters, over the limit of {MAX_STRUCTURE_CHARS}")
    return spec


def error_chunk(reason: str, error_code: int, error_type: str = SERVER_ERROR, param: str | None = None) -> bytes:
    """An error chunk whose text starts with the original message (for codes 1-3) and then says what happened;
    ``param``: the request field a refused request's error is about (left out when None)."""
    text = reason if error_type == INVALID_REQUEST else f"{SERVER_ERROR_MSG} ({reason})"
    return encode_chunk(text, error_code, error_type=error_type, param=param)


class ChunkDecoder:
    """Incremental splitter of a NUL-delimited byte stream into JSON objects (empty pieces are ignored).

    The pieces of an unfinished chunk are kept in a list and joined once its delimiter comes: adding each read to
    one buffer and splitting it again copied and scanned the whole chunk per read, quadratic in a chunk's size (a
    prompt's log-probabilities at 20 alternatives make a chunk of megabytes, read in 16-64 KB pieces, on the API
    server's event loop).
    """

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.empty = 0  # empty pieces (keep-alives) skipped so far

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return the complete objects they finish."""
        if b"\0" not in data:
            if data:
                self._pieces.append(data)
            return []
        *complete, rest = b"".join([*self._pieces, data]).split(b"\0")
        self._pieces = [rest] if rest else []
        objects = [json.loads(piece.decode("utf-8")) for piece in complete if piece.strip()]
        self.empty += len(complete) - len(objects)
        return objects

    def close(self) -> list[dict[str, Any]]:
        """Objects left in the buffer when the stream ended without a final delimiter."""
        rest, self._pieces = b"".join(self._pieces), []
        return [json.loads(rest.decode("utf-8"))] if rest.strip() else []


def iter_chunks(byte_chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Decode a synchronous byte stream (e.g. ``httpx.Response.iter_bytes()``) into chunk objects."""
    decoder = ChunkDecoder()
    for data in byte_chunks:
        yield from decoder.feed(data)
    yield from decoder.close()


async def aiter_chunks(byte_chunks: AsyncIterator[bytes], keepalives: bool = False
                       ) -> AsyncIterator[dict[str, Any] | None]:
    """Decode an asynchronous byte stream into chunk objects; with ``keepalives``, also None where a read brought
    only empty chunks (for a relay to pass on)."""
    decoder = ChunkDecoder()
    async for data in byte_chunks:
        objects = decoder.feed(data)
        for obj in objects:
            yield obj
        if keepalives and decoder.empty and not objects:
            yield None
        decoder.empty = 0
    for obj in decoder.close():
        yield obj
