"""The judge step against a local OpenAI-compatible server: real sockets, the real ``openai`` client."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import signal
import threading
import time

import pytest

from palo.eval import eval_gpt_review_bench as review
from palo.eval.judge import DEFAULT_RULES, ScoreParseError, build_user_content, parse_scores
from palo.jsonl import Record


@pytest.mark.parametrize("reply, expected", [
    ("8 9", (8, 9)),
    ("8 9\nAssistant 1 is more detailed.", (8, 9)),
    ("8, 9", (8, 9)),
    ("8,9", (8, 9)),
    ("8.5 7", (8.5, 7)),
    ("Scores: 8/10 and 9/10", (8, 9)),
    ("8 out of 10, 9 out of 10", (8, 9)),
    ("Assistant 1: 8\nAssistant 2: 9\nBoth are good.", (8, 9)),
    ("Assistant 1: 8/10, Assistant 2: 9/10", (8, 9)),
    ("**7** **10**", (7, 10)),
    ("[6, 4]", (6, 4)),
    ("Here are my scores:\n3 5", (3, 5)),
    ("Assistant 1 receives a score of 6, while Assistant 2 gets 4.", (6, 4)),
    # A judge writing in the answers' language: full-width or Arabic-Indic digits, and that script's comma.
    ("８ ７", (8, 7)), ("٨ ٧", (8, 7)), ("８，７", (8, 7)), ("8，7", (8, 7)), ("8、7", (8, 7)), ("٨، ٧", (8, 7)),
    ("8；7", (8, 7)), ("８，７。助手2的回答更详细。", (8, 7)),
])
def test_score_formats(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply", ["", "I cannot judge these answers.", "8", "8 9 10", "11 9", "Assistant 1: 8 only"])
def test_unparseable_replies_raise(reply):
    with pytest.raises(ScoreParseError):
        parse_scores(reply)


@pytest.mark.timeout(30)  # a guard, not a measurement: the old parser needed minutes for this reply
def test_a_long_run_of_spaces_in_a_reply_is_parsed_at_once():
    """Two patterns began with optional space and rescanned a run from each position in it: 16,000 spaces in a
    reply took 9 s to parse (twice per reply, and again on resume); these 60,000 took minutes."""
    assert parse_scores("The answers differ." + " " * 60_000 + "Both are fine.\n8 9") == (8.0, 9.0)
    assert parse_scores("Assistant 1:" + " " * 60_000 + "7\nAssistant 2: 6") == (7.0, 6.0)


@pytest.mark.parametrize("reply, expected", [
    ("Assistant 2: 9, Assistant 1: 3", (3, 9)),  # labels win over position
    ("Comparing Assistant 1 with Assistant 2:\nAssistant 1: 8\nAssistant 2: 5", (8, 5)),  # no label in a gap
    ("<think>\nAssistant 1 lists 3 objects, Assistant 2 lists 2.\n</think>\n7 8", (7, 8)),
    ("Evaluation of question 3 about image 001.jpg:\n7 8\nBoth fine.", (7, 8)),  # a heading is not the scores
    ("8 9 (Assistant 2 is better)", (8, 9)),
    ("8 9 - Assistant 2 is better as it mentions 2 dogs", (8, 9)),  # the leading pair, not a count in the prose
    ("Answer 1: 7  Answer 2: 6", (7, 6)),
    ("Assistant 1 gets 8 points, Assistant 2 gets 9 points.", (8, 9)),
    ("Assistant 1 scores 7 while Assistant 2 scores 10.", (7, 10)),
    ("Assistant 1: 8 – Assistant 2: 6", (8, 6)), ("Assistant 1: 8 - clear\nAssistant 2: 6 - vague", (8, 6)),
    ("8 9\nAssistant 1 names 3/5 of the objects.", (8, 9)),  # a fraction in the explanation, not the scores' line
])
def test_numbers_that_are_not_scores_are_not_read_as_scores(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply", [
    "-3 5", "Assistant 1: -3\nAssistant 2: 5",  # signed: out of range, not 3
    "1. 8\n2. 9",  # list markers are not scores
    "The image shows 2 dogs and 001.jpg is small.\n8 9",  # a preamble with numbers: fail rather than guess
    # Counts in the explanation are not scores (they were read as 3, as 2, and as (3, 5) and (2, 4)):
    "Assistant 1: 8\nAssistant 2 lists 3 reasons and gets 9.",
    "Assistant 1: 8\n\nAssistant 2 mentions 2 dogs. Score 9",
    "Assistant 1 provides 3 examples, Assistant 2 provides 5 examples.\n7 8",
    "Assistant 1 gave 2 wrong facts: 4\nAssistant 2: 8",
    # Ranges, choices, approximations and other scales were read as the first number (1 and 4 out of 5 as 1 and 4
    # out of 10; 7-8 as 7); the same numbers without labels already failed.
    "Assistant 1: 1/5\nAssistant 2: 4/5", "Assistant 1: 8/20\nAssistant 2: 7/20", "8 7 (out of 5)",
    "Assistant 1: 8, Assistant 2: 7 (out of 5)", "Assistant 1: 7-8\nAssistant 2: 6", "Assistant 1: 7–8\nAssistant 2: 6",
    "Assistant 1: 7 or 8\nAssistant 2: 6", "Assistant 1: ~8\nAssistant 2: 7", "Assistant 1: 8,5\nAssistant 2: 7,5",
    "Assistant 1: 8\nAssistant 2: 3/5",
])
def test_replies_that_would_need_a_guess_raise(reply):
    with pytest.raises(ScoreParseError):
        parse_scores(reply)


def test_request_layout_is_the_original_protocol():
    rule = {"role": "Assistant", "prompt": "RULE"}
    content = build_user_content("ctx", "q?", "a1", "a2", rule)
    assert content == ("[Context]\nctx\n\n[Question]\nq?\n\n[Assistant 1]\na1\n\n[End of Assistant 1]\n\n"
                       "[Assistant 2]\na2\n\n[End of Assistant 2]\n\n[System]\nRULE\n\n")
    assert set(DEFAULT_RULES) == {"llava_bench_conv", "llava_bench_detail", "llava_bench_complex"}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    """Four questions; the model's answers are in reverse order (pairing must use question_id)."""
    questions = [
        {"question_id": 10, "image": "a.jpg", "text": "Q-conv", "category": "conv"},
        {"question_id": 11, "image": "b.jpg", "text": "Q-detail", "category": "detail"},
        {"question_id": 12, "image": "a.jpg", "text": "Q-complex", "category": "complex"},
        {"question_id": 13, "image": "b.jpg", "text": "Q-conv2", "category": "conv"},
    ]
    return {
        "q": _write(tmp_path / "q.jsonl", questions),
        "c": _write(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "A cat."},
                                            {"image": "b.jpg", "caption": ["A dog.", "On grass."]}]),
        "a1": _write(tmp_path / "ref.jsonl", [{"question_id": q["question_id"], "text": f"ref {q['question_id']}",
                                               "answer_id": f"r{q['question_id']}"} for q in questions]),
        "a2": _write(tmp_path / "model.jsonl", [{"question_id": q["question_id"], "text": f"model {q['question_id']}",
                                                 "answer_id": f"m{q['question_id']}"} for q in reversed(questions)]),
        "o": str(tmp_path / "reviews" / "reviews.jsonl"),
    }


