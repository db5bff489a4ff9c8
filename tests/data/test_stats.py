"""``palo-data stats`` on a small multilingual file whose counts the test works out on its own.

Samples, turns and images are known by construction; words and characters are counted here with regular
expressions; tokens and byte-fallback tokens with the SentencePiece model itself (not through the tokenizer class
the command uses). A character the tiny tokenizer never saw (U+1D11E, four UTF-8 bytes) must come out as byte
fallback.
"""

from __future__ import annotations

import json
import os
import re

import sentencepiece as spm

from palo.data import cli

CLEF = "\U0001d11e"  # MUSICAL SYMBOL G CLEF: in no training text of the tiny tokenizer -> 4 byte pieces

SAMPLES = [
    {"id": "en1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "The circle is red."}]},
    {"id": "en2", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Another one, please."}, {"from": "gpt", "value": "Green and yellow."}]},
    {"id": "zh1", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\n这两张图片有什么不同？"},
        {"from": "gpt", "value": "第一张是红色的，第二张是蓝色的。"}]},
    {"id": "hi1", "image": "c.png", "conversations": [
        {"from": "human", "value": "<image>\nवृत्त किस रंग का है?"},
        {"from": "gpt", "value": "वृत्त लाल है।"}]},
    {"id": "bn1", "conversations": [
        {"from": "human", "value": f"বৃত্তটি কোন রঙের? {CLEF}"},
        {"from": "gpt", "value": "বৃত্তটি লাল।"}]},
    # Dropped by training (and validate), so not counted: skipped, and the skip reported.
    {"id": "fr-corrupt", "corrupt": True, "conversations": [
        {"from": "human", "value": "Que fait le chat sur la table ?"}, {"from": "gpt", "value": "Le chat dort."}]},
    {"id": "broken", "image": "d.png"},
]
LANGUAGE = {"en1": "english", "en2": "english", "zh1": "chinese", "hi1": "hindi", "bn1": "bengali"}
QUESTIONS = [
    {"question_id": 0, "image": "a.png", "text": "What colour is the circle?"},
    {"question_id": 1, "image": "a.png", "text": "বৃত্তটি কোন রঙের?"},
    {"question_id": 2, "text": "Describe the picture."},
]


def _expected(world, samples: list[dict]) -> dict[str, dict]:
    sp = spm.SentencePieceProcessor(model_file=os.path.join(world.tokenizer_dir, "tokenizer.model"))
    out: dict[str, dict] = {}
    for sample in samples:
        texts = [t["value"].replace("<image>", " ").strip() for t in sample["conversations"]]
        row = out.setdefault(LANGUAGE.get(sample["id"], sample.get("language")),
                             dict(samples=0, turns=0, image_samples=0, images=0, words=0, characters=0, tokens=0,
                                  byte_tokens=0))
        image = sample.get("image")
        row["samples"] += 1
        row["turns"] += len(texts)
        row["image_samples"] += 1 if image else 0
        row["images"] += len(image) if isinstance(image, list) else (1 if image else 0)
        for text in texts:
            row["words"] += len(re.findall(r"\S+", text))
            row["characters"] += len(re.sub(r"\s", "", text))
            pieces = sp.encode(text, out_type=str)
            row["tokens"] += len(pieces)
            row["byte_tokens"] += sum(1 for p in pieces if re.fullmatch(r"<0x[0-9A-F]{2}>", p))
    return out


def test_stats_table_json_and_plot(world, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(SAMPLES, ensure_ascii=False), encoding="utf-8")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    out = tmp_path / "report" / "stats"
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir,
                     "--questions", str(questions), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out.parent / "stats.json").read_text(encoding="utf-8"))
    assert report["malformed_samples"] == 1 and report["corrupt_samples"] == 1
    train = report["sets"]["training data"]
    expected = _expected(world, SAMPLES[:-2])
    assert list(train) == ["english", "chinese", "hindi", "bengali"]  # paper order
    for language, row in expected.items():
        got = {k: train[language][k] for k in row}
        assert got == row, language
        assert train[language]["tokens_per_character"] == row["tokens"] / row["characters"]
        assert train[language]["tokens_per_word"] == row["tokens"] / row["words"]
    # Spot checks by hand: English is 2 + 4 turns, 5 + 4 + 3 + 1 + 3 + 3 words; Chinese has one sample, 2 images.
    assert train["english"]["turns"] == 6 and train["english"]["words"] == 19
    assert train["chinese"]["images"] == 2 and train["chinese"]["image_samples"] == 1
    assert train["chinese"]["words"] == 2 and train["chinese"]["characters"] == 11 + 16
    assert train["bengali"]["byte_tokens"] >= 4 and train["bengali"]["byte_token_share"] > 0  # the clef, as bytes

    evaluation = report["sets"]["evaluation questions"]
    q_expected = _expected(world, [
        {"id": str(q["question_id"]), "language": lang, "image": q.get("image"),
         "conversations": [{"value": q["text"]}]}
        for q, lang in zip(QUESTIONS, ("english", "bengali", "english"))])
    for language, row in q_expected.items():
        assert {k: evaluation[language][k] for k in row} == row, language

    md = (out.parent / "stats.md").read_text(encoding="utf-8")
    assert md in printed + "\n"
    e = train["english"]
    assert (f"| english | 2 | 6 | 1 | 1 | {e['words']} | {e['characters']} | {e['tokens']} | "
            f"{e['tokens'] / e['words']:.2f} | {e['tokens'] / e['characters']:.2f} | "
            f"{100 * e['byte_tokens'] / e['tokens']:.1f} % |") in md
    assert "### evaluation questions" in md and "1 malformed sample(s) skipped" in md
    assert "1 corrupt sample(s) skipped" in md
    png = (out.parent / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def _bench(root) -> str:
    """A bench folder in the README layout: 2 English and 3 Urdu questions (Urdu text but an English-looking id)."""
    for language, texts in (("english", ["What is this?", "Describe it."]),
                            ("urdu", ["یہ کیا ہے؟", "اسے بیان کریں۔", "ok"])):
        folder = root / language
        folder.mkdir(parents=True)
        for name in ("question.jsonl", "answers.jsonl"):
            (folder / name).write_text("".join(json.dumps({"question_id": i, "image": "x.png", "text": t},
                                                          ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
                                       encoding="utf-8")
        (folder / "context.jsonl").write_text("", encoding="utf-8")
    return str(root)


def test_bench_folder_languages_and_bad_input(world, tmp_path, capsys):
    bench = _bench(tmp_path / "bench")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(SAMPLES[:2]), encoding="utf-8")
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir,
                     "--questions", bench, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    evaluation = report["sets"]["evaluation questions"]
    # The folder gives the language (the Latin "ok" still counts as Urdu); answers/context are not questions.
    assert {k: (v["samples"], v["images"]) for k, v in evaluation.items()} == {"english": (2, 2), "urdu": (3, 3)}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 0, "text": "ok"}\n{"question_id": 1}\n', encoding="utf-8")
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir,
                     "--questions", str(bad)]) == 2
    assert f"{bad}:2: missing key(s) text" in capsys.readouterr().err
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", str(tmp_path / "nowhere"),
                     ]) == 2
    assert "no tokenizer could be loaded" in capsys.readouterr().err
    # Outputs that would replace the data, or have no name, or cannot be written: refused, the data untouched.
    before = data.read_bytes()
    for out, why in ((str(tmp_path / "data"), "which is --data_path"), (str(tmp_path) + "/", "must be a path prefix"),
                     ("/proc/no-such/s", "cannot write --out")):
        assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir, "--out", out]) == 2
        assert why in capsys.readouterr().err
    assert data.read_bytes() == before


