"""What a training run builds before its first step: the dtypes it trains in and what records a graph."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from palo.testing import tiny_data
from palo.train.arguments import parse_args
from palo.train.model_setup import setup_training, unwrap


@pytest.fixture(scope="module")
def half_base(world, tmp_path_factory) -> str:
    """The tiny base LLM saved in float16, as Vicuna's checkpoints are (their config says ``float16``)."""
    from transformers import LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("half_base") / "base")
    shutil.copytree(world.base_dir, folder)
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".bin")) or name.endswith(".index.json"):
            os.remove(os.path.join(folder, name))
    LlamaForCausalLM.from_pretrained(world.base_dir, dtype=torch.float16).save_pretrained(folder)
    return folder


def _setup(world, tmp_path, base: str, *extra: str):
    data = tiny_data.write_dataset(str(tmp_path / "data"), num_samples=2)
    argv = [
        "--model_name_or_path", base, "--version", "v1", "--data_path", data,
        "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
        "--use_cpu", "True", *extra,
    ]
    return setup_training(*parse_args(argv))


@pytest.mark.parametrize("base,flags", [
    ("half", ["--bf16", "True"]),
    ("half", []),
    ("float", ["--bf16", "True", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]),
    ("float", ["--fp16", "True", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]),
], ids=["float16-base-bf16", "float16-base", "lora-bf16", "lora-fp16"])
def test_every_trained_weight_is_float32_in_16_bit_runs(world, half_base, tmp_path, base, flags):
    """What the optimizer updates stays float32 as in the original (transformers 4's float32 default): a float16
    base was trained in float16 and went NaN at its second step, and LoRA's bf16 cast caught the projector, whose
    updates at its learning rate mostly rounded away. DeepSpeed keeps float32 copies itself; these runs have none."""
    setup = _setup(world, tmp_path, half_base if base == "half" else world.base_dir, *flags)
    trained = {name: param.dtype for name, param in setup.model.named_parameters() if param.requires_grad}
    assert any("mm_projector" in name for name in trained)
    assert {name: dtype for name, dtype in trained.items() if dtype != torch.float32} == {}
    if "--lora_enable" in flags:  # the frozen LLM is in the compute dtype, as the original casts it
        assert unwrap(setup.model).get_model().embed_tokens.weight.dtype != torch.float32


def test_the_frozen_tower_records_no_graph_under_gradient_checkpointing(world, tmp_path):
    """transformers 5's input hook for gradient checkpointing reaches CLIP's embeddings too: the tower's features
    required grad, and every backward ran through the frozen tower, keeping its activations."""
    setup = _setup(world, tmp_path, world.base_dir, "--gradient_checkpointing", "True")
    setup.model.gradient_checkpointing_enable()  # as the Trainer does when it starts
    model = unwrap(setup.model).train()
    size = model.get_vision_tower().config.image_size
    pixels = torch.randn(1, 3, size, size)
    assert not model.get_vision_tower()(pixels).requires_grad
    assert model.encode_images(pixels).requires_grad  # the projector still trains
    model.get_vision_tower().requires_grad_(True)  # a tower that is trained on purpose records its graph
    assert model.get_vision_tower()(pixels).requires_grad


@pytest.mark.parametrize("eos", ["<|endoftext|>", None])
def test_a_tokenizer_without_an_unk_token_pads_with_its_end_of_sequence_token(tmp_path, eos):
    """Before, a byte-level BPE with no unk and no pad token (GPT-2, Qwen, Llama 3 style) left the pad id None and
    the first batch failed in the collator with a TypeError."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from palo.testing.corpus import all_text
    from palo.train.dataset import DataCollator
    from palo.train.model_setup import load_tokenizer_for_training

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(all_text(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos).save_pretrained(tmp_path / "tok")
    args = (SimpleNamespace(model_name_or_path=str(tmp_path / "tok"), version="v1"),
            SimpleNamespace(model_max_length=64, cache_dir=None))
    if eos is None:
        with pytest.raises(ValueError, match="no unk, pad or end-of-sequence token"):
            load_tokenizer_for_training(*args)
        return
    tokenizer = load_tokenizer_for_training(*args)
    assert tokenizer.unk_token is None and tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    batch = DataCollator(tokenizer.pad_token_id)([{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, 6])},
                                                  {"input_ids": torch.tensor([7]), "labels": torch.tensor([7])}])
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_the_base_model_is_found_in_the_cache_named_by_cache_dir(world, tmp_path, monkeypatch):
    """The original passed --cache_dir to from_pretrained for the LLM and its tokenizer; here it was accepted and
    ignored, so a base model cached there was not found offline."""
    import huggingface_hub.constants as hub_constants

    from palo.model.builder import CheckpointError
    from palo.testing import tiny

    cache = tmp_path / "elsewhere"
    tiny.install_in_hf_cache(world.base_dir, "test-org/tiny-llm", str(cache))
    empty = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="test-org/tiny-llm"):
        _setup(world, tmp_path, "test-org/tiny-llm")
    setup = _setup(world, tmp_path, "test-org/tiny-llm", "--cache_dir", str(cache / "hub"))
    assert setup.tokenizer is not None and unwrap(setup.model).config.vocab_size > 0
