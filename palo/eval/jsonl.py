"""The JSON-lines helpers under their first import path; they live in :mod:`palo.jsonl`, shared with the data tools.

Kept because the eval modules, the server and user scripts import ``palo.eval.jsonl``.
"""

from palo.jsonl import (
    JsonlAppender,
    JsonlError,
    Record,
    atomic_write,
    atomic_write_json,
    iter_jsonl,
    read_jsonl,
    read_log,
    repair_tail,
    write_jsonl_atomic,
)

__all__ = [
    "JsonlAppender",
    "JsonlError",
    "Record",
    "atomic_write",
    "atomic_write_json",
    "iter_jsonl",
    "read_jsonl",
    "read_log",
    "repair_tail",
    "write_jsonl_atomic",
]
