"""``palo-data stats``: what each language costs in tokens, for the training data and the evaluation questions.

Vicuna's (LLaMA's) tokenizer was trained mostly on Latin-script text: Bengali, Hindi and Urdu are split into many
short pieces, and characters outside its vocabulary fall back to one token per UTF-8 byte (``<0xE0>``...). The
same sentence then takes several times the tokens (context length, training and generation time) that English
does. This module makes that visible, per language:

* counts: samples, conversation turns, samples with an image and images (a list-valued ``image`` counts each);
* text: words (whitespace-separated runs, so a Chinese or Japanese "word" is a whole phrase: compare those
  languages by characters), characters (code points other than whitespace), the ``<image>`` placeholder removed;
* tokens: the tokenizer's pieces for every turn's text (no BOS/EOS), tokens per word and per character, and the
  share of byte-fallback tokens.

A sample's language is :func:`palo.data.languages.sample_language` (all its turns together, as ``validate``); an
evaluation question's is its bench folder's language when given a bench folder, else detected from its text.
Training samples flagged ``corrupt: true`` are skipped and counted, as training and ``validate`` drop them.

Outputs: a markdown table on stdout; with ``--out PREFIX``, ``PREFIX.md``, ``PREFIX.json`` and ``PREFIX.png`` (tokens
per character and byte-fallback share per language), each written through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.data.languages import LANGUAGES, detect_language, sample_language
from palo.jsonl import atomic_write, same_file

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte fallback (LLaMA: ids 3..258)


@dataclass
class LanguageStats:
    """Counts for one language of one set (training data or evaluation questions)."""

    samples: int = 0
    turns: int = 0
    image_samples: int = 0
    images: int = 0
    words: int = 0
    characters: int = 0
    tokens: int = 0
    byte_tokens: int = 0

    @property
    def tokens_per_word(self) -> float | None:
        return self.tokens / self.words if self.words else None

    @property
    def tokens_per_character(self) -> float | None:
        return self.tokens / self.characters if self.characters else None

    @property
    def byte_token_share(self) -> float | None:
        return self.byte_tokens / self.tokens if self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_word": self.tokens_per_word,
                "tokens_per_character": self.tokens_per_character, "byte_token_share": self.byte_token_share}


@dataclass
class TokenCounter:
    """Counts a tokenizer's pieces, byte-fallback pieces among them, words and characters of texts."""

    tokenizer: Any
    _byte_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        vocab = self.tokenizer.get_vocab()
        self._byte_ids = {i for piece, i in vocab.items() if BYTE_PIECE.match(piece)}

    def add(self, stats: LanguageStats, texts: list[str]) -> None:
        texts = [t.replace(DEFAULT_IMAGE_TOKEN, " ").strip() for t in texts]
        texts = [t for t in texts if t]
        for text in texts:
            stats.words += len(text.split())
            stats.characters += sum(1 for ch in text if not ch.isspace())
        if not texts:
            return
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stats.tokens += len(ids)
            stats.byte_tokens += sum(1 for i in ids if i in self._byte_ids)


# Stands for an entry of the data file that is not valid JSON: counted malformed, as validate lists it and training
# skips it (--skip_bad_samples), rather than ending the whole report.
NOT_JSON = object()


def _read_all(index: Any) -> Iterator[Any]:
    """Every entry of a :class:`~palo.data.json_index.JsonArrayIndex`, :data:`NOT_JSON` for one that is not JSON."""
    for i in range(len(index)):
        try:
            yield index.read(i)
        except ValueError:
            yield NOT_JSON


def _image_count(image: Any) -> int:
    if isinstance(image, list):
        return len(image)
    return 1 if image else 0


