"""The quickstart's exact-match judge against answers known to be right or wrong, in every script of the task.

An answer is right when it names the same colour / shape / count word as the reference, whatever its case, spacing,
full stop (``.``, ``。``, ``।``, ``۔``) or Unicode compatibility form; anything else (another word, an extra word,
a part of the word, digits for a spelled-out count, nothing) is wrong. The table's percentages are checked against
counts done by hand.
"""

from __future__ import annotations

import json
import os

import pytest

from palo.quickstart import shapes_task
from palo.quickstart.exact_match import answers_path, build_table, is_correct, score_language

# (model answer, reference, right?) -- references are the task's own answers (shapes_task.answer's format).
CASES = [
    # English / Latin
    ("Red.", "Red.", True),
    ("red", "Red.", True),
    ("  RED!  ", "Red.", True),
    ("ＲＥＤ", "Red.", True),  # full-width Latin folds to ASCII under NFKC
    ("Red square.", "Red.", False),
    ("Re", "Red.", False),
    ("Blue.", "Red.", False),
    ("2", "Two.", False),  # the task answers in words
    ("", "Two.", False),
    # French / Spanish with accents: the accent is part of the word
    ("carré", "Carré.", True),
    ("Carre.", "Carré.", False),
    ("¡Triángulo!", "Triángulo.", True),
    ("triangulo", "Triángulo.", False),
    # Chinese / Japanese: full-width stops, no spaces
    ("红色", "红色。", True),
    ("红色。", "红色。", True),
    ("绿色。", "红色。", False),
    ("红", "红色。", False),
    ("三角形", "三角形。", True),
    ("四角形。", "三角形。", False),
    # Russian (Cyrillic, case folding)
    ("КРАСНЫЙ", "Красный.", True),
    ("синий.", "Красный.", False),
    # Arabic (right-to-left; Arabic question mark, presentation forms fold under NFKC)
    ("أحمر", "أحمر.", True),
    ("أحمر؟", "أحمر.", True),
    ("\ufe83\ufea3\ufee4\ufeae", "أحمر.", True),  # the same word in presentation-form code points
    ("أزرق.", "أحمر.", False),
    ("اثنان", "ثلاثة.", False),
    # Hindi / Bengali (danda) and Urdu (its own full stop)
    ("लाल", "लाल।", True),
    ("लाल।", "लाल।", True),
    ("नीला।", "लाल।", False),
    ("তিনটি", "তিনটি।", True),
    ("দুটি।", "তিনটি।", False),
    ("نیلا", "نیلا۔", True),
    ("پیلا۔", "نیلا۔", False),
]


@pytest.mark.parametrize("answer,reference,right", CASES)
def test_exact_match_on_known_right_and_wrong_answers(answer, reference, right):
    assert is_correct(answer, reference) is right


def _write_answers(folder: str, language: str, texts: dict[int, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(answers_path(folder, language), "w", encoding="utf-8") as f:
        for qid, text in texts.items():
            f.write(json.dumps({"question_id": qid, "prompt": "", "text": text, "model_id": "m"}, ensure_ascii=False)
                    + "\n")


def _references(bench: str, language: str) -> dict[int, str]:
    path = os.path.join(bench, language, "answers.jsonl")
    return {r["question_id"]: r["text"] for r in map(json.loads, open(path, encoding="utf-8"))}


def _wrong(reference: str, language: str, kind: str) -> str:
    """Another word of the same kind in the same language: a plausible but wrong answer."""
    words = list(shapes_task.VOCAB[language][kind].values())
    right = next(w for w in words if shapes_task._finish(language, w) == reference)
    return shapes_task._finish(language, next(w for w in words if w != right))


def test_table_counts_right_wrong_and_unanswered_by_hand(tmp_path):
    # Two held-out images: questions 0-2 ask colour/shape/count of image 0, questions 3-5 of image 1.
    bench = shapes_task.write_bench(str(tmp_path / "bench"), 2, 84, seed=5)
    answers = str(tmp_path / "answers")
    english, arabic, chinese = (_references(bench, "english"), _references(bench, "arabic"),
                                _references(bench, "chinese"))
    # English: colour 2/2 (one in another case, no stop), shape 1/2, count 0/1 and one unanswered.
    _write_answers(answers, "english", {
        0: english[0].upper().rstrip("."), 3: english[3],
        1: english[1], 4: _wrong(english[4], "english", "shape"),
        2: _wrong(english[2], "english", "count"),
    })
    # Arabic: colour 1/2, shape 2/2 (one without its stop), count 1/2.
    _write_answers(answers, "arabic", {
        0: arabic[0], 3: _wrong(arabic[3], "arabic", "colour"),
        1: arabic[1].rstrip("."), 4: arabic[4],
        2: _wrong(arabic[2], "arabic", "count"), 5: arabic[5],
    })
    # Chinese: everything right.
    _write_answers(answers, "chinese", chinese)
    table = build_table(bench, answers, "m", languages=["english", "chinese", "arabic", "urdu"])
    assert table["missing"] == ["urdu"]

    en = table["languages"]["english"]
    assert (en["colour"], en["shape"], en["count"], en["all"]) == (100.0, 50.0, 0.0, 60.0)
    assert (en["colour_n"], en["shape_n"], en["count_n"], en["all_n"], en["failed"]) == (2, 2, 1, 5, 1)
    assert sorted(m["question_id"] for m in en["mistakes"]) == [2, 4]
    ar = table["languages"]["arabic"]
    assert (ar["colour"], ar["shape"], ar["count"], ar["all"], ar["failed"]) == (50.0, 100.0, 50.0, 66.7, 0)
    assert sorted(m["question_id"] for m in ar["mistakes"]) == [2, 3]
    zh = table["languages"]["chinese"]
    assert (zh["colour"], zh["shape"], zh["count"], zh["all"], zh["failed"]) == (100.0, 100.0, 100.0, 100.0, 0)
    # Averages over the languages present: English and Chinese are high-resource, Arabic low-resource here.
    overall = table["averages"]["Overall avg"]
    assert overall["all"] == round((60.0 + 100.0 + 66.7) / 3, 1) and overall["failed"] == 1
    assert table["averages"]["Low-resource avg"]["all"] == 66.7


def test_an_answers_file_for_another_language_scores_zero(tmp_path):
    """Right answers in the wrong language are wrong: French answers scored against the Spanish references."""
    bench = shapes_task.write_bench(str(tmp_path / "bench"), 2, 84, seed=5)
    answers = str(tmp_path / "answers")
    _write_answers(answers, "spanish", _references(bench, "french"))
    row = score_language(bench, "spanish", answers_path(answers, "spanish"))
    # No French word of the task is also its Spanish word (rouge/rojo, carré/cuadrado, triangle/triángulo, ...).
    assert row["all"] == 0.0 and row["all_n"] == 6 and row["failed"] == 0 and len(row["mistakes"]) == 6
