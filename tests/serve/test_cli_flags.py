"""The chat CLI's loading flags: ``--load-4bit`` / ``--load-8bit``, ``--vision-tower``, ``--model-base``.

``palo.serve.cli.main`` runs in this process (stdin from a string) so each chat costs a model load, not an
interpreter start; ``test_cli.py`` runs the CLI as a separate process. Each test compares the chat transcript with
one whose outcome is known, so a flag that is parsed but not acted on fails.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

from palo.model import builder
from palo.serve import cli
from palo.testing import tiny

QUESTIONS = "What is in the image?\nما لون الدائرة؟\n\n"


@pytest.fixture
def image_file(tmp_path) -> str:
    image = Image.new("RGB", (120, 80), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    path = tmp_path / "circle.png"
    image.save(path)
    return str(path)


@pytest.fixture
def loads(monkeypatch) -> list:
    """The models the CLI loads (the real loader, only watched)."""
    seen = []
    real = builder.load_pretrained_model

    def watched(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(result[1])
        return result

    monkeypatch.setattr(builder, "load_pretrained_model", watched)
    return seen


def chat(monkeypatch, capsys, *args: str) -> tuple[int, list[str], str]:
    """Run the CLI on two questions; (exit status, the two answers, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS))
    capsys.readouterr()
    rc = cli.main([*args, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    answers = [line[len("ASSISTANT: "):] for line in captured.out.splitlines() if line.startswith("ASSISTANT: ")]
    return rc, answers, captured.err


@pytest.mark.parametrize("flag,layer", [("--load-4bit", "Linear4bit"), ("--load-8bit", "Linear8bitLt")])
def test_quantised_chat(world, image_file, monkeypatch, capsys, loads, flag, layer):
    pytest.importorskip("bitsandbytes")
    rc, answers, err = chat(monkeypatch, capsys, "--model-path", world.full_dir, "--image-file", image_file, flag)
    assert rc == 0, err
    assert len(answers) == 2 and all(answers)
    model = loads[-1]
    kinds = {type(m).__name__ for n, m in model.named_modules()
             if n.startswith("model.layers.") and n.endswith("_proj")}
    assert kinds == {layer}  # the language model really is quantised
    assert type(model.lm_head).__name__ == "Linear"  # and the head, projector and tower are not


def test_both_quantisation_flags_are_refused(world, image_file, monkeypatch, capsys):
    rc, answers, err = chat(monkeypatch, capsys, "--model-path", world.full_dir, "--image-file", image_file,
                            "--load-4bit", "--load-8bit")
    assert rc == 2 and not answers and "one of --load-8bit and --load-4bit" in err


def test_vision_tower_flag_replaces_an_unreachable_tower(world, image_file, tmp_path, monkeypatch, capsys, loads):
    # A stage-1 output whose config names a CLIP that is neither a folder nor cached (the offline case).
    moved = tmp_path / "stage1_moved"
    shutil.copytree(world.projector_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["mm_vision_tower"] = "unreachable-org/clip-not-cached"
    (moved / "config.json").write_text(json.dumps(config))
    base = ["--model-base", world.base_dir, "--image-file", image_file]

    rc, answers, err = chat(monkeypatch, capsys, "--model-path", str(moved), *base)
    assert rc == 2 and not answers and "--vision-tower" in err

    rc, with_flag, err = chat(monkeypatch, capsys, "--model-path", str(moved), "--vision-tower", world.clip_dir, *base)
    assert rc == 0, err
    tower = loads[-1].get_vision_tower()
    for key, value in world.model.get_vision_tower().state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    # The same chat as with the original folder, whose config names that CLIP itself.
    rc, reference, err = chat(monkeypatch, capsys, "--model-path", world.projector_dir, *base)
    assert rc == 0, err
    assert with_flag == reference and len(reference) == 2


def test_model_base_flag_merges_the_lora_adapter(world, image_file, tmp_path, monkeypatch, capsys, loads):
    rc, answers, err = chat(monkeypatch, capsys, "--model-path", world.lora_dir, "--image-file", image_file)
    assert rc == 2 and not answers and "--model-base" in err

    rc, lora, err = chat(monkeypatch, capsys, "--model-path", world.lora_dir, "--model-base", world.base_dir,
                         "--image-file", image_file)
    assert rc == 0, err
    merged = loads[-1]
    # The chat of that merged model saved as a full checkpoint is the same; the base alone would differ.
    full = tiny.write_full_checkpoint(str(tmp_path / "merged"), merged, world.config, world.tokenizer_dir)
    rc, reference, err = chat(monkeypatch, capsys, "--model-path", full, "--image-file", image_file)
    assert rc == 0, err
    assert lora == reference and len(lora) == 2
    rc, without_adapter, err = chat(monkeypatch, capsys, "--model-path", world.full_dir, "--image-file", image_file)
    assert rc == 0 and without_adapter != lora
