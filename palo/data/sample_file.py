"""A LLaVA-format data set (one JSON array of samples) read one sample at a time, never loaded whole.

The data tools that stream a set (``palo-data translate``, ``apply-review``, ``merge``) go through
:class:`SampleFile`: the file is indexed by byte offset (:class:`~palo.data.json_index.JsonArrayIndex`, nothing
cached beside it) and each sample is decoded and checked when it is used, with errors that name the flag and file.
The index holds the file open from the start, so a rerun of the command that wrote it (which replaces it atomically)
does not disturb a tool reading it; one edited in place is an error naming it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from palo.data.json_index import DataFileChangedError, JsonArrayIndex


class SampleFile(Sequence):
    """The samples of one JSON-array file, decoded on demand (thread-safe: reads are positional).

    Args:
        path: The file.
        what: How errors name it (``--data_path``, ``--translated`` ...).
        limit: Only the first ``limit`` samples (None: all; 0: none).

    Raises (at construction, and from indexing or iteration):
        ValueError: Naming ``what`` and ``path``: missing, unreadable, not one JSON array, edited in place since it
            was indexed, or a sample that is not valid UTF-8 JSON or not an object; a negative ``limit``.
    """

    def __init__(self, path: str, what: str, limit: int | None = None) -> None:
        self.path, self.what = path, what
        if limit is not None and limit < 0:  # was taken as 0: no samples, which a caller may write out as the set
            raise ValueError(f"{what} {path}: limit must be at least 0, got {limit}")
        try:
            self.index = JsonArrayIndex.build(path, cache=False)
        except FileNotFoundError:
            raise ValueError(f"{what} {path}: no such file") from None
        except OSError as exc:
            raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise ValueError(f"{what} {path}: not valid JSON ({str(exc).removeprefix(path + ': ')})") from None
        except DataFileChangedError as exc:  # edited while it was scanned: a RuntimeError, a traceback otherwise
            raise ValueError(f"{what} {exc}") from None
        self._len = len(self.index) if limit is None else min(limit, len(self.index))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override] - no slices
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        try:
            sample = self.index.read(i)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.what} {self.path}: sample {i} is not UTF-8 text ({exc.reason})") from None
        except ValueError as exc:
            raise ValueError(f"{self.what} {self.path}: sample {i} is not valid JSON ({exc})") from None
        except DataFileChangedError as exc:  # a RuntimeError: the file's fault, not the sample's, but one line too
            raise ValueError(f"{self.what} {exc}") from None
        except OSError as exc:  # a read error; merge would otherwise report it as its output being unwritable
            raise ValueError(f"{self.what} {self.path}: sample {i} cannot be read ({exc.strerror or exc})") from None
        if not isinstance(sample, dict):
            raise ValueError(f"{self.what} {self.path}: expected a JSON array of samples (objects), "
                             f"sample {i} is {type(sample).__name__}")
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self._len))

    def check_unchanged(self) -> None:
        """Refuse a file edited in place since it was indexed (reads only notice an edit that moved elements).

        Raises:
            ValueError: Naming ``what`` and the file.
        """
        try:
            self.index.check_unchanged()
        except DataFileChangedError as exc:
            raise ValueError(f"{self.what} {exc}") from None
        except OSError as exc:
            raise ValueError(f"{self.what} {self.path}: cannot be read ({exc.strerror or exc})") from None
