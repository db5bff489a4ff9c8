"""Checkpoints as they were released or trained elsewhere: formats the shared ``world`` fixture does not write.

* every remaining on-disk format (sharded ``.safetensors``, one ``pytorch_model.bin``, ``adapter_model.safetensors``)
  loads to the logits of the reference model;
* a LLaVA-1.5 checkpoint (``model_type`` ``llava_llama``) loads through ``load_pretrained_model`` and generates;
* a released PALO checkpoint (config without ``mm_vision_config``, ``mm_vision_tower`` the hub id of CLIP ViT-L/14-336)
  loads offline with no CLIP anywhere: the tower's architecture from the built-in preset, its weights from the
  checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import palo.model  # noqa: F401 - registers the Auto classes
from palo.conversation import conv_mode_for_checkpoint, conv_templates
from palo.mm_utils import tokenizer_image_token
from palo.model.builder import CheckpointKind, detect_checkpoint_kind, load_pretrained_model
from palo.model.palo_llama import LlavaLlamaForCausalLM, PaloForCausalLM
from palo.model.vision_tower import VISION_PRESETS, VisionTowerError
from palo.testing import tiny

PROMPT = "A chat. USER: <image>\nما الذي في الصورة؟ ASSISTANT:"


def _logits(model, tokenizer, pixels: torch.Tensor | None, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        return model(input_ids=ids, images=pixels).logits


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 56, 56)


# -- formats ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,shards,files", [
    ("safetensors", 3, {"model.safetensors.index.json", "model-00001-of-00003.safetensors",
                        "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}),
    ("bin", 1, {"pytorch_model.bin"}),
])
def test_full_checkpoint_format_loads_to_the_reference_logits(world, tmp_path, pixels, fmt, shards, files):
    folder = tiny.write_full_checkpoint(str(tmp_path / "ckpt"), world.model, world.config, world.tokenizer_dir,
                                        fmt=fmt, shards=shards)
    written = {f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".index.json"))}
    assert written == files  # the format under test, and nothing else the loader could fall back to
    assert detect_checkpoint_kind(folder) is CheckpointKind.FULL
    tokenizer, model, _, _ = load_pretrained_model(folder, device="cpu")
    reference = world.model.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=0, atol=0)


def test_adapter_model_safetensors_loads_like_adapter_model_bin(world, tmp_path, pixels):
    folder, adapter = tiny.write_lora_checkpoint(str(tmp_path / "finetune_out"), world.model, world.config,
                                                 world.base_dir, adapter_format="safetensors")
    assert "adapter_model.safetensors" in os.listdir(folder) and "adapter_model.bin" not in os.listdir(folder)
    # Same seed, so the same adapter tensors as the world's adapter_model.bin.
    assert adapter.keys() == world.lora_adapter.keys()
    assert all(torch.equal(adapter[k], world.lora_adapter[k]) for k in adapter)
    tokenizer, from_st, _, _ = load_pretrained_model(folder, world.base_dir, device="cpu")
    _, from_bin, _, _ = load_pretrained_model(world.lora_dir, world.base_dir, device="cpu")
    merged = _logits(from_st, tokenizer, pixels)
    torch.testing.assert_close(merged, _logits(from_bin, tokenizer, pixels), rtol=0, atol=0)
    # The adapter was applied (the base model's logits differ), and the merge is W + (alpha / r) B A by hand.
    assert not torch.allclose(merged, _logits(world.model, tokenizer, pixels), atol=1e-3)
    state = world.model.state_dict()
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            target = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            state[target] = state[target] + (16 / 8) * b @ a
    reference = tiny.build_palo_model(world.config, world.clip_dir)
    reference.load_state_dict(state)
    torch.testing.assert_close(merged, _logits(reference, tokenizer, pixels), rtol=1e-5, atol=1e-5)


# -- LLaVA-1.5 ----------------------------------------------------------------------------------------------------


def llava15_config(world) -> dict:
    """config.json as LLaVA-1.5's training writes it (``llava_llama``, ``LlavaLlamaForCausalLM``, its extra keys)."""
    config = dict(world.config)
    config.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_patch_merge_type="flat",
        mm_vision_select_feature="patch",
        image_grid_pinpoints=None,
        unfreeze_mm_vision_tower=False,
        mm_projector_lr=None,
    )
    return config


def test_llava_llama_checkpoint_loads_and_generates(world, tmp_path, pixels):
    folder = tiny.write_full_checkpoint(str(tmp_path / "llava-v1.5-tiny"), world.model, llava15_config(world),
                                        world.tokenizer_dir)
    tokenizer, model, processor, context_len = load_pretrained_model(folder, None, "llava-v1.5-tiny", device="cpu")
    assert isinstance(model, PaloForCausalLM) and model.config.model_type == "llava_llama"
    assert processor is not None and context_len == 2048
    # LLaVA-1.5 checkpoints talk with LLaVA's own template, not PALO's.
    mode = conv_mode_for_checkpoint(model.config, "llava-v1.5-tiny")
    assert mode == "llava_v1"
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=0, atol=0)
    conv = conv_templates[mode].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is in the image?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = world.model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6) and torch.equal(out, expected)
    # transformers' Auto classes know the model_type too (after `import palo.model`).
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(auto, LlavaLlamaForCausalLM)
    torch.testing.assert_close(_logits(auto, tokenizer, pixels), _logits(world.model, tokenizer, pixels))


