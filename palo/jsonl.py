"""JSON lines and whole-file writes that survive a killed process: one module for eval and data tools alike.

Evaluation and translation runs are long and get interrupted. Everything here is built for that:

* :func:`iter_jsonl` / :func:`read_jsonl` read strictly and name file and line on bad input (for inputs a person
  made or edited); :func:`iter_log` / :func:`read_log` read an append-only log of our own leniently, up to its first
  incomplete line.
* :class:`JsonlAppender` writes one complete line per record with a single unbuffered ``write``, so a killed run
  leaves only whole lines behind (at worst one torn last line, which :func:`repair_tail` removes before a resumed
  run appends).
* :func:`atomic_write`, :func:`write_jsonl_atomic` and :func:`atomic_write_json` replace a file through a temporary
  file in the same folder and ``os.replace``: a reader sees the old file or the new one, never half of one;
  :func:`staged_folder` does the same for a folder of files (an export, a merged checkpoint).

Only the standard library is imported, so data tools can use this without pulling in torch.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def _parse_line(line: bytes, required: tuple[str, ...]) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a good line, ``(None, problem)`` for a bad one, ``(None, None)`` for a blank one."""
    try:
        raw = line.decode("utf-8")
    except UnicodeDecodeError as exc:  # bytes: a line that is not UTF-8 is named like any other bad line
        return None, f"not UTF-8 text ({exc.reason} at byte {exc.start + 1})"
    if not raw.strip():
        return None, None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {type(data).__name__}"
    missing = [k for k in required if k not in data]
    if missing:
        return None, f"missing key(s) {', '.join(missing)}"
    return data, None


def _parsed_lines(path: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(1-based number, object, problem)`` for every non-blank line of a file (one of the two is None).

    Raises:
        JsonlError: If the file does not exist.
    """
    if not os.path.isfile(path):
        raise JsonlError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            data, problem = _parse_line(line, required)
            if data is not None or problem is not None:
                yield number, data, problem


def scan_jsonl(path: str, required: tuple[str, ...] = ()) -> tuple[list[Record], list[tuple[int, str]]]:
    """Every good record of a file and every bad line's ``(1-based number, problem)``, reporting nothing (for a
    writer that decides what to do with the bad lines of its own output).

    Raises:
        JsonlError: If the file does not exist.
    """
    records, bad = [], []
    for number, data, problem in _parsed_lines(path, required):
        if problem is None:
            records.append(Record(data, path, number))
        else:
            bad.append((number, problem))
    return records, bad


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
    for number, data, problem in _parsed_lines(path, required):
        if problem is None:
            yield Record(data, path, number)
            continue
        message = f"{path}:{number}: {problem}"
        if not skip_bad:
            raise JsonlError(message)
        print(f"[skip] {message}", file=sys.stderr)


# Free space below which a write that failed without saying why (SQLite's "disk I/O error", torch's "iostream
# error", numpy's "8192 requested and 2768 written") is put down to a full disk: a write of a few KiB cannot fail for
# want of room above it, and a full disk leaves less than one of its chunks.
FULL_DISK_BYTES = 1 << 20


def _nearest_existing(path: str) -> str:
    """``path``, absolute, or its nearest ancestor that exists (where missing folders would be made)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def nearly_full(path: str) -> int | None:
    """The free bytes on the disk holding ``path`` (or its nearest existing ancestor) when under
    :data:`FULL_DISK_BYTES`, else None (also when it cannot be read)."""
    try:
        free = shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return None
    return free if free < FULL_DISK_BYTES else None


