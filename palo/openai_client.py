"""One OpenAI-compatible chat client for every tool that calls a chat model: the LLM judge and the translator.

Both make many requests to endpoints that rate-limit, time out and occasionally return garbage, and both used to
carry their own copy of the retry loop; the copies had drifted apart (only one read ``Retry-After`` as an HTTP date,
only one survived a malformed 200 body). This module is the one behaviour they now share:

* **Bounded retries** with exponential backoff: retry ``k`` waits ``backoff * 2**k`` plus up to 25 % jitter (so
  parallel workers that failed together do not come back together), capped at ``max_backoff``. The SDK's own
  retries are off, so every attempt is counted and the settings mean what they say.
* **What is retried:** HTTP 429, 408, 409 and 5xx, time-outs, dropped connections and malformed bodies (a 200
  without a text reply). Any other 4xx (a wrong key, model or request) fails at once: asking again cannot help.
* **``Retry-After``** is honoured as delta-seconds or as an HTTP date (and ``retry-after-ms``); the wait is at least
  the server's hint and at most ``max_backoff``, so a server asking for an hour cannot stall a run for an hour.
* **Failures are records, not values:** when the retries are used up, or the error is not retryable,
  :class:`RequestFailed` says after how many attempts and why. Callers turn it into a failed judgment or an
  unfinished sample; nothing ever turns it into a score or a translation.
* **Caching** (optional): replies in SQLite keyed by everything that could change them (:func:`request_key`); a
  reply is stored, and served again, only when the caller's ``accept`` check takes it, so a rerun costs no calls
  for what succeeded and asks again for what did not. :class:`SqliteStore` is the shared mechanics (one connection
  under a lock, busy time-out and WAL so several processes can share a file) for caches keyed otherwise.

Importing this module imports only the standard library; ``openai`` is imported when a client is built.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import math
import os
import random
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timezone
from typing import Any

DEFAULT_MAX_BACKOFF = 60.0
# Jitter as a fraction of the backoff delay.
JITTER = 0.25


def token_count(value: Any) -> int | None:
    """A token count of a server's ``usage``, or None where it sent something else: the reply itself is good, and a
    bookkeeping field must not cost it (or the run)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class RequestFailed(RuntimeError):
    """A request that failed for good: a non-retryable error, or retries used up.

    Attributes:
        attempts: HTTP attempts made.
        last_error: The last error, as ``Name (HTTP status): message``.
    """

    def __init__(self, attempts: int, last_error: str) -> None:
        super().__init__(f"after {attempts} attempt(s): {last_error}")
        self.attempts = attempts
        self.last_error = last_error


class MalformedReply(ValueError):
    """A 200 response without a text reply (no choices, no message, non-text content)."""


@dataclasses.dataclass
class Completion:
    """One successful chat completion.

    Attributes:
        content: The reply text.
        finish_reason: Why generation stopped (``"length"`` when cut off); None for a cached reply.
        calls: HTTP attempts made (0 for a cache hit).
        cached: Whether the reply came from the cache.
        refusal: The model's refusal, when it declined instead of answering (OpenAI's ``refusal`` with no
            content; ``content`` is then empty); such a reply is never cached.
    """

    content: str
    finish_reason: str | None
    calls: int
    cached: bool = False
    refusal: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Retry policy
# ---------------------------------------------------------------------------------------------------------------


def retryable_status(status: int) -> bool:
    """Whether an HTTP status may be gone when asked again: 408, 409, 429 and 5xx."""
    return status in (408, 409, 429) or status >= 500


def is_retryable(exc: BaseException) -> bool:
    """Whether asking again can help: 429, 408/409, 5xx, time-outs, dropped connections, malformed bodies."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return retryable_status(exc.status_code)
    # A 200 whose body is not a chat completion (MalformedReply) or not JSON at all (the SDK's JSONDecodeError).
    return isinstance(exc, ValueError)


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """The wait a server asked for, in seconds, or None when it asked for none (or nothing readable).

    Reads ``retry-after-ms`` (OpenAI's millisecond hint), then ``Retry-After`` as delta-seconds or as an HTTP date
    (RFC 9110 allows both; a date in the past means "now"). Header names are looked up in lower case, which
    ``httpx.Headers`` matches case-insensitively.

    Args:
        headers: The response headers.
        now: The current time (``time.time()`` when None), for dates.
    """
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if not math.isnan(value):
            return max(0.0, value)
    value_text = headers.get("retry-after")
    if value_text is None:
        return None
    try:
        value = float(value_text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value_text.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are always GMT
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None if math.isnan(value) else max(0.0, value)


def retry_delay(attempt: int, backoff: float, max_backoff: float, hint: float | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential with jitter, at least ``hint``, capped."""
    delay = backoff * 2 ** attempt * (1 + JITTER * random.random())
    if hint is not None:
        delay = max(delay, hint)
    return min(delay, max_backoff)


def describe(exc: BaseException) -> str:
    """``Name (HTTP status): message`` for a failure record (the message cut to 200 characters), with its cause's
    message where that says more (the SDK's "Connection error." hides "peer closed connection without sending
    complete message body")."""
    status = getattr(exc, "status_code", None)
    message, cause = str(exc), exc.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message} ({type(cause).__name__}: {cause})"
    return f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {message[:200]}"


