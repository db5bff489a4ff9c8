"""``palo-data translate``: translate LLaVA-Instruct conversations into PALO's languages with any chat model.

PALO's multilingual set was made by translating LLaVA-Instruct-150K with a chat model and filtering the results
(formats reference §8). This module is that pipeline, made safe to run on 150K samples x 9 languages:

* **Protected spans.** ``<image>`` is taken out of a turn before translation and put back at the *front* of the turn
  (``<image>\\n``), where training expects it (the original re-inserted it at random before or after the text).
  Code blocks, inline code, bracketed coordinates (``[0.12, 0.40, 0.55, 0.89]``) and numbers are replaced by
  placeholders ``[[1]]``, ``[[2]]`` ... that the model must copy; they are restored afterwards and checked.
* **Quality check on every translation** (:func:`check_translation`): target script, not left in English, a
  plausible length, placeholders intact, no echoed instructions, no new angle brackets. A preamble a chat model
  puts before the translation ("Translation:", "Here is the translation:", "Voici la traduction :", "الترجمة:",
  "翻译：" ...) is recognised by its place, the start of the reply, and removed (:func:`strip_preamble`), unless the
  source itself starts with such a label; whether the source mentions translation elsewhere does not matter. A failing translation is
  asked for once more with a stricter instruction that names the problems; if it fails again the sample is kept
  with ``corrupt: true`` and its bad turns go to a review file a person can correct (``palo-data apply-review``).
* **Resumable, nothing twice.** Every finished sample is appended (and flushed) to ``<language>.progress.jsonl``; a
  rerun skips what is there. Every translation (with its verdict) also goes to an SQLite cache keyed by
  (model, language, exact source text) the moment it arrives, shared across runs, so a rerun after a kill sends no
  string that was already translated; identical strings in flight at once are sent once. Final files are written
  to a temp file and ``os.replace``-d.
* **Bounded concurrency** (``--parallel`` threads, one request in flight each) with exponential backoff on 429,
  408/409, 5xx, time-outs and dropped connections, honouring ``Retry-After``. A sample whose requests still fail is
  left unfinished (not flagged): the run exits 1 and a rerun picks it up.

Output per language, in ``--output_dir``: ``<language>.json`` (a JSON array: every input sample with its fields,
``conversations`` still English, ``<language>_conversation`` the translated turns, and ``corrupt``),
``<language>.review.jsonl`` (one line per rejected turn) and ``<language>.progress.jsonl`` (the resume log).
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Iterable, Iterator

from palo.constants import DEFAULT_IMAGE_TOKEN, LANGUAGES
from palo.data.languages import _LETTER_RE, _SCRIPT_RE, detect_language

__all__ = [
    "ISO_CODES",
    "INSTRUCTIONS",
    "Masked",
    "TranslationCache",
    "Translator",
    "check_translation",
    "clean_reply",
    "mask",
    "resolve_language",
    "restore",
    "split_image",
    "strip_preamble",
    "atomic_write_json",
    "run",
]

# ---------------------------------------------------------------------------------------------------------------
# Languages and instructions
# ---------------------------------------------------------------------------------------------------------------

TARGET_LANGUAGES = tuple(language for language in LANGUAGES if language != "english")
ISO_CODES = {
    "zh": "chinese", "zh-cn": "chinese", "zh-hans": "chinese", "fr": "french", "es": "spanish", "ru": "russian",
    "ja": "japanese", "ar": "arabic", "hi": "hindi", "bn": "bengali", "ur": "urdu",
}

# What "a good translation" means in each language, beyond "translate into X": script, variety, punctuation.
INSTRUCTIONS = {
    "chinese": "Write Simplified Chinese (简体中文) as used in mainland China, never Traditional characters, with "
               "full-width Chinese punctuation (，。？！：；).",
    "french": "Write standard French with all accents (é, è, ê, à, ç ...) and French punctuation conventions. Use "
              "natural phrasing rather than word-for-word English structure.",
    "spanish": "Write neutral, international Spanish with all accents and ñ, and with the opening marks ¿ and ¡ "
               "for questions and exclamations.",
    "russian": "Write standard Russian in Cyrillic, with correct case and gender agreement and Russian "
               "punctuation.",
    "japanese": "Write natural Japanese with kanji, hiragana and katakana (katakana for foreign words), in the "
                "polite です/ます style, with Japanese punctuation (、。？).",
    "arabic": "Write Modern Standard Arabic (الفصحى), not a dialect, in right-to-left Arabic script, with Arabic "
              "punctuation (، ؛ ؟), correct grammar and tanwin where it is needed.",
    "hindi": "Write standard Hindi in Devanagari script, ending sentences with the danda (।). Technical terms "
             "without a common Hindi word may be transliterated into Devanagari.",
    "bengali": "Write standard Bengali (Bangla) in Bengali script, ending sentences with the dari (।).",
    "urdu": "Write standard Urdu in Perso-Arabic script with Urdu letters (ٹ ڈ ڑ ں ے ک ی ہ) and the Urdu full "
            "stop (۔); do not write Hindi or Arabic.",
}

_SYSTEM = (
    "You are a professional translator from English into {Language}. {guidance}\n"
    "The user's message is a turn of a conversation about an image. Translate all of it into {Language} and "
    "reply with the translation only: no notes, no quotes around it, no explanation, no English original. "
    "Tokens like [[1]] stand for numbers, coordinates or code: copy each of them exactly once, unchanged, "
    "to the matching place. Keep line breaks and list structure."
)
_STRICT = (
    "\nYour previous answer was rejected: {problems}. This time reply with nothing but the {Language} "
    "translation, written in {Language} script, containing every [[n]] token of the message exactly once, and "
    "without the characters < and >."
)


def resolve_language(name: str) -> str:
    """A PALO target language from an ISO code or an English name ("ar", "Arabic", "zh-CN" ...).

    Raises:
        ValueError: For English or a language PALO does not cover.
    """
    key = name.strip().lower().replace("_", "-")
    language = ISO_CODES.get(key, key)
    if language not in TARGET_LANGUAGES:
        raise ValueError(f"unknown target language {name!r}; choose from "
                         f"{', '.join(f'{c} ({l})' for c, l in ISO_CODES.items() if '-' not in c)}")
    return language


def system_prompt(language: str, problems: list[str] | None = None) -> str:
    """The system message for ``language``; with ``problems``, the stricter retry version that names them."""
    text = _SYSTEM.format(Language=language.capitalize(), guidance=INSTRUCTIONS[language])
    if problems:
        text += _STRICT.format(Language=language.capitalize(), problems="; ".join(problems))
    return text


# ---------------------------------------------------------------------------------------------------------------
# <image>, masking and restoring protected spans
# ---------------------------------------------------------------------------------------------------------------

_IMAGE_RE = re.compile(r"\s*" + re.escape(DEFAULT_IMAGE_TOKEN) + r"\s*")

# Order matters: a code block may hold numbers and brackets, a coordinate list holds numbers.
_PROTECTED = re.compile(
    r"```.*?```"  # fenced code blocks
    r"|`[^`\n]+`"  # inline code
    r"|\[\[\d+\]\]"  # a literal placeholder-lookalike in the source: protect it so restoring stays unambiguous
    r"|\[\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+\s*\]"  # [0.12, 0.40, 0.55, 0.89]
    # A number that is not part of a word ("COCO2017", "3rd", "x-5" stay words the model handles). Decimals, thousands
    # separators, times and fractions stay one token so their punctuation is not "localised" by the model.
    r"|(?<![\w.-])-?\d+(?:[.,:/]\d+)*%?(?!\w)",
    re.DOTALL,
)
# What comes back: models sometimes pad the brackets, use full-width brackets (CJK) or native digits (Arabic,
# Devanagari, Bengali); \d and int() accept all Unicode decimal digits.
_PLACEHOLDER_RE = re.compile(r"[\[［]\s*[\[［]\s*(\d+)\s*[\]］]\s*[\]］]")


@dataclasses.dataclass
class Masked:
    """A text with its protected spans replaced by ``[[1]]``, ``[[2]]``, ...

    Attributes:
        text: The masked text (what is sent).
        spans: The original spans; ``spans[k - 1]`` is what ``[[k]]`` stands for.
    """

    text: str
    spans: list[str]


def split_image(value: str) -> tuple[str, int]:
    """The text of a turn without its ``<image>`` placeholders, and how many there were."""
    count = value.count(DEFAULT_IMAGE_TOKEN)
    if not count:
        return value, 0
    return _IMAGE_RE.sub("\n", value).strip(), count


def join_image(text: str, count: int) -> str:
    """Put ``count`` placeholders back at the front of the turn, where training moves them anyway (§3.6)."""
    return (DEFAULT_IMAGE_TOKEN + "\n") * count + text if text else "\n".join([DEFAULT_IMAGE_TOKEN] * count)


def mask(text: str) -> Masked:
    """Replace code, coordinates and numbers in ``text`` by numbered placeholders."""
    spans: list[str] = []

    def repl(match: re.Match) -> str:
        spans.append(match.group(0))
        return f"[[{len(spans)}]]"

    return Masked(_PROTECTED.sub(repl, text), spans)


def placeholder_problems(translation: str, n: int) -> list[str]:
    """What is wrong with the placeholders of a translated masked text (empty when each of 1..n is there once)."""
    found = Counter(int(m) for m in _PLACEHOLDER_RE.findall(translation))
    problems = []
    missing = [k for k in range(1, n + 1) if found[k] == 0]
    repeated = [k for k in range(1, n + 1) if found[k] > 1]
    unknown = [k for k in found if not 1 <= k <= n]
    if missing:
        problems.append(f"placeholders missing: {', '.join(f'[[{k}]]' for k in missing)}")
    if repeated:
        problems.append(f"placeholders repeated: {', '.join(f'[[{k}]]' for k in repeated)}")
    if unknown:
        problems.append(f"unknown placeholders: {', '.join(f'[[{k}]]' for k in sorted(unknown))}")
    return problems


def restore(translation: str, spans: list[str]) -> str:
    """Put the protected spans back; unknown placeholders are left as they are (the check reports them)."""

    def repl(match: re.Match) -> str:
        k = int(match.group(1))
        return spans[k - 1] if 1 <= k <= len(spans) else match.group(0)

    return _PLACEHOLDER_RE.sub(repl, translation)


# ---------------------------------------------------------------------------------------------------------------
# Quality check
# ---------------------------------------------------------------------------------------------------------------

# Scripts (in palo.data.languages' names) whose letters count as "written in the target script".
_TARGET_SCRIPTS = {
    "chinese": ("han",), "japanese": ("kana", "han"), "russian": ("cyrillic",), "arabic": ("arabic",),
    "urdu": ("arabic",), "hindi": ("devanagari",), "bengali": ("bengali",), "french": ("latin",),
    "spanish": ("latin",),
}
_CJK = ("chinese", "japanese")
# Letters in the target script / all letters. Below this the text is mostly in another script; names and brands in
# Latin letters ("iPhone", "Starbucks") keep real translations well above it.
MIN_SCRIPT_RATIO = 0.6
# len(translation) / len(source), checked for sources of at least 40 characters (short strings vary too much).
# CJK packs a word into one or two characters; everything else runs about 0.8-1.4x English.
LENGTH_RATIO = {"chinese": (0.12, 1.5), "japanese": (0.15, 1.8)}
DEFAULT_LENGTH_RATIO = (0.35, 3.0)
# Phrases of a chat model talking about the task instead of doing it.
_ECHO_RE = re.compile(
    r"\btranslat(?:e|ed|ion|ing)\b|\bhere is\b|\bhere's\b|\bas an ai\b|\bi cannot\b|\bi can't\b|\bi'm sorry\b"
    r"|\boutput only\b|\bplaceholder|\[\[n\]\]|\benglish\b",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"[^\W\d_]+")
# Arabic-script letters only Urdu (of PALO's languages) writes: retroflex ٹ ڈ ڑ, noon ghunna ں, yeh barree ے ۓ,
# heh goal ہ ۂ, teh marbuta goal ۃ; and the Urdu full stop ۔.
_URDU_ONLY_RE = re.compile("[\u0679\u0688\u0691\u06ba\u06d2\u06d3\u06c1\u06c2\u06c3\u06d4]")


def _letters(text: str) -> int:
    return len(_LETTER_RE.findall(text))


def check_translation(source: str, translation: str, language: str, n_placeholders: int = 0) -> list[str]:
    """Problems with one translated (still masked) text; an empty list means it is accepted.

    Args:
        source: The masked English text that was sent.
        translation: The model's reply, cleaned but not yet restored.
        language: The target language (a PALO language name).
        n_placeholders: How many placeholders ``source`` holds.

    Returns:
        Human-readable problems, each naming what failed (they are shown to the model on the stricter retry and
        to the reviewer).
    """
    if not translation.strip():
        return ["empty translation"]
    problems = placeholder_problems(translation, n_placeholders)
    preamble = _PREAMBLE_RE.match(translation)
    if preamble and not _PREAMBLE_RE.match(source):
        problems.append(f"begins with a preamble ({preamble.group(0).strip()!r}), not with the translation")
    bare = _PLACEHOLDER_RE.sub(" ", translation)
    bare_source = _PLACEHOLDER_RE.sub(" ", source)
    letters, source_letters = _letters(bare), _letters(bare_source)
    words = len(_WORD_RE.findall(bare_source))
    if source_letters and letters == 0:
        problems.append("no words in the translation")
    elif letters:
        in_script = sum(len(_SCRIPT_RE[script].findall(bare)) for script in _TARGET_SCRIPTS[language])
        if in_script / letters < MIN_SCRIPT_RATIO:
            problems.append(f"not written in {language} script ({in_script}/{letters} letters are)")
        elif language in ("french", "spanish"):
            # Latin script passes the script test even when nothing was translated, so look at the words.
            if words >= 4 and detect_language(bare) == "english":
                problems.append("still English")
        elif letters >= 12 or language in _CJK:
            detected = detect_language(bare)
            # Kana in a "Chinese" reply, or Urdu-only letters in an "Arabic" one (and vice versa) mean the wrong
            # language in the right script. Short Arabic-script texts can lack the telling letters, hence >= 12.
            if detected in LANGUAGES and detected != language and not (language == "arabic" and letters < 30):
                problems.append(f"looks like {detected}, not {language}")
        if language == "arabic" and _URDU_ONLY_RE.search(bare) and not any("looks like" in p for p in problems):
            # However short: below 30 letters an Urdu-leaning letter count is not trusted (Persian-typed or
            # transliterated Arabic has ی ک گ چ پ too), but these letters never occur in Arabic.
            problems.append("looks like urdu, not arabic (letters only Urdu writes)")
    if words >= 3 and bare.strip().lower() == bare_source.strip().lower():
        problems.append("left unchanged (still English)")
    elif len(bare_source.strip()) >= 40 and bare_source.strip().lower() in bare.lower():
        problems.append("echoes the English source")
    if len(source) >= 40:
        low, high = LENGTH_RATIO.get(language, DEFAULT_LENGTH_RATIO)
        ratio = len(translation) / len(source)
        if not low <= ratio <= high:
            problems.append(f"implausible length ratio {ratio:.2f} (expected {low}-{high})")
    echoed = {m.group(0).lower() for m in _ECHO_RE.finditer(bare)} - {
        m.group(0).lower() for m in _ECHO_RE.finditer(bare_source)}
    if echoed:
        problems.append(f"echoes instructions ({', '.join(sorted(echoed))})")
    for bracket in "<>":
        if translation.count(bracket) > source.count(bracket):
            problems.append(f"angle bracket '{bracket}' not in the source")
            break
    return problems


# A chat model's announcement of its translation, in English or in the target language. Only ever looked for at the
# start of a reply (see strip_preamble): "Translation", "Here is the Arabic translation of the text", "Voici la
# traduction", "Aquí tienes la traducción al español", "Вот перевод", "以下是翻译", "日本語訳", "إليك الترجمة إلى
# العربية", "हिंदी अनुवाद", "বাংলা অনুবাদ", "اردو ترجمہ" ... followed by a colon, or alone on the first line.
_PREAMBLE_LABEL = (
    r"(?:(?:here(?:'s|’s| is| are)|below is|this is)\s+)?(?:(?:the|your|a|an|my)\s+)?(?:[a-z]+\s+)?"
    r"(?:translation|translated\s+(?:text|version|turn|message)|translate)(?:\s+(?:in|into|to)\s+[a-z]+)?"
    r"(?:\s+of\s+(?:the|your|this)\s+(?:text|message|turn|sentence|phrase|passage|conversation))?"
    r"(?:\s+(?:in|into|to)\s+[a-z]+)?(?:\s+is)?"
    r"|(?:voici\s+)?(?:la\s+|une\s+)?traduction(?:\s+(?:en|vers\s+le)\s+\w+)?"
    r"|(?:aqu[ií]\s+(?:est[aá]|tienes|va)\s+)?(?:la\s+)?traducci[oó]n(?:\s+al\s+\w+)?"
    r"|(?:вот\s+)?перевод(?:\s+на\s+\w+(?:\s+\w+)?)?"
    r"|(?:以下是|这是|這是)?(?:中文|简体中文)?(?:的)?(?:翻译|翻譯|译文|譯文)(?:如下)?"
    r"|(?:以下は|これは)?(?:日本語)?(?:の)?(?:翻訳|訳)(?:です)?"
    r"|(?:إليك|إليكم|ها\s+هي|هذه\s+هي|هذه)?\s*(?:ال)?ترجمة(?:\s+(?:إلى|الى|باللغة)\s+\S+)?"
    r"|(?:यहाँ|यहां|यह)?\s*(?:हिंदी|हिन्दी|का)?\s*अनुवाद(?:\s+(?:है|हैं))?"
    r"|(?:এখানে|এই)?\s*(?:বাংলা)?\s*অনুবাদ(?:\s+(?:দেওয়া\s+হলো|হলো|হল))?"
    r"|(?:یہ|یہاں)?\s*(?:اردو)?\s*(?:میں)?\s*ترجمہ(?:\s+(?:ہے|یہ\s+ہے))?"
)
_COURTESY = (r"(?:(?:sure|certainly|of\s+course|okay|ok|absolutely|bien\s+s[uû]r|claro|por\s+supuesto|конечно|"
             r"好的|当然|もちろん|بالتأكيد|بالطبع|ज़रूर|জরুর|অবশ্যই|ضرور)[\s!,.،。！]*)?")
_PREAMBLE_RE = re.compile(
    r"^\s*" + _COURTESY + r"(?:" + _PREAMBLE_LABEL + r")(?:\s*[(（][^)）\n]{1,40}[)）])?"
    r"\s*(?:[:：]\s*|[.。]?[ \t]*\n\s*)(?=\S)",
    re.IGNORECASE,
)


def strip_preamble(reply: str, source: str) -> str:
    """``reply`` without a preamble ("Translation: ...", "Here is the translation:\\n...") at its start.

    Decided by position only: the preamble must open the reply, and it is kept when the source opens with such a
    label itself (then it is the translation of that label). Words the source uses elsewhere change nothing, so
    "Translation: ..." is removed from the reply to "Can you give a translation of the sign?".
    """
    match = _PREAMBLE_RE.match(reply)
    if match is None or _PREAMBLE_RE.match(source):
        return reply
    return reply[match.end():]


_WRAPPERS = [('"', '"'), ("“", "”"), ("'", "'"), ("«", "»"), ("「", "」")]


def clean_reply(reply: str, source: str) -> str:
    """Strip what a chat model adds around a whole reply when the source had none: a preamble at its start
    (:func:`strip_preamble`), then quotes or a code fence around the rest."""
    text = strip_preamble(reply.strip(), source).strip()
    if text.startswith("```") and text.endswith("```") and not source.lstrip().startswith("```") and len(text) > 6:
        text = re.sub(r"^```[\w-]*\n?|\n?```$", "", text).strip()
    for left, right in _WRAPPERS:
        inner = text[len(left):-len(right)]
        if (len(text) >= 2 and text.startswith(left) and text.endswith(right) and left not in inner
                and right not in inner and not source.strip().startswith(left)):
            text = text[len(left):-len(right)].strip()
            break
    return text


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


class TranslationCache:
    """Translations in SQLite, keyed by (model, language, exact source text); shared across runs.

    Rejected translations are stored too, with their problems, so a rerun (or a run into a fresh output folder)
    reproduces the rejection without paying for the same failure again; ``--retry_rejected`` asks again instead.

    Args:
        path: The SQLite file (created), or None for no persistent cache.
    """

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._db = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # One connection shared by the worker threads under a lock; the busy timeout lets several processes
            # (one per language or machine slice) share the file. WAL keeps readers and the writer apart.
            self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
            with self._lock, self._db:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS translations (model TEXT, language TEXT, source TEXT, "
                                 "translation TEXT, problems TEXT, created REAL, "
                                 "PRIMARY KEY (model, language, source))")

    def get(self, model: str, language: str, source: str) -> tuple[str, list[str]] | None:
        """(translation, problems) for a source text, problems empty for an accepted one; None when absent."""
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT translation, problems FROM translations "
                                   "WHERE model=? AND language=? AND source=?", (model, language, source)).fetchone()
        return (row[0], json.loads(row[1] or "[]")) if row else None

    def put(self, model: str, language: str, source: str, translation: str, problems: list[str] | None = None
            ) -> None:
        """Store one translation; committed at once, so a kill right after loses nothing that was paid for."""
        if self._db is None:
            return
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?, ?)",
                             (model, language, source, translation, json.dumps(problems or [], ensure_ascii=False),
                              time.time()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# ---------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------


class RequestFailed(RuntimeError):
    """A request that still failed after the retries (the sample stays unfinished and is retried on a rerun)."""


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


def _retryable(exc: Exception) -> bool:
    """429, 408/409, 5xx, time-outs, dropped connections and unreadable bodies are worth retrying; other 4xx not."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (ValueError, KeyError, TypeError, AttributeError))  # a malformed 200 body


