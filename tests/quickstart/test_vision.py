"""Pre-training the quickstart's vision tower: labels from the drawing, a tower that learns, an atomic save."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from palo.model.vision_tower import CLIPVisionTower, VisionFeatureSpec
from palo.quickstart import shapes_task, vision
from palo.testing.tiny import TinyShapes, save_tiny_clip

SHAPES = replace(TinyShapes(), vision_hidden=32, vision_layers=2, image_size=84, patch_size=14)


def _draw(folder: str, count: int, seed: int = 0) -> list[shapes_task.ImageSpec]:
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    specs = [shapes_task.sample_spec(rng, f"img-{i}.png", 84) for i in range(count)]
    for spec in specs:
        shapes_task.draw(spec).save(os.path.join(folder, spec.name))
    return specs


def test_labels_follow_the_drawing_parameters():
    spec = shapes_task.ImageSpec("x.png", 84, "yellow", "triangle", ((1, 1, 10, 10), (30, 30, 40, 40)))
    assert vision.labels(spec) == [3, 2, 1]
    assert [list(shapes_task.COLOURS)[0], shapes_task.SHAPES[0], shapes_task.COUNTS[0]] == ["red", "circle", 1]


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
    out = str(tmp_path / "trained")
    os.makedirs(out)
    specs = _draw(str(tmp_path / "images"), 200)
    schedule = vision.TowerPretraining(steps=80, batch_size=32, lr=3e-3)
    summary = vision.pretrain_tower(clip, out, str(tmp_path / "images"), specs, schedule, progress=False)

    assert summary["held_out_images"] == 20 and summary["train_images"] == 180
    # Colour is one linear read-out of the pixels: a few dozen steps take it from chance (25 %) to near 100 %.
    assert summary["held_out_accuracy_before"]["colour"] < 0.6
    assert summary["held_out_accuracy_after"]["colour"] >= 0.9
    saved = json.load(open(os.path.join(out, vision.DONE_FILE)))
    assert saved["held_out_accuracy_after"] == summary["held_out_accuracy_after"]
    assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))

    # The saved weights are the trained ones (the random start in ``clip`` is left as it was), in a layout both
    # transformers and the model's own tower (the --vision_tower path of training) load.
    random_weights = CLIPVisionModel.from_pretrained(clip).state_dict()
    trained = CLIPVisionModel.from_pretrained(out).state_dict()
    assert random_weights.keys() == trained.keys()
    assert any(not torch.equal(trained[k], v) for k, v in random_weights.items())
    tower = CLIPVisionTower(out, CLIPVisionConfig.from_pretrained(out), VisionFeatureSpec(-2))
    tower.load_weights_from(out)
    for key, value in tower.vision_tower.vision_model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_too_few_images_is_a_clear_error(tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"), SHAPES, seed=0)
    specs = _draw(str(tmp_path / "images"), 3)
    with pytest.raises(ValueError, match="at least 10 images"):
        vision.pretrain_tower(clip, str(tmp_path / "out"), str(tmp_path / "images"), specs,
                              vision.TowerPretraining(steps=1), progress=False)
