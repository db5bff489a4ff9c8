"""PALO's ten languages (:data:`LANGUAGES`, the one list every module uses), and which of them a text (or a training
sample) is written in, from its Unicode scripts.

Detection is cheap and deterministic, for statistics and per-language sampling of the training mix, not a general
language identifier. The script carrying most letters decides: Kana (with or without Han) is Japanese, Han alone
Chinese, Cyrillic Russian, Devanagari Hindi, Bengali Bengali. Arabic script is Urdu when letters only Urdu uses
outnumber letters only Arabic uses, else Arabic. Latin script is English, Spanish or French, told apart by diacritics
and short stopword lists. Any other script (Hangul, Thai, Greek, Hebrew, ...) or no letters at all gives ``"other"``.

Scripts are not weighed letter for letter: a Han or Kana character carries about a word, so it counts twice, and a
Devanagari or Bengali vowel sign counts beside its consonant (a syllable spelt with two or three Latin letters is one
letter and one or two signs). Latin text inside quotation marks within text in another of PALO's scripts (a sign or
a product name an answer quotes) does not decide the language. A training sample that ``palo-data merge`` labelled
(``"language": "hindi"``) is taken at its label.

Letters are counted with a few compiled regular expressions (C speed) rather than a Python loop over characters, and
text that is all ASCII (most English) skips the script counts altogether.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN

__all__ = ["HIGH_RESOURCE", "LANGUAGES", "LOW_RESOURCE", "OTHER", "detect_language", "sample_language"]

# PALO's 10 languages in the paper's column order (also the evaluation scripts' order): the six high-resource ones,
# then the four low-resource ones. The lower-case names are folder names, JSON keys and file-name suffixes.
HIGH_RESOURCE = ("english", "chinese", "french", "spanish", "russian", "japanese")
LOW_RESOURCE = ("arabic", "hindi", "bengali", "urdu")
LANGUAGES = HIGH_RESOURCE + LOW_RESOURCE

OTHER = "other"

# A letter: a word character that is neither a digit nor "_". Combining vowel signs (Devanagari, Bengali matras)
# are not letters in this sense, which is fine: every syllable still has a base letter.
_LETTER = r"[^\W\d_]"

# Ranges of each script (only the letters inside them are counted, see _count).
_KANA = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CYRILLIC = "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f"
_DEVANAGARI = "\u0900-\u097f\ua8e0-\ua8ff"
_BENGALI = "\u0980-\u09ff"
_ARABIC = "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff"
# Basic Latin letters, Latin-1 and Extended-A/B letters, IPA, Latin Extended Additional, ligatures, full-width.
_LATIN = "A-Za-z\u00aa\u00ba\u00c0-\u024f\u0250-\u02af\u1e00-\u1eff\ufb00-\ufb06\uff21-\uff3a\uff41-\uff5a"

_SCRIPTS = {
    "kana": _KANA,
    "han": _HAN,
    "cyrillic": _CYRILLIC,
    "devanagari": _DEVANAGARI,
    "bengali": _BENGALI,
    "arabic": _ARABIC,
    "latin": _LATIN,
}
# The range first, the letter test behind it: most characters fail the cheap range test and never get to the other.
_SCRIPT_RE = {name: re.compile(f"[{ranges}](?<={_LETTER})") for name, ranges in _SCRIPTS.items()}
_LETTER_RE = re.compile(_LETTER)

# What detect_language weighs (the letter patterns above stay as they are: translate's script-share check uses them).
# Devanagari and Bengali letters together with their vowel signs and viramas (categories Mn/Mc, not letters): the
# ranges hold no digits or punctuation (the dandas and digits start at U+0964 and U+09E6).
_SCRIPT_UNITS_RE = {
    "devanagari": re.compile("[\u0900-\u0963\u0971-\u097f\ua8e0-\ua8f7\ua8fd-\ua8ff]"),
    "bengali": re.compile("[\u0980-\u09e3\u09f0\u09f1\u09fc\u09fe]"),
}
# A Han or Kana character stands for about a word, which Latin spells with several letters: weighed letter for
# letter, "iPhone" and "MacBook Pro" outweighed a whole Chinese sentence around them.
_WEIGHT = {"kana": 2, "han": 2}
# Quoted spans on one line: "...", “...”, «...», „...“, 「...」, 『...』. Straight single quotes are left alone
# (they are apostrophes as often as quotes).
_QUOTED = re.compile('"[^"\n]*"|“[^”\n]*”|«[^»\n]*»|„[^“”\n]*[“”]|「[^」\n]*」|『[^』\n]*』')
_ASCII_LETTER = re.compile("[A-Za-z]")

# Arabic script: letters that only Urdu uses among PALO's languages, and Arabic letters that Urdu replaces.
# Urdu writes kaf as keheh (ک U+06A9), yeh as farsi yeh (ی U+06CC) or yeh barree (ے U+06D2), heh as heh goal
# (ہ U+06C1) or do-chashmi heh (ھ U+06BE), teh marbuta as ۃ (U+06C3); it adds retroflex ٹ ڈ ڑ, nasal noon ghunna
# ں, and the Persian letters پ چ ژ گ; it ends sentences with ۔ (U+06D4). Arabic writes ك (U+0643), ي (U+064A),
# ى (U+0649), ة (U+0629) and hamza on alef أ إ, which Urdu (almost) never does.
_URDU_MARKS = re.compile(
    "[\u0679\u0688\u0691\u06ba\u06d2\u06d3\u06c1\u06c2\u06c3\u06be\u06a9\u06cc\u06af\u0686\u067e\u0698\u06d4]"
)
_ARABIC_MARKS = re.compile("[\u0643\u064a\u0649\u0629\u0623\u0625]")

# Latin script. Diacritics one language uses and the other two do not (é is shared by French and Spanish).
_SPANISH_MARKS = re.compile("[ñÑáÁíÍóÓúÚ¿¡]")
_FRENCH_MARKS = re.compile("[çÇàÀâÂèÈêÊëËîÎïÏôÔûÛùÙœŒæÆÿ]")
# French elision: l'homme, d'un, qu'il, c'est, n'est, s'il, j'ai (straight or curly apostrophe).
_FRENCH_ELISION = re.compile(r"\b(?:[ldcnsjmt]|qu|jusqu|lorsqu|puisqu)['’](?=\w)", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+")
# Frequent words of one language that are not words (or are rare words) of the other two. Words shared between two
# of them are left out: "la", "que", "de", "en", "un", "a", "se", "no", "on", "son", "y" (il y a), "image".
_STOPWORDS = {
    "english": frozenset(
        "the is are was were be been of and with this that these those it its there what which who how for by at "
        "from an has have can some while their they not to in you your picture photo shows".split()
    ),
    "spanish": frozenset(
        "el los las del al una unos unas es está están hay con por para como cómo pero más muy su sus lo este esta "
        "estos estas imagen también qué cuál cuántos cuántas puede hombre mujer sobre donde hasta".split()
    ),
    "french": frozenset(
        "le les des du au aux est sont une et dans sur avec pour pas ce cette ces qui il elle ils elles nous vous "
        "ou où par mais très leur leurs peut combien quel quelle quels quelles ont être été sa ses homme femme".split()
    ),
}


def _count(pattern: re.Pattern, text: str) -> int:
    return len(pattern.findall(text))


def _latin_language(text: str) -> str:
    """English, Spanish or French for a text whose letters are mostly Latin; English when nothing decides."""
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {language: sum(w in stop for w in words) for language, stop in _STOPWORDS.items()}
    # A diacritic is stronger evidence than one common word: it is rare by accident.
    scores["spanish"] += 2 * _count(_SPANISH_MARKS, text)
    scores["french"] += 2 * _count(_FRENCH_MARKS, text) + _count(_FRENCH_ELISION, text)
    best = max(scores.values())
    # Ties go to English: Latin text with no clear signal (names, code, numbers with units) is mostly English.
    for language in ("english", "spanish", "french"):
        if scores[language] == best:
            return language
    raise AssertionError("unreachable")


def _script_counts(text: str) -> dict[str, int]:
    """Weighed letters per script (``cjk`` for Han and Kana together, ``kana`` for Kana alone, ``other``)."""
    counts = {name: _count(pattern, text) for name, pattern in _SCRIPT_RE.items()}
    counts["other"] = _count(_LETTER_RE, text) - sum(counts.values())
    for name in ("devanagari", "bengali"):
        if counts[name]:  # letters and vowel signs (no letters: no signs worth counting)
            counts[name] = _count(_SCRIPT_UNITS_RE[name], text)
    # Japanese mixes Kana with Han; the two count together against the other scripts.
    counts["cjk"] = _WEIGHT["kana"] * counts["kana"] + _WEIGHT["han"] * counts.pop("han")
    return counts


def _best_script(counts: dict[str, int]) -> str:
    return max((name for name in counts if name != "kana"), key=counts.__getitem__)


def detect_language(text: str) -> str:
    """The PALO language of ``text``, decided by the script with the most (weighed) letters.

    ``<image>`` placeholders, digits, punctuation and whitespace are ignored. Han and Kana count twice, Indic vowel
    signs count, and Latin text in quotation marks inside text in another PALO script is left out (see the module
    docstring).

    Args:
        text: Any text, e.g. one turn of a conversation.

    Returns:
        One of :data:`LANGUAGES` ("english", "chinese", "french", "spanish", "russian", "japanese",
        "arabic", "hindi", "bengali", "urdu"), or ``"other"`` for other scripts and for text without letters.
    """
    text = text.replace(DEFAULT_IMAGE_TOKEN, " ")
    if text.isascii():  # most of the data (English): only Latin letters can be in it, no script counts needed
        return _latin_language(text) if _ASCII_LETTER.search(text) else OTHER
    # Composed, as the accent and stopword patterns are written: "très" with a combining grave (NFD, which some
    # tools and macOS file names produce) was "tre" and an accent mark the patterns do not see, so French read as
    # English.
    text = unicodedata.normalize("NFC", text)
    counts = _script_counts(text)
    script = _best_script(counts)
    if script == "latin" and any(counts[name] for name in ("cjk", "cyrillic", "devanagari", "bengali", "arabic")):
        # Latin winning over another PALO script may be a quoted sign or name ("Welcome to Central Park"): the
        # language is that of the text around the quotation, when the rest still has letters.
        unquoted = _QUOTED.sub(" ", text)
        if unquoted != text:
            rest = _script_counts(unquoted)
            if _best_script(rest) not in ("latin", "other") and rest[_best_script(rest)]:
                text, counts, script = unquoted, rest, _best_script(rest)
    if counts[script] == 0:
        return OTHER
    if script == "cjk":
        return "japanese" if counts["kana"] else "chinese"
    if script == "arabic":
        return "urdu" if _count(_URDU_MARKS, text) > _count(_ARABIC_MARKS, text) else "arabic"
    if script == "latin":
        return _latin_language(text)
    return {"cyrillic": "russian", "devanagari": "hindi", "bengali": "bengali"}.get(script, OTHER)


def sample_language(sample: dict[str, Any]) -> str:
    """The PALO language of a training sample (docs/formats.md §5.1): its ``language`` label when it has one of
    :data:`LANGUAGES` (``palo-data merge`` writes it), else detected from all its conversation turns together.

    Args:
        sample: A dict with ``conversations``, a list of ``{"from": ..., "value": ...}`` turns.

    Returns:
        As :func:`detect_language`; ``"other"`` when there is no text.
    """
    # merge knows which translation a sample is; detection can only guess (a quoted English sign in a Hindi answer).
    if sample.get("language") in LANGUAGES:
        return sample["language"]
    values = [turn.get("value") for turn in sample.get("conversations") or () if isinstance(turn, dict)]
    return detect_language("\n".join(v for v in values if isinstance(v, str)))

