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

from palo.data.languages import LANGUAGES
from palo.eval import report
from palo.eval.bench import display_name, language_files
from palo.eval.jsonl import iter_jsonl
from palo.eval.report import AVERAGES
from palo.quickstart.shapes_task import KINDS

COLUMNS = KINDS + ("all",)


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed: ``" Red. "`` -> ``"red"``."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def is_correct(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def _by_id(path: str) -> dict[str, dict]:
    return ({str(r.data["question_id"]): r.data for r in iter_jsonl(path, required=("question_id",))}
            if os.path.isfile(path) else {})


def score_language(bench: str, language: str, answers_file: str) -> dict[str, Any]:
    """Accuracy per question kind for one language.

    Returns:
        ``{kind: percent or None, f"{kind}_n": questions, "failed": unanswered, "mistakes": [...]}`` for each column.
    """
    files = language_files(bench, language)
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


CAPTION = "Exact-match accuracy (%) of {name} on held-out images; unanswered questions are counted as failed."


def to_markdown(table: dict[str, Any]) -> str:
    """The table in :mod:`palo.eval.report`'s markdown layout, with this task's columns."""
    return report.to_markdown(table, COLUMNS, CAPTION)


def plot(table: dict[str, Any], path: str) -> None:
    """Per-language bars of each question kind, with the 90 % target line."""
    report.plot(table, path, COLUMNS, ylabel="exact-match accuracy (%)",
                title="Quickstart shapes task, held-out images: {name}", target=90)


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