def _retry_after(exc: Exception) -> float | None:
    """The server's Retry-After in seconds (delta-seconds, an HTTP date, or ``retry-after-ms``), when sent."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


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
        retry_rejected: Ask again for texts whose cached translation was rejected (once per run).
    """

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None,
                 cache: TranslationCache | None = None, max_retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = 60.0, timeout: float = 120.0, temperature: float = 0.0,
                 max_tokens: int | None = None, retry_rejected: bool = False) -> None:
        import openai

        self.model = model
        self.cache = cache or TranslationCache(None)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retry_rejected = retry_rejected
        # The SDK's own retries are off: ours are bounded, counted and honour --backoff.
        self._client = openai.OpenAI(api_key=api_key or "EMPTY", base_url=base_url, max_retries=0, timeout=timeout)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future] = {}
        self.stats: Counter[str] = Counter()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        """One chat completion with bounded retries: (content, finish_reason).

        Raises:
            RequestFailed: When a non-retryable error occurs or the retries are used up.
        """
        import openai

        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            try:
                kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
                if self.max_tokens:
                    kwargs["max_tokens"] = self.max_tokens
                response = self._client.chat.completions.create(**kwargs)
                choice = response.choices[0]
                content = choice.message.content
                if not isinstance(content, str):
                    raise ValueError("reply has no text content")
                usage = getattr(response, "usage", None)
                if usage is not None:
                    self._count("tokens", int(getattr(usage, "total_tokens", 0) or 0))
                return content, getattr(choice, "finish_reason", None)
            except (openai.OpenAIError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                status = getattr(exc, "status_code", None)
                last = f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {str(exc)[:200]}"
                retryable = _retryable(exc) or isinstance(exc, IndexError)
                if not retryable or attempt == self.max_retries:
                    self._count("failed_requests")
                    raise RequestFailed(f"after {attempt + 1} attempt(s): {last}") from exc
                self._count("retries")
                delay = min(self.backoff * 2 ** attempt * (1 + 0.25 * random.random()), self.max_backoff)
                hinted = _retry_after(exc)
                if hinted is not None:
                    delay = min(max(delay, hinted), self.max_backoff)
                time.sleep(delay)
        raise RequestFailed(last)  # pragma: no cover - the loop always returns or raises

    def _attempt(self, masked: Masked, language: str, problems: list[str] | None) -> tuple[str, list[str]]:
        messages = [{"role": "system", "content": system_prompt(language, problems)},
                    {"role": "user", "content": masked.text}]
        content, finish = self._complete(messages)
        reply = clean_reply(content, masked.text)
        found = check_translation(masked.text, reply, language, len(masked.spans))
        if finish == "length":
            found.insert(0, "reply cut off (max tokens)")
        return reply, found

    def _translate_uncached(self, text: str, language: str) -> TextResult:
        masked = mask(text)
        reply, problems = self._attempt(masked, language, None)
        if problems:
            self._count("strict_retries")
            reply, problems = self._attempt(masked, language, problems)
        translation = restore(reply, masked.spans)
        self.cache.put(self.model, language, text, translation, problems)
        if problems:
            self._count("rejected")
        return TextResult(translation, problems)

    def translate(self, text: str, language: str) -> TextResult:
        """Translate one text (no ``<image>`` in it) into ``language``.

        Raises:
            RequestFailed: When the endpoint kept failing; nothing is cached then.
        """
        if not text.strip():
            return TextResult(text, [], cached=True)
        cached = self.cache.get(self.model, language, text)
        if cached is not None and not (cached[1] and self.retry_rejected):
            self._count("cache_hits")
            return TextResult(cached[0], cached[1], cached=True)
        key = (language, text)
        with self._lock:
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        if not owner:
            result = future.result()  # re-raises the owner's RequestFailed
            self._count("cache_hits")
            return dataclasses.replace(result, cached=True)
        try:
            result = self._translate_uncached(text, language)
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]  # a later sample may try again
            future.set_exception(exc)
            raise
        future.set_result(result)
        with self._lock:  # the cache answers from now on (with retry_rejected, the memo keeps a rejection once)
            if not (result.problems and self.retry_rejected):
                del self._inflight[key]
        return result


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------


