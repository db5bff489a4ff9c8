"""The per-language files of a run: the resume log, and the final JSON and review file rebuilt from it.

In ``--output_dir``, per language: ``<language>.json`` (a JSON array, input order), ``<language>.review.jsonl``
(one line per rejected turn) and ``<language>.progress.jsonl`` (one line per finished sample, the resume log).

A run keeps only where each finished sample's record is in the log, never the records: LLaVA-Instruct-150K in 9
languages is about 1.4M translated samples, tens of GB as Python objects. The final files are written by reading the
records back one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from palo.data.translate.samples import conversation_key, with_translation
from palo.jsonl import atomic_write_json, iter_log, write_jsonl_atomic


@dataclasses.dataclass
class Progress:
    """One language's finished samples, as positions in its resume log.

    Attributes:
        path: The resume log.
        offsets: Input index -> byte offset of that sample's record (the last line for the index wins, so a record
            ``apply-review`` appended replaces the run's).
        corrupt: Indices of finished samples flagged ``corrupt``.
    """

    path: str
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)
    corrupt: set[int] = dataclasses.field(default_factory=set)

    def add(self, index: int, offset: int, corrupt: bool) -> None:
        """Note a record appended at ``offset`` for sample ``index``."""
        self.offsets[index] = offset
        if corrupt:
            self.corrupt.add(index)
        else:
            self.corrupt.discard(index)

    def record(self, index: int) -> dict[str, Any]:
        """The record of finished sample ``index``, read back from the log."""
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return json.loads(f.readline())

    def records(self) -> Iterator[dict[str, Any]]:
        """The records of the finished samples in input order, read back from the log one at a time."""
        with open(self.path, "rb") as f:
            for index in sorted(self.offsets):
                f.seek(self.offsets[index])
                yield json.loads(f.readline())


def load_progress(path: str, hashes: Sequence[str]) -> Progress:
    """The finished samples of a resume log that still match the input.

    A torn last line (a kill mid-write) is cut off the file, so the run's appends continue a whole log. A sample
    counts as finished when the last record for its index carries the hash of the current input's sample there
    (a changed or shorter input file makes its old records stale).

    Args:
        path: The resume log (may be missing).
        hashes: :func:`~palo.data.translate.samples.source_hash` of every input sample, in input order.
    """
    last: dict[int, tuple[int, bool, bool]] = {}  # index -> (offset, matches the input, corrupt)
    for offset, record in iter_log(path, repair=True):
        if not isinstance(record, dict) or "index" not in record:
            continue
        index = int(record["index"])
        sample = record.get("sample")
        last[index] = (offset, 0 <= index < len(hashes) and record.get("hash") == hashes[index],
                       bool(isinstance(sample, dict) and sample.get("corrupt")))
    progress = Progress(path)
    for index, (offset, current, corrupt) in last.items():
        if current:
            progress.add(index, offset, corrupt)
    return progress


def output_paths(output_dir: str, language: str) -> dict[str, str]:
    """The ``json``, ``review`` and ``progress`` paths of one language."""
    return {name: os.path.join(output_dir, f"{language}{suffix}") for name, suffix in
            (("json", ".json"), ("review", ".review.jsonl"), ("progress", ".progress.jsonl"))}


def write_outputs(paths: dict[str, str], progress: Progress, samples: Sequence[dict[str, Any]], language: str
                  ) -> None:
    """The final JSON (input order) and the review file, both rebuilt from the progress log, one record at a time.

    Each output sample is the current input sample with the record's translated turns and ``corrupt`` flag (and each
    review entry names the current ``id``): a record matches its input sample by the conversations alone, and the
    other fields (``id``, ``image`` ...) may have changed since it was written.

    Args:
        paths: The language's files (:func:`output_paths`).
        progress: Its finished samples, one for every input sample.
        samples: The input samples.
        language: The target language.
    """
    key = conversation_key(language)
    review: list[dict[str, Any]] = []  # rejected turns only: a small share of the set

    def translated() -> Iterator[dict[str, Any]]:
        for record in progress.records():
            sample = samples[int(record["index"])]
            review.extend({**entry, "id": sample.get("id")} for entry in record["review"])
            stored = record["sample"]
            yield with_translation(sample, language, stored[key], stored["corrupt"])

    atomic_write_json(paths["json"], translated())
    write_jsonl_atomic(paths["review"], review)
