"""Sharded answering: model_vqa chunks merged equal the unsharded file; the eval script on a fake GPU list."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from palo.eval import model_vqa, run_bench, shards
from palo.jsonl import JsonlAppender, JsonlError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "eval", "eval_all_languages.sh")
SAME = ("question_id", "prompt", "text", "model_id")  # answer_id is a fresh uuid per answer


def _read(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _key(records: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in SAME) for r in records]


@pytest.fixture
def questions(bench, tmp_path) -> str:
    """The English and Arabic questions in one file, 8 distinct ids."""
    rows = []
    for language, sub, name in (("english", "", "questions.jsonl"), ("arabic", "corrected", "question.jsonl")):
        for row in _read(os.path.join(bench, language, sub, name)):
            row["question_id"] = f"{language}-{row['question_id']}"
            rows.append(row)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _vqa(world, bench, questions, answers, *extra) -> int:
    return model_vqa.main([
        "--model-path", world.full_dir, "--image-folder", os.path.join(bench, "images"),
        "--question-file", questions, "--answers-file", str(answers), "--conv-mode", "vicuna_v1",
        "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "2", *extra,
    ])


def test_three_chunks_merged_equal_the_unsharded_answers(world, bench, questions, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert _vqa(world, bench, questions, whole) == 0
    parts = [tmp_path / f"part{k}.jsonl" for k in range(3)]
    for k, part in enumerate(parts):
        assert _vqa(world, bench, questions, part, "--num-chunks", "3", "--chunk-idx", str(k)) == 0
    order = [json.loads(line)["question_id"] for line in open(questions, encoding="utf-8")]
    # LLaVA's split: consecutive slices of ceil(8 / 3) = 3 questions, so 3, 3, 2, disjoint and covering.
    assert [[r["question_id"] for r in _read(p)] for p in parts] == [order[0:3], order[3:6], order[6:8]]

    merged = tmp_path / "merged.jsonl"
    # Given out of order: the merge orders by the question file, not by the order of the shards.
    assert shards.main(["merge", "--question-file", questions, "--answers-file", str(merged),
                        str(parts[2]), str(parts[0]), str(parts[1])]) == 0
    assert _key(_read(merged)) == _key(_read(whole))
    assert any(r["text"] for r in _read(whole))
    assert not any(p.exists() for p in parts)  # taken into the merged file

    # Bad input is refused with the file and line named, and the merged file is left as it was.
    before = merged.read_text(encoding="utf-8")
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"question_id": "elsewhere-7", "text": "x"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert shards.main(["merge", "--question-file", questions, "--answers-file", str(merged), str(stray)]) == 2
    assert f"{stray}:1: question_id 'elsewhere-7' is not in {questions}" in capsys.readouterr().err
    assert merged.read_text(encoding="utf-8") == before and stray.exists()
    assert shards.main(["merge", "--question-file", questions, "--answers-file", str(merged),
                        str(tmp_path / "absent.jsonl")]) == 2
    # An incomplete merge says how many are missing and exits 1.
    partial = tmp_path / "partial.jsonl"
    only = tmp_path / "only.jsonl"
    only.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _read(whole)[:5]), encoding="utf-8")
    assert shards.main(["merge", "--question-file", questions, "--answers-file", str(partial), str(only)]) == 1
    assert "5 answers, 3 question(s) unanswered" in capsys.readouterr().err


def test_a_merge_into_its_own_input_is_refused_and_deletes_nothing(tmp_path, capsys):
    """Merging into a shard would delete the file just written; into the question file, read questions as answers."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in range(4)))
    shard_dir = tmp_path / "sh"
    shard_dir.mkdir()
    parts = [shard_dir / "s0.jsonl", shard_dir / "s1.jsonl"]
    for k, part in enumerate(parts):
        part.write_text("".join(json.dumps({"question_id": i, "text": f"a{i}"}) + "\n" for i in (2 * k, 2 * k + 1)))
    before = [p.read_text() for p in parts]
    for out in (parts[0], str(shard_dir / ".." / "sh" / "s1.jsonl"), questions):
        assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(out),
                            *map(str, parts)]) == 2
        assert "merge into a new file" in capsys.readouterr().err
    assert [p.read_text() for p in parts] == before
    assert questions.read_text().count("question_id") == 4
    link = tmp_path / "link.jsonl"
    link.symlink_to(parts[1])
    with pytest.raises(ValueError, match="is also one of the shards"):
        shards.merge_answers(str(questions), [str(p) for p in parts], str(link))
    merged = tmp_path / "merged.jsonl"
    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(merged),
                        *map(str, parts)]) == 0
    assert [r["text"] for r in _read(merged)] == ["a0", "a1", "a2", "a3"]


