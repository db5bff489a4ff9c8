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
])
def test_a_value_palo_cannot_honour_is_one_line_before_anything_loads(flag, value, says, capsys):
    # spatial_unpad and siglip were accepted and silently ignored: the run trained another model than asked for.
    with pytest.raises(ValueError, match=says):
        parse_args([*COMMON, flag, value])
    with pytest.raises(SystemExit) as stop:
        train([*COMMON, flag, value])
    message = str(stop.value)
    assert message.startswith("error: ") and flag in message and says in message
