"""``palo-data apply-review`` on small hand-made sets (no translation server): what a correction may not do, which
turns must be corrected before a sample is cleared, and which files ``--output`` may not replace."""

from __future__ import annotations

import json

from palo.data.cli import main


def _human(value: str) -> dict:
    return {"from": "human", "value": value}


def _gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _entry(index: int, turn: int, source: str, corrected: str | None) -> dict:
    return {"language": "arabic", "index": index, "turn": turn, "from": "gpt", "source": source,
            "translation": source, "problems": ["not written in arabic script"], "corrected": corrected}


# One image sample whose two answers translate rejected (still English).
TWO_REJECTED = {
    "id": "a", "image": "a.jpg",
    "conversations": [_human("<image>\nWhat is this?"), _gpt("A dog."), _human("What colour?"), _gpt("Brown.")],
    "arabic_conversation": [_human("<image>\nما هذا؟"), _gpt("A dog."), _human("ما اللون؟"), _gpt("Brown.")],
    "corrupt": True,
}


def test_a_correction_that_adds_an_image_placeholder_is_refused(tmp_path, capsys):
    """A stray <image> in a corrected answer was accepted and the sample cleared, so training (and validate) then
    refused it: an image sample needs the placeholder in exactly one human turn, a text-only sample in none."""
    data = _write_json(tmp_path / "arabic.json", [
        {"id": "a", "image": "a.jpg", "conversations": [_human("<image>\nWhat is this?"), _gpt("A dog.")],
         "arabic_conversation": [_human("<image>\nما هذا؟"), _gpt("A dog.")], "corrupt": True},
        {"id": "b", "conversations": [_human("Name a colour."), _gpt("Blue.")],
         "arabic_conversation": [_human("سمّ لونًا."), _gpt("Blue.")], "corrupt": True},
    ])
    before = open(data, "rb").read()
    for index, source, corrected in ((0, "A dog.", "<image> كلب."), (1, "Blue.", "<image>\nأزرق.")):
        review = _write_jsonl(tmp_path / "arabic.review.jsonl", [_entry(index, 1, source, corrected)])
        assert main(["apply-review", "--data_path", data, "--review", review]) == 2
        err = capsys.readouterr().err
        assert f"sample {index} turn 1: the correction adds <image>" in err and "Traceback" not in err
        assert open(data, "rb").read() == before


