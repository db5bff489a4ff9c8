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

# Signed, so that "-3" is read as -3 and fails the range check instead of passing as 3.
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# "8/10", "8 / 10", "8 out of 10": the denominator is not a score.
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of)\s*10(?:\.0+)?\b", re.IGNORECASE)
# "Assistant 1", "Assistant #2", "Assistant1": the 1/2 is a label, not a score.
_LABEL_WORD = r"\b(?:assistant|answer|response)\s*#?\s*"
_LABEL = re.compile(_LABEL_WORD + r"([12])\b", re.IGNORECASE)
# A label and its score on one line ("Assistant 1: 8", "Assistant 1 receives a score of 6"). The gap between them
# holds no digit and no other label, so "Assistant 1 with Assistant 2: 5" does not give Assistant 1 a 2.
# The number must not count something: a word after it is one a score takes ("8 points", "6 while", "9 for its
# detail", the next label), not a noun ("Assistant 2 lists 3 reasons", "mentions 2 dogs").
_SCORE_FOLLOWER = (r"(?:points?|pts|and|or|while|but|whereas|because|for|since|as|respectively|overall|compared|with|"
                   r"assistant|answer|response)\b")
# Nor is a number that is one end of a range or a choice ("7-8", "3 to 4", "7 or 8"), an approximation ("~8"), or
# a decimal comma's whole part ("8,5"): which score the judge meant is a guess, so the parse fails.
_LABELLED = re.compile(
    rf"{_LABEL_WORD}([12])\b(?:(?!{_LABEL_WORD}[12]\b)[^\d\n]){{0,40}}?(?<![~\u2248])({_NUMBER})(?![\d.]*\d)"
    rf"(?!\s*(?!{_SCORE_FOLLOWER})[^\W\d_])(?!\s*(?:[-\u2013\u2014~]|to\b|or\b)\s*[-+]?\d)(?!,\d)",
    re.IGNORECASE,
)
# A scale other than 10 left on a line once "/10" and "out of 10" are gone ("1/5", "8/20", "(out of 5)"): its numbers
# are not scores out of 10, and rescaling them would be a guess too.
_OTHER_SCALE = re.compile(r"(?:/|\bout\s+of)\s*\d", re.IGNORECASE)
# A line that starts with its first number ("8 9 - Assistant 2 is better as it names 2 dogs"): the pair the rule
# asks for comes first, whatever the explanation after it says.
_LEADING_NUMBER = re.compile(rf"^[\[(]?\s*{_NUMBER}")
# Two unlabelled scores on a line: words without digits may come before them ("Scores:", "I give"); the two numbers
# are side by side with at most one separator ("8 9", "8, 9", "[6, 4]", "8 and 7"); after them, only what a
# punctuation mark sets apart: text that holds no digit, or that begins with a word ("8 9 (Assistant 2 is better)",
# "8 9. Both are fine", "8 9 - Assistant 2 names 2 dogs"), never a third number ("8 9, 10"). A judge writing in the
# answers' language uses that script's commas and stops ("８，７。", "٨، ٧"); \d already reads its digits.
_PAIR = re.compile(
    rf"^\D*?[\[(]?\s*({_NUMBER})(?:\s*(?:[,;&，、،；]|\band\b|\bvs\b\.?)\s*|\s+)({_NUMBER})\s*[\])]?"
    r"(?:\s*[-\u2013\u2014(:;,.!，。；：！（、،](?:\s*[^\W\d_].*|\D*))?$",
    re.IGNORECASE,
)
# Markdown emphasis and heading marks around scores ("**8** **9**", "# 8 9").
_MARKUP = re.compile(r"[*_`#]")
# A list marker at the start of a line ("1. ", "2) ", "- "): "1. 8" holds one score, not two.
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,2}[.)]|[-+•])\s+")
# A reasoning model's thoughts, which mention numbers that are not the scores; an unclosed block runs to the end.
_THINKING = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)


class ScoreParseError(ValueError):
    """A judge reply without two recognisable scores."""


def _without_thinking(reply: str) -> str:
    text = _THINKING.sub("", reply)
    end = text.lower().rfind("</think>")  # a server that put the opening tag in the prompt sends only the close
    return text[end + len("</think>"):] if end >= 0 else text


# Runs of white space, one space each before the patterns see a line: _DENOMINATOR and _PAIR begin with optional
# space and rescanned a run from each position inside it (a reply with 16,000 spaces took 9 s to parse).
_SPACES = re.compile(r"\s+")


def _clean(line: str) -> str:
    return _LIST_MARKER.sub("", _DENOMINATOR.sub("", _MARKUP.sub("", _SPACES.sub(" ", line)))).strip()


def _labelled(line: str) -> dict[str, float]:
    """Scores given by label on one line, the first per label."""
    found: dict[str, float] = {}
    for match in _LABELLED.finditer(line):
        found.setdefault(match.group(1), float(match.group(2)))
    return found


