"""The per-language files of a run: the resume log, and the final JSON and review file rebuilt from it.

In ``--output_dir``, per language: ``<language>.json`` (a JSON array, input order), ``<language>.review.jsonl``
(one line per rejected turn) and ``<language>.progress.jsonl`` (one line per finished sample, the resume log).
"""

from __future__ import annotations

import os
from typing import Any

from palo.jsonl import atomic_write_json, read_log, write_jsonl_atomic


def load_progress(path: str) -> dict[int, dict[str, Any]]:
    """Finished samples by input index; a later line for the same index (e.g. from apply-review) wins.

    A torn last line (a kill mid-write) is cut off the file, so the run's appends continue a whole log.
    """
    return {int(r["index"]): r for r in read_log(path, repair=True) if isinstance(r, dict) and "index" in r}


def output_paths(output_dir: str, language: str) -> dict[str, str]:
    """The ``json``, ``review`` and ``progress`` paths of one language."""
    return {name: os.path.join(output_dir, f"{language}{suffix}") for name, suffix in
            (("json", ".json"), ("review", ".review.jsonl"), ("progress", ".progress.jsonl"))}


def write_outputs(paths: dict[str, str], progress: dict[int, dict[str, Any]]) -> None:
    """The final JSON (input order) and the review file, both rebuilt from the progress log."""
    ordered = [progress[i] for i in sorted(progress)]
    atomic_write_json(paths["json"], (r["sample"] for r in ordered))
    write_jsonl_atomic(paths["review"], (e for r in ordered for e in r["review"]))
