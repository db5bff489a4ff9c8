"""The LLM judge: rubric, request layout, score parsing, and a retrying, cached OpenAI-compatible client.

The protocol is the LLaVA-Bench one (formats reference §6): the judge sees a text description of the image, the
question, the reference answer as "Assistant 1" and the evaluated model as "Assistant 2", and replies with two
1-10 scores on its first line followed by an explanation.

Differences from the original, each on purpose:

* the score parser accepts the formats judges really produce ("8, 9", "Scores: 8/10 and 9/10", one assistant per
  line ...), where the original split the first line on single spaces and so rejected "8, 9";
* a request that still fails after bounded retries, or a reply that cannot be parsed, is a *failed* judgment that
  carries its reason; it is never turned into a score (the original wrote [-1, -1] and averaged it);
* retries are bounded with exponential backoff (the original retried forever every 0.5 s);
* replies are cached in SQLite by (judge model, request), so a rerun costs no API calls for what was judged.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass

# The judge's system message of the original protocol (a protocol string, kept so --rule reproduces it exactly).
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."

DEFAULT_JUDGE_MODEL = "gpt-4o"
DEFAULT_TEMPERATURE = 0.2  # the original's judge temperature

# Our rubric, written for this project, following the §6 protocol: two assistants, one 1-10 score each, the two
# scores alone on the first line, then a justification that does not depend on the order of the answers.
_RUBRIC = (
    "We want your opinion on how well two AI assistants answered the user question shown above. Both were shown "
    "an image that you cannot see; the [Context] gives a faithful written description of it, so treat it as "
    "what the image contains.\n"
    "Judge each answer for helpfulness, relevance, accuracy with respect to the image and the question, and an "
    "appropriate level of detail. Give each assistant one overall score from 1 to 10, where a higher score means "
    "a better answer. Answers may be written in any language; judge the content, and prefer an answer in the "
    "language of the question.\n"
    "Reply in this format. The first line holds only the two scores, Assistant 1 first, then Assistant 2, "
    "separated by a single space. Starting on the next line, explain your scores. Be impartial: the order in "
    "which the answers appear must not affect your judgment."
)
DEFAULT_RULES: dict[str, dict[str, str]] = {
    f"llava_bench_{category}": {"role": "Assistant", "prompt": _RUBRIC} for category in ("conv", "detail", "complex")
}

MAX_SCORE = 10.0


class RuleError(KeyError):
    """The rule file has no rule for a question's category."""


def load_rules(path: str | None) -> dict[str, dict[str, str]]:
    """The rules: our rubric, or an original ``rule.json`` (keys ``llava_bench_<category>``, each role + prompt)."""
    if path is None:
        return DEFAULT_RULES
    with open(path, encoding="utf-8") as f:
        try:
            rules = json.load(f)
        except json.JSONDecodeError as exc:
            raise RuleError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(rules, dict):
        raise RuleError(f"{path}: expected a JSON object of rules")
    return rules


def rule_for(rules: dict[str, dict[str, str]], category: str) -> dict[str, str]:
    """The rule for a question category (``conv`` -> ``llava_bench_conv``).

    Raises:
        RuleError: If the rules have none (the message lists what they do have).
    """
    key = f"llava_bench_{category}"
    if key not in rules or "prompt" not in rules[key]:
        raise RuleError(f"no rule '{key}' with a 'prompt' (rules have: {', '.join(sorted(rules))})")
    return rules[key]


def build_user_content(context: str, question: str, answer1: str, answer2: str, rule: dict[str, str]) -> str:
    """The judge's user message in the original layout (§6), byte for byte."""
    role = rule.get("role", "Assistant")
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )


def build_messages(user_content: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_content}]


# ---------------------------------------------------------------------------------------------------------------
# Score parsing
# ---------------------------------------------------------------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
# "8/10", "8 / 10", "8 out of 10": the denominator is not a score.
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of)\s*10(?:\.0+)?\b", re.IGNORECASE)
# "Assistant 1", "Assistant #2", "Assistant1": the 1/2 is a label, not a score.
_LABEL = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*([12])\b", re.IGNORECASE)
# Markdown emphasis and heading marks around scores ("**8** **9**", "# 8 9").
_MARKUP = re.compile(r"[*_`#]")


class ScoreParseError(ValueError):
    """A judge reply without two recognisable scores."""


def _numbers(text: str) -> list[float]:
    text = _DENOMINATOR.sub("", text)
    text = _LABEL.sub(" ", text)
    return [float(x) for x in re.findall(rf"(?<![\w.]){_NUMBER}(?![\w.]*\d)", text)]


def _labelled(text: str) -> list[float] | None:
    """Scores written per assistant anywhere in the reply ("Assistant 1: 8 ... Assistant 2: 9")."""
    found: dict[str, float] = {}
    for match in re.finditer(rf"\bassistant\s*#?\s*([12])\b[^0-9\n]{{0,40}}?({_NUMBER})(?:\s*(?:/|out\s+of)\s*10)?",
                             text, re.IGNORECASE):
        found.setdefault(match.group(1), float(match.group(2)))
    if "1" in found and "2" in found:
        return [found["1"], found["2"]]
    return None