@pytest.mark.parametrize("busy", ["shard", "answers"])
def test_a_file_another_process_still_writes_is_not_merged_replaced_or_deleted(tmp_path, capsys, busy):
    """A second sharded bench merged (and deleted) the first run's live shards, and a merge replaced the answers file
    of a model_vqa run in progress: their later answers, reported written, were lost. (A lock is held per open file,
    so an appender opened here stands for another process's.)"""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in range(4)))
    answers, shard = tmp_path / "answers.jsonl", tmp_path / "sh" / "s0.jsonl"
    shard.parent.mkdir()
    shard.write_text(json.dumps({"question_id": 0, "text": "a0"}) + "\n")
    if busy == "answers":
        answers.write_text(json.dumps({"question_id": 1, "text": "a1"}) + "\n")
    with JsonlAppender(str(shard if busy == "shard" else answers)) as writer:
        assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(answers),
                            str(shard)]) == 2
        assert "another process is writing this file" in capsys.readouterr().err
        writer.write({"question_id": 2, "text": "a2"})  # the writer goes on; its record must reach the merge
    assert shard.exists() and answers.exists() == (busy == "answers")  # nothing deleted, no empty file made
    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(answers), str(shard)]) == 1
    expected = ["a0", "a1", "a2"] if busy == "answers" else ["a0", "a2"]
    assert [r["text"] for r in _read(answers)] == expected and not shard.exists()


