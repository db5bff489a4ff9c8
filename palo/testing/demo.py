"""The built-in demo: build a tiny PALO checkpoint locally and chat with it about a shipped image.

``python -m palo.testing.demo [--workdir runs/demo]`` needs no download and no GPU. The checkpoint has random
weights (its answers are noise): it shows the real loading, prompting and streaming path end to end in seconds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from palo.testing import tiny

QUESTIONS = ["What is shown in this image?", "ما الذي يظهر في هذه الصورة؟", "这张图片里有什么？",
             "इस चित्र में क्या दिखाया गया है?"]


def build_demo_checkpoint(workdir: str) -> str:
    """Tokenizer, tiny CLIP, tiny LLaMA and a full PALO checkpoint under ``workdir``; returns the checkpoint."""
    checkpoint = os.path.join(workdir, "tiny-palo")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return checkpoint
    tokenizer = tiny.train_sentencepiece(os.path.join(workdir, "tokenizer"))
    clip_dir = tiny.save_tiny_clip(os.path.join(workdir, "tiny-clip"))
    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(tokenizer)), os.path.abspath(clip_dir))
    model = tiny.build_palo_model(config, clip_dir)
    tiny.write_full_checkpoint(checkpoint, model, config, os.path.join(workdir, "tokenizer"))
    return checkpoint


def _default_image(workdir: str) -> str:
    """The checkout's ``images/shapes.png``; an installed package has no ``images/``: a drawing in ``workdir``."""
    from palo.serve.examples import IMAGES_DIR  # the checkout's images/, as the web demo finds it

    shipped = os.path.join(IMAGES_DIR, "shapes.png")
    if os.path.isfile(shipped):
        return shipped
    drawn = os.path.join(workdir, "shapes.png")
    if not os.path.isfile(drawn):
        from palo.testing.tiny_data import draw_shape

        draw_shape("red", size=128).save(drawn)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--image-file", default=None,
                        help="default: the checkout's images/shapes.png, else a drawing made in --workdir")
    args = parser.parse_args(argv)
    checkpoint = build_demo_checkpoint(args.workdir)
    image_file = args.image_file or _default_image(args.workdir)
    print(f"Built a tiny PALO checkpoint (random weights) in {checkpoint}; chatting in 4 languages:")
    from palo.serve import cli

    sys.stdin = io.StringIO("\n".join(QUESTIONS) + "\n\n")
    return cli.main(["--model-path", checkpoint, "--image-file", image_file, "--device", "cpu",
                     "--temperature", "0", "--max-new-tokens", "16"])


if __name__ == "__main__":
    sys.exit(main())
