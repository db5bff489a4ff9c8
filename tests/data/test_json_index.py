"""Tests for palo.data.json_index: the offsets agree with ``json.load`` element by element on tricky files, at chunk
sizes that split every token, with one and several scan threads; the cache is reused, invalidated and written
atomically; the index pickles into DataLoader workers; malformed files fail with the right byte offset."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from palo.data import json_index
from palo.data.json_index import JsonArrayIndex, cache_paths, scan_json_array

# One phrase per PALO script, plus emoji (a surrogate pair as \uXXXX, a ZWJ sequence, a flag).
UNICODE = [
    "A red bus on a bridge.",
    "桥上有一辆红色的公共汽车。",
    "Un bus rouge sur un pont, à côté d'une église.",
    "¿Un autobús rojo en un puente? ¡Sí, señor!",
    "Красный автобус на мосту.",
    "橋の上に赤いバスがあります。",
    "حافلة حمراء على جسر.",
    "पुल पर एक लाल बस है।",
    "সেতুর উপরে একটি লাল বাস।",
    "پل پر ایک سرخ بس ہے۔",
    "emoji 😀 👩‍👩‍👧 🇯🇵 done",
]
# Strings that look like JSON structure or stress the escape handling.
TRICKY = [
    '{"id": 1, "conversations": [{"from": "human"}]}',
    "]]]}}}",
    "[[[{{{",
    'say "hi", then {"nested": ["json", "in", "a", "string"]}',
    "one backslash \\",
    "two backslashes \\\\",
    'backslash then quote \\"',
    '\\\\"',
    "\\",
    "",
    ",,,:::",
    "tab\tnewline\ncarriage\rnull\x00bell\x07",
    "\u2028\u2029 line separators",
    "slash / and escaped \\/",
]


def _samples(n: int = 28) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        text = UNICODE[i % len(UNICODE)] + " " + TRICKY[i % len(TRICKY)]
        sample = {
            "id": f"{i:012d}" if i % 3 else i,
            "image": f"coco/train2017/{i:012d}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\n" + text},
                {"from": "gpt", "value": TRICKY[(i * 7) % len(TRICKY)] + UNICODE[(i * 5) % len(UNICODE)]},
            ],
            "meta": {"score": float(rng.random()), "tags": [[], {}, [1, [2, {"k": "]"}]]], "ok": i % 2 == 0, "x": None},
        }
        if i % 4 == 0:
            del sample["image"]
        if i % 5 == 0:
            sample["corrupt"] = True
        out.append(sample)
    return out


def _weird_whitespace(samples: list[dict]) -> str:
    # JSON allows space, tab, CR and LF anywhere between tokens.
    parts = [json.dumps(s, ensure_ascii=False) for s in samples]
    return " \r\n\t[\r\n\t  " + "\t ,\r\n\n  ".join(parts) + "\n\t\r ]\r\n  \n"


FORMATS = {
    "minified": lambda s: json.dumps(s, separators=(",", ":"), ensure_ascii=False),
    "default_ascii": lambda s: json.dumps(s),  # every non-ASCII character as \uXXXX, emoji as surrogate pairs
    "pretty": lambda s: json.dumps(s, indent=2, ensure_ascii=False),
    "pretty_ascii_tabs": lambda s: json.dumps(s, indent="\t"),
    "weird_whitespace": _weird_whitespace,
}


def _write(tmp_path, text: str | bytes, name: str = "train.json") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _assert_matches(path: str, index: JsonArrayIndex) -> None:
    with open(path, encoding="utf-8") as f:
        expected = json.load(f)
    data = open(path, "rb").read()
    assert len(index) == len(expected)
    for i, element in enumerate(expected):
        assert index.read(i) == element
        raw = index.read_raw(i)
        # The span is the element exactly: no surrounding whitespace or comma.
        assert raw == data[index.offsets[i] : index.offsets[i] + index.lengths[i]]
        assert raw == raw.strip(b" \t\r\n") and not raw.startswith(b",") and not raw.endswith(b",")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
# 7 bytes splits every key, escape and multi-byte character somewhere; 1 byte is covered by the smaller files below.
@pytest.mark.parametrize("chunk_size", [7, 64, json_index.DEFAULT_CHUNK_SIZE])
def test_agrees_with_json_load(tmp_path, fmt, chunk_size):
    path = _write(tmp_path, FORMATS[fmt](_samples()))
    for workers in (1, 3):
        index = JsonArrayIndex.build(path, chunk_size=chunk_size, workers=workers, cache=False)
        assert index.offsets.dtype == np.int64 and index.lengths.dtype == np.int64
        _assert_matches(path, index)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        " \n[ \n\t]\n ",
        '[{"only": "one"}]',
        '\n[\n  {"only": ["one", {"x": "}"}]}\n]\n',
        '[{"a": 1},[1, [2]],{}]',
        # Elements that are not objects are legal JSON; they take the slow path but must agree all the same.
        '[1, "a,]}\\"", null, true, {"x": 1}, -2.5e3, [2], "\\u00e9"]',
        '["only a string"]',
        "[ 1 , 2 ,3]",
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1 << 20])
def test_small_and_unusual_arrays(tmp_path, text, chunk_size):
    path = _write(tmp_path, text)
    _assert_matches(path, JsonArrayIndex.build(path, chunk_size=chunk_size, workers=2, cache=False))


def test_many_elements_threaded(tmp_path):
    """Thousands of chunks through the thread pool, each boundary at a different place in the tokens."""
    samples = _samples(300)
    path = _write(tmp_path, json.dumps(samples, ensure_ascii=False))
    single = scan_json_array(path, chunk_size=97, workers=1)
    threaded = scan_json_array(path, chunk_size=97, workers=4)
    np.testing.assert_array_equal(single[0], threaded[0])
    np.testing.assert_array_equal(single[1], threaded[1])
    index = JsonArrayIndex(path, *threaded)
    assert [index.read(i) for i in range(len(index))] == samples


def test_index_errors_and_negative_indices(tmp_path):
    path = _write(tmp_path, json.dumps(_samples(5)))
    index = JsonArrayIndex.build(path, cache=False)
    assert index.read(-1) == index.read(4)
    with pytest.raises(IndexError):
        index.read(5)
    with pytest.raises(IndexError):
        index.read_raw(-6)


def test_element_contents_are_validated_on_read(tmp_path):
    # The scan checks structure only; a broken element is reported when it is decoded, and the others still load.
    path = _write(tmp_path, '[{"a": 1}, {"b": tru}, {"c": [{1]}}]')
    index = JsonArrayIndex.build(path, cache=False)
    assert len(index) == 3 and index.read(0) == {"a": 1}
    for i, byte in ((1, 17), (2, 31)):  # named by file, sample and byte (a bare JSONDecodeError named nothing)
        with pytest.raises(ValueError, match=rf"train\.json: sample {i} \(byte {byte}\) is not valid JSON"):
            index.read(i)


# ------------------------------------------------------------------------------------------------------ malformed
MALFORMED = [
    ("", 0, "empty"),
    ("   \n ", 5, "empty"),
    ('{"a": 1}', 0, "expected '['"),
    ('  x[{"a": 1}]', 2, "expected '['"),
    ('\ufeff[{"a": 1}]', 0, "byte order mark"),
    ('[{"a": 1}', 9, "unbalanced"),
    ('[{"a": [1, 2]}, {"b": 2}', 24, "unbalanced"),
    ('[{"a": "b]', 10, "unterminated string"),
    ('[{"a": 1}]]', 10, "after the closing"),
    ('[{"a": 1}] x', 11, "after the closing"),
    ('[{"a": 1}]\n{"b": 2}', 11, "after the closing"),
    ('[{"a": 1},]', 9, "trailing comma"),
    ('[{"a": 1},\n  ]', 9, "trailing comma"),
    ("[,]", 1, "empty element"),
    ('[,{"a": 1}]', 1, "empty element"),
    ('[{"a": 1},,{"b": 2}]', 10, "empty element"),
    ('[{"a": 1} {"b": 2}]', 10, "expected ','"),
    ('[{"a": 1}{"b": 2}]', 9, "expected ','"),
    ('[{"a": 1} x, {"b": 2}]', 10, "expected ',' or ']'"),
    ('[x {"a": 1}]', 1, "invalid element"),
    ('[{"a": 1]]', 8, "closed by ']'"),
    ('[{"a": 1}}', 9, "closed by '}'"),
    ('[{"a": 1}, \\"b"]', 11, "backslash outside a string"),
]


@pytest.mark.parametrize(("text", "offset", "message"), MALFORMED, ids=[m[0] or "<empty>" for m in MALFORMED])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1 << 20])
def test_malformed_raises_with_offset(tmp_path, text, offset, message, chunk_size):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=f"at byte {offset}:.*{re.escape(message)}"):
        JsonArrayIndex.build(path, chunk_size=chunk_size, workers=2, cache=False)
    assert not os.path.exists(path + ".idx.npz")


# ---------------------------------------------------------------------------------------------------------- cache
def test_cache_reuse_and_invalidation(tmp_path):
    path = _write(tmp_path, json.dumps(_samples(10)))
    first = JsonArrayIndex.build(path, chunk_size=64)
    assert not first.from_cache
    assert os.path.exists(path + ".idx.npz")
    second = JsonArrayIndex.build(path)
    assert second.from_cache and len(second) == 10
    np.testing.assert_array_equal(second.offsets, first.offsets)
    np.testing.assert_array_equal(second.lengths, first.lengths)
    _assert_matches(path, second)

    # A different size: rebuilt, and the cache is replaced.
    _write(tmp_path, json.dumps(_samples(12), indent=1))
    third = JsonArrayIndex.build(path)
    assert not third.from_cache and len(third) == 12
    _assert_matches(path, third)
    assert JsonArrayIndex.build(path).from_cache

    # Same size, new mtime (the bytes changed in place): rebuilt too.
    data = open(path, "rb").read().replace(b'"gpt"', b'"GPT"')
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fourth = JsonArrayIndex.build(path)
    assert not fourth.from_cache and fourth.read(0)["conversations"][1]["from"] == "GPT"

    # Same size and the time kept (cp -p, rsync -t of a reshuffled set): the content decides, rebuilt.
    samples = _samples(12)
    _write(tmp_path, json.dumps(samples[::-1], indent=1))
    JsonArrayIndex.build(path)
    kept = os.stat(path)
    _write(tmp_path, json.dumps(samples[6:] + samples[:6], indent=1))
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert os.stat(path).st_size == kept.st_size
    fifth = JsonArrayIndex.build(path)
    assert not fifth.from_cache and fifth.read(0) == samples[6]

    # Written atomically: no temp files are left next to the data.
    assert sorted(os.listdir(tmp_path)) == ["train.json", "train.json.idx.npz"]


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = _write(tmp_path, json.dumps(_samples(3)))
    JsonArrayIndex.build(path)
    with open(path + ".idx.npz", "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    index = JsonArrayIndex.build(path)
    assert not index.from_cache and len(index) == 3
    assert JsonArrayIndex.build(path).from_cache


def test_cache_disabled_writes_nothing(tmp_path):
    path = _write(tmp_path, json.dumps(_samples(3)))
    JsonArrayIndex.build(path, cache=False)
    assert os.listdir(tmp_path) == ["train.json"]


def test_read_only_folder_uses_user_cache_dir(tmp_path, monkeypatch):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    path = _write(data_dir, json.dumps(_samples(4)))
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - mirrors tempfile.mkstemp
        # Tests run as root here, where chmod cannot make a folder read-only; fail the way a read-only FS does.
        if os.path.abspath(dir) == str(data_dir):
            raise OSError(30, "Read-only file system", dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)  # the cache is written through palo.jsonl.mkstemp_shared
    index = JsonArrayIndex.build(path, cache_dir=cache_dir)
    assert not index.from_cache
    assert os.listdir(data_dir) == ["train.json"]
    user_cache = cache_paths(path, cache_dir)[1]
    assert os.path.dirname(user_cache) == str(cache_dir) and os.path.exists(user_cache)
    again = JsonArrayIndex.build(path, cache_dir=cache_dir)
    assert again.from_cache
    _assert_matches(path, again)


def test_file_changing_during_scan_is_detected(tmp_path, monkeypatch):
    path = _write(tmp_path, json.dumps(_samples(3)))
    real_scan = json_index.scan_json_array

    def scan_then_touch(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        with open(path, "ab") as f:
            f.write(b"\n")
        return result

    monkeypatch.setattr(json_index, "scan_json_array", scan_then_touch)
    with pytest.raises(RuntimeError, match="changed while it was being indexed"):
        JsonArrayIndex.build(path)
    assert not os.path.exists(path + ".idx.npz")


def _changed(how: str) -> str:
    """The message of a data file that changed after it was indexed: it names no command (not only training reads
    files through the index)."""
    return (rf"train\.json: the data file changed since it was indexed at [^(]*\({how} at [^)]*\); the command "
            r"reading it needs it unchanged until it ends: do not edit it while one runs$")


def test_file_changed_after_indexing_is_named_as_such(tmp_path):
    """Edited during a run, the file was read at the old offsets: every later sample failed as "not valid JSON",
    naming the wrong cause, or, where the old offsets still held whole elements (two samples of one size swapped),
    other samples were read silently."""
    samples = _samples(6)
    path = _write(tmp_path, json.dumps(samples, indent=1))
    index = JsonArrayIndex.build(path)
    assert index.read(1) == samples[1]
    samples[0]["conversations"][1]["value"] += " Fixed while training."
    _write(tmp_path, json.dumps(samples, indent=1))  # in place (the same inode), longer
    with pytest.raises(json_index.DataFileChangedError, match=_changed("modified")) as raised:
        index.read(2)  # the bytes at the old offsets are no longer one element
    assert "training" not in str(raised.value)  # palo-data merge, validate ... read through the index too

    # Edited in place without moving an element (same size, a later time): reads succeed, check_unchanged says so.
    same_size = [{"id": f"sample-{i}"} for i in range(4)]
    path = _write(tmp_path, json.dumps(same_size))
    index = JsonArrayIndex.build(path)
    _write(tmp_path, json.dumps(same_size[::-1]))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a clock tick apart, whatever the FS
    assert index.read(0) == {"id": "sample-3"}
    with pytest.raises(json_index.DataFileChangedError, match=_changed("modified")):
        index.check_unchanged()


def _replace(tmp_path, samples) -> None:
    """Write ``train.json`` anew and move it into place atomically, as a rerun of palo-data translate does."""
    _write(tmp_path, json.dumps(samples), name="rewritten.json")
    os.replace(os.path.join(tmp_path, "rewritten.json"), os.path.join(tmp_path, "train.json"))


def test_file_replaced_atomically_after_indexing_is_read_as_indexed(tmp_path):
    """The file was opened on first read, not when it was indexed: replaced atomically in between (a rerun of
    palo-data translate while palo-data merge ran), every read raised DataFileChangedError, a traceback from
    palo-data merge. The index now holds the inode it scanned, in this process and in forked DataLoader workers."""
    samples = [{"id": f"sample-{i}"} for i in range(4)]
    path = _write(tmp_path, json.dumps(samples))
    index = JsonArrayIndex.build(path)
    _replace(tmp_path, samples)  # the same content, a new inode: what the audit's rerun did
    _replace(tmp_path, samples[::-1])  # and content of the same size, which the old offsets would read silently
    assert [index.read(i) for i in range(4)] == samples
    index.check_unchanged()
    loader = torch.utils.data.DataLoader(_IndexDataset(index), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", collate_fn=lambda x: x)
    seen = sorted(loader, key=lambda item: item["i"])
    assert [json.loads(item["json"]) for item in seen] == samples and all(item["own_handle"] for item in seen)


def test_a_pickled_index_reaches_the_indexed_file_after_it_was_replaced(tmp_path):
    """A spawned worker gets the index pickled, without the descriptor: it finds the file as indexed through the
    indexing process's descriptor (Linux /proc) while the path names a new file; with nothing left to reach, the
    replacement is named."""
    samples = [{"id": f"sample-{i}"} for i in range(4)]
    path = _write(tmp_path, json.dumps(samples))
    index = JsonArrayIndex.build(path)
    _replace(tmp_path, samples[::-1])
    child = subprocess.run([sys.executable, "-c", "import pickle, sys; index = pickle.load(sys.stdin.buffer); "
                            "print(index.read(0)['id'], index.read(3)['id'])"],
                           input=pickle.dumps(index), capture_output=True, timeout=60)
    if os.path.isdir(f"/proc/{os.getpid()}/fd"):
        assert child.returncode == 0 and child.stdout.split() == [b"sample-0", b"sample-3"], child.stderr
    else:  # no /proc: the replacement is named, as before
        assert b"replaced by another file written" in child.stderr

    clone = pickle.loads(pickle.dumps(index))
    index.close()  # nothing holds the indexed file any more
    with pytest.raises(json_index.DataFileChangedError, match=_changed("replaced by another file written")):
        clone.read(0)


# ------------------------------------------------------------------------------------------- pickling and workers
class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, index: JsonArrayIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        sample = self.index.read(i)
        # The worker must own the descriptor it reads (the parent's inherited one, checked, or one it opened).
        return {"i": i, "json": json.dumps(sample), "pid": os.getpid(), "own_handle": self.index._pid == os.getpid()}


def test_pickle_holds_only_path_and_arrays(tmp_path):
    path = _write(tmp_path, json.dumps(_samples(6)))
    index = JsonArrayIndex.build(path, cache=False)
    index.read(0)  # opens the handle; pickling must still leave it out
    state = index.__getstate__()
    assert set(state) == {"path", "offsets", "lengths", "from_cache", "indexed", "holder"}
    assert state["holder"] == (os.getpid(), index._fd)  # a number, not the open file
    clone = pickle.loads(pickle.dumps(index))
    assert clone._fd is None
    assert [clone.read(i) for i in range(6)] == [index.read(i) for i in range(6)]


def test_dataloader_workers_read_through_their_own_handles(tmp_path):
    samples = _samples(16)
    path = _write(tmp_path, json.dumps(samples, ensure_ascii=False))
    index = JsonArrayIndex.build(path)
    index.read(3)  # the parent holds an open handle when the workers fork
    loader = torch.utils.data.DataLoader(
        _IndexDataset(index),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=lambda x: x,
    )
    seen = sorted((item for item in loader), key=lambda item: item["i"])
    assert [json.loads(item["json"]) for item in seen] == samples
    assert all(item["own_handle"] for item in seen)
    assert len({item["pid"] for item in seen}) == 2 and os.getpid() not in {item["pid"] for item in seen}
    assert index.read(3) == samples[3]  # the parent's handle still works after the workers closed theirs


def test_a_sample_nested_too_deeply_is_a_value_error_naming_it(tmp_path):
    """A value nested 100,000 deep escaped as RecursionError: validate, inspect, stats and merge printed a
    traceback instead of naming the sample."""
    path = tmp_path / "deep.json"
    path.write_bytes(b'[{"id": 0, "conversations": []},\n{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]")
    index = JsonArrayIndex.build(str(path), cache=False)
    assert index.read(0)["id"] == 0
    start = path.read_bytes().index(b'{"x"')
    with pytest.raises(ValueError, match=re.escape(f"sample 1 (byte {start}) is not valid JSON: nested too deeply")):
        index.read(1)


def test_bytes_that_are_not_utf8_are_placed_at_the_bad_byte(tmp_path):
    """The offset of a UTF-8 error was the sample's start: UnicodeDecodeError has .start, not .pos."""
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"id": 0, "conversations": [], "note": "caf\xe9"}]')
    bad = path.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=re.escape(f"sample 0 (byte {bad}) is not valid JSON: not UTF-8 text")):
        JsonArrayIndex.build(str(path), cache=False).read(0)
