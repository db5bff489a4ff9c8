"""Summarise judge reviews into relative scores (``python -m palo.eval.summarize_gpt_review``).

Flags as in the original (docs/formats.md §5.5): ``-d/--dir``, ``-v/--version``, ``-s/--select``, ``-f/--files``,
``-i/--ignore``. For every file and every key in sorted order (``all``, ``llava_bench_complex``, ``llava_bench_conv``,
``llava_bench_detail``) it prints ``<key> <relative> <reference x10> <model x10>`` as the original did (scripts that
split those lines get the fields they expect); how many reviews each line used and how many failed goes to stderr.

The relative score is PALO's headline number: mean(model) / mean(reference) x 100, a ratio of means, with both
means rounded to 3 decimals first (docs/formats.md §5.5). Failed judgments (``"failed": true``, or a ``[-1, -1]``
tuple in old files) are left out of the means and counted (docs/compat.md#evaluation).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from palo.eval.jsonl import JsonlError, iter_jsonl

CATEGORIES = ("conv", "detail", "complex")


@dataclass(frozen=True)
class CategoryScore:
    """Scores of one category (or ``all``).

    Attributes:
        relative: round(model_mean / reference_mean * 100, 1); None when nothing was judged, or when the
            reference's mean is 0 (no ratio).
        reference: The reference (Assistant 1) mean x 10, rounded to 1 decimal.
        model: The model (Assistant 2) mean x 10, rounded to 1 decimal.
        judged: Reviews used.
        failed: Failed reviews left out.
        replaced: Earlier reviews of a question a later line of the file reviews again, left out (a resumed run's
            retries; in a file holding several runs or languages, reviews of other questions with the same id).
    """

    relative: float | None
    reference: float | None
    model: float | None
    judged: int
    failed: int
    replaced: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(review: dict[str, Any]) -> list[float] | None:
    """The (reference, model) pair of a usable review, else None."""
    pair = review.get("tuple", review.get("score"))
    if review.get("failed") or not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < math.inf for s in pair):
        return None
    return [float(pair[0]), float(pair[1])]


def score_of(pairs: list[list[float]], failed: int, replaced: int = 0) -> CategoryScore:
    """Means and the relative score of (reference, model) pairs, rounded as the original."""
    if not pairs:
        return CategoryScore(None, None, None, 0, failed, replaced)
    reference = round(sum(p[0] for p in pairs) / len(pairs), 3)
    model = round(sum(p[1] for p in pairs) / len(pairs), 3)
    relative = round(model / reference * 100, 1) if reference > 0 else None
    return CategoryScore(relative, round(reference * 10, 1), round(model * 10, 1), len(pairs), failed, replaced)


def summarize(reviews: list[dict[str, Any]], ignore: set[str] | None = None) -> dict[str, CategoryScore]:
    """Per-category and overall scores of a list of reviews.

    Args:
        reviews: Review records; the last one per question_id counts (a resumed run may append a retry), the earlier
            ones are counted as ``replaced``.
        ignore: question_ids (as strings) to leave out.

    Returns:
        ``{"all": ..., "llava_bench_conv": ..., ...}``: the categories present, each with failed and replaced ones
        counted.
    """
    ignore = ignore or set()
    latest: dict[str, dict[str, Any]] = {}
    replaced: dict[str, int] = {"all": 0}
    for index, review in enumerate(reviews):
        qid = str(review.get("question_id", f"#{index}"))
        if qid in ignore:
            continue
        earlier = latest.get(qid)
        if earlier is not None:  # said, not silent: 3 of 6 reviews of a two-language file were dropped unseen
            for key in ["all"] + ([earlier["category"]] if earlier.get("category") else []):
                replaced[key] = replaced.get(key, 0) + 1
        latest[qid] = review
    pairs: dict[str, list[list[float]]] = {"all": []}
    failed: dict[str, int] = {"all": 0}
    for review in latest.values():
        keys = ["all"] + ([review["category"]] if review.get("category") else [])
        scores = _scores(review)
        for key in keys:
            pairs.setdefault(key, [])
            failed.setdefault(key, 0)
            if scores is None:
                failed[key] += 1
            else:
                pairs[key].append(scores)
    return {key: score_of(pairs.get(key, []), failed.get(key, 0), replaced.get(key, 0))
            for key in sorted(pairs.keys() | replaced.keys())}


def load_reviews(path: str) -> list[dict[str, Any]]:
    """The review records of a file; malformed lines are reported and skipped (a summary should still print).

    Raises:
        JsonlError: If the file holds records but none is a review: an answers file given by mistake was summed as
            every answer a failed judgment.
    """
    reviews, others = [], 0
    for record in iter_jsonl(path, skip_bad=True):
        category = record.data.get("category")
        if category is not None and not isinstance(category, str):
            print(f"[skip] {record.where}: 'category' must be a string, got {str(category):.40}", file=sys.stderr)
            continue
        if not {"tuple", "score", "failed"} & record.data.keys():  # what a judge's review has, failed or not
            print(f"[skip] {record.where}: not a review (no 'tuple' of scores)", file=sys.stderr)
            others += 1
            continue
        reviews.append(record.data)
    if others and not reviews:
        raise JsonlError(f"{path} is not a reviews file: none of its {others} lines has a 'tuple' of scores")
    return reviews


def summarize_file(path: str, ignore: set[str] | None = None) -> dict[str, CategoryScore]:
    return summarize(load_reviews(path), ignore)


def format_line(key: str, score: CategoryScore) -> str:
    """The original's line ``<key> <relative> <ref x10> <model x10>``; ``n/a`` where nothing was judged."""
    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x}"

    return f"{key} {show(score.relative)} {show(score.reference)} {show(score.model)}"


