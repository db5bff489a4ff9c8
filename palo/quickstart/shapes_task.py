"""The quickstart's synthetic multilingual visual-instruction task, drawn with PIL and written locally.

Each image shows 1-3 copies of one shape (circle, square or triangle) in one colour (red, green, blue, yellow) on
a light background. The canvas is a 3 x 3 grid of cells; each shape sits in its own cell with a little jitter, so
shapes never touch and the count is unambiguous. Every image comes with its drawing parameters
(:class:`ImageSpec`), from which the expected answers are derived: the answers are right by construction, and
``tests/quickstart`` re-derives colour, shape and count from the pixels to prove it.

Three question kinds (colour, shape, count) exist in all 10 PALO languages, each with a one-word answer (the
colour / shape / number word in that language, capitalised where the script has case, with the language's full
stop). Written here:

* the stage-1 set (``--version plain``): ``<image>`` -> a caption "colour, shape, number." in one language;
* the stage-2 set (``--version v1``): one image, one language, all three questions in random order (the first turn
  carries ``<image>``), in the PALO training JSON format with an ``images/`` folder;
* the evaluation set in the multilingual LLaVA-Bench layout (``<root>/<language>/{question,answers,context}.jsonl``
  with the shared ``<root>/images``, see :mod:`palo.eval.bench`) on held-out images drawn with another seed; the
  reference answers are the exact expected answers.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from palo.data.languages import LANGUAGES

BACKGROUND = (245, 245, 240)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
KINDS = ("colour", "shape", "count")
GRID = 3  # the canvas is GRID x GRID cells, one shape at most per cell

# Per language: the three questions (colour, shape, count), the words, and the full stop ending an answer.
VOCAB: dict[str, dict] = {
    "english": {
        "questions": ("What colour are the shapes?", "What shape is shown?", "How many shapes are there?"),
        "colour": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow"},
        "shape": {"circle": "circle", "square": "square", "triangle": "triangle"},
        "count": {1: "one", 2: "two", 3: "three"},
        "stop": ".",
    },
    "chinese": {
        "questions": ("图形是什么颜色？", "这是什么形状？", "有几个图形？"),
        "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"},
        "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
        "count": {1: "一个", 2: "两个", 3: "三个"},
        "stop": "。",
    },
    "french": {
        "questions": ("De quelle couleur sont les formes ?", "Quelle forme est montrée ?",
                      "Combien de formes y a-t-il ?"),
        "colour": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"},
        "shape": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
        "count": {1: "un", 2: "deux", 3: "trois"},
        "stop": ".",
    },
    "spanish": {
        "questions": ("¿De qué color son las figuras?", "¿Qué figura se muestra?", "¿Cuántas figuras hay?"),
        "colour": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo"},
        "shape": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
        "count": {1: "uno", 2: "dos", 3: "tres"},
        "stop": ".",
    },
    "russian": {
        "questions": ("Какого цвета фигуры?", "Какая это фигура?", "Сколько здесь фигур?"),
        "colour": {"red": "красный", "green": "зелёный", "blue": "синий", "yellow": "жёлтый"},
        "shape": {"circle": "круг", "square": "квадрат", "triangle": "треугольник"},
        "count": {1: "один", 2: "два", 3: "три"},
        "stop": ".",
    },
    "japanese": {
        "questions": ("図形は何色ですか？", "これは何の形ですか？", "図形はいくつありますか？"),
        "colour": {"red": "赤", "green": "緑", "blue": "青", "yellow": "黄色"},
        "shape": {"circle": "円", "square": "四角形", "triangle": "三角形"},
        "count": {1: "一つ", 2: "二つ", 3: "三つ"},
        "stop": "。",
    },
    "arabic": {
        "questions": ("ما لون الأشكال؟", "ما هذا الشكل؟", "كم عدد الأشكال؟"),
        "colour": {"red": "أحمر", "green": "أخضر", "blue": "أزرق", "yellow": "أصفر"},
        "shape": {"circle": "دائرة", "square": "مربع", "triangle": "مثلث"},
        "count": {1: "واحد", 2: "اثنان", 3: "ثلاثة"},
        "stop": ".",
    },
    "hindi": {
        "questions": ("आकृतियों का रंग क्या है?", "यह कौन सी आकृति है?", "कितनी आकृतियाँ हैं?"),
        "colour": {"red": "लाल", "green": "हरा", "blue": "नीला", "yellow": "पीला"},
        "shape": {"circle": "वृत्त", "square": "वर्ग", "triangle": "त्रिभुज"},
        "count": {1: "एक", 2: "दो", 3: "तीन"},
        "stop": "।",
    },
    "bengali": {
        "questions": ("আকৃতিগুলোর রং কী?", "এটি কোন আকৃতি?", "কয়টি আকৃতি আছে?"),
        "colour": {"red": "লাল", "green": "সবুজ", "blue": "নীল", "yellow": "হলুদ"},
        "shape": {"circle": "বৃত্ত", "square": "বর্গ", "triangle": "ত্রিভুজ"},
        "count": {1: "একটি", 2: "দুটি", 3: "তিনটি"},
        "stop": "।",
    },
    "urdu": {
        "questions": ("اشکال کا رنگ کیا ہے؟", "یہ کون سی شکل ہے؟", "کتنی اشکال ہیں؟"),
        "colour": {"red": "سرخ", "green": "سبز", "blue": "نیلا", "yellow": "پیلا"},
        "shape": {"circle": "دائرہ", "square": "مربع", "triangle": "مثلث"},
        "count": {1: "ایک", 2: "دو", 3: "تین"},
        "stop": "۔",
    },
}
assert tuple(VOCAB) == LANGUAGES, "VOCAB must list the 10 PALO languages in paper order"


@dataclass(frozen=True)
class ImageSpec:
    """The drawing parameters of one image; the ground truth every answer is derived from.

    Attributes:
        name: File name in the image folder.
        size: Canvas side in pixels (square).
        colour: A key of :data:`COLOURS`.
        shape: One of :data:`SHAPES`.
        boxes: One ``(x0, y0, x1, y1)`` bounding box per shape (inclusive PIL coordinates); the count is its length.
    """

    name: str
    size: int
    colour: str
    shape: str
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.boxes)


def sample_spec(rng: random.Random, name: str, size: int) -> ImageSpec:
    """Random colour, shape and count 1-3; each shape in its own grid cell, sized 55-80% of the cell."""
    cell = size // GRID
    count = rng.choice(COUNTS)
    cells = rng.sample(range(GRID * GRID), count)
    side = rng.randint(int(cell * 0.55), int(cell * 0.8))  # one size per image: the shapes are copies
    boxes = []
    for c in sorted(cells):
        cx, cy = (c % GRID) * cell, (c // GRID) * cell
        x0 = cx + rng.randint(1, cell - side - 1)
        y0 = cy + rng.randint(1, cell - side - 1)
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return ImageSpec(name, size, rng.choice(list(COLOURS)), rng.choice(SHAPES), tuple(boxes))


def draw(spec: ImageSpec) -> Image.Image:
    """Render a spec (no anti-aliasing: shape pixels have exactly the palette colour)."""
    image = Image.new("RGB", (spec.size, spec.size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[spec.colour]
    for x0, y0, x1, y1 in spec.boxes:
        if spec.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif spec.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif spec.shape == "triangle":
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}")
    return image


def _finish(language: str, word: str) -> str:
    return word[:1].upper() + word[1:] + VOCAB[language]["stop"]


def answer(spec: ImageSpec, kind: str, language: str) -> str:
    """The exact expected answer to the ``kind`` question about ``spec`` in ``language`` (e.g. ``"Red."``)."""
    words = VOCAB[language]
    value = {"colour": spec.colour, "shape": spec.shape, "count": spec.count}[kind]
    return _finish(language, words[kind][value])


def question(kind: str, language: str) -> str:
    return VOCAB[language]["questions"][KINDS.index(kind)]


def caption(spec: ImageSpec, language: str) -> str:
    """The stage-1 caption: ``"Red, circle, two."`` in ``language``."""
    words = VOCAB[language]
    text = ", ".join((words["colour"][spec.colour], words["shape"][spec.shape], words["count"][spec.count]))
    return _finish(language, text)


def all_text() -> list[str]:
    """Every question and answer the task can produce (tokenizer training text)."""
    text = []
    for language, words in VOCAB.items():
        text += list(words["questions"])
        for kind in KINDS:
            text += [_finish(language, w) for w in words[kind].values()]
        for c in words["colour"].values():
            for s in words["shape"].values():
                text += [_finish(language, ", ".join((c, s, n))) for n in words["count"].values()]
    return text


def _draw_all(folder: str, count: int, seed: int, size: int, prefix: str) -> list[ImageSpec]:
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    specs = [sample_spec(rng, f"{prefix}{i:05d}.png", size) for i in range(count)]
    for spec in specs:
        draw(spec).save(os.path.join(folder, spec.name))
    return specs


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_specs(path: str) -> list[ImageSpec]:
    """Read a ``specs.json`` written next to an image folder."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [ImageSpec(r["name"], r["size"], r["colour"], r["shape"], tuple(tuple(b) for b in r["boxes"])) for r in rows]