def training_stats(samples: Iterable[Any], counter: TokenCounter) -> tuple[dict[str, LanguageStats], int, int]:
    """Per-language statistics of training samples (docs/formats.md §5.1).

    Samples flagged ``corrupt`` are skipped, whatever else they hold: training (and ``palo-data validate``) drops
    them.

    Args:
        samples: The samples; :data:`NOT_JSON` in place of an entry that is not valid JSON.
        counter: Counts the tokens.

    Returns:
        The statistics by language, the number of malformed samples (not valid JSON, or no ``conversations`` list)
        skipped, and the number of corrupt samples skipped.
    """
    table: dict[str, LanguageStats] = {}
    malformed = corrupt = 0
    for sample in samples:
        if isinstance(sample, dict) and sample.get("corrupt"):  # decided first, as training does: filtered out
            corrupt += 1
            continue
        if sample is NOT_JSON or not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            malformed += 1
            continue
        stats = table.setdefault(sample_language(sample), LanguageStats())
        turns = [t.get("value") for t in sample["conversations"] if isinstance(t, dict)]
        turns = [t for t in turns if isinstance(t, str)]
        stats.samples += 1
        stats.turns += len(turns)
        images = _image_count(sample.get("image"))
        stats.image_samples += 1 if images else 0
        stats.images += images
        counter.add(stats, turns)
    return table, malformed, corrupt


def _question_files(path: str) -> Iterator[tuple[str | None, str]]:
    """(language or None to detect, question file) for a question file or a multilingual bench folder."""
    if os.path.isfile(path):
        yield None, path
        return
    from palo.eval.bench import BenchLayoutError, available_languages, language_files

    languages = available_languages(path)
    if not languages:
        raise FileNotFoundError(f"{path}: neither a question file nor a bench folder with language folders")
    for language in languages:
        try:
            yield language, language_files(path, language).questions
        except BenchLayoutError as exc:
            print(f"[skip] {exc}", file=sys.stderr)


def question_stats(paths: list[str], counter: TokenCounter) -> dict[str, LanguageStats]:
    """Per-language statistics of evaluation question files (``question_id``, ``text``, optional ``image``).

    Raises:
        palo.eval.jsonl.JsonlError: On a malformed line (file and line named).
        FileNotFoundError: If a path is neither a file nor a bench folder.
    """
    from palo.jsonl import iter_jsonl

    table: dict[str, LanguageStats] = {}
    for path in paths:
        for language, file in _question_files(path):
            for record in iter_jsonl(file, required=("text",)):
                text = str(record.data["text"])
                stats = table.setdefault(language or detect_language(text), LanguageStats())
                stats.samples += 1
                stats.turns += 1
                images = _image_count(record.data.get("image"))
                stats.image_samples += 1 if images else 0
                stats.images += images
                counter.add(stats, [text])
    return table


def _ordered(table: dict[str, LanguageStats]) -> list[str]:
    return [lang for lang in LANGUAGES if lang in table] + sorted(set(table) - set(LANGUAGES))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(title: str, table: dict[str, LanguageStats]) -> str:
    header = ("| language | samples | turns | image samples | images | words | characters | tokens | tokens/word "
              "| tokens/char | byte-fallback share |")
    lines = [f"### {title}", "", header, "|" + " --- |" * 11]
    for language in _ordered(table):
        s = table[language]
        share = "n/a" if s.byte_token_share is None else f"{100 * s.byte_token_share:.1f} %"
        lines.append(f"| {language} | {s.samples} | {s.turns} | {s.image_samples} | {s.images} | {s.words} "
                     f"| {s.characters} | {s.tokens} | {_fmt(s.tokens_per_word)} | {_fmt(s.tokens_per_character)} "
                     f"| {share} |")
    return "\n".join(lines) + "\n"