def test_a_damaged_line_of_the_merged_file_is_dropped_and_its_new_answer_taken(tmp_path, capsys):
    """A rerun's shards read the merged file as done (skipping a damaged line, so they answer that question again);
    the merge read it strictly and failed at every rerun."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in range(3)))
    merged = tmp_path / "answers.jsonl"
    merged.write_text(json.dumps({"question_id": 0, "text": "old0"}) + '\n{"question_id": 1, "te\n'
                      + json.dumps({"question_id": 2, "text": "old2"}) + "\n")
    assert model_vqa.answered_ids(str(merged)) == {"0", "2"}  # what a shard takes as done
    shard = tmp_path / "sh" / "s0.jsonl"
    shard.parent.mkdir()
    shard.write_text(json.dumps({"question_id": 1, "text": "new1"}) + "\n")
    capsys.readouterr()
    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(merged), str(shard)]) == 0
    assert f"[skip] {merged}:2: not valid JSON" in capsys.readouterr().err
    assert [r["text"] for r in _read(merged)] == ["old0", "new1", "old2"]
    bad_shard = tmp_path / "sh" / "s1.jsonl"
    bad_shard.parent.mkdir(exist_ok=True)  # the merge removed the shards' emptied folder
    bad_shard.write_text('{"question_id": 1, "te\n' + json.dumps({"question_id": 2, "text": "x"}) + "\n")
    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(merged),
                        str(bad_shard)]) == 2  # a shard's own damage is its rerun's to remove
    assert f"{bad_shard}:1: not valid JSON" in capsys.readouterr().err


def test_gpu_lists():
    assert shards.parse_gpu_list("0,1 2") == ["0", "1", "2"]
    assert shards.parse_gpu_list("GPU-a1,GPU-b2") == ["GPU-a1", "GPU-b2"]
    with pytest.raises(ValueError, match="listed twice: 1"):
        shards.parse_gpu_list("0,1,1")
    assert shards.resolve_gpus(None, None) == []
    assert shards.resolve_gpus("3,5", "cpu") == ["3", "5"]  # an explicit list is obeyed
    # auto: a chosen device means one process; on this CPU machine auto finds no GPU at all.
    assert shards.resolve_gpus("auto", "cuda:1", {"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert shards.resolve_gpus("auto", "cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert shards.shard_path("/o/tiny_English.jsonl", 2, 4) == "/o/shards/tiny_English.2-of-4.jsonl"


def _script(world, bench, out, server, gpus: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHON=sys.executable, MULTILINGUAL_LLAVA_BENCH_PATH=bench, PALO_EVAL_OUTPUT_DIR=str(out),
        OPENAI_BASE_URL=server.base_url, PALO_JUDGE_MODEL="local-judge", PALO_JUDGE_RETRY_DELAY="0.01",
        PALO_EVAL_DEVICE="cpu", PALO_EVAL_MAX_NEW_TOKENS="4", PALO_EVAL_BATCH_SIZE="2", HF_HUB_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost", PALO_EVAL_GPUS=gpus,
    )
    return subprocess.run(["bash", SCRIPT, world.full_dir, "tiny", "sk-local"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


@pytest.mark.slow  # three shard processes, twice (~25 s on 2 cores)
def test_script_answers_one_shard_per_gpu_merges_judges_once_and_resumes(world, bench, judge_server, tmp_path):
    reference = tmp_path / "reference"
    assert run_bench.main([
        "--model-path", world.full_dir, "--bench", bench, "--name", "tiny", "--output-dir", str(reference),
        "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "2", "--judge-base-url", judge_server.base_url,
    ]) == 0
    judge_server.reset_calls()

    out = tmp_path / "sharded"
    result = _script(world, bench, out, judge_server, "0,1,2")  # a fake GPU list: on CPU the model ignores it
    assert result.returncode == 0, result.stderr[-3000:]
    for k in range(3):  # each shard process ran with its own GPU
        assert f"[shard {k}/3] answering with CUDA_VISIBLE_DEVICES={k}" in result.stderr
    languages = ("English", "Chinese", "Arabic")
    for lang in languages:
        assert _key(_read(out / f"tiny_{lang}.jsonl")) == _key(_read(reference / f"tiny_{lang}.jsonl")), lang
    assert not (out / "shards").exists()
    counts = judge_server.count()
    assert sum(counts.values()) == 11 and set(counts.values()) == {1}  # 4 + 4 + 3 questions, each judged once
    assert (out / "tiny_summary.md").read_text(encoding="utf-8") == \
        (reference / "tiny_summary.md").read_text(encoding="utf-8")

    # Resume per shard: English lost its last two answers; Chinese was never merged, and a killed run left
    # shard 0's answer to question 0 (marked, so we can see it is kept, not redone).
    english = _read(out / "tiny_English.jsonl")
    (out / "tiny_English.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in english[:2]),
                                            encoding="utf-8")
    chinese = _read(out / "tiny_Chinese.jsonl")
    arabic = _read(out / "tiny_Arabic.jsonl")
    os.remove(out / "tiny_Chinese.jsonl")
    os.makedirs(out / "shards")
    kept = dict(chinese[0], answer_id="kept-by-shard-0")
    (out / "shards" / "tiny_Chinese.0-of-3.jsonl").write_text(json.dumps(kept, ensure_ascii=False) + "\n",
                                                            encoding="utf-8")
    result = _script(world, bench, out, judge_server, "0 1 2")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_en, resumed_zh = _read(out / "tiny_English.jsonl"), _read(out / "tiny_Chinese.jsonl")
    assert _key(resumed_en) == _key(english) and _key(resumed_zh) == _key(chinese)
    assert [r["answer_id"] for r in resumed_en[:2]] == [r["answer_id"] for r in english[:2]]
    assert resumed_en[2]["answer_id"] != english[2]["answer_id"]  # really answered again
    assert resumed_zh[0]["answer_id"] == "kept-by-shard-0"
    assert _read(out / "tiny_Arabic.jsonl") == arabic  # complete: not touched


def test_a_question_file_that_repeats_an_id_is_refused_as_answering_refuses_it(tmp_path):
    """The merge wrote one answer line per repeat of a question_id."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in (1, 2, 1)))
    shard = tmp_path / "s0.jsonl"
    shard.write_text("".join(json.dumps({"question_id": i, "text": f"a{i}"}) + "\n" for i in (1, 2)))
    merged = tmp_path / "merged.jsonl"
    with pytest.raises(JsonlError, match=r"q.jsonl:3: duplicate question_id 1 \(first at .*q.jsonl:1\)"):
        shards.merge_answers(str(questions), [str(shard)], str(merged))
    with pytest.raises(JsonlError, match="q.jsonl:3: duplicate question_id 1"):
        model_vqa.load_questions(str(questions))  # the same file, the same refusal
    assert not merged.exists() and shard.exists()


