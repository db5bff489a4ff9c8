"""A tiny multilingual LLaVA-Bench built on the fly, and a local judge server.

The bench has three languages in three scripts, each in a different on-disk layout, so every test also exercises
layout resolution: English in the original script's names (``questions.jsonl``, ``answers_gpt4.jsonl``), Arabic in
``corrected/``, Chinese in the README's flat layout. Three PIL-drawn images of different shapes (wide, tall,
square) exercise padding.
"""

from __future__ import annotations

import json
import os

import pytest
from fake_judge import FakeJudge  # tests/eval is on sys.path (rootdir-relative test layout, no packages)
from PIL import Image, ImageDraw

# (question_id, image, category, text, reference answer) per language; ids are shared across languages, as in
# the real bench.
QUESTIONS = {
    "english": [
        (0, "001.png", "conv", "What colour is the circle?", "The circle is red."),
        (1, "002.png", "detail", "Describe the image in detail.", "A tall image with a blue square on white."),
        (2, "003.png", "complex", "Why might someone draw a green triangle?", "To show a simple shape."),
        (3, "001.png", "conv", "How many shapes are there?", "There is one shape."),
    ],
    "arabic": [
        (0, "001.png", "conv", "ما لون الدائرة؟", "الدائرة حمراء."),
        (1, "002.png", "detail", "صف الصورة بالتفصيل.", "مربع أزرق على خلفية بيضاء."),
        (2, "003.png", "complex", "لماذا قد يرسم شخص مثلثا أخضر؟", "لإظهار شكل بسيط."),
        (3, "001.png", "conv", "كم عدد الأشكال؟", "يوجد شكل واحد."),
    ],
    "chinese": [
        (0, "001.png", "conv", "圆形是什么颜色？", "圆形是红色的。"),
        (1, "002.png", "detail", "请详细描述这张图片。", "白色背景上有一个蓝色正方形。"),
        (2, "003.png", "complex", "为什么有人会画一个绿色三角形？", "为了展示一个简单的形状。"),
    ],
}
CONTEXTS = {
    "001.png": "A wide white picture with a red circle on the left.",
    "002.png": ["A tall white picture.", "A blue square sits in the middle."],
    "003.png": "A square picture of a green triangle.",
}
LAYOUT = {  # language -> (sub-folder, question file, answers file)
    "english": ("", "questions.jsonl", "answers_gpt4.jsonl"),
    "arabic": ("corrected", "question.jsonl", "answers.jsonl"),
    "chinese": ("", "question.jsonl", "answers.jsonl"),
}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_images(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    wide = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(wide).ellipse((4, 8, 44, 48), fill="red")
    wide.save(os.path.join(folder, "001.png"))
    tall = Image.new("RGB", (40, 70), "white")
    ImageDraw.Draw(tall).rectangle((8, 25, 32, 45), fill="blue")
    tall.save(os.path.join(folder, "002.png"))
    square = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(square).polygon([(28, 6), (50, 50), (6, 50)], fill="green")
    square.save(os.path.join(folder, "003.png"))


def write_bench(root: str, languages: tuple[str, ...] = tuple(QUESTIONS)) -> str:
    """Write the tiny bench under ``root`` and return it."""
    write_images(os.path.join(root, "images"))
    for language in languages:
        sub, qname, aname = LAYOUT[language]
        folder = os.path.join(root, language, sub)
        rows = QUESTIONS[language]
        _write_jsonl(os.path.join(folder, qname), [
            {"question_id": qid, "image": image, "text": text, "category": cat} for qid, image, cat, text, _ in rows
        ])
        _write_jsonl(os.path.join(folder, aname), [
            {"question_id": qid, "prompt": text, "text": ref, "answer_id": f"ref-{language}-{qid}",
             "model_id": "gpt-4-0314", "metadata": {}} for qid, _, _, text, ref in rows
        ])
        _write_jsonl(os.path.join(folder, "context.jsonl"), [
            {"id": i, "image": image, "caption": caption} for i, (image, caption) in enumerate(CONTEXTS.items())
        ])
    return root


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_bench(str(tmp_path_factory.mktemp("bench")))


@pytest.fixture
def judge_server():
    server = FakeJudge().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy configured on the machine must not intercept requests to the local judge.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
