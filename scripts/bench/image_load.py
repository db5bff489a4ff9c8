"""Benchmark: reading an image the way the worker does, this tree against another git revision.

A request's image arrives as base64; the worker decodes it (``load_image_from_base64``: decode, checks, the reading
rules of :mod:`palo.image_io`) and turns it into CLIP pixels (``process_images`` with ``pad``, as PALO trained).
This measures both steps per image, each side in processes of its own with ``palo`` imported from its own tree
(``--against``: a temporary worktree), alternating sides round by round, and checks that both sides give the very
same pixel values. The image is a photo-like JPEG generated here (smooth gradients, shapes and noise) at
``--megapixels`` (12: a phone photo), or a file given with ``--image``.

    python scripts/bench/image_load.py --against 28afc6c           # before the reading rules
    python scripts/bench/image_load.py --image photo.jpg --against HEAD~3
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from revisions import REPO, add_arguments, checked_out, cpu_name, import_palo_from, measure_in_child, short_revision

STEPS = ("load_ms", "process_ms", "request_ms")  # load alone, preprocess alone, one request's image: both in turn


def photo_like(megapixels: float, seed: int = 0) -> bytes:
    """A JPEG (quality 90, 4:3) that compresses and decodes like a photo rather than like noise or a flat colour."""
    import numpy as np
    from PIL import Image, ImageDraw

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([128 + 100 * np.sin(x / 300 + c) * np.cos(y / 200 - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, width // 4)), y0 + int(rng.integers(20, height // 4))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure(tree: str, image_path: str, repeats: int) -> dict:
    """One side: milliseconds per image for loading and for preprocessing, the fastest of ``repeats`` x 5."""
    import torch

    torch.set_num_threads(1)  # both sides alike, and less noise from the other core
    import_palo_from(tree)
    from types import SimpleNamespace

    from palo.mm_utils import load_image_from_base64, process_images
    from palo.model.vision_tower import build_clip_image_processor

    data = base64.b64encode(pathlib.Path(image_path).read_bytes()).decode("ascii")
    processor = build_clip_image_processor(336)
    config = SimpleNamespace(image_aspect_ratio="pad")
    load_ms, process_ms, request_ms = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            image = load_image_from_base64(data)
        middle = time.perf_counter()
        for _ in range(5):
            pixels = process_images([image], processor, config)
        end = time.perf_counter()
        for _ in range(5):  # as a request does it: each image loaded, then preprocessed
            pixels = process_images([load_image_from_base64(data)], processor, config)
        load_ms.append((middle - start) / 5 * 1e3)
        process_ms.append((end - middle) / 5 * 1e3)
        request_ms.append((time.perf_counter() - end) / 5 * 1e3)
    return {"load_ms": min(load_ms), "process_ms": min(process_ms), "request_ms": min(request_ms),
            "size": list(image.size), "pixels_sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, "git revision to compare with (default: HEAD)")
    parser.add_argument("--image", default=None, help="an image file (default: a photo-like JPEG generated here)")
    parser.add_argument("--megapixels", type=float, default=12.0, help="size of the generated image")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.image, args.repeats)))
        return

    revision = short_revision(args.against)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        image_path = args.image
        if image_path is None:
            image_path = os.path.join(tmp, "photo.jpg")
            pathlib.Path(image_path).write_bytes(photo_like(args.megapixels))
        sides = {f"baseline {revision}": stack.enter_context(checked_out(revision, os.path.join(tmp, "baseline"))),
                 "this tree": str(REPO)}
        runs: dict[str, dict[str, list[float]]] = {name: {step: [] for step in STEPS} for name in sides}
        digests, size = set(), None
        for i in range(args.rounds):
            for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                result = measure_in_child(__file__, sides[name], ["--image", image_path, "--repeats",
                                                                  str(args.repeats)])
                for step in STEPS:
                    runs[name][step].append(result[step])
                digests.add(result["pixels_sha256"])
                size = result["size"]
    same = len(digests) == 1
    print(f"# reading a {size[0]}x{size[1]} image as the worker does (base64 -> RGB -> CLIP-336 pad pixels), on "
          f"{cpu_name()} ({os.cpu_count()} cores; one thread per measuring process), median of {args.rounds} "
          "processes per side")
    rows = {}
    for step in STEPS:
        base, ours = (statistics.median(runs[name][step]) for name in sides)
        rows[step] = {"baseline": base, "this_tree": ours, "ratio": base / ours}
        print(f"{step[:-3]:8s} baseline {revision} {base:7.1f} ms, this tree {ours:7.1f} ms, ratio {base / ours:.2f}x")
    print(f"same pixel values on both sides: {'yes' if same else 'NO'}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"baseline": revision, "size": size, "same_pixels": same,
                                                       "steps": rows, "runs": runs}, indent=2))
    if not same:
        raise SystemExit("the two sides gave different pixels")


if __name__ == "__main__":
    main()