def _args(inputs, server, *extra: str) -> list[str]:
    return ["-q", inputs["q"], "-c", inputs["c"], "-a", inputs["a1"], inputs["a2"], "-o", inputs["o"],
            "--judge-base-url", server.base_url, "--api-key", "sk-local", "--judge-model", "judge-x",
            "--max-retries", "2", "--retry-base-delay", "0.01", *extra]


def _reviews(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _complete_lines(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def test_formats_retry_failure_resume_and_cache(inputs, judge_server, tmp_path, capsys):
    judge_server.script("Q-conv", (200, "8, 9\nAssistant 2 is better."))
    judge_server.script("Q-detail", (429, "slow down"), (200, "Scores: 8/10 and 9/10"))
    judge_server.script("Q-complex", (500, "the judge is down"))
    judge_server.script("Q-conv2", (200, "Assistant 1: 6\nAssistant 2: 4"))
    cache = str(tmp_path / "cache.sqlite")

    assert review.main(_args(inputs, judge_server, "--parallel", "3", "--cache", cache)) == 0
    err = capsys.readouterr().err
    reviews = _reviews(inputs["o"])
    assert [r["question_id"] for r in reviews] == [10, 11, 12, 13] and [r["id"] for r in reviews] == [1, 2, 3, 4]
    assert [r["tuple"] for r in reviews] == [[8, 9], [8, 9], [-1, -1], [6, 4]]
    assert [r["failed"] for r in reviews] == [False, False, True, False]
    assert "HTTP 500" in reviews[2]["reason"] and "3 attempt(s)" in reviews[2]["reason"]
    assert "[failed] question_id 12" in err
    assert [r["category"] for r in reviews] == ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex",
                                                "llava_bench_conv"]
    assert all(r["judge_model"] == "judge-x" for r in reviews) and set(judge_server.models) == {"judge-x"}
    # Paired by question_id although the model's file is in reverse order.
    assert [(r["answer1_id"], r["answer2_id"]) for r in reviews] == [(f"r{i}", f"m{i}") for i in range(10, 14)]
    sent = {c.split("[Question]\n")[1].split("\n")[0]: c for c in judge_server.contents}
    assert "[Assistant 2]\nmodel 11\n" in sent["Q-detail"] and "[Context]\nA dog.\nOn grass.\n" in sent["Q-detail"]
    # The 429 was retried once; the 500 got the first try plus 2 retries, then was given up.
    assert judge_server.count() == {"Q-conv": 1, "Q-detail": 2, "Q-complex": 3, "Q-conv2": 1}

    # Rerun after the judge recovered: only the failed question is asked again.
    judge_server.script("Q-complex", (200, "7 7"))
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--cache", cache)) == 0
    assert judge_server.count() == {"Q-complex": 1}
    reviews = _reviews(inputs["o"])
    assert [r["tuple"] for r in reviews] == [[8, 9], [8, 9], [7, 7], [6, 4]] and not any(r["failed"] for r in reviews)

    # The same requests from scratch: every reply comes from the cache, no call is made.
    os.remove(inputs["o"])
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--cache", cache)) == 0
    assert judge_server.count() == {} and len(_reviews(inputs["o"])) == 4
    assert "4 from cache" in capsys.readouterr().err
    # A different judge model is a different request: not served from the cache.
    os.remove(inputs["o"])
    assert review.main(_args(inputs, judge_server, "--cache", cache, "--judge-model", "judge-y")) == 0
    assert sum(judge_server.count().values()) == 4


def test_timeout_is_retried(inputs, judge_server):
    judge_server.script("Q-conv", (0, "1.0"), (200, "9 9"))
    assert review.main(_args(inputs, judge_server, "--no-cache", "--timeout", "0.3")) == 0
    assert judge_server.count("Q-conv") == 2
    assert _reviews(inputs["o"])[0]["tuple"] == [9, 9]


def test_unparseable_reply_and_missing_answer_are_failed_not_scored(inputs, judge_server, tmp_path, capsys):
    judge_server.script("Q-detail", (200, "Both answers are reasonable."))
    rows = [json.loads(line) for line in open(inputs["a1"], encoding="utf-8")]
    _write(tmp_path / "ref.jsonl", [r for r in rows if r["question_id"] != 13])
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    reviews = {r["question_id"]: r for r in _reviews(inputs["o"])}
    assert reviews[11]["failed"] and reviews[11]["tuple"] == [-1, -1]
    assert "unparseable" in reviews[11]["reason"] and reviews[11]["content"] == "Both answers are reasonable."
    assert reviews[13]["failed"] and "no reference answer for question_id 13" in reviews[13]["reason"]
    assert judge_server.count("Q-conv2") == 0  # nothing to judge: no call
    assert not reviews[10]["failed"] and not reviews[12]["failed"]


def test_an_output_that_cannot_be_written_is_refused_before_any_call(inputs, judge_server, tmp_path, capsys):
    """Every paid review would be lost: the reviews file and the cache are opened before the judge is asked."""
    for output, extra in (("/proc/no-such/r.jsonl", ["--no-cache"]), (str(tmp_path / "r.jsonl"),
                                                                        ["--cache", "/proc/no-such/c.sqlite"])):
        args = _args(inputs, judge_server, *extra)
        args[args.index("-o") + 1] = output
        assert review.main(args) == 2
        assert "error: cannot write the reviews or the judge cache" in capsys.readouterr().err
    with review.JsonlAppender(inputs["o"]):  # another run is writing these reviews
        assert review.main(_args(inputs, judge_server, "--no-cache")) == 2
        assert "another process is writing this file" in capsys.readouterr().err
    assert sum(judge_server.count().values()) == 0


def test_an_output_that_is_an_input_is_refused_before_any_call(inputs, judge_server, tmp_path, capsys):
    """Reviews appended to (and compacted into) an input file replaced it: the model's answers were lost."""
    for key, name in (("q", "question"), ("c", "context"), ("a1", "reference answers"), ("a2", "model answers")):
        before = open(inputs[key], encoding="utf-8").read()
        args = _args(inputs, judge_server, "--no-cache")
        args[args.index("-o") + 1] = inputs[key].replace(str(tmp_path), str(tmp_path) + "/.")  # spelt another way
        assert review.main(args) == 2
        assert f"is the {name} file" in capsys.readouterr().err
        assert open(inputs[key], encoding="utf-8").read() == before
    assert sum(judge_server.count().values()) == 0


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "nan"),
                                         ("--parallel", "0"), ("--max-retries", "-1"), ("--retry-base-delay", "-2")])
