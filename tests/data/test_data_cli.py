"""palo-data inspect / validate on a small multilingual set with planted problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from palo.testing import tiny_data


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "palo.data.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return tiny_data.write_dataset(str(tmp_path_factory.mktemp("cli")), num_samples=12)


def test_inspect_json_reports_supervised_text(world, data):
    result = _run("inspect", "--data_path", data, "--model_name_or_path", world.tokenizer_dir, "--version", "v1",
                  "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 12
    samples = json.load(open(data))
    for record, sample in zip(records, samples):
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        assert record["supervised_segments"] == [" " + a + "</s>" for a in answers]
        # The decoded supervised tokens are the answers with their end separators (decoding may move spaces).
        assert record["supervised_text"].replace(" ", "") == "".join(a + "</s>" for a in answers).replace(" ", "")
        assert record["supervised_token_count"] > len(answers)
        assert record["prompt"].startswith("A chat between a curious user")
    assert {r["language"] for r in records} >= {"english", "arabic", "chinese", "hindi", "russian"}


def test_inspect_one_sample_human_readable(world, data):
    result = _run("inspect", "--data_path", data, "--model_name_or_path", world.tokenizer_dir, "--index", "1")
    assert result.returncode == 0, result.stderr
    assert "⟦ الشكل" in result.stdout and "</s>⟧" in result.stdout
    result = _run("inspect", "--data_path", data, "--model_name_or_path", world.tokenizer_dir, "--index", "99")
    assert result.returncode == 2 and "out of range" in result.stderr


def test_validate_clean_and_broken(data, tmp_path):
    folder = os.path.join(os.path.dirname(data), "images")
    result = _run("validate", "--data_path", data, "--image_folder", folder, "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["problems"] == 0 and report["samples"] == 12 and report["languages"]["english"] >= 1
    assert report["images_read_unlike_the_original"] == {"exif_orientation": 0, "transparency": 0, "16_bit": 0,
                                                         "pad_scaled": 0}

    samples = json.load(open(data))
    samples += [
        {"id": "gone", "image": "nope.png", "conversations": samples[0]["conversations"]},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"id": "flagged", "corrupt": True, "conversations": []},
        {"id": "half-emoji", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b HALF"}]},
    ]
    broken = tmp_path / "broken.json"
    # Half an emoji as JSON writes it: valid JSON, but no text (training's tokenizer failed on it mid-run).
    broken.write_text(json.dumps(samples, ensure_ascii=False).replace("HALF", "\\ud83d"))
    result = _run("validate", "--data_path", str(broken), "--image_folder", folder, "--quiet")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["problems"] == 3 and report["corrupt_filtered"] == 1
    assert "'gone'" in result.stderr.replace('"', "'") and "no such image file" in result.stderr
    assert "roles" in result.stderr
    assert "half-emoji" in result.stderr and "lone surrogate" in result.stderr
    # A sample that is not JSON (its brackets balance, so the index holds it) is one problem, named, among the rest.
    text = broken.read_text()
    bad = text[:-1] + ', {"id": x, "conversations": []}]'
    broken.write_text(bad)
    result = _run("validate", "--data_path", str(broken), "--image_folder", folder, "--quiet")
    assert result.returncode == 1 and json.loads(result.stdout)["problems"] == 4
    where = bad.encode().rindex(b'x, "conversations"')
    assert f"{broken}: sample 16 (byte {where}) is not valid JSON: Expecting value" in result.stderr

    (tmp_path / "not_json.json").write_text("{not an array")
    result = _run("validate", "--data_path", str(tmp_path / "not_json.json"))
    assert result.returncode == 2 and "error" in result.stderr
    result = _run("validate", "--data_path", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_validate_counts_the_images_read_unlike_the_original(data, tmp_path):
    import numpy as np
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4)).save(tmp_path / "portrait.jpg", exif=exif)
    Image.new("RGBA", (8, 4)).save(tmp_path / "logo.png")
    Image.new("RGBA", (8, 4)).save(tmp_path / "logo2.png")
    Image.fromarray(np.zeros((4, 8), dtype=np.uint16)).save(tmp_path / "scan.png")
    Image.new("L", (8001, 1)).save(tmp_path / "sliver.png")
    Image.new("RGB", (8, 4)).save(tmp_path / "plain.jpg")
    turns = json.load(open(data))[0]["conversations"]
    names = ["portrait.jpg", "logo.png", "logo2.png", "scan.png", "sliver.png", "plain.jpg"]
    samples = [{"id": name, "image": name, "conversations": turns} for name in names]
    (tmp_path / "set.json").write_text(json.dumps(samples, ensure_ascii=False))
    result = _run("validate", "--data_path", str(tmp_path / "set.json"), "--image_folder", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images_read_unlike_the_original"] == {
        "exif_orientation": 1, "transparency": 2, "16_bit": 1, "pad_scaled": 1}


def _validate_in_process(tmp_path, samples, *flags):
    from palo.data.cli import main

    path = tmp_path / "set.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    return main(["validate", "--data_path", str(path), "--image_folder", str(tmp_path), "--quiet", *flags])


def test_validate_keeps_only_a_bounded_number_of_image_checks_queued(tmp_path, monkeypatch, capsys):
    """Executor.map submitted one image check per image sample up front (about 2.4 KB each, several GB for PALO's
    2M samples); the checks must be queued a few per worker while the samples are read."""
    import threading

    from palo.data import cli
    from palo.data.json_index import JsonArrayIndex

    reads, checked, ahead = [0], [0], []
    lock = threading.Lock()
    real_read = JsonArrayIndex.read

    def counting_read(self, i):
        with lock:
            reads[0] += 1
        return real_read(self, i)

    def fake_check(path):
        with lock:
            ahead.append(reads[0] - checked[0])  # samples read but not yet checked, when this check starts
            checked[0] += 1
        return (f"{path}: broken" if path.endswith("7.jpg") else None), []

    monkeypatch.setattr(JsonArrayIndex, "read", counting_read)
    monkeypatch.setattr(cli, "_check_image", fake_check)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    samples = [{"id": i, "image": f"{i}.jpg", "conversations": turns} for i in range(400)]
    assert _validate_in_process(tmp_path, samples, "--workers", "2", "--max_problems", "3") == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["image_samples"] == 400 and report["problems"] == 40 and checked[0] == 400
    assert max(ahead) <= 4 * 2 * cli._QUEUED_PER_WORKER, max(ahead)
    # Only --max_problems problems are held and listed, the lowest sample indices first; the rest are counted.
    listed = [json.loads(line)["index"] for line in out.err.splitlines() if line.startswith("{")]
    assert listed == [7, 17, 27] and "... and 37 more problems" in out.err


def test_validate_names_an_image_that_is_not_one_file_name(tmp_path, capsys):
    """A list or null "image" was reported as "['a.jpg', 'a.jpg']: no such image file" / "None: no such image
    file"; training refuses it as not one file name."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    samples = [{"id": "list", "image": ["a.jpg", "a.jpg"], "conversations": turns},
               {"id": "null", "image": None, "conversations": turns},
               {"id": "fine", "image": "a.jpg", "conversations": turns}]
    assert _validate_in_process(tmp_path, samples) == 1
    err = capsys.readouterr().err
    assert err.count("'image' must be one file name") == 2 and "no such image file" not in err


