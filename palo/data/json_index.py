"""A byte-offset index over a training JSON file that holds one top-level array (docs/formats.md §5.1).

The file is never loaded whole (why: docs/compat.md#training). This module scans it once, keeps only two ``int64``
numpy arrays (where each element starts and how many bytes it has), caches them next to the file, and decodes one
element at a time on demand.

The scan is vectorised. A chunk of bytes becomes a numpy array; numpy finds the quotes, backslashes and brackets;
backslash runs decide which quotes are escaped; the parity of the number of real quotes before a bracket says
whether it lies inside a string; a cumulative sum of the remaining brackets gives the nesting depth. Python then only
sees the few events at depth 1 (an element opening or closing), and the short gaps between elements are checked,
again with numpy, to hold exactly one comma and whitespace. Elements that are not objects or arrays (strings, numbers,
``true``/``false``/``null``) are legal and found by a slow path over those gaps; a training file has none. All of
this except the string state and depth carried from one chunk to the next needs no other chunk, so a few threads
scan chunks ahead (numpy releases the GIL) while the main thread applies the carried state in order.

What the scan checks: the first non-whitespace byte is ``[``; brackets balance and each element closes with the
bracket type it opened with; strings terminate; elements are separated by exactly one comma (no empty element, no
trailing comma); nothing but whitespace follows the closing ``]``; no backslash outside a string. It does not
validate the inside of an element (numbers, keys, colons, nested bracket types): :meth:`JsonArrayIndex.read` does,
with ``json.loads``, when that element is used. Malformed structure raises ``ValueError`` naming the byte offset.

The offsets hold only for the file as it was indexed, so the index opens it before it scans it and reads that open
file (that inode) from then on: a file replaced atomically meanwhile (``os.replace``, as a rerun of the command that
wrote it does) is still read as the version indexed. Another process (a DataLoader worker) reaches the same inode
through the descriptor it inherited or, failing that, through the path or the indexing process's descriptor, and
uses it only when its size, modification time and inode are those recorded; a file changed in place, or one no
process can reach any more, is named as such (:class:`DataFileChangedError`) rather than failing every later read as
"not valid JSON".
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from palo.jsonl import mkstemp_shared

__all__ = ["DEFAULT_CHUNK_SIZE", "DataFileChangedError", "JsonArrayIndex", "cache_paths", "scan_json_array"]

# Large enough that numpy's per-call overhead (~100 us a chunk) vanishes; small enough that a chunk and its
# scratch arrays stay near the CPU caches: 4 MB scanned 20-30% faster than 16 MB in scripts/bench/json_index.py.
DEFAULT_CHUNK_SIZE = 4 << 20
# Bump when the cache layout or the meaning of offsets/lengths changes, so old caches are rebuilt.
CACHE_VERSION = 1
_CACHE_SUFFIX = ".idx.npz"

_WS = b" \t\n\r"  # JSON whitespace; bytes.strip() with no argument would also accept \x0b and \x0c
_QUOTE, _BACKSLASH, _COMMA, _OPEN_ARRAY, _CLOSE_ARRAY = 0x22, 0x5C, 0x2C, 0x5B, 0x5D
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[list(_WS)] = True
# Gaps between elements longer than this (long runs of whitespace, scalar elements) go to the slow path, which
# keeps the vectorised gap check's temporaries small.
_FAST_GAP = 64

# Descriptors are opened bare (no file object: see JsonArrayIndex.__init__); O_BINARY exists on Windows only.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)

# Kinds of depth-1 events. OPEN/CLOSE are the outer array's brackets; START/END an element's own brackets.
_OPEN, _START, _END, _CLOSE = 0, 1, 2, 3


class DataFileChangedError(RuntimeError):
    """The file changed while or after it was indexed: the recorded offsets no longer point at its elements."""


class JsonArrayIndex:
    """Offsets and lengths of the elements of a file holding one JSON array; decodes elements on demand.

    :meth:`build` leaves the file it scanned open: reads go to that inode, whatever the path names by then. Only the
    path, two numpy arrays, the file's recorded state and which process holds it open are pickled, so the index can be
    handed to DataLoader workers. A process other than the one that opened the descriptor finds the indexed file on
    first :meth:`read`, in this order: the descriptor it inherited across ``fork`` (reads are positional, so the
    shared file position does not matter), the path, and (Linux) ``/proc/<pid>/fd/<fd>`` of the process holding it
    (a spawned worker, or one the index was pickled to, while the file at the path is another); each is used only if
    its size, modification time and inode are those recorded. The arrays are two Python objects whatever N is, so
    reading them never touches per-sample reference counts and forked workers keep sharing their pages: memory stays
    flat with the number of workers.

    Attributes:
        path: The JSON file.
        offsets: ``int64 [N]``, byte offset of each element's first byte (``{`` for an object).
        lengths: ``int64 [N]``, byte length of each element, without surrounding whitespace or commas.
        from_cache: Whether :meth:`build` loaded the arrays from a cache file instead of scanning.
        indexed: ``(size, mtime_ns, inode, time)``: the file as it was indexed and when (``time.time()``), checked
            whenever a process opens it; None (nothing checked) unless ``stat`` was given.

    Args:
        fd: A descriptor of the file as indexed (``stat`` is its ``os.fstat``), which the index takes over and
            closes; None: the path is opened on first :meth:`read`.
    """

    def __init__(self, path: str | os.PathLike, offsets: np.ndarray, lengths: np.ndarray, from_cache: bool = False,
                 stat: os.stat_result | None = None, fd: int | None = None):
        if offsets.shape != lengths.shape or offsets.ndim != 1:
            raise ValueError(f"offsets {offsets.shape} and lengths {lengths.shape} must be 1-D and the same shape")
        self.path = os.fspath(path)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.from_cache = from_cache
        self.indexed = None if stat is None else (stat.st_size, stat.st_mtime_ns, stat.st_ino, time.time())
        # A bare descriptor, not a file object: a copy of this object in a forked child must never close it when it
        # is garbage collected (its number may name another file there by then); only the process in _pid closes it.
        self._fd = fd
        self._pid: int | None = None if fd is None else os.getpid()
        # (pid, fd) of a process that held the indexed file open when this index was pickled (see _open_indexed).
        self._holder: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> JsonArrayIndex:
        """Index ``path``, reusing a cached index when the file's size, mtime and sampled content still match.

        The cache is ``<path>.idx.npz``; when the file's folder is not writable it goes to ``cache_dir`` (default
        ``$XDG_CACHE_HOME/palo/json_index`` or ``~/.cache/palo/json_index``). It is written atomically, so a
        crashed or concurrent build never leaves a half-written cache that a later run would trust.

        Args:
            path: A file holding one top-level JSON array (normally of objects), UTF-8 encoded.
            chunk_size: Bytes read and scanned at a time; tiny values exist to test chunk boundaries.
            workers: Threads that scan chunks in parallel (see :func:`scan_json_array`).
            cache: Read and write the cache. With ``False`` the file is always scanned and nothing is written.
            cache_dir: Where the cache goes when the file's folder is read-only.

        Returns:
            The index; ``from_cache`` tells whether it came from the cache.

        Raises:
            ValueError: The file is not one well-formed JSON array (the message names the byte offset).
            OSError: The file cannot be read.
            DataFileChangedError: The file changed (in place) while it was being scanned.
        """
        path = os.fspath(path)
        # Opened first and kept: the offsets describe this inode, which a rerun of the command that wrote the file
        # may replace at the path at any moment (os.replace) while this process goes on reading.
        fd = os.open(path, _READ_FLAGS)
        try:
            before = os.fstat(fd)
            key = _cache_key(path, before, fd) if cache else []
            if cache:
                for candidate in cache_paths(path, cache_dir):
                    index = _load_cache(path, candidate, key, before, fd)
                    if index is not None:
                        return index
            offsets, lengths = scan_json_array(path, chunk_size=chunk_size, workers=workers, fd=fd)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise DataFileChangedError(f"{path} changed while it was being indexed; the offsets are not "
                                           "trustworthy")
            if cache:
                with cache_writer(cache_paths(path, cache_dir)) as f:
                    # A file object, not a name: np.savez would append ".npz" to a name.
                    np.savez(f, meta=np.array(key, dtype=np.int64), offsets=offsets, lengths=lengths)
            return cls(path, offsets, lengths, stat=before, fd=fd)
        except BaseException:
            os.close(fd)
            raise

    # ---------------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, n={len(self)})"

    def read_raw(self, i: int) -> bytes:
        """The bytes of element ``i`` (negative ``i`` counts from the end).

        Raises:
            IndexError: ``i`` is out of range.
            DataFileChangedError: The file changed since it was indexed.
            OSError: The file is shorter than the index says (it changed after indexing).
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"element {i} out of range for {n} elements")
        offset, length = int(self.offsets[i]), int(self.lengths[i])
        fd = self._handle()
        if hasattr(os, "pread"):
            # Positional read: no shared file position, so threads (and forked processes sharing the descriptor)
            # may read concurrently.
            data = os.pread(fd, length, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, length)
        if len(data) != length:
            self._check_unchanged(fd)
            raise OSError(f"{self.path}: short read of element {i} at byte {offset}; the file changed after indexing")
        return data

    def read(self, i: int) -> Any:
        """Decode element ``i`` with ``json.loads`` (a dict for a PALO training file).

        Raises:
            IndexError: ``i`` is out of range.
            DataFileChangedError: The file changed since it was indexed.
            ValueError: The element is not valid JSON (or nested deeper than Python's recursion limit), naming the
                file, the element and the byte.
        """
        raw = self.read_raw(i)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes that are not UTF-8, or nested too deep
            self._check_unchanged(self._handle())  # edited in place under this process's open handle
            if isinstance(exc, RecursionError):  # a traceback otherwise, from every tool that reads the sample
                where, why = int(self.offsets[i]), "nested too deeply"
            elif isinstance(exc, UnicodeDecodeError):  # .start is where the bad byte is (it has no .pos)
                where, why = int(self.offsets[i]) + exc.start, "not UTF-8 text"
            else:
                where, why = int(self.offsets[i]) + getattr(exc, "pos", 0), getattr(exc, "msg", str(exc))
            raise ValueError(f"{self.path}: sample {i % len(self)} (byte {where}) is not valid JSON: {why}") from None

    def check_unchanged(self) -> None:
        """Raise :class:`DataFileChangedError` if the file read was edited in place since it was indexed.

        Reads only check the file when they fail; a pass whose output must match one version of the file (a merge)
        calls this once it has read everything, since an edit that kept elements where they were reads silently.
        """
        self._check_unchanged(self._handle())

    def close(self) -> None:
        """Close this process's descriptor; a later :meth:`read` opens the file again (as :meth:`read` does after
        ``fork``)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None

    def _handle(self) -> int:
        """This process's descriptor of the file as indexed, found on first use (see the class docstring)."""
        if self._fd is None or self._pid != os.getpid():
            # After fork the parent's descriptor is used if it is still the file as indexed, and never closed here
            # otherwise: its number may name another file in this process by now.
            inherited = self._fd if self._pid != os.getpid() else None
            self._fd, self._pid = self._open_indexed(inherited), os.getpid()
        return self._fd

    def _open_indexed(self, inherited: int | None) -> int:
        """A descriptor of the file as indexed, owned by this process.

        Raises:
            DataFileChangedError: Neither the inherited descriptor, nor the path, nor the holder's descriptor is the
                file as indexed; the message describes the file at the path.
            OSError: The path cannot be opened and no holder's descriptor is the file as indexed.
        """
        if inherited is not None and self._is_indexed(inherited):  # fork: the parent's open file, as indexed
            return inherited
        try:
            fd = os.open(self.path, _READ_FLAGS)
        except OSError:  # removed or moved away since: its holder may still have it
            held = self._open_held()
            if held is None:
                raise
            return held
        if self.indexed is None or self._is_indexed(fd):
            return fd
        held = self._open_held()
        try:
            if held is None:
                raise self._changed_error(os.fstat(fd))
        finally:
            os.close(fd)
        return held

    def _open_held(self) -> int | None:
        """The indexed file opened through the descriptor of the process that held it when this index was pickled,
        or None (no holder, it has exited or closed it, or no ``/proc``).

        Linux lets a process open another's descriptor, of the same user, through ``/proc/<pid>/fd/<fd>``; that
        reaches the inode the indexing process still reads after the path was given to another file.
        """
        if self._holder is None or self.indexed is None:
            return None
        try:
            held = os.open("/proc/{}/fd/{}".format(*self._holder), _READ_FLAGS)
        except OSError:
            return None
        if self._is_indexed(held):
            return held
        os.close(held)  # the holder's number names another file by now
        return None

    def _is_indexed(self, fd: int) -> bool:
        """Whether ``fd`` is open on the file as indexed (False for a closed descriptor)."""
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return self.indexed is not None and (st.st_size, st.st_mtime_ns, st.st_ino) == self.indexed[:3]

    def _check_unchanged(self, fd: int) -> None:
        """Raise :class:`DataFileChangedError` if the open file ``fd`` is not the file as indexed."""
        if self.indexed is None:
            return
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self.indexed[:3]:
            raise self._changed_error(st)

    def _changed_error(self, st: os.stat_result) -> DataFileChangedError:
        """What to say of the file ``st`` describes, which is not the file as indexed.

        A data file edited during a run made every later sample read at the old offsets fail as "not valid JSON",
        which named the wrong cause. The message names no command: training, ``palo-data`` and others read files
        through this index.
        """
        size, _, inode, indexed_at = self.indexed
        how = "replaced by another file written" if st.st_ino != inode else "modified"
        return DataFileChangedError(
            f"{self.path}: the data file changed since it was indexed at {_clock(indexed_at)} ({how} at "
            f"{_clock(st.st_mtime_ns / 1e9)}: {st.st_size} bytes, {size} then); the command reading it needs it "
            "unchanged until it ends: do not edit it while one runs")

    # -------------------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        # Where an unpickling process can still find the indexed file once the path names another one: this
        # process's descriptor if it has one, else the holder this index was unpickled with.
        holder = (os.getpid(), self._fd) if self._fd is not None and self._pid == os.getpid() else self._holder
        return {"path": self.path, "offsets": self.offsets, "lengths": self.lengths, "from_cache": self.from_cache,
                "indexed": self.indexed, "holder": holder}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._holder = state.get("holder")  # pickled before it existed
        self._fd, self._pid = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


