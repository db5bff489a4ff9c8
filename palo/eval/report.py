"""One results table across languages (``python -m palo.eval.report``): markdown, CSV, JSON and a bar chart.

Rows are the languages that have a reviews file, in the PALO paper's order, then the averages the paper reports:
high-resource (English, Chinese, French, Spanish, Russian, Japanese), low-resource (Arabic, Hindi, Bengali,
Urdu) and all languages. Columns are the relative scores of the ``conv``, ``detail`` and ``complex`` questions and
``all``, plus the number of failed judgments, which are never part of a score. An average is the plain mean of
the per-language scores present in its group; the JSON lists which languages went into it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any

from palo.data.languages import HIGH_RESOURCE, LANGUAGES, LOW_RESOURCE
from palo.eval.bench import canonical_language, display_name, paper_order
from palo.eval.summarize_gpt_review import CATEGORIES, CategoryScore, summarize_file
from palo.jsonl import JsonlError, atomic_write

COLUMNS = CATEGORIES + ("all",)
AVERAGES = (
    ("High-resource avg", HIGH_RESOURCE),
    ("Low-resource avg", LOW_RESOURCE),
    ("Overall avg", LANGUAGES),
)


def reviews_path(reviews_dir: str, name: str, language: str) -> str:
    """``<dir>/<NAME>_<Language>.jsonl``, the original script's naming."""
    return os.path.join(reviews_dir, f"{name}_{display_name(language)}.jsonl")


def language_row(scores: dict[str, CategoryScore]) -> dict[str, Any]:
    """Relative score per column, plus judged/failed counts (per column and in total)."""
    row: dict[str, Any] = {}
    for column in COLUMNS:
        key = "all" if column == "all" else f"llava_bench_{column}"
        score = scores.get(key)
        row[column] = score.relative if score else None
        row[f"{column}_failed"] = score.failed if score else 0
        row[f"{column}_judged"] = score.judged if score else 0
    all_score = scores.get("all")
    row["reference"] = all_score.reference if all_score else None
    row["model"] = all_score.model if all_score else None
    row["failed"] = row["all_failed"]
    row["judged"] = row["all_judged"]
    row["replaced"] = all_score.replaced if all_score else 0  # earlier reviews of a question reviewed again
    return row


def average_row(rows: dict[str, dict[str, Any]], group: tuple[str, ...]) -> dict[str, Any] | None:
    """Mean of the group's per-language scores (each column over the languages that have it); None if none."""
    present = [lang for lang in group if lang in rows]
    if not present:
        return None
    out: dict[str, Any] = {"languages": present}
    for column in COLUMNS:
        values = [rows[lang][column] for lang in present if rows[lang][column] is not None]
        out[column] = round(sum(values) / len(values), 1) if values else None
        out[f"{column}_languages"] = len(values)
    out["failed"] = sum(rows[lang]["failed"] for lang in present)
    out["judged"] = sum(rows[lang]["judged"] for lang in present)
    return out


