"""``palo.jsonl``: atomic whole-file writes, the lenient log reader, and the old ``palo.eval.jsonl`` path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import palo.eval.jsonl as old_path
import palo.jsonl as jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_writes_create_the_folder_and_write_utf8_lines(tmp_path):
    path = tmp_path / "new" / "reviews.jsonl"
    jsonl.write_jsonl_atomic(str(path), iter([{"a": "ٱ"}, {"b": 2}]))
    assert path.read_bytes() == '{"a": "ٱ"}\n{"b": 2}\n'.encode()
    jsonl.atomic_write_json(str(tmp_path / "set.json"), [{"x": 1}, {"y": "中"}])
    text = (tmp_path / "set.json").read_text(encoding="utf-8")
    assert text == '[\n{"x": 1},\n{"y": "中"}\n]\n' and json.loads(text) == [{"x": 1}, {"y": "中"}]
    jsonl.atomic_write_json(str(tmp_path / "empty.json"), [])
    assert json.loads((tmp_path / "empty.json").read_text(encoding="utf-8")) == []


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    jsonl.write_jsonl_atomic(str(path), [{"old": True}])

    def records():
        yield {"new": True}
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        jsonl.write_jsonl_atomic(str(path), records())
    assert path.read_text(encoding="utf-8") == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_writes_and_caches_get_the_mode_open_would_give_not_mkstemps_private_one(tmp_path):
    from palo.data.json_index import JsonArrayIndex

    umask = os.umask(0o022)
    try:
        jsonl.atomic_write_json(str(tmp_path / "set.json"), [{"id": 1}])
        jsonl.write_jsonl_atomic(str(tmp_path / "answers.jsonl"), [{"id": 1}])
        JsonArrayIndex.build(str(tmp_path / "set.json"))  # writes its index cache beside the data set
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(written) >= 3 and all(p.stat().st_mode & 0o777 == 0o644 for p in written), [
            (p.name, oct(p.stat().st_mode & 0o777)) for p in written]
    finally:
        os.umask(umask)


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        with jsonl.staged_folder(str(target)) as staging:
            (tmp_path / "out" / os.path.basename(staging) / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path / "out") == []  # neither the folder nor its staging copy
    with jsonl.staged_folder(str(target)) as staging:
        os.makedirs(os.path.join(staging, "sub"))
        (tmp_path / "out" / os.path.basename(staging) / "sub" / "a.txt").write_text("new")
        (tmp_path / "out" / os.path.basename(staging) / "config.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json", "sub"] and os.listdir(tmp_path / "out") == ["ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask  # as os.makedirs would make it, not private
    (target / "notes.md").write_text("mine")
    (target / "sub" / "old.txt").write_text("old")
    with jsonl.staged_folder(str(target)) as staging:  # into an existing folder: its own names replaced
        os.makedirs(os.path.join(staging, "sub"))
        (tmp_path / "out" / os.path.basename(staging) / "sub" / "a.txt").write_text("newer")
    assert (target / "notes.md").read_text() == "mine" and (target / "config.json").read_text() == "{}"
    assert os.listdir(target / "sub") == ["a.txt"] and (target / "sub" / "a.txt").read_text() == "newer"
    assert os.listdir(tmp_path / "out") == ["ckpt"]


def test_a_staged_folder_that_cannot_be_moved_in_leaves_nothing_and_replaces_the_writers_stale_files(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file where the folder goes")
    with pytest.raises(OSError):
        with jsonl.staged_folder(str(target)) as staging:
            (tmp_path / os.path.basename(staging) / "model.safetensors").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging folder did not stay behind
    target.unlink()
    target.mkdir()
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "README.md"):
        (target / name).write_text("old")
    with jsonl.staged_folder(str(target), replaces=("model*.safetensors",)) as staging:
        (tmp_path / os.path.basename(staging) / "model-00001-of-00002.safetensors").write_text("new")
    assert sorted(os.listdir(target)) == ["README.md", "model-00001-of-00002.safetensors"]
    assert (target / "model-00001-of-00002.safetensors").read_text() == "new"
    # A file its writer made private (safetensors writes 0600) gets the mode new files get.
    umask = os.umask(0o022)
    os.umask(umask)
    with jsonl.staged_folder(str(tmp_path / "private")) as staging:
        path = tmp_path / os.path.basename(staging) / "model.safetensors"
        path.write_text("w")
        os.chmod(path, 0o600)
    assert (tmp_path / "private" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_log_stops_at_a_torn_line_and_repair_cuts_it(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"index": 2, "sam')
    assert jsonl.read_log(str(path)) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes().endswith(b'"sam')  # reading alone changes nothing
    assert jsonl.read_log(str(path), repair=True) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'
    assert jsonl.read_log(str(tmp_path / "missing.jsonl")) == []


def test_appended_records_are_found_again_at_the_offsets_the_log_gives(tmp_path):
    """Readers that keep offsets instead of records (the translation run) seek to what the appender returned."""
    path = str(tmp_path / "progress.jsonl")
    with jsonl.JsonlAppender(path) as log:
        offsets = [log.write({"index": i, "text": "নমস্কার" * i}) for i in range(3)]
    with jsonl.JsonlAppender(path) as log:  # reopened: offsets continue after what is there
        offsets.append(log.write({"index": 3}))
    assert [offset for offset, _ in jsonl.iter_log(path)] == offsets
    with open(path, "rb") as f:
        for i, offset in enumerate(offsets):
            f.seek(offset)
            assert json.loads(f.readline())["index"] == i
    with open(path, "ab") as f:
        f.write(b'{"index": 4, "text": "\xff"}\n')  # a last line that is not UTF-8 is torn: cut
    assert [r["index"] for r in jsonl.read_log(path, repair=True)] == [0, 1, 2, 3]
    assert os.path.getsize(path) == offsets[-1] + len(b'{"index": 3}\n')


def test_a_writer_drops_damaged_lines_of_its_own_output_and_keeps_it_locked(tmp_path):
    """model_vqa's resume: damaged answers go (their questions are answered again), whole ones stay byte for byte,
    and no second run can slip in while the file is replaced."""
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"q": 0}\n{"q": 1, "te\n{"q": 2, "t": "\xd9\x85"}\n\xff\n\n{"q": 4}\n')
    records, bad = jsonl.scan_jsonl(str(path), required=("q",))
    assert [(r.data["q"], r.line) for r in records] == [(0, 1), (2, 3), (4, 6)]
    assert [n for n, _ in bad] == [2, 4] and "not UTF-8" in bad[1][1]
    with jsonl.JsonlAppender(str(path)) as out:
        out.drop_lines({n for n, _ in bad})
        assert path.read_bytes() == b'{"q": 0}\n{"q": 2, "t": "\xd9\x85"}\n\n{"q": 4}\n'
        with pytest.raises(jsonl.JsonlError, match="another process is writing this file"):
            jsonl.JsonlAppender(str(path))
        out.write({"q": 5})
    assert [r.data["q"] for r in jsonl.read_jsonl(str(path))] == [0, 2, 4, 5]
    assert os.listdir(tmp_path) == ["answers.jsonl"]  # no temp file left behind
    with pytest.raises(jsonl.JsonlError, match="no such file"):
        jsonl.scan_jsonl(str(tmp_path / "missing.jsonl"))


def test_a_second_appender_that_opened_the_file_before_it_was_rewritten_is_refused(tmp_path, monkeypatch):
    """The window drop_lines leaves: a second run opens the old file, the first replaces it and lets go of the old
    file's lock, and the second locks the old file, now at no path: everything it wrote was lost."""
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"q": 0}\nBAD\n')
    first = jsonl.JsonlAppender(str(path))
    real_lock = jsonl._lock_exclusively
    raced = []

    def lock_after_the_rewrite(fd: int) -> None:
        if not raced:  # the second appender's first lock: the first rewrites the file just before it
            raced.append(fd)
            first.drop_lines({2})
        real_lock(fd)

    monkeypatch.setattr(jsonl, "_lock_exclusively", lock_after_the_rewrite)
    with pytest.raises(jsonl.JsonlError, match="another process is writing this file"):
        jsonl.JsonlAppender(str(path))
    assert raced
    first.write({"q": 1})
    first.close()
    assert path.read_bytes() == b'{"q": 0}\n{"q": 1}\n'
    with jsonl.JsonlAppender(str(path)) as again:  # once the first is done, a later run appends as usual
        again.write({"q": 2})
    assert [r.data["q"] for r in jsonl.read_jsonl(str(path))] == [0, 1, 2]