def test_request_settings_that_cannot_work_are_refused_by_name(inputs, judge_server, flag, value, capsys):
    """A timeout of 0 failed every request after the whole retry schedule, reported as a connection error."""
    with pytest.raises(SystemExit) as exit_info:
        review.main(_args(inputs, judge_server, "--no-cache", flag, value))
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert sum(judge_server.count().values()) == 0


def test_everything_failing_exits_3(inputs, judge_server, capsys):
    judge_server.default = (401, "bad key")
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 3
    assert "no question could be judged" in capsys.readouterr().err
    assert sum(judge_server.count().values()) == 4  # a 401 is not retried


def test_answers_for_other_questions_exit_3_saying_so_without_a_call(inputs, judge_server, tmp_path, capsys):
    rows = [json.loads(line) for line in open(inputs["a2"], encoding="utf-8")]
    _write(tmp_path / "other.jsonl", [dict(r, question_id=r["question_id"] + 1000) for r in rows])
    args = _args(inputs, judge_server, "--no-cache")
    args[args.index(inputs["a2"])] = str(tmp_path / "other.jsonl")
    assert review.main(args) == 3
    err = capsys.readouterr().err
    assert "none has a reference answer, a model answer and a context" in err and "API key" not in err
    assert sum(judge_server.count().values()) == 0