# ------------------------------------------------------------------------------------------------------- caching
def cache_paths(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                suffix: str = _CACHE_SUFFIX) -> list[str]:
    """Where a cache of ``path`` (its index by default) goes, in order of preference: next to the file, then a user
    cache dir (a read-only data folder).

    The user-cache name includes a hash of the absolute path, so equal file names in different folders do not
    collide.
    """
    path = os.path.abspath(os.fspath(path))
    if cache_dir is None:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(root, "palo", "json_index")
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = f"{digest}-{os.path.basename(path)}{suffix}"
    return [path + suffix, os.path.join(os.fspath(cache_dir), name)]


_SAMPLED_BLOCK = 1 << 16  # bytes read per sampled place of a file for its fingerprint
_SAMPLED_PLACES = 32


def content_fingerprint(path: str, st: os.stat_result, fd: int | None = None) -> int:
    """A 63-bit fingerprint of a file's size, modification time and sampled content: its start, its end and
    :data:`_SAMPLED_PLACES` evenly spaced blocks (about 2 MB read, whatever the file's size).

    Size and time alone are the same for a file replaced by one of equal size with its time kept (``cp -p``,
    ``rsync -t``: a reshuffled copy of a training set), whose cached offsets would then be wrong.

    Args:
        path: The file (opened unless ``fd`` is given).
        st: Its ``os.stat``.
        fd: A descriptor of the file ``st`` describes, read (positionally) instead of opening ``path``, which may
            name another file by now.
    """
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") if fd is None else contextlib.nullcontext() as f:
        reader = _Reader(f if f is not None else fd)
        places = {0, max(0, st.st_size - _SAMPLED_BLOCK)}
        places.update(st.st_size * k // _SAMPLED_PLACES for k in range(1, _SAMPLED_PLACES))
        for place in sorted(places):
            digest.update(reader.read(_SAMPLED_BLOCK, place))
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def _cache_key(path: str, st: os.stat_result, fd: int | None = None) -> list[int]:
    return [CACHE_VERSION, st.st_size, st.st_mtime_ns, content_fingerprint(path, st, fd)]


def _load_cache(path: str, cache_file: str, key: list[int], st: os.stat_result,
                fd: int | None = None) -> JsonArrayIndex | None:
    """The cached index if ``cache_file`` exists and was written for ``key`` (:func:`_cache_key` of ``st``, the file
    as it is now), else None. The index takes over ``fd`` (the file ``st`` describes) only when it is returned."""
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            if data["meta"].tolist() != key:
                return None
            offsets, lengths = data["offsets"], data["lengths"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        # Missing, unreadable or truncated caches are rebuilt rather than trusted.
        return None
    if offsets.shape != lengths.shape or offsets.dtype != np.int64 or lengths.dtype != np.int64:
        return None
    return JsonArrayIndex(path, offsets, lengths, from_cache=True, stat=st, fd=fd)


@contextlib.contextmanager
def cache_writer(candidates: list[str]) -> Iterator[Any]:
    """A binary file that becomes the first of ``candidates`` (:func:`cache_paths`) whose folder can be written: a
    hidden temp file beside it, then ``os.replace``, so a crashed or concurrent writer never leaves a half cache.
    Where none can be written (or the disk fills), a sink that keeps nothing: a cache is never worth a failed run.
    No temp file stays behind."""
    for cache in candidates:
        folder = os.path.dirname(os.path.abspath(cache))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = mkstemp_shared(folder, prefix="." + os.path.basename(cache) + ".", suffix=".tmp")
        except OSError:  # a read-only folder or file system: the next place
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, cache)
        except OSError:  # a full disk: no cache this time
            pass
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with open(os.devnull, "wb") as sink:
        yield sink


# ---------------------------------------------------------------------------------------------------- the scan
def scan_json_array(
    path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None, fd: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scan a file holding one JSON array once and return its elements' byte offsets and lengths.

    The scan has two stages. The first (:func:`_extract_chunk`) reads a chunk and finds its escapes, quotes and
    brackets; it needs nothing from other chunks, so threads run it on several chunks at once (numpy releases the
    GIL). The second (:class:`_Scanner`) consumes chunks in order and applies what does depend on the earlier bytes:
    whether the chunk starts inside a string, and the bracket depth.

    Args:
        path: The file.
        chunk_size: Bytes per read.
        workers: Threads for the first stage; default ``min(8, cpu count)``. 1 runs everything in this thread.
        fd: An open descriptor of the file, read (positionally) instead of opening ``path``, which then only names it
            in messages; it stays open.

    Returns:
        ``(offsets, lengths)``, both ``int64 [N]``, in file order.

    Raises:
        ValueError: The structure is malformed; the message names the byte offset.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    path = os.fspath(path)
    if workers is None:
        # The ordered second stage is ~10% of the work, so gains flatten out after a handful of threads.
        workers = min(8, os.cpu_count() or 1)
    with open(path, "rb", buffering=0) if fd is None else contextlib.nullcontext() as f:
        reader = _Reader(f if f is not None else fd)
        size = os.fstat(reader.fd).st_size
        bases = range(0, size, chunk_size)
        scratch = threading.local()
        scanner = _Scanner(path, reader)

        def extract(base: int) -> _Chunk:
            if getattr(scratch, "size", 0) < chunk_size:
                scratch.mask, scratch.mask2 = np.empty(chunk_size, dtype=bool), np.empty(chunk_size, dtype=bool)
                scratch.folded, scratch.size = np.empty(chunk_size, dtype=np.uint8), chunk_size
            return _extract_chunk(reader, base, min(chunk_size, size - base), scratch)

        if workers <= 1 or len(bases) <= 1:
            for base in bases:
                scanner.consume(extract(base))
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="json-index") as pool:
                # A bounded window of chunks in flight keeps memory at a few chunks whatever the file size.
                pending: deque[Future] = deque()
                todo = iter(bases)
                for base in itertools.islice(todo, 2 * workers):
                    pending.append(pool.submit(extract, base))
                try:
                    while pending:
                        chunk = pending.popleft().result()
                        for base in itertools.islice(todo, 1):
                            pending.append(pool.submit(extract, base))
                        scanner.consume(chunk)
                finally:
                    for future in pending:
                        future.cancel()
        return scanner.finish(size)


class _Reader:
    """Positional reads of one open file (a binary file object or a descriptor), safe from several threads (no shared
    file position)."""

    def __init__(self, f):
        self.fd = f if isinstance(f, int) else f.fileno()
        self.lock = threading.Lock()

    def read(self, size: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self.fd, size, offset)
        with self.lock:  # pragma: no cover - Windows has no pread
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.read(self.fd, size)


@dataclass
class _Brackets:
    """Brackets of a chunk that are outside strings under one assumption about the chunk's starting string state."""

    pos: np.ndarray  # int64, chunk-relative
    byte: np.ndarray  # uint8: one of [ ] { }
    opener: np.ndarray  # uint8: 1 for [ {, 0 for ] }
    depth: np.ndarray  # int64: depth after the bracket, relative to the depth at the chunk start
    min_depth: int  # depth.min(), to test cheaply whether the outer array closes in this chunk


@dataclass
class _Chunk:
    """What the first stage found in one chunk."""

    base: int
    raw: bytes
    n_quotes: int  # real (unescaped) quotes
    run_starts: np.ndarray  # where each run of backslashes starts
    run_quotes_before: np.ndarray  # real quotes before each run start
    brackets: tuple[_Brackets, _Brackets]  # [s]: the brackets outside strings if the chunk starts with parity s


def _extract_chunk(reader: _Reader, base: int, size: int, scratch) -> _Chunk:
    """First stage: escapes, quotes and brackets of the chunk ``[base, base + size)``, independent of other chunks."""
    raw = reader.read(size, base)
    if len(raw) != size:
        raise OSError(f"short read at byte {base}: the file shrank while it was being indexed")
    c = np.frombuffer(raw, dtype=np.uint8)
    n = c.shape[0]
    # Scratch buffers are reused: a fresh 16 MB temporary costs more (page faults) than the comparison itself.
    mask, mask2, folded = scratch.mask[:n], scratch.mask2[:n], scratch.folded[:n]

    # 1. Escapes. A quote is escaped when an odd run of backslashes precedes it. Runs are found from the (few)
    # backslash positions. A run that began before the chunk is measured by looking back, which keeps chunks
    # independent of each other.
    escaped_in = _backslashes_before(reader, base) % 2 == 1
    backslashes = np.equal(c, _BACKSLASH, out=mask).nonzero()[0]
    escaped_pos = np.empty(0, dtype=np.int64)
    run_starts = np.empty(0, dtype=np.int64)
    if backslashes.size:
        breaks = np.flatnonzero(np.diff(backslashes) != 1)
        run_starts = np.concatenate((backslashes[:1], backslashes[breaks + 1]))
        run_ends = np.concatenate((backslashes[breaks], backslashes[-1:]))
        run_lengths = run_ends - run_starts + 1
        if escaped_in and run_starts[0] == 0:
            run_lengths[0] -= 1  # the first backslash is the character escaped by the run before the chunk
        escaped_pos = run_ends[(run_lengths & 1).astype(bool)] + 1
        escaped_pos = escaped_pos[escaped_pos < n]
    if escaped_in and not (backslashes.size and backslashes[0] == 0):
        escaped_pos = np.concatenate(([0], escaped_pos))

    # 2. Real quotes. Their running parity (plus the state at the chunk start) says what is inside a string.
    quotes = np.equal(c, _QUOTE, out=mask).nonzero()[0]
    if escaped_pos.size:
        # Look up the few escaped positions among the many quotes, not the other way round.
        escaped_quotes = escaped_pos[c[escaped_pos] == _QUOTE]
        if escaped_quotes.size:
            quotes = np.delete(quotes, np.searchsorted(quotes, escaped_quotes))
    run_quotes_before = np.searchsorted(quotes, run_starts)

    # 3. Brackets. '[' 0x5B, '{' 0x7B, ']' 0x5D, '}' 0x7D: OR-ing in 0x20 folds each pair into one value, so two
    # comparisons find all four. Those after an even number of quotes are outside strings if the chunk starts
    # outside one, the others if it starts inside one; both sets are prepared here.
    np.bitwise_or(c, 0x20, out=folded)
    np.equal(folded, 0x7B, out=mask)
    np.equal(folded, 0x7D, out=mask2)
    brackets = np.logical_or(mask, mask2, out=mask).nonzero()[0]
    odd = (np.searchsorted(quotes, brackets) & 1).astype(bool)
    groups = []
    for pos in (brackets[~odd], brackets[odd]):
        byte = c[pos]
        opener = (byte >> 1) & 1  # '[' and '{' have bit 1 set, ']' and '}' do not
        depth = np.cumsum(2 * opener.astype(np.int64) - 1)
        groups.append(_Brackets(pos, byte, opener, depth, int(depth.min()) if depth.size else 0))
    return _Chunk(base, raw, int(quotes.size), run_starts, run_quotes_before, (groups[0], groups[1]))


def _backslashes_before(reader: _Reader, base: int) -> int:
    """Length of the run of backslashes that ends just before ``base``."""
    count, end, step = 0, base, 64
    while end > 0:
        start = max(0, end - step)
        block = reader.read(end - start, start)
        tail = len(block) - len(block.rstrip(b"\\"))
        count += tail
        if tail < len(block):
            break
        end, step = start, step * 4
    return count


class _Scanner:
    """Second stage: consumes the chunks in order, carrying the state that crosses chunk boundaries."""

    def __init__(self, path: str, reader: _Reader):
        self.path = path
        self.reader = reader
        self.started = False  # the outer '[' has been seen
        self.closed = False  # the outer ']' has been seen
        self.in_string = 0  # 1 if the chunk boundary lies inside a string
        self.depth = 0  # bracket depth at the chunk boundary (1 = between elements)
        self.last: tuple[int, int, int] | None = None  # last depth-1 event: (absolute position, kind, byte)
        self.offsets: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.slow_elements: list[tuple[int, int]] = []  # (offset, length) of non-container elements

    def _error(self, message: str, offset: int) -> ValueError:
        return ValueError(f"{self.path}: malformed JSON array at byte {offset}: {message}")

    def consume(self, chunk: _Chunk) -> None:
        """Apply one chunk (chunks must come in file order)."""
        base, raw = chunk.base, chunk.raw
        if self.closed:
            self._check_trailing(raw, 0, base)
            return
        if not self.started:
            skip = len(raw) - len(raw.lstrip(_WS))
            if skip == len(raw):
                return  # leading whitespace only so far
            if raw[skip] != _OPEN_ARRAY:
                found = raw[skip : skip + 1]
                # A UTF-8 byte order mark, which json.load refuses too (a chunk may hold only its first byte).
                if base + skip == 0 and found == b"\xef" and self.reader.read(3, 0) == b"\xef\xbb\xbf":
                    raise self._error("the file starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without "
                                      "one", 0)
                raise self._error(f"expected '[' (the file must hold one JSON array), found {found!r}", base + skip)
            # Only whitespace precedes the '[', so the chunk holds no quote, backslash or bracket before it.
            self.started = True

        s = self.in_string
        # JSON has no backslash outside strings; one there would also make the escape parity meaningless.
        outside = ((chunk.run_quotes_before + s) & 1) == 0
        if outside.any():
            raise self._error("backslash outside a string", base + int(chunk.run_starts[np.argmax(outside)]))
        self.in_string = (s + chunk.n_quotes) & 1
        group = chunk.brackets[s]
        if not group.pos.size:
            return
        brackets, byte, opener = group.pos, group.byte, group.opener
        depth_after = self.depth + group.depth

        # The outer array closes where the depth first returns to 0; only whitespace may follow.
        if self.depth + group.min_depth <= 0:
            t = int(np.argmax(depth_after <= 0))
            if byte[t] != _CLOSE_ARRAY:
                raise self._error(f"the array is closed by {chr(byte[t])!r}, expected ']'", base + int(brackets[t]))
            keep = slice(0, t + 1)
            brackets, byte, opener, depth_after = brackets[keep], byte[keep], opener[keep], depth_after[keep]
            self._check_trailing(raw, int(brackets[t]) + 1, base)
            self.closed = True
        self.depth = int(depth_after[-1])

        # Depth-1 events: the outer brackets and each element's own brackets. An opener is one when it brings the
        # depth to <= 2, a closer when it brings it to <= 1.
        level1 = np.flatnonzero(depth_after - opener <= 1)
        pos, byte, op, d = brackets[level1], byte[level1], opener[level1], depth_after[level1]
        # OPEN (opener, depth 1) 0, START (opener, 2) 1, END (closer, 1) 2, CLOSE (closer, 0) 3.
        kind = np.where(op == 1, d - 1, 3 - d)
        if self.last is not None:
            last_pos, last_kind, last_byte = self.last
            pos = np.concatenate(([last_pos - base], pos))
            kind = np.concatenate(([last_kind], kind))
            byte = np.concatenate(([last_byte], byte))
        if pos.size:
            self.last = (int(pos[-1]) + base, int(kind[-1]), int(byte[-1]))
        if pos.size >= 2:
            self._pairs(np.frombuffer(raw, dtype=np.uint8), base, pos, kind, byte)

    def _pairs(self, c: np.ndarray, base: int, pos: np.ndarray, kind: np.ndarray, byte: np.ndarray) -> None:
        """Turn consecutive depth-1 events into elements (START..END) and gaps between them (OPEN/END..START/CLOSE)."""
        # Depth counting guarantees the order OPEN, (START, END)*, CLOSE, so a START is always followed by its END.
        first = kind[:-1]
        element = np.flatnonzero(first == _START)
        if element.size:
            starts, ends = pos[element], pos[element + 1]
            # '{' ^ '}' and '[' ^ ']' are both 0x06; any other pairing differs.
            bad = np.flatnonzero((byte[element] ^ byte[element + 1]) != 0x06)
            if bad.size:
                k = int(bad[0])
                raise self._error(
                    f"element opened with {chr(byte[element[k]])!r} is closed by {chr(byte[element[k] + 1])!r}",
                    base + int(ends[k]),
                )
            self.offsets.append(starts + base)
            self.lengths.append(ends - starts + 1)

        gap = np.flatnonzero(first != _START)
        if not gap.size:
            return
        a, b = pos[gap] + 1, pos[gap + 1]  # the gap is c[a:b]
        prev_kind, next_kind = kind[gap], kind[gap + 1]
        commas_needed = ((prev_kind == _END) & (next_kind == _START)).astype(np.int64)
        length = b - a
        fast = (a >= 0) & (length <= _FAST_GAP)
        ok = fast & (length == 0) & (commas_needed == 0)  # an empty gap is fine unless a comma was needed
        check = np.flatnonzero(fast & (length > 0))
        if check.size:
            # Gather every byte of the short gaps at once: the gap each byte belongs to and its position.
            lens = length[check]
            gap_id = np.repeat(np.arange(check.size), lens)
            first_byte = np.cumsum(lens) - lens
            g = c[np.repeat(a[check] - first_byte, lens) + np.arange(int(lens.sum()))]
            is_comma = g == _COMMA
            commas = np.bincount(gap_id, weights=is_comma, minlength=check.size)
            others = np.bincount(gap_id, weights=~(_IS_WS[g] | is_comma), minlength=check.size)
            ok[check] = (others == 0) & (commas == commas_needed[check])
        for k in np.flatnonzero(~ok):
            self._slow_gap(c, base, int(a[k]), int(b[k]), int(prev_kind[k]), int(next_kind[k]))

    def _slow_gap(self, c: np.ndarray, base: int, a: int, b: int, prev_kind: int, next_kind: int) -> None:
        """Parse a gap that is not just whitespace and the one comma it needs.

        It holds scalar or string elements, or it is malformed; either way this is rare, so it is plain Python.
        Gaps that began in an earlier chunk are re-read from the file.
        """
        raw = c[a:b].tobytes() if a >= 0 else self.reader.read(b - a, base + a)
        start = base + a
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error("invalid UTF-8", start + e.start) from None
        decoder = json.JSONDecoder()
        i, byte_pos = 0, 0  # a character index into text and the byte offset of text[:i]
        need_value = prev_kind == _OPEN  # after '[' a value may come; after an element, a comma must
        seen_value = False
        last_comma = None

        def advance(j: int) -> None:
            nonlocal i, byte_pos
            byte_pos += len(text[i:j].encode("utf-8"))
            i = j

        while True:
            j = i
            while j < len(text) and text[j] in " \t\n\r":
                j += 1
            advance(j)
            if i == len(text):
                break
            if not need_value:
                if text[i] != ",":
                    raise self._error(f"expected ',' or ']' between elements, found {text[i]!r}", start + byte_pos)
                last_comma = start + byte_pos
                advance(i + 1)
                need_value = True
                continue
            if text[i] == ",":
                raise self._error("empty element (two commas, or a comma right after '[')", start + byte_pos)
            try:
                _, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise self._error(f"invalid element: {e.msg}", start + byte_pos) from None
            offset = start + byte_pos
            advance(end)
            self.slow_elements.append((offset, start + byte_pos - offset))
            need_value, seen_value = False, True

        if next_kind == _START and not need_value:
            raise self._error("expected ',' before the next element", base + b)
        if next_kind == _CLOSE and need_value and (prev_kind != _OPEN or seen_value or last_comma is not None):
            raise self._error("trailing comma before ']'", last_comma if last_comma is not None else base + b)

    def _check_trailing(self, raw: bytes, begin: int, base: int) -> None:
        rest = raw[begin:]
        stripped = rest.lstrip(_WS)
        if stripped:
            offset = base + begin + len(rest) - len(stripped)
            raise self._error(f"data after the closing ']': {stripped[:20]!r}", offset)

    def finish(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Check the end of the file and return ``(offsets, lengths)``."""
        if not self.started:
            raise self._error("no JSON array: the file is empty or whitespace only", size)
        if not self.closed:
            what = "unterminated string" if self.in_string else f"unbalanced brackets: {self.depth} still open"
            raise self._error(f"{what} at end of file", size)
        offsets = np.concatenate(self.offsets) if self.offsets else np.empty(0, dtype=np.int64)
        lengths = np.concatenate(self.lengths) if self.lengths else np.empty(0, dtype=np.int64)
        if self.slow_elements:
            extra = np.array(self.slow_elements, dtype=np.int64).reshape(-1, 2)
            offsets = np.concatenate((offsets, extra[:, 0]))
            lengths = np.concatenate((lengths, extra[:, 1]))
            order = np.argsort(offsets, kind="stable")
            offsets, lengths = offsets[order], lengths[order]
        return offsets.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)
