"""``palo.train.arguments``: the original flags parse; values this project cannot honour are refused, not ignored."""

from __future__ import annotations

import pytest

from palo.train.arguments import parse_args
from palo.train.train import train

COMMON = ["--output_dir", "/tmp/unused", "--use_cpu", "True", "--report_to", "none"]


def test_llava_and_mobilevlm_flags_parse_at_the_values_palo_runs():
    model_args, _, _ = parse_args([*COMMON, "--mm_patch_merge_type", "flat", "--vision_tower_type", "clip"])
    assert (model_args.mm_patch_merge_type, model_args.vision_tower_type) == ("flat", "clip")
    assert parse_args(COMMON)[0].mm_patch_merge_type == "flat"  # the default


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--mm_patch_merge_type", "spatial_unpad", "only 'flat'"),
    ("--vision_tower_type", "siglip", "only 'clip'"),
    ("--image_aspect_ratio", "anyres", "'pad' or 'square'"),
    # It trained nothing, exited 0 and saved the untrained model where the trained one goes.
    ("--num_train_epochs", "0", "trains nothing"),
    # Each failed only once the model had loaded: torch's sampler (a traceback at train()), a ZeroDivisionError in
    # the Trainer, and every sample blamed in turn ("pass --skip_bad_samples True").
    ("--per_device_train_batch_size", "0", "must be at least 1, not 0"),
    ("--gradient_accumulation_steps", "0", "must be at least 1, not 0"),
    ("--model_max_length", "0", "must be at least 2"),
])
def test_a_value_palo_cannot_honour_is_one_line_before_anything_loads(flag, value, says, capsys):
    # spatial_unpad and siglip were accepted and silently ignored: the run trained another model than asked for.
    with pytest.raises(ValueError, match=says):
        parse_args([*COMMON, flag, value])
    with pytest.raises(SystemExit) as stop:
        train([*COMMON, flag, value])
    message = str(stop.value)
    assert message.startswith("error: ") and flag in message and says in message


def test_an_output_dir_no_run_can_save_into_is_one_line_before_anything_loads(tmp_path):
    """--output_dir naming a file died with transformers' FileExistsError traceback, after the model had loaded."""
    (tmp_path / "afile").write_text("", encoding="utf-8")
    for output_dir, says in ((tmp_path / "afile", f"--output_dir {tmp_path / 'afile'}: a file, not a folder"),
                             (tmp_path / "afile" / "run", f"{tmp_path / 'afile'} is a file, not a folder")):
        with pytest.raises(SystemExit) as stop:
            train([*COMMON, "--output_dir", str(output_dir)])
        message = str(stop.value)
        assert message.startswith("error: --output_dir ") and says in message, message
    # A folder still to be made, under one that exists, is what a first run names.
    from palo.jsonl import cannot_write

    assert cannot_write(str(tmp_path / "new" / "run"), folder=True) is None


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--mm_projector_type", "mlp2x_relu", "Unknown mm_projector_type 'mlp2x_relu'"),
    ("--mm_vision_select_feature", "cls", "'patch' or 'cls_patch'"),
])
def test_a_model_flag_no_model_takes_is_refused_before_the_language_model_loads(flag, value, says):
    """Refused only by the model builder before, as a traceback after the base LLM had loaded (minutes at 7B)."""
    with pytest.raises(SystemExit) as stop:
        train([*COMMON, "--vision_tower", "/nowhere/clip", "--model_name_or_path", "/nowhere/llm", flag, value])
    assert str(stop.value).startswith("error: ") and says in str(stop.value)


def test_zero_epochs_train_only_with_max_steps():
    assert parse_args([*COMMON, "--num_train_epochs", "0", "--max_steps", "2"])[2].max_steps == 2
    assert parse_args([*COMMON, "--num_train_epochs", "0.5"])[2].num_train_epochs == 0.5


def test_warmup_steps_given_win_over_the_scripts_warmup_ratio():
    """The ratio overwrote an explicit --warmup_steps (the PALO scripts all pass --warmup_ratio 0.03)."""
    assert parse_args([*COMMON, "--warmup_ratio", "0.03"])[2].warmup_steps == 0.03
    with pytest.warns(UserWarning, match="--warmup_ratio 0.03 ignored"):
        _, _, args = parse_args([*COMMON, "--warmup_ratio", "0.03", "--warmup_steps", "100"])
    assert args.warmup_steps == 100


def test_grouping_by_modality_under_packed_steps_says_it_is_not_applied():
    with pytest.warns(UserWarning, match="--group_by_modality_length is not applied with --packing_rows"):
        parse_args([*COMMON, "--packing", "True", "--packing_rows", "2", "--group_by_modality_length", "True"])
