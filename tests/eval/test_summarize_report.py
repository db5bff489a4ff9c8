"""Summary and cross-language table from fixed reviews, checked against numbers computed by hand."""

from __future__ import annotations

import csv
import json
import os

import pytest

from palo.eval import report
from palo.eval import summarize_gpt_review as summary

# question_id, category, (reference, model) or None for a failed judgment.
REVIEWS = [
    (1, "conv", (8, 9)),
    (2, "conv", (6, 4)),
    (3, "conv", None),  # an original-format failure: [-1, -1] without a "failed" key
    (4, "detail", (10, 7)),
    (5, "detail", None),  # a new-format failure
    (6, "complex", (7, 7)),
    (7, "complex", (9, 5)),
]


def _review(qid: int, category: str, scores, new_format: bool = True) -> dict:
    record = {"id": qid, "question_id": qid, "category": f"llava_bench_{category}", "content": "",
              "tuple": list(scores) if scores else [-1, -1]}
    if scores is None and new_format:
        record.update(failed=True, reason="request failed after 6 attempt(s): InternalServerError (HTTP 500)")
    return record


def _write(path, records) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture
def reviews() -> list[dict]:
    return [_review(q, c, s, new_format=(q != 3)) for q, c, s in REVIEWS]


def test_scores_by_hand(reviews):
    result = summary.summarize(reviews)
    assert list(result) == ["all", "llava_bench_complex", "llava_bench_conv", "llava_bench_detail"]
    S = summary.CategoryScore
    # conv: reference (8+6)/2 = 7, model (9+4)/2 = 6.5 -> 6.5/7 = 92.9 %; the [-1, -1] is counted, not averaged.
    assert result["llava_bench_conv"] == S(relative=92.9, reference=70.0, model=65.0, judged=2, failed=1)
    assert result["llava_bench_detail"] == S(relative=70.0, reference=100.0, model=70.0, judged=1, failed=1)
    assert result["llava_bench_complex"] == S(relative=75.0, reference=80.0, model=60.0, judged=2, failed=0)
    # all: reference 40/5 = 8, model 32/5 = 6.4 -> a ratio of means, 80 % (the mean of ratios would be 83.7 %).
    assert result["all"] == S(relative=80.0, reference=80.0, model=64.0, judged=5, failed=2)


def test_retry_replaces_failure_and_ignore_drops_questions(reviews):
    retried = reviews + [_review(5, "detail", (4, 6))]  # a resumed run appended a successful retry of question 5
    result = summary.summarize(retried)
    assert result["llava_bench_detail"] == summary.CategoryScore(92.9, 70.0, 65.0, 2, 0, replaced=1)  # 6.5 / 7
    assert "llava_bench_detail" not in summary.summarize(reviews, ignore={"4", "5"})
    assert summary.score_of([], failed=3) == summary.CategoryScore(None, None, None, 0, 3)


def test_a_review_replaced_by_a_later_one_of_its_question_is_counted_not_dropped_unseen(tmp_path, capsys):
    """The last review per question_id counts (a resumed run's retry); two languages in one file lost half their
    reviews without a word."""
    english = [_review(1, "conv", (8, 6)), _review(2, "detail", (6, 6))]
    arabic = [_review(1, "conv", (10, 5)), _review(2, "detail", (4, 2))]
    result = summary.summarize(english + arabic)
    assert result["all"] == summary.CategoryScore(50.0, 70.0, 35.0, judged=2, failed=0, replaced=2)
    assert result["llava_bench_conv"].replaced == 1 and result["llava_bench_detail"].replaced == 1
    path = _write(tmp_path / "mixed.jsonl", english + arabic)
    assert summary.main(["-f", path]) == 0
    assert ("[counts] mixed all: judged 2, failed 0, replaced 2 (earlier reviews of a question_id a later line "
            "reviews again: a resumed run's retries; a file of several runs or languages is not one set of reviews)"
            in capsys.readouterr().err)
    assert report.language_row(result)["replaced"] == 2  # in the report's JSON too


def test_a_category_whose_reference_mean_is_zero_has_no_ratio():
    assert summary.score_of([[0.0, 5.0]], failed=0) == summary.CategoryScore(None, 0.0, 50.0, judged=1, failed=0)


