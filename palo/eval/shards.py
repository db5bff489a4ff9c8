"""Sharded answering: one process per GPU, each answering a deterministic slice of the questions, merged in order.

The split is LLaVA's: ``--num-chunks N --chunk-idx K`` takes the K-th of N consecutive slices of ceil(n / N)
questions (:func:`palo.eval.model_vqa.get_chunk`), so the shards are disjoint, cover the file, and the same N always
gives the same slices. Each shard process appends to its own file (``<output-dir>/shards/<stem>.<K>-of-<N>.jsonl``),
resumable like every answers file; the merge then writes the final answers file in question-file order, through a
temporary file and ``os.replace``, and removes the shard files it took in. Questions already in the final file count
as answered for every shard, and a resumed run first merges the shard files an interrupted one left (of any number
of shards), so a run can be resumed with another number of GPUs, or in one process.

Which GPUs (:func:`resolve_gpus`): an explicit list (``PALO_EVAL_GPUS=0,1,2`` in the eval scripts), else ``auto``:
the ids in ``CUDA_VISIBLE_DEVICES``, else every device torch sees; ``auto`` finds none when CUDA is not available
or a single device was chosen with ``--device``. Each shard process gets one id as its ``CUDA_VISIBLE_DEVICES``.

``python -m palo.eval.shards merge --question-file Q --answers-file OUT SHARD...`` merges shards made by hand with
``model_vqa --num-chunks/--chunk-idx`` (LLaVA's scripts concatenated them with ``cat``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from palo.eval.jsonl import JsonlError, iter_jsonl, repair_tail, write_jsonl_atomic
from palo.jsonl import open_locked, same_file, unique_records


def parse_gpu_list(spec: str) -> list[str]:
    """``"0,1 2"`` -> ``["0", "1", "2"]`` (commas or spaces; ids are kept as text: they may be GPU UUIDs).

    Raises:
        ValueError: If an id repeats (two shards on one GPU is never what was meant).
    """
    ids = [part for part in spec.replace(",", " ").split() if part]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"GPU id(s) listed twice: {', '.join(repeated)}")
    return ids


def resolve_gpus(spec: str | None, device: str | None, env: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids to run one shard on each (fewer than two: no sharding).

    Args:
        spec: None (no sharding), ``auto``, or an explicit list (see :func:`parse_gpu_list`).
        device: The ``--device`` given, if any; with ``auto``, a chosen device (``cpu``, ``cuda:1``) means one process.
        env: The environment (default ``os.environ``).

    Raises:
        ValueError: On a malformed explicit list.
    """
    if spec is None or not spec.strip():
        return []
    if spec.strip() != "auto":
        return parse_gpu_list(spec)
    env = os.environ if env is None else env
    if device not in (None, "", "cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse_gpu_list(visible)
    return [str(i) for i in range(torch.cuda.device_count())]


def shard_path(answers_file: str, chunk_idx: int, num_chunks: int) -> str:
    """``out/NAME.jsonl`` -> ``out/shards/NAME.<K>-of-<N>.jsonl``."""
    folder, name = os.path.split(answers_file)
    stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else name
    return os.path.join(folder, "shards", f"{stem}.{chunk_idx}-of-{num_chunks}.jsonl")


def shard_files_of(answers_file: str) -> list[str]:
    """Every shard file of ``answers_file`` on disk, of any number of shards, ordered by (N, K).

    A run that was stopped before its merge leaves these behind; one resumed with another number of GPUs (or in one
    process) would not otherwise look at them.
    """
    folder = os.path.dirname(shard_path(answers_file, 0, 1))
    stem = os.path.basename(shard_path(answers_file, 0, 1))[:-len(".0-of-1.jsonl")]
    pattern = re.compile(re.escape(stem) + r"\.(\d+)-of-(\d+)\.jsonl")
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            found.append(((int(match[2]), int(match[1])), os.path.join(folder, name)))
    return [path for _, path in sorted(found)]


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: answers in the final file, and questions still without one."""

    answered: int
    missing: int


def question_order(question_file: str) -> list[str]:
    """question_ids (as strings) in file order; bad lines are skipped here (answering reports them).

    Raises:
        JsonlError: On a repeated question_id, as :func:`palo.eval.model_vqa.load_questions` (the merge would write
            one answer line per repeat).
    """
    records = iter_jsonl(question_file, skip_bad=True, required=("question_id",))
    return [str(record.data["question_id"]) for record in unique_records(records, "question_id")]


def merge_answers(question_file: str, shard_files: list[str], answers_file: str,
                  remove_shards: bool = True) -> MergeResult:
    """Merge shard answer files into ``answers_file`` in question-file order.

    Answers already in ``answers_file`` are kept and win over a shard's answer to the same question; within the
    shards the first answer wins. Its answers to questions no longer in the question file (a corrected bench that
    dropped one) are kept after the others, said on stderr: answering and judging pass over them, as they do when
    the answers were not sharded, and nothing answered is lost. The result is written atomically; then
    (``remove_shards``) the shard files are deleted, their answers being in the final file.

    Args:
        question_file: Gives the order.
        shard_files: Shard outputs; missing ones are skipped (a shard with nothing left to do writes nothing).
        answers_file: The final answers file (read if present, then replaced).
        remove_shards: Delete the shard files after the merge.

    Returns:
        Counts of answered and still unanswered questions.

    Raises:
        JsonlError: If a shard holds a malformed line or an answer to a question the file does not have (a shard
            from another run), the question file is missing or repeats a question_id, or another process is writing
            the answers file or a shard. (A malformed line of ``answers_file`` is reported and dropped.)
        ValueError: If ``answers_file`` is also the question file or one of the shards (the merge would read
            questions as answers, or delete the file it just wrote).
    """
    for other in (question_file, *shard_files):
        if same_file(answers_file, other):
            what = "the question file" if other == question_file else "one of the shards"
            raise ValueError(f"the answers file {answers_file} is also {what}: merge into a new file")
    order = question_order(question_file)
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    created = not os.path.exists(answers_file)  # locking creates it: removed again if the merge fails
    try:
        with contextlib.ExitStack() as held:
            # Every file merged is locked as its writers lock it, so one another process still writes (a shard of a
            # run in progress, the answers file of a model_vqa run) is refused, not replaced or deleted under it.
            for path in [answers_file, *shard_files]:
                if path == answers_file or os.path.isfile(path):
                    held.enter_context(open_locked(path))
            return _merge_held(order, question_file, shard_files, answers_file, remove_shards)
    except BaseException:
        if created and os.path.isfile(answers_file) and os.path.getsize(answers_file) == 0:
            os.remove(answers_file)
        raise


def _merge_held(order: list[str], question_file: str, shard_files: list[str], answers_file: str,
                remove_shards: bool) -> MergeResult:
    """:func:`merge_answers`' work, with every file locked."""
    known = set(order)
    answers: dict[str, dict] = {}
    unknown: list[dict] = []  # the final file's answers to questions no longer asked, in file order
    for path in [answers_file, *shard_files]:
        if not os.path.isfile(path):
            continue
        repair_tail(path)  # a shard process killed mid-write
        # A damaged line of the merged file (a disk fault, an edit): the shards took its question as unanswered and
        # answered it again, and the file is rewritten below, so it is reported and dropped, as model_vqa's resume
        # drops it from its own file. A shard's damaged line is an error: its own rerun removes it.
        for record in iter_jsonl(path, skip_bad=path == answers_file, required=("question_id",)):
            qid = str(record.data["question_id"])
            if qid not in known:
                if path != answers_file:  # a shard of another run (or another question file): nothing to merge
                    raise JsonlError(f"{record.where}: question_id {record.data['question_id']!r} "
                                     f"is not in {question_file}")
                # The merged file was made for an earlier question file: refusing it would fail every rerun, which
                # answers the shards and merges again; answering and judging pass over such answers as well.
                unknown.append(record.data)
                continue
            answers.setdefault(qid, record.data)
    if unknown:
        ids = [str(r["question_id"]) for r in unknown]
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        print(f"[merge] {answers_file}: kept {len(ids)} answer(s) to question(s) no longer in {question_file} at "
              f"its end (question_id {shown}); judging passes over them", file=sys.stderr)
    merged = [answers[qid] for qid in order if qid in answers]
    write_jsonl_atomic(answers_file, merged + unknown)
    if remove_shards:
        for path in shard_files:
            if os.path.isfile(path):
                os.remove(path)
        folder = os.path.dirname(shard_files[0]) if shard_files else None
        if folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return MergeResult(answered=len(merged), missing=len(order) - len(merged))


def build_parser() -> argparse.ArgumentParser:
    """``merge`` and its flags (``palo eval shards --help`` lists it; ``... merge --help`` shows its flags)."""
    parser = argparse.ArgumentParser(description="Answer files of model_vqa --num-chunks runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="merge")
    merge = commands.add_parser("merge", help="merge model_vqa chunk outputs in question order",
                                description="Merge model_vqa chunk outputs in question order.")
    merge.add_argument("--question-file", required=True)
    merge.add_argument("--answers-file", required=True, help="the merged output (kept answers win)")
    merge.add_argument("--keep", action="store_true", help="keep the shard files")
    merge.add_argument("shards", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    absent = [s for s in args.shards if not os.path.isfile(s)]
    if absent:
        print(f"error: no such shard file: {', '.join(absent)}", file=sys.stderr)
        return 2
    try:
        result = merge_answers(args.question_file, args.shards, args.answers_file, remove_shards=not args.keep)
    except ValueError as exc:  # JsonlError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk: the merged file is replaced only once whole, the shards removed only after
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: cannot merge into {args.answers_file}: {exc.strerror or exc}{where}; no answer is lost (the "
              "shards are removed only once the merged file is written), rerun with room to merge", file=sys.stderr)
        return 2
    print(f"{args.answers_file}: {result.answered} answers, {result.missing} question(s) unanswered", file=sys.stderr)
    return 1 if result.missing else 0


if __name__ == "__main__":
    sys.exit(main())