def build_table(reviews_dir: str, name: str, languages: list[str] | None = None,
                skip: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Scores of every language with a reviews file, and the group averages.

    Args:
        reviews_dir: Folder of ``<name>_<Language>.jsonl`` reviews.
        name: The run's name.
        languages: Languages to report (default: all 10), in any case; rows follow the paper's order.
        skip: Languages listed as not evaluated whatever their reviews file holds (a run that failed for them left
            the reviews of earlier answers there).

    Returns:
        ``{"name", "languages": {lang: row}, "averages": {label: row}, "missing": [lang, ...]}``.

    Raises:
        JsonlError: If a file named as a reviews file holds no reviews (an answers file of the same name).
    """
    rows: dict[str, dict[str, Any]] = {}
    missing = []
    skip = {canonical_language(language) for language in skip}  # `--skip English` was ignored, English averaged in
    for language in paper_order(languages or list(LANGUAGES)):
        path = reviews_path(reviews_dir, name, language)
        if language in skip or not os.path.isfile(path):
            missing.append(language)
            continue
        rows[language] = language_row(summarize_file(path))
    averages = {}
    for label, group in AVERAGES:
        row = average_row(rows, group)
        if row is not None:
            averages[label] = row
    return {"name": name, "languages": rows, "averages": averages, "missing": missing}


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _table_rows(table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [(display_name(lang), row) for lang, row in table["languages"].items()]
    return rows + list(table["averages"].items())


def to_markdown(
    table: dict[str, Any],
    columns: tuple[str, ...] = COLUMNS,
    caption: str = "Relative score (model / reference x 100) of {name}; failed judgments are excluded and counted.",
) -> str:
    """The per-language table in markdown (rows: languages then averages; columns: ``columns`` and failed).

    Also used by ``palo quickstart`` with its own columns and caption, so both report in one layout.
    """
    lines = [
        caption.format(name=table["name"]),
        "",
        "| language | " + " | ".join(columns) + " | failed |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for label, row in _table_rows(table):
        lines.append(f"| {label} | " + " | ".join(_cell(row[c]) for c in columns) + f" | {row['failed']} |")
    if table["missing"]:
        lines += ["", "Not evaluated: " + ", ".join(display_name(m) for m in table["missing"])]
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["language", *COLUMNS, "failed", "judged"])
    for label, row in _table_rows(table):
        writer.writerow([label, *("" if row[c] is None else f"{row[c]:.1f}" for c in COLUMNS), row["failed"],
                         row["judged"]])
    return buffer.getvalue()


def plot(
    table: dict[str, Any],
    path: str,
    columns: tuple[str, ...] = COLUMNS,
    ylabel: str = "relative score (%)",
    title: str = "Multilingual LLaVA-Bench (In-the-Wild): {name}",
    target: float | None = None,
) -> None:
    """A grouped bar chart: one group per language / average, one bar per column (optionally a target line)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on eval machines
    import matplotlib.pyplot as plt

    rows = _table_rows(table)
    labels = [label.replace(" avg", "\navg") for label, _ in rows]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    for i, column in enumerate(columns):
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [row[column] or 0.0 for _, row in rows], width, label=column)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    if target is not None:
        ax.set_ylim(0, 105)
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title.format(name=table["name"]))
    ax.legend(ncol=len(columns), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, [buffer.getvalue()])


def write_report(table: dict[str, Any], prefix: str) -> dict[str, str]:
    """Write ``<prefix>.md``, ``.csv``, ``.json`` and ``.png``; return the paths by extension."""
    paths = {ext: f"{prefix}.{ext}" for ext in ("md", "csv", "json", "png")}
    # Each file whole or not at all (a rerun after a crash finds no half table).
    atomic_write(paths["md"], [to_markdown(table)])
    atomic_write(paths["csv"], [to_csv(table)])
    atomic_write(paths["json"], [json.dumps(table, indent=2, ensure_ascii=False)])
    plot(table, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews-dir", required=True, help="folder with <NAME>_<Language>.jsonl reviews")
    parser.add_argument("--name", required=True, help="the output name given to eval_all_languages.sh")
    parser.add_argument("--languages", nargs="*", default=None, help="default: all 10 PALO languages")
    parser.add_argument("--out", default=None, help="output prefix (default: <reviews-dir>/../<NAME>_summary)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="languages to list as not evaluated whatever their reviews file holds")
    args = parser.parse_args(argv)
    if args.out is not None and not os.path.basename(args.out):  # 'dir/' wrote the hidden files dir/.md, dir/.csv ...
        parser.error(f"--out {args.out!r} must be a path prefix such as reports/run1 (it names run1.md, .csv, .json "
                     "and .png)")
    try:
        table = build_table(args.reviews_dir, args.name, args.languages, skip=args.skip)
    except JsonlError as exc:  # --reviews-dir naming the answers folder: its files have the same names
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # A run whose every language failed (--skip) still writes its table, each language "not evaluated": said to have
    # no reviews, when they lay there (an earlier run's), the user was sent looking for a missing file.
    if not table["languages"] and not args.skip:
        print(f"error: no reviews named {args.name}_<Language>.jsonl in {args.reviews_dir}", file=sys.stderr)
        return 2
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(args.reviews_dir)), f"{args.name}_summary")
    try:
        paths = write_report(table, prefix)
    except OSError as exc:
        print(f"error: cannot write the report {prefix}.*: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    print("written: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
