"""The run: every (language, sample) not yet in the resume log, translated by a pool of worker threads."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from palo.data.translate.files import Progress, load_progress, output_paths, write_outputs
from palo.data.translate.samples import source_hash, translate_sample
from palo.data.translate.translator import RequestFailed, Translator, settings_error
from palo.jsonl import JsonlAppender, nearly_full


class StorageError(Exception):
    """A progress log or the translation cache could not be written (a full disk, a quota): the run stopped taking
    work, since every sample after would fail alike. What the logs and the cache hold is kept; a rerun resumes."""


def storage_problem(what: str, path: str, exc: BaseException) -> str:
    """``cannot write <what> <path>: <cause>``, the cause said plainly when the disk is full: SQLite reports a full
    disk as a bare "disk I/O error".

    Args:
        what: What the file is (``the translation cache``).
        path: The file.
        exc: The OSError or sqlite3 error the write raised.
    """
    cause = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    free = nearly_full(path)
    if free is not None and "space" not in cause and "full" not in cause:
        cause += f" (the disk holding it is full: {free // 1024} KiB free)"
    return f"cannot write {what} {path}: {cause}"


def run(samples: Sequence[dict[str, Any]], languages: list[str], translator: Translator, output_dir: str,
        parallel: int = 8, progress_bar: bool = True) -> dict[str, Any]:
    """Translate ``samples`` into each language, resuming from what ``output_dir`` already holds.

    A sample already in the resume log is skipped, unless it is corrupt and ``translator.retry_rejected`` is set;
    then the turns its last record lists as rejected are translated again and its other turns kept.

    Args:
        samples: The LLaVA-Instruct samples: a list, or a :class:`~palo.data.sample_file.SampleFile` that reads
            each one when it is translated.
        languages: Target languages (resolved names).
        translator: The shared translator.
        output_dir: Where the per-language files go.
        parallel: Worker threads, i.e. requests in flight at most.
        progress_bar: Show a tqdm bar (ETA and tokens).

    Returns:
        A report: per language the sample, corrupt and unfinished counts, plus the translator's request counters,
        and ``stopped``: why the run stopped taking work early (a wrong key, model or URL: :func:`settings_error`),
        or None.

    Raises:
        StorageError: When a progress log or the translation cache could not be written (a full disk): the run
            stopped taking work, the samples finished before are kept in the logs.
    """
    from tqdm import tqdm

    os.makedirs(output_dir, exist_ok=True)
    paths = {language: output_paths(output_dir, language) for language in languages}
    # The input's own corrupt flags too (in the same pass over the input): translate keeps them (with_translation),
    # so the report counts them, and the log records them for apply-review, which must not clear such a sample.
    hashes: list[str] = []
    flagged: set[int] = set()
    for i, sample in enumerate(samples):
        hashes.append(source_hash(sample))
        if sample.get("corrupt"):
            flagged.add(i)
    # The logs first: each is locked (one run per output folder), so what they hold is read only once it is ours.
    logs: dict[str, JsonlAppender] = {}
    # Only where each finished record is in its log: the records themselves would not fit in memory at 150K x 9.
    progress: dict[str, Progress] = {}
    todo: list[tuple[str, int]] = []
    try:
        for language in languages:
            logs[language] = JsonlAppender(paths[language]["progress"])
        for language in languages:
            done = progress[language] = load_progress(paths[language]["progress"], hashes)
            # --retry_rejected asks again for the samples recorded corrupt too; the new record replaces the old.
            todo += [(language, i) for i in range(len(samples))
                     if i not in done.offsets or (translator.retry_rejected and i in done.corrupt)]
    except BaseException:
        for log in logs.values():
            log.close()
        raise
    failures: dict[str, list[dict[str, Any]]] = {language: [] for language in languages}
    lock = threading.Lock()
    corrupt = [0]  # corrupt samples finished in this run, for the bar
    work = iter(todo)
    bar = tqdm(total=len(todo), desc="translating", unit="sample", disable=not progress_bar, dynamic_ncols=True)

    # Set by an unexpected error or a settings error (HTTP 401/403/404): every sample would likely hit it, and calls
    # cost money.
    stop = threading.Event()
    stopped: list[str] = []  # the settings error that stopped the run
    unwritten: list[str] = []  # the progress log or cache that could not be written, which stopped the run

    def storage_failed(problem: str) -> None:
        """Stop taking work: a full disk fails every sample after, and each has been paid for. Under the lock."""
        if not unwritten:
            unwritten.append(problem)
        stop.set()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                item = next(work, None)
            if item is None:
                return
            language, i = item
            try:
                # A corrupt sample retried (--retry_rejected): only the turns its record left rejected are asked
                # again, so the turns a reviewer corrected since (apply-review) are kept. Under the lock: workers
                # add to the offsets as they finish.
                with lock:
                    finished = progress[language]
                    previous = finished.record(i) if i in finished.offsets else None
                sample, review = translate_sample(samples[i], language, translator, i, previous)
            except RequestFailed as exc:
                fatal = settings_error(exc)
                with lock:
                    if fatal is not None and not stopped:
                        stopped.append(fatal)
                    failures[language].append({"index": i, "id": samples[i].get("id"), "error": str(exc)})
                    bar.update(1)
                if fatal is not None:  # the sample stays unfinished (not corrupt): a rerun with it fixed resumes
                    stop.set()
                    return
                continue
            except sqlite3.Error as exc:  # the cache could not store a translation: not a defect of this code
                with lock:
                    storage_failed(storage_problem("the translation cache", translator.cache.path or "", exc))
                return
            except Exception as exc:  # a defect, not a failed call: stop taking work, and say what it was
                with lock:
                    if not stop.is_set():
                        traceback.print_exc(file=sys.stderr)
                    stop.set()
                    failures[language].append({"index": i, "id": samples[i].get("id"),
                                               "error": f"unexpected {type(exc).__name__}: {exc} (the run stopped)"})
                return
            record = {"index": i, "hash": hashes[i], "sample": sample, "review": review}
            if i in flagged:  # (only then: a key on each of 1.4M lines would say nothing)
                record["input_corrupt"] = True
            with lock:
                # One unbuffered write per sample: after a kill the log holds whole samples (a torn last line is
                # cut off on resume) and nothing waits in a Python buffer.
                try:
                    offset = logs[language].write(record)
                except OSError as exc:  # in the thread it was an "Exception in thread" and requests were blamed
                    storage_failed(storage_problem("the progress log", paths[language]["progress"], exc))
                    return
                progress[language].add(i, offset, sample["corrupt"])
                bar.update(1)
                corrupt[0] += bool(sample["corrupt"])
                bar.set_postfix(tokens=translator.stats["tokens"], corrupt=corrupt[0], refresh=False)

    try:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, parallel))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        bar.close()
        for f in logs.values():
            f.close()
    if unwritten:  # no output is written either: it would go to the same full disk, and a rerun writes it
        raise StorageError(unwritten[0])
    report: dict[str, Any] = {"languages": {}, "requests": dict(translator.stats),
                              "stopped": stopped[0] if stopped else None}
    for language in languages:
        done = progress[language]
        complete = len(done.offsets) == len(samples)
        if complete:
            write_outputs(paths[language], done, samples, language)
        report["languages"][language] = {
            "samples": len(samples),
            "finished": len(done.offsets),
            # What the output says: a sample the input flagged is written corrupt whatever its record holds (a
            # record an older apply-review cleared, an input flagged since).
            "corrupt": len(done.corrupt | (flagged & done.offsets.keys())),
            "unfinished": len(samples) - len(done.offsets),
            "output": paths[language]["json"] if complete else None,
            "review": paths[language]["review"] if complete else None,
            "errors": failures[language][:5],
        }
    return report
