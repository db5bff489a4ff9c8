"""``palo-data merge``: counts, the training layout of translated samples, and a seed-deterministic shuffle."""

from __future__ import annotations

import json
import os

from palo.data.cli import main


def _english(n: int) -> list[dict]:
    return [{"id": f"en{i}", "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"Thing {i}."}]}
        for i in range(n)]


def _translated(language: str, text: str, n: int, corrupt: set[int]) -> list[dict]:
    out = []
    for sample in _english(n):
        sample = dict(sample, id=sample["id"].replace("en", language[:2]))
        sample[f"{language}_conversation"] = [{"from": "human", "value": f"<image>\n{text}"},
                                              {"from": "gpt", "value": text}]
        sample["corrupt"] = int(sample["id"][2:]) in corrupt
        out.append(sample)
    return out


def _write(path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _merge(tmp_path, name: str, seed: int, *extra: str) -> list[dict]:
    english = _write(tmp_path / "en.json", _english(5))
    arabic = _write(tmp_path / "ar.json", _translated("arabic", "ما هذا؟", 4, corrupt={1}))
    chinese = _write(tmp_path / "zh.json", _translated("chinese", "这是什么？", 3, corrupt=set()))
    out = tmp_path / name
    assert main(["merge", "--data_path", english, "--translated", arabic, chinese, "--output", str(out),
                 "--seed", str(seed), *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_merge_counts_and_layout(tmp_path, capsys):
    merged = _merge(tmp_path, "m.json", 0, "--image_prefix", "coco/train2017")
    printed = capsys.readouterr().out
    assert "english" in printed and "arabic" in printed and "1 corrupt dropped" in printed
    languages = [s.get("language", "english") for s in merged]
    assert (languages.count("english"), languages.count("arabic"), languages.count("chinese")) == (5, 3, 3)
    arabic = [s for s in merged if s.get("language") == "arabic"]
    for sample in arabic:
        assert sample["conversations"][1]["value"] == "ما هذا؟"
        assert sample["english_conversations"][0]["value"] == "<image>\nWhat is this?"
        assert "arabic_conversation" not in sample and sample["corrupt"] is False
        assert sample["image"].startswith("coco/train2017/")
    assert "ar1" not in {s["id"] for s in merged}
    english = [s for s in merged if "language" not in s]
    assert all(s["image"] == f"{s['id'][2:]}.jpg" for s in english)  # the English set is taken as it is


def test_merge_refuses_a_missing_or_broken_set_naming_it(tmp_path, capsys):
    english = _write(tmp_path / "en.json", _english(2))
    broken = tmp_path / "ar.json"
    broken.write_text('[{"id": 1},', encoding="utf-8")
    out = tmp_path / "merged.json"
    for translated, why in ((str(tmp_path / "gone.json"), "no such file"), (str(broken), "not valid JSON")):
        assert main(["merge", "--data_path", english, "--translated", translated, "--output", str(out)]) == 2
        assert f"error: --translated {translated}: {why}" in capsys.readouterr().err
    assert not out.exists()


def test_merge_refuses_outputs_that_are_inputs_a_set_given_twice_and_a_set_of_two_languages(tmp_path, capsys):
    """Each of these lost data without a word: an input replaced by the merge, a set merged twice, and the second
    language of a mixed set dropped and counted as corrupt."""
    english = _write(tmp_path / "en.json", _english(3))
    arabic = _write(tmp_path / "ar.json", _translated("arabic", "ما هذا؟", 2, corrupt=set()))
    before = {path: open(path, encoding="utf-8").read() for path in (english, arabic)}
    for translated, output, why in (([arabic], english, "is also an input"), ([arabic], arabic, "is also an input"),
                                    ([arabic, arabic], str(tmp_path / "m.json"), "is given twice")):
        assert main(["merge", "--data_path", english, "--translated", *translated, "--output", output]) == 2
        assert why in capsys.readouterr().err
    assert {path: open(path, encoding="utf-8").read() for path in before} == before
    mixed = _write(tmp_path / "mixed.json", _translated("arabic", "ما هذا؟", 2, set())
                   + _translated("chinese", "这是什么？", 3, set()))
    assert main(["merge", "--data_path", english, "--translated", mixed, "--output", str(tmp_path / "m.json")]) == 2
    assert "sample 2 is chinese, the set's earlier samples are arabic" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(tmp_path / "folder")]) == 2
    assert "cannot write --output" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_merge_shuffle_is_deterministic(tmp_path):
    a = _merge(tmp_path, "a.json", 7)
    b = _merge(tmp_path, "b.json", 7)
    c = _merge(tmp_path, "c.json", 8)
    assert a == b
    assert [s["id"] for s in a] != [s["id"] for s in c]
    assert sorted(s["id"] for s in a) == sorted(s["id"] for s in c)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_merge_keep_corrupt(tmp_path):
    merged = _merge(tmp_path, "k.json", 0, "--keep_corrupt")
    assert sum(1 for s in merged if s.get("corrupt")) == 1


def test_merge_refuses_samples_that_are_not_objects_or_not_utf8_and_sets_without_a_language(tmp_path, capsys):
    english = _write(tmp_path / "en.json", _english(2))
    numbers = _write(tmp_path / "numbers.json", [1, 2])
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"id": "é"}]'.encode("latin-1"))
    plain = _write(tmp_path / "plain.json", _english(2))  # English, not a translated set
    out = tmp_path / "merged.json"
    for translated, why in ((numbers, "expected a JSON array of samples (objects)"), (str(latin1), "not UTF-8"),
                            (plain, "no '<language>_conversation' key")):
        assert main(["merge", "--data_path", english, "--translated", translated, "--output", str(out)]) == 2
        assert f"error: --translated {translated}: " in (err := capsys.readouterr().err) and why in err, err
    assert not out.exists() and not list(tmp_path.glob("*.npz"))  # no index caches left beside the inputs