def test_dropping_lines_through_a_symlink_rewrites_the_file_it_names_and_keeps_its_mode(tmp_path):
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_bytes(b'{"q": 0}\nBAD\n')
    real.chmod(0o664)  # group-writable, as a shared results folder has it
    link.symlink_to(real)
    with jsonl.JsonlAppender(str(link)) as out:
        out.drop_lines({2})
        out.write({"q": 1})
    assert link.is_symlink() and real.read_bytes() == b'{"q": 0}\n{"q": 1}\n'
    assert real.stat().st_mode & 0o777 == 0o664  # the rewritten file keeps its mode
    assert sorted(os.listdir(tmp_path)) == ["link.jsonl", "real.jsonl"]


def test_damage_before_the_end_of_a_log_is_named_and_nothing_after_it_is_cut(tmp_path):
    """Only a kill mid-write is repaired; a damaged line with finished records after it (an edit, a disk fault)
    used to cut them all off the file at the next resume."""
    path = tmp_path / "progress.jsonl"
    whole = b'{"index": 0}\n{"index": 1, "text": "\xff"}\n{"index": 2}\n{"index": 3, "sam'
    path.write_bytes(whole)
    for repair in (False, True):
        with pytest.raises(jsonl.JsonlError, match=r"progress\.jsonl:2: a damaged line before the end of the log"):
            jsonl.read_log(str(path), repair=repair)
    assert path.read_bytes() == whole
    path.write_bytes(b'{"index": 0}\n{"index": 1,\n{"index": 2}\n')  # not JSON, also before the end
    with pytest.raises(jsonl.JsonlError, match=r":2: a damaged line"):
        jsonl.read_log(str(path), repair=True)


