"""The shipped DeepSpeed configs (``scripts/zero*.json``) match the original PALO/LLaVA files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

FP16 = {
    "enabled": "auto",
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
BF16 = {"enabled": "auto"}
BATCH = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
ZERO2_3_COMMON = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
}
STAGE3 = {
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
}

EXPECTED = {
    "zero1.json": {"fp16": FP16, "bf16": BF16, **BATCH, "zero_optimization": {"stage": 1}},
    "zero2.json": {"fp16": FP16, "bf16": BF16, **BATCH, "zero_optimization": {"stage": 2, **ZERO2_3_COMMON}},
    "zero3.json": {
        "fp16": FP16,
        "bf16": BF16,
        **BATCH,
        "zero_optimization": {
            "stage": 3,
            **ZERO2_3_COMMON,
            **STAGE3,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    },
    "zero3_offload.json": {
        "fp16": FP16,
        "bf16": BF16,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
        },
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            **ZERO2_3_COMMON,
            **STAGE3,
            # No "stage3_" prefix here, unlike zero3.json: kept as in the original file.
            "gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1e5,
        "wall_clock_breakdown": False,
    },
}
STAGES = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def _load(name: str) -> dict:
    return json.loads((SCRIPTS / name).read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_matches_the_original(name: str) -> None:
    config = _load(name)
    assert config["zero_optimization"]["stage"] == STAGES[name]
    assert config == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_large_sizes_are_numbers_not_strings(name: str) -> None:
    # DeepSpeed expects numbers here (written as 1e9 in the original files), never the string "1e9".
    zero = _load(name)["zero_optimization"]
    for key in ("sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
        if key in zero:
            assert isinstance(zero[key], (int, float)) and not isinstance(zero[key], bool)
            assert zero[key] == 1e9


def test_offload_uses_the_unprefixed_gather_key() -> None:
    zero = _load("zero3_offload.json")["zero_optimization"]
    assert zero["gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in zero
    assert isinstance(_load("zero3_offload.json")["steps_per_print"], (int, float))


def test_launch_script_naming_covers_every_zero_level() -> None:
    # The shell scripts select "scripts/zero$ZERO_LEVEL.json"; the README uses levels 2 and 3.
    for level in ("1", "2", "3", "3_offload"):
        assert (SCRIPTS / f"zero{level}.json").is_file()