def test_merge_never_holds_the_sets_in_memory(tmp_path, capsys, monkeypatch):
    """At PALO scale the inputs are ~2M samples (tens of GB as Python objects): merge keeps positions, and reads
    each sample back when it writes it."""
    import tracemalloc

    from palo.data.json_index import JsonArrayIndex

    # The index's scan works through 4 MB chunks with scratch arrays several times that size, a constant that would
    # dwarf these small files; smaller chunks leave the merge's own memory to be measured.
    build = JsonArrayIndex.build
    monkeypatch.setattr(JsonArrayIndex, "build", classmethod(lambda cls, path, **kw: build(path, chunk_size=1 << 16,
                                                                                             **kw)))

    long = "word " * 400
    english = _english(1000)
    for sample in english:
        sample["conversations"][1]["value"] += long
    arabic = _translated("arabic", "ما هذا؟ " * 200, 1000, corrupt={3})
    paths = [_write(tmp_path / "en.json", english), _write(tmp_path / "ar.json", arabic)]
    inputs = sum(os.path.getsize(p) for p in paths)
    del english, arabic
    assert main(["merge", "--data_path", paths[0], "--translated", paths[1], "--output", str(tmp_path / "w.json")]) == 0
    tracemalloc.start()
    try:
        assert main(["merge", "--data_path", paths[0], "--translated", paths[1], "--output",
                     str(tmp_path / "m.json")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "1999 samples" in capsys.readouterr().out
    assert peak < inputs / 4, (peak, inputs)


def test_merged_order_is_the_seeded_shuffle_of_english_then_each_kept_translated_sample(tmp_path):
    """The streaming merge writes what shuffling the whole list in memory gave, so a rerun of an earlier merge with
    the same inputs and seed reproduces its file."""
    import random

    from palo.data.merge import to_training

    merged = _merge(tmp_path, "o.json", 3, "--image_prefix", "coco/train2017")
    expected = _english(5)
    expected += [to_training(s, "arabic", "coco/train2017") for s in _translated("arabic", "ما هذا؟", 4, {1})
                 if not s["corrupt"]]
    expected += [to_training(s, "chinese", "coco/train2017") for s in _translated("chinese", "这是什么？", 3, set())]
    random.Random(3).shuffle(expected)
    assert merged == expected


def test_merge_refuses_a_translated_sample_without_conversations_before_writing(tmp_path, capsys):
    """A kept translated sample without 'conversations' raised KeyError (a traceback) from the write pass, i.e.
    after the whole filter pass, hours in at PALO scale; a broken English sample likewise only at the end."""
    english = _write(tmp_path / "en.json", _english(2))
    broken = _translated("arabic", "ما هذا؟", 2, corrupt=set())
    del broken[1]["conversations"]
    arabic = _write(tmp_path / "ar.json", broken)
    out = tmp_path / "out.json"
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--translated {arabic}: sample 1 has no 'conversations' list" in err and "Traceback" not in err
    english_broken = _english(2)
    english_broken[0]["conversations"] = "What is this?"
    english = _write(tmp_path / "en.json", english_broken)
    arabic = _write(tmp_path / "ar.json", _translated("arabic", "ما هذا؟", 2, corrupt=set()))
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out)]) == 2
    assert f"--data_path {english}: sample 0 has no 'conversations' list" in capsys.readouterr().err
    assert not out.exists()