def cannot_write(path: str, folder: bool = False) -> str | None:
    """Why nothing can be written at ``path`` (None when it can): a folder where a file goes (or, with ``folder``,
    a file where the folder goes), a file standing where one of the folders of its path should be, or a folder this
    user may not write in. Checked before the work, as a writer finds it only at its end; a failure only writing
    finds (a full disk) is still the writer's to report.
    """
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return "a file, not a folder"
    if not folder and os.path.isdir(path):
        return "a folder, not a file"
    parent = _nearest_existing(path if folder else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to write in {parent}"
    return None


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same path written two ways, a symlink, a hard link), existing or not."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def read_jsonl(path: str, skip_bad: bool = False, required: tuple[str, ...] = ()) -> list[Record]:
    """All records of a file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, skip_bad=skip_bad, required=required))


def unique_records(records: Iterable[Record], key: str, skip_bad: bool = False,
                   check: Callable[[Record], str | None] | None = None) -> list[Record]:
    """The records in order, each value of ``key`` once, and only those ``check`` passes.

    Values are compared as strings, so ``1`` and ``"1"`` are one question: the outputs written from them (answers,
    reviews) are keyed and joined by the string, and a repeat would be worked on (paid for) twice, then lose one.

    Args:
        records: Records that all have ``key`` (read with it in ``required``).
        key: The identifying field, e.g. ``"question_id"``.
        skip_bad: Report a repeated or failing record on stderr and skip it, instead of raising.
        check: The problem with a record (a sentence naming it), or None when it is good.

    Returns:
        The records kept, in their order.

    Raises:
        JsonlError: Unless ``skip_bad``, on the first repeat (naming both lines) or failing record.
    """
    kept, first = [], {}
    for record in records:
        value = str(record.data[key])
        if value in first:
            problem = f"duplicate {key} {record.data[key]!r} (first at {first[value]})"
        else:
            problem = check(record) if check is not None else None
        if problem is not None:
            if not skip_bad:
                raise JsonlError(f"{record.where}: {problem}")
            print(f"[skip] {record.where}: {problem}", file=sys.stderr)
            continue
        first[value] = record.where
        kept.append(record)
    return kept


def _last_line(f: Any, block: int = 1 << 16) -> tuple[int, bytes]:
    """``(offset, bytes)`` of a binary file's last line, its newline included if it has one, read backwards block by
    block: a resumed run checks its log's end, and reading a log of gigabytes whole took seconds and as much memory.
    """
    end = f.seek(0, os.SEEK_END)
    tail = b""
    position = end
    while position > 0:
        step = min(block, position)
        position -= step
        f.seek(position)
        tail = f.read(step) + tail
        cut = tail.rfind(b"\n", 0, len(tail) - 1)  # the line's own newline, at its end, does not end it
        if cut >= 0:
            return position + cut + 1, tail[cut + 1:]
    return 0, tail


def repair_tail(path: str) -> int:
    """Cut a torn last line (no trailing newline and not valid JSON) left by a killed writer.

    Returns:
        The number of bytes removed (0 when the file is whole or absent).
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb") as f:
        start, last = _last_line(f)
    if last.endswith(b"\n"):
        return 0
    try:
        json.loads(last.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        with open(path, "r+b") as f:
            f.truncate(start)
        print(f"[resume] {path}: removed a torn last line ({len(last)} bytes)", file=sys.stderr)
        return len(last)
    # A whole record that only lacks its newline: keep it, complete the line.
    with open(path, "ab") as f:
        f.write(b"\n")
    return 0


def _lock_exclusively(fd: int) -> None:
    """An advisory lock on an open file for this process's lifetime with it (POSIX ``flock``); where locks are not
    supported (Windows, some network file systems) nothing is locked.

    Raises:
        BlockingIOError: If another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:  # no locks here (ENOLCK and the like): write unlocked, as before
        return


def lock_folder(folder: str) -> int:
    """Lock ``folder`` (created if missing) against other processes for as long as the returned descriptor is open:
    an exclusive ``flock`` on the folder itself, so no lock file lands among a run's outputs. Where locks are not
    supported nothing is locked, as for :class:`JsonlAppender`.

    Returns:
        The folder's descriptor; closing it (or the process ending) lets go.

    Raises:
        BlockingIOError: If another process holds the folder.
    """
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        _lock_exclusively(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is the file now at ``path``."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def _write_all(file: Any, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered ``file``: its ``write`` may write less than asked without raising (a
    disk that fills within the data), and taking that as done cut a record, or, in a rewrite, half the file.

    Raises:
        OSError: The error of the write that failed (ENOSPC ...), or ENOSPC when one wrote nothing.
    """
    view, done = memoryview(data), 0
    while done < len(view):
        written = file.write(view[done:])
        if not written:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {done} of {len(view)} bytes)",
                          getattr(file, "name", None))
        done += written


def open_locked(path: str) -> Any:
    """``path`` opened for appending (created if missing, unbuffered) and locked as a :class:`JsonlAppender`'s file.

    A whole-file rewrite or removal of a file another process appends to (a shard merge) holds this first: done under
    the writer, its later records went to a replaced or deleted file, reported written and lost.

    Raises:
        JsonlError: If another process holds the file (an appender, or another such rewrite).
    """
    while True:
        file = open(path, "ab", buffering=0)
        try:
            _lock_exclusively(file.fileno())
        except BlockingIOError:
            file.close()
            raise JsonlError(f"{path}: another process is writing this file (two runs on one output would each "
                             "write what the other writes); wait for it, or write elsewhere") from None
        # Another appender's drop_lines may have replaced the file between the open and the lock: the lock then
        # holds a file no longer at the path, and what is written to it would be lost. Open the path anew.
        if _same_file(file.fileno(), path):
            return file
        file.close()


