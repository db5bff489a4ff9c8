"""``palo-data merge``: the English set and the translated sets into one training JSON (docs/formats.md §8).

Each translated sample becomes a training sample whose ``conversations`` are the translated turns, with the English
kept under ``english_conversations`` and the language under ``language``; the ``<language>_conversation`` copy is
dropped (it would double the size of a file that is already 13 GB at PALO scale, and the trainer ignores it).
Samples flagged ``corrupt`` are left out unless ``--keep_corrupt`` (the trainer would drop them anyway). Everything
is shuffled with ``random.Random(seed)``: the same inputs and seed give the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from typing import Any

from palo.data.translate import TARGET_LANGUAGES, conversation_key
from palo.jsonl import atomic_write_json, read_json_samples


def translated_language(samples: list[dict[str, Any]]) -> str | None:
    """The language of a translated set, from its ``<language>_conversation`` key."""
    for sample in samples:
        for language in TARGET_LANGUAGES:
            if conversation_key(language) in sample:
                return language
    return None


def to_training(sample: dict[str, Any], language: str, image_prefix: str = "") -> dict[str, Any]:
    """One translated sample as a training sample (``conversations`` in ``language``)."""
    out = {k: v for k, v in sample.items() if k != conversation_key(language)}
    out["english_conversations"] = sample["conversations"]
    out["conversations"] = sample[conversation_key(language)]
    out["language"] = language
    if image_prefix and "image" in out:
        out["image"] = image_prefix.rstrip("/") + "/" + str(out["image"])
    return out


def merge(english: list[dict[str, Any]], translated: list[list[dict[str, Any]]], seed: int = 0,
          keep_corrupt: bool = False, image_prefix: str = "") -> tuple[list[dict[str, Any]], dict[str, Counter]]:
    """Combine and shuffle.

    Args:
        english: The English training set (taken as it is), or [].
        translated: Translated sets as written by ``palo-data translate``.
        seed: Shuffle seed.
        keep_corrupt: Keep samples flagged ``corrupt`` (flag and all).
        image_prefix: Prefix for the ``image`` of translated samples (``coco/train2017`` for LLaVA-Instruct-150K,
            which stores bare file names; the original's ``--append_coco``).

    Returns:
        The merged samples and per-language counts (``kept`` and ``corrupt_dropped``).

    Raises:
        ValueError: When a set has no ``<language>_conversation`` key.
    """
    counts: dict[str, Counter] = {"english": Counter(kept=len(english))}
    merged = list(english)
    for samples in translated:
        language = translated_language(samples)
        if language is None:
            raise ValueError("a translated set has no '<language>_conversation' key (was it made by translate?)")
        counter = counts.setdefault(language, Counter())
        for sample in samples:
            if conversation_key(language) not in sample or (sample.get("corrupt") and not keep_corrupt):
                counter["corrupt_dropped"] += 1
                continue
            merged.append(to_training(sample, language, image_prefix))
            counter["kept"] += 1
    random.Random(seed).shuffle(merged)
    return merged, counts


def main_merge(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data merge``."""
    english = read_json_samples(args.data_path, "--data_path")  # its ValueError is palo-data's error line
    translated = [read_json_samples(path, "--translated") for path in args.translated]
    try:
        merged, counts = merge(english, translated, args.seed, args.keep_corrupt, args.image_prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.output, merged)
    for language, counter in counts.items():
        print(f"{language:10s} {counter['kept']:>9d} samples"
              + (f"  ({counter['corrupt_dropped']} corrupt dropped)" if counter["corrupt_dropped"] else ""))
    print(f"{'total':10s} {len(merged):>9d} samples -> {args.output}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", "--english", dest="data_path", required=True, help="the English set")
    parser.add_argument("--translated", nargs="+", required=True, help="translated sets (<language>.json)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep_corrupt", "--keep-corrupt", dest="keep_corrupt", action="store_true")
    parser.add_argument("--image_prefix", "--image-prefix", dest="image_prefix", default="",
                        help="prefix for translated samples' image paths, e.g. coco/train2017")
