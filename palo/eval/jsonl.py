"""JSON-lines reading that names file and line on bad input, and appending that survives a killed process.

Evaluation runs are long and get interrupted; every output here is written one complete line per record with a
single unbuffered ``write`` so that a killed run leaves only whole lines behind (at worst one torn last line, which
:func:`repair_tail` removes before a resumed run appends).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class JsonlError(ValueError):
    """A JSON-lines file is missing, or a line is not a JSON object / lacks a required key.

    The message always names the file and the 1-based line number.
    """


@dataclass(frozen=True)
class Record:
    """One parsed line: the object and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def iter_jsonl(path: str, skip_bad: bool = False, required: tuple[str, ...] = ()) -> Iterator[Record]:
    """Yield the JSON objects of a file, one per non-blank line.

    Args:
        path: The file.
        skip_bad: Report malformed lines on stderr and go on, instead of raising.
        required: Keys every object must have; an object without one counts as malformed.

    Yields:
        :class:`Record` for every good line.

    Raises:
        JsonlError: If the file does not exist, or (unless ``skip_bad``) on the first malformed line.
    """
    if not os.path.isfile(path):
        raise JsonlError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            else:
                if not isinstance(data, dict):
                    problem = f"expected a JSON object, got {type(data).__name__}"
                else:
                    missing = [k for k in required if k not in data]
                    if missing:
                        problem = f"missing key(s) {', '.join(missing)}"
            if problem is None:
                yield Record(data, path, number)
                continue
            message = f"{path}:{number}: {problem}"
            if not skip_bad:
                raise JsonlError(message)
            print(f"[skip] {message}", file=sys.stderr)


def read_jsonl(path: str, skip_bad: bool = False, required: tuple[str, ...] = ()) -> list[Record]:
    """All records of a file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, skip_bad=skip_bad, required=required))


def index_by(records: list[Record], key: str, kind: str) -> dict[Any, Record]:
    """Map ``record.data[key]`` to the record; a duplicate key is an error naming both lines.

    Args:
        records: Parsed lines.
        key: The join key (``question_id`` or ``image``).
        kind: What the file holds, for messages ("reference answers").

    Raises:
        JsonlError: On a duplicate key.
    """
    out: dict[Any, Record] = {}
    for record in records:
        value = record.data.get(key)
        if value in out:
            raise JsonlError(
                f"{record.where}: duplicate {key} {value!r} in {kind} (first at line {out[value].line})"
            )
        out[value] = record
    return out


def repair_tail(path: str) -> int:
    """Cut a torn last line (no trailing newline and not valid JSON) left by a killed writer.

    Returns:
        The number of bytes removed (0 when the file is whole or absent).
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb") as f:
        data = f.read()
    if data.endswith(b"\n"):
        return 0
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        with open(path, "r+b") as f:
            f.truncate(start)
        print(f"[resume] {path}: removed a torn last line ({len(data) - start} bytes)", file=sys.stderr)
        return len(data) - start
    # A whole record that only lacks its newline: keep it, complete the line.
    with open(path, "ab") as f:
        f.write(b"\n")
    return 0


class JsonlAppender:
    """Append records to a JSON-lines file, each as one flushed ``write`` (crash-safe, see module doc).

    Args:
        path: The output file; its folder is created.
    """

    def __init__(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        repair_tail(path)
        # Unbuffered: one os-level write per record, so nothing sits in a Python buffer when the process dies.
        self._file = open(path, "ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: str, records: list[dict[str, Any]]) -> None:
    """Replace a file with ``records`` through a temporary file and ``os.replace`` (never half-written)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