def test_merge_counts_untranslated_samples_apart_and_drops_corrupt_english_ones(tmp_path, capsys):
    """An untranslated sample was reported as "corrupt dropped", and a corrupt English sample was kept and counted,
    so the printed total overstated what the trainer uses."""
    english = _english(2)
    english[1]["corrupt"] = True
    hindi = _translated("hindi", "यह क्या है?", 3, corrupt=set())
    del hindi[2]["hindi_conversation"]  # never translated
    out = tmp_path / "out.json"
    assert main(["merge", "--data_path", _write(tmp_path / "en.json", english), "--translated",
                 _write(tmp_path / "hi.json", hindi), "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["english", "1", "samples", "(1", "corrupt", "dropped)"]
    assert lines[1].split() == ["hindi", "2", "samples", "(1", "untranslated", "dropped)"]
    assert lines[2].split()[:2] == ["total", "3"]
    merged = json.loads(out.read_text(encoding="utf-8"))
    assert len(merged) == 3 and not any(sample.get("corrupt") for sample in merged)


def test_merge_image_prefix_leaves_absolute_paths_and_refuses_a_list(tmp_path, capsys):
    """--image_prefix turned "/data/coco/1.jpg" into "coco/train2017//data/coco/1.jpg" (a file that does not exist)
    and a list into "coco/train2017/['a.jpg']"."""
    arabic = _translated("arabic", "ما هذا؟", 2, corrupt=set())
    arabic[0]["image"] = "/data/coco/1.jpg"
    english = _write(tmp_path / "en.json", [])
    out = tmp_path / "out.json"
    args = ["merge", "--data_path", english, "--output", str(out), "--image_prefix", "coco/train2017"]
    assert main([*args, "--translated", _write(tmp_path / "ar.json", arabic)]) == 0
    assert sorted(s["image"] for s in json.loads(out.read_text(encoding="utf-8"))) == [
        "/data/coco/1.jpg", "coco/train2017/1.jpg"]
    arabic[1]["image"] = ["a.jpg"]
    assert main([*args, "--translated", _write(tmp_path / "ar.json", arabic)]) == 2
    assert "sample 1: 'image' must be one file name, not list" in capsys.readouterr().err


def test_merge_removes_the_temp_file_a_killed_merge_left(tmp_path, capsys):
    """A kill -9 mid-write left a full-size <output>.XXXX.tmp (13 GB at PALO scale) that no later run removed."""
    import subprocess
    import sys

    from palo.jsonl import temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out.json"
    orphan = tmp_path / f"{temp_prefix(str(out))}{int(dead.stdout)}-abc123.tmp"
    orphan.write_text("[half a merge", encoding="utf-8")
    live = tmp_path / f"{temp_prefix(str(out))}{os.getpid()}-def456.tmp"  # a merge still running: not touched
    live.write_text("[", encoding="utf-8")
    english = _write(tmp_path / "en.json", _english(2))
    arabic = _write(tmp_path / "ar.json", _translated("arabic", "ما هذا؟", 2, corrupt=set()))
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out)]) == 0
    assert not orphan.exists() and live.exists() and len(json.loads(out.read_text(encoding="utf-8"))) == 4
    assert f"[cleanup] removed {orphan}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [live.name]


def _set_up_translated_inputs(tmp_path) -> tuple[str, str, list[dict]]:
    english = _write(tmp_path / "en.json", _english(3))
    arabic = _translated("arabic", "ما هذا؟", 4, corrupt=set())
    return english, _write(tmp_path / "ar.json", arabic), arabic


def _hook_after_indexing(monkeypatch, path: str, change) -> None:
    """Run ``change()`` once ``path`` has been indexed by merge, before any of its samples is read."""
    from palo.data import merge

    real = merge.SampleFile

    def indexed_then_changed(file, what, *args, **kwargs):
        samples = real(file, what, *args, **kwargs)
        if file == path:
            change()
        return samples

    monkeypatch.setattr(merge, "SampleFile", indexed_then_changed)


