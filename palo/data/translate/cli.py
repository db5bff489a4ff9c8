"""The ``palo-data translate`` flags and entry point (wired into ``palo-data`` by :mod:`palo.data.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys

from palo.data.cli import count_at_least, positive_seconds
from palo.data.sample_file import SampleFile
from palo.data.translate.cache import TranslationCache
from palo.data.translate.prompts import parse_target_language
from palo.data.translate.runner import StorageError, run, storage_problem
from palo.data.translate.samples import malformed_samples
from palo.data.translate.translator import Translator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``palo-data translate`` flags (dash and underscore spellings both work)."""
    parser.add_argument("--data_path", "--data-path", "--input", dest="data_path", required=True,
                        help="LLaVA-Instruct-format JSON array")
    parser.add_argument("--languages", "--language", dest="languages", required=True,
                        help="comma-separated ISO codes or names of the 9 target languages, e.g. ar,zh,fr")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True)
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    parser.add_argument("--base_url", "--base-url", dest="base_url", default=None,
                        help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else api.openai.com)")
    parser.add_argument("--api_key", "--api-key", dest="api_key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--parallel", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--cache", default=None,
                        help="SQLite translation cache (default: <output_dir>/translation_cache.sqlite)")
    parser.add_argument("--max_retries", "--max-retries", dest="max_retries", type=int, default=6)
    parser.add_argument("--backoff", type=float, default=1.0, help="base retry delay in seconds (doubles)")
    parser.add_argument("--max_backoff", "--max-backoff", dest="max_backoff", type=float, default=60.0)
    parser.add_argument("--timeout", type=positive_seconds, default=120.0, help="seconds per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_tokens", "--max-tokens", dest="max_tokens", type=int, default=None)
    parser.add_argument("--retry_rejected", "--retry-rejected", dest="retry_rejected", action="store_true",
                        help="ask again for rejected translations: cached ones, and corrupt samples in --output_dir")
    # At least 1: a run over no samples is "complete", and would replace a finished <language>.json (and its review
    # file) with empty ones.
    parser.add_argument("--limit", type=count_at_least(1), default=None, help="translate only the first N samples")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main_translate(args: argparse.Namespace) -> int:
    """Entry point of ``palo-data translate``; exits 1 when samples are left unfinished (rerun to resume)."""
    try:
        languages = list(dict.fromkeys(parse_target_language(x) for x in args.languages.split(",") if x.strip()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not languages:
        print("error: --languages is empty", file=sys.stderr)
        return 2
    # Read one sample at a time (its ValueError is palo-data's error line): a run holds positions, not samples.
    samples = SampleFile(args.data_path, "--data_path", limit=args.limit)
    bad = malformed_samples(samples)
    if bad:  # before any request is paid for
        index, problem = bad[0]
        print(f"error: --data_path {args.data_path}: sample {index} (id {samples[index].get('id')!r}): {problem} "
              f"({len(bad)} malformed sample(s))", file=sys.stderr)
        return 2
    cache_path = args.cache or os.path.join(args.output_dir, "translation_cache.sqlite")
    try:
        try:
            cache = TranslationCache(cache_path)
        except sqlite3.Error as exc:  # a full disk (SQLite says "disk I/O error"), a file that is not a database
            print(f"error: {storage_problem('the translation cache', cache_path, exc)}", file=sys.stderr)
            return 2
        translator = Translator(
            args.model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            base_url=args.base_url or os.environ.get("OPENAI_BASE_URL"), cache=cache, max_retries=args.max_retries,
            backoff=args.backoff, max_backoff=args.max_backoff, timeout=args.timeout, temperature=args.temperature,
            max_tokens=args.max_tokens, retry_rejected=args.retry_rejected,
        )
        try:
            report = run(samples, languages, translator, args.output_dir, args.parallel, progress_bar=not args.quiet)
        finally:
            cache.close()
    except StorageError as exc:  # mid-run: what finished is in the progress logs and the cache
        print(f"error: {exc}; the run stopped, the samples finished are kept: rerun the same command with room to "
              "resume", file=sys.stderr)
        return 1
    except OSError as exc:  # an output folder that cannot be made or written (a file of that name, read-only)
        at = f" ({exc.filename})" if exc.filename and exc.filename != args.output_dir else ""
        print(f"error: cannot write --output_dir {args.output_dir}{at}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, ensure_ascii=False, indent=2))
    unfinished = sum(r["unfinished"] for r in report["languages"].values())
    if report.get("stopped"):  # a wrong key, model or URL: every request would fail alike
        print(f"error: {report['stopped']}", file=sys.stderr)
        print(f"the run stopped at the first such error; {unfinished} sample(s) unfinished (none marked corrupt): fix "
              "the setting and rerun the same command to resume", file=sys.stderr)
        return 1
    if unfinished:
        defect = any(e["error"].startswith("unexpected ") for r in report["languages"].values() for e in r["errors"])
        why = "the run stopped on an unexpected error (above)" if defect else "requests kept failing"
        print(f"{unfinished} sample(s) unfinished because {why}; rerun the same command to resume", file=sys.stderr)
        return 1
    return 0