@dataclass(frozen=True)
class TaskPaths:
    """Where :func:`write_task` put things."""

    root: str
    images: str
    stage1_json: str
    stage2_json: str
    bench: str


def write_task(root: str, train_images: int, eval_images: int, size: int = 84, seed: int = 0) -> TaskPaths:
    """Draw the training images and write the stage-1 / stage-2 JSON files and the evaluation bench.

    Args:
        root: Output folder (``images/``, ``specs.json``, ``stage1.json``, ``stage2.json``, ``bench/``).
        train_images: Images for training (each used once per stage, in one language, cycling through all 10).
        eval_images: Held-out images; every language asks all three questions about each.
        size: Canvas side in pixels (a multiple of 3 and of the CLIP patch size keeps shapes patch-aligned).
        seed: Training images use ``seed``; evaluation images use another stream (``seed + 1_000_003``).

    Returns:
        The paths written.
    """
    images = os.path.join(root, "images")
    specs = _draw_all(images, train_images, seed, size, "train-")
    _write_json(os.path.join(root, "specs.json"), [asdict(s) for s in specs])
    languages = list(VOCAB)
    rng = random.Random(seed + 7)
    stage1, stage2 = [], []
    for i, spec in enumerate(specs):
        language = languages[i % len(languages)]
        stage1.append({"id": f"cap-{i}", "image": spec.name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(spec, language)}]})
        kinds = list(KINDS)
        rng.shuffle(kinds)
        turns = []
        for j, kind in enumerate(kinds):
            q = question(kind, language)
            turns += [{"from": "human", "value": f"<image>\n{q}" if j == 0 else q},
                      {"from": "gpt", "value": answer(spec, kind, language)}]
        stage2.append({"id": f"qa-{i}", "image": spec.name, "conversations": turns})
    stage1_json, stage2_json = os.path.join(root, "stage1.json"), os.path.join(root, "stage2.json")
    _write_json(stage1_json, stage1)
    _write_json(stage2_json, stage2)
    bench = write_bench(os.path.join(root, "bench"), eval_images, size, seed + 1_000_003)
    return TaskPaths(root, images, stage1_json, stage2_json, bench)