def test_original_rule_file_and_missing_rule(inputs, judge_server, tmp_path, capsys):
    rules = {f"llava_bench_{c}": {"role": "Assistant", "prompt": f"RULE-{c}"} for c in ("conv", "detail", "complex")}
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps(rules), encoding="utf-8")
    assert review.main(_args(inputs, judge_server, "--no-cache", "--rule", str(rule_file))) == 0
    assert all(c.endswith("[System]\nRULE-" + c.split("[System]\nRULE-")[1]) for c in judge_server.contents)
    assert any(c.endswith("[System]\nRULE-detail\n\n") for c in judge_server.contents)

    del rules["llava_bench_complex"]
    rule_file.write_text(json.dumps(rules), encoding="utf-8")
    assert review.main(_args(inputs, judge_server, "--no-cache", "--rule", str(rule_file))) == 2
    assert f"{inputs['q']}:3: no rule 'llava_bench_complex'" in capsys.readouterr().err
    # The original scripts' path: a file of LLaVA's repository, never in PALO's; said so, nothing asked.
    asked = len(judge_server.calls)
    missing = str(tmp_path / "palo" / "eval" / "table" / "rule.json")
    assert review.main(_args(inputs, judge_server, "--no-cache", "--rule", missing)) == 2
    err = capsys.readouterr().err
    assert f"error: {missing}: no such rule file" in err and "llava/eval/table/rule.json" in err
    assert len(judge_server.calls) == asked


