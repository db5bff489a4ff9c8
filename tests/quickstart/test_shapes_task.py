"""The quickstart generator's answers are right for its images: re-derived from the pixels and the parameters."""

from __future__ import annotations

import json
import os
from collections import deque

import numpy as np
import pytest
from PIL import Image

from palo.data.languages import LANGUAGES
from palo.eval.bench import language_files
from palo.quickstart import shapes_task
from palo.quickstart.exact_match import is_correct, normalise


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask (a plain BFS: no scipy needed)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(pixels)
    return out


def read_pixels(path: str) -> tuple[str, str, int]:
    """(colour, shape, count) measured from an image file alone."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    foreground = (pixels != np.array(shapes_task.BACKGROUND)).any(-1)
    values = {tuple(v) for v in pixels[foreground]}
    assert len(values) == 1, f"{path}: shapes must be one flat colour, got {len(values)}"
    (value,) = values
    colour = min(shapes_task.COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(shapes_task.COLOURS[c], value)))
    blobs = _components(foreground)
    shapes = set()
    for blob in blobs:
        ys, xs = zip(*blob)
        fill = len(blob) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
        # bounding-box fill: square 1.0, circle pi/4 ~ 0.79, triangle ~ 0.5
        shapes.add("square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle")
    assert len(shapes) == 1, f"{path}: one shape kind per image, got {shapes}"
    return colour, shapes.pop(), len(blobs)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return shapes_task.write_task(str(tmp_path_factory.mktemp("qs")), train_images=60, eval_images=30, seed=3)


def test_every_vocabulary_has_all_languages_and_distinct_answers():
    assert tuple(shapes_task.VOCAB) == LANGUAGES
    for language, words in shapes_task.VOCAB.items():
        assert len(words["questions"]) == 3 and len(set(words["questions"])) == 3
        kinds = (("colour", shapes_task.COLOURS), ("shape", shapes_task.SHAPES), ("count", shapes_task.COUNTS))
        for kind, values in kinds:
            answers = {normalise(shapes_task._finish(language, words[kind][v])) for v in values}
            assert len(answers) == len(values), (language, kind)  # the judge can tell every answer apart


def test_training_answers_match_pixels_and_parameters(task):
    specs = {s.name: s for s in shapes_task.load_specs(os.path.join(task.root, "specs.json"))}
    samples = json.load(open(task.stage2_json, encoding="utf-8"))
    assert len(samples) == 60 and {s["image"] for s in samples} == set(specs)
    for sample in samples:
        spec = specs[sample["image"]]
        measured = read_pixels(os.path.join(task.images, spec.name))
        assert measured == (spec.colour, spec.shape, spec.count), spec
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        first = turns[0]["value"].split("\n", 1)[1]
        language = next(lang for lang, w in shapes_task.VOCAB.items() if first in w["questions"])
        values = {"colour": measured[0], "shape": measured[1], "count": measured[2]}
        for human, gpt in zip(turns[::2], turns[1::2]):
            asked = human["value"].replace("<image>\n", "")
            kind = shapes_task.KINDS[shapes_task.VOCAB[language]["questions"].index(asked)]
            word = shapes_task.VOCAB[language][kind][values[kind]]
            assert normalise(gpt["value"]) == normalise(word)


def test_bench_layout_and_references_match_pixels(task):
    specs = {s.name: s for s in shapes_task.load_specs(os.path.join(task.bench, "specs.json"))}
    train_specs = shapes_task.load_specs(os.path.join(task.root, "specs.json"))
    assert not {s.name for s in train_specs} & set(specs)  # held out: other files, drawn from another seed
    measured = {name: read_pixels(os.path.join(task.bench, "images", name)) for name in specs}
    for language in LANGUAGES:
        files = language_files(task.bench, language)
        questions = [json.loads(line) for line in open(files.questions, encoding="utf-8")]
        answers = {a["question_id"]: a for a in map(json.loads, open(files.answers, encoding="utf-8"))}
        assert len(questions) == 3 * len(specs) and set(answers) == {q["question_id"] for q in questions}
        for q in questions:
            colour, shape, count = measured[q["image"]]
            value = {"colour": colour, "shape": shape, "count": count}[q["category"]]
            assert q["text"] == shapes_task.question(q["category"], language)
            word = shapes_task.VOCAB[language][q["category"]][value]
            assert answers[q["question_id"]]["text"] == shapes_task._finish(language, word)


def test_judge_normalises_case_space_and_punctuation():
    assert is_correct(" red ", "Red.") and is_correct("红色", "红色。") and is_correct("लाल", "लाल।")
    assert is_correct("نیلا", "نیلا۔") and not is_correct("Red square.", "Red.") and not is_correct("", "Red.")