def test_validate_refuses_a_negative_max_problems(tmp_path, capsys):
    """--max_problems -1 listed all but the last problem and then "... and 3 more problems" for two problems."""
    with pytest.raises(SystemExit) as exit_info:
        _validate_in_process(tmp_path, [], "--max_problems", "-1")
    assert exit_info.value.code == 2 and "--max_problems: must be at least 0" in capsys.readouterr().err


def test_validate_does_not_load_the_model_stack(tmp_path):
    """Its turn checks came from the training preprocessing, which imports the model package and transformers:
    ten seconds before the first sample was read. They live in palo.data.turns now, which imports neither."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    bad = [{"from": "gpt", "value": "A cat."}, {"from": "gpt", "value": "Again."}]
    (tmp_path / "set.json").write_text(json.dumps([{"id": "ok", "image": "a.jpg", "conversations": turns},
                                                   {"id": "bad", "conversations": bad}]), encoding="utf-8")
    script = ("import sys\nfrom palo.data.cli import main\n"
              f"code = main(['validate', '--data_path', {str(tmp_path / 'set.json')!r}, '--image_folder', "
              f"{str(tmp_path)!r}, '--quiet'])\n"
              "print(code, sorted(m for m in ('palo.model', 'transformers', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "1 []", result.stdout  # one problem found, nothing heavy imported
    assert "expected 'human', got 'gpt'" in result.stderr


def test_validate_of_a_file_edited_in_place_meanwhile_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A data file edited in place after it was indexed raised DataFileChangedError (a RuntimeError) past main's
    ValueError handler: a traceback, whose message also told the user not to edit it "while training"."""
    from palo.data import cli
    from palo.data.json_index import JsonArrayIndex

    turns = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]
    samples = [{"id": i, "conversations": turns} for i in range(4)]
    build = JsonArrayIndex.build

    def build_then_edit(path, **kwargs):
        index = build(path, **kwargs)
        samples[0]["conversations"] = [dict(turns[0], value="What is it, really?"), turns[1]]
        (tmp_path / "set.json").write_text(json.dumps(samples), encoding="utf-8")  # in place, samples moved on
        return index

    monkeypatch.setattr(cli.JsonArrayIndex, "build", build_then_edit)
    assert _validate_in_process(tmp_path, samples) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'set.json'}: the data file changed since "), err
    assert "(modified at " in err and "training" not in err, err