def test_strict_reading_names_file_and_line(tmp_path):
    path = tmp_path / "review.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n', encoding="utf-8")
    with pytest.raises(jsonl.JsonlError, match=r"review\.jsonl:3: not valid JSON"):
        jsonl.read_jsonl(str(path))
    # A line in another encoding is named like any bad line (it was a UnicodeDecodeError from deep inside).
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 3}\n')
    why = r"review\.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 11\)"
    with pytest.raises(jsonl.JsonlError, match=why):
        jsonl.read_jsonl(str(path))
    assert [r.data["a"] for r in jsonl.read_jsonl(str(path), skip_bad=True)] == [1, 3]


def test_a_json_sample_file_is_read_whole_or_refused_naming_the_file_and_the_fault(tmp_path):
    good = tmp_path / "set.json"
    good.write_text('[{"id": 1}, {"id": "二"}]', encoding="utf-8")
    assert jsonl.read_json_samples(str(good)) == [{"id": 1}, {"id": "二"}]
    cases = {"missing.json": (None, "no such file"),
             "latin1.json": (b'[{"id": "caf\xe9"}]', "not UTF-8 text (invalid continuation byte at byte 12)"),
             "broken.json": (b'[{"id": 1},\n {"id": 2,}]', "not valid JSON (Expecting property name enclosed in "
                                                           "double quotes at line 2 column 11)"),
             "object.json": (b'{"id": 1}', "expected a JSON array of samples (objects)"),
             "strings.json": (b'["a", "b"]', "expected a JSON array of samples (objects)")}
    for name, (content, why) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            jsonl.read_json_samples(str(path), "--translated")
        assert str(info.value) == f"--translated {path}: {why}"


def test_the_old_import_path_is_the_same_module_content():
    for name in old_path.__all__:
        assert getattr(old_path, name) is getattr(jsonl, name)