def test_killed_run_resumes_without_redoing_finished_items(inputs, judge_server):
    # A forked child runs the CLI and is SIGKILLed while its third request hangs (fork, not a fresh interpreter,
    # only to skip the seconds of import time).
    judge_server.gate_question = "Q-complex"
    child = multiprocessing.get_context("fork").Process(
        target=review.main, args=(_args(inputs, judge_server, "--no-cache", "--parallel", "1"),), daemon=True
    )
    child.start()
    try:
        assert judge_server.reached.wait(timeout=60)
        # The third request is in flight; the second review is written by the main thread as its future completes,
        # which can trail the worker thread's next request by a moment: wait for it, then kill.
        deadline = time.time() + 30
        while _complete_lines(inputs["o"]) < 2 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    finally:
        if child.is_alive():
            child.kill()
    judge_server.gate_question = None
    judge_server.release.set()
    assert child.exitcode == -signal.SIGKILL
    done = _reviews(inputs["o"])
    assert [r["question_id"] for r in done] == [10, 11]  # what finished before the kill is on disk

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert judge_server.count() == {"Q-conv": 1, "Q-detail": 1, "Q-complex": 2, "Q-conv2": 1}
    final = _reviews(inputs["o"])
    assert [r["question_id"] for r in final] == [10, 11, 12, 13] and not any(r["failed"] for r in final)


def test_resume_judges_again_what_was_reviewed_for_other_answers_judge_or_question(inputs, judge_server, tmp_path):
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert all("request_key" in r for r in _reviews(inputs["o"]))

    # Every model answer replaced (new answer ids): all four judged again, and the new ids recorded.
    rows = [json.loads(line) for line in open(inputs["a2"], encoding="utf-8")]
    _write(tmp_path / "model.jsonl", [dict(r, answer_id=r["answer_id"] + "-v2") for r in rows])
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert sum(judge_server.count().values()) == 4
    assert {r["answer2_id"] for r in _reviews(inputs["o"])} == {f"m{i}-v2" for i in range(10, 14)}

    # Another judge: all judged again by it.
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "judge-y")) == 0
    assert sum(judge_server.count().values()) == 4
    # One question's text edited (same ids): only that one, through the request fingerprint.
    judge_server.reset_calls()
    questions = [json.loads(line) for line in open(inputs["q"], encoding="utf-8")]
    questions[1]["text"] = "Q-detail, reworded"
    _write(tmp_path / "q.jsonl", questions)
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "judge-y")) == 0
    assert judge_server.count() == {"Q-detail, reworded": 1}

    # Reviews of the original or an earlier version (no request_key) are compared by answer ids and judge; the
    # original's carry no judge_model and were made by gpt-4-0314.
    old = [{k: v for k, v in r.items() if k != "request_key"} for r in _reviews(inputs["o"])]
    _write(tmp_path / "reviews" / "reviews.jsonl", old)
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "judge-y")) == 0
    assert judge_server.count() == {}
    _write(tmp_path / "reviews" / "reviews.jsonl", [{k: v for k, v in r.items() if k != "judge_model"} for r in old])
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "gpt-4-0314")) == 0
    assert judge_server.count() == {}


def test_reviews_of_removed_questions_leave_the_scored_file(inputs, judge_server, tmp_path, capsys):
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    judged = _reviews(inputs["o"])
    questions = [json.loads(line) for line in open(inputs["q"], encoding="utf-8")]
    _write(tmp_path / "q.jsonl", [q for q in questions if q["question_id"] != 11])
    capsys.readouterr()
    judge_server.reset_calls()

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert judge_server.count() == {}
    kept = _reviews(inputs["o"])
    assert [r["question_id"] for r in kept] == [10, 12, 13] and [r["id"] for r in kept] == [1, 2, 3]
    assert _reviews(review.stale_path(inputs["o"])) == [dict(judged[1])]  # moved, not lost
    assert "1 of questions no longer in the question file" in capsys.readouterr().err


