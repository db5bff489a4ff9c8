"""``palo-data apply-review``: merge a person's corrections of rejected translations back into a translated set.

``palo-data translate`` writes one JSONL line per rejected turn to ``<language>.review.jsonl``::

    {"language": "arabic", "index": 12, "id": "000000033471", "turn": 1, "from": "gpt",
     "source": "<English turn>", "translation": "<the rejected attempt>", "problems": ["..."], "corrected": null}

The reviewer writes the right translation into ``corrected`` (leaving it null keeps the turn rejected). A
correction replaces turn ``turn`` of ``<language>_conversation`` in sample ``index``; ``<image>`` is put back at the
front of the turn when the English turn had one and the correction left it out. A sample whose every rejected turn
is corrected gets ``corrupt: false``. When the translate run's ``<language>.progress.jsonl`` sits next to the data
file, the corrected samples are appended to it too, so a later ``palo-data translate`` rerun keeps the corrections.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.data.sample_file import SampleFile
from palo.data.translate import conversation_key, join_image, source_hash, split_image
from palo.jsonl import JsonlAppender, atomic_write_json, iter_log, read_jsonl


def correction(entry: dict[str, Any]) -> str | None:
    """The reviewer's text of a review entry, or None when the turn is left rejected (null or blank).

    Raises:
        ValueError: When ``corrected`` is neither a string nor null (a number, a list: a slip in editing).
    """
    text = entry.get("corrected")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"sample {entry.get('index')} turn {entry.get('turn')}: 'corrected' must be a string or "
                         f"null, got {type(text).__name__}")
    return text if text and text.strip() else None


def apply_corrections(samples: Sequence[dict[str, Any]], entries: list[dict[str, Any]]
                      ) -> tuple[dict[str, int], dict[int, dict[str, Any]]]:
    """Apply review entries to the samples they name.

    Args:
        samples: The translated set (``<language>_conversation`` and ``corrupt`` in each sample): a list, or a
            :class:`~palo.data.sample_file.SampleFile` that reads each sample when it is asked for.
        entries: Review lines; those with a null or empty ``corrected`` are skipped.

    Returns:
        A report (corrected turns, samples cleared, samples still corrupt) and the corrected samples by index
        (copies: ``samples`` is not changed).

    Raises:
        ValueError: When an entry points at a sample or turn that does not exist or whose English differs, or
            its ``corrected`` is neither a string nor null.
    """
    by_sample: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_sample[int(entry["index"])].append(entry)
    corrected = cleared = pending = 0
    fixed: dict[int, dict[str, Any]] = {}
    for index, group in sorted(by_sample.items()):
        if not 0 <= index < len(samples):
            raise ValueError(f"review entry for sample {index}, but the set has {len(samples)} samples")
        sample = copy.deepcopy(samples[index])
        key = conversation_key(group[0]["language"])
        turns = sample.get(key)
        if not isinstance(turns, list):
            raise ValueError(f"sample {index} has no '{key}'")
        open_turns = 0
        for entry in group:
            k = int(entry["turn"])
            english = sample["conversations"][k]["value"] if k < len(sample.get("conversations", [])) else None
            if english != entry.get("source"):
                raise ValueError(f"sample {index} turn {k}: the English in the review entry differs from the set "
                                 "(was the review file made from another input?)")
            text = correction(entry)
            if text is None:
                open_turns += 1
                continue
            _, images = split_image(english)
            if images and DEFAULT_IMAGE_TOKEN not in text:
                text = join_image(text.strip(), images)
            elif images:
                text = join_image(split_image(text)[0], images)  # normalise: placeholders at the front
            turns[k] = {**turns[k], "value": text}
            corrected += 1
        if open_turns:
            pending += 1
        else:
            sample["corrupt"] = False
            cleared += 1
        fixed[index] = sample
    return {"corrected_turns": corrected, "samples_cleared": cleared, "samples_still_corrupt": pending}, fixed


def main_apply_review(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data apply-review``."""
    # One sample at a time (its ValueError is palo-data's error line): only the corrected ones are held.
    samples = SampleFile(args.data_path, "--data_path")
    # Strict: a person edited this file, and a typo must name its line rather than silently drop what follows it.
    entries = [record.data for record in read_jsonl(args.review, required=("index", "language", "turn"))]
    try:
        report, fixed = apply_corrections(samples, entries)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        print(f"error: {args.review}: {exc}", file=sys.stderr)
        return 2
    # Keep the translate run's resume log in step, so a rerun rebuilds the set with the corrections in it.
    progress = args.progress
    if progress is None and args.data_path.endswith(".json"):
        candidate = args.data_path[: -len(".json")] + ".progress.jsonl"
        progress = candidate if os.path.exists(candidate) else None
    if progress and fixed:
        old = {int(r["index"]): r.get("hash") for _, r in iter_log(progress) if isinstance(r, dict) and "index" in r}
        # The appender first cuts a torn last line (a killed translate run), so the corrections start a line of
        # their own instead of being glued to the torn one, where a resume would cut them off.
        with JsonlAppender(progress) as log:
            for index in fixed:
                review = [e for e in entries if int(e["index"]) == index and correction(e) is None]
                log.write({"index": index, "hash": old.get(index) or source_hash(fixed[index]),
                           "sample": fixed[index], "review": review})
    # After the log: a run killed between the two leaves the corrections where a rerun of either command finds them.
    output = args.output or args.data_path
    # Every sample is read before the new file replaces the old one (in place by default).
    atomic_write_json(output, (fixed[i] if i in fixed else samples[i] for i in range(len(samples))))
    report["output"] = output
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", "--data-path", dest="data_path", required=True,
                        help="the translated set, e.g. out/arabic.json")
    parser.add_argument("--review", required=True, help="the review JSONL with 'corrected' filled in")
    parser.add_argument("--output", default=None, help="where to write (default: overwrite --data_path atomically)")
    parser.add_argument("--progress", default=None,
                        help="the translate resume log to update (default: <data_path stem>.progress.jsonl if any)")