_TURNS = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]


def test_a_corrupt_sample_without_conversations_is_filtered_as_training_filters_it(world, tmp_path, capsys):
    """validate, and inspect, checked 'conversations' before 'corrupt': a corrupt: true sample with none was a
    problem ("no 'conversations' list") and an inspect ERROR, where training filters it out without a word."""
    from palo.data.cli import main

    samples = [{"id": "ok", "conversations": _TURNS}, {"id": "c2", "corrupt": True}]
    assert _validate_in_process(tmp_path, samples) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["problems"] == 0 and report["corrupt_filtered"] == 1 and report["text_only_samples"] == 1
    assert out.err == ""
    assert main(["inspect", "--data_path", str(tmp_path / "set.json"), "--model_name_or_path", world.tokenizer_dir,
                 "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "error" not in records[1] and records[1]["skipped"].startswith("corrupt: true"), records[1]


@pytest.mark.parametrize("samples, words", [
    ([], "holds no samples"),
    ([{"id": "c1", "corrupt": True, "conversations": _TURNS}], "holds no samples that are not corrupt"),
])
def test_validate_refuses_a_set_training_refuses(tmp_path, capsys, samples, words):
    """An empty set, or one whose every sample is corrupt: true, passed (exit 0); training stops on both."""
    assert _validate_in_process(tmp_path, samples) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["problems"] == 1
    problem = json.loads(out.err)
    assert problem["problem"] == f"--data_path {tmp_path / 'set.json'} {words}", problem


def test_inspect_with_image_start_end_tokenizes_as_training_does(world, tmp_path, capsys):
    """--mm_use_im_start_end with a base LLM's tokenizer split <im_start>/<im_end> into pieces: training adds them
    as tokens (model_setup._add_vision_tokens) first, so the counts differed."""
    from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN
    from palo.data.cli import main
    from palo.model.tokenizer import load_tokenizer
    from palo.train.preprocess import build_supervised_example

    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": turns}]), encoding="utf-8")
    assert main(["inspect", "--data_path", str(path), "--model_name_or_path", world.tokenizer_dir, "--json",
                 "--mm_use_im_start_end"]) == 0
    record = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(world.tokenizer_dir)
    tokenizer.pad_token = tokenizer.unk_token
    assert DEFAULT_IM_START_TOKEN not in tokenizer.get_vocab()  # a base tokenizer: the case that went wrong
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)  # as training
    expected = build_supervised_example(turns, tokenizer, "v1", True, True)
    assert record["token_count"] == len(expected.input_ids)