def write_bench(root: str, num_images: int, size: int, seed: int) -> str:
    """The evaluation set in the multilingual LLaVA-Bench layout; question ids are shared across languages.

    Question ``3 * i + k`` asks question kind ``KINDS[k]`` about image ``i``; its ``category`` is the kind.
    """
    specs = _draw_all(os.path.join(root, "images"), num_images, seed, size, "eval-")
    _write_json(os.path.join(root, "specs.json"), [asdict(s) for s in specs])
    for language in VOCAB:
        questions, answers, contexts = [], [], []
        for i, spec in enumerate(specs):
            contexts.append({"id": i, "image": spec.name, "caption": caption(spec, "english")})
            for k, kind in enumerate(KINDS):
                qid = 3 * i + k
                q = question(kind, language)
                questions.append({"question_id": qid, "image": spec.name, "text": q, "category": kind})
                answers.append({"question_id": qid, "prompt": q, "text": answer(spec, kind, language),
                                "answer_id": f"ref-{language}-{qid}", "model_id": "ground-truth", "metadata": {}})
        folder = os.path.join(root, language)
        _write_jsonl(os.path.join(folder, "question.jsonl"), questions)
        _write_jsonl(os.path.join(folder, "answers.jsonl"), answers)
        _write_jsonl(os.path.join(folder, "context.jsonl"), contexts)
    return root
