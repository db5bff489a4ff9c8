"""The structure of a PALO/LLaVA training sample's ``conversations``, checked without a tokenizer or a model.

A sample's turns must alternate ``human`` / ``gpt`` (one leading ``gpt`` turn is dropped, as the original does), hold
non-empty text, end with an answer, and place ``<image>`` once, in a human turn, exactly when the sample has an image.
Training (:func:`palo.train.preprocess.build_supervised_example`) and ``palo-data validate`` apply the same rules;
this module imports nothing heavy, so validating a data file starts at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN

# The JSON speaker names, in the order the templates' roles are listed (user, assistant).
SPEAKERS = ("human", "gpt")


class BadSampleError(ValueError):
    """A training sample that cannot become a supervised example (its message says why)."""


def validate_turns(turns: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Checks speakers and values; returns the turns without a leading ``gpt`` turn.

    Turn numbers in messages are positions in the sample as given.
    """
    if not turns:
        raise BadSampleError("empty conversation: no turns")
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise BadSampleError(f"turn {k} is not a {{'from', 'value'}} object: {turn!r}")
        if turn["from"] not in SPEAKERS:
            raise BadSampleError(f"turn {k}: unknown speaker 'from'={turn['from']!r}; expected 'human' or 'gpt'")
    # The original silently drops one leading non-human turn (e.g. a greeting left over from ShareGPT).
    first = 0 if turns[0]["from"] == SPEAKERS[0] else 1
    kept = list(turns[first:])
    if not kept:
        raise BadSampleError("empty conversation: only a gpt turn, which is dropped")
    for k, turn in enumerate(kept):
        expected = SPEAKERS[k % 2]
        if turn["from"] != expected:
            raise BadSampleError(
                f"turn {k + first}: expected {expected!r}, got {turn['from']!r}; "
                "speakers must alternate, starting with 'human'"
            )
        if not isinstance(turn["value"], str):
            raise BadSampleError(f"turn {k + first} ({turn['from']}): the value must be a string, got "
                                 f"{type(turn['value']).__name__} {turn['value']!r}")
        if not turn["value"].strip():
            raise BadSampleError(f"turn {k + first} ({turn['from']}): empty value {turn['value']!r}")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as exc:  # valid JSON ("\ud83d", half an emoji), but no text a tokenizer takes
            raise BadSampleError(f"turn {k + first} ({turn['from']}): a lone surrogate {turn['value'][exc.start]!a} "
                                 f"at character {exc.start} (an unpaired \\ud800-\\udfff escape), which is not text"
                                 ) from None
    if kept[-1]["from"] != SPEAKERS[1]:
        raise BadSampleError(f"the conversation ends with a human turn (turn {len(turns) - 1}); nothing to learn")
    return kept


def check_placeholders(turns: Sequence[Mapping[str, Any]], has_image: bool) -> None:
    """One ``<image>`` turn (a human one) for an image sample, none for a text-only one.

    The splice (docs/formats.md §3.9) needs one placeholder per image: a text-only ``<image>`` would become a
    sentinel with no features, and an image without a placeholder would be silently dropped.
    """
    where = [k for k, turn in enumerate(turns) if DEFAULT_IMAGE_TOKEN in turn["value"]]
    if not has_image and where:
        raise BadSampleError(f"a text-only sample has an {DEFAULT_IMAGE_TOKEN} placeholder (in turn {where[0]})")
    if has_image and (len(where) != 1 or turns[where[0]]["from"] != SPEAKERS[0]):
        raise BadSampleError(
            f"an image sample needs {DEFAULT_IMAGE_TOKEN} in exactly one human turn; found it in turns {where}"
        )


def check_turns(turns: Sequence[Mapping[str, Any]], has_image: bool) -> None:
    """All structural checks of a sample's turns (those training applies before tokenizing).

    Raises:
        BadSampleError: Naming the problem.
    """
    check_placeholders(validate_turns(turns), has_image)
