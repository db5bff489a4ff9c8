"""The multilingual LLaVA-Bench (In-the-Wild) on disk: languages and the two folder layouts.

Two layouts exist for the same data (see docs/formats.md §5.2):

* the README / Hugging Face layout: ``<root>/<language>/{question.jsonl, answers.jsonl, context.jsonl}``;
* the original eval script's layout: ``<root>/<language>/corrected/{...}`` (human-corrected translations) and the
  original LLaVA-Bench names ``english/questions.jsonl`` and ``english/answers_gpt4.jsonl``.

:func:`language_files` accepts both, file by file, preferring ``corrected/`` when it holds the file. Images are
always ``<root>/images`` (docs/compat.md#evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from palo.data.languages import LANGUAGES

QUESTION_NAMES = ("question.jsonl", "questions.jsonl")
ANSWER_NAMES = ("answers.jsonl", "answers_gpt4.jsonl")
CONTEXT_NAMES = ("context.jsonl",)


class BenchLayoutError(FileNotFoundError):
    """A language folder lacks one of the three files in both layouts."""


@dataclass(frozen=True)
class LanguageFiles:
    """The three files of one language, plus the shared image folder."""

    language: str
    questions: str
    answers: str
    context: str
    images: str


def display_name(language: str) -> str:
    """``english`` -> ``English``: the suffix of the original output files (``<NAME>_English.jsonl``)."""
    return language[:1].upper() + language[1:]


def canonical_language(language: str) -> str:
    """A PALO language in the lower case of its bench folder whatever the case given (``English``, as the output
    files are named); any other name as given (a bench may hold other languages)."""
    return language.lower() if language.lower() in LANGUAGES else language


def paper_order(languages: list[str]) -> list[str]:
    """``languages`` (:func:`canonical_language`, once each): PALO's in the paper's order, then the others as given."""
    unique = list(dict.fromkeys(canonical_language(language) for language in languages))
    return sorted(unique, key=lambda lang: LANGUAGES.index(lang) if lang in LANGUAGES else len(LANGUAGES))


def _find(folders: list[str], names: tuple[str, ...]) -> str | None:
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def language_files(root: str, language: str) -> LanguageFiles:
    """Find one language's files in either layout.

    Args:
        root: The bench folder (``data/multilingual-llava-bench-in-the-wild``).
        language: A lower-case language folder name.

    Returns:
        The resolved paths.

    Raises:
        BenchLayoutError: If a file is missing in both layouts (the message lists where it looked).
    """
    base = os.path.join(root, language)
    folders = [os.path.join(base, "corrected"), base]
    found = {}
    for kind, names in (("questions", QUESTION_NAMES), ("answers", ANSWER_NAMES), ("context", CONTEXT_NAMES)):
        path = _find(folders, names)
        if path is None:
            tried = ", ".join(os.path.join(f, n) for f in folders for n in names)
            raise BenchLayoutError(f"{language}: no {kind} file; looked for {tried}")
        found[kind] = path
    return LanguageFiles(language=language, images=os.path.join(root, "images"), **found)


def available_languages(root: str, wanted: list[str] | None = None) -> list[str]:
    """The PALO languages (or ``wanted``) that have a folder under ``root``, in paper order."""
    candidates = wanted or list(LANGUAGES)
    return [lang for lang in candidates if os.path.isdir(os.path.join(root, lang))]