def parse_scores(reply: str) -> tuple[float, float]:
    """Two scores (Assistant 1, Assistant 2) from a judge reply.

    Tried in order: the first line that holds a number, which must then hold exactly two scores once labels
    ("Assistant 1") and denominators ("/10") are removed; otherwise per-assistant labels anywhere in the reply.

    Args:
        reply: The judge's raw reply.

    Returns:
        The two scores, each in [0, 10].

    Raises:
        ScoreParseError: If no two scores in range can be read.
    """
    if not reply or not reply.strip():
        raise ScoreParseError("empty reply")
    for line in reply.splitlines():
        line = _MARKUP.sub("", line).strip()
        if not re.search(r"\d", line):
            continue
        numbers = _numbers(line)
        if len(numbers) == 2:
            scores = (numbers[0], numbers[1])
            break
        labelled = _labelled(_MARKUP.sub("", reply))
        if labelled is None:
            raise ScoreParseError(f"expected two scores on the first line, found {len(numbers)}: {line[:80]!r}")
        scores = (labelled[0], labelled[1])
        break
    else:
        raise ScoreParseError(f"no scores in the reply: {reply.strip()[:80]!r}")
    if not all(0 <= s <= MAX_SCORE for s in scores):
        raise ScoreParseError(f"scores {scores} are outside 0..{MAX_SCORE:g}")
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


def request_key(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
    """A stable key for one judge request: anything that could change the reply is in it."""
    blob = json.dumps({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Judge replies in an SQLite file, keyed by :func:`request_key`; safe across threads and processes.

    Only replies that parsed are stored: a rerun asks again for anything that failed.

    Args:
        path: The SQLite file (created), or None for no caching.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = None
        if path:
            # One connection shared by the worker threads under a lock; the timeout lets several processes (one
            # per language) share a file.
            self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
            with self._lock, self._db:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, content TEXT, created REAL)"
                )

    def get(self, key: str) -> str | None:
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT content FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, content: str) -> None:
        if self._db is None:
            return
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, model, content, time.time()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# ---------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Judgment:
    """The outcome of one judge request.

    Attributes:
        content: The raw reply ("" when no reply came).
        scores: (Assistant 1, Assistant 2), or None when failed.
        failed: True when the call failed or the reply could not be parsed.
        reason: Why it failed.
        calls: HTTP attempts made (0 for a cache hit).
        cached: Whether the reply came from the cache.
    """

    content: str
    scores: tuple[float, float] | None
    failed: bool
    reason: str | None = None
    calls: int = 0
    cached: bool = False


def _retryable(exc: Exception) -> bool:
    """429, 408/409, 5xx, time-outs and dropped connections are worth retrying; other 4xx are not."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def _retry_after(exc: Exception) -> float | None:
    """The server's Retry-After (seconds), when it sent one."""
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} (HTTP {status})" if status else name


class JudgeClient:
    """Calls an OpenAI-compatible chat endpoint with bounded retries and a reply cache.

    Args:
        model: The judge model id (written into every review).
        api_key: The API key (local servers accept any).
        base_url: The endpoint (``https://api.openai.com/v1`` when None, or ``OPENAI_BASE_URL``).
        max_tokens: Reply length limit.
        temperature: Sampling temperature (0.2 in the original).
        max_retries: Retries after the first attempt on retryable errors.
        backoff: Base delay in seconds; attempt k waits ``backoff * 2**k`` (plus jitter, capped at 60 s).
        timeout: Seconds per HTTP request.
        cache: A :class:`ReplyCache` (or None).
    """

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, api_key: str | None = None, base_url: str | None = None,
                 max_tokens: int = 1024, temperature: float = DEFAULT_TEMPERATURE, max_retries: int = 5,
                 backoff: float = 1.0, timeout: float = 120.0, cache: ReplyCache | None = None) -> None:
        import openai

        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_retries = max_retries
        self.backoff = backoff
        self.cache = cache or ReplyCache(None)
        # The SDK's own retries are off: ours are bounded, logged, counted and honour the backoff setting.
        self._client = openai.OpenAI(api_key=api_key or "EMPTY", base_url=base_url, max_retries=0, timeout=timeout)

    def _sleep(self, attempt: int, exc: Exception) -> None:
        delay = self.backoff * (2 ** attempt) * (1 + 0.1 * random.random())
        hinted = _retry_after(exc)
        if hinted is not None:
            delay = max(delay, hinted)
        time.sleep(min(delay, 60.0))

    def judge(self, user_content: str) -> Judgment:
        """Score one request; never raises for API or parse problems (they become a failed :class:`Judgment`)."""
        import openai

        messages = build_messages(user_content)
        key = request_key(self.model, messages, self.temperature, self.max_tokens)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                return Judgment(cached, parse_scores(cached), failed=False, cached=True)
            except ScoreParseError:
                pass  # a cache written by another parser version: ask again
        calls = 0
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            calls += 1
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                )
            except openai.OpenAIError as exc:
                last_error = f"{_describe(exc)}: {str(exc)[:200]}"
                if _retryable(exc) and attempt < self.max_retries:
                    self._sleep(attempt, exc)
                    continue
                attempts = f"after {calls} attempt(s)"
                return Judgment("", None, failed=True, reason=f"request failed {attempts}: {last_error}", calls=calls)
            content = (response.choices[0].message.content or "") if response.choices else ""
            try:
                scores = parse_scores(content)
            except ScoreParseError as exc:
                return Judgment(content, None, failed=True, reason=f"unparseable reply: {exc}", calls=calls)
            self.cache.put(key, self.model, content)
            return Judgment(content, scores, failed=False, calls=calls)
        return Judgment("", None, failed=True, reason=f"request failed: {last_error}", calls=calls)