def test_llava_15_release_config_with_model_type_llava_loads_as_the_flat_format(world, tmp_path, pixels):
    """LLaVA-1.5's release wrote ``model_type`` ``llava`` on its flat LLaMA + mm_* configs; transformers maps that to
    its own nested LlavaConfig, and loading died in transformers with "'dict' object has no attribute 'to_dict'",
    for full and stage-1 folders alike."""
    config = dict(llava15_config(world), model_type="llava")
    full = tiny.write_full_checkpoint(str(tmp_path / "full"), world.model, config, world.tokenizer_dir)
    tokenizer, model, processor, _ = load_pretrained_model(full, device="cpu")
    assert processor is not None and model.config.model_type == "llava_llama"
    assert conv_mode_for_checkpoint(model.config) == "llava_v1"
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=0, atol=0)
    stage1 = tiny.write_projector_checkpoint(str(tmp_path / "stage1"), world.model, config)
    _, from_projector, _, _ = load_pretrained_model(stage1, world.base_dir, device="cpu")
    assert from_projector.config.model_type == "llava_llama"
    # The projector's weights arrived (rounded through float16, as the original's stage-1 branch does).
    for key, value in world.model.state_dict().items():
        if key.startswith("model.mm_projector."):
            torch.testing.assert_close(from_projector.state_dict()[key], value.half().float(), rtol=0, atol=0)


def test_a_mobilevlm_config_loads_as_the_flat_format(world, tmp_path, pixels):
    """MobileVLM writes ``model_type`` ``mobilevlm`` (and ``vision_tower_type``), which transformers does not know:
    the same flat LLaMA + mm_* format as PALO's, read as such."""
    config = dict(world.config, model_type="mobilevlm", architectures=["MobileLlamaForCausalLM"],
                  vision_tower_type="clip")
    folder = tiny.write_full_checkpoint(str(tmp_path / "mobilevlm"), world.model, config, world.tokenizer_dir)
    tokenizer, model, processor, _ = load_pretrained_model(folder, device="cpu")
    assert processor is not None and conv_mode_for_checkpoint(model.config) == "vicuna_v1"
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=0, atol=0)


def test_a_transformers_llava_config_is_not_read_as_the_flat_format(tmp_path):
    """Only flat LLaMA + mm_* configs named ``llava`` are PALO's: transformers' own nested Llava config (text_config,
    vision_config) keeps its own class."""
    from transformers import LlavaConfig

    from palo.model.builder import read_config

    LlavaConfig().save_pretrained(str(tmp_path))
    assert type(read_config(str(tmp_path))) is LlavaConfig


@pytest.mark.parametrize("model_type", ["llava_mistral", "llava_mpt"])
def test_llavas_on_other_language_models_are_named_as_not_palo_formats(world, tmp_path, model_type):
    """transformers' refusal advised upgrading it, which can never help (docs/formats.md: not PALO formats)."""
    from palo.model.builder import CheckpointError

    folder = tiny.write_full_checkpoint(str(tmp_path / model_type), world.model, dict(world.config,
                                        model_type=model_type), world.tokenizer_dir)
    with pytest.raises(CheckpointError, match=f"model_type '{model_type}' is LLaVA's .* model, not a format PALO "
                                              "loads") as refused:
        load_pretrained_model(folder, device="cpu")
    assert "upgrade" not in str(refused.value)


# -- a released checkpoint: CLIP ViT-L/14-336 by hub id, no mm_vision_config, offline, nothing cached ---------------

CLIP_L_336 = "openai/clip-vit-large-patch14-336"
# The vision part of that model's published config.json, written out here rather than taken from the project's
# preset, so the test also checks the preset's values.
PUBLISHED_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=768)
TOWER = "model.vision_tower.vision_tower."


def _released_tower_state() -> dict[str, torch.Tensor]:
    """CLIP ViT-L/14-336 tower weights under their released key names, in float16 as training saved them.

    Each tensor is filled with its own constant (no 300M random draws: the test is about which weights arrive where,
    not about what CLIP computes), so every tensor can be told apart after loading.
    """
    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(**PUBLISHED_CLIP_L_336))
    inner = getattr(clip, "vision_model", clip)
    state = {}
    for i, (name, tensor) in enumerate(sorted(inner.state_dict().items())):
        key = TOWER + "vision_model." + name
        if name.endswith("position_ids"):  # the legacy buffer 4.31-era checkpoints carry
            state[key] = torch.arange(tensor.shape[-1]).unsqueeze(0)
        else:
            state[key] = torch.full(tensor.shape, (i % 97 + 1) / 128, dtype=torch.float16)
    return state