def test_a_sharded_run_checks_the_answers_it_resumes_once_before_the_shards_start(tmp_path, monkeypatch, capsys):
    """Each shard refused another checkpoint's answers in the merged file, but the merge and the judging of that
    file went on; here the parent refuses the language (or, with --overwrite, removes them) before any shard."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"q{i}"}) + "\n" for i in range(4)))
    args = run_bench.build_parser().parse_args([
        "--model-path", str(tmp_path / "ckpt_b"), "--images", str(tmp_path), "--questions", str(questions),
        "--answers", str(questions), "--context", str(questions), "--output-dir", str(tmp_path / "out"),
        "--output-file", "m", "--conv-mode", "vicuna_v1", "--max-new-tokens", "4",
    ])
    tasks, _ = run_bench.make_tasks(args)
    merged = tasks[0].answers_out
    os.makedirs(os.path.dirname(shards.shard_path(merged, 1, 2)))
    for path, model_ids in ((merged, {0: "ckpt_a", 1: "ckpt_b"}), (shards.shard_path(merged, 1, 2), {2: "ckpt_a"})):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"question_id": i, "prompt": f"q{i}", "text": "a", "answer_id": f"{m}-{i}",
                                     "model_id": m, "metadata": {}}) + "\n" for i, m in model_ids.items())
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, env: started.append(argv) or argparse.Namespace(
        wait=lambda: 0))

    assert run_bench.answer_sharded([], args, tasks, ["0", "1"]) == ["m"]
    assert f"error: {merged} holds 1 answer(s) this run would not give (model_id 'ckpt_a'" in capsys.readouterr().err
    assert [r["answer_id"] for r in _read(merged)] == ["ckpt_a-0", "ckpt_b-1"]  # neither changed nor merged

    args.overwrite = True
    assert run_bench.answer_sharded([], args, tasks, ["0", "1"]) == ["m"]  # the (stand-in) shards answered nothing
    assert [r["answer_id"] for r in _read(merged)] == ["ckpt_b-1"]  # the shards answer 0 and 2 again
    assert len(started) == 4


def test_help_lists_merge_and_names_the_typed_command(capsys):
    """``palo eval shards --help`` printed one usage line to stderr and exited 2 (every other verb shows its help)."""
    from palo import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "shards", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: palo eval shards") and "merge" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "shards", "merge", "--help"])
    assert exit_info.value.code == 0 and "--question-file" in capsys.readouterr().out


def test_answers_of_the_merged_file_to_removed_questions_are_kept_not_an_error(tmp_path, capsys):
    """A corrected bench dropped question 3: the merged file's answer to it failed every merge (so every rerun),
    though answering and judging pass over it. It is kept, at the end. A shard's answer to it stays an error (a shard
    of another run)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in range(3)))
    merged = tmp_path / "answers.jsonl"
    merged.write_text("".join(json.dumps({"question_id": i, "text": f"old{i}"}) + "\n" for i in (0, 3)))
    shard = tmp_path / "sh" / "s0.jsonl"
    shard.parent.mkdir()
    shard.write_text("".join(json.dumps({"question_id": i, "text": f"new{i}"}) + "\n" for i in (1, 2)))

    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(merged), str(shard)]) == 0
    assert (f"[merge] {merged}: kept 1 answer(s) to question(s) no longer in {questions} at its end (question_id 3)"
            in capsys.readouterr().err)
    assert [r["text"] for r in _read(merged)] == ["old0", "new1", "new2", "old3"] and not shard.exists()
    shard.parent.mkdir()
    shard.write_text(json.dumps({"question_id": 3, "text": "new3"}) + "\n")
    assert shards.main(["merge", "--question-file", str(questions), "--answers-file", str(merged), str(shard)]) == 2
    assert f"{shard}:1: question_id 3 is not in {questions}" in capsys.readouterr().err
    assert shard.exists()


def test_shard_files_of_finds_every_count_of_shards_and_only_this_files(tmp_path):
    merged = str(tmp_path / "out" / "m_English.jsonl")
    folder = tmp_path / "out" / "shards"
    assert shards.shard_files_of(merged) == []  # no folder yet
    os.makedirs(folder)
    for name in ("m_English.1-of-3.jsonl", "m_English.0-of-2.jsonl", "m_English.10-of-12.jsonl",
                 "m_English_x.0-of-2.jsonl", "m_English.0-of-2.jsonl.tmp", "m_Englis.0-of-2.jsonl"):
        (folder / name).write_text("")
    assert [os.path.basename(p) for p in shards.shard_files_of(merged)] == [
        "m_English.0-of-2.jsonl", "m_English.1-of-3.jsonl", "m_English.10-of-12.jsonl"]


