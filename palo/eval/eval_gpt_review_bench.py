"""Judge model answers against references with an OpenAI-compatible LLM (``python -m palo.eval.eval_gpt_review_bench``).

The CLI of the original (docs/formats.md §6): ``-q`` questions, ``-c`` context, ``-a`` reference answers then model
answers, ``-r/--rule`` an original ``rule.json`` (default: this project's rubric, ``palo.eval.judge.DEFAULT_RULES``),
``-o`` reviews, ``--max-tokens``. Added: ``--judge-model`` (written into every review), ``--judge-base-url`` (or
``OPENAI_BASE_URL``) for any compatible server, ``--parallel``, bounded retries, an SQLite reply cache.

Answers are paired with questions by ``question_id`` (docs/compat.md#evaluation). A question whose reference or
model answer or context is missing, a request that still fails after its retries, and a reply without two scores
are all written as *failed* reviews (``"tuple": [-1, -1], "failed": true, "reason"``) that the summary counts but
never averages.

Resumable: a question is skipped when ``-o`` holds a successful review made for the request this run would send:
the same reference and model answers (``answer1_id``, ``answer2_id``), the same judge (``judge_model``; a review
without one is the original's, made by ``gpt-4-0314``) and, for reviews that record it, the same request
(``request_key``, this project's field: a hash of the judge model, the messages and the sampling settings, so an
edited question, context, answer text or rubric counts too). Failed reviews and reviews made for another request
are judged again. New reviews are appended one flushed line at a time while the run goes; at the end the file is
rewritten in question order with one review per question of the question file, under the category the question
file gives it now (a corrected category changes no request, so its review is kept). Reviews that no longer apply (of
questions no longer in the question file, or made for another request and not yet judged again) are moved to
``<output>.stale`` (appended there before the rewrite, each once: a run killed between the two steps does not append
them again), said on stderr, and never counted.

Ctrl-C stops sending: requests not yet sent are cancelled, the replies of those in flight are waited for and
written (Ctrl-C again stops at once), the file is compacted, and the interrupt goes on to the caller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from palo.eval.judge import (
    DEFAULT_JUDGE_MODEL,
    JudgeClient,
    Judgment,
    ReplyCache,
    RuleError,
    ScoreParseError,
    build_user_content,
    load_rules,
    parse_scores,
    rule_for,
)
from palo.jsonl import (
    JsonlAppender,
    JsonlError,
    Record,
    iter_jsonl,
    read_jsonl,
    repair_tail,
    same_file,
    unique_records,
    write_jsonl_atomic,
)

FAILED_TUPLE = [-1, -1]
ORIGINAL_JUDGE_MODEL = "gpt-4-0314"  # the original wrote no judge_model: it always asked this one


@dataclass
class Item:
    """One question to judge, with everything its request needs (or why it cannot be judged)."""

    question: Record
    category: str
    answer1_id: Any
    answer2_id: Any
    content: str | None  # the judge's user message; None when a piece is missing
    problem: str | None = None
    request_key: str | None = None  # JudgeClient.fingerprint of the request; None when there is no request


def is_success(review: dict[str, Any]) -> bool:
    """A review that counts: not marked failed and with a real score pair (original files mark failures [-1, -1])."""
    scores = review.get("tuple", review.get("score"))
    if review.get("failed") or not isinstance(scores, (list, tuple)) or len(scores) != 2:
        return False
    return all(isinstance(s, (int, float)) and s >= 0 for s in scores)


def made_for(review: dict[str, Any], item: Item, judge_model: str) -> bool:
    """Whether a previous review judged the request this run would send for ``item``.

    The answers are compared by id and the judge by name; a review that records its ``request_key`` must also have
    been made for the same request (question, context, answer texts, rubric, judge settings). Reviews without it
    (the original's, an earlier version's) are compared by ids and judge only.
    """
    if review.get("judge_model", ORIGINAL_JUDGE_MODEL) != judge_model:
        return False
    if (review.get("answer1_id"), review.get("answer2_id")) != (item.answer1_id, item.answer2_id):
        return False
    return review.get("request_key", item.request_key) == item.request_key


def reread_scores(review: dict[str, Any]) -> tuple[float, float] | None:
    """The scores this version reads in a successful review's reply, or None where it reads none.

    A review of this project (it records ``request_key``) was scored by an earlier version of the parser, which may
    have read a count in the explanation as a score; its reply is read again, so a resumed run corrects the score
    (or judges the question again) instead of keeping it. Reviews of the original keep the scores its own rule
    read.
    """
    if "request_key" not in review:
        return tuple(review.get("tuple", review.get("score")))
    try:
        return parse_scores(str(review.get("content", "")))
    except ScoreParseError:
        return None


def latest_reviews(path: str) -> dict[str, dict[str, Any]]:
    """The last review per question_id in a reviews file (a resumed run appends after older failed ones)."""
    if not os.path.isfile(path):
        return {}
    repair_tail(path)
    out: dict[str, dict[str, Any]] = {}
    for record in iter_jsonl(path, skip_bad=True, required=("question_id",)):
        out[str(record.data["question_id"])] = record.data
    return out


def load_questions(path: str, skip_bad: bool = False) -> list[Record]:
    """The question file's records (``question_id``, ``text``, ``category``), each question_id once.

    A repeated question_id would be judged twice (paid twice) and then lose both reviews, as the reviews are keyed
    by question_id; so it is refused, as :func:`palo.eval.model_vqa.load_questions` refuses it when answering.

    Raises:
        JsonlError: On a malformed line or a repeated question_id, naming the line (and the first one); with
            ``skip_bad`` such lines are reported and skipped instead.
    """
    records = iter_jsonl(path, skip_bad, required=("question_id", "text", "category"))
    return unique_records(records, "question_id", skip_bad)


def _context_text(record: Record) -> str:
    caption = record.data["caption"]
    return "\n".join(str(c) for c in caption) if isinstance(caption, list) else str(caption)


def build_items(questions: list[Record], contexts: dict[str, Record], answers1: dict[str, Record],
                answers2: dict[str, Record], rules: dict[str, dict[str, str]], files: dict[str, str]) -> list[Item]:
    """Join the four inputs by question_id (answers) and image (context).

    Answer records must have ``text`` and context records ``caption`` (as :func:`main` reads them).

    Raises:
        RuleError: If a question's category has no rule (the message names the question line).
    """
    items = []
    for q in questions:
        qid = str(q.data["question_id"])
        category = str(q.data.get("category", ""))
        try:
            rule = rule_for(rules, category)
        except RuleError as exc:
            raise RuleError(f"{q.where}: {exc.args[0]}") from None
        a1, a2 = answers1.get(qid), answers2.get(qid)
        ctx = contexts.get(str(q.data.get("image")))
        problem = None
        if a1 is None:
            problem = f"no reference answer for question_id {qid} in {files['a1']}"
        elif a2 is None:
            problem = f"no model answer for question_id {qid} in {files['a2']}"
        elif ctx is None:
            problem = f"no context for image {q.data.get('image')!r} in {files['context']}"
        content = None
        if problem is None:
            content = build_user_content(_context_text(ctx), str(q.data["text"]), str(a1.data["text"]),
                                         str(a2.data["text"]), rule)
        items.append(Item(
            question=q,
            category=category,
            answer1_id=a1.data.get("answer_id", a1.data["question_id"]) if a1 else None,
            answer2_id=a2.data.get("answer_id", a2.data["question_id"]) if a2 else None,
            content=content,
            problem=problem,
        ))
    return items


def review_category(item: Item) -> str:
    """The ``category`` a review of ``item`` carries (docs/formats.md §5.3: the rule's name)."""
    return f"llava_bench_{item.category}"


def review_record(item: Item, judgment: Judgment, judge_model: str) -> dict[str, Any]:
    """A review line (docs/formats.md §5.3) plus ``judge_model``, ``failed`` and, for failures, ``reason``."""
    record = {
        "id": 0,  # renumbered when the file is compacted
        "question_id": item.question.data["question_id"],
        "answer1_id": item.answer1_id,
        "answer2_id": item.answer2_id,
        "category": review_category(item),
        "content": judgment.content,
        "tuple": list(judgment.scores) if judgment.scores else FAILED_TUPLE,
        "judge_model": judge_model,
        "failed": judgment.failed,
    }
    if item.request_key is not None:
        record["request_key"] = item.request_key
    if judgment.failed:
        record["reason"] = judgment.reason
    return record


def stale_path(path: str) -> str:
    """Where reviews that no longer apply go: ``<reviews file>.stale`` (not ``.jsonl``, so that
    ``summarize_gpt_review -d`` never reads it as a model's reviews)."""
    return path + ".stale"


def _canonical(record: dict[str, Any]) -> str:
    """A record as one string, equal for equal JSON objects whatever the order of their keys."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def compact(path: str, items: list[Item], judge_model: str) -> list[dict[str, Any]]:
    """Rewrite the reviews file: one review per question (the latest), in question order, ids 1..n.

    Reviews that no longer apply are appended to :func:`stale_path` first (nothing paid for is lost), except those
    already there (a run killed before the rewrite left them in both files), and said on stderr: those of questions
    no longer in the question file, and successful ones made for another request (left when a run stops before
    judging that question again), which would otherwise be counted as scores of answers they never saw. A kept
    review gets its question's category as the question file gives it now: a corrected category leaves the request
    alone (the three rubrics are one text), so the review is reused, and its old category would file the score under
    the wrong one.

    Call it while holding the file's :class:`JsonlAppender` (its lock): a run that took the lock after it was let go
    would append to the file this replaces, and its reviews would be lost.

    Returns:
        The reviews kept, as written.
    """
    latest = latest_reviews(path)
    ordered, outdated = [], []
    for item in items:
        review = latest.pop(str(item.question.data["question_id"]), None)
        if review is None:
            continue
        if is_success(review) and not made_for(review, item, judge_model):
            outdated.append(review)
        else:
            review["category"] = review_category(item)
            ordered.append(review)
    removed = list(latest.values())
    if removed or outdated:
        with JsonlAppender(stale_path(path)) as side:
            # Read under the side file's lock: a run killed after this append and before the rewrite below left
            # these reviews in both files, and the next run would append them to the side file a second time.
            there = {_canonical(record.data) for record in iter_jsonl(side.path, skip_bad=True)}
            for review in removed + outdated:
                if _canonical(review) not in there:
                    side.write(review)
        print(f"[stale] moved {len(removed) + len(outdated)} review(s) out of {path} into {stale_path(path)}, not "
              f"counted: {len(removed)} of questions no longer in the question file, {len(outdated)} made for other "
              "answers, another judge or another request", file=sys.stderr)
    for number, review in enumerate(ordered, start=1):
        review["id"] = number
    write_jsonl_atomic(path, ordered)
    return ordered


def judge_all(pending: list[Item], judge: Callable[[Item], tuple[Item, Judgment]],
              record: Callable[[Item, Judgment], None], parallel: int) -> None:
    """Judge ``pending`` with up to ``parallel`` requests at a time, recording each outcome (in this thread) as it
    completes.

    Raises:
        KeyboardInterrupt: On Ctrl-C, once the requests not yet sent are cancelled and the replies of those in
            flight (paid for) are recorded; a second Ctrl-C while waiting for them stops at once.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    futures = [pool.submit(judge, item) for item in pending]
    recorded: set[Future] = set()
    try:
        for future in as_completed(futures):
            record(*future.result())
            recorded.add(future)
    except BaseException as exc:
        # The executor's own exit would wait for every queued request, sending them all after a Ctrl-C or an error.
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(exc, KeyboardInterrupt):
            left = [f for f in futures if f not in recorded and not f.cancelled()]
            print(f"[interrupted] {len(futures) - len(recorded) - len(left)} request(s) not sent; waiting for the "
                  f"{len(left)} in flight (Ctrl-C again to stop now)", file=sys.stderr)
            for future in left:
                record(*future.result())
        raise
    pool.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLM-judged review of model answers (LLaVA-Bench protocol).")
    parser.add_argument("-q", "--question", required=True, help="questions jsonl")
    parser.add_argument("-c", "--context", required=True, help="context jsonl (image -> caption)")
    parser.add_argument("-a", "--answer-list", nargs=2, required=True, metavar=("REFERENCE", "MODEL"),
                        help="reference answers (Assistant 1), then the model's answers (Assistant 2)")
    parser.add_argument("-r", "--rule", default=None, help="an original rule.json (default: the built-in rubric)")
    parser.add_argument("-o", "--output", required=True, help="reviews jsonl (appended, resumable)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--judge-model", default=os.environ.get("PALO_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL)
    parser.add_argument("--judge-base-url", default=os.environ.get("OPENAI_BASE_URL"),
                        help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    parser.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--parallel", type=int, default=1, help="concurrent judge requests")
    parser.add_argument("--max-retries", type=int, default=5, help="retries on 429 / 5xx / time-outs")
    parser.add_argument("--retry-base-delay", type=float, default=1.0, help="seconds; doubles on every retry")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--cache", default=None, help="SQLite reply cache (default: judge_cache.sqlite next to -o)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--skip-bad", action="store_true", help="skip and report malformed input lines")
    return parser


def judge_settings_error(parallel: int, max_retries: int, retry_base_delay: float,
                         timeout: float | None = None) -> str | None:
    """What is wrong with the judge's request settings, or None (a timeout of 0 failed every request only after the
    whole retry schedule, as a connection error); ``timeout`` None: not set here (run_bench has no flag for it)."""
    if parallel < 1:
        return f"--parallel must be at least 1, got {parallel}"
    if max_retries < 0:
        return f"--max-retries must be at least 0, got {max_retries}"
    if not (math.isfinite(retry_base_delay) and retry_base_delay >= 0):
        return f"--retry-base-delay must be a number of seconds from 0, got {retry_base_delay}"
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        return f"--timeout must be a positive number of seconds, got {timeout}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = judge_settings_error(args.parallel, args.max_retries, args.retry_base_delay, args.timeout)
    if problem:
        parser.error(problem)
    files = {"a1": args.answer_list[0], "a2": args.answer_list[1], "context": args.context}
    # The reviews are appended to -o and the file compacted at the end: naming an input there replaced it by reviews.
    inputs = {"question": args.question, "context": args.context, "reference answers": args.answer_list[0],
              "model answers": args.answer_list[1], "rule": args.rule}
    clash = next((name for name, path in inputs.items() if path and same_file(args.output, path)), None)
    if clash:
        print(f"error: the reviews file {args.output} is the {clash} file", file=sys.stderr)
        return 2
    try:
        rules = load_rules(args.rule)
        questions = load_questions(args.question, args.skip_bad)
        # The texts are required: a line without one would be judged as an empty answer (or context), and its score
        # counted as if the model (or the reference) had said nothing.
        contexts = {str(r.data["image"]): r
                    for r in read_jsonl(args.context, args.skip_bad, required=("image", "caption"))}
        answers1, answers2 = (
            {str(r.data["question_id"]): r
             for r in read_jsonl(files[k], args.skip_bad, required=("question_id", "text"))}
            for k in ("a1", "a2")
        )
        items = build_items(questions, contexts, answers1, answers2, rules, files)
    except (JsonlError, RuleError, OSError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, RuleError) else exc
        print(f"error: {message}", file=sys.stderr)
        return 2

    cache_path = None if args.no_cache else (args.cache or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                                       "judge_cache.sqlite"))
    out = None
    try:  # before anything is asked: an output that cannot be written would lose every paid review
        out = JsonlAppender(args.output)  # locked: one run per reviews file, so read what it holds only now
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        cache = ReplyCache(cache_path)
    except (JsonlError, OSError, sqlite3.Error) as exc:
        if out is not None:
            out.close()
        print(f"error: cannot write the reviews or the judge cache: {exc}", file=sys.stderr)
        return 2

    client = JudgeClient(
        model=args.judge_model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        base_url=args.judge_base_url or None, max_tokens=args.max_tokens, temperature=args.temperature,
        max_retries=args.max_retries, backoff=args.retry_base_delay, timeout=args.timeout, cache=cache,
    )
    for item in items:
        if item.content is not None:
            item.request_key = client.fingerprint(item.content)
    previous = latest_reviews(args.output)
    pending, redone, reread = [], 0, []
    for item in items:
        review = previous.get(str(item.question.data["question_id"]))
        if review is not None and is_success(review):
            if made_for(review, item, args.judge_model):
                scores = reread_scores(review)
                if scores == tuple(review.get("tuple", review.get("score"))):
                    continue
                if scores is not None:  # the same reply, read right now: no need to ask again
                    reread.append({**review, "tuple": list(scores)})
                    continue
            redone += 1
        pending.append(item)
    if len(pending) < len(items):
        print(f"[resume] {len(items) - len(pending)} of {len(items)} questions already reviewed in {args.output}",
              file=sys.stderr)
    if redone:
        print(f"[resume] {redone} review(s) in {args.output} were made for other answers, another judge or another "
              "request, or their reply no longer reads as two scores: judged again", file=sys.stderr)
    if reread:
        print(f"[resume] {len(reread)} review(s) in {args.output} read their reply's scores again (an earlier "
              "version misread them)", file=sys.stderr)

    failures: list[tuple[Any, str]] = []
    stats = {"judged": 0, "cached": 0, "calls": 0}

    def run(item: Item) -> tuple[Item, Judgment]:
        if item.problem is not None:
            return item, Judgment("", None, failed=True, reason=item.problem)
        return item, client.judge(item.content)

    unwritten: list[OSError] = []  # an append that failed (a full disk), told apart from the judge's own errors

    def append(review: dict[str, Any]) -> None:
        try:
            out.write(review)
        except OSError as exc:
            unwritten.append(exc)
            raise

    def record(item: Item, judgment: Judgment) -> None:
        append(review_record(item, judgment, args.judge_model))
        stats["judged"] += 1
        stats["cached"] += judgment.cached
        stats["calls"] += judgment.calls
        if judgment.failed:
            failures.append((item.question.data["question_id"], judgment.reason or "failed"))

    interrupted: KeyboardInterrupt | None = None
    with out:
        try:
            for review in reread:  # the latest line per question counts: compact keeps these
                append(review)
            judge_all(pending, run, record, args.parallel)
        except KeyboardInterrupt as exc:
            interrupted = exc
        except OSError:
            if not unwritten:
                raise
        cache.close()
        if unwritten:  # judge_all sends no more requests; the reviews appended so far are whole lines, kept
            print(f"error: cannot write the reviews file {args.output}: {unwritten[0].strerror or unwritten[0]}; the "
                  f"{stats['judged']} review(s) this run wrote are kept, rerun with room to judge the rest",
                  file=sys.stderr)
            return 2
        # Still locked: another run is refused until the file is rewritten, instead of appending to the file that
        # the rewrite replaces.
        try:
            reviews = compact(args.output, items, args.judge_model)
        except OSError as exc:  # the rewrite is atomic: the appended file stays as it was, and a rerun compacts it
            print(f"error: cannot rewrite the reviews file {args.output}: {exc.strerror or exc}; its "
                  f"{stats['judged']} new review(s) are kept as appended, rerun with room to finish", file=sys.stderr)
            return 2

    ok = sum(1 for r in reviews if is_success(r))
    print(f"reviewed {stats['judged']} question(s) with {args.judge_model} ({stats['cached']} from cache, "
          f"{stats['calls']} request(s)); {ok} of {len(reviews)} reviews usable, {len(reviews) - ok} failed",
          file=sys.stderr)
    for qid, reason in failures:
        print(f"[failed] question_id {qid}: {reason}", file=sys.stderr)
    if interrupted is not None:
        print(f"interrupted: rerun the same command to judge the {len(pending) - stats['judged']} question(s) left",
              file=sys.stderr)
        raise interrupted
    # Failures are data (the summary reports them), not an error; but a run where nothing could be judged usually
    # means a wrong key, model or URL, and the caller should hear about it.
    if reviews and ok == 0:
        if all(item.problem is not None for item in items):  # no request was even sent: the inputs do not match
            print("error: no question could be judged: none has a reference answer, a model answer and a context "
                  "(were the answer files made from this question file?)", file=sys.stderr)
        else:
            print("error: no question could be judged (check the API key, --judge-model and --judge-base-url)",
                  file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
