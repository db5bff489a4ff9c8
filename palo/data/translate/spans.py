"""What must survive translation unchanged: ``<image>`` (moved to the front of a turn) and protected spans.

Code blocks, inline code, bracketed coordinates and numbers are replaced by placeholders ``[[1]]``, ``[[2]]`` ...
that the model must copy; they are restored afterwards and checked (:func:`placeholder_problems`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from palo.constants import DEFAULT_IMAGE_TOKEN

# Order matters: a code block may hold numbers and brackets, a coordinate list holds numbers.
_PROTECTED = re.compile(
    r"```.*?```"  # fenced code blocks
    r"|`[^`\n]+`"  # inline code
    r"|\[\[\d+\]\]"  # a literal placeholder-lookalike in the source: protect it so restoring stays unambiguous
    r"|\[\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+\s*\]"  # [0.12, 0.40, 0.55, 0.89]
    # A number that is not part of a word ("COCO2017", "3rd", "x-5" stay words the model handles). Decimals, thousands
    # separators, times and fractions stay one token so their punctuation is not "localised" by the model, also when
    # a unit is glued to them ("3.5kg", "1.5x": the unit is left to translate); an integer glued to letters is a word.
    r"|(?<![\w.-])-?\d+(?:(?:[.,:/]\d+)+%?|%?(?!\w))",
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
    """The text of a turn without its ``<image>`` placeholders, and how many there were.

    Each placeholder is removed and the text stripped, as training's normalisation does
    (:func:`palo.train.preprocess.normalize_image_turns`): one in mid-sentence leaves the sentence whole
    ("Describe the scene <image> in detail." is sent as one sentence, not broken over two lines).
    """
    count = value.count(DEFAULT_IMAGE_TOKEN)
    if not count:
        return value, 0
    return value.replace(DEFAULT_IMAGE_TOKEN, "").strip(), count


def join_image(text: str, count: int) -> str:
    """Put ``count`` placeholders back at the front of the turn, where training moves them anyway.

    See docs/formats.md §3.6.
    """
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