def test_merge_reads_an_input_replaced_atomically_meanwhile_as_it_was_indexed(tmp_path, capsys, monkeypatch):
    """A rerun of palo-data translate replaces <language>.json atomically (same content) while a merge reads it: the
    file was opened on first read, after indexing, so the merge died with a DataFileChangedError traceback (a
    RuntimeError, past the ValueError handlers) whose message spoke of training."""
    import random

    from palo.data.merge import to_training

    english, arabic, samples = _set_up_translated_inputs(tmp_path)

    def rerun_of_translate() -> None:
        # A reordered set of the same size: the old offsets would read other samples without noticing.
        _write(tmp_path / "ar.rerun.json", samples[::-1])
        os.replace(tmp_path / "ar.rerun.json", arabic)

    _hook_after_indexing(monkeypatch, arabic, rerun_of_translate)
    out = tmp_path / "m.json"
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out), "--seed", "0"]) == 0
    assert "total              7 samples" in capsys.readouterr().out
    expected = _english(3) + [to_training(sample, "arabic") for sample in samples]  # the version indexed
    random.Random(0).shuffle(expected)
    assert json.loads(out.read_text(encoding="utf-8")) == expected


def test_merge_of_an_input_edited_in_place_meanwhile_is_one_error_line(tmp_path, capsys, monkeypatch):
    """An input edited in place during the merge (its samples where they were, so every read succeeds) stops it
    with one line naming the flag and file, not training, and writes no output."""
    from palo.data import merge

    english, arabic, samples = _set_up_translated_inputs(tmp_path)
    real_to_training, edited = merge.to_training, []

    def edit_during_the_write_pass(sample, *args):
        if not edited:  # the first translated sample of the write pass: the file was read before, and is open
            edited.append(True)
            text = (tmp_path / "ar.json").read_bytes().replace("هذا".encode(), "ذلك".encode())
            with open(arabic, "r+b") as f:  # in place: the same inode, the same size
                f.write(text)
            st = os.stat(arabic)
            os.utime(arabic, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a clock tick later on any FS
        return real_to_training(sample, *args)

    monkeypatch.setattr(merge, "to_training", edit_during_the_write_pass)
    out = tmp_path / "m.json"
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert edited and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --translated {arabic}: the data file changed since it was indexed at "), err
    assert "(modified at " in err and "training" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["ar.json", "en.json"]  # no output, no temp file


def _retranslated(n: int) -> list[dict]:
    """A Russian set translated from a Spanish one (original PALO outputs keep ``<language>_conversation``):
    translate keeps every field of its input, so each sample carries both keys."""
    out = []
    for sample in _translated("spanish", "¿Qué es esto?", n, corrupt=set()):
        sample["russian_conversation"] = [{"from": "human", "value": "<image>\nЧто это?"},
                                          {"from": "gpt", "value": "Что это?"}]
        out.append(sample)
    return out


def test_a_set_translated_from_another_translated_set_is_merged_as_the_language_it_was_translated_into(tmp_path,
                                                                                                       capsys):
    """The first <language>_conversation key present was taken: a Russian set whose samples also carry the Spanish
    key they were translated from was labelled and merged as Spanish."""
    english = _write(tmp_path / "en.json", _english(1))
    russian = _write(tmp_path / "russian.json", _retranslated(2))  # the name translate gives its output
    out = tmp_path / "m.json"
    assert main(["merge", "--data_path", english, "--translated", russian, "--output", str(out)]) == 0
    assert "russian" in capsys.readouterr().out
    merged = [s for s in json.loads(out.read_text(encoding="utf-8")) if "language" in s]
    assert [s["language"] for s in merged] == ["russian", "russian"]
    for sample in merged:
        assert sample["conversations"][1]["value"] == "Что это?"
        assert sample["english_conversations"][0]["value"] == "<image>\nWhat is this?"
        assert "russian_conversation" not in sample and "spanish_conversation" not in sample
    # Whose name says no language: which key translate wrote cannot be told, so the merge refuses rather than guess.
    unnamed = _write(tmp_path / "set.json", _retranslated(2))
    assert main(["merge", "--data_path", english, "--translated", unnamed, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--translated {unnamed}: sample 0 carries 'spanish_conversation' and 'russian_conversation'" in err
    assert "spanish.json or russian.json" in err
    # Named for a language its samples were not translated into (a renamed file): refused too.
    arabic = _write(tmp_path / "ar.json", _retranslated(2))
    assert main(["merge", "--data_path", english, "--translated", arabic, "--output", str(out)]) == 2
    assert "sample 0 is spanish and russian, not arabic as the file's name says" in capsys.readouterr().err