def conversation_key(language: str) -> str:
    """The per-language key of the original tools (§8), e.g. ``arabic_conversation``."""
    return f"{language}_conversation"


def source_hash(sample: dict[str, Any]) -> str:
    """A fingerprint of what a sample's translation depends on, to notice a changed input file on resume."""
    blob = json.dumps(sample.get("conversations"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def translate_sample(sample: dict[str, Any], language: str, translator: Translator, index: int
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Translate every turn of one sample.

    Args:
        sample: A LLaVA-Instruct sample (``conversations`` of ``{"from", "value"}`` turns).
        language: The target language.
        translator: The shared translator.
        index: The sample's position in the input (for the review file).

    Returns:
        The sample with ``<language>_conversation`` and ``corrupt`` added (everything else unchanged), and the
        review entries of its rejected turns.

    Raises:
        RequestFailed: When the endpoint kept failing for one of its turns.
    """
    turns = sample.get("conversations") or []
    translated, review = [], []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            translated.append(turn)
            continue
        text, images = split_image(turn["value"])
        result = translator.translate(text, language)
        translated.append({**turn, "value": join_image(result.translation, images)})
        if result.problems:
            review.append({
                "language": language, "index": index, "id": sample.get("id"), "turn": k, "from": turn.get("from"),
                "source": turn["value"], "translation": join_image(result.translation, images),
                "problems": result.problems, "corrected": None,
            })
    out = dict(sample)
    out[conversation_key(language)] = translated
    out["corrupt"] = bool(review)
    return out, review


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def atomic_write(path: str, chunks: Iterable[str]) -> None:
    """Write text to ``path`` through a temp file in the same folder and ``os.replace``: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_array(items: Iterable[Any]) -> Iterator[str]:
    yield "["
    for i, item in enumerate(items):
        yield ("\n" if i == 0 else ",\n") + json.dumps(item, ensure_ascii=False)
    yield "\n]\n"


def atomic_write_json(path: str, items: Iterable[Any]) -> None:
    """Write a JSON array atomically, one item per line (UTF-8, not ASCII-escaped: a third of the size)."""
    atomic_write(path, _json_array(items))


def read_jsonl(path: str, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file. With ``repair``, a torn last line (a kill mid-write) is cut off the file."""
    if not os.path.exists(path):
        return []
    records, good_end = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_end += len(line)
    if repair and good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def load_progress(path: str) -> dict[int, dict[str, Any]]:
    """Finished samples by input index; a later line for the same index (e.g. from apply-review) wins."""
    return {int(r["index"]): r for r in read_jsonl(path, repair=True) if isinstance(r, dict) and "index" in r}


def output_paths(output_dir: str, language: str) -> dict[str, str]:
    return {name: os.path.join(output_dir, f"{language}{suffix}") for name, suffix in
            (("json", ".json"), ("review", ".review.jsonl"), ("progress", ".progress.jsonl"))}


def write_outputs(paths: dict[str, str], progress: dict[int, dict[str, Any]]) -> None:
    """The final JSON (input order) and the review file, both rebuilt from the progress log."""
    ordered = [progress[i] for i in sorted(progress)]
    atomic_write_json(paths["json"], (r["sample"] for r in ordered))
    atomic_write(paths["review"], (json.dumps(e, ensure_ascii=False) + "\n" for r in ordered for e in r["review"]))


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run(samples: list[dict[str, Any]], languages: list[str], translator: Translator, output_dir: str,
        parallel: int = 8, progress_bar: bool = True) -> dict[str, Any]:
    """Translate ``samples`` into each language, resuming from what ``output_dir`` already holds.

    Args:
        samples: The LLaVA-Instruct samples.
        languages: Target languages (resolved names).
        translator: The shared translator.
        output_dir: Where the per-language files go.
        parallel: Worker threads, i.e. requests in flight at most.
        progress_bar: Show a tqdm bar (ETA and tokens).

    Returns:
        A report: per language the sample, corrupt and unfinished counts, plus the translator's request counters.
    """
    from tqdm import tqdm

    os.makedirs(output_dir, exist_ok=True)
    paths = {language: output_paths(output_dir, language) for language in languages}
    progress: dict[str, dict[int, dict[str, Any]]] = {}
    todo: list[tuple[str, int]] = []
    for language in languages:
        done = load_progress(paths[language]["progress"])
        hashes = {i: source_hash(s) for i, s in enumerate(samples)}
        # Keep only records that match the current input (same position, same English turns).
        progress[language] = {i: r for i, r in done.items() if i < len(samples) and r.get("hash") == hashes[i]}
        todo += [(language, i) for i in range(len(samples)) if i not in progress[language]]
    logs = {language: open(paths[language]["progress"], "a", encoding="utf-8") for language in languages}
    failures: dict[str, list[dict[str, Any]]] = {language: [] for language in languages}
    lock = threading.Lock()
    corrupt = [0]  # corrupt samples finished in this run, for the bar
    work = iter(todo)
    bar = tqdm(total=len(todo), desc="translating", unit="sample", disable=not progress_bar, dynamic_ncols=True)

    def worker() -> None:
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            language, i = item
            try:
                sample, review = translate_sample(samples[i], language, translator, i)
            except RequestFailed as exc:
                with lock:
                    failures[language].append({"index": i, "id": samples[i].get("id"), "error": str(exc)})
                    bar.update(1)
                continue
            record = {"index": i, "hash": source_hash(samples[i]), "sample": sample, "review": review}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            with lock:
                # One write + flush per sample: after a kill the log holds whole samples (a torn last line is cut
                # off on resume) and the OS has everything flushed.
                logs[language].write(line)
                logs[language].flush()
                progress[language][i] = record
                bar.update(1)
                corrupt[0] += bool(review)
                bar.set_postfix(tokens=translator.stats["tokens"], corrupt=corrupt[0], refresh=False)

    try:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, parallel))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        bar.close()
        for f in logs.values():
            f.close()
    report: dict[str, Any] = {"languages": {}, "requests": dict(translator.stats)}
    for language in languages:
        done = progress[language]
        complete = len(done) == len(samples)
        if complete:
            write_outputs(paths[language], done)
        report["languages"][language] = {
            "samples": len(samples),
            "finished": len(done),
            "corrupt": sum(1 for r in done.values() if r["sample"].get("corrupt")),
            "unfinished": len(samples) - len(done),
            "output": paths[language]["json"] if complete else None,
            "review": paths[language]["review"] if complete else None,
            "errors": failures[language][:5],
        }
    return report


# ---------------------------------------------------------------------------------------------------------------
# CLI (wired into palo-data by palo.data.cli)
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``palo-data translate`` flags (dash and underscore spellings both work)."""
    parser.add_argument("--data_path", "--data-path", "--input", dest="data_path", required=True,
                        help="LLaVA-Instruct-format JSON array")
    parser.add_argument("--languages", "--language", dest="languages", required=True,
                        help="comma-separated ISO codes or names of the 9 target languages, e.g. ar,zh,fr")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True)
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    parser.add_argument("--base_url", "--base-url", dest="base_url", default=None,
                        help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else api.openai.com)")
    parser.add_argument("--api_key", "--api-key", dest="api_key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--parallel", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--cache", default=None,
                        help="SQLite translation cache (default: <output_dir>/translation_cache.sqlite)")
    parser.add_argument("--max_retries", "--max-retries", dest="max_retries", type=int, default=6)
    parser.add_argument("--backoff", type=float, default=1.0, help="base retry delay in seconds (doubles)")
    parser.add_argument("--max_backoff", "--max-backoff", dest="max_backoff", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_tokens", "--max-tokens", dest="max_tokens", type=int, default=None)
    parser.add_argument("--retry_rejected", "--retry-rejected", dest="retry_rejected", action="store_true",
                        help="ask again for texts whose cached translation was rejected")
    parser.add_argument("--limit", type=int, default=None, help="translate only the first N samples")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main_translate(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data translate``; exits 1 when samples are left unfinished (rerun to resume)."""
    try:
        languages = list(dict.fromkeys(resolve_language(x) for x in args.languages.split(",") if x.strip()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not languages:
        print("error: --languages is empty", file=sys.stderr)
        return 2
    with open(args.data_path, encoding="utf-8") as f:
        samples = json.load(f)
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        print(f"error: {args.data_path}: expected a JSON array of samples", file=sys.stderr)
        return 2
    if args.limit is not None:
        samples = samples[: args.limit]
    cache = TranslationCache(args.cache or os.path.join(args.output_dir, "translation_cache.sqlite"))
    translator = Translator(
        args.model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        base_url=args.base_url or os.environ.get("OPENAI_BASE_URL"), cache=cache, max_retries=args.max_retries,
        backoff=args.backoff, max_backoff=args.max_backoff, timeout=args.timeout, temperature=args.temperature,
        max_tokens=args.max_tokens, retry_rejected=args.retry_rejected,
    )
    try:
        report = run(samples, languages, translator, args.output_dir, args.parallel, progress_bar=not args.quiet)
    finally:
        cache.close()
    print(json.dumps(report, ensure_ascii=False, indent=2))
    unfinished = sum(r["unfinished"] for r in report["languages"].values())
    if unfinished:
        print(f"{unfinished} sample(s) unfinished because requests kept failing; rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0
