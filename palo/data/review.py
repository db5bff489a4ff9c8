"""``palo-data apply-review``: merge a person's corrections of rejected translations back into a translated set.

``palo-data translate`` writes one JSONL line per rejected turn to ``<language>.review.jsonl``::

    {"language": "arabic", "index": 12, "id": "000000033471", "turn": 1, "from": "gpt",
     "source": "<English turn>", "translation": "<the rejected attempt>", "problems": ["..."], "corrected": null}

The reviewer writes the right translation into ``corrected`` (leaving it null keeps the turn rejected). A
correction replaces turn ``turn`` of ``<language>_conversation`` in sample ``index``; ``<image>`` is put back at the
front of the turn when the English turn had one and the correction left it out; a correction that adds ``<image>``
to a turn whose English has none is refused (training would reject the sample). A sample whose every rejected turn
is corrected gets ``corrupt: false``, unless the English input flagged it ``corrupt`` itself (the log says which; a
translate rerun would flag it again): it stays corrupt. Which turns were rejected comes from the translate run's
``<language>.progress.jsonl`` (``--progress``, by default next to the data file) as well as from the review file, so
a review file split between reviewers clears a sample only once all its rejected turns are corrected; without that
log only the review file's lines are known, and a note says so. The corrected samples are appended to the log too,
so a later ``palo-data translate`` rerun keeps the corrections; with the log, a sample's corrections are applied to
its last record there (which holds the corrections of earlier review files, also those written to another
``--output``), not to the copy in ``--data_path``. ``--output`` may not be the review file or the log.
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
from palo.data.translate import check_translation, conversation_key, join_image, mask, source_hash, split_image
from palo.jsonl import JsonlAppender, atomic_write_json, cannot_write, iter_log, read_jsonl, same_file


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


def apply_corrections(samples: Sequence[dict[str, Any]], entries: list[dict[str, Any]],
                      rejected: dict[int, list[dict[str, Any]]] | None = None,
                      logged: dict[int, dict[str, Any]] | None = None, flagged: set[int] | None = None
                      ) -> tuple[dict[str, int], dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """Apply review entries to the samples they name.

    Args:
        samples: The translated set (``<language>_conversation`` and ``corrupt`` in each sample): a list, or a
            :class:`~palo.data.sample_file.SampleFile` that reads each sample when it is asked for.
        entries: Review lines; those with a null or empty ``corrected`` are skipped.
        rejected: The review entries the translate run recorded per sample index (its progress log), i.e. every
            turn still rejected; None when there is no log: the turns of a corrupt sample that ``entries`` do not
            correct are then put through translate's quality check again, and any that fails keeps it corrupt.
        logged: The ``sample`` of the same log records (by index), whose translated turns and ``corrupt`` flag are
            the ones corrected: they hold the corrections of earlier review files, which ``samples`` lacks when
            those were written with ``--output`` elsewhere. A record for other English than the set's is not used.
        flagged: The indices of samples the English input flagged ``corrupt`` (the log records it): they stay
            corrupt when every rejected turn is corrected, as translate keeps them (without the log none is known).

    Returns:
        A report (corrected turns, samples cleared, samples still corrupt with a turn rejected, samples with every
        turn corrected that stay corrupt as the input flagged them), the corrected samples by index (copies:
        ``samples`` is not changed), and per corrected sample the review entries of its turns still rejected.

    Raises:
        ValueError: When an entry points at a sample or turn that does not exist or whose English differs, its
            ``corrected`` is neither a string nor null, or it puts ``<image>`` into a turn whose English has none.
    """
    by_sample: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_sample[int(entry["index"])].append(entry)
    corrected = cleared = pending = kept_flagged = 0
    fixed: dict[int, dict[str, Any]] = {}
    still_open: dict[int, list[dict[str, Any]]] = {}
    for index, group in sorted(by_sample.items()):
        if not 0 <= index < len(samples):
            raise ValueError(f"review entry for sample {index}, but the set has {len(samples)} samples")
        sample = copy.deepcopy(samples[index])
        key = conversation_key(group[0]["language"])
        base = (logged or {}).get(index)
        if isinstance(base, dict) and isinstance(base.get(key), list) and base.get("conversations") == sample.get(
                "conversations") and len(base[key]) == len(sample.get(key) or ()):
            # The log, not the set, says which turns are still rejected (``rejected``): the turns must come from
            # the same record, or a turn an earlier review corrected only in the log counts as done here while the
            # set still holds its rejected text.
            sample[key], sample["corrupt"] = copy.deepcopy(base[key]), bool(base.get("corrupt"))
        turns = sample.get(key)
        if not isinstance(turns, list):
            raise ValueError(f"sample {index} has no '{key}'")
        done: set[int] = set()
        for entry in group:
            k = int(entry["turn"])
            english = sample["conversations"][k]["value"] if k < len(sample.get("conversations", [])) else None
            if english != entry.get("source"):
                raise ValueError(f"sample {index} turn {k}: the English in the review entry differs from the set "
                                 "(was the review file made from another input?)")
            text = correction(entry)
            if text is None:
                continue
            _, images = split_image(english)
            if not images and DEFAULT_IMAGE_TOKEN in text:
                # Training takes <image> only where the English has it: the sample would be refused, or its image
                # spliced into an answer.
                raise ValueError(f"sample {index} turn {k}: the correction adds {DEFAULT_IMAGE_TOKEN}, which the "
                                 "English turn does not have; remove it")
            if images and DEFAULT_IMAGE_TOKEN not in text:
                text = join_image(text.strip(), images)
            elif images:
                text = join_image(split_image(text)[0], images)  # normalise: placeholders at the front
            turns[k] = {**turns[k], "value": text}
            corrected += 1
            done.add(k)
        # Every turn translate rejected must be corrected, not only those this review file lists (it may be one
        # reviewer's share of the file): the rest are still the rejected attempts.
        known = list((rejected or {}).get(index, [])) + [e for e in group if correction(e) is None]
        if rejected is None and sample.get("corrupt"):
            # No log to say which turns translate rejected: check again the turns this file does not correct.
            listed = {int(e["turn"]) for e in group}
            known += [{"language": group[0]["language"], "index": index, "id": sample.get("id"), "turn": k,
                       "from": turn.get("from"), "source": sample["conversations"][k]["value"],
                       "translation": turn.get("value"), "problems": problems, "corrected": None}
                      for k, turn in enumerate(turns) if k not in listed
                      and (problems := _recheck(sample, k, group[0]["language"]))]
        open_entries, seen = [], set()
        for entry in known:
            k = int(entry["turn"])
            if k not in done and k not in seen:
                seen.add(k)
                open_entries.append(entry)
        if open_entries:
            pending += 1
        elif index in (flagged or ()):
            # The English itself was flagged (by an earlier tool or a person): correcting its translation does not
            # make it good, and a translate rerun would flag it again (with_translation).
            sample["corrupt"] = True
            kept_flagged += 1
        else:
            sample["corrupt"] = False
            cleared += 1
        fixed[index] = sample
        still_open[index] = open_entries
    report = {"corrected_turns": corrected, "samples_cleared": cleared, "samples_still_corrupt": pending,
              "samples_flagged_in_input": kept_flagged}
    return report, fixed, still_open


def _recheck(sample: dict[str, Any], k: int, language: str) -> list[str]:
    """Translate's quality check of turn ``k`` of a translated sample, as stored (spans and ``<image>`` restored).

    Returns:
        The problems (empty when the turn passes); a turn that is not a translated string is a problem itself.
    """
    english = sample.get("conversations", [])
    turn = sample[conversation_key(language)][k]
    if k >= len(english) or not isinstance(english[k], dict) or not isinstance(english[k].get("value"), str):
        return []  # nothing was translated here
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        return ["not a translated text"]
    source = mask(split_image(english[k]["value"])[0])
    if not source.text.strip():
        return []
    translation = _mask_spans(split_image(turn["value"])[0], source.spans)
    return check_translation(source.text, translation, language, len(source.spans))


def _mask_spans(text: str, spans: list[str]) -> str:
    """``text`` (a restored translation) with each of the source's ``spans`` put back as its placeholder ``[[k]]``.

    The spans are looked for, not the pattern that found them in the English run again: restored next to a letter
    ("有3只猫", "3匹", "৩টি") a number no longer stands alone, so the pattern would miss it. Each span is taken at
    its first place after the previous one's (the order of the English), else at any free place (a translation may
    reorder them), and a number not as part of a longer one ("3" in "13").
    """
    taken: list[tuple[int, int, int]] = []  # (start, end, k)

    def free(start: int, end: int) -> bool:
        digit = (start > 0 and text[start - 1].isdigit()) or (end < len(text) and text[end].isdigit())
        return not digit and all(end <= s or start >= e for s, e, _ in taken)

    cursor = 0
    for k, span in enumerate(spans, 1):
        found = None
        for begin in (cursor, 0):
            at = text.find(span, begin)
            while at != -1 and not free(at, at + len(span)):
                at = text.find(span, at + 1)
            if at != -1:
                found = at
                break
        if found is None:  # missing from the translation: the check reports its placeholder missing
            continue
        taken.append((found, found + len(span), k))
        cursor = found + len(span)
    out, last = [], 0
    for start, end, k in sorted(taken):
        out.append(f"{text[last:start]}[[{k}]]")
        last = end
    return "".join(out) + text[last:]


def _progress_path(args: argparse.Namespace) -> str | None:
    """The translate resume log: ``--progress``, else ``<data_path stem>.progress.jsonl`` when it exists."""
    if args.progress is not None:
        return args.progress
    if args.data_path.endswith(".json"):
        candidate = args.data_path[: -len(".json")] + ".progress.jsonl"
        return candidate if os.path.exists(candidate) else None
    return None


def _logged(progress: str, indices: set[int]
            ) -> tuple[dict[int, Any], dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]], set[int]]:
    """The hash, the still-rejected review entries and the translated sample of the last log record of each of
    ``indices``, and which of them the English input flagged ``corrupt``.

    A record says the input flagged its sample with ``input_corrupt`` (translate writes it), or, in a log older than
    that key, by a ``corrupt`` sample without a rejected turn, which nothing else makes. The flag holds for later
    records of the same English (an apply-review before this rule wrote ``corrupt: false`` over it).
    """
    hashes: dict[int, Any] = {}
    rejected: dict[int, list[dict[str, Any]]] = {}
    samples: dict[int, dict[str, Any]] = {}
    flagged: set[int] = set()
    for _, record in iter_log(progress):
        if not isinstance(record, dict) or "index" not in record or int(record["index"]) not in indices:
            continue
        index = int(record["index"])
        if index in hashes and record.get("hash") != hashes[index]:
            flagged.discard(index)  # a record for other English: its flag is not this input's
        hashes[index] = record.get("hash")
        review = record.get("review")
        rejected[index] = [e for e in review if isinstance(e, dict) and "turn" in e] if isinstance(review, list) else []
        sample = record.get("sample")
        if isinstance(sample, dict):
            samples[index] = sample
            if record.get("input_corrupt") is True or (sample.get("corrupt") and not rejected[index]):
                flagged.add(index)
        else:
            samples.pop(index, None)
    return hashes, rejected, samples, flagged


def main_apply_review(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data apply-review``."""
    output = args.output or args.data_path
    progress = _progress_path(args)
    # The output replaces whatever file it names: the reviewer's work, or the log a translate rerun resumes from.
    for flag, path in (("--review", args.review), ("--progress", progress)):
        if path and same_file(output, path):
            print(f"error: --output {output} is also the {flag} file: write the set elsewhere", file=sys.stderr)
            return 2
    problem = cannot_write(output)  # before anything is read or appended to the translate log
    if problem:
        print(f"error: cannot write --output {output}: {problem}", file=sys.stderr)
        return 2
    # One sample at a time (its ValueError is palo-data's error line): only the corrected ones are held.
    samples = SampleFile(args.data_path, "--data_path")
    # Strict: a person edited this file, and a typo must name its line rather than silently drop what follows it.
    entries = [record.data for record in read_jsonl(args.review, required=("index", "language", "turn"))]
    try:
        indices = {int(e["index"]) for e in entries}
        hashes, rejected, logged, flagged = _logged(progress, indices) if progress else ({}, None, {}, set())
        report, fixed, still_open = apply_corrections(samples, entries, rejected, logged, flagged)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        print(f"error: {args.review}: {exc}", file=sys.stderr)
        return 2
    if rejected is None and report["samples_still_corrupt"]:
        print(f"note: no translate progress log (--progress) for {args.data_path}: turns the review file does not "
              "correct were checked again, and samples with a turn that fails stay corrupt", file=sys.stderr)
    if report["samples_flagged_in_input"]:
        print(f"note: {report['samples_flagged_in_input']} sample(s) with every rejected turn corrected stay corrupt: "
              "the English input flagged them corrupt itself", file=sys.stderr)
    # Keep the translate run's resume log in step, so a rerun rebuilds the set with the corrections in it.
    if progress and fixed:
        # The appender first cuts a torn last line (a killed translate run), so the corrections start a line of
        # their own instead of being glued to the torn one, where a resume would cut them off.
        with JsonlAppender(progress) as log:
            for index in fixed:
                record = {"index": index, "hash": hashes.get(index) or source_hash(fixed[index]),
                          "sample": fixed[index], "review": still_open[index]}
                if index in flagged:  # as translate writes it, for the next apply-review
                    record["input_corrupt"] = True
                log.write(record)
    # After the log: a run killed between the two leaves the corrections where a rerun of either command finds them.
    # Every sample is read before the new file replaces the old one (in place by default); the temporary file of a
    # killed run is removed by the next one.
    try:
        atomic_write_json(output, (fixed[i] if i in fixed else samples[i] for i in range(len(samples))))
    except OSError as exc:  # what cannot_write cannot see: a full disk, a quota, a file system gone read-only
        kept = f"; the corrections are kept in {progress}, rerun to write the set" if progress and fixed else ""
        print(f"error: cannot write --output {output}: {exc.strerror or exc}{kept}", file=sys.stderr)
        return 2
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