def test_a_partial_review_file_clears_a_sample_only_once_the_log_s_rejected_turns_are_all_corrected(tmp_path,
                                                                                                   capsys):
    """With a review file holding only one of a sample's two rejected turns (one reviewer's share), the sample was
    cleared although its other answer was still the rejected English one."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    both = [_entry(0, 1, "A dog.", None), _entry(0, 3, "Brown.", None)]
    _write_jsonl(tmp_path / "arabic.progress.jsonl",
                 [{"index": 0, "hash": "h", "sample": TWO_REJECTED, "review": both}])
    first = _write_jsonl(tmp_path / "part1.jsonl", [_entry(0, 1, "A dog.", "كلب.")])
    assert main(["apply-review", "--data_path", data, "--review", first]) == 0
    assert json.loads(capsys.readouterr().out)["samples_still_corrupt"] == 1
    sample = json.load(open(data, encoding="utf-8"))[0]
    assert sample["corrupt"] is True and sample["arabic_conversation"][1]["value"] == "كلب."
    # The log now lists only the turn still to correct, so the second reviewer's share finishes the sample.
    last = json.loads(open(tmp_path / "arabic.progress.jsonl", encoding="utf-8").read().splitlines()[-1])
    assert [e["turn"] for e in last["review"]] == [3]
    second = _write_jsonl(tmp_path / "part2.jsonl", [_entry(0, 3, "Brown.", "بني.")])
    assert main(["apply-review", "--data_path", data, "--review", second]) == 0
    assert json.loads(capsys.readouterr().out)["samples_cleared"] == 1
    sample = json.load(open(data, encoding="utf-8"))[0]
    assert sample["corrupt"] is False and sample["arabic_conversation"][3]["value"] == "بني."


def test_without_a_log_a_turn_the_review_file_leaves_out_is_checked_again(tmp_path, capsys):
    """Without the progress log only the review lines said which turns were rejected, so a partial file cleared
    the sample with turn 3 still in English."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    review = _write_jsonl(tmp_path / "part1.jsonl", [_entry(0, 1, "A dog.", "كلب.")])
    assert main(["apply-review", "--data_path", data, "--review", review]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["samples_cleared"] == 0 and "no translate progress log" in out.err
    assert json.load(open(data, encoding="utf-8"))[0]["corrupt"] is True
    full = _write_jsonl(tmp_path / "full.jsonl", [_entry(0, 1, "A dog.", "كلب."), _entry(0, 3, "Brown.", "بني.")])
    assert main(["apply-review", "--data_path", data, "--review", full]) == 0
    assert json.load(open(data, encoding="utf-8"))[0]["corrupt"] is False


def test_a_sample_the_english_input_flagged_corrupt_stays_corrupt_once_its_turns_are_corrected(tmp_path, capsys):
    """The sample was cleared (corrupt: false) although its English was flagged corrupt: a translate rerun then wrote
    it corrupt again, and its report counted it as good."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    both = [_entry(0, 1, "A dog.", None), _entry(0, 3, "Brown.", None)]
    log = _write_jsonl(tmp_path / "arabic.progress.jsonl",
                       [{"index": 0, "hash": "h", "sample": TWO_REJECTED, "review": both, "input_corrupt": True}])
    review = _write_jsonl(tmp_path / "r.jsonl", [_entry(0, 1, "A dog.", "كلب."), _entry(0, 3, "Brown.", "بني.")])
    assert main(["apply-review", "--data_path", data, "--review", review]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert (report["corrected_turns"], report["samples_cleared"], report["samples_flagged_in_input"]) == (2, 0, 1)
    assert "the English input flagged them corrupt itself" in out.err
    sample = json.load(open(data, encoding="utf-8"))[0]
    assert sample["corrupt"] is True and sample["arabic_conversation"][3]["value"] == "بني."
    # The log's new record says so too, for a translate rerun's count and the next review.
    last = json.loads(open(log, encoding="utf-8").read().splitlines()[-1])
    assert last["sample"]["corrupt"] is True and last["review"] == [] and last["input_corrupt"] is True


def test_a_log_older_than_input_corrupt_still_tells_a_flagged_input_by_a_corrupt_record_without_rejections(
        tmp_path, capsys):
    """A record without rejected turns is corrupt only for its input's flag: a reviewer's correction of one of its
    turns cleared it."""
    flagged = dict(TWO_REJECTED, arabic_conversation=[_human("<image>\nما هذا؟"), _gpt("كلب."), _human("ما اللون؟"),
                                                      _gpt("Brown.")])
    data = _write_json(tmp_path / "arabic.json", [flagged])
    _write_jsonl(tmp_path / "arabic.progress.jsonl", [{"index": 0, "hash": "h", "sample": flagged, "review": []}])
    review = _write_jsonl(tmp_path / "r.jsonl", [_entry(0, 3, "Brown.", "بني.")])
    assert main(["apply-review", "--data_path", data, "--review", review]) == 0
    assert json.loads(capsys.readouterr().out)["samples_flagged_in_input"] == 1
    assert json.load(open(data, encoding="utf-8"))[0]["corrupt"] is True


def test_review_shares_written_to_another_output_build_on_each_other_through_the_log(tmp_path, capsys):
    """Two reviewers' shares applied with --output beside a --data_path left as translate wrote it: the first
    correction reached the log only, so the second apply took the turn as done from the log, kept its rejected
    text from --data_path and cleared the sample."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    both = [_entry(0, 1, "A dog.", None), _entry(0, 3, "Brown.", None)]
    log = _write_jsonl(tmp_path / "arabic.progress.jsonl",
                       [{"index": 0, "hash": "h", "sample": TWO_REJECTED, "review": both}])
    first = _write_jsonl(tmp_path / "part1.jsonl", [_entry(0, 1, "A dog.", "كلب.")])
    second = _write_jsonl(tmp_path / "part2.jsonl", [_entry(0, 3, "Brown.", "بني.")])
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert main(["apply-review", "--data_path", data, "--review", first, "--output", a]) == 0
    assert main(["apply-review", "--data_path", data, "--review", second, "--output", b]) == 0
    capsys.readouterr()
    sample = json.load(open(b, encoding="utf-8"))[0]
    assert [t["value"] for t in sample["arabic_conversation"]] == ["<image>\nما هذا؟", "كلب.", "ما اللون؟", "بني."]
    assert sample["corrupt"] is False
    last = json.loads(open(log, encoding="utf-8").read().splitlines()[-1])
    assert last["sample"] == sample and last["review"] == []


def test_without_a_log_a_number_restored_next_to_a_cjk_or_bengali_letter_passes_the_recheck(tmp_path, capsys):
    """The re-check masked the stored translation with the number pattern again, which misses a number glued to a
    letter ('有3只猫', '৩টি'): 'placeholders missing', and the sample stayed corrupt with every rejected turn
    corrected."""
    for language, question, answer in (
            ("chinese", "桌子上有几只猫？", "桌子上有3只猫，13只狗。"),
            ("japanese", "テーブルの上に猫は何匹いますか？", "テーブルの上に猫が3匹、犬が13匹います。"),
            ("bengali", "টেবিলে কয়টি বিড়াল আছে?", "টেবিলে 3টি বিড়াল এবং 13টি কুকুর আছে।")):
        sample = {"id": "x", "image": "x.jpg",
                  "conversations": [_human("<image>\nHow many cats are on the table?"),
                                    _gpt("There are 3 cats and 13 dogs on the table.")],
                  f"{language}_conversation": [_human("<image>\nHow many cats are on the table?"), _gpt(answer)],
                  "corrupt": True}
        data = _write_json(tmp_path / f"{language}.json", [sample])
        entry = {**_entry(0, 0, "<image>\nHow many cats are on the table?", question), "language": language,
                 "from": "human"}
        review = _write_jsonl(tmp_path / f"{language}.review.jsonl", [entry])
        assert main(["apply-review", "--data_path", data, "--review", review]) == 0
        assert json.loads(capsys.readouterr().out)["samples_cleared"] == 1, language
        assert json.load(open(data, encoding="utf-8"))[0]["corrupt"] is False
    # A number the translation really lost is still reported.
    from palo.data.review import _recheck

    sample["bengali_conversation"][1]["value"] = "টেবিলে 3টি বিড়াল এবং কুকুর আছে।"
    assert _recheck(sample, 1, "bengali") == ["placeholders missing: [[2]]"]


def test_output_may_not_replace_the_review_file_or_the_progress_log(tmp_path, capsys):
    """--output naming the --review (or --progress) file replaced the reviewer's JSONL (or the translate resume
    log) with the JSON array, and the command exited 0."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    review = _write_jsonl(tmp_path / "arabic.review.jsonl", [_entry(0, 1, "A dog.", "كلب.")])
    log = _write_jsonl(tmp_path / "log.jsonl", [])
    kept = {path: open(path, "rb").read() for path in (data, review, log)}
    assert main(["apply-review", "--data_path", data, "--review", review, "--output", review]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["apply-review", "--data_path", data, "--review", review, "--progress", log, "--output", log]) == 2
    assert "is also the --progress file" in capsys.readouterr().err
    assert {path: open(path, "rb").read() for path in kept} == kept


def test_apply_review_removes_the_temp_file_a_killed_run_left(tmp_path, capsys):
    """A kill -9 mid-write left a full-size <output>.XXXX.tmp beside the set that no later run removed."""
    import subprocess
    import sys

    from palo.jsonl import temp_prefix

    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{temp_prefix(data)}{int(dead.stdout)}-abc123.tmp"
    orphan.write_text("[half a set", encoding="utf-8")
    review = _write_jsonl(tmp_path / "r.jsonl", [_entry(0, 1, "A dog.", "كلب."), _entry(0, 3, "Brown.", "بني.")])
    assert main(["apply-review", "--data_path", data, "--review", review]) == 0
    assert not orphan.exists() and f"[cleanup] removed {orphan}" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_output_that_cannot_be_a_file_is_one_error_line_before_the_log_changes(tmp_path, capsys, monkeypatch):
    """--output naming an existing folder died with an IsADirectoryError traceback, after the corrections had been
    appended to the translate log."""
    data = _write_json(tmp_path / "arabic.json", [TWO_REJECTED])
    both = [_entry(0, 1, "A dog.", None), _entry(0, 3, "Brown.", None)]
    log = _write_jsonl(tmp_path / "arabic.progress.jsonl",
                       [{"index": 0, "hash": "h", "sample": TWO_REJECTED, "review": both}])
    review = _write_jsonl(tmp_path / "r.jsonl", [_entry(0, 1, "A dog.", "كلب."), _entry(0, 3, "Brown.", "بني.")])
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("", encoding="utf-8")
    kept = {path: open(path, "rb").read() for path in (data, review, log)}
    for output, says in ((tmp_path / "adir", "a folder, not a file"),
                         (tmp_path / "afile" / "sub" / "out.json", f"{tmp_path / 'afile'} is a file, not a folder")):
        assert main(["apply-review", "--data_path", data, "--review", review, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot write --output {output}: {says}" in err and "Traceback" not in err, err
        assert {path: open(path, "rb").read() for path in kept} == kept
    # A failure only the write meets is one line too, and the corrections wait in the log for the rerun.
    import errno

    from palo.data import review as review_module

    def full_disk(path, items):
        raise OSError(errno.ENOSPC, "No space left on device")

    output = tmp_path / "new" / "arabic.json"
    with monkeypatch.context() as patch:
        patch.setattr(review_module, "atomic_write_json", full_disk)
        assert main(["apply-review", "--data_path", data, "--review", review, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write --output {output}: No space left on device; the corrections are kept in {log}" in err
    assert "Traceback" not in err
    assert main(["apply-review", "--data_path", data, "--review", review, "--output", str(output)]) == 0
    capsys.readouterr()
    assert json.load(open(output, encoding="utf-8"))[0]["corrupt"] is False
