"""One LLaVA-Instruct sample through the translator, and the per-language key its translation is stored under."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from palo.data.translate.spans import join_image, split_image

if TYPE_CHECKING:
    from palo.data.translate.translator import Translator


def conversation_key(language: str) -> str:
    """The per-language key of the original tools (docs/formats.md §8), e.g. ``arabic_conversation``."""
    return f"{language}_conversation"


def source_hash(sample: dict[str, Any]) -> str:
    """A fingerprint of what a sample's translation depends on, to notice a changed input file on resume."""
    blob = json.dumps(sample.get("conversations"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def malformed_samples(samples: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of samples whose ``conversations`` is not a non-empty list of ``{"from", "value"}`` turns with string
    values: they cannot be translated (a string would be translated letter by letter), so a run refuses them first.
    """
    def well_formed(turns: Any) -> bool:
        return isinstance(turns, list) and bool(turns) and all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns)

    return [i for i, sample in enumerate(samples) if not well_formed(sample.get("conversations"))]


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
