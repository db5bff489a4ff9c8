"""The translator: one text through mask -> chat model -> clean -> check (-> stricter retry) -> restore, cached.

Requests go through :class:`palo.openai_client.ChatClient` (bounded retries, ``Retry-After``, failures as
:class:`RequestFailed`), the same client the LLM judge uses. Caching is per (model, language, *masked* source text)
in :class:`~palo.data.translate.cache.TranslationCache` rather than per request, because a translation's outcome
(accepted or rejected with its problems) spans up to two requests. The masked text is what the model sees, so texts
that differ only in their numbers, coordinates or code ("It is at [0.12, ...]" in thousands of samples) are one
request; each gets its own spans back when the cached masked translation is restored.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from concurrent.futures import Future

from palo.data.translate.cache import TranslationCache
from palo.data.translate.check import check_translation, has_words
from palo.data.translate.cleaning import clean_reply
from palo.data.translate.prompts import system_prompt
from palo.data.translate.spans import Masked, mask, restore
from palo.openai_client import DEFAULT_MAX_BACKOFF, ChatClient, RequestFailed

__all__ = ["ModelRefused", "RequestFailed", "TextResult", "Translator", "settings_error"]

# HTTP statuses with which an endpoint turns down one request for what it holds (400: context length exceeded or a
# content filter, 413: too large, 422: unprocessable). Asking again gets the same answer, so such a text is rejected
# like a bad reply, as is a reply the model itself refused (:class:`ModelRefused`). Other non-retryable statuses (401
# key, 403, 404 model) are about the run's settings, not the text: every request would fail alike, so they stop the
# run (:func:`settings_error`) and leave its samples unfinished, as a rerun with the settings fixed can succeed.
REFUSED_STATUSES = frozenset({400, 413, 422})


# What a non-retryable status about the run's settings means, for the message that stops the run.
SETTINGS_STATUSES = {
    401: "the endpoint refused the API key (HTTP 401): check --api_key (or $OPENAI_API_KEY)",
    403: "the endpoint denied access (HTTP 403): check --api_key and that it may use --model",
    404: "the endpoint has no such model or path (HTTP 404): check --model and --base_url",
}


def refusal(exc: RequestFailed) -> str | None:
    """Why the endpoint refused the request itself, or None for any other failure (retries used up, wrong key)."""
    # ChatClient raises RequestFailed from the SDK's error, which carries the HTTP status.
    status = getattr(exc.__cause__, "status_code", None)
    return exc.last_error if status in REFUSED_STATUSES else None


def settings_error(exc: BaseException) -> str | None:
    """What to fix when ``exc`` is a failure every request of the run would meet (a wrong key, a model or URL the
    endpoint does not have: HTTP 401, 403, 404), with what the server said; None for any other failure."""
    if not isinstance(exc, RequestFailed):
        return None
    what = SETTINGS_STATUSES.get(getattr(exc.__cause__, "status_code", None))
    return None if what is None else f"{what} ({exc.last_error})"


class ModelRefused(Exception):
    """A 200 reply whose message declines instead of answering (OpenAI's ``refusal``, no content): the model answers
    the same text the same way, so it is rejected as the endpoint's own refusal is."""


@dataclasses.dataclass
class TextResult:
    """The outcome of translating one text.

    Attributes:
        translation: The restored translation (for a rejected one: the last attempt, restored where possible).
        problems: Why it was rejected; empty when accepted.
        cached: Whether it came from the cache (or from an identical text earlier in this run).
    """

    translation: str
    problems: list[str]
    cached: bool = False


class Translator:
    """Translates texts through an OpenAI-compatible chat endpoint: masking, checking, retries, cache.

    Thread-safe: one instance is shared by the worker threads. Identical texts in flight at the same time are
    translated once (the other threads wait for that result), so "nothing sent twice" holds within a run too.

    Args:
        model: The model id sent with each request (and part of the cache key).
        api_key: The API key (local servers accept any).
        base_url: The endpoint, e.g. ``http://127.0.0.1:8000/v1``.
        cache: Accepted translations; may be shared with other runs.
        max_retries: Retries after the first attempt for retryable errors.
        backoff: Base delay in seconds; retry k waits ``backoff * 2**k`` (+ jitter), at least Retry-After, at most
            ``max_backoff``.
        max_backoff: Cap on one wait, in seconds.
        timeout: Seconds per HTTP request.
        temperature: Sampling temperature (low: translations should be faithful, not creative).
        max_tokens: Reply length limit, or None for the server's.
        retry_rejected: Ask again for texts whose cached translation was rejected (once per run); the runner then
            also retranslates the samples its resume log holds as corrupt.
    """

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None,
                 cache: TranslationCache | None = None, max_retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, timeout: float = 120.0, temperature: float = 0.0,
                 max_tokens: int | None = None, retry_rejected: bool = False) -> None:
        self.model = model
        self.cache = cache or TranslationCache(None)
        self.retry_rejected = retry_rejected
        # No request-level cache: the translation cache above answers before any request is built.
        self.chat = ChatClient(model, api_key=api_key, base_url=base_url, temperature=temperature,
                               max_tokens=max_tokens, max_retries=max_retries, backoff=backoff,
                               max_backoff=max_backoff, timeout=timeout)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future] = {}

    @property
    def stats(self) -> Counter[str]:
        """Request counters (the client's ``requests``, ``retries``, ``tokens`` ... and ``cache_hits``,
        ``strict_retries``, ``rejected``, ``refused``), reported at the end of a run."""
        return self.chat.stats

    def _count(self, key: str, n: int = 1) -> None:
        self.chat.count(key, n)

    def _attempt(self, masked: Masked, language: str, problems: list[str] | None) -> tuple[str, list[str]]:
        messages = [{"role": "system", "content": system_prompt(language, problems)},
                    {"role": "user", "content": masked.text}]
        completion = self.chat.complete(messages)
        if completion.refusal is not None:
            raise ModelRefused(completion.refusal)
        content, finish = completion.content, completion.finish_reason
        reply = clean_reply(content, masked.text)
        found = check_translation(masked.text, reply, language, len(masked.spans))
        if finish == "length":
            found.insert(0, "reply cut off (max tokens)")
        elif finish not in ("stop", None):  # None: a server that does not say (or a cached reply)
            # "content_filter" and the like: the reply is cut off or altered, however well it reads.
            found.insert(0, f"generation stopped by {finish!r}, not 'stop'")
        return reply, found

    def _translate_uncached(self, masked: Masked, language: str) -> TextResult:
        """The masked translation of ``masked`` (accepted, or rejected with its problems), cached.

        A request the endpoint refuses (:func:`refusal`), or a reply the model refused (:class:`ModelRefused`), is a
        rejection whose "translation" is the English text.

        Raises:
            RequestFailed: For any other failure; nothing is cached then.
        """
        try:
            reply, problems = self._attempt(masked, language, None)
            if problems:
                self._count("strict_retries")
                reply, problems = self._attempt(masked, language, problems)
        except RequestFailed as exc:
            reason = refusal(exc)
            if reason is None:
                raise
            self._count("refused")
            reply, problems = masked.text, [f"request refused: {reason}"]
        except ModelRefused as exc:  # as the endpoint's 400: the same text would be refused again
            self._count("refused")
            reply, problems = masked.text, [f"request refused: the model declined (refusal): {exc}"]
        self.cache.put(self.model, language, masked.text, reply, problems)
        if problems:
            self._count("rejected")
        return TextResult(reply, problems)

    def _lookup(self, masked: Masked, text: str, language: str) -> TextResult | None:
        cached = self.cache.get(self.model, language, masked.text)
        if cached is None and masked.spans:
            # A cache written before keys were masked holds the restored translation under the raw text; a masked
            # key never equals a raw text that has spans, so this finds only such entries.
            legacy = self.cache.get(self.model, language, text)
            if legacy is not None and not (legacy[1] and self.retry_rejected):
                return TextResult(legacy[0], legacy[1], cached=True)
        if cached is None or (cached[1] and self.retry_rejected):
            return None
        return TextResult(restore(cached[0], masked.spans), cached[1], cached=True)

    def translate(self, text: str, language: str) -> TextResult:
        """Translate one text (no ``<image>`` in it) into ``language``.

        A text with nothing to translate once its numbers, coordinates and code are masked (e.g. a turn that is
        only a bounding box) is returned as it is, without a request.

        Raises:
            RequestFailed: When the endpoint kept failing; nothing is cached then. A request it refused for its
                content (HTTP 400/413/422, or a reply with a ``refusal`` and no content) is not raised but rejected,
                with a ``request refused: ...`` problem.
        """
        masked = mask(text)
        if not has_words(masked.text):
            return TextResult(text, [], cached=True)
        found = self._lookup(masked, text, language)
        if found is not None:
            self._count("cache_hits")
            return found
        key = (language, masked.text)
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                # Asked again under the lock: an owner that finished between the lookup above and here has cached
                # its result and left the memo, and this text must not be sent a second time.
                found = self._lookup(masked, text, language)
                if found is not None:
                    self._count("cache_hits")
                    return found
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        if owner:
            try:
                result = self._translate_uncached(masked, language)
            except BaseException as exc:
                with self._lock:
                    del self._inflight[key]  # a later sample may try again
                future.set_exception(exc)
                raise
            future.set_result(result)
            with self._lock:  # the cache answers from now on (with retry_rejected, the memo keeps a rejection once;
                # without a cache file, the memo keeps every result: each text is sent once a run either way)
                if self.cache.path and not (result.problems and self.retry_rejected):
                    del self._inflight[key]
        else:
            result = future.result()  # re-raises the owner's RequestFailed
            self._count("cache_hits")
        return TextResult(restore(result.translation, masked.spans), result.problems, cached=not owner)
