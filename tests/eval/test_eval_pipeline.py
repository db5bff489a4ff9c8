"""``scripts/eval/eval_all_languages.sh`` end to end: tiny model, tiny 3-language bench, local judge over HTTP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from palo.eval import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "eval", "eval_all_languages.sh")

# Judge script (question text -> responses); every other request gets the default "7 8".
EN_RATE_LIMITED = "How many shapes are there?"
ZH_PERCENT = "请详细描述这张图片。"
AR_DOWN = "صف الصورة بالتفصيل."
AR_LABELLED = "لماذا قد يرسم شخص مثلثا أخضر؟"


def _run(world, bench, out, server, *, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        MULTILINGUAL_LLAVA_BENCH_PATH=bench,
        PALO_EVAL_OUTPUT_DIR=out,
        OPENAI_BASE_URL=server.base_url,
        PALO_JUDGE_MODEL="local-judge",
        PALO_JUDGE_RETRY_DELAY="0.01",
        PALO_JUDGE_MAX_RETRIES="1",
        PALO_EVAL_DEVICE="cpu",
        PALO_EVAL_MAX_NEW_TOKENS="4",
        PALO_EVAL_BATCH_SIZE="2",
        HF_HUB_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost",
        **(env_extra or {}),
    )
    return subprocess.run(["bash", SCRIPT, world.full_dir, "tiny", "sk-local"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


@pytest.mark.slow  # two real runs of the script (~10 s of interpreter start-up each)
def test_all_languages_end_to_end_and_rerun(world, bench, judge_server, tmp_path):
    judge_server.script(EN_RATE_LIMITED, (429, "rate limited"), (200, "8 9"))
    judge_server.script(ZH_PERCENT, (200, "Scores: 8/10 and 9/10"))
    judge_server.script(AR_DOWN, (503, "overloaded"))
    judge_server.script(AR_LABELLED, (200, "Assistant 1: 6\nAssistant 2: 3\nAssistant 2 misread the image."))
    out = str(tmp_path / "evaluation")

    result = _run(world, bench, out, judge_server)
    assert result.returncode == 0, result.stderr[-3000:]
    # One model answer file and one review file per language, in the original naming.
    for lang in ("English", "Chinese", "Arabic"):
        assert os.path.isfile(os.path.join(out, f"tiny_{lang}.jsonl"))
        assert os.path.isfile(os.path.join(out, "reviews", f"tiny_{lang}.jsonl"))
    assert judge_server.count(EN_RATE_LIMITED) == 2  # the 429 was retried
    assert judge_server.count(AR_DOWN) == 2  # first try + 1 retry, then given up
    assert set(judge_server.models) == {"local-judge"}
    assert "[failed] question_id 1: request failed after 2 attempt(s)" in result.stderr

    # The table, checked against hand-computed relative scores (model mean / reference mean x 100):
    #   English: conv (7,8),(8,9) -> 8.5/7.5 = 113.3; detail, complex (7,8) -> 114.3; all 8.25/7.25 = 113.8
    #   Chinese: conv 114.3; detail (8,9) -> 112.5; complex 114.3; all 8.333/7.333 = 113.6
    #   Arabic: conv (7,8),(7,8) -> 114.3; detail failed (n/a); complex (6,3) -> 50.0; all 6.333/6.667 = 95.0
    expected = {
        "English": ["113.3", "114.3", "114.3", "113.8", "0"],
        "Chinese": ["114.3", "112.5", "114.3", "113.6", "0"],
        "Arabic": ["114.3", "", "50.0", "95.0", "1"],
        "High-resource avg": ["113.8", "113.4", "114.3", "113.7", "0"],
        "Low-resource avg": ["114.3", "", "50.0", "95.0", "1"],
    }
    with open(os.path.join(out, "tiny_summary.csv"), encoding="utf-8") as f:
        rows = {r["language"]: [r["conv"], r["detail"], r["complex"], r["all"], r["failed"]] for r in csv.DictReader(f)}
    for label, values in expected.items():
        assert rows[label] == values, label
    md = open(os.path.join(out, "tiny_summary.md"), encoding="utf-8").read()
    assert "| Arabic | 114.3 | n/a | 50.0 | 95.0 | 1 |" in md and "| Arabic |" in result.stdout
    table = json.load(open(os.path.join(out, "tiny_summary.json"), encoding="utf-8"))
    assert table["languages"]["arabic"]["detail_failed"] == 1
    assert os.path.getsize(os.path.join(out, "tiny_summary.png")) > 1000
    # Per-language summaries: the original lines on stdout, the counts they rest on on stderr.
    assert "llava_bench_detail n/a n/a n/a\n" in result.stdout
    assert "llava_bench_detail: judged 0, failed 1" in result.stderr

    # Rerun: no answer is regenerated and only the failed judgment is asked again (it now succeeds).
    answers_before = {lang: open(os.path.join(out, f"tiny_{lang}.jsonl"), encoding="utf-8").read()
                      for lang in ("English", "Chinese", "Arabic")}
    judge_server.reset_calls()
    judge_server.script(AR_DOWN, (200, "9 9"))
    result = _run(world, bench, out, judge_server)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("nothing to do") == 3
    assert judge_server.count() == {AR_DOWN: 1}
    for lang, text in answers_before.items():
        assert open(os.path.join(out, f"tiny_{lang}.jsonl"), encoding="utf-8").read() == text
    # Arabic all: reference (7+7+9+6)/4 = 7.25, model (8+8+9+3)/4 = 7.0 -> 96.6
    assert "| Arabic | 114.3 | 100.0 | 50.0 | 96.6 | 0 |" in open(os.path.join(out, "tiny_summary.md"),
                                                               encoding="utf-8").read()


def test_bad_bench_input_is_reported_and_other_languages_go_on(world, bench, judge_server, tmp_path, capsys):
    # In-process (the script itself is covered above): the same entry point the script execs.
    broken = tmp_path / "bench"
    shutil.copytree(bench, broken)
    os.remove(broken / "arabic" / "corrected" / "context.jsonl")
    with open(broken / "chinese" / "question.jsonl", "a", encoding="utf-8") as f:
        f.write('{"question_id": 9, "image": "009.png", "text": "?", "category": "conv"}\n')
    out = tmp_path / "evaluation"
    rc = run_bench.main([
        "--model-path", world.full_dir, "--bench", str(broken), "--name", "tiny", "--output-dir", str(out),
        "--languages", "english", "chinese", "arabic", "--device", "cpu", "--max-new-tokens", "3",
        "--judge-base-url", judge_server.base_url, "--retry-base-delay", "0.01",
    ])
    err = capsys.readouterr().err
    assert rc == 1
    assert "arabic: no context file" in err
    assert f"{broken / 'chinese' / 'question.jsonl'}:4: question 9: no such image" in err
    assert "incomplete: arabic, chinese" in err
    md = open(out / "tiny_summary.md", encoding="utf-8").read()
    assert "| English |" in md and "Not evaluated: Chinese, Arabic" in md


def _stub_python(tmp_path) -> str:
    """An interpreter stand-in that records its arguments, to check what the scripts pass without running them."""
    stub = tmp_path / "python-stub"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_ARGS"\n')
    stub.chmod(0o755)
    return str(stub)


def test_scripts_pass_arguments_and_environment(tmp_path):
    args_file = tmp_path / "args.txt"
    env = dict(os.environ, PYTHON=_stub_python(tmp_path), STUB_ARGS=str(args_file), PALO_EVAL_BATCH_SIZE="8",
               PALO_JUDGE_MODEL="judge-z", PALO_JUDGE_BASE_URL="http://127.0.0.1:9/v1", PALO_LANGUAGES="urdu hindi",
               PALO_MODEL_BASE="/base model")
    llavabench = os.path.join(ROOT, "scripts", "eval", "llavabench.sh")
    subprocess.run(["bash", llavabench, "/b/images", "/m", "/b/q.jsonl", "/b/a.jsonl", "/b/c.jsonl", "/out",
                    "name_Urdu"], env=env, check=True)
    argv = args_file.read_text().splitlines()
    assert argv[:2] == ["-m", "palo.eval.run_bench"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--images"] == "/b/images" and flags["--model-path"] == "/m" and flags["--questions"] == "/b/q.jsonl"
    assert flags["--answers"] == "/b/a.jsonl" and flags["--context"] == "/b/c.jsonl" and flags["--output-dir"] == "/out"
    assert flags["--output-file"] == "name_Urdu" and flags["--conv-mode"] == "vicuna_v1"
    assert flags["--temperature"] == "0" and flags["--batch-size"] == "8" and flags["--judge-model"] == "judge-z"
    assert flags["--judge-base-url"] == "http://127.0.0.1:9/v1" and flags["--model-base"] == "/base model"

    env.pop("OPENAI_API_KEY", None)
    subprocess.run(["bash", SCRIPT, "/m", "run1", "-"], env=env, check=True)
    argv = args_file.read_text().splitlines()
    assert argv[argv.index("--languages") + 1:argv.index("--languages") + 3] == ["urdu", "hindi"]
    assert argv[argv.index("--bench") + 1] == "data/multilingual-llava-bench-in-the-wild"  # no stray "p"

    bad = subprocess.run(["bash", llavabench, "only", "three", "args"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_one_language_mode_of_llavabench(world, bench, judge_server, tmp_path, capsys):
    english = os.path.join(bench, "english")
    out = tmp_path / "evaluation"
    rc = run_bench.main([
        "--model-path", world.full_dir, "--images", os.path.join(bench, "images"),
        "--questions", os.path.join(english, "questions.jsonl"),
        "--answers", os.path.join(english, "answers_gpt4.jsonl"), "--context", os.path.join(english, "context.jsonl"),
        "--output-dir", str(out), "--output-file", "m_English.jsonl",
        "--device", "cpu", "--max-new-tokens", "3", "--judge-base-url", judge_server.base_url, "--batch-size", "4",
    ])
    assert rc == 0
    assert (out / "m_English.jsonl").is_file() and (out / "reviews" / "m_English.jsonl").is_file()
    assert (out / "reviews" / "judge_cache.sqlite").is_file()
    captured = capsys.readouterr()
    assert "all 114.3 70.0 80.0\n" in captured.out and "all: judged 4, failed 0" in captured.err  # each reply "7 8"


def test_an_output_that_is_an_input_is_refused_before_anything_is_answered(world, bench, tmp_path, capsys):
    """An answers file that is the reference answers was read as a finished run: the reference judged against
    itself, scored, exit 0."""
    english = tmp_path / "english"
    shutil.copytree(os.path.join(bench, "english"), english)
    reference = english / "answers_gpt4.jsonl"
    before = reference.read_text(encoding="utf-8")
    common = ["--model-path", world.full_dir, "--images", os.path.join(bench, "images"),
              "--questions", str(english / "questions.jsonl"), "--answers", str(reference),
              "--context", str(english / "context.jsonl"), "--device", "cpu", "--judge-base-url", "http://127.0.0.1:9/v1"]
    for output_dir, output_file, name in ((english, "answers_gpt4.jsonl", "reference answers"),
                                          (tmp_path, "english/answers_gpt4", "reference answers"),
                                          (english / "..", "english/context", "context")):
        with pytest.raises(SystemExit) as exit_info:
            run_bench.main([*common, "--output-dir", str(output_dir), "--output-file", output_file])
        assert f"answers file {output_dir}" in str(exit_info.value) and f"is the {name} file" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:  # a judge setting that cannot work: before any answering
        run_bench.main([*common, "--output-dir", str(tmp_path / "out"), "--output-file", "m", "--parallel", "0"])
    assert "--parallel must be at least 1" in str(exit_info.value)
    assert reference.read_text(encoding="utf-8") == before and not (tmp_path / "out").exists()


def test_the_scripts_environment_becomes_run_bench_flags_that_it_accepts():
    """PALO_EVAL_DTYPE (as PALO_EVAL_DEVICE) reaches run_bench as its flag; unset, no flag: the original's dtype."""
    common = os.path.join(ROOT, "scripts", "eval", "common.sh")
    show = f'source "{common}"; printf "%s\\n" "${{PALO_RUN_ARGS[@]}}"'
    for dtype, expected in (("bfloat16", ["--dtype", "bfloat16"]), ("", [])):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PALO_", "OPENAI_"))}
        env.update(PALO_EVAL_DTYPE=dtype, PALO_EVAL_DEVICE="cpu")
        flags = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True, check=True).stdout.split()
        at = flags.index("--dtype") if "--dtype" in flags else len(flags)
        assert flags[at:at + 2] == expected
        args = run_bench.build_parser().parse_args(["--model-path", "m", *flags])
        assert args.dtype == (dtype or "auto") and args.device == "cpu"


