"""A small multilingual image+text training set in the PALO JSON format, drawn and written locally.

Images are coloured shapes drawn with PIL; questions and answers (about the shape's colour) are in several
languages and scripts; some samples are text-only, some multi-turn, with ``<image>`` before or after the text. Used
by the training tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
# (question, answer template) per language; {c} is the colour word in that language.
QA = {
    "english": ("What colour is the shape?", "The shape is {c}.", {"red": "red", "blue": "blue", "green": "green"}),
    "arabic": ("ما لون الشكل؟", "الشكل {c}.", {"red": "أحمر", "blue": "أزرق", "green": "أخضر"}),
    "chinese": ("这个形状是什么颜色？", "这个形状是{c}的。", {"red": "红色", "blue": "蓝色", "green": "绿色"}),
    "hindi": ("आकृति का रंग क्या है?", "आकृति {c} है।", {"red": "लाल", "blue": "नीली", "green": "हरी"}),
    "russian": ("Какого цвета фигура?", "Фигура {c}.", {"red": "красная", "blue": "синяя", "green": "зелёная"}),
}
TEXT_ONLY = [
    ("Say hello in French.", "Bonjour."),
    ("¿Cómo se dice gracias en inglés?", "Thank you."),
]


def draw_shape(colour: str, size: int = 64, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size + rng.randint(0, 16), size), (245, 245, 240))
    x0, y0 = rng.randint(2, 12), rng.randint(2, 12)
    ImageDraw.Draw(image).ellipse((x0, y0, x0 + size // 2, y0 + size // 2), fill=COLOURS[colour])
    return image


def write_dataset(root: str, num_samples: int = 24, seed: int = 0, multi_turn_every: int = 5,
                  text_only_every: int = 6) -> str:
    """Write ``root/images/*.png`` and ``root/train.json``; returns the JSON path."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    languages = list(QA)
    samples = []
    for i in range(num_samples):
        if text_only_every and i % text_only_every == text_only_every - 1:
            q, a = TEXT_ONLY[i % len(TEXT_ONLY)]
            samples.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a}]})
            continue
        colour = rng.choice(list(COLOURS))
        language = languages[i % len(languages)]
        question, answer, words = QA[language]
        name = f"{i:04d}.png"
        draw_shape(colour, seed=i).save(os.path.join(root, "images", name))
        first = f"<image>\n{question}" if i % 2 == 0 else f"{question}\n<image>"
        turns = [{"from": "human", "value": first}, {"from": "gpt", "value": answer.format(c=words[colour])}]
        if multi_turn_every and i % multi_turn_every == 0:
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.format(c=words[colour])}]
        samples.append({"id": f"img-{i}", "image": name, "conversations": turns})
    path = os.path.join(root, "train.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples, f, ensure_ascii=False, indent=1)
    return path
