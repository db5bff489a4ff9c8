"""The offline exact-match judge of the quickstart, and its per-language table and plot.

The synthetic task has one right answer per question, so no LLM judge is needed: an answer is correct when, after
normalisation (Unicode NFKC, case folding, punctuation removed, whitespace collapsed), it equals the reference.
The table has the layout of :mod:`palo.eval.report` (languages in paper order, then the high-resource,
low-resource and overall averages, and a ``failed`` column: questions with no answer) with the columns
``colour``, ``shape``, ``count`` and ``all``, holding accuracy in percent.
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any

from palo.eval.bench import LANGUAGES, display_name, resolve_language
from palo.eval.jsonl import iter_jsonl
from palo.eval.report import AVERAGES
from palo.quickstart.data import KINDS

COLUMNS = KINDS + ("all",)


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed: ``" Red. "`` -> ``"red"``."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def is_correct(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def _by_id(path: str) -> dict[str, dict]:
    return {str(r.data["question_id"]): r.data for r in iter_jsonl(path, required=("question_id",))} if os.path.isfile(path) else {}


def score_language(bench: str, language: str, answers_file: str) -> dict[str, Any]:
    """Accuracy per question kind for one language.

    Returns:
        ``{kind: percent or None, f"{kind}_n": questions, "failed": unanswered, "mistakes": [...]}`` for each column.
    """
    files = resolve_language(bench, language)
    questions = _by_id(files.questions)
    references = _by_id(files.answers)
    answers = _by_id(answers_file)
    right = {c: 0 for c in COLUMNS}
    total = {c: 0 for c in COLUMNS}
    failed = 0
    mistakes = []
    for qid, q in questions.items():
        kind = q["category"]
        if qid not in answers:
            failed += 1
            continue
        ok = is_correct(answers[qid]["text"], references[qid]["text"])
        for column in (kind, "all"):
            total[column] += 1
            right[column] += ok
        if not ok:
            mistakes.append({"question_id": q["question_id"], "image": q.get("image"), "question": q["text"],
                             "answer": answers[qid]["text"], "reference": references[qid]["text"]})
    row: dict[str, Any] = {"failed": failed, "mistakes": mistakes}
    for column in COLUMNS:
        row[column] = round(100.0 * right[column] / total[column], 1) if total[column] else None
        row[f"{column}_n"] = total[column]
    return row


def build_table(bench: str, answers_dir: str, name: str, languages: list[str] | None = None) -> dict[str, Any]:
    """Score every language that has an answers file ``<answers_dir>/<Language>.jsonl``.

    Returns:
        ``{"name", "languages": {lang: row}, "averages": {label: row}, "missing": [...]}`` as in
        :func:`palo.eval.report.build_table`.
    """
    rows, missing = {}, []
    for language in languages or list(LANGUAGES):
        path = answers_path(answers_dir, language)
        if not os.path.isfile(path):
            missing.append(language)
            continue
        rows[language] = score_language(bench, language, path)
    averages = {}
    for label, group in AVERAGES:
        present = [lang for lang in group if lang in rows]
        if not present:
            continue
        row: dict[str, Any] = {"languages": present, "failed": sum(rows[lang]["failed"] for lang in present)}
        for column in COLUMNS:
            values = [rows[lang][column] for lang in present if rows[lang][column] is not None]
            row[column] = round(sum(values) / len(values), 1) if values else None
        averages[label] = row
    return {"name": name, "languages": rows, "averages": averages, "missing": missing}


def answers_path(answers_dir: str, language: str) -> str:
    return os.path.join(answers_dir, f"{display_name(language)}.jsonl")


def _rows(table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(display_name(lang), row) for lang, row in table["languages"].items()] + list(table["averages"].items())


def to_markdown(table: dict[str, Any]) -> str:
    """The table in :mod:`palo.eval.report`'s markdown layout."""
    cell = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [
        f"Exact-match accuracy (%) of {table['name']} on held-out images; unanswered questions are counted as failed.",
        "",
        "| language | " + " | ".join(COLUMNS) + " | failed |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for label, row in _rows(table):
        lines.append(f"| {label} | " + " | ".join(cell(row[c]) for c in COLUMNS) + f" | {row['failed']} |")
    if table["missing"]:
        lines += ["", "Not evaluated: " + ", ".join(display_name(m) for m in table["missing"])]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: str) -> None:
    """A grouped bar chart: one group per language / average, one bar per column."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = _rows(table)
    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    for i, column in enumerate(COLUMNS):
        xs = [j + (i - (len(COLUMNS) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [row[column] or 0.0 for _, row in rows], width, label=column)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label.replace(" avg", "\navg") for label, _ in rows], fontsize=8)
    ax.set_ylim(0, 105)
    ax.axhline(90, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Quickstart shapes task, held-out images: {table['name']}")
    ax.legend(ncol=len(COLUMNS), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(table: dict[str, Any], prefix: str) -> dict[str, str]:
    """Write ``<prefix>.md``, ``.json`` (with every mistake) and ``.png``; return the paths by extension."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = {ext: f"{prefix}.{ext}" for ext in ("md", "json", "png")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(to_markdown(table))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2, ensure_ascii=False)
    plot(table, paths["png"])
    return paths
