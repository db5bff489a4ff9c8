"""The chat CLI as a user runs it: a real process, a real image file, answers streamed to stdout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw


def _run(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "palo.serve.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=300, env=env,
    )


@pytest.fixture
def image_file(tmp_path) -> str:
    image = Image.new("RGB", (120, 80), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    path = tmp_path / "circle.png"
    image.save(path)
    return str(path)


def test_multilingual_multi_turn_chat(world, image_file):
    result = _run(
        ["--model-path", world.full_dir, "--image-file", image_file, "--device", "cpu", "--temperature", "0",
         "--max-new-tokens", "8", "--debug"],
        "What is in the image?\nما لون الدائرة؟\n\n",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("ASSISTANT: ") >= 2 and out.rstrip().endswith("exit...")
    # --conv-mode was inferred from the checkpoint's config (PALO -> vicuna_v1): the debug prompt shows it.
    assert "A chat between a curious user" in out and "USER: <image>\\nWhat is in the image? ASSISTANT:" in out
    assert "ما لون الدائرة؟ ASSISTANT:" in out


def test_bad_image_and_bad_checkpoint_fail_clearly(world, tmp_path, image_file):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = _run(["--model-path", world.full_dir, "--image-file", str(corrupt), "--device", "cpu"], "")
    assert result.returncode == 2 and "not a readable image" in result.stderr
    result = _run(["--model-path", str(tmp_path), "--image-file", image_file, "--device", "cpu"], "")
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_turns_that_cannot_be_sent_are_refused_and_the_chat_goes_on(world, image_file):
    """A typed <image>, a line that is not UTF-8, a turn over the context: each is said and skipped (each used to
    end the chat with a traceback or an exit); a bad flag is refused before the model loads."""
    args = ["--model-path", world.full_dir, "--image-file", image_file, "--device", "cpu", "--temperature", "0",
            "--max-new-tokens", "4", "--debug"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    stdin = b"look at <image> here\n\xff\xfe bad\n" + b"word " * 3000 + b"\nWhat is in the image?\n\n"
    result = subprocess.run([sys.executable, "-m", "palo.serve.cli", *args], input=stdin, capture_output=True,
                            timeout=300, env=env)
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert "<image> marks where an image goes and cannot be typed" in out
    assert "that line is not UTF-8 text" in out and "this turn was not sent" in out
    # The image rides on the first turn that was sent, and the refused ones are not in the conversation.
    assert "USER: <image>\\nWhat is in the image? ASSISTANT:" in out and "look at" not in out.split("exit...")[0][
        out.index("What is in the image?"):]
    assert out.count("ASSISTANT: ") >= 2 and out.rstrip().endswith("exit...")
    for flag, value in (("--max-new-tokens", "0"), ("--temperature", "-1")):
        bad = _run(["--model-path", "/no/such/model", "--image-file", image_file, flag, value], "")
        assert bad.returncode == 2 and "--max-new-tokens must be at least 1" in bad.stderr


_CTRL_C_DRIVER = '''
import builtins, io, signal, sys
from palo.engine import LLMEngine
from palo.serve import cli
mode, checkpoint, image = sys.argv[1:4]
if mode in ("answer", "first"):  # the user's Ctrl-C arrives while the third (first) piece of the first answer is
    emit, calls = LLMEngine._emit, []  # being shown
    def interrupted(self, seq, output):
        calls.append(1)
        if len(calls) == (3 if mode == "answer" else 1):
            signal.raise_signal(signal.SIGINT)
        emit(self, seq, output)
    LLMEngine._emit = interrupted
    sys.stdin = io.StringIO("What is in the image?\\nAnd its colour?\\n\\n")
else:  # Ctrl-C at the prompt
    def ctrl_c(prompt=""):
        print(prompt, end="")
        raise KeyboardInterrupt
    builtins.input = ctrl_c
sys.exit(cli.main(["--model-path", checkpoint, "--image-file", image, "--device", "cpu", "--temperature", "0",
                   "--max-new-tokens", "40", "--debug"]))
'''


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(world, image_file, tmp_path):
    """Ctrl-C during an answer ends that answer at the next token (the engine is never cut mid-step), keeps what it
    said in the conversation and returns to the prompt; Ctrl-C at the prompt ends the chat like an empty line.
    (A child process: a SIGINT in the test process would end the whole session.)"""
    driver = tmp_path / "driver.py"
    driver.write_text(_CTRL_C_DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    run = lambda mode: subprocess.run([sys.executable, str(driver), mode, world.full_dir, image_file],  # noqa: E731
                                      capture_output=True, text=True, timeout=300, env=env)
    result = run("answer")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    first = out.split("ASSISTANT: ", 1)[1].split(" [stopped]\n", 1)[0]
    assert first.strip() and out.count(" [stopped]") == 1 and out.rstrip().endswith("exit...")
    # The chat went on: the second question was answered, with the first answer in its prompt as far as it was shown.
    assert "USER: And its colour?\nASSISTANT: " in out
    assert f"ASSISTANT: {first.strip()}</s>USER: And its colour? ASSISTANT:" in out
    result = run("prompt")
    assert result.returncode == 0 and result.stdout.rstrip().endswith("exit...") and "Traceback" not in result.stderr
    # Stopped before anything was shown: no answer, so the turn is left out and the image rides on the next one
    # (an empty answer had rendered as an open turn: "...image? ASSISTANT:USER: And its colour?").
    result = run("first")
    assert result.returncode == 0, result.stderr
    assert "[no answer: this turn is left out of the conversation]" in result.stdout
    assert "ASSISTANT:USER" not in result.stdout
    assert "USER: <image>\\nAnd its colour? ASSISTANT:" in result.stdout


def test_a_text_only_checkpoint_chats_and_the_context_is_the_models_positions(world, tmp_path):
    """A text-only LLM chats without --image-file (it stopped at the model's missing image_token_count); the
    conversation may fill the model's max_position_embeddings, as the worker's and palo.LLM's may (the CLI held it
    to the loader's max_sequence_length, 2048 by default: PALO-7B turns of 2,049 to 4,096 tokens were refused)."""
    text_only = _run(["--model-path", world.base_dir, "--device", "cpu", "--temperature", "0",
                      "--max-new-tokens", "4"], "Bonjour, comment vas-tu ?\nEt toi ?\n\n")
    assert text_only.returncode == 0, text_only.stderr
    # (a plain LLaMA's template comes from its config, never its folder's name: vicuna_v1, USER / ASSISTANT)
    assert text_only.stdout.count("ASSISTANT: ") == 2 and text_only.stdout.rstrip().endswith("exit...")
    import json
    import shutil

    short = str(tmp_path / "short")
    shutil.copytree(world.full_dir, short)
    with open(os.path.join(short, "config.json")) as f:
        config = json.load(f)
    config["max_sequence_length"] = 100  # under the model's positions (its max_position_embeddings)
    assert config["max_position_embeddings"] > 300
    with open(os.path.join(short, "config.json"), "w") as f:
        json.dump(config, f)
    image = tmp_path / "grey.png"
    Image.new("RGB", (40, 30), "grey").save(image)
    result = _run(["--model-path", short, "--image-file", str(image), "--device", "cpu", "--temperature", "0",
                   "--max-new-tokens", "2", "--debug"], "describe " * 60 + "\n\n")
    assert result.returncode == 0, result.stderr
    assert "this turn was not sent" not in result.stdout and "'outputs'" in result.stdout


def _chat_in_process(world, image_file, monkeypatch, capsys, stdin: str, generate) -> tuple[int, str]:
    """Run :func:`palo.serve.cli.main` in this process with ``LLMEngine.generate`` replaced by ``generate(real, self,
    requests)``; (exit status, stdout)."""
    import io

    from palo import engine as engine_package
    from palo.serve import cli

    real = engine_package.LLMEngine.generate
    monkeypatch.setattr(engine_package.LLMEngine, "generate",
                        lambda self, requests, *a, **k: generate(real, self, requests, *a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    rc = cli.main(["--model-path", world.full_dir, "--image-file", image_file, "--device", "cpu", "--temperature",
                   "0", "--max-new-tokens", "4", "--debug"])
    return rc, capsys.readouterr().out


def test_an_answer_that_says_image_placeholder_does_not_break_the_next_turn(world, image_file, monkeypatch, capsys):
    """A model answer holding the literal text "<image>" went into the conversation as it was: the next prompt had
    one placeholder more than images, and the engine's ImagePlaceholderMismatch ended the CLI with a traceback."""
    calls = []

    def generate(real, self, requests, *a, **k):
        outputs = real(self, requests, *a, **k)
        calls.append(1)
        if len(calls) == 1:  # as if the model, asked which tag marks the image, had answered it
            outputs[0].text = "The tag is <image> here."
        return outputs

    rc, out = _chat_in_process(world, image_file, monkeypatch, capsys,
                               "Which tag marks the image?\nAnd the colour?\n\n", generate)
    assert rc == 0 and len(calls) == 2 and out.rstrip().endswith("exit...")
    # The answer is kept with the placeholder written out, and the next turn was answered.
    assert "ASSISTANT: The tag is (image) here.</s>USER: And the colour? ASSISTANT:" in out


def test_a_turn_the_engine_refuses_is_left_out_and_the_chat_goes_on(world, image_file, monkeypatch, capsys):
    """engine.generate raising for a request (ImagePlaceholderMismatch, RequestTooLarge: ValueErrors) was uncaught
    and ended the chat with a traceback; now it is said, the turn is dropped and the next one is answered."""
    from palo.constants import IMAGE_TOKEN_INDEX

    calls = []

    def generate(real, self, requests, *a, **k):
        calls.append(1)
        if len(calls) == 1:  # a second image sentinel with one image: the real engine refuses the request
            requests[0].input_ids = [*requests[0].input_ids, IMAGE_TOKEN_INDEX]
        return real(self, requests, *a, **k)

    rc, out = _chat_in_process(world, image_file, monkeypatch, capsys,
                               "What is in the image?\nAnd the colour?\n\n", generate)
    assert rc == 0 and len(calls) == 2 and out.rstrip().endswith("exit...")
    assert "[this turn could not be answered: Image features and image tokens do not match" in out
    assert "it is left out of the conversation]" in out
    # The refused turn left no trace, and the image rides on the next one.
    assert "What is in the image?" not in out.split("it is left out of the conversation]", 1)[1]
    assert "USER: <image>\\nAnd the colour? ASSISTANT:" in out