class JsonlAppender:
    """Append records to a JSON-lines file, each as one flushed ``write`` (crash-safe, see module doc).

    One writer per file: the file is locked while open, and a second appender (another process) is refused.

    Args:
        path: The output file; its folder is created.

    Raises:
        JsonlError: If another process is appending to the file.
        OSError: If the folder or file cannot be created.
    """

    def __init__(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # Unbuffered: one os-level write per record, so nothing sits in a Python buffer when the process dies.
        self.path = path
        self._file = open_locked(path)
        repair_tail(path)  # under the lock: a torn line is never another writer's line in progress

    def drop_lines(self, numbers: set[int]) -> None:
        """Rewrite the file without its lines ``numbers`` (1-based: damaged lines a resumed run found), atomically
        and without letting go of the lock: the new file is locked before it replaces the old one, and the
        appender writes to it from then on."""
        path = os.path.realpath(self.path)  # through a symlink: the file the appender writes, not the link
        with open(path, "rb") as f:
            kept = [line for number, line in enumerate(f, start=1) if number not in numbers]
        fd, tmp = mkstemp_shared(os.path.dirname(path), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        new = os.fdopen(fd, "r+b", buffering=0)
        try:
            os.fchmod(new.fileno(), os.stat(path).st_mode & 0o7777)  # the file keeps its mode (a shared group's write)
            _lock_exclusively(new.fileno())
            _write_all(new, b"".join(kept))
            os.fsync(new.fileno())
            os.replace(tmp, path)
        except BaseException:
            new.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._file.close()
        self._file = new

    def write(self, record: dict[str, Any]) -> int:
        """Append one record; returns the byte offset its line starts at (for readers that seek to it).

        Raises:
            OSError: If the record could not be written whole (a full disk): what part of it was written is cut
                off again, so the file ends with its last whole record.
        """
        start = self._file.seek(0, os.SEEK_END)
        try:
            _write_all(self._file, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError:
            with contextlib.suppress(OSError):  # shrinking needs no space; if even that fails, resume repairs it
                self._file.truncate(start)
            raise
        return start

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def temp_prefix(path: str) -> str:
    """The start of the names of ``path``'s temporary files written on this host (the writer's PID follows)."""
    return f".{os.path.basename(path)}.partial-{socket.gethostname()}-"


def remove_abandoned_temp_files(path: str) -> list[str]:
    """Remove the temporary files that writers of ``path`` on this host left when they were killed (their PID is no
    longer running): a killed merge of a 13 GB set left a 13 GB file behind, and nothing ever removed it.

    Returns:
        The files removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix, removed = temp_prefix(path), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) and name.endswith(".tmp") else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:  # another run removed it first, or it is not ours to remove
            continue
        removed.append(os.path.join(folder, name))
        print(f"[cleanup] removed {os.path.join(folder, name)}, left by a run that was stopped", file=sys.stderr)
    return removed


def atomic_write(path: str, chunks: Iterable[str] | Iterable[bytes]) -> None:
    """Write text (or bytes) to ``path`` through a temp file in the same folder and ``os.replace``: never half a
    file.

    The temp file is unique (``mkstemp``), so two writers of the same path do not clobber each other's temp file,
    and it is removed again when writing fails. It is named after this host and process, so the next write of
    ``path`` removes it when this one is killed (:func:`remove_abandoned_temp_files`). The folder is created.
    """
    remove_abandoned_temp_files(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = mkstemp_shared(folder, prefix=f"{temp_prefix(path)}{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk if isinstance(chunk, bytes) else chunk.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mkstemp_shared(folder: str, prefix: str = "", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the mode ``open()`` would give a new file (0666 less the umask).

    mkstemp's 0600 would make the file, once moved into place, unreadable to the other users of a shared data set,
    results folder or cache.

    Returns:
        ``(file descriptor, path)``, as ``mkstemp``.
    """
    fd, path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, path


def read_json_samples(path: str, what: str = "file") -> list[dict[str, Any]]:
    """A whole JSON file holding an array of objects (a LLaVA-format data set), read at once.

    Args:
        path: The file.
        what: How error messages name it (``--translated``, ``the English set`` ...).

    Returns:
        The objects, in order.

    Raises:
        ValueError: Naming ``what`` and ``path``: the file is missing or unreadable, not UTF-8, not JSON (with the
            line and column), or not an array of objects.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"{what} {path}: expected a JSON array of samples (objects)")
    return data


def _remove_abandoned(parent: str, owner: str) -> None:
    """Remove staging folders ``<owner><pid>-*`` in ``parent`` whose process (on this host) is gone."""
    for name in os.listdir(parent):
        if not name.startswith(owner):
            continue
        pid = name[len(owner):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        print(f"[cleanup] removed {os.path.join(parent, name)}, left by a run that was stopped", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def staged_folder(final_dir: str, replaces: Sequence[str] = ()) -> Iterator[str]:
    """A new folder beside ``final_dir`` to write into; on success its files replace those of the same names in
    ``final_dir`` (created if missing), on any error it is deleted and ``final_dir`` is untouched.

    Args:
        final_dir: The folder the files end up in.
        replaces: Glob patterns of files in ``final_dir`` that the writer owns: those it did not write this time
            are removed (an earlier export's weight shards, which a loader would otherwise still read); other files
            there (a README) are kept.

    Yields:
        The staging folder's path.
    """
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    # The name says whose it is, so that a later run can remove what a killed one left (gigabytes for a 13B).
    owner = f".{os.path.basename(os.path.abspath(final_dir))}.partial-{socket.gethostname()}-"
    _remove_abandoned(parent, owner)
    staging = tempfile.mkdtemp(prefix=f"{owner}{os.getpid()}-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make the finished folder private to this user
    try:
        yield staging
        # Files get the mode new files get (safetensors writes 0600: an export only its writer could read).
        mode = 0o666 & ~_umask()
        for root, _, names in os.walk(staging):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode | (os.stat(path).st_mode & 0o111))  # executables stay executable
        if not os.path.isdir(final_dir):
            os.replace(staging, final_dir)
            return
        written = set(os.listdir(staging))
        for pattern in replaces:  # --overwrite: what an earlier run wrote and this one did not
            for stale in glob.glob(os.path.join(glob.escape(final_dir), pattern)):
                if os.path.basename(stale) not in written and os.path.isfile(stale):
                    os.remove(stale)
        for name in written:  # --overwrite into a folder that has other files
            target = os.path.join(final_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
    except BaseException:  # the write failed, or moving it in did (a folder where a file goes): nothing left over
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Replace a file with ``records``, one JSON object per line (UTF-8, not ASCII-escaped), atomically."""
    atomic_write(path, (json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _json_array(items: Iterable[Any]) -> Iterator[str]:
    yield "["
    for i, item in enumerate(items):
        yield ("\n" if i == 0 else ",\n") + json.dumps(item, ensure_ascii=False)
    yield "\n]\n"


def atomic_write_json(path: str, items: Iterable[Any]) -> None:
    """Write a JSON array atomically, one item per line (UTF-8, not ASCII-escaped: a third of the size).

    One item per line keeps multi-GB training files greppable and lets a reader index them line by line.
    """
    atomic_write(path, _json_array(items))


def iter_log(path: str, repair: bool = False) -> Iterator[tuple[int, Any]]:
    """The records of an append-only JSONL log, up to a torn last line, read line by line.

    For logs this project writes itself (resume logs), where the only expected damage is a kill mid-write: an
    incomplete or unreadable last line. Damage anywhere else (an edit, a disk fault) is an error naming the line,
    never a reason to drop the finished records after it. Inputs a person edits go through the strict
    :func:`read_jsonl` instead. Streaming: a log of millions of records is never in memory at once.

    Args:
        path: The log; a missing file has no records.
        repair: Once the records are read, cut a torn last line off the file, so that appends continue a whole log.

    Yields:
        ``(byte offset of the line, parsed record)``, in order (whatever JSON values the lines hold).

    Raises:
        JsonlError: If a line before the last cannot be read.
    """
    if not os.path.exists(path):
        return
    good_end = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                record = json.loads(line)
            except ValueError:  # bad JSON or bad UTF-8
                if f.read(1):  # lines follow: not a torn end
                    raise JsonlError(f"{path}:{number}: a damaged line before the end of the log (not a torn "
                                     "last line); fix or remove that line, then run again") from None
                break
            yield good_end, record
            good_end += len(line)
        size = os.fstat(f.fileno()).st_size
    if repair and good_end != size:
        with open(path, "r+b") as f:
            f.truncate(good_end)


def read_log(path: str, repair: bool = False) -> list[Any]:
    """All records of an append-only JSONL log (see :func:`iter_log`), in order."""
    return [record for _, record in iter_log(path, repair=repair)]
