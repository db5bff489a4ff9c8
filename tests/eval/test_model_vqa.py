"""``palo.eval.model_vqa`` on the tiny checkpoint: record format, batching, resume, preprocessing, bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from palo.eval import model_vqa
from palo.jsonl import JsonlError, read_jsonl
from palo.mm_utils import expand2square, pad_color
from palo.model.vision_tower import build_clip_image_processor

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(world, bench: str, questions: str, answers: str, *extra: str) -> int:
    return model_vqa.main([
        "--model-path", world.full_dir, "--image-folder", os.path.join(bench, "images"),
        "--question-file", questions, "--answers-file", answers, "--conv-mode", "vicuna_v1",
        "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu", *extra,
    ])


@pytest.fixture
def questions(bench, tmp_path) -> str:
    """English and Arabic questions in one file (two scripts, all three image shapes), distinct ids."""
    rows = []
    for language, sub, name in (("english", "", "questions.jsonl"), ("arabic", "corrected", "question.jsonl")):
        with open(os.path.join(bench, language, sub, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                row["question_id"] = f"{language}-{row['question_id']}"
                rows.append(row)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_batched_equals_one_by_one_and_resume_after_losing_the_tail(world, bench, questions, tmp_path, capsys):
    single, batched = str(tmp_path / "single.jsonl"), str(tmp_path / "batched.jsonl")
    assert _run(world, bench, questions, single, "--batch-size", "1") == 0
    assert _run(world, bench, questions, batched, "--batch-size", "3") == 0
    one, many = _read(single), _read(batched)
    assert len(one) == len(many) == 8
    assert [r["question_id"] for r in one] == [r["question_id"] for r in many]  # question order kept
    assert [r["text"] for r in one] == [r["text"] for r in many]
    assert any(r["text"] for r in one)  # the random tiny model does say something
    for record in many:
        assert set(record) == ANSWER_KEYS
        assert record["model_id"] == os.path.basename(world.full_dir)
        assert record["metadata"] == {"settings": {"conv_mode": "vicuna_v1", "image_preprocess": "pad",
                                                   "temperature": None, "top_p": None, "num_beams": 1,
                                                   "max_new_tokens": 6}}
    assert many[4]["prompt"] == "ما لون الدائرة؟"  # the question as given, no image token

    # A killed run: the last three answers are gone and the last kept line is torn mid-write.
    with open(batched, encoding="utf-8") as f:
        lines = f.readlines()
    with open(batched, "w", encoding="utf-8") as f:
        f.writelines(lines[:5])
        f.write(lines[5][: len(lines[5]) // 2])
    capsys.readouterr()
    assert _run(world, bench, questions, batched, "--batch-size", "3") == 0
    assert "5 of 8 questions already answered" in capsys.readouterr().err
    resumed = _read(batched)
    assert [r["question_id"] for r in resumed] == [r["question_id"] for r in one]
    assert [r["answer_id"] for r in resumed[:5]] == [r["answer_id"] for r in many[:5]]  # not redone
    assert [r["text"] for r in resumed] == [r["text"] for r in one]

    # Complete: a rerun loads no model and writes nothing.
    assert _run(world, bench, questions, batched, "--batch-size", "3") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert _read(batched) == resumed


def test_resume_removes_damaged_answers_and_answers_their_questions_again(world, bench, questions, tmp_path,
                                                                          capsys):
    """A damaged line before the end (a disk fault, an edit) was skipped and its question answered again, but the line
    stayed, and the review after it refuses a file with a bad line: every rerun of the evaluation stopped there."""
    answers = str(tmp_path / "answers.jsonl")
    assert _run(world, bench, questions, answers, "--batch-size", "3") == 0
    first = _read(answers)
    with open(answers, "rb") as f:
        lines = f.readlines()
    lines[2] = lines[2][:20] + b"\n"  # cut short
    lines[5] = b"\xff" + lines[5]  # not UTF-8
    with open(answers, "wb") as f:
        f.writelines(lines)
    capsys.readouterr()
    assert _run(world, bench, questions, answers, "--batch-size", "3") == 0
    err = capsys.readouterr().err
    assert "answers.jsonl:3: not valid JSON" in err and "answers.jsonl:6: not UTF-8" in err
    assert "removed, its question is answered again" in err and "6 of 8 questions already answered" in err
    resumed = read_jsonl(answers)  # strict, as the review reads it
    assert sorted(r.data["question_id"] for r in resumed) == sorted(r["question_id"] for r in first)
    by_id = {r["question_id"]: r for r in first}
    for record in resumed:
        same = record.data["answer_id"] == by_id[record.data["question_id"]]["answer_id"]
        assert same == (record.data["question_id"] not in (first[2]["question_id"], first[5]["question_id"]))
        assert record.data["text"] == by_id[record.data["question_id"]]["text"]


def test_chunks_split_the_questions(world, bench, questions, tmp_path):
    out = str(tmp_path / "chunk.jsonl")
    assert _run(world, bench, questions, out, "--num-chunks", "3", "--chunk-idx", "2") == 0
    # ceil(8 / 3) = 3 per chunk: the third chunk holds questions 7 and 8.
    assert [r["question_id"] for r in _read(out)] == ["arabic-2", "arabic-3"]
    assert model_vqa.get_chunk(list(range(8)), 3, 0) == [0, 1, 2]
    with pytest.raises(ValueError, match="chunk-idx 3"):
        model_vqa.get_chunk(list(range(8)), 3, 3)
    for chunks in (0, -1):  # it blamed --chunk-idx 0 ("outside 0..-1")
        with pytest.raises(ValueError, match=f"--num-chunks must be at least 1, got {chunks}"):
            model_vqa.get_chunk(list(range(8)), chunks, 0)
    assert model_vqa.split_list(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]  # the original's helper


def test_eval_model_takes_the_originals_namespace(world, bench, questions, tmp_path):
    """Scripts and notebooks call the original's ``eval_model(args)`` with its parser's namespace (no --device,
    --batch-size ... here: this command's defaults fill them); it answers as the command does."""
    import argparse

    by_command = str(tmp_path / "command.jsonl")
    assert _run(world, bench, questions, by_command) == 0
    by_call = str(tmp_path / "call.jsonl")
    args = argparse.Namespace(model_path=world.full_dir, model_base=None, image_folder=os.path.join(bench, "images"),
                              question_file=questions, answers_file=by_call, conv_mode="vicuna_v1", num_chunks=1,
                              chunk_idx=0, temperature=0.0, top_p=None, num_beams=1, max_new_tokens=6, device="cpu")
    assert model_vqa.eval_model(args) == 0
    assert [(r["question_id"], r["text"]) for r in _read(by_call)] == [(r["question_id"], r["text"])
                                                                        for r in _read(by_command)]


def test_pad_and_crop_are_the_two_rules_and_crop_reproduces_the_original(bench):
    processor = build_clip_image_processor(56)
    wide = os.path.join(bench, "images", "001.png")
    image = Image.open(wide).convert("RGB")
    padded = model_vqa.preprocess_image(wide, processor, "pad")
    cropped = model_vqa.preprocess_image(wide, processor, "crop")
    expected_pad = processor.preprocess(expand2square(image, pad_color(processor)),
                                        return_tensors="pt")["pixel_values"][0]
    expected_crop = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(padded, expected_pad) and torch.equal(cropped, expected_crop)
    assert not torch.equal(padded, cropped)  # a non-square image: the crop cuts the sides off
    assert model_vqa.build_parser().parse_args([]).max_new_tokens == 1024


def test_images_are_preprocessed_as_the_checkpoint_was_trained_unless_a_rule_is_chosen(world, bench, questions,
                                                                                       tmp_path):
    """The default was pad whatever the config: a checkpoint trained with ``square`` (or no ``image_aspect_ratio``)
    was answered from padded images here and from centre crops on every other path."""
    square = tmp_path / "square"
    shutil.copytree(world.full_dir, square)
    config = json.loads((square / "config.json").read_text())
    assert config["image_aspect_ratio"] == "pad"
    config["image_aspect_ratio"] = "square"
    (square / "config.json").write_text(json.dumps(config))
    assert model_vqa.build_parser().parse_args([]).image_preprocess is None
    for path, chosen, used in ((world.full_dir, None, "pad"), (str(square), None, "crop"), (str(square), "pad", "pad")):
        answerer, _ = model_vqa.load_answerer(path, None, "vicuna_v1", model_vqa.generation_kwargs(0.0, None, 1, 3),
                                              chosen, device="cpu")
        assert answerer.image_preprocess == used and answerer.settings["image_preprocess"] == used, (path, chosen)
    assert model_vqa.image_preprocess_for(type("Config", (), {})()) == "crop"  # no key: as process_images reads it
    # Answers recorded with the old default (pad) resume under the new one; an explicit other rule is refused.
    out = str(tmp_path / "answers.jsonl")
    assert _run(world, bench, questions, out, "--image-preprocess", "pad") == 0
    assert {r["metadata"]["settings"]["image_preprocess"] for r in _read(out)} == {"pad"}
    assert _run(world, bench, questions, out) == 0
    assert _run(world, bench, questions, out, "--image-preprocess", "crop") == 2
    # Answers made with crop are not resumed by a default run, which pads for this checkpoint (one file of both).
    cropped = str(tmp_path / "cropped.jsonl")
    assert _run(world, bench, questions, cropped, "--image-preprocess", "crop") == 0
    with open(cropped, encoding="utf-8") as f:
        kept = f.readlines()[:2]  # as if killed after two answers
    with open(cropped, "w", encoding="utf-8") as f:
        f.writelines(kept)
    assert _run(world, bench, questions, cropped) == 2
    assert len(_read(cropped)) == 2


def test_missing_image_and_malformed_line_name_file_and_line(world, bench, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(os.path.join(bench, "images"), images)
    os.remove(images / "002.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"question_id": 1, "image": "001.png", "text": "What colour?", "category": "conv"}\n'
        '{"question_id": 2, "image": "002.png", "text": "Describe.", "category": "detail"}\n'
        '{"question_id": 3, "image": "003.png", "text": "Why?" "category": "complex"}\n'
        '{"question_id": 4, "image": "003.png", "text": "Shape?", "category": "conv"}\n',
        encoding="utf-8",
    )
    out = str(tmp_path / "a.jsonl")
    args = ["--model-path", world.full_dir, "--image-folder", str(images), "--question-file", str(questions),
            "--answers-file", out, "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu",
            "--conv-mode", "vicuna_v1"]

    assert model_vqa.main(args) == 2
    err = capsys.readouterr().err
    assert f"{questions}:3: not valid JSON" in err and not os.path.exists(out)

    questions.write_text(questions.read_text(encoding="utf-8").replace('"Why?" "', '"Why?", "'), encoding="utf-8")
    assert model_vqa.main(args) == 2
    err = capsys.readouterr().err
    assert f"{questions}:2: question 2: no such image" in err and "002.png" in err

    # Skip-and-report: the run goes on and says what it skipped.
    assert model_vqa.main(args + ["--skip-bad", "--batch-size", "4"]) == 0
    assert "[skip]" in capsys.readouterr().err
    assert [r["question_id"] for r in _read(out)] == [1, 3, 4]


def test_bad_settings_and_outputs_are_refused_before_the_model_loads(bench, questions, tmp_path, capsys):
    """The model path does not exist: each of these must be refused by its own message, before any load."""
    def run(answers: str, *extra: str) -> str:
        assert model_vqa.main(["--model-path", str(tmp_path / "no-model"), "--question-file", questions,
                               "--image-folder", os.path.join(bench, "images"), "--answers-file", answers,
                               "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert "no-model" not in err, err
        return err

    out = str(tmp_path / "a.jsonl")
    assert "--max-new-tokens must be at least 1, got 0" in run(out, "--max-new-tokens", "0")
    assert "--top_p must be in (0, 1], got 7.0" in run(out, "--temperature", "0.5", "--top_p", "7")
    assert "--num_beams must be at least 1, got 0" in run(out, "--num_beams", "0")
    assert "--temperature must be >= 0 (0: greedy), got -1.0" in run(out, "--temperature", "-1")
    assert not os.path.exists(out)
    assert f"the answers file {questions} is the question file" in run(questions)
    (tmp_path / "folder").mkdir()
    assert "cannot write the answers file" in run(str(tmp_path / "folder"))
    assert "cannot write the answers file" in run("/proc/no-such-folder/a.jsonl")
    # One run per answers file: a second (here: the file held open by another writer) is refused, not doubled.
    with model_vqa.JsonlAppender(out):
        assert "another process is writing this file" in run(out)


def test_questions_with_non_string_text_or_image_are_refused_or_skipped(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"question_id": 1, "image": "001.png", "text": "What colour?"}\n'
        '{"question_id": 2, "image": "001.png", "text": 7}\n'
        '{"question_id": 3, "image": ["001.png"], "text": "Describe."}\n'
        '{"question_id": 1, "text": "Again?"}\n'
        '{"question_id": 5, "text": "No image."}\n',
        encoding="utf-8",
    )
    with pytest.raises(JsonlError, match=":2: question 2: 'text' must be a string"):
        model_vqa.load_questions(str(questions))
    kept = model_vqa.load_questions(str(questions), skip_bad=True)
    assert [(q.question_id, q.text, q.image) for q in kept] == [(1, "What colour?", "001.png"), (5, "No image.", None)]
    err = capsys.readouterr().err
    assert ":3: question 3: 'image' must be a file name" in err and ":4: duplicate question_id 1" in err


def test_unreadable_image_is_reported_per_question(world, bench, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(os.path.join(bench, "images"), images)
    (images / "003.png").write_bytes(b"not a png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"question_id": 1, "image": "001.png", "text": "What colour?"}\n'
        '{"question_id": 2, "image": "003.png", "text": "Shape?"}\n', encoding="utf-8")
    out = str(tmp_path / "a.jsonl")
    args = ["--model-path", world.full_dir, "--image-folder", str(images), "--question-file", str(questions),
            "--answers-file", out, "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu",
            "--batch-size", "2"]
    assert model_vqa.main(args) == 2
    assert f"{questions}:2: question 2:" in capsys.readouterr().err
    assert model_vqa.main(args + ["--skip-bad"]) == 0
    assert [r["question_id"] for r in _read(out)] == [1]


@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_a_question_longer_than_the_context_is_refused_or_skipped_with_its_line(world, bench, tmp_path, capsys,
                                                                               engine):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"question_id": 1, "image": "001.png", "text": "What colour?"}\n'
        + json.dumps({"question_id": 2, "image": "002.png", "text": "word " * 3000}) + "\n", encoding="utf-8")
    out = str(tmp_path / "a.jsonl")
    args = [*("--engine", engine, "--batch-size", "2")]
    assert _run(world, bench, str(questions), out, *args) == 2
    err = capsys.readouterr().err
    assert f"{questions}:2: question 2: the prompt takes " in err and "no room is left for an answer" in err
    # The run stops at the bad question; what came before it is answered and kept (a rerun does not ask again).
    assert "Traceback" not in err and [r["question_id"] for r in _read(out)] == [1]
    assert _run(world, bench, str(questions), out, *args, "--skip-bad") == 0
    assert [r["question_id"] for r in _read(out)] == [1]
    err = capsys.readouterr().err
    assert "1 question(s) skipped" in err and "1 of 2 questions already answered" in err


def test_the_engine_window_admits_a_question_as_soon_as_one_ends(world, bench, questions):
    """``--batch-size`` on the engine is a window, not a lockstep batch: the next question starts when the first in
    flight ends, not when the whole batch has; the answers are one-by-one generation's, in question order."""
    from palo.engine import EngineConfig, LLMEngine
    from palo.eval.model_vqa import load_questions

    generation = model_vqa.generation_kwargs(0.0, None, 1, 6)
    answerer, _ = model_vqa.load_answerer(world.full_dir, None, "vicuna_v1", generation, device="cpu")
    # Prefill one prompt a step, so the questions start, and so end, at different steps.
    answerer.engine = LLMEngine(answerer.model, answerer.tokenizer, EngineConfig(max_prefill_tokens=48))
    events: list[tuple[str, int]] = []
    add = answerer.engine.add_request

    def logged_add(request):
        index = len([e for e in events if e[0] == "add"])
        inner = request.on_output

        def on_output(output):
            if output.finished:
                events.append(("end", index))
            inner(output)

        request.on_output = on_output
        events.append(("add", index))
        return add(request)

    answerer.engine.add_request = logged_add
    pending = load_questions(questions)
    streamed = list(answerer.answer_in_order(pending, os.path.join(bench, "images"), window=3))
    assert [q.question_id for q, _ in streamed] == [q.question_id for q in pending]
    alone = [answerer.answer([q], os.path.join(bench, "images"))[0] for q in pending]
    assert [text for _, text in streamed] == alone
    # The 4th question was added after the first end and before the third one's.
    first_end = events.index(next(e for e in events if e[0] == "end"))
    assert first_end < events.index(("add", 3)) < events.index(("end", 2))


@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_answer_images_in_order_streams_the_batch_answers(world, engine):
    """lmms-eval's path as a stream (a window of 2 on the engine, batches of 2 with hf): the answers of one batch
    of all, and a prompt with no room named by its index after the answers before it."""
    generation = model_vqa.generation_kwargs(0.0, None, 1, 5)
    answerer, _ = model_vqa.load_answerer(world.full_dir, None, "vicuna_v1", generation, device="cpu", engine=engine)
    red, blue = Image.new("RGB", (30, 20), (200, 30, 30)), Image.new("RGB", (20, 30), (30, 30, 200))
    texts = ["What colour?", "这是什么？", "Say hello.", "এটা কী?", "Two pictures."]
    images = [red, blue, None, [red], [red, blue]]
    assert list(answerer.answer_images_in_order(texts, images, 2)) == answerer.answer_images(texts, images)
    stream = answerer.answer_images_in_order(texts[:3] + ["word " * 3000], images[:3] + [None], 2)
    assert len([next(stream) for _ in range(3)]) == 3
    with pytest.raises(model_vqa.QuestionTooLong) as caught:
        next(stream)
    assert caught.value.index == 3


@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_answer_images_takes_several_images_per_question(world, engine):
    """A question with two images (lmms-eval's multi-image tasks): one ``<image>`` line per image, in order, and the
    answer model.generate gives for that prompt; the other rows of the batch (one image, none) are unaffected."""
    from palo.mm_utils import preprocess_image, tokenizer_image_token

    answerer, _ = model_vqa.load_answerer(world.full_dir, None, None, model_vqa.generation_kwargs(0.0, None, 1, 6),
                                          device="cpu", engine=engine)
    wide, tall = Image.new("RGB", (40, 20), (200, 30, 30)), Image.new("RGB", (20, 40), (30, 30, 200))
    texts = ["Compare the two pictures.", "¿Qué color?", "Say hello."]
    got = answerer.answer_images(texts, [[wide, tall], tall, None])
    prompt = model_vqa.build_prompt(texts[0], "vicuna_v1", 2, False)
    assert "USER: <image>\n<image>\nCompare" in prompt
    ids = tokenizer_image_token(prompt, answerer.tokenizer, return_tensors="pt")[None]
    pixels = torch.stack([preprocess_image(i, answerer.image_processor, "pad") for i in (wide, tall)])
    with torch.no_grad():
        out = answerer.model.generate(ids, images=pixels, max_new_tokens=6, do_sample=False,
                                      pad_token_id=answerer.pad_id)
    expected = model_vqa.clean_answer(answerer.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                                      answerer.stop)
    assert got[0] == expected
    assert got[1:] == answerer.answer_images(texts[1:], [tall, None])


def test_resume_keeps_only_answers_this_run_would_give(world, bench, questions, tmp_path, capsys):
    """Answers were resumed by question_id alone: a rerun under the same output with another checkpoint said
    "nothing to do" and kept the first one's answers, a partial file was completed by another model, an edited
    question kept its old answer."""
    out = str(tmp_path / "answers.jsonl")
    assert _run(world, bench, questions, out, "--batch-size", "4") == 0
    answered = _read(out)
    rows = [json.loads(line) for line in open(questions, encoding="utf-8")]
    rows[2]["text"] = "Why would anyone draw a triangle?"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    other = ("--model-path", world.full_bin_dir)  # the same weights in another folder: another model_id
    capsys.readouterr()
    for question_file, extra, differs in (
        (questions, other, "8 answer(s) this run would not give (model_id 'ckpt_a', this run 'ckpt_b')"),
        (questions, ("--max-new-tokens", "5"), "8 answer(s) this run would not give (max_new_tokens 6, this run 5)"),
        (str(edited), (), "1 answer(s) this run would not give (question 'english-2' was 'Why might"),
    ):
        assert _run(world, bench, question_file, out, *extra) == 2
        err = capsys.readouterr().err
        assert f"error: {out} holds {differs}" in err and "pass --overwrite" in err and "nothing to do" not in err
        assert _read(out) == answered  # refused before any model load, the file as it was
    # A partial file of one model is not completed by another.
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in answered[:3])
    assert _run(world, bench, questions, out, *other) == 2
    assert "holds 3 answer(s) this run would not give" in capsys.readouterr().err

    # --overwrite answers those questions again; the same command run again resumes.
    assert _run(world, bench, questions, out, *other, "--overwrite", "--batch-size", "4") == 0
    assert "[overwrite]" in capsys.readouterr().err
    mine = _read(out)
    assert [r["question_id"] for r in mine] == [r["question_id"] for r in answered]
    assert {r["model_id"] for r in mine} == {"ckpt_b"}
    assert _run(world, bench, questions, out, *other, "--overwrite") == 0
    assert "nothing to do" in capsys.readouterr().err and _read(out) == mine
    # An edited question: only its answer is made again.
    assert _run(world, bench, str(edited), out, *other, "--overwrite") == 0
    again = {r["question_id"]: r for r in _read(out)}
    assert [q for q, r in again.items() if r["answer_id"] != {m["question_id"]: m for m in mine}[q]["answer_id"]] \
        == ["english-2"]
    assert again["english-2"]["prompt"] == "Why would anyone draw a triangle?"


def test_a_full_disk_is_one_line_and_keeps_the_answers_written(world, bench, questions, tmp_path, monkeypatch,
                                                                capsys):
    """An answer that could not be appended (ENOSPC) ended the run in a traceback naming neither the file nor that the
    answers before it stay."""
    import errno

    from palo import jsonl

    out = str(tmp_path / "answers.jsonl")
    real_write = jsonl.JsonlAppender.write
    calls = []

    def fills_up(self, record):
        calls.append(record["question_id"])
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, record)

    monkeypatch.setattr(jsonl.JsonlAppender, "write", fills_up)
    capsys.readouterr()
    assert _run(world, bench, questions, out, "--batch-size", "3") == 2
    err = capsys.readouterr().err
    assert f"error: cannot write the answers file {out}: No space left on device; the 3 answer(s)" in err
    assert "Traceback" not in err
    assert [r["question_id"] for r in _read(out)] == calls[:3]

    monkeypatch.setattr(jsonl.JsonlAppender, "write", real_write)  # room again: the rerun answers only the rest
    assert _run(world, bench, questions, out, "--batch-size", "3") == 0
    assert "3 of 8 questions already answered" in capsys.readouterr().err
    assert len(_read(out)) == 8