def plot(tables: dict[str, dict[str, LanguageStats]], path: str) -> None:
    """Bars per language: tokens per character (left) and byte-fallback share (right), one colour per set."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = [lang for lang in _ordered({k: v for t in tables.values() for k, v in t.items()})]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(languages) + 4), 4.2))
    width = 0.8 / max(1, len(tables))
    for k, (name, table) in enumerate(tables.items()):
        xs = [i + k * width for i in range(len(languages))]
        per_char = [(table[lang].tokens_per_character or 0.0) if lang in table else 0.0 for lang in languages]
        share = [100 * (table[lang].byte_token_share or 0.0) if lang in table else 0.0 for lang in languages]
        axes[0].bar(xs, per_char, width, label=name)
        axes[1].bar(xs, share, width, label=name)
    for ax, label in zip(axes, ("tokens per character", "byte-fallback tokens (%)")):
        ax.set_xticks([i + width * (len(tables) - 1) / 2 for i in range(len(languages))], languages, rotation=45,
                      ha="right")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, [buffer.getvalue()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", required=True, help="training JSON (one array of samples)")
    parser.add_argument("--model_name_or_path", required=True, help="where the tokenizer is")
    parser.add_argument("--questions", nargs="*", default=[],
                        help="evaluation question files (.jsonl) or multilingual bench folders")
    parser.add_argument("--out", default=None, help="write OUT.md, OUT.json and OUT.png")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the markdown table")


def _input_files(paths: list[str]) -> Iterator[str]:
    """Every file ``--questions`` names: the files given, and every file inside a bench folder given."""
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                yield from (os.path.join(root, name) for name in names)
        else:
            yield path


def main_stats(args: argparse.Namespace) -> int:
    from palo.data.json_index import JsonArrayIndex
    from palo.jsonl import JsonlError
    from palo.model.builder import CheckpointError, resolve_checkpoint_dir
    from palo.model.tokenizer import load_tokenizer

    if args.out is not None:  # before the work: an output that would replace an input, or has no name
        outputs = [args.out + ext for ext in (".md", ".json", ".png")]
        if not os.path.basename(args.out):
            print(f"error: --out {args.out!r} must be a path prefix such as stats/report (it names the files "
                  "report.md, .json and .png)", file=sys.stderr)
            return 2
        inputs = [("--data_path", args.data_path)] + [("--questions", path) for path in _input_files(args.questions)]
        clash = next(((o, flag) for o in outputs for flag, path in inputs if same_file(o, path)), None)
        if clash:
            print(f"error: --out {args.out} would write {clash[0]}, which is {clash[1]}", file=sys.stderr)
            return 2
    try:
        tokenizer = load_tokenizer(resolve_checkpoint_dir(args.model_name_or_path))
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: --model_name_or_path {args.model_name_or_path}: no tokenizer could be loaded ({exc})",
              file=sys.stderr)
        return 2
    counter = TokenCounter(tokenizer)
    index = JsonArrayIndex.build(args.data_path)
    train, malformed, corrupt = training_stats(_read_all(index), counter)
    tables = {"training data": train}
    if args.questions:
        try:
            tables["evaluation questions"] = question_stats(args.questions, counter)
        except (JsonlError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    report = {
        "tokenizer": args.model_name_or_path,
        "data_path": args.data_path,
        "malformed_samples": malformed,
        "corrupt_samples": corrupt,
        "definitions": {
            "words": "whitespace-separated runs (a Chinese/Japanese 'word' is a phrase: compare those by characters)",
            "characters": "code points other than whitespace, <image> removed",
            "tokens": "tokenizer pieces of every turn's text, no BOS/EOS",
            "byte_token_share": "byte-fallback pieces (<0x..>) / tokens",
        },
        "sets": {name: {lang: table[lang].as_dict() for lang in _ordered(table)} for name, table in tables.items()},
    }
    markdown = "\n".join(markdown_table(name, table) for name, table in tables.items())
    if malformed:
        markdown += f"\n{malformed} malformed sample(s) skipped (not valid JSON, or no 'conversations' list)\n"
    if corrupt:
        markdown += f"\n{corrupt} corrupt sample(s) skipped (corrupt: true; training drops them)\n"
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else markdown)
    if args.out:
        try:
            atomic_write(args.out + ".md", [markdown])
            atomic_write(args.out + ".json", [json.dumps(report, ensure_ascii=False, indent=2) + "\n"])
            plot(tables, args.out + ".png")
        except OSError as exc:
            print(f"error: cannot write --out {args.out}.*: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0
