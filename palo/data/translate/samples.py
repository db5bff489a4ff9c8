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


def with_translation(sample: dict[str, Any], language: str, turns: list[Any], corrupt: bool) -> dict[str, Any]:
    """The output form of a translated sample (docs/formats.md §8): every field of ``sample`` as it is, then
    ``<language>_conversation`` (``turns``) and ``corrupt``, which stays true for a sample the input flagged."""
    out = dict(sample)
    out[conversation_key(language)] = turns
    # An input sample flagged corrupt (by an earlier tool or a person) is not made good by translating it.
    out["corrupt"] = bool(sample.get("corrupt")) or corrupt
    return out


def source_hash(sample: dict[str, Any]) -> str:
    """A fingerprint of what a sample's translation depends on, to notice a changed input file on resume."""
    blob = json.dumps(sample.get("conversations"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``conversations[0].value``) of the first string in ``value``, keys included, that holds a lone
    surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # A bad key is shown escaped: the message naming it must itself be printable.
            name = key.encode("utf-8", "backslashreplace").decode("utf-8")
            for child in (key, item):
                found = _lone_surrogate(child, f"{path}.{name}" if path else name)
                if found is not None:
                    return found
    elif isinstance(value, list):
        for k, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{k}]")
            if found is not None:
                return found
    return None


def malformed_samples(samples: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """The samples a run refuses before any request, with why.

    A sample's ``conversations`` must be a non-empty list of ``{"from", "value"}`` turns with string values (a
    string would be translated letter by letter). No text may hold a lone surrogate (``"\\ud83d"``, half an emoji:
    valid JSON, but not text), which cannot be hashed, sent or written as UTF-8.

    Returns:
        ``(index, problem)`` per malformed sample, the problem naming the field.
    """
    def well_formed(turns: Any) -> bool:
        return isinstance(turns, list) and bool(turns) and all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns)

    bad = []
    for i, sample in enumerate(samples):
        if not well_formed(sample.get("conversations")):
            bad.append((i, "'conversations' must be a non-empty list of {'from', 'value'} turns with string values "
                           "(palo-data validate lists such samples)"))
        elif (field := _lone_surrogate(sample)) is not None:
            bad.append((i, f"{field} holds a lone surrogate (an unpaired \\ud800-\\udfff escape, such as half an "
                           "emoji), which is not text"))
    return bad


def _kept_turns(previous: dict[str, Any] | None, language: str, n_turns: int) -> dict[int, Any]:
    """The turns of an earlier record of a sample that are not to be translated again: all but those its ``review``
    lists as rejected. A reviewer's corrections (``apply-review`` appends them to the log) are among them.

    Args:
        previous: The sample's last resume-log record (``sample`` and ``review``), or None.
        language: The target language.
        n_turns: How many turns the English sample has.

    Returns:
        Turn index -> translated turn; empty when there is no record or it does not fit the sample.
    """
    if not isinstance(previous, dict) or not isinstance(previous.get("sample"), dict):
        return {}
    turns, review = previous["sample"].get(conversation_key(language)), previous.get("review")
    if not isinstance(turns, list) or len(turns) != n_turns or not isinstance(review, list):
        return {}  # not a record this run wrote: translate the whole sample
    rejected = {int(entry["turn"]) for entry in review if isinstance(entry, dict) and "turn" in entry}
    return {k: turn for k, turn in enumerate(turns) if k not in rejected}


def translate_sample(sample: dict[str, Any], language: str, translator: Translator, index: int,
                     previous: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Translate every turn of one sample, or with ``previous`` only the turns it left rejected.

    Args:
        sample: A LLaVA-Instruct sample (``conversations`` of ``{"from", "value"}`` turns).
        language: The target language.
        translator: The shared translator.
        index: The sample's position in the input (for the review file).
        previous: The sample's last resume-log record, for ``--retry_rejected``: the turns its ``review`` lists are
            translated again, the others (accepted, or corrected by a reviewer) are kept as they are.

    Returns:
        The sample with ``<language>_conversation`` and ``corrupt`` added (everything else unchanged), and the
        review entries of its rejected turns.

    Raises:
        RequestFailed: When the endpoint kept failing for one of its turns.
    """
    turns = sample.get("conversations") or []
    kept = _kept_turns(previous, language, len(turns))
    translated, review = [], []
    for k, turn in enumerate(turns):
        if k in kept:
            translated.append(kept[k])
            continue
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
    return with_translation(sample, language, translated, bool(review)), review