@pytest.fixture
def offline_without_clip(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: CLIP cannot come from anywhere."""
    hf_home = tmp_path / "empty_hf_home"
    (hf_home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as tf_hub

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(tf_hub, "TRANSFORMERS_CACHE", str(hf_home / "hub"), raising=False)
    # The precondition: neither the config nor the weights of CLIP are reachable.
    from palo.model.builder import _available_locally

    assert not _available_locally(CLIP_L_336)
    with pytest.raises(OSError):
        CLIPVisionConfig.from_pretrained(CLIP_L_336)
    return hf_home


@pytest.fixture(scope="module")
def released_checkpoint(world, tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A PALO-7B-style full checkpoint with a tiny LLM: the released config keys, the full CLIP-L tower inside."""
    config = tiny.palo_config_dict(tiny.tiny_llama_config(world.config["vocab_size"]), CLIP_L_336,
                                   mm_hidden_size=1024)
    assert "mm_vision_config" not in config
    torch.manual_seed(3)
    projector = {"model.mm_projector.0.weight": torch.randn(64, 1024) * 0.02,
                 "model.mm_projector.0.bias": torch.zeros(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64) * 0.02,
                 "model.mm_projector.2.bias": torch.zeros(64)}
    llm = {k: v.clone().contiguous() for k, v in world.model.state_dict().items()
           if not k.startswith((TOWER, "model.mm_projector."))}
    tower = _released_tower_state()
    folder = tmp_path_factory.mktemp("released") / "PALO-7B-like"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({**llm, **projector, **tower}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    tiny._copy_tokenizer(world.tokenizer_dir, str(folder))
    return str(folder), {**projector, **tower}


@pytest.mark.slow  # a real 300M-parameter CLIP-L tower is written (600 MB in float16) and loaded: ~15 s
def test_released_checkpoint_loads_offline_through_the_clip_l_preset(world, released_checkpoint,
                                                                     offline_without_clip, capsys):
    folder, stored = released_checkpoint
    start = time.perf_counter()
    tokenizer, model, processor, _ = load_pretrained_model(folder, None, "PALO-7B", device="cpu")
    seconds = time.perf_counter() - start
    tower = model.get_vision_tower()
    # The architecture is CLIP ViT-L/14-336's: 24 layers of width 1024, 336 px in patches of 14 -> 576 tokens.
    for key, value in PUBLISHED_CLIP_L_336.items():
        assert getattr(tower.config, key) == value, key
    assert tower.num_tokens == 576 and len(tower.vision_tower.vision_model.encoder.layers) == 24
    # Every tower and projector weight is the checkpoint's own (float16 on disk, exact in float32).
    loaded = model.state_dict()
    assert {k for k in loaded if k.startswith(TOWER)} == {k for k in stored if k.startswith(TOWER)} - {
        k for k in stored if k.endswith("position_ids")}
    for key, value in stored.items():
        if not key.endswith("position_ids"):
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.float()), key
    # CLIP's standard 336 px preprocessing, since no preprocessor config is reachable either.
    assert processor.crop_size == {"height": 336, "width": 336} and processor.size["shortest_edge"] == 336
    assert list(processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # The language model is the reference's (text-only prompts never touch the tower), and it generates.
    text = "A chat. USER: كم عدد الأشكال؟ ASSISTANT:"
    torch.testing.assert_close(_logits(model, tokenizer, None, text), _logits(world.model, tokenizer, None, text),
                               rtol=0, atol=0)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    with capsys.disabled():
        print(f"\n[released CLIP-L/336 checkpoint loaded offline in {seconds:.1f} s]")


def test_without_the_preset_the_released_checkpoint_cannot_load_offline(released_checkpoint, offline_without_clip,
                                                                        monkeypatch):
    """The control: it is the preset, and nothing else, that supplies the architecture above."""
    folder, _ = released_checkpoint
    monkeypatch.delitem(VISION_PRESETS, CLIP_L_336)
    with pytest.raises(VisionTowerError, match="Cannot resolve the vision tower 'openai/clip-vit-large-patch14-336'"):
        load_pretrained_model(folder, None, "PALO-7B", device="cpu")


def test_loading_a_checkpoint_whose_select_layer_is_outside_clip_fails_naming_it(world, tmp_path):
    """mm_vision_select_layer 4 on a 3-layer CLIP loaded and silently fed the embedding output (4 % 4 = 0)."""
    config = dict(world.config, mm_vision_select_layer=4)
    folder = tiny.write_full_checkpoint(str(tmp_path / "ckpt"), world.model, config, world.tokenizer_dir)
    with pytest.raises(ValueError, match="mm_vision_select_layer=4 is outside"):
        load_pretrained_model(folder, device="cpu")
