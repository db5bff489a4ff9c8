"""The LLM judge: rubric, request layout, score parsing, and the judge call through the shared chat client.

The protocol is the LLaVA-Bench one (docs/formats.md §6): the judge sees a text description of the image, the
question, the reference answer as "Assistant 1" and the evaluated model as "Assistant 2", and replies with two
1-10 scores on its first line followed by an explanation.

What this judge does beyond the original protocol (a tolerant score parser, failed judgments that are never scores,
bounded retries through :mod:`palo.openai_client`, an SQLite reply cache of parsed replies), and why:
docs/compat.md#evaluation.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from palo.openai_client import DEFAULT_MAX_BACKOFF, ChatClient, ReplyCache, RequestFailed, request_key

__all__ = [
    "DEFAULT_JUDGE_MODEL",
    "DEFAULT_RULES",
    "JudgeClient",
    "Judgment",
    "ReplyCache",
    "RuleError",
    "ScoreParseError",
    "build_messages",
    "build_user_content",
    "load_rules",
    "parse_scores",
    "request_key",
    "rule_for",
]

# The judge's system message of the original protocol (a protocol string, kept so --rule reproduces it exactly).
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."

DEFAULT_JUDGE_MODEL = "gpt-4o"
DEFAULT_TEMPERATURE = 0.2  # the original's judge temperature

# Our rubric, written for this project, following the protocol of docs/formats.md §6: two assistants, one 1-10 score
# each, the two scores alone on the first line, then a justification that does not depend on the order of the answers.
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
    if not os.path.isfile(path):
        # The original scripts pass palo/eval/table/rule.json, a file of LLaVA's repository that PALO's never held.
        raise RuleError(f"{path}: no such rule file (the original rule.json is LLaVA's llava/eval/table/rule.json; "
                        "without -r/--rule the built-in rubric is used)")
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
    """The judge's user message in the original layout (docs/formats.md §6), byte for byte."""
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


def _parses(reply: str) -> bool:
    try:
        parse_scores(reply)
    except ScoreParseError:
        return False
    return True


class JudgeClient:
    """Scores judge requests through :class:`palo.openai_client.ChatClient` (bounded retries, reply cache).

    Args:
        model: The judge model id (written into every review).
        api_key: The API key (local servers accept any).
        base_url: The endpoint (``https://api.openai.com/v1`` when None, or ``OPENAI_BASE_URL``).
        max_tokens: Reply length limit.
        temperature: Sampling temperature (0.2 in the original).
        max_retries: Retries after the first attempt on retryable errors.
        backoff: Base delay in seconds; retry k waits ``backoff * 2**k`` (plus jitter), at least Retry-After, at
            most ``max_backoff``.
        timeout: Seconds per HTTP request.
        cache: A :class:`ReplyCache` (or None).
        max_backoff: Cap on one wait, in seconds.
    """

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, api_key: str | None = None, base_url: str | None = None,
                 max_tokens: int = 1024, temperature: float = DEFAULT_TEMPERATURE, max_retries: int = 5,
                 backoff: float = 1.0, timeout: float = 120.0, cache: ReplyCache | None = None,
                 max_backoff: float = DEFAULT_MAX_BACKOFF) -> None:
        self.model = model
        self.chat = ChatClient(model, api_key=api_key, base_url=base_url, temperature=temperature,
                               max_tokens=max_tokens, max_retries=max_retries, backoff=backoff,
                               max_backoff=max_backoff, timeout=timeout, cache=cache)

    def judge(self, user_content: str) -> Judgment:
        """Score one request; never raises for API or parse problems (they become a failed :class:`Judgment`)."""
        try:
            reply = self.chat.complete(build_messages(user_content), accept=_parses)
        except RequestFailed as exc:
            return Judgment("", None, failed=True, reason=f"request failed {exc}", calls=exc.attempts)
        try:
            scores = parse_scores(reply.content)
        except ScoreParseError as exc:
            return Judgment(reply.content, None, failed=True, reason=f"unparseable reply: {exc}", calls=reply.calls)
        return Judgment(reply.content, scores, failed=False, calls=reply.calls, cached=reply.cached)
