"""``palo-data merge``: the English set and the translated sets into one training JSON (docs/formats.md §8).

Each translated sample becomes a training sample whose ``conversations`` are the translated turns, with the English
kept under ``english_conversations`` and the language under ``language``; the ``<language>_conversation`` copy is
dropped (it would double the size of a file that is already 13 GB at PALO scale, and the trainer ignores it).
Samples flagged ``corrupt`` (English ones too) are left out unless ``--keep_corrupt`` (the trainer would drop them
anyway), and so are samples of a translated set that were never translated (no ``<language>_conversation``); the
two are counted apart. ``--image_prefix`` is put before relative image paths only. Everything is shuffled with
``random.Random(seed)``: the same inputs and seed give the same file, byte for byte.

A set's language is the one translate wrote it for: its file's name when that names a language (``russian.json``,
as translate names its output), else its samples' ``<language>_conversation`` key. A set translated from an earlier
translated set carries that set's key too (translate keeps every field), so an unnamed set whose samples carry
several is refused rather than labelled by a guess, and so is a named set whose samples carry another language's.

The inputs are never loaded whole (at PALO scale they are about 2M samples, tens of GB as Python objects): each is
indexed by byte offset (:class:`~palo.data.sample_file.SampleFile`), the shuffle permutes positions, and the
output is written one sample at a time, read back from its input. Every sample is checked in the first pass, so a
broken one stops the merge before the (hours-long) write rather than in the middle of it. The output is written
atomically; the temporary file of a killed merge is removed by the next one. Each input is read as it was when the
merge indexed it, even if a rerun of ``palo-data translate`` replaces it meanwhile; one edited in place stops the
merge, and no output is written.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from palo.data.sample_file import SampleFile
from palo.data.translate import TARGET_LANGUAGES, conversation_key, parse_target_language
from palo.jsonl import atomic_write_json, same_file


def translated_language(sample: dict[str, Any], named: str | None = None) -> str | None:
    """The language of a translated sample, from its ``<language>_conversation`` key.

    A sample may carry more than one such key: translate keeps every field of its input, so a set translated from
    an earlier set (original PALO outputs keep ``<language>_conversation``, docs/formats.md §8) holds that set's key
    beside its own. Which one translate wrote is then told by the file's name, ``<language>.json`` as translate
    names it (:func:`set_language`).

    Args:
        sample: A sample of a translated set.
        named: The language the set's file name says, or None.

    Returns:
        ``named`` when the sample has its key, else the one language whose key the sample has, or None (never
        translated).

    Raises:
        ValueError: A sample of a named set with another language's key but not its own (another language's set,
            or one mixed into it), or one of an unnamed set with keys of several languages: which of them translate
            wrote cannot be told, and guessing would label (and merge) the set as another language.
    """
    if named is not None and conversation_key(named) in sample:
        return named
    found = [language for language in TARGET_LANGUAGES if conversation_key(language) in sample]
    if named is not None and found:  # another language's set under this name, or one mixed into it
        raise ValueError(f"is {' and '.join(found)}, not {named} as the file's name says: give each language's set "
                         "as its own --translated file, named for its language")
    if len(found) > 1:
        keys = " and ".join(repr(conversation_key(language)) for language in found)
        names = " or ".join(f"{language}.json" for language in found)
        raise ValueError(f"carries {keys}: which one translate wrote is told by the file's name, <language>.json as "
                         f"translate names it; name the file for the language it was translated into ({names})")
    return found[0] if found else None


def set_language(path: str) -> str | None:
    """The language a translated set's file name says: translate writes ``<language>.json`` (``russian.json``); an
    ISO code (``ru.json``) and a suffix after a dot (``russian.reviewed.json``, an apply-review ``--output``) are
    taken too. None when the name says no target language."""
    stem = os.path.basename(path).split(".")[0]
    try:
        return parse_target_language(stem)
    except ValueError:
        return None


def to_training(sample: dict[str, Any], language: str, image_prefix: str = "") -> dict[str, Any]:
    """One translated sample as a training sample (``conversations`` in ``language``), without its
    ``<language>_conversation`` copies: its own, and those of a set it was translated from."""
    copies = {conversation_key(other) for other in TARGET_LANGUAGES}
    out = {k: v for k, v in sample.items() if k not in copies}
    out["english_conversations"] = sample["conversations"]
    out["conversations"] = sample[conversation_key(language)]
    out["language"] = language
    # An absolute path already names the file (training joins it to the image folder, which keeps it as it is).
    if image_prefix and "image" in out and not os.path.isabs(str(out["image"])):
        out["image"] = image_prefix.rstrip("/") + "/" + str(out["image"])
    return out


def _check_sample(sample: dict[str, Any], keys: tuple[str, ...], where: str, image_prefix: str) -> None:
    """Refuse, naming the sample, what the write pass could not turn into a training sample.

    Raises:
        ValueError: A key of ``keys`` that is not a list of turns, or (with a prefix) an ``image`` that is not one
            file name.
    """
    for key in keys:
        if not isinstance(sample.get(key), list):
            raise ValueError(f"{where} has no '{key}' list")
    image = sample.get("image")
    if image_prefix and "image" in sample and (not isinstance(image, (str, int)) or isinstance(image, bool)):
        raise ValueError(f"{where}: 'image' must be one file name, not {type(image).__name__} {str(image)[:80]}")


def merge_files(english_path: str, translated_paths: list[str], output: str, seed: int = 0,
                keep_corrupt: bool = False, image_prefix: str = "") -> dict[str, Counter]:
    """Combine, shuffle and write, holding positions in memory rather than samples.

    Args:
        english_path: The English training set (taken as it is).
        translated_paths: Translated sets as written by ``palo-data translate``.
        output: The merged JSON array, written atomically.
        seed: Shuffle seed; the permutation is that of ``random.Random(seed).shuffle`` over the English samples
            followed by each translated set's kept samples, in input order.
        keep_corrupt: Keep samples flagged ``corrupt`` (flag and all).
        image_prefix: Prefix for the ``image`` of translated samples (``coco/train2017`` for LLaVA-Instruct-150K,
            which stores bare file names; the original's ``--append_coco``).

    Returns:
        Per-language counts: ``kept``, ``corrupt_dropped`` and (translated sets) ``untranslated_dropped``.

    Raises:
        ValueError: Naming the flag and file: an input that cannot be read as a JSON array of samples, a
            translated set without a ``<language>_conversation`` key or whose language cannot be told
            (:func:`translated_language`), or a kept sample without its turns (or, with ``image_prefix``, with an
            ``image`` that is not one file name).
    """
    inputs = [english_path, *translated_paths]
    for i, path in enumerate(inputs):
        if same_file(output, path):
            raise ValueError(f"--output {output} is also an input: merge into a new file")
        if any(same_file(path, other) for other in inputs[:i]):
            raise ValueError(f"{path} is given twice: its samples would be merged twice")
    sets = [SampleFile(english_path, "--data_path")] + [SampleFile(path, "--translated") for path in translated_paths]
    english = Counter(kept=0, corrupt_dropped=0)
    counts: dict[str, Counter] = {"english": english}
    languages: list[str | None] = [None]
    chosen: list[tuple[int, int]] = []  # (set, sample), before the shuffle
    for i in range(len(sets[0])):  # the English set, checked like the others: a broken sample stops it now
        sample = sets[0][i]
        _check_sample(sample, ("conversations",), f"--data_path {sets[0].path}: sample {i}", "")
        if sample.get("corrupt") and not keep_corrupt:
            english["corrupt_dropped"] += 1
            continue
        chosen.append((0, i))
        english["kept"] += 1
    for k, samples in enumerate(sets[1:], start=1):
        language, kept, corrupt, untranslated = None, 0, 0, 0
        named = set_language(samples.path)
        for i in range(len(samples)):  # the filter pass: decides what is kept, keeps nothing but positions
            sample = samples[i]
            try:
                own = translated_language(sample, named)
            except ValueError as exc:
                raise ValueError(f"--translated {samples.path}: sample {i} {exc}") from None
            if language is not None and own is not None and own != language:  # translate writes one per language
                raise ValueError(f"--translated {samples.path}: sample {i} is {own}, the set's earlier samples are "
                                 f"{language}: give each language's set as its own --translated file")
            language = language or own
            if own is None:  # never translated (left out of a partial run): not a corrupt translation
                untranslated += 1
                continue
            if sample.get("corrupt") and not keep_corrupt:
                corrupt += 1
                continue
            _check_sample(sample, ("conversations", conversation_key(language)),
                          f"--translated {samples.path}: sample {i}", image_prefix)
            chosen.append((k, i))
            kept += 1
        if language is None:
            raise ValueError(f"--translated {samples.path}: no '<language>_conversation' key (was it made by "
                             "translate?)")
        counter = counts.setdefault(language, Counter())
        counter["kept"] += kept
        counter["corrupt_dropped"] += corrupt
        counter["untranslated_dropped"] += untranslated
        languages.append(language)
    random.Random(seed).shuffle(chosen)

    def merged() -> Iterator[dict[str, Any]]:
        for k, i in chosen:
            sample = sets[k][i]
            yield sample if k == 0 else to_training(sample, languages[k], image_prefix)
        # Before the output replaces anything: an input edited in place without moving its samples reads silently.
        for samples in sets:
            samples.check_unchanged()

    atomic_write_json(output, merged())
    return counts


def main_merge(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data merge``."""
    try:
        counts = merge_files(args.data_path, args.translated, args.output, args.seed, args.keep_corrupt,
                             args.image_prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (a folder, a missing or read-only place)
        print(f"error: cannot write --output {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for language, counter in counts.items():
        dropped = [f"{counter[key]} {what} dropped" for key, what in
                   (("corrupt_dropped", "corrupt"), ("untranslated_dropped", "untranslated")) if counter[key]]
        print(f"{language:10s} {counter['kept']:>9d} samples" + (f"  ({', '.join(dropped)})" if dropped else ""))
    print(f"{'total':10s} {sum(c['kept'] for c in counts.values()):>9d} samples -> {args.output}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", "--english", dest="data_path", required=True, help="the English set")
    parser.add_argument("--translated", nargs="+", required=True, help="translated sets (<language>.json)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep_corrupt", "--keep-corrupt", dest="keep_corrupt", action="store_true")
    parser.add_argument("--image_prefix", "--image-prefix", dest="image_prefix", default="",
                        help="prefix for translated samples' image paths, e.g. coco/train2017")
