"""load_pretrained_model on every original on-disk format, from neutrally named folders."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import palo.model  # noqa: F401 - registers the Auto classes
from palo.mm_utils import tokenizer_image_token
from palo.model.builder import CheckpointError, load_pretrained_model
from palo.model.palo_llama import PaloForCausalLM
from palo.model.vision_tower import VisionTowerError
from palo.testing import tiny

PROMPT = "A chat. USER: <image>\nما الذي في الصورة؟ ASSISTANT:"


def _logits(model, tokenizer, pixels: torch.Tensor, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        return model(input_ids=ids, images=pixels).logits


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 56, 56)


def test_full_safetensors_loads_exact_weights(world, pixels):
    tokenizer, model, processor, context_len = load_pretrained_model(world.full_dir, None, "ckpt_a", device="cpu")
    assert isinstance(model, PaloForCausalLM)
    assert context_len == 2048
    assert processor is model.get_vision_tower().image_processor
    assert model.dtype == torch.float32
    reference = world.model.state_dict()
    loaded = model.state_dict()
    assert set(reference) == set(loaded)
    for key in reference:
        torch.testing.assert_close(loaded[key], reference[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels))


@pytest.mark.parametrize("folder", ["full_dir", "full_bin_dir", "ldp_dir"])
def test_full_formats_have_no_missing_or_unexpected_keys(world, folder):
    _, info = PaloForCausalLM.from_pretrained(getattr(world, folder), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]  # the legacy CLIP position_ids buffer is ignored, nothing else is extra
    assert not info["mismatched_keys"]


def test_sharded_bin_equals_safetensors(world, pixels):
    tok_a, model_a, _, _ = load_pretrained_model(world.full_dir, device="cpu")
    _, model_b, _, _ = load_pretrained_model(world.full_bin_dir, device="cpu")
    torch.testing.assert_close(_logits(model_a, tok_a, pixels), _logits(model_b, tok_a, pixels), rtol=0, atol=0)


def test_ldp_checkpoint_uses_144_style_token_reduction(world, pixels):
    tokenizer, model, _, _ = load_pretrained_model(world.ldp_dir, device="cpu")
    features = model.encode_images(pixels)
    assert features[0].shape == (4, 64)  # 16 patches on a 4x4 grid -> 2x2 after the stride-2 block
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    assert _logits(model, tokenizer, pixels).shape[1] == ids.shape[1] - 1 + 4
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.ldp_model, tokenizer, pixels))


def test_projector_checkpoint_with_base(world, pixels):
    tokenizer, model, _, _ = load_pretrained_model(world.projector_dir, world.base_dir, "stage1_out", device="cpu")
    # Equal up to the original's float16 rounding of the projector weights (tested exactly below).
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=1e-3, atol=1e-3)


def test_lora_checkpoint_with_base_equals_manual_merge(world, pixels):
    tokenizer, model, _, _ = load_pretrained_model(world.lora_dir, world.base_dir, "finetune_out", device="cpu")
    assert isinstance(model, PaloForCausalLM)
    # Merge by hand: W + (alpha / r) * B @ A for every adapted linear of the language model.
    reference = tiny.build_palo_model(world.config, world.clip_dir)
    reference.load_state_dict(world.model.state_dict())
    scale = 16 / 8
    state = reference.state_dict()
    for key, a in world.lora_adapter.items():
        if ".lora_A." not in key:
            continue
        b = world.lora_adapter[key.replace(".lora_A.", ".lora_B.")]
        target = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        state[target] = state[target] + scale * b @ a
    reference.load_state_dict(state)
    ours = _logits(model, tokenizer, pixels)
    torch.testing.assert_close(ours, _logits(reference, tokenizer, pixels), rtol=1e-5, atol=1e-5)
    # The adapter really changed the model.
    assert not torch.allclose(ours, _logits(world.model, tokenizer, pixels), atol=1e-3)
    # The CLIP tower (which also has q_proj/k_proj/v_proj) is untouched by the adapter.
    for key, value in world.model.get_vision_tower().state_dict().items():
        torch.testing.assert_close(model.get_vision_tower().state_dict()[key], value, rtol=0, atol=0)


def test_kind_comes_from_files_not_names(world, tmp_path, pixels):
    # A LoRA output under the README's own name (no "lora" in it) and a full model under a name with "lora".
    lora_named_palo = tmp_path / "results" / "PALO-7B"
    shutil.copytree(world.lora_dir, lora_named_palo)
    full_named_lora = tmp_path / "my-lora-test"
    shutil.copytree(world.full_dir, full_named_lora)
    tok, lora_model, _, _ = load_pretrained_model(str(lora_named_palo), world.base_dir, "PALO-7B", device="cpu")
    _, full_model, _, _ = load_pretrained_model(str(full_named_lora), None, "my-lora-test", device="cpu")
    assert lora_model.get_model().layers[0].self_attn.q_proj.weight.shape == (64, 64)
    torch.testing.assert_close(_logits(full_model, tok, pixels), _logits(world.model, tok, pixels))


def test_hub_ids_through_local_cache_offline(world, tmp_path, monkeypatch, pixels):
    hf_home = tmp_path / "hf"
    tiny.install_in_hf_cache(world.clip_dir, "test-org/tiny-clip", str(hf_home))
    checkpoint = tmp_path / "staging"
    shutil.copytree(world.projector_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["mm_vision_tower"] = "test-org/tiny-clip"
    (checkpoint / "config.json").write_text(json.dumps(config))
    tiny.install_in_hf_cache(str(checkpoint), "test-org/tiny-stage1", str(hf_home))
    tiny.install_in_hf_cache(world.base_dir, "test-org/tiny-base", str(hf_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    import transformers.utils.hub as tf_hub

    monkeypatch.setattr(tf_hub, "TRANSFORMERS_CACHE", str(hf_home / "hub"), raising=False)
    from huggingface_hub import snapshot_download

    assert snapshot_download("test-org/tiny-base").startswith(str(hf_home))
    tokenizer, model, processor, _ = load_pretrained_model("test-org/tiny-stage1", "test-org/tiny-base", device="cpu")
    assert processor.crop_size["height"] == 56
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=1e-3, atol=1e-3)


def test_tower_weights_in_checkpoint_need_no_tower_source(world, tmp_path, pixels):
    # The full checkpoint carries the tower's weights: it must load although mm_vision_tower is unreachable,
    # given the architecture (here through the built-in preset path: mm_vision_config recorded in config.json).
    folder = tmp_path / "moved"
    shutil.copytree(world.full_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "gone-clip")
    config["mm_vision_config"] = tiny.tiny_clip_config().to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer, model, processor, _ = load_pretrained_model(str(folder), device="cpu")
    assert processor.crop_size["height"] == 56  # standard CLIP preprocessing at the tower's own size
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels))


def test_tower_weights_come_from_mm_vision_tower_when_available(world, tmp_path, pixels):
    # A full checkpoint whose stored tower differs (training stored it in half precision) from mm_vision_tower.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "half_tower"
    shutil.copytree(world.full_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    for key in state:
        if key.startswith("model.vision_tower.") and state[key].is_floating_point():
            state[key] = state[key].half().float() + 0.01
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer, model, _, _ = load_pretrained_model(str(folder), device="cpu")
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels))
    # With mm_vision_tower gone, the checkpoint's own copy is used (and it is a different tower).
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "gone-clip")
    config["mm_vision_config"] = tiny.tiny_clip_config().to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    _, offline_model, _, _ = load_pretrained_model(str(folder), device="cpu")
    stored = offline_model.get_vision_tower().vision_tower.vision_model.embeddings.patch_embedding.weight
    torch.testing.assert_close(stored,
                               state["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"])


def test_stage1_projector_is_rounded_through_float16_as_the_original(world, pixels):
    _, model, _, _ = load_pretrained_model(world.projector_dir, world.base_dir, device="cpu")
    loaded = model.projector.state_dict()["0.weight"]
    original = world.model.projector.state_dict()["0.weight"]
    torch.testing.assert_close(loaded, original.half().float(), rtol=0, atol=0)


def test_vision_tower_override(world, tmp_path, pixels):
    folder = tmp_path / "elsewhere"
    shutil.copytree(world.projector_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "unreachable-org/clip-that-is-not-cached"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VisionTowerError, match="--vision-tower"):
        load_pretrained_model(str(folder), world.base_dir, device="cpu")
    tokenizer, model, _, _ = load_pretrained_model(str(folder), world.base_dir, device="cpu",
                                                   vision_tower=world.clip_dir)
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels),
                               rtol=1e-3, atol=1e-3)


def test_auto_model_for_causal_lm_after_import(world, pixels):
    model = AutoModelForCausalLM.from_pretrained(world.full_dir)
    assert isinstance(model, PaloForCausalLM)
    tokenizer = palo.model.tokenizer.load_tokenizer(world.full_dir)
    torch.testing.assert_close(_logits(model, tokenizer, pixels), _logits(world.model, tokenizer, pixels))


def test_missing_patch_token_key_defaults_to_adding_it(world, tmp_path):
    folder = tmp_path / "old_config"
    shutil.copytree(world.full_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["mm_use_im_patch_token"]
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer, model, _, _ = load_pretrained_model(str(folder), device="cpu")
    assert "<im_patch>" in tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == world.config["vocab_size"] + 1


def test_plain_llm_loads_without_image_processor(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.base_dir, device="cpu")
    assert isinstance(model, LlamaForCausalLM) and processor is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the default device='cuda' does without CUDA")
def test_default_device_without_cuda_loads_on_cpu_in_float32(world, pixels, caplog):
    # The README's snippet leaves device at the original's "cuda"; on a CPU machine it got a float16 model.
    with caplog.at_level("WARNING", logger="palo.model.builder"):
        tokenizer, model, processor, _ = load_pretrained_model(world.full_dir)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "no CUDA device" in caplog.text
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=pixels, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)


def test_a_dtype_by_name_loads_every_weight_in_it_and_a_wrong_name_is_refused(world, pixels):
    """``--dtype`` of the worker, the chat CLI and the evaluations arrives as a name; bfloat16 suits checkpoints
    trained in it (float16, the original's only choice on CUDA, can overflow where they do not)."""
    from palo.model.builder import dtype_from_name

    tokenizer, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=pixels, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
    assert dtype_from_name("auto") is None and dtype_from_name(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be auto or one of float16, bfloat16, float32, got 'half'"):
        load_pretrained_model(world.full_dir, device="cpu", dtype="half")


def test_torch_dtype_is_taken_as_dtype_and_a_contradicting_pair_is_refused(world):
    """torch_dtype=, the name LLaVA-family callers and transformers < 5 use, was passed on to from_pretrained next
    to dtype=, which transformers 5 prefers: torch_dtype=torch.float16 silently gave a float32 model."""
    _, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", torch_dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    _, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", dtype="bfloat16", torch_dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype=torch.float32 and torch_dtype=torch.float16 disagree"):
        load_pretrained_model(world.full_dir, device="cpu", dtype="float32", torch_dtype=torch.float16)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_unknown_projector_type_is_a_clear_error(world, tmp_path):
    folder = tmp_path / "bad_projector"
    shutil.copytree(world.full_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_projector_type"] = "ldpnetv2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ldpnetv2.*(linear|supported)"):
        load_pretrained_model(str(folder), device="cpu")


def test_unreachable_vision_tower_is_a_clear_error(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "no_tower"
    shutil.copytree(world.projector_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "/nonexistent/clip-folder"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VisionTowerError, match="Cannot resolve the vision tower '/nonexistent/clip-folder'"):
        load_pretrained_model(str(folder), world.base_dir, device="cpu")


def test_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match=f"^'{tmp_path / 'missing'}': no such folder$"):
        load_pretrained_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(CheckpointError, match="'palo-org/not-here' is not a local folder and could not be found as a "
                                              "Hugging Face repo"):
        load_pretrained_model("palo-org/not-here", device="cpu")  # could be a hub id: the cache was searched


def test_adapter_or_projector_without_base_asks_for_it(world):
    with pytest.raises(CheckpointError, match="LoRA adapter.*--model-base"):
        load_pretrained_model(world.lora_dir, None, device="cpu")
    with pytest.raises(CheckpointError, match="stage-1 projector.*--model-base"):
        load_pretrained_model(world.projector_dir, None, device="cpu")


def test_projector_file_of_the_wrong_shape(world, tmp_path):
    folder = tmp_path / "wrong_shape"
    shutil.copytree(world.projector_dir, folder)
    state = torch.load(folder / "mm_projector.bin")
    state["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    torch.save(state, folder / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="does not fit the projector 'mlp2x_gelu'"):
        load_pretrained_model(str(folder), world.base_dir, device="cpu")


@pytest.mark.parametrize("flag,layer,tolerance",
                         [("load_4bit", "Linear4bit", 0.3), ("load_8bit", "Linear8bitLt", 0.05)])
def test_quantised_loading_quantises_only_the_language_model(world, flag, layer, tolerance):
    """bitsandbytes >= 0.50 quantises on CPU as on CUDA: the same module selection, the same code path."""
    from palo.mm_utils import tokenizer_image_token

    tokenizer, full, _, _ = load_pretrained_model(world.full_dir, device="cpu")
    _, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", **{flag: True})
    llm_layers = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.layers.") and "proj" in n}
    assert llm_layers == {layer}
    kept = [model.lm_head, *model.get_model().mm_projector.modules(), *model.get_vision_tower().modules()]
    assert not any(type(m).__name__ == layer for m in kept)
    ids = tokenizer_image_token("USER: <image>\nWhat is this? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    image = torch.randn(1, 3, 56, 56)
    reference, quantised = full(ids, images=image).logits, model(ids, images=image).logits.float()
    # Close to the float32 model (NF4 on hidden 64 is coarse, int8 much finer), not a broken model (error ~1).
    assert ((quantised - reference).norm() / reference.norm()).item() < tolerance
    assert model.generate(ids, images=image, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_quantised_loading_without_bitsandbytes_says_how_to_install(world, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="pip install 'bitsandbytes"):
        load_pretrained_model(world.full_dir, device="cpu", load_4bit=True)
    with pytest.raises(ValueError, match="one of"):
        load_pretrained_model(world.full_dir, device="cpu", load_4bit=True, load_8bit=True)


def test_incomplete_full_checkpoint(world, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "truncated"
    shutil.copytree(world.full_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="incomplete.*lm_head"):
        load_pretrained_model(str(folder), device="cpu")
    assert os.path.isdir(folder)


def test_quantization_keeps_tower_projector_and_head_in_half_precision(world):
    """The skip list as transformers itself applies it (runs on CPU; the CUDA test quantizes for real)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from palo.model.builder import QUANTIZATION_SKIP

    model = world.model
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {n for n in names if should_convert_module(n, QUANTIZATION_SKIP)}
    assert "model.layers.0.self_attn.q_proj" in converted and "model.layers.1.mlp.down_proj" in converted
    assert not any(n.startswith(("model.vision_tower", "model.mm_projector")) or n == "lm_head" for n in converted)


def test_stage1_projector_with_start_end_tokens_loads_its_trained_rows(world, tmp_path):
    """A stage-1 folder trained with --mm_use_im_start_end True carries the <im_start>/<im_end> rows in
    mm_projector.bin; loading it with its base puts them into the resized embeddings (not their fresh init)."""
    from palo.model import checkpoint_files as cf

    folder = tmp_path / "stage1"
    shutil.copytree(world.projector_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_use_im_start_end"] = True
    (folder / "config.json").write_text(json.dumps(config))
    state = torch.load(folder / "mm_projector.bin", weights_only=True)
    base_rows = world.model.get_input_embeddings().weight.shape[0]
    added = 2 + int(bool(config.get("mm_use_im_patch_token", True)))  # <im_start>, <im_end> (+ <im_patch>)
    trained = torch.randn(base_rows + added, world.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    cf.save_projector(str(folder), {**state, "model.embed_tokens.weight": trained}, embeddings=True)

    tokenizer, model, _, _ = load_pretrained_model(str(folder), world.base_dir, device="cpu")
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == base_rows + added
    # Through float16 like the rest of the stage-1 file (the original's rounding, tested above for the projector).
    torch.testing.assert_close(weight[-added:], trained[-added:].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(weight[:base_rows], world.model.get_input_embeddings().weight)


def test_every_inference_entry_point_hands_its_dtype_to_the_loader(tmp_path, monkeypatch):
    """``--dtype`` (``dtype=``) of the worker, the chat CLI, model_vqa, run_llava, the bench runner and palo.LLM
    reaches ``load_pretrained_model``; left out, it is the original's choice (None: float16 on CUDA)."""
    import json

    from PIL import Image

    import palo.model.builder as builder
    from palo import LLM
    from palo.eval import model_vqa, run_bench, run_llava
    from palo.serve import cli, model_worker

    asked: list = []

    def loader(*args, dtype=None, **kwargs):
        asked.append(dtype)
        raise builder.CheckpointError("stop here")

    monkeypatch.setattr(builder, "load_pretrained_model", loader)
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "What?"}) + "\n")
    vqa = ["--question-file", str(questions), "--image-folder", str(tmp_path), "--answers-file",
           str(tmp_path / "answers.jsonl")]

    def run_bench_loader(argv):
        try:
            run_bench.make_loader(run_bench.build_parser().parse_args(["--model-path", "m", *argv]))[0]()
        except model_vqa.ModelLoadError:
            return 2

    def llm(argv):
        try:
            LLM("m", device="cpu", **({"dtype": argv[1]} if argv else {}))
        except builder.CheckpointError:
            return 2

    for run in (lambda argv: cli.main(["--model-path", "m", *argv]),
                lambda argv: model_worker.main(["--model-path", "m", "--no-register", "--port", "0", *argv]),
                lambda argv: model_vqa.main(["--model-path", "m", *vqa, *argv]),
                lambda argv: run_llava.main(["--model-path", "m", "--image-file", str(image), "--query", "q", *argv]),
                run_bench_loader, llm):
        asked.clear()
        assert run(["--dtype", "bfloat16"]) == 2 and run([]) == 2
        assert [builder.dtype_from_name(d) for d in asked] == [torch.bfloat16, None], run