def test_a_run_killed_after_moving_stale_reviews_does_not_move_them_twice(inputs, judge_server, tmp_path, monkeypatch):
    """Reviews leaving the file are appended to .stale before the file is rewritten without them: a run killed between
    the two steps left them in both, and the next run appended them to .stale again (duplicate records)."""
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    judged = _reviews(inputs["o"])
    questions = [json.loads(line) for line in open(inputs["q"], encoding="utf-8")]
    _write(tmp_path / "q.jsonl", [q for q in questions if q["question_id"] != 11])

    def killed(*args, **kwargs):
        raise SystemExit("killed before the rewrite")

    with monkeypatch.context() as patch:
        patch.setattr(review, "write_jsonl_atomic", killed)
        with pytest.raises(SystemExit):
            review.main(_args(inputs, judge_server, "--no-cache"))
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert [r["question_id"] for r in _reviews(inputs["o"])] == [10, 12, 13]
    assert _reviews(review.stale_path(inputs["o"])) == [dict(judged[1])]  # once


def test_ctrl_c_cancels_unsent_requests_writes_replies_in_flight_and_compacts(inputs, judge_server, monkeypatch):
    """Ctrl-C (here: raised in the main thread while it writes the first review) used to leave the executor sending
    every queued request, and the replies that came after it unwritten."""
    judge_server.gate_question = "Q-detail"
    real = review.review_record
    calls = []

    def interrupted_once(*args):
        calls.append(args)
        if len(calls) == 1:
            assert judge_server.reached.wait(timeout=30)  # the second request is in flight ...
            threading.Timer(0.3, judge_server.release.set).start()  # ... and its reply comes after the Ctrl-C
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(review, "review_record", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        review.main(_args(inputs, judge_server, "--no-cache", "--parallel", "1"))
    assert judge_server.count() == {"Q-conv": 1, "Q-detail": 1}  # the two queued ones were never sent
    written = _reviews(inputs["o"])
    assert [(r["question_id"], r["id"]) for r in written] == [(10, 1), (11, 2)]  # both replies kept, compacted


def test_a_corrected_category_is_written_into_the_review_it_reuses(inputs, judge_server, tmp_path):
    """The three rubrics are one text, so a corrected category leaves the request as it was and its review is
    reused; the review kept its old category, and the summary filed the score under that one."""
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    questions = [json.loads(line) for line in open(inputs["q"], encoding="utf-8")]
    questions[3]["category"] = "complex"
    _write(tmp_path / "q.jsonl", questions)
    judge_server.reset_calls()

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert judge_server.count() == {}  # not part of the request: nothing to judge again
    assert [r["category"] for r in _reviews(inputs["o"])] == [
        "llava_bench_conv", "llava_bench_detail", "llava_bench_complex", "llava_bench_complex"]


@pytest.mark.parametrize("which, key", [("a1", "text"), ("a2", "text"), ("c", "caption")])
def test_an_answer_without_text_or_a_context_without_caption_is_refused_before_any_call(
        inputs, judge_server, tmp_path, capsys, which, key):
    """Such a line was judged as an empty answer (or context), and the score counted."""
    rows = [json.loads(line) for line in open(inputs[which], encoding="utf-8")]
    rows[1]["txt"] = rows[1].pop(key)  # a misspelt key
    _write(tmp_path / os.path.basename(inputs[which]), rows)

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 2
    assert f"error: {inputs[which]}:2: missing key(s) {key}" in capsys.readouterr().err
    assert sum(judge_server.count().values()) == 0 and not os.path.exists(inputs["o"])


def test_a_question_file_that_repeats_an_id_is_refused_before_any_call(inputs, judge_server, tmp_path, capsys):
    """Both questions were judged (paid), then both reviews lost: the reviews are kept by question_id."""
    questions = [json.loads(line) for line in open(inputs["q"], encoding="utf-8")]
    _write(tmp_path / "q.jsonl", [*questions, dict(questions[0], text="Q-again", category="detail")])

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 2
    assert f"error: {inputs['q']}:5: duplicate question_id 10 (first at {inputs['q']}:1)" in capsys.readouterr().err
    assert sum(judge_server.count().values()) == 0 and not os.path.exists(inputs["o"])
    # --skip-bad: reported and skipped, as answering skips it.
    assert review.main(_args(inputs, judge_server, "--no-cache", "--skip-bad")) == 0
    assert f"[skip] {inputs['q']}:5: duplicate question_id 10" in capsys.readouterr().err
    assert judge_server.count("Q-again") == 0
    assert [r["question_id"] for r in _reviews(inputs["o"])] == [10, 11, 12, 13]


def test_another_run_is_refused_while_the_reviews_file_is_rewritten(inputs, judge_server, monkeypatch, capsys):
    """The lock used to be let go before the file was rewritten (os.replace): a run that took it then appended its
    paid review to the file being replaced, and the review was lost."""
    judge_server.script("Q-complex", (500, "down"), (200, "7 8\nfine"))  # left for the second run to judge
    real = review.compact
    rewriting, may_rewrite = threading.Event(), threading.Event()

    def paused(*args, **kwargs):
        if threading.current_thread().name == "first":
            rewriting.set()
            assert may_rewrite.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(review, "compact", paused)
    args = _args(inputs, judge_server, "--no-cache", "--max-retries", "0")
    codes = {}
    runs = [threading.Thread(target=lambda name=name: codes.__setitem__(name, review.main(args)), name=name)
            for name in ("first", "second")]
    runs[0].start()
    try:
        assert rewriting.wait(timeout=60)
        judge_server.reset_calls()
        judge_server.gate_question = "Q-complex"  # unlocked, the second run's request waits here ...
        runs[1].start()
        deadline = time.time() + 60
        while runs[1].is_alive() and not judge_server.reached.is_set() and time.time() < deadline:
            time.sleep(0.01)
    finally:
        may_rewrite.set()  # ... while the first run rewrites the file
        runs[0].join(timeout=60)
        judge_server.release.set()
        if runs[1].is_alive():
            runs[1].join(timeout=60)
    assert codes == {"first": 0, "second": 2}
    assert "another process is writing this file" in capsys.readouterr().err
    assert judge_server.count() == {}
    assert [r["failed"] for r in _reviews(inputs["o"])] == [False, False, True, False]


def test_a_resumed_run_reads_its_earlier_replies_again(inputs, judge_server, capsys):
    """Reviews an earlier version scored by misreading a count ('lists 3 reasons' as a 3) were kept as they were:
    now a reply that still reads as two scores gets them (no call), and one that does not is judged again."""
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    reviews = _reviews(inputs["o"])
    reviews[0].update(content="Assistant 1: 8\nAssistant 2 lists 3 reasons and gets 9.", tuple=[8.0, 3.0])
    reviews[1].update(content="7 8\nAssistant 2 names 2 dogs.", tuple=[2.0, 2.0])
    original = {key: value for key, value in reviews[2].items() if key != "request_key"}  # the original's review
    original.update(content="7 8\nAssistant 1 lists 3 dogs.", tuple=[7.0, 3.0])
    reviews[2] = original
    _write(pathlib.Path(inputs["o"]), reviews)
    judge_server.reset_calls()
    judge_server.script("Q-conv", (200, "6 9\nfine"))

    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    err = capsys.readouterr().err
    assert "1 review(s) in" in err and "read their reply's scores again" in err
    assert judge_server.count() == {"Q-conv": 1}  # only the reply that reads as no scores now
    kept = _reviews(inputs["o"])
    assert [r["tuple"] for r in kept[:3]] == [[6.0, 9.0], [7.0, 8.0], [7.0, 3.0]]  # the original's rule stands
    assert [r["question_id"] for r in kept] == [10, 11, 12, 13]


def _item(qid: int, answer2_id: str, request_key: str | None = "key") -> review.Item:
    return review.Item(question=Record({"question_id": qid, "category": "conv"}, "q.jsonl", qid),
                       category="conv", answer1_id=f"r{qid}", answer2_id=answer2_id, content="...",
                       request_key=request_key)


def test_compaction_moves_successful_reviews_of_another_request_to_stale(tmp_path, capsys):
    """A run stopped before judging a question again (its model answers were replaced) left the review of the old
    answer as the question's latest: compaction moves it to .stale, so it is never counted as the new answer's."""
    path = str(tmp_path / "reviews.jsonl")
    kept = {"id": 7, "question_id": 10, "answer1_id": "r10", "answer2_id": "m10", "category": "llava_bench_conv",
            "content": "8 9", "tuple": [8, 9], "judge_model": "judge-x", "failed": False, "request_key": "key"}
    other_answer = dict(kept, question_id=11, answer1_id="r11", answer2_id="m11-old")
    other_request = dict(kept, question_id=12, answer1_id="r12", answer2_id="m12", request_key="old-key")
    _write(tmp_path / "reviews.jsonl", [kept, other_answer, other_request])
    items = [_item(10, "m10"), _item(11, "m11"), _item(12, "m12")]

    assert review.compact(path, items, "judge-x") == [dict(kept, id=1)]
    assert _reviews(path) == [dict(kept, id=1)]
    assert _reviews(review.stale_path(path)) == [other_answer, other_request]
    assert "2 made for other answers" in capsys.readouterr().err


def test_a_review_without_judge_model_is_the_original_judges_and_is_redone_for_another(inputs, judge_server,
                                                                                          tmp_path):
    """The original wrote no judge_model (it always asked gpt-4-0314): resumed with another judge, its reviews are
    judged again, not taken as that judge's."""
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    original = [{k: v for k, v in r.items() if k not in ("judge_model", "request_key")} for r in _reviews(inputs["o"])]
    _write(tmp_path / "reviews" / "reviews.jsonl", original)
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0  # judge-x
    assert sum(judge_server.count().values()) == 4
    assert all(r["judge_model"] == "judge-x" for r in _reviews(inputs["o"]))


def test_an_original_format_failure_is_not_a_success_and_is_judged_again(inputs, judge_server, tmp_path):
    """The original marked a failed judgment only by the scores [-1, -1] (no "failed" key): it is no score, and a
    resumed run judges the question again."""
    assert not review.is_success({"tuple": [-1, -1]}) and not review.is_success({"score": [-1, 8]})
    assert review.is_success({"tuple": [0, 8]}) and review.is_success({"score": [7, 8]})
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "gpt-4-0314")) == 0
    original = [{k: v for k, v in r.items() if k not in ("judge_model", "request_key", "failed")}
                for r in _reviews(inputs["o"])]
    original[1]["tuple"] = [-1, -1]
    _write(tmp_path / "reviews" / "reviews.jsonl", original)
    judge_server.reset_calls()
    assert review.main(_args(inputs, judge_server, "--no-cache", "--judge-model", "gpt-4-0314")) == 0
    assert judge_server.count() == {"Q-detail": 1}
    assert [r["tuple"][0] >= 0 for r in _reviews(inputs["o"])] == [True] * 4