def test_a_rerun_with_another_checkpoint_is_refused_or_answered_and_judged_again(world, bench, judge_server, tmp_path,
                                                                                  capsys):
    """Under the same output name another checkpoint got the first one's answers and reviews as its own."""
    english = os.path.join(bench, "english")
    out = tmp_path / "evaluation"

    def run(model: str, *extra: str) -> int:
        return run_bench.main([
            "--model-path", model, "--images", os.path.join(bench, "images"),
            "--questions", os.path.join(english, "questions.jsonl"),
            "--answers", os.path.join(english, "answers_gpt4.jsonl"),
            "--context", os.path.join(english, "context.jsonl"), "--output-dir", str(out), "--output-file", "m",
            "--device", "cpu", "--max-new-tokens", "3", "--judge-base-url", judge_server.base_url, "--batch-size", "4",
            *extra,
        ])

    def read(path) -> list[dict]:
        return [json.loads(line) for line in open(path, encoding="utf-8")]

    assert run(world.full_dir) == 0
    answers = (out / "m.jsonl").read_text(encoding="utf-8")
    capsys.readouterr()
    assert run(world.full_bin_dir) == 1
    err = capsys.readouterr().err
    assert "holds 4 answer(s) this run would not give (model_id 'ckpt_a', this run 'ckpt_b')" in err
    assert "incomplete: m" in err and (out / "m.jsonl").read_text(encoding="utf-8") == answers

    assert run(world.full_bin_dir, "--overwrite") == 0
    new = read(out / "m.jsonl")
    assert {r["model_id"] for r in new} == {"ckpt_b"}
    # The reviews are of the new answers (the judge's replies may come from its cache: the texts are the same).
    assert [r["answer2_id"] for r in read(out / "reviews" / "m.jsonl")] == [r["answer_id"] for r in new]
    capsys.readouterr()
    assert run(world.full_bin_dir, "--overwrite") == 0  # the same command again resumes
    assert "nothing to do" in capsys.readouterr().err and read(out / "m.jsonl") == new


