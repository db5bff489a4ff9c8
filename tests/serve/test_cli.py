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
