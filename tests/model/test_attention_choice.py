"""--attn_implementation for training and inference: the chosen kernel is used, a missing one is a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from palo.model import attention
from palo.model.attention import AttentionUnavailableError, check_attn_implementation
from palo.model.builder import load_pretrained_model
from palo.train.arguments import parse_args


def test_unknown_and_missing_kernels_are_refused_with_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="sdpa, flash_attention_2, flex_attention, eager"):
        check_attn_implementation("flash")
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(AttentionUnavailableError, match="pip install flash-attn"):
        check_attn_implementation("flash_attention_2")
    monkeypatch.setattr(transformers.utils, "is_torch_flex_attn_available", lambda: False)
    with pytest.raises(AttentionUnavailableError, match="PyTorch >= 2.5"):
        check_attn_implementation("flex_attention")
    assert check_attn_implementation("sdpa") == "sdpa" and check_attn_implementation("eager") == "eager"
    assert attention.ATTN_IMPLEMENTATIONS == ("sdpa", "flash_attention_2", "flex_attention", "eager")


def test_training_flag_is_checked_when_parsed(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    common = ["--output_dir", "/tmp/unused", "--use_cpu", "True", "--report_to", "none"]
    model_args, _, _ = parse_args([*common, "--attn_implementation", "eager"])
    assert model_args.attn_implementation == "eager"
    assert parse_args(common)[0].attn_implementation == "sdpa"  # the default
    with pytest.raises(AttentionUnavailableError):
        parse_args([*common, "--attn_implementation", "flash_attention_2"])


@pytest.mark.parametrize("name", ["eager", "sdpa"])
def test_inference_loads_the_chosen_kernel_with_the_same_logits(world, name):
    _, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", attn_implementation=name)
    assert model.config._attn_implementation == name
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, world.model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_inference_refuses_a_missing_kernel_before_loading(world, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(AttentionUnavailableError, match="flash-attn"):
        load_pretrained_model(world.full_dir, device="cpu", use_flash_attn=True)
    with pytest.raises(ValueError, match="contradicts"):
        load_pretrained_model(world.full_dir, device="cpu", use_flash_attn=True, attn_implementation="eager")


def test_training_runs_with_the_chosen_kernel(world, tmp_path):
    from palo.testing import tiny_data
    from palo.train.train import train

    data = tiny_data.write_dataset(str(tmp_path / "data"), num_samples=8)
    trainer = train([
        "--model_name_or_path", world.base_dir, "--version", "v1", "--data_path", data,
        "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
        "--mm_vision_select_layer", "-2", "--mm_use_im_patch_token", "False", "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--model_max_length", "256", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0", "--attn_implementation", "eager",
        "--packing", "True",
    ])
    assert trainer.model.config._attn_implementation == "eager"
    assert 0 < trainer.state.log_history[-1]["train_loss"] < 20


def test_flex_attention_training_on_the_cpu_is_refused_before_anything_loads(world, tmp_path, monkeypatch):
    """FlexAttention has no backward on the CPU here: the run passed every check and stopped at its first step with
    torch's NotImplementedError. Now one line, before the data or the model is read; inference with it still works."""
    import palo.train.train as train_module
    from palo.model.attention import check_trainable_on

    monkeypatch.setattr(train_module, "setup_training", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="^error: attn_implementation flex_attention cannot train on the CPU .*sdpa"):
        train_module.train(["--model_name_or_path", world.base_dir, "--data_path", str(tmp_path / "none.json"),
                            "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--report_to", "none",
                            "--attn_implementation", "flex_attention"])
    for name, device in (("sdpa", "cpu"), ("eager", "cpu"), ("flex_attention", "cuda")):
        check_trainable_on(name, device)  # nothing to refuse
    _, model, _, _ = load_pretrained_model(world.full_dir, device="cpu", attn_implementation="flex_attention")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 30, 7]])).logits).all()