def test_a_full_disk_is_one_line_and_keeps_the_reviews_written(inputs, judge_server, monkeypatch, capsys):
    """A review that could not be appended (ENOSPC) ended the run in a traceback; the paid reviews before it must stay
    and a rerun with room judge only the rest. The final rewrite failing the same way keeps the appended file."""
    import errno

    from palo import jsonl

    real_write, real_rewrite = jsonl.JsonlAppender.write, review.write_jsonl_atomic
    writes = []

    def fills_up(self, record):
        writes.append(record)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, record)

    monkeypatch.setattr(jsonl.JsonlAppender, "write", fills_up)
    assert review.main(_args(inputs, judge_server, "--no-cache", "--parallel", "1")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write the reviews file {inputs['o']}: No space left on device; the 2 review(s)" in err
    assert "Traceback" not in err
    assert [r["question_id"] for r in _reviews(inputs["o"])] == [w["question_id"] for w in writes[:2]]

    def full(path, records):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jsonl.JsonlAppender, "write", real_write)
    monkeypatch.setattr(review, "write_jsonl_atomic", full)
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 2
    assert f"error: cannot rewrite the reviews file {inputs['o']}: No space left on device" in capsys.readouterr().err
    assert len(_reviews(inputs["o"])) == 4
    asked = judge_server.count()
    assert (asked["Q-conv"], asked["Q-detail"]) == (1, 1)  # the reviews kept were not asked for again

    monkeypatch.setattr(review, "write_jsonl_atomic", real_rewrite)
    assert review.main(_args(inputs, judge_server, "--no-cache")) == 0
    assert judge_server.count() == asked  # nothing asked again: the appended reviews are compacted
    assert [r["question_id"] for r in _reviews(inputs["o"])] == [10, 11, 12, 13]
