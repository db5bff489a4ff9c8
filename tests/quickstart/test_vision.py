"""Pre-training the quickstart's vision tower: labels from the drawing, a tower that learns, an atomic save."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import pytest
import torch
from transformers import CLIPVisionModel

from palo.quickstart import data, vision
from palo.testing.tiny import TinyShapes, save_tiny_clip

SHAPES = replace(TinyShapes(), vision_hidden=32, vision_layers=2, image_size=84, patch_size=14)


def _draw(folder: str, count: int, seed: int = 0) -> list[data.ImageSpec]:
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    specs = [data.sample_spec(rng, f"img-{i}.png", 84) for i in range(count)]
    for spec in specs:
        data.draw(spec).save(os.path.join(folder, spec.name))
    return specs


def test_labels_follow_the_drawing_parameters():
    spec = data.ImageSpec("x.png", 84, "yellow", "triangle", ((1, 1, 10, 10), (30, 30, 40, 40)))
    assert vision.labels(spec) == [3, 2, 1]
    assert [list(data.COLOURS)[0], data.SHAPES[0], data.COUNTS[0]] == ["red", "circle", 1]


def test_probe_reads_every_token_on_its_own():
    probe = vision.AttributeProbe(8)
    features = torch.randn(2, 5, 8)
    logits = probe(features)
    assert [t.shape for t in logits] == [(2, 5, 4), (2, 5, 3), (2, 5, 3)]
    # Token 0's logits do not depend on the other tokens: the tower alone must put the image's attributes in it.
    alone = probe(features[:, :1])
    assert all(torch.allclose(a[:, :1], b, atol=1e-6) for a, b in zip(logits, alone))
    targets = torch.tensor([[0, 1, 2], [3, 0, 1]])
    expected = sum(torch.nn.functional.cross_entropy(lg[b, t], targets[b, k]) for k, lg in enumerate(logits)
                   for b in range(2) for t in range(5)) / 10
    assert torch.allclose(vision.probe_loss(logits, targets), expected, atol=1e-6)


def test_pretraining_learns_colour_and_saves_a_loadable_tower(tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"), SHAPES, seed=0)
    random_weights = CLIPVisionModel.from_pretrained(clip).state_dict()
    specs = _draw(str(tmp_path / "images"), 200)
    schedule = vision.TowerPretraining(steps=80, batch_size=32, lr=3e-3)
    summary = vision.pretrain_tower(clip, str(tmp_path / "images"), specs, schedule, progress=False)

    assert summary["held_out_images"] == 20 and summary["train_images"] == 180
    # Colour is one linear read-out of the pixels: a few dozen steps take it from chance (25 %) to near 100 %.
    assert summary["held_out_accuracy_before"]["colour"] < 0.6
    assert summary["held_out_accuracy_after"]["colour"] >= 0.9
    saved = json.load(open(os.path.join(clip, vision.DONE_FILE)))
    assert saved["held_out_accuracy_after"] == summary["held_out_accuracy_after"]
    tower = CLIPVisionModel.from_pretrained(clip)
    assert any(not torch.equal(tower.state_dict()[k], v) for k, v in random_weights.items())
    assert os.path.isfile(os.path.join(clip, "preprocessor_config.json"))
    assert sorted(os.listdir(tmp_path)) == ["clip", "images"]  # no staging or backup folder left behind


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"), SHAPES, seed=0)
    os.replace(clip, clip + ".random")  # what a crash right after the first rename leaves
    specs = _draw(str(tmp_path / "images"), 20)
    vision.pretrain_tower(clip, str(tmp_path / "images"), specs, vision.TowerPretraining(steps=1, batch_size=4),
                          progress=False)
    assert os.path.isfile(os.path.join(clip, vision.DONE_FILE)) and not os.path.exists(clip + ".random")


def test_too_few_images_is_a_clear_error(tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"), SHAPES, seed=0)
    specs = _draw(str(tmp_path / "images"), 3)
    with pytest.raises(ValueError, match="at least 10 images"):
        vision.pretrain_tower(clip, str(tmp_path / "images"), specs, vision.TowerPretraining(steps=1), progress=False)