def parse_scores(reply: str) -> tuple[float, float]:
    """Two scores (Assistant 1, Assistant 2) from a judge reply.

    A ``<think>`` block is dropped first. Then the first line that holds a number other than a label's decides:

    * if it begins with two scores side by side ("8 9 - Assistant 2 names 2 dogs"), they are the scores;
    * if it gives a score by label ("Assistant 2: 9, Assistant 1: 3"), the labels decide, this line and the next
      ones that begin with a label ("Assistant 1: 8\\nAssistant 2: 9"), whatever the order; a number followed by
      a noun counts something ("Assistant 2 lists 3 reasons") and is not a score;
    * otherwise the line must hold two scores side by side, Assistant 1 first, and no other number ("8 9", "8, 9",
      "Scores: 8/10 and 9/10", "**7** **10**", "8 9 (Assistant 2 is better)");
    * a line that ends with a colon introduces what follows ("Evaluation of question 3 about image 001.jpg:") and
      is passed over; any other line with numbers fails the parse rather than being guessed at.

    List markers ("1. 8") and denominators ("/10", "out of 10") are not scores. A range, a choice or an approximation
    ("7-8", "7 or 8", "~8") and a scale other than 10 ("4/5", "out of 5") fail the parse: which score out of 10 was
    meant would be a guess.

    Args:
        reply: The judge's raw reply.

    Returns:
        The two scores, each in [0, 10].

    Raises:
        ScoreParseError: If no two scores in range can be read.
    """
    if not reply or not reply.strip():
        raise ScoreParseError("empty reply")
    lines = [_clean(line) for line in _without_thinking(reply).splitlines()]

    def on_scale(line: str) -> str:
        if _OTHER_SCALE.search(line):
            raise ScoreParseError(f"scores on another scale than 10: {line[:80]!r}")
        return line

    for index, line in enumerate(lines):
        unlabelled = _LABEL.sub(" ", line)
        pair = _PAIR.match(unlabelled)
        if pair is not None and _LEADING_NUMBER.match(line):
            on_scale(line)
            scores = (float(pair.group(1)), float(pair.group(2)))
            break
        found = _labelled(line)
        if found:
            on_scale(line)
            # Further scores by label only from lines that begin with one ("Assistant 2: 9"), never from the
            # explanation's prose.
            for later in lines[index + 1:]:
                if _LABEL.match(later):
                    for label, score in _labelled(on_scale(later)).items():
                        found.setdefault(label, score)
            if "1" not in found or "2" not in found:
                raise ScoreParseError(f"a score for one assistant only: {line[:80]!r}")
            scores = (found["1"], found["2"])
            break
        if not re.search(r"\d", unlabelled):
            continue
        if pair is not None:
            on_scale(line)
            if len({label.group(1) for label in _LABEL.finditer(line)}) == 1:  # "Assistant 1: 8,5": not 8 and 5
                raise ScoreParseError(f"two numbers after one assistant's label: {line[:80]!r}")
            scores = (float(pair.group(1)), float(pair.group(2)))
            break
        if line.endswith(":"):
            continue
        raise ScoreParseError(f"expected two scores on the first line with numbers: {on_scale(line)[:80]!r}")
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

    def fingerprint(self, user_content: str) -> str:
        """What identifies the request for ``user_content``: the reply cache's key (judge model, messages,
        temperature, max_tokens), so a review made for it can be told from one made for another request."""
        return request_key(self.model, build_messages(user_content), self.chat.temperature, self.chat.max_tokens)

    def judge(self, user_content: str) -> Judgment:
        """Score one request; never raises for API or parse problems (they become a failed :class:`Judgment`)."""
        try:
            reply = self.chat.complete(build_messages(user_content), accept=_parses)
        except RequestFailed as exc:
            return Judgment("", None, failed=True, reason=f"request failed {exc}", calls=exc.attempts)
        if reply.refusal is not None:
            return Judgment("", None, failed=True, calls=reply.calls, reason=f"the judge declined: {reply.refusal}")
        if reply.finish_reason == "content_filter":  # what is left of a filtered reply is not the judge's verdict
            return Judgment(reply.content, None, failed=True, calls=reply.calls,
                            reason="the endpoint's content filter stopped the reply")
        readable, cut = reply.content, reply.finish_reason == "length"
        if cut:  # cut at max_tokens: its last line may be cut too ("8 1" of "8 10"); the lines before it stand
            readable = readable.rsplit("\n", 1)[0] if "\n" in readable else ""
        try:
            scores = parse_scores(readable)
        except ScoreParseError as exc:
            if cut:
                return Judgment(reply.content, None, failed=True, calls=reply.calls,
                                reason="reply cut off (max tokens) before its scores were complete")
            return Judgment(reply.content, None, failed=True, reason=f"unparseable reply: {exc}", calls=reply.calls)
        return Judgment(reply.content, scores, failed=False, calls=reply.calls, cached=reply.cached)