def _headers_of(exc: BaseException) -> Mapping[str, str] | None:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None) if response is not None else None


def _reply_of(body: bytes) -> tuple[str, str | None, int | None, str | None]:
    """(content, finish_reason, total tokens, refusal) of a chat completion's JSON body, or :class:`MalformedReply`
    (a server that answers 200 with the wrong body). A reply the model declined has no content and a ``refusal``
    text: it comes back as content "" and that text (asking again gets the same answer: not a malformed body)."""
    try:
        response = json.loads(body)
    except ValueError as exc:
        raise MalformedReply(f"not a chat completion ({type(exc).__name__}: {exc})") from None
    if isinstance(response, dict) and "choices" not in response and response.get("error"):
        # A proxy or backend that answers 200 with an error body: its message says what went wrong.
        error = response["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise MalformedReply(f"the server answered 200 with an error: {str(message)[:200]}")
    try:
        choice = response["choices"][0]
        message = choice["message"]
    except (IndexError, KeyError, TypeError) as exc:
        raise MalformedReply(f"not a chat completion ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise MalformedReply(f"not a chat completion (its message is {type(message).__name__})")
    content, refusal = message.get("content"), message.get("refusal")
    if not content and isinstance(refusal, str) and refusal.strip():
        content, refusal = "", refusal.strip()
    elif not isinstance(content, str):
        raise MalformedReply("reply has no text content")
    else:
        refusal = None
    usage = response.get("usage")
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return content, finish, token_count(usage.get("total_tokens")) if isinstance(usage, dict) else None, refusal


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------


class SqliteStore:
    """An SQLite file shared by threads (one connection under a lock) and by processes (busy time-out, WAL).

    Subclasses give the table in ``SCHEMA`` and use :meth:`_query` / :meth:`_write`.

    Args:
        path: The SQLite file (its folder is created), or None for a store that holds nothing.
    """

    SCHEMA = ""
    TIMEOUT = 60.0  # seconds a statement waits for another process's lock (opening the file included)

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # The busy time-out lets several processes (one per language, say) share a file; WAL keeps their
            # readers and the writer apart.
            self._db = sqlite3.connect(path, timeout=self.TIMEOUT, check_same_thread=False)
            try:
                self._set_up()
            except BaseException:
                self._db.close()
                self._db = None
                raise

    def _set_up(self) -> None:
        """Switch to WAL and create the table, retrying while another process holds the file locked.

        The busy time-out does not cover the switch to WAL: SQLite answers "database is locked" at once, without
        waiting, when another connection holds a write lock (a process creating the table of the same fresh file,
        two judge or translate runs started together on one ``--cache``). Both statements are idempotent, so they
        are retried, with short growing pauses, for as long as the time-out would have waited.
        """
        deadline = time.monotonic() + self.TIMEOUT
        pause = 0.005
        while True:
            try:
                with self._lock, self._db:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute(self.SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                left = deadline - time.monotonic()
                if not _is_locked(exc) or left <= 0:
                    raise
            # Jitter: processes that collided do not collide again. The last try is at the deadline.
            time.sleep(min(left, pause * (1 + random.random())))
            pause = min(2 * pause, 0.25)

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def _query(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._db is None:
            return None
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run one statement and commit at once: a kill right after loses nothing that was paid for."""
        if self._db is None:
            return
        with self._lock, self._db:
            self._db.execute(sql, params)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock (worth a retry)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; the message before
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def request_key(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int | None) -> str:
    """A stable key for one request: anything that could change the reply is in it."""
    blob = json.dumps({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache(SqliteStore):
    """Chat replies keyed by :func:`request_key`; what goes in is decided by the client's ``accept`` check.

    Args:
        path: The SQLite file (created), or None for no caching.
    """

    SCHEMA = "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, content TEXT, created REAL)"

    def get(self, key: str) -> str | None:
        row = self._query("SELECT content FROM replies WHERE key = ?", (key,))
        return row[0] if row else None

    unwritable: str | None = None  # why puts stopped (said once), when the file could not be written

    def put(self, key: str, model: str, content: str) -> None:
        """Keep a reply. A cache that cannot be written (a full disk) is said once on stderr and written no more: the
        reply, paid for, is still used (the error ended a judging run, and the reviews of replies in flight were
        lost)."""
        if self.unwritable is not None:
            return
        try:
            self._write("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, model, content, time.time()))
        except sqlite3.Error as exc:
            self.unwritable = str(exc)
            print(f"warning: the reply cache {self.path} cannot be written ({exc}): replies are used but no longer "
                  "cached", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------


class ChatClient:
    """Chat completions from an OpenAI-compatible endpoint with the retry policy and cache of this module.

    Thread-safe: one instance is shared by worker threads.

    Args:
        model: The model id sent with each request (and part of the cache key).
        api_key: The API key (local servers accept any).
        base_url: The endpoint, e.g. ``http://127.0.0.1:8000/v1`` (None: ``$OPENAI_BASE_URL``, else OpenAI).
        temperature: Sampling temperature.
        max_tokens: Reply length limit, or None (or 0) to leave it to the server.
        max_retries: Retries after the first attempt, for retryable errors.
        backoff: Base delay in seconds (doubles on every retry).
        max_backoff: Cap on one wait, Retry-After included.
        timeout: Seconds per HTTP request.
        cache: A :class:`ReplyCache`, or None for none.
        sleep: How to wait (tests pass a recorder).

    Attributes:
        stats: Counters: ``requests`` (attempts), ``retries``, ``failed_requests``, ``tokens``, ``cache_hits``,
            and whatever the caller adds through :meth:`count`.
    """

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None, *,
                 temperature: float = 0.0, max_tokens: int | None = None, max_retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = DEFAULT_MAX_BACKOFF, timeout: float = 120.0,
                 cache: ReplyCache | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache = cache or ReplyCache(None)
        self.sleep = sleep  # public so tests can record the waits
        self.timeout = timeout
        self._client = openai.OpenAI(api_key=api_key or "EMPTY", base_url=base_url, max_retries=0, timeout=timeout)
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key`` (thread-safe)."""
        with self._lock:
            self.stats[key] += n

    def complete(self, messages: list[dict[str, str]], accept: Callable[[str], bool] | None = None) -> Completion:
        """One chat completion, from the cache or with bounded retries.

        Args:
            messages: The chat messages.
            accept: Whether a reply may be cached and served from the cache (default: any reply). A cached reply
                it no longer takes (say, from an older parser) is asked for again.

        Returns:
            The reply (a reply ``accept`` rejects is still returned; it is only not cached).

        Raises:
            RequestFailed: After a non-retryable error, or when the retries are used up.
        """
        key = None
        if self.cache.enabled:
            key = request_key(self.model, messages, self.temperature, self.max_tokens)
            cached = self.cache.get(key)
            if cached is not None and (accept is None or accept(cached)):
                self.count("cache_hits")
                return Completion(cached, None, calls=0, cached=True)
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:  # None or 0: the server's limit
            kwargs["max_tokens"] = self.max_tokens
        for attempt in range(self.max_retries + 1):
            self.count("requests")
            try:
                content, finish_reason, tokens, refusal = _reply_of(self._read(kwargs))
            except (openai.OpenAIError, ValueError) as exc:
                if not is_retryable(exc) or attempt == self.max_retries:
                    self.count("failed_requests")
                    raise RequestFailed(attempt + 1, describe(exc)) from exc
                self.count("retries")
                hint = retry_after_seconds(_headers_of(exc))
                self.sleep(retry_delay(attempt, self.backoff, self.max_backoff, hint))
                continue
            self.count("tokens", tokens or 0)
            # A reply the server cut (at max_tokens, or by its content filter) is never served again: read from the
            # cache it would look whole.
            if (key is not None and refusal is None and finish_reason not in ("length", "content_filter")
                    and (accept is None or accept(content))):
                self.cache.put(key, self.model, content)
            return Completion(content, finish_reason, calls=attempt + 1, refusal=refusal)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _read(self, kwargs: dict[str, Any]) -> bytes:
        """One chat completion's body, whole within ``timeout`` seconds.

        The HTTP client's time-out bounds each read: a server dripping its body a byte at a time (a stuck backend
        behind a proxy that keeps the connection alive) held a request, and the run, for as long as it dripped.
        The body is read here piece by piece against a deadline instead.

        Raises:
            openai.APITimeoutError: The body took longer than ``timeout``, or a read of it timed out (retried as
                other time-outs).
            openai.APIConnectionError: The connection broke while the body was read.
            openai.OpenAIError: As the SDK raises them (an error status, a failed connection).
        """
        import openai

        deadline = time.monotonic() + self.timeout
        with self._client.chat.completions.with_streaming_response.create(**kwargs) as response:
            body = bytearray()
            try:
                for piece in response.iter_bytes():
                    body += piece
                    if time.monotonic() > deadline:
                        raise openai.APITimeoutError(request=response.http_request)
            except openai.OpenAIError:
                raise
            except Exception as exc:
                # Reading the body raises the HTTP library's own errors (httpx or httpx2, as the SDK's version
                # has it), which the SDK turns into its own only while it sends: made the SDK's here, so that a
                # connection dropped mid-body, or silent past the time-out, is retried as any other.
                if "timeout" in type(exc).__name__.lower():
                    raise openai.APITimeoutError(request=response.http_request) from exc
                raise openai.APIConnectionError(request=response.http_request) from exc
            return bytes(body)
