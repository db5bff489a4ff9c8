"""Helpers to build engine requests the way callers do, and the reference they must match."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from palo.conversation import conv_templates
from palo.mm_utils import process_images, tokenizer_image_token

QUESTIONS = [
    "What is shown in this image?", "这张图片里有什么？", "Qu'est-ce qui est montré dans cette image ?",
    "¿Qué se muestra en esta imagen?", "Что изображено на этой картинке?", "この画像には何が写っていますか？",
    "ما الذي يظهر في هذه الصورة؟", "इस चित्र में क्या दिखाया गया है?", "এই ছবিতে কী দেখানো হয়েছে?",
    "اس تصویر میں کیا دکھایا گیا ہے؟",
]
COLORS = ["red", "green", "black", "orange", "purple", "yellow", "blue", "pink"]

# Two blocks of 16 ids (the engine's default block size) with the same Python ``hash`` of their tuples. CPython's
# tuple hash is not seeded for integers, so this holds in every process; the pair was found by a birthday search
# (Brent's cycle finding) over the last 8 ids, about 10^10 hash evaluations.
COLLIDING_BLOCKS = ([1, 2, 3, 4, 5, 6, 7, 8, 215, 86, 25, 222, 3, 214, 237, 122],
                    [1, 2, 3, 4, 5, 6, 7, 8, 190, 80, 224, 73, 217, 122, 61, 76])


def make_image(color: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, size[0] // 2, size[1] // 2), fill=color)
    draw.rectangle((size[0] // 2, 10, size[0] - 4, size[1] - 4), fill="blue")
    return image


def prompt_ids(tokenizer, question: str, num_images: int) -> list[int]:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" * num_images + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer)


def pixels(processor, model, colors: list[str], sizes: list[tuple[int, int]] | None = None) -> torch.Tensor | None:
    if not colors:
        return None
    images = [make_image(c, (sizes or [(64, 48)] * len(colors))[i]) for i, c in enumerate(colors)]
    return process_images(images, processor, model.config)


def reference_tokens(model, tokenizer, ids: list[int], images: torch.Tensor | None, max_new_tokens: int,
                     eos_ids: set[int], **generate_kwargs) -> list[int]:
    """What ``model.generate`` answers alone (greedy, with ``generate_kwargs``), cut before end-of-sequence as the
    engine reports it."""
    out = model.generate(torch.tensor([ids]), images=images, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, **generate_kwargs)
    new = out[0, len(ids):].tolist()
    for k, token in enumerate(new):
        if token in eos_ids:
            return new[:k]
    return new