def test_cli_prints_scores_with_failed_counts(reviews, tmp_path, capsys):
    path = _write(tmp_path / "reviews" / "gpt4_text_model_English.jsonl", reviews)
    assert summary.main(["-f", path]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [  # the original's lines, four fields each
        "model_English",
        "all 80.0 80.0 64.0",
        "llava_bench_complex 75.0 80.0 60.0",
        "llava_bench_conv 92.9 70.0 65.0",
        "llava_bench_detail 70.0 100.0 70.0",
        "=" * 33,
    ]
    assert captured.err.splitlines() == [
        "[counts] model_English all: judged 5, failed 2",
        "[counts] model_English llava_bench_complex: judged 2, failed 0",
        "[counts] model_English llava_bench_conv: judged 2, failed 1",
        "[counts] model_English llava_bench_detail: judged 1, failed 1",
    ]
    assert summary.main(["-d", str(tmp_path / "reviews"), "-i", "1", "2", "3"]) == 0
    captured = capsys.readouterr()
    # Without questions 1-3 no conv question is left; all = (10+7+9)/3 vs (7+7+5)/3 -> 6.333 / 8.667 = 73.1 %.
    assert "llava_bench_conv" not in captured.out and "all 73.1 86.7 63.3\n" in captured.out
    assert "[counts] model_English all: judged 3, failed 1" in captured.err
    assert summary.main(["-d", str(tmp_path / "nowhere")]) == 2
    assert f"error: -d {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    # Lines a summary cannot use are reported and skipped, and the rest still summed (these were tracebacks, or
    # scores of true/infinity).
    with open(path, "ab") as f:
        f.write(b'{"question_id": 8, "category": "llava_bench_conv", "content": "caf\xe9", "tuple": [1, 2]}\n')
        f.write(b'{"question_id": 9, "category": ["x"], "tuple": [1, 2]}\n')
        f.write(b'{"question_id": 10, "category": "llava_bench_conv", "tuple": [true, 2]}\n')
        f.write(b'{"question_id": 11, "category": "llava_bench_conv", "tuple": [Infinity, 2]}\n')
    assert summary.main(["-f", path]) == 0
    captured = capsys.readouterr()
    assert f"{path}:8: not UTF-8 text" in captured.err and f"{path}:9: 'category' must be a string" in captured.err
    assert "all 80.0 80.0 64.0\n" in captured.out and "all: judged 5, failed 4" in captured.err
    # An answers file is not a reviews file: it was summed as every answer a failed judgment ("all n/a", exit 0).
    answers = _write(tmp_path / "answers.jsonl", [{"question_id": i, "text": "a cat", "answer_id": f"a{i}"}
                                                  for i in range(3)])
    assert summary.main(["-f", answers]) == 2
    assert f"{answers} is not a reviews file: none of its 3 lines" in capsys.readouterr().err
    with open(path, "a", encoding="utf-8") as f:  # one such line among reviews: named and skipped
        f.write('{"question_id": 12, "text": "a cat"}\n')
    assert summary.main(["-f", path]) == 0
    captured = capsys.readouterr()
    assert f"{path}:12: not a review" in captured.err and "all: judged 5, failed 4" in captured.err


def test_table_across_languages(tmp_path, reviews):
    folder = tmp_path / "evaluation" / "reviews"
    _write(folder / "run_English.jsonl", reviews)  # all 80.0 (see above)
    _write(folder / "run_Chinese.jsonl", [_review(1, "conv", (5, 5)), _review(2, "detail", (8, 6)),
                                          _review(3, "complex", (10, 9))])  # 100, 75, 90; all 20/23 = 87.0
    _write(folder / "run_Urdu.jsonl", [_review(1, "conv", (8, 4)), _review(2, "detail", None),
                                       _review(3, "complex", (6, 6))])  # 50, n/a, 100; all 10/14 = 71.4
    table = report.build_table(str(folder), "run")
    assert list(table["languages"]) == ["english", "chinese", "urdu"]
    assert table["missing"] == ["french", "spanish", "russian", "japanese", "arabic", "hindi", "bengali"]
    high, low, overall = (table["averages"][k] for k in ("High-resource avg", "Low-resource avg", "Overall avg"))
    assert high["languages"] == ["english", "chinese"] and low["languages"] == ["urdu"]
    assert (high["conv"], high["detail"], high["complex"], high["all"]) == (96.5, 72.5, 82.5, 83.5)
    assert (low["conv"], low["detail"], low["complex"], low["all"]) == (50.0, None, 100.0, 71.4)
    assert overall["all"] == round((80.0 + 87.0 + 71.4) / 3, 1) and overall["failed"] == 3

    paths = report.write_report(table, str(tmp_path / "evaluation" / "run_summary"))
    md = open(paths["md"], encoding="utf-8").read()
    assert "| English | 92.9 | 70.0 | 75.0 | 80.0 | 2 |" in md
    assert "| Urdu | 50.0 | n/a | 100.0 | 71.4 | 1 |" in md
    assert "| High-resource avg | 96.5 | 72.5 | 82.5 | 83.5 | 2 |" in md
    rows = list(csv.DictReader(open(paths["csv"], encoding="utf-8")))
    assert [r["language"] for r in rows] == ["English", "Chinese", "Urdu", "High-resource avg", "Low-resource avg",
                                             "Overall avg"]
    assert rows[1] == {"language": "Chinese", "conv": "100.0", "detail": "75.0", "complex": "90.0", "all": "87.0",
                       "failed": "0", "judged": "3"}
    assert json.load(open(paths["json"], encoding="utf-8"))["languages"]["urdu"]["detail_failed"] == 1
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_languages_are_named_in_any_case_and_listed_in_the_papers_order(tmp_path, reviews, capsys):
    """``--languages English`` printed no averages and ``--skip English`` was ignored (English averaged in); rows
    followed the order typed, where the docstring promises the paper's."""
    folder = tmp_path / "reviews"
    for language in ("English", "Arabic", "Urdu"):
        _write(folder / f"run_{language}.jsonl", reviews)
    table = report.build_table(str(folder), "run", ["Urdu", "english", "ARABIC"])
    assert list(table["languages"]) == ["english", "arabic", "urdu"]
    assert table["averages"]["Overall avg"]["languages"] == ["english", "arabic", "urdu"]
    skipped = report.build_table(str(folder), "run", ["urdu", "english", "arabic"], skip=["English"])
    assert list(skipped["languages"]) == ["arabic", "urdu"] and skipped["missing"] == ["english"]
    assert skipped["averages"]["Low-resource avg"]["languages"] == ["arabic", "urdu"]
    assert "High-resource avg" not in skipped["averages"]


def test_a_reviews_folder_of_answers_is_one_error_line(tmp_path, capsys):
    """run_bench writes answers as <output-dir>/<NAME>_<Language>.jsonl, the names of the reviews one folder down."""
    answers = [{"question_id": i, "text": "a cat", "answer_id": f"a{i}"} for i in range(3)]
    _write(tmp_path / "run_English.jsonl", answers)
    assert report.main(["--reviews-dir", str(tmp_path), "--name", "run"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: {tmp_path / 'run_English.jsonl'} is not a reviews file: none of "
                                            "its 3 lines has a 'tuple' of scores")
    assert "Traceback" not in err


def test_a_report_that_cannot_be_written_is_an_error_that_says_so(tmp_path, reviews, capsys):
    folder = tmp_path / "evaluation" / "reviews"
    _write(folder / "run_English.jsonl", reviews)
    assert report.main(["--reviews-dir", str(folder), "--name", "run", "--out", "/proc/no-such/x"]) == 2
    assert "error: cannot write the report /proc/no-such/x.*" in capsys.readouterr().err
    out = tmp_path / "reports"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_info:  # a folder, not a prefix: it wrote reports/.md, .csv ...
        report.main(["--reviews-dir", str(folder), "--name", "run", "--out", f"{out}/"])
    assert exit_info.value.code == 2 and "must be a path prefix" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_files_are_chosen_sorted_and_filtered_as_the_original_chose_them(reviews, tmp_path, capsys):
    """The original tests ``'review' in`` the whole -d argument (a run folder below evaluation/reviews/ was read
    here only when its own name said review), and sorts and filters -f files like the folder's (here -f kept the
    order typed and ignored -s and -v)."""
    run = tmp_path / "reviews" / "run1"
    for name in ("B_English_0613.jsonl", "A_English.jsonl"):
        _write(run / name, reviews)

    def labels(argv: list[str]) -> list[str]:
        assert summary.main(argv) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.endswith(("English", "_0613"))]

    assert labels(["-d", str(run)]) == ["A_English", "B_English_0613"]
    files = [str(run / "B_English_0613.jsonl"), str(run / "A_English.jsonl")]
    assert labels(["-f", *files]) == ["A_English", "B_English_0613"]
    assert labels(["-f", *files, "-v", "0314"]) == ["A_English"]
    assert labels(["-f", *files, "-s", "B_"]) == ["B_English_0613"]
    assert labels(["-d", str(run), "-f", "A_English.jsonl"]) == ["A_English"]  # -f names inside -d


def test_a_group_average_is_over_the_languages_that_have_the_column():
    """A language without a score in a column (every detail judgment failed) is left out of that column's mean,
    not counted as 0: the average is the other languages' score."""
    def row(**scores) -> dict:
        return {**{c: scores.get(c) for c in report.COLUMNS}, "failed": 0, "judged": 3}

    rows = {"english": row(conv=90.0, detail=80.0, complex=70.0, all=80.0),
            "chinese": row(conv=70.0, detail=None, complex=50.0, all=60.0)}
    average = report.average_row(rows, ("english", "chinese", "french"))
    assert average["languages"] == ["english", "chinese"]
    assert (average["conv"], average["detail"], average["complex"], average["all"]) == (80.0, 80.0, 60.0, 70.0)
    assert (average["detail_languages"], average["all_languages"]) == (1, 2)
    assert report.average_row(rows, ("french",)) is None