def test_stats_out_may_not_replace_a_questions_input(tmp_path, capsys):
    """Only --data_path was checked: --questions q.json --out q replaced the question file with the stats JSON."""
    data = tmp_path / "data.json"
    data.write_text("[]", encoding="utf-8")
    questions = tmp_path / "q.json"
    questions.write_text('{"question_id": 0, "text": "What is it?"}\n', encoding="utf-8")
    bench = tmp_path / "bench" / "urdu"
    bench.mkdir(parents=True)
    (bench / "questions.json").write_text('{"question_id": 0, "text": "یہ کیا ہے؟"}\n', encoding="utf-8")
    for given, out in ((str(questions), str(tmp_path / "q")), (str(tmp_path / "bench"), str(bench / "questions"))):
        # The check comes before the tokenizer is loaded: none is needed to see the clash.
        assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", str(tmp_path / "nowhere"),
                         "--questions", given, "--out", out]) == 2
        assert "which is --questions" in capsys.readouterr().err
    assert questions.read_text(encoding="utf-8").startswith('{"question_id": 0')
    assert (bench / "questions.json").read_text(encoding="utf-8").startswith('{"question_id": 0')


def test_stats_decides_corrupt_before_conversations(world, tmp_path, capsys):
    """A corrupt: true sample without 'conversations' was counted malformed; training filters it as corrupt."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([SAMPLES[1], {"id": "c2", "corrupt": True}]), encoding="utf-8")
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["malformed_samples"], report["corrupt_samples"]) == (0, 1)


def test_stats_counts_an_entry_that_is_not_json_as_malformed_and_goes_on(world, tmp_path, capsys):
    """One entry that is not valid JSON ended the whole report (exit 2), where validate lists it and training skips
    it with --skip_bad_samples."""
    data = tmp_path / "data.json"
    good = json.dumps(SAMPLES[1])
    data.write_text(f'[{good},\n{{"id": "bad" "conversations": []}},\n{good}]', encoding="utf-8")
    assert cli.main(["stats", "--data_path", str(data), "--model_name_or_path", world.full_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["malformed_samples"] == 1 and report["sets"]["training data"]["english"]["samples"] == 2