def test_a_language_that_fails_this_run_is_not_scored_from_an_earlier_checkpoints_reviews(bench, tmp_path, judge_server,
                                                                                         capsys):
    """Before, a language whose judging stopped on bad input kept its row in the table, scored from the reviews an
    earlier run had made for another checkpoint's answers (the judge moves those aside only once it runs through)."""
    from palo.eval.bench import language_files

    broken = tmp_path / "bench"
    shutil.copytree(bench, broken)
    out = tmp_path / "evaluation"
    out.mkdir()

    def run(model: str) -> int:
        # Every answer already written as model_vqa would (model_id = the checkpoint's name): no model is loaded.
        for language in ("english", "chinese"):
            questions = language_files(str(broken), language).questions
            with open(questions, encoding="utf-8") as f:
                asked = [json.loads(line) for line in f if line.strip()]
            with open(out / f"tiny_{language.capitalize()}.jsonl", "w", encoding="utf-8") as f:
                for question in asked:
                    qid = question["question_id"]
                    f.write(json.dumps({"question_id": qid, "prompt": question["text"], "text": f"{model} answer",
                                        "answer_id": f"{model}-{language}-{qid}", "model_id": model,
                                        "metadata": {}}) + "\n")
        return run_bench.main(["--model-path", str(tmp_path / model), "--bench", str(broken), "--name", "tiny",
                               "--languages", "english", "chinese", "--output-dir", str(out),
                               "--judge-base-url", judge_server.base_url, "--device", "cpu", "--max-retries", "0"])

    judge_server.default = (200, "8 4")
    assert run("ckpt_a") == 0
    judge_server.default = (200, "8 8")
    with open(language_files(str(broken), "chinese").context, "a", encoding="utf-8") as f:
        f.write("{broken\n")  # the judge stops on Chinese before its reviews are brought up to date
    assert run("ckpt_b") == 1
    assert "incomplete: chinese" in capsys.readouterr().err
    table = json.loads((out / "tiny_summary.json").read_text(encoding="utf-8"))
    assert list(table["languages"]) == ["english"] and table["missing"] == ["chinese"]
    assert table["languages"]["english"]["all"] == 100.0  # ckpt_b's own reviews, 8 8
    assert "Not evaluated: Chinese" in (out / "tiny_summary.md").read_text(encoding="utf-8")
    # Every language fails this run: the table says so (it kept ckpt_b's English score, and claimed there were no
    # reviews, which lay there).
    with open(language_files(str(broken), "english").context, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    assert run("ckpt_c") == 1
    err = capsys.readouterr().err
    assert "incomplete: english, chinese" in err and "no reviews" not in err
    table = json.loads((out / "tiny_summary.json").read_text(encoding="utf-8"))
    assert table["languages"] == {} and table["missing"] == ["english", "chinese"]
