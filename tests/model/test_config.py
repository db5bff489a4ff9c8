"""MultimodalSpec, the one reader of a checkpoint's mm_* keys, and the prompt rules it owns."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from palo.model.config import (
    DEFAULT_VISION_SELECT_LAYER,
    MultimodalSpec,
    PaloConfig,
    expand_image_placeholders,
    image_placeholder,
)
from palo.model.palo_llama import PaloForCausalLM
from palo.testing import tiny
from palo.train.arguments import ModelArguments


def test_the_placeholder_rule():
    assert image_placeholder(False) == "<image>"
    assert image_placeholder(True) == "<im_start><image><im_end>"
    text = "<image>\nWhat is this? <image>"
    assert expand_image_placeholders(text, False) == text
    assert expand_image_placeholders(text, True) == "<im_start><image><im_end>\nWhat is this? <im_start><image><im_end>"
    wrapped = MultimodalSpec.from_config(SimpleNamespace(mm_use_im_start_end=True))
    assert wrapped.image_placeholder == image_placeholder(True)
    assert wrapped.expand_image_placeholders(text) == expand_image_placeholders(text, True)
    assert MultimodalSpec.from_config(SimpleNamespace()).image_placeholder == "<image>"


def test_a_released_config_reads_as_before(world):
    config = PaloConfig(**{k: v for k, v in world.config.items() if k != "model_type"})
    spec = MultimodalSpec.from_config(config)
    assert (spec.select_layer, spec.select_feature, spec.projector_type) == (-2, "patch", "mlp2x_gelu")
    assert (spec.use_im_start_end, spec.image_aspect_ratio) == (False, "pad")
    assert (spec.max_length, spec.padding_side) == (2048, "right")
    # Absent keys keep the original's load-time defaults.
    bare = MultimodalSpec.from_config(SimpleNamespace(mm_vision_tower="clip", mm_vision_select_layer=-2))
    assert ((bare.image_aspect_ratio, bare.max_length, bare.padding_side, bare.use_im_start_end)
            == (None, None, "right", False))
    assert bare.use_im_patch_token is True


def test_ldp_with_the_cls_feature_is_refused_when_the_config_is_read(world, tmp_path):
    """LDP pools a square grid; with ``cls_patch`` the checkpoint loaded and the first image raised inside the engine
    (tracebacks from model_vqa, the CLI and the worker)."""
    from palo.model.builder import load_pretrained_model

    refused = "mm_projector_type='ldpnet' needs mm_vision_select_feature='patch'"
    with pytest.raises(ValueError, match=refused):
        MultimodalSpec.from_config(SimpleNamespace(mm_vision_tower="clip", mm_vision_select_layer=-2,
                                                   mm_projector_type="ldpnet", mm_vision_select_feature="cls_patch"))
    folder = tmp_path / "ldp-cls"
    shutil.copytree(world.full_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, mm_projector_type="ldpnet",
                                                        mm_vision_select_feature="cls_patch")))
    with pytest.raises(ValueError, match=refused):
        load_pretrained_model(str(folder), None, "ldp-cls", device="cpu")


def test_select_layer_is_read_from_the_config_and_training_defaults_to_the_same():
    assert DEFAULT_VISION_SELECT_LAYER == -2 == ModelArguments().mm_vision_select_layer
    for stored in (-1, -2, -5):
        spec = MultimodalSpec.from_config(SimpleNamespace(mm_vision_tower="clip", mm_vision_select_layer=stored))
        assert spec.select_layer == stored  # whatever config.json stores, never the default
    with pytest.raises(ValueError, match="no mm_vision_select_layer"):
        MultimodalSpec.from_config(SimpleNamespace(mm_vision_tower="clip"))
    assert MultimodalSpec.from_config(SimpleNamespace()).select_layer == DEFAULT_VISION_SELECT_LAYER


def _model(projector_type: str, image_size: int, patch_size: int, select_feature: str = "patch") -> PaloForCausalLM:
    shapes = tiny.TinyShapes(image_size=image_size, patch_size=patch_size)
    config = tiny.palo_config_dict(tiny.tiny_llama_config(100, shapes), "unresolvable/clip",
                                   projector_type=projector_type, mm_vision_select_feature=select_feature,
                                   mm_vision_config=tiny.tiny_clip_config(shapes).to_dict())
    torch.manual_seed(0)
    return PaloForCausalLM(PaloConfig(**{k: v for k, v in config.items() if k != "model_type"})).eval()


@pytest.mark.parametrize(
    ("projector_type", "image_size", "patch_size", "select_feature", "expected"),
    [
        ("linear", 56, 14, "patch", 16),
        ("linear", 42, 14, "cls_patch", 10),
        ("mlp2x_gelu", 56, 14, "patch", 16),
        ("mlp2x_gelu", 28, 7, "cls_patch", 17),
        ("ldpnet", 56, 14, "patch", 4),
        ("ldpnet", 70, 14, "patch", 9),  # a 5 x 5 grid: the stride-2 conv gives 3 x 3
        ("ldpnet", 64, 8, "patch", 16),
    ],
)
def test_token_count_from_the_config_is_what_tower_and_projector_produce(projector_type, image_size, patch_size,
                                                                        select_feature, expected):
    model = _model(projector_type, image_size, patch_size, select_feature)
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    count = model.image_token_count
    assert calls == []  # counted from the config: nothing ran
    spec = MultimodalSpec.from_config(model.config)
    assert count == spec.tokens_per_image(model.vision_tower.config) == expected
    with torch.no_grad():
        features = model.encode_images(torch.randn(2, 3, image_size, image_size))
    assert calls == [1]
    assert features.shape == (2, count, model.config.hidden_size)
