"""The shared-prefix benchmark counts what the engine computes: prompt positions and images through the tower."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))

import shared_prefix  # noqa: E402


def test_measure_counts_prefilled_positions_and_tower_runs(world):
    result = shared_prefix.measure(ROOT, world.full_dir, images=2, questions=3, max_tokens=4, repeats=2)
    assert result["requests"] == 6 and len(result["seconds"]) == 2
    assert result["images_encoded"] == 2  # once per image, however many questions
    # The questions on one image share the system prompt and the image rows: well under all prompt positions.
    assert 0 < result["positions"] < 0.6 * result["prompt_positions"]