def test_a_staging_folder_left_by_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    """A killed export used to leave its hidden staging folder (gigabytes for a 13B) for good."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom palo import jsonl\nwith jsonl.staged_folder(sys.argv[1]) as staging:\n"
            "    open(staging + '/part', 'w').write('x')\n    print(staging, flush=True)\n    time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    abandoned = writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    assert os.path.isdir(abandoned)
    live = tmp_path / f".out.partial-{__import__('socket').gethostname()}-{os.getpid()}-live"
    live.mkdir()  # a writer that still runs (this process): left alone
    with jsonl.staged_folder(str(tmp_path / "out")) as staging:
        (tmp_path / os.path.basename(staging) / "done").write_text("y")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name]) and os.listdir(tmp_path / "out") == ["done"]


def test_unique_records_keeps_each_key_once_compared_as_text_and_names_both_lines(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "t": "a"}\n{"question_id": 2, "t": 5}\n{"question_id": "1", "t": "b"}\n'
                    '{"question_id": 3, "t": "c"}\n', encoding="utf-8")

    def problem(record):
        return None if isinstance(record.data["t"], str) else "'t' must be text"

    with pytest.raises(jsonl.JsonlError, match=r"q\.jsonl:3: duplicate question_id '1' \(first at .*q\.jsonl:1\)"):
        jsonl.unique_records(jsonl.iter_jsonl(str(path)), "question_id")
    with pytest.raises(jsonl.JsonlError, match=r"q\.jsonl:2: 't' must be text"):
        jsonl.unique_records(jsonl.iter_jsonl(str(path)), "question_id", check=problem)
    kept = jsonl.unique_records(jsonl.iter_jsonl(str(path)), "question_id", skip_bad=True, check=problem)
    assert [(r.data["question_id"], r.line) for r in kept] == [(1, 1), (3, 4)]
    err = capsys.readouterr().err
    assert "q.jsonl:2: 't' must be text" in err and "q.jsonl:3: duplicate question_id '1'" in err


def test_repair_tail_reads_the_end_of_a_log_not_all_of_it(tmp_path):
    """A resumed run checks its log's last line: it read the whole file (seconds and as much memory for a log of
    gigabytes). The last line is found reading backwards, and equals what the whole file says it is."""
    import io

    class Counted(io.BytesIO):
        read_bytes = 0

        def read(self, size=-1):
            data = super().read(size)
            Counted.read_bytes += len(data)
            return data

    cases = [b"a\n", b"a", b"a\nb", b"\n", b"\n\n", b"xx\n\nyy", b"x" * 200_000 + b"\n" + b"y" * 70_000, b"z" * 70_000]
    for data in cases:
        for block in (1, 3, 1 << 16):
            whole = data.rfind(b"\n", 0, len(data) - 1) + 1 if data.endswith(b"\n") else data.rfind(b"\n") + 1
            assert jsonl._last_line(io.BytesIO(data), block) == (whole, data[whole:]), (data[:8], block)
    Counted.read_bytes = 0
    assert jsonl._last_line(Counted(b'{"a": 1}\n' * 1_000_000 + b'{"torn')) == (9_000_000, b'{"torn')
    assert Counted.read_bytes <= 1 << 16  # one block of a 9 MB log
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n' * 100_000 + b'{"torn')
    assert jsonl.repair_tail(str(log)) == 6 and log.read_bytes() == b'{"a": 1}\n' * 100_000
    log.write_bytes(b'{"a": 1}\n{"b": 2}')  # whole, only its newline missing: kept and completed
    assert jsonl.repair_tail(str(log)) == 0 and log.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


_SHORT_WRITES = r'''
import json, resource, signal, sys
from palo.jsonl import JsonlAppender
path, limit = sys.argv[1], int(sys.argv[2])
with JsonlAppender(path) as out:
    for i in range(40):
        out.write({"question_id": i, "text": "answer %d " % i + "x" * 380})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write is cut short, then fails (EFBIG): a full disk
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
outcome = []
with JsonlAppender(path) as out:
    try:
        out.drop_lines({2})  # a resumed run removing a damaged line: the rewrite of ~16 KB reaches the limit
        outcome.append("dropped")
    except OSError as exc:
        outcome.append("drop failed: " + exc.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
with open(path, "rb") as f:
    size = len(f.read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 600, hard))
with JsonlAppender(path) as out:
    try:
        for i in range(40, 45):  # the second record crosses the limit part-way
            out.write({"question_id": i, "text": "answer %d " % i + "x" * 380})
    except OSError as exc:
        outcome.append("append failed: " + exc.strerror)
print(json.dumps(outcome))
'''


def test_a_write_cut_short_by_a_full_disk_fails_and_leaves_only_whole_records(tmp_path):
    """A write that wrote part of its bytes without raising was taken as done: a resumed run removing one damaged
    line replaced a 40-answer file by its first half, and the last record of a run was cut, exit 0."""
    path = tmp_path / "answers.jsonl"
    run = subprocess.run([sys.executable, "-c", _SHORT_WRITES, str(path), "10000"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    assert outcome[0].startswith("drop failed") and outcome[1].startswith("append failed"), outcome
    data = path.read_bytes()
    assert data.endswith(b"\n")
    ids = [json.loads(line)["question_id"] for line in data.splitlines()]
    assert ids == list(range(41))  # all 40 kept (the failed rewrite changed nothing), then the one whole append