def test_a_killed_sharded_run_resumed_with_other_gpus_or_one_process_keeps_its_shards_answers(tmp_path, monkeypatch,
                                                                                              capsys):
    """A 3-GPU run stopped before its merge kept its answers only in its shard files; resumed with 2 GPUs or in one
    process it answered every question again and left the files behind for good."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"q{i}"}) + "\n" for i in range(4)))

    def setup(out: str) -> tuple[argparse.Namespace, list[str], run_bench.Task]:
        argv = ["--model-path", str(tmp_path / "ckpt"), "--images", str(tmp_path), "--questions", str(questions),
                "--answers", str(questions), "--context", str(questions), "--output-dir", str(tmp_path / out),
                "--output-file", "m", "--conv-mode", "vicuna_v1", "--max-new-tokens", "4", "--device", "cpu",
                "--judge-base-url", "http://127.0.0.1:9/v1", "--max-retries", "0"]
        args = run_bench.build_parser().parse_args(argv)
        tasks, _ = run_bench.make_tasks(args)
        merged = tasks[0].answers_out
        os.makedirs(os.path.dirname(shards.shard_path(merged, 0, 3)))
        for k, ids in ((0, (0, 1)), (1, (2, 3))):  # shard 2 of 3 never ran (its slice is empty anyway)
            with open(shards.shard_path(merged, k, 3), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"question_id": i, "prompt": f"q{i}", "text": "a", "answer_id": f"kept-{i}",
                                         "model_id": "ckpt", "metadata": {}}) + "\n" for i in ids)
        return args, argv, tasks[0]

    args, _, task = setup("two_gpus")
    monkeypatch.setattr(subprocess, "Popen", lambda argv, env: argparse.Namespace(wait=lambda: 0))
    assert run_bench.answer_sharded([], args, [task], ["0", "1"]) == []
    assert [r["answer_id"] for r in _read(task.answers_out)] == [f"kept-{i}" for i in range(4)]
    assert shards.shard_files_of(task.answers_out) == []
    assert "merged 2 shard file(s) an earlier run left (4 answered, 0 to go)" in capsys.readouterr().err

    # One process: every question is answered by the shards' files, so the checkpoint (which does not exist) is
    # never loaded; the judge is unreachable, which fails the language after answering.
    _, argv, task = setup("one_process")
    run_bench.main(argv)
    assert [r["answer_id"] for r in _read(task.answers_out)] == [f"kept-{i}" for i in range(4)]
    assert shards.shard_files_of(task.answers_out) == []


def test_the_final_files_answer_wins_over_a_shards_and_the_first_shard_over_later_ones(tmp_path):
    """A question answered in the final file and again in a shard (a rerun's shard) keeps the final file's answer,
    the one answering and judging already used; between shards the first given wins."""
    def write(name: str, rows: list[tuple[str, str]]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in rows), encoding="utf-8")
        return str(path)

    questions = write("questions.jsonl", [("a", "Qa"), ("b", "Qb"), ("c", "Qc")])
    final = write("answers.jsonl", [("a", "final a")])
    first = write("shard0.jsonl", [("a", "shard a"), ("b", "first b")])
    second = write("shard1.jsonl", [("b", "second b"), ("c", "second c")])
    assert shards.merge_answers(questions, [first, second], final) == shards.MergeResult(answered=3, missing=0)
    assert [(r["question_id"], r["text"]) for r in _read(final)] == [("a", "final a"), ("b", "first b"),
                                                                      ("c", "second c")]


def test_a_merge_into_a_full_disk_is_one_line_and_keeps_the_shards(tmp_path):
    """A merged file that could not be written (a full disk; here a file-size limit) ended in a traceback: one line,
    the shards kept, no temp file left, and a rerun with room merges."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n" for i in range(4)))
    parts = [tmp_path / "sh" / "s0.jsonl", tmp_path / "sh" / "s1.jsonl"]
    parts[0].parent.mkdir()
    for k, part in enumerate(parts):
        rows = ({"question_id": i, "text": f"a{i}" * 20} for i in (2 * k, 2 * k + 1))
        part.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = [p.read_text() for p in parts]
    merged = tmp_path / "out" / "merged.jsonl"
    argv = ["merge", "--question-file", str(questions), "--answers-file", str(merged), *map(str, parts)]
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); from palo.eval import shards; "
               "sys.exit(shards.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", limited, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: cannot merge into {merged}: File too large;"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert [p.read_text() for p in parts] == before
    assert not merged.exists() and os.listdir(merged.parent) == []  # no half file, no temp file
    assert shards.main(argv) == 0
    assert [r["question_id"] for r in _read(merged)] == [0, 1, 2, 3]
