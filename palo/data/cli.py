"""``palo-data``: look at and check training data before spending GPU hours on it.

* ``palo-data inspect --data_path X --model_name_or_path Y --version v1 [--index N] [--json]``: the rendered prompt
  of each sample and exactly which tokens are supervised (with ``--json``: one object per sample).
* ``palo-data validate --data_path X --image_folder D``: per-language counts, missing or corrupt images, malformed
  turns, and how many images are read unlike the original (turned, flattened, scaled: :mod:`palo.image_io`); exits
  non-zero when anything is wrong.
* ``palo-data translate --data_path X --languages ar,zh,fr --output_dir D --base-url URL --model M``: translate with
  any OpenAI-compatible chat model, checked, cached and resumable (:mod:`palo.data.translate`).
* ``palo-data apply-review --data_path D/arabic.json --review D/arabic.review.jsonl``: merge a person's corrections
  of rejected translations back (:mod:`palo.data.review`).
* ``palo-data merge --data_path english.json --translated D/*.json --output X --seed 0``: one shuffled training
  JSON in all languages (:mod:`palo.data.merge`).
* ``palo-data stats --data_path X --model_name_or_path T [--questions Q.jsonl|BENCH] [--out P]``: samples, turns,
  images, tokens per word and per character and the byte-fallback share, per language (:mod:`palo.data.stats`).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from palo.constants import IGNORE_INDEX
from palo.data.json_index import DataFileChangedError, JsonArrayIndex
from palo.data.languages import sample_language


def _inspect(args: argparse.Namespace) -> int:
    from palo.model.builder import resolve_checkpoint_dir
    from palo.model.tokenizer import load_tokenizer
    from palo.train.preprocess import BadSampleError, build_supervised_example, supervised_text
    from palo.train.train import template_for

    try:
        tokenizer = load_tokenizer(resolve_checkpoint_dir(args.model_name_or_path))
    except OSError as exc:  # a folder without tokenizer files (CheckpointError is palo-data's ValueError line)
        print(f"error: --model_name_or_path {args.model_name_or_path}: no tokenizer could be loaded ({exc})",
              file=sys.stderr)
        return 2
    if args.version != "v0" and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    if args.mm_use_im_start_end:
        # As training's _add_vision_tokens (palo/train/model_setup.py) does before it tokenizes: without them a base
        # LLM's tokenizer splits <im_start>/<im_end> into pieces and every count here differs from training's. A
        # checkpoint trained with them has them already (adding is then a no-op). That function also resizes the
        # model's embeddings, so it cannot take a bare tokenizer.
        from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN

        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    index = JsonArrayIndex.build(args.data_path)
    positions = [args.index] if args.index is not None else range(len(index))
    if args.index is not None and not 0 <= args.index < len(index):
        print(f"error: --index {args.index} is out of range (the file has {len(index)} samples)", file=sys.stderr)
        return 2
    template = template_for(args.version)
    problems = 0
    for i in positions:
        sample = index.read(i)
        sample_id = sample.get("id") if isinstance(sample, dict) else None
        if isinstance(sample, dict) and sample.get("corrupt"):
            # Decided first, as training does (palo/train/dataset.py): it filters the sample out whatever it holds.
            record = {"index": i, "id": sample_id, "skipped": "corrupt: true (training filters it out)"}
            print(json.dumps(record, ensure_ascii=False) if args.json else f"[{i}] id={sample_id!r}: skipped "
                  "(corrupt: true; training filters it out)")
            continue
        try:
            if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
                raise BadSampleError("no 'conversations' list")
            example = build_supervised_example(
                sample["conversations"], tokenizer, template, "image" in sample, args.mm_use_im_start_end
            )
        except BadSampleError as exc:
            problems += 1
            record = {"index": i, "id": sample_id, "error": str(exc)}
            print(json.dumps(record, ensure_ascii=False) if args.json else f"[{i}] id={sample_id!r}: ERROR {exc}")
            continue
        supervised = [k for k, label in enumerate(example.labels) if label != IGNORE_INDEX]
        record = {
            "index": i,
            "id": sample_id,
            "language": sample_language(sample),
            "prompt": example.prompt,
            "supervised_text": supervised_text(example, tokenizer).strip(),
            "supervised_token_count": len(supervised),
            "token_count": len(example.input_ids),
            "supervised_segments": [text for text, flag in example.segments if flag],
        }
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            # Supervised text shown between ⟦ ⟧ inside the prompt.
            shown = "".join(f"⟦{text}⟧" if flag else text for text, flag in example.segments)
            print(f"[{i}] id={sample_id!r} language={record['language']} tokens={record['token_count']} "
                  f"supervised={record['supervised_token_count']}\n{shown}\n")
    return 1 if problems else 0


def _check_image(path: str) -> tuple[str | None, list[str]]:
    """(why the image cannot be read, or None; which reading rules touch it, see ``read_differently``)."""
    from PIL import Image

    from palo.image_io import ImageLoadError, load_image, read_differently

    try:
        load_image(path)
    except ImageLoadError as exc:
        return str(exc), []
    with Image.open(path) as image:  # the header again (the loaded image has been turned and flattened)
        return None, read_differently(image)


# Image checks queued at most, per worker: enough to keep every worker busy while samples are read, and few enough
# that memory stays flat however large the set (Executor.map submitted one Future per image up front: ~2.4 KB each).
_QUEUED_PER_WORKER = 4


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[tuple[Any, Any]], limit: int
                 ) -> Iterator[tuple[Any, Any]]:
    """``(key, fn(arg))`` for each ``(key, arg)`` of ``items``, in order, with at most ``limit`` calls queued or
    running: ``items`` is consumed only as results are taken."""
    pending: collections.deque = collections.deque()
    for key, arg in items:
        pending.append((key, pool.submit(fn, arg)))
        if len(pending) >= limit:
            key, future = pending.popleft()
            yield key, future.result()
    while pending:
        key, future = pending.popleft()
        yield key, future.result()


class _Problems:
    """The problems of a check: all counted, only the ``keep`` first by sample index held (a set where every image
    is missing would otherwise hold one dict per sample)."""

    def __init__(self, keep: int) -> None:
        self.keep, self.count, self._heap, self._seq = keep, 0, [], 0

    def add(self, index: int, sample_id: Any, problem: str) -> None:
        self.count += 1
        self._seq += 1
        # A max-heap on (index, arrival) through negation: the worst kept problem is popped when one more is found.
        heapq.heappush(self._heap, (-index, -self._seq, {"index": index, "id": sample_id, "problem": problem}))
        if len(self._heap) > self.keep:
            heapq.heappop(self._heap)

    def first(self) -> list[dict[str, Any]]:
        return [problem for _, _, problem in sorted(self._heap, key=lambda item: (-item[0], -item[1]))]


def _image_problem(image: Any) -> str | None:
    """Why an ``image`` value names no single file (as training refuses it), or None."""
    if isinstance(image, (list, tuple, dict)) or image is None:
        return (f"'image' must be one file name, not {type(image).__name__} {str(image)[:80]}: PALO trains on one "
                "image per sample")
    return None


def _validate(args: argparse.Namespace) -> int:
    from palo.data.turns import BadSampleError, check_turns

    index = JsonArrayIndex.build(args.data_path)
    languages: collections.Counter[str] = collections.Counter()
    problems = _Problems(args.max_problems)
    counts = collections.Counter(corrupt=0, kept=0, text_only=0, image_samples=0)
    # Images the original read otherwise (palo/image_io.py): a reproduction can see how much of its data that touches.
    read_differently: collections.Counter[str] = collections.Counter(
        {"exif_orientation": 0, "transparency": 0, "16_bit": 0, "pad_scaled": 0})

    def image_paths() -> Iterator[tuple[tuple[int, Any], str]]:
        """The samples, checked one by one; yields the image files to check, which the pool checks meanwhile."""
        for i in tqdm(range(len(index)), desc="samples", unit="sample", disable=args.quiet):
            try:
                sample = index.read(i)
            except ValueError as exc:  # one problem among the others, not the end of the check
                problems.add(i, None, str(exc))
                continue
            sample_id = sample.get("id") if isinstance(sample, dict) else None
            if isinstance(sample, dict) and sample.get("corrupt"):
                # Decided first, as training does (palo/train/dataset.py): filtered out whatever it holds.
                counts["corrupt"] += 1
                continue
            counts["kept"] += 1  # training keeps it (and trains on it, or fails on it if malformed)
            if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
                problems.add(i, sample_id, "no 'conversations' list")
                continue
            languages[sample_language(sample)] += 1
            try:
                check_turns(sample["conversations"], "image" in sample)
            except BadSampleError as exc:
                problems.add(i, sample_id, str(exc))
            if "image" not in sample:
                counts["text_only"] += 1
                continue
            counts["image_samples"] += 1
            wrong = _image_problem(sample["image"])
            if wrong:
                problems.add(i, sample_id, wrong)
                continue
            yield (i, sample_id), os.path.join(args.image_folder or "", str(sample["image"]))

    workers = max(1, args.workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (i, sample_id), (error, notes) in _bounded_map(pool, _check_image, image_paths(),
                                                           workers * _QUEUED_PER_WORKER):
            if error:
                problems.add(i, sample_id, error)
            read_differently.update(notes)
    # A set training refuses outright (palo/train/train.py), in its words: nothing to train on is a problem too.
    if not len(index):
        refused = f"--data_path {args.data_path} holds no samples"
    elif not counts["kept"]:
        refused = f"--data_path {args.data_path} holds no samples that are not corrupt"
    else:
        refused = None
    report = {
        "samples": len(index),
        "corrupt_filtered": counts["corrupt"],
        "image_samples": counts["image_samples"],
        "text_only_samples": counts["text_only"],
        "languages": dict(languages.most_common()),
        "images_read_unlike_the_original": dict(read_differently),
        "problems": problems.count + bool(refused),
    }
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if refused:
        print(json.dumps({"index": None, "id": None, "problem": refused}, ensure_ascii=False), file=sys.stderr)
    for problem in problems.first():
        print(json.dumps(problem, ensure_ascii=False), file=sys.stderr)
    if problems.count > args.max_problems:
        print(f"... and {problems.count - args.max_problems} more problems", file=sys.stderr)
    return 1 if problems.count or refused else 0


def count_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``minimum`` (argparse's error names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds above 0 (argparse's error names the flag).

    A time-out of 0 or less fails every request at once, and "nan" or "inf" is no limit a client can keep: each
    request would then be retried through the whole back-off schedule before the run said anything.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # No fixed prog: usage lines and errors name the command typed (``palo data``, ``palo-data``).
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="rendered prompts and supervised tokens")
    inspect.add_argument("--data_path", required=True)
    inspect.add_argument("--model_name_or_path", required=True, help="where the tokenizer is")
    inspect.add_argument("--version", default="v1")
    inspect.add_argument("--index", type=int, default=None)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--mm_use_im_start_end", action="store_true")
    inspect.set_defaults(func=_inspect)
    validate = sub.add_parser("validate", help="counts per language, bad images, malformed turns")
    validate.add_argument("--data_path", required=True)
    validate.add_argument("--image_folder", default="")
    validate.add_argument("--workers", type=count_at_least(1), default=8)
    validate.add_argument("--max_problems", type=count_at_least(0), default=50, help="problems listed (all counted)")
    validate.add_argument("--quiet", action="store_true", help="no progress bars")
    validate.set_defaults(func=_validate)
    from palo.data import stats

    parser_stats = sub.add_parser("stats", help="token cost per language: tokens per word/character, byte fallback")
    stats.add_arguments(parser_stats)
    parser_stats.set_defaults(func=stats.main_stats)
    _add_translation_commands(sub)
    return parser


def _add_translation_commands(sub: argparse._SubParsersAction) -> None:
    # Imported lazily inside the handlers' modules: the translation tools need openai, inspect/validate do not.
    from palo.data import merge, review, translate

    parser = sub.add_parser("translate", help="translate conversations with an OpenAI-compatible chat model")
    translate.add_arguments(parser)
    parser.set_defaults(func=translate.main_translate)
    parser = sub.add_parser("apply-review", help="merge corrected translations from a review file")
    review.add_arguments(parser)
    parser.set_defaults(func=review.main_apply_review)
    parser = sub.add_parser("merge", help="English + translated sets -> one shuffled training JSON")
    merge.add_arguments(parser)
    parser.set_defaults(func=merge.main_merge)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.data_path):
        print(f"error: --data_path {args.data_path}: no such file", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, DataFileChangedError) as exc:  # e.g. a file that is not one JSON array, or one edited meanwhile
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
