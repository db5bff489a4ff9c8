"""Benchmark: indexing a PALO training JSON with :class:`palo.data.json_index.JsonArrayIndex` against ``json.load``.

Generates (or takes) a file of LLaVA-style samples in the ten PALO languages (docs/formats.md §5.1), then measures,
each in a fresh child process so that the peak RSS (``resource.getrusage``) belongs to one method only:

* ``index``: the scan with one thread and with the default thread count (no cache), random ``read(i)`` calls, and,
  for a generated file, the scan plus cache write and a cached reload (a file given with ``--file`` gets no cache
  file from the benchmark);
* ``json.load``: the original loader, the whole array as Python objects.

Times are the fastest of ``--repeats`` runs. Both read the same file, hot in the page cache (it was just written,
or is read once first), so the numbers compare parsing and memory, not the disk. RSS is reported as the peak and as
the growth over the child's RSS before the work. The index module is loaded by file path, without ``import palo``
(which brings in torch). The parent checks that both found the same number of elements.

Examples::

    python scripts/bench/json_index.py                    # 200 MB generated in a temp dir
    python scripts/bench/json_index.py --size-mb 1000 --indent 2
    python scripts/bench/json_index.py --file /data/palo_multilingual_dataset.json --skip-json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time


def generate(path: str, size_mb: float, indent: int | None, ascii_only: bool, seed: int = 0) -> int:
    """Write a JSON array of about ``size_mb`` MB of LLaVA-style multilingual samples; returns the sample count."""
    from palo.testing.corpus import SAMPLES  # here, not at the top: children must not pay for `import palo`

    rng = random.Random(seed)
    languages = sorted(SAMPLES)
    target = int(size_mb * 1e6)
    written, n = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" if indent is not None else "[")
        while written < target:
            sentences = SAMPLES[rng.choice(languages)]
            turns = []
            for t in range(2 * rng.randint(1, 4)):
                # Answers are several sentences, questions one. Quotes, braces and newlines exercise the scanner.
                words = rng.sample(sentences, k=min(len(sentences), 1 + (t % 2) * rng.randint(2, 5)))
                value = " ".join(words)
                if t % 2 == 1 and rng.random() < 0.3:
                    value += '\n\n"' + rng.choice(sentences) + '" {see: [1, 2]}'
                turns.append({"from": "gpt" if t % 2 else "human", "value": value})
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            image = f"coco/train2017/{rng.randrange(10**12):012d}.jpg"
            sample = {"id": f"{n:012d}", "image": image, "conversations": turns}
            if rng.random() < 0.1:
                del sample["image"]  # text-only samples exist in the real mix
            text = json.dumps(sample, ensure_ascii=ascii_only, indent=indent)
            if n:
                f.write(",\n" if indent is not None else ",")
            f.write(text)
            written += len(text.encode("utf-8")) + 1
            n += 1
        f.write("\n]\n" if indent is not None else "]")
    return n


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _load_index_module():
    """palo/data/json_index.py loaded by path: ``import palo`` would pull in torch and transformers (~330 MB RSS),
    which would swamp the index's own memory in the comparison."""
    import importlib.util

    file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "palo", "data", "json_index.py")
    spec = importlib.util.spec_from_file_location("json_index_under_test", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _best_of(repeats: int, fn):
    """(fastest seconds, last result) over ``repeats`` calls: the minimum is the least disturbed by other load."""
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None  # drop the previous result first, or the peak RSS would hold two of them
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def child_index(path: str, chunk_size: int, workers: int | None, reads: int, with_cache: bool, repeats: int) -> dict:
    JsonArrayIndex = _load_index_module().JsonArrayIndex

    start_rss = _peak_rss_mb()
    scan_s, index = _best_of(
        repeats, lambda: JsonArrayIndex.build(path, chunk_size=chunk_size, workers=workers, cache=False)
    )
    peak = _peak_rss_mb()
    scan1_s, single = _best_of(
        repeats, lambda: JsonArrayIndex.build(path, chunk_size=chunk_size, workers=1, cache=False)
    )
    assert (single.offsets == index.offsets).all() and (single.lengths == index.lengths).all()
    build_and_save_s = load_s = float("nan")
    if with_cache:
        # Only for the generated file: the cache lands next to it, inside the benchmark's temp dir.
        t0 = time.perf_counter()
        JsonArrayIndex.build(path, chunk_size=chunk_size, workers=workers)
        build_and_save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = JsonArrayIndex.build(path)
        load_s = time.perf_counter() - t0
        assert cached.from_cache and (cached.offsets == index.offsets).all()
    rng = random.Random(0)
    ids = [rng.randrange(len(index)) for _ in range(reads)]
    t0 = time.perf_counter()
    for i in ids:
        index.read(i)
    read_s = time.perf_counter() - t0
    return {
        "n": len(index),
        "seconds": scan_s,
        "seconds_1_thread": scan1_s,
        "peak_rss_mb": peak,
        "start_rss_mb": start_rss,
        "build_and_save_s": build_and_save_s,
        "cached_load_s": load_s,
        "reads_per_s": reads / read_s if read_s else float("inf"),
        "cpus": os.cpu_count(),
    }


def child_json(path: str, repeats: int) -> dict:
    start_rss = _peak_rss_mb()

    def load():
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    seconds, data = _best_of(repeats, load)
    return {"n": len(data), "seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "start_rss_mb": start_rss}


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", help="index this file instead of generating one")
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the generated file")
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the generated file")
    parser.add_argument("--ascii", action="store_true", help="generate with \\uXXXX escapes instead of UTF-8")
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=None, help="scan threads (default: the index's own)")
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs of each")
    parser.add_argument("--reads", type=int, default=20000, help="random read(i) calls to time")
    parser.add_argument("--skip-json", action="store_true", help="do not run json.load (e.g. for a 13 GB file)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        if spec["kind"] == "generate":
            t0 = time.perf_counter()
            n = generate(spec["path"], spec["size_mb"], spec["indent"], spec["ascii"])
            result = {"n": n, "seconds": time.perf_counter() - t0}
        elif spec["kind"] == "index":
            result = child_index(
                spec["path"], spec["chunk_size"], spec["workers"], spec["reads"], spec["cache"], spec["repeats"]
            )
        else:
            result = child_json(spec["path"], spec["repeats"])
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is None:
            path = os.path.join(tmp, "train.json")
            # In a child too: Linux keeps a process's peak RSS across fork and exec, so a parent that imported
            # palo (torch) would hand its peak to every later child.
            gen = run_child({"kind": "generate", "path": path, "size_mb": args.size_mb, "indent": args.indent,
                             "ascii": args.ascii})
            print(f"generated {gen['n']} samples in {gen['seconds']:.1f} s")
        else:
            with open(path, "rb") as f:  # warm the page cache so both methods read from memory
                while f.read(64 << 20):
                    pass
        mb = os.path.getsize(path) / 1e6
        print(f"file: {path} ({mb:.1f} MB)")
        idx = run_child(
            {"kind": "index", "path": path, "chunk_size": int(args.chunk_mb * 2**20), "workers": args.workers,
             "reads": args.reads, "cache": args.file is None, "repeats": args.repeats}
        )
        print(
            f"JsonArrayIndex: {idx['n']} elements, scan {idx['seconds']:.2f} s ({mb / idx['seconds']:.0f} MB/s; "
            f"1 thread {idx['seconds_1_thread']:.2f} s, {mb / idx['seconds_1_thread']:.0f} MB/s; {idx['cpus']} CPUs), "
            f"peak RSS {idx['peak_rss_mb']:.0f} MB (+{idx['peak_rss_mb'] - idx['start_rss_mb']:.0f} MB over "
            f"{idx['start_rss_mb']:.0f} MB)"
        )
        print(
            f"  scan + cache write {idx['build_and_save_s']:.2f} s, cached load {idx['cached_load_s'] * 1e3:.1f} ms, "
            f"random read(i) {idx['reads_per_s']:.0f}/s"
        )
        if args.skip_json:
            return
        ref = run_child({"kind": "json", "path": path, "repeats": args.repeats})
        print(
            f"json.load:      {ref['n']} elements, {ref['seconds']:.2f} s ({mb / ref['seconds']:.0f} MB/s), "
            f"peak RSS {ref['peak_rss_mb']:.0f} MB (+{ref['peak_rss_mb'] - ref['start_rss_mb']:.0f} MB over "
            f"{ref['start_rss_mb']:.0f} MB)"
        )
        if ref["n"] != idx["n"]:
            raise SystemExit(f"element counts differ: index {idx['n']} vs json.load {ref['n']}")
        grow_idx = max(idx["peak_rss_mb"] - idx["start_rss_mb"], 1.0)
        grow_ref = ref["peak_rss_mb"] - ref["start_rss_mb"]
        print(
            f"ratio json.load / index: time {ref['seconds'] / idx['seconds']:.1f}x "
            f"(1 thread {ref['seconds'] / idx['seconds_1_thread']:.1f}x), "
            f"peak RSS {ref['peak_rss_mb'] / idx['peak_rss_mb']:.1f}x, RSS growth {grow_ref / grow_idx:.0f}x"
        )


if __name__ == "__main__":
    main()