def format_counts(label: str, key: str, score: CategoryScore) -> str:
    """``[counts] <label> <key>: judged n, failed f[, replaced r]``: what a line of :func:`format_line` rests on
    (stderr)."""
    counts = f"[counts] {label} {key}: judged {score.judged}, failed {score.failed}"
    if score.replaced:
        counts += (f", replaced {score.replaced} (earlier reviews of a question_id a later line reviews again: a "
                   "resumed run's retries; a file of several runs or languages is not one set of reviews)")
    return counts


def find_files(directory: str | None, version: str | None, select: list[str] | None,
               files: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(label, path) of the review files to summarise, by the original's rules, in sorted order.

    ``files`` (``-f``) if given, else the directory's ``.jsonl`` files whose names start with ``gpt4_text``,
    ``reviews_`` or ``review_``, or all of them when the ``-d`` argument contains ``review`` anywhere (so
    ``evaluation/reviews/run1`` reads every file, as the original did). Both kinds are then sorted and filtered
    alike: ``select`` substrings and the version (``0613`` if the label contains it, else ``0314``) are matched
    against the label (the name without ``gpt4_text_`` and ``.jsonl``). With both ``-d`` and ``-f`` the names are
    read inside the directory.
    """
    if files:
        names = list(files)
    else:
        names = [name for name in os.listdir(directory or ".") if name.endswith(".jsonl") and (
            name.startswith(("gpt4_text", "reviews_", "review_")) or "review" in (directory or ""))]
    found = []
    for name in sorted(names):
        label = os.path.basename(name).replace("gpt4_text_", "").replace(".jsonl", "")
        if select and not all(s in label for s in select):
            continue
        if version and ("0613" if "0613" in label else "0314") != version:
            continue
        found.append((label, os.path.join(directory, name) if directory else name))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Relative scores from judge reviews.")
    parser.add_argument("-d", "--dir", default=None)
    parser.add_argument("-v", "--version", default=None)
    parser.add_argument("-s", "--select", nargs="*", default=None)
    parser.add_argument("-f", "--files", nargs="*", default=[])
    parser.add_argument("-i", "--ignore", nargs="*", default=[], help="question ids to leave out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dir and not os.path.isdir(args.dir):
        print(f"error: -d {args.dir}: no such folder", file=sys.stderr)
        return 2
    targets = find_files(args.dir, args.version, args.select, args.files) if args.dir or args.files else []
    if not targets:
        print("error: no review files (pass -f FILE ... or -d DIR)", file=sys.stderr)
        return 2
    ignore = {str(int(x)) if str(x).lstrip("-").isdigit() else str(x) for x in args.ignore}
    for label, path in targets:
        try:
            scores = summarize_file(path, ignore)
        except JsonlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(label)
        for key, score in scores.items():
            print(format_line(key, score))
            print(format_counts(label, key, score), file=sys.stderr)
        print("=" * 33)
    return 0


if __name__ == "__main__":
    sys.exit(main())
