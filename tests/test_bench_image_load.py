"""The image-reading benchmark: its measuring process reads the image as the worker does."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))

import image_load  # noqa: E402
from revisions import measure_in_child, short_revision  # noqa: E402


def test_a_measuring_process_gives_the_workers_pixels(tmp_path):
    from palo.mm_utils import load_image_from_base64, process_images
    from palo.model.vision_tower import build_clip_image_processor

    path = tmp_path / "photo.jpg"
    path.write_bytes(image_load.photo_like(0.05))
    result = measure_in_child(image_load.__file__, ROOT, ["--image", str(path), "--repeats", "1"])
    assert result["size"] == [258, 193]
    assert all(result[step] > 0 for step in image_load.STEPS)
    image = load_image_from_base64(base64.b64encode(path.read_bytes()).decode())
    pixels = process_images([image], build_clip_image_processor(336), SimpleNamespace(image_aspect_ratio="pad"))
    assert result["pixels_sha256"] == hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


def test_a_revision_that_does_not_exist_is_one_line():
    """--against naming no commit here (a typo, a branch not fetched) died with git's CalledProcessError traceback."""
    with pytest.raises(SystemExit) as stop:
        short_revision("nosuchrev")
    assert str(stop.value).startswith("error: --against nosuchrev: ")
    # A tree is no revision to check out, though rev-parse names it.
    tree = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD^{tree}"], capture_output=True, text=True).stdout
    if tree.strip():
        with pytest.raises(SystemExit, match="no such revision"):
            short_revision(tree.strip())
    done = subprocess.run([sys.executable, image_load.__file__, "--against", "nosuchrev"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: --against nosuchrev: "), done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
