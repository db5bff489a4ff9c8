"""The whole LLaVA-Bench run in one process (``python -m palo.eval.run_bench``), behind the two shell scripts.

For every language: answer (:mod:`palo.eval.model_vqa`), judge (:mod:`palo.eval.eval_gpt_review_bench`),
summarise (:mod:`palo.eval.summarize_gpt_review`); then, for a multi-language run, the table and chart of
:mod:`palo.eval.report`. The checkpoint is loaded once for all languages, and not at all when every answer already
exists (docs/compat.md#evaluation).

Two ways to name the work:

* ``--bench ROOT --name NAME``: every language present under ROOT, in either layout (:mod:`palo.eval.bench`);
  outputs ``<output-dir>/<NAME>_<Language>.jsonl``, ``reviews/<NAME>_<Language>.jsonl``, ``<NAME>_summary.*``;
* ``--images/--questions/--answers/--context --output-file F``: one set of files (``llavabench.sh``).

Every step resumes, so rerunning the same command after an interruption only does what is left. A language that
fails (bad input, judge unreachable) is reported and the others go on. Answers another checkpoint, other settings or
another question text made are not resumed: that language stops with the reason (``model_vqa``'s rule), unless
``--overwrite`` has those questions answered again.

``--gpus 0,1,2`` (or ``auto``: every visible GPU) answers with one process per GPU, each a slice of every language
(:mod:`palo.eval.shards`), merges the slices in question order, then judges once in this process.

``--conv-mode`` defaults, as in ``model_vqa`` and the chat CLI, to the template the checkpoint's config says it was
trained with (``vicuna_v1`` for PALO, the template ``llavabench.sh`` passes); one given explicitly is used as is.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from palo.conversation import conv_templates
from palo.eval import eval_gpt_review_bench, model_vqa, report, shards, summarize_gpt_review
from palo.eval.bench import BenchLayoutError, available_languages, display_name, language_files, paper_order
from palo.eval.jsonl import JsonlError
from palo.eval.judge import DEFAULT_JUDGE_MODEL
from palo.jsonl import same_file
from palo.model.builder import add_dtype_argument


@dataclass(frozen=True)
class Task:
    """One language's inputs and outputs."""

    label: str
    questions: str
    answers: str
    context: str
    images: str
    answers_out: str
    reviews_out: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--output-dir", default="evaluation")
    group = parser.add_argument_group("all languages")
    group.add_argument("--bench", default=None, help="the multilingual bench folder")
    group.add_argument("--name", default=None, help="output name (files <NAME>_<Language>.jsonl)")
    group.add_argument("--languages", nargs="*", default=None, help="default: every PALO language present")
    group = parser.add_argument_group("one set of files (llavabench.sh)")
    group.add_argument("--images", default=None)
    group.add_argument("--questions", default=None)
    group.add_argument("--answers", default=None, help="reference answers")
    group.add_argument("--context", default=None)
    group.add_argument("--output-file", default=None)
    group = parser.add_argument_group("answering")
    group.add_argument("--conv-mode", default=None, choices=sorted(conv_templates),
                       help="prompt template (default: the checkpoint's, from its config: vicuna_v1 for PALO)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--batch-size", type=int, default=1)
    group.add_argument("--max-new-tokens", type=int, default=1024)
    group.add_argument("--device", default=None)
    add_dtype_argument(group)
    group.add_argument("--image-preprocess", choices=("pad", "crop"), default=None,
                       help="default: as the checkpoint was trained (its config's image_aspect_ratio)")
    group.add_argument("--vision-tower", default=None)
    group.add_argument("--gpus", default=None,
                       help="one answering process per GPU: a list (0,1,2) or auto (CUDA_VISIBLE_DEVICES, else every "
                            "GPU torch sees); fewer than two: one process")
    group.add_argument("--overwrite", action="store_true",
                       help="answer again the questions whose answers another checkpoint, other settings or another "
                            "question text made (default: that language stops with an error)")
    group.add_argument("--num-chunks", type=int, default=1, help=argparse.SUPPRESS)  # a shard process (set by --gpus)
    group.add_argument("--chunk-idx", type=int, default=0, help=argparse.SUPPRESS)
    group = parser.add_argument_group("judging")
    group.add_argument("--judge-model", default=os.environ.get("PALO_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL)
    group.add_argument("--judge-base-url", default=None, help="default: $OPENAI_BASE_URL, else OpenAI")
    group.add_argument("--rule", default=None)
    group.add_argument("--parallel", type=int, default=4)
    group.add_argument("--max-retries", type=int, default=5)
    group.add_argument("--retry-base-delay", type=float, default=1.0)
    group.add_argument("--max-tokens", type=int, default=1024)
    group.add_argument("--cache", default=None, help="default: <output-dir>/reviews/judge_cache.sqlite")
    return parser


def make_tasks(args: argparse.Namespace) -> tuple[list[Task], list[str]]:
    """The tasks to run, and the languages whose files could not be found (reported on stderr)."""
    out = args.output_dir
    if args.bench is None:
        missing = [f for f in ("images", "questions", "answers", "context", "output_file") if getattr(args, f) is None]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise SystemExit(f"error: pass --bench and --name, or all of the one-language flags (missing {flags})")
        name = args.output_file[:-len(".jsonl")] if args.output_file.endswith(".jsonl") else args.output_file
        return [Task(name, args.questions, args.answers, args.context, args.images,
                     os.path.join(out, f"{name}.jsonl"), os.path.join(out, "reviews", f"{name}.jsonl"))], []
    if args.name is None:
        raise SystemExit("error: --bench needs --name")
    if not os.path.isdir(args.bench):
        raise SystemExit(f"error: bench folder {args.bench} not found (set MULTILINGUAL_LLAVA_BENCH_PATH)")
    languages = paper_order(args.languages) if args.languages else available_languages(args.bench)
    if not languages:
        raise SystemExit(f"error: no language folders in {args.bench}")
    tasks, broken = [], []
    for language in languages:
        try:
            files = language_files(args.bench, language)
        except BenchLayoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            broken.append(language)
            continue
        stem = f"{args.name}_{display_name(language)}"
        tasks.append(Task(language, files.questions, files.answers, files.context, files.images,
                          os.path.join(out, f"{stem}.jsonl"), os.path.join(out, "reviews", f"{stem}.jsonl")))
    return tasks, broken


def clashing_output(task: Task) -> str | None:
    """Why an output of ``task`` is one of its inputs, or None. Answers written to the reference answers file were
    read as a finished run (the reference judged against itself); reviews there replaced it."""
    inputs = (("questions", task.questions), ("reference answers", task.answers), ("context", task.context))
    for kind, output in (("answers", task.answers_out), ("reviews", task.reviews_out)):
        for name, path in inputs:
            if same_file(output, path):
                return f"{task.label}: the {kind} file {output} is the {name} file (choose another --output-dir)"
    return None


def judge_argv(args: argparse.Namespace, task: Task) -> list[str]:
    argv = ["-q", task.questions, "-c", task.context, "-a", task.answers, task.answers_out, "-o", task.reviews_out,
            "--judge-model", args.judge_model, "--parallel", str(args.parallel), "--max-retries", str(args.max_retries),
            "--retry-base-delay", str(args.retry_base_delay), "--max-tokens", str(args.max_tokens),
            "--cache", args.cache or os.path.join(args.output_dir, "reviews", "judge_cache.sqlite")]
    if args.judge_base_url:
        argv += ["--judge-base-url", args.judge_base_url]
    if args.rule:
        argv += ["--rule", args.rule]
    return argv


def _generation(args: argparse.Namespace) -> dict:
    return model_vqa.generation_kwargs(args.temperature, None, 1, args.max_new_tokens)


def answer_run(args: argparse.Namespace) -> model_vqa.AnswerRun:
    """The model and settings answers must have been made with to be resumed."""
    image_preprocess = args.image_preprocess or model_vqa.checkpoint_image_preprocess(args.model_path)
    return model_vqa.AnswerRun.of(args.model_path, args.conv_mode, image_preprocess, _generation(args))


def make_loader(args: argparse.Namespace) -> tuple[Callable[[], tuple[model_vqa.Answerer, str]], list]:
    """A loader that loads the checkpoint on first need and then shares it (every language), and its cache."""
    generation = _generation(args)
    loaded: list[tuple[model_vqa.Answerer, str]] = []

    def loader() -> tuple[model_vqa.Answerer, str]:
        if not loaded:
            loaded.append(model_vqa.load_answerer(args.model_path, args.model_base, args.conv_mode, generation,
                                                  args.image_preprocess, args.device, args.vision_tower,
                                                  dtype=args.dtype))
        return loaded[0]

    return loader, loaded


def _without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def take_in_shard_files(task: Task, run: model_vqa.AnswerRun, overwrite: bool) -> None:
    """Check the task's answers file and every shard file an earlier run left (of any number of shards) for answers
    another run made, then merge those shard files into the answers file, before this run answers.

    A sharded run stopped before its merge keeps its answers in its shard files only; resumed with another number
    of GPUs, or in one process, it would have answered all of them again and left the files behind for good.

    Raises:
        StaleAnswers: As :func:`palo.eval.model_vqa.check_answers_files`.
        JsonlError: If a file is malformed or being written, or a shard answers a question the file does not have.
    """
    leftovers = shards.shard_files_of(task.answers_out)
    model_vqa.check_answers_files(task.questions, [task.answers_out, *leftovers], run, overwrite)
    if leftovers:
        result = shards.merge_answers(task.questions, leftovers, task.answers_out)
        print(f"[resume] {task.answers_out}: merged {len(leftovers)} shard file(s) an earlier run left "
              f"({result.answered} answered, {result.missing} to go)", file=sys.stderr)


def answer_sharded(argv: list[str], args: argparse.Namespace, tasks: list[Task], gpus: list[str]) -> list[str]:
    """Answer every task with one process per GPU, then merge each task's shards.

    Returns:
        The labels of tasks left incomplete (a shard failed or questions are still unanswered).
    """
    import subprocess

    n = len(gpus)
    refused = []
    # Answers another run made are looked for here, once: a shard that refuses them cannot stop the merge and the
    # judging of what the files hold.
    run = answer_run(args)
    for task in tasks:
        try:
            take_in_shard_files(task, run, args.overwrite)
        except (ValueError, OSError) as exc:  # StaleAnswers, JsonlError
            print(f"error: {exc}", file=sys.stderr)
            refused.append(task.label)
    child_device = "cuda" if (args.device or "cuda").startswith("cuda") else args.device
    procs = []
    for k, gpu in enumerate(gpus):
        child_argv = [sys.executable, "-m", "palo.eval.run_bench", *_without_gpus(argv),
                      "--num-chunks", str(n), "--chunk-idx", str(k), "--device", child_device]
        procs.append(subprocess.Popen(child_argv, env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)))
    codes = [p.wait() for p in procs]
    for k, code in enumerate(codes):
        if code != 0:
            print(f"error: shard {k}/{n} (GPU {gpus[k]}) exited with {code}", file=sys.stderr)
    incomplete = list(refused)
    for task in tasks:
        if task.label in refused:
            continue
        files = [shards.shard_path(task.answers_out, k, n) for k in range(n)]
        try:
            result = shards.merge_answers(task.questions, files, task.answers_out)
        except JsonlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            incomplete.append(task.label)
            continue
        print(f"[merge] {task.answers_out}: {result.answered} answers from {n} shards", file=sys.stderr)
        if result.missing:
            incomplete.append(task.label)
    return incomplete


def answer_chunk(args: argparse.Namespace, tasks: list[Task]) -> int:
    """A shard process: this chunk of every task into its shard file; questions in the merged file count as done."""
    print(f"[shard {args.chunk_idx}/{args.num_chunks}] answering with "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", file=sys.stderr, flush=True)
    loader, _ = make_loader(args)
    worst = 0
    for task in tasks:
        out = shards.shard_path(task.answers_out, args.chunk_idx, args.num_chunks)
        try:
            rc = model_vqa.answer_file(loader, task.questions, task.images, out, args.batch_size, args.num_chunks,
                                       args.chunk_idx, done_files=(task.answers_out,), run=answer_run(args),
                                       overwrite=args.overwrite)
        except model_vqa.ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        worst = max(worst, rc)
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:  # settings no generation takes: refused before any language is answered or a model loaded
        _generation(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    problem = eval_gpt_review_bench.judge_settings_error(args.parallel, args.max_retries, args.retry_base_delay)
    if problem:  # before any language is answered, not when the judge starts
        raise SystemExit(f"error: {problem}")
    tasks, failed = make_tasks(args)
    clash = next(filter(None, map(clashing_output, tasks)), None)
    if clash:
        raise SystemExit(f"error: {clash}")
    os.makedirs(os.path.join(args.output_dir, "reviews"), exist_ok=True)
    if args.num_chunks > 1:
        return answer_chunk(args, tasks)
    try:
        gpus = shards.resolve_gpus(args.gpus, args.device)
    except ValueError as exc:
        raise SystemExit(f"error: --gpus: {exc}") from exc
    loader, loaded = make_loader(args)
    answered = []
    if len(gpus) > 1:
        incomplete = answer_sharded(argv, args, tasks, gpus)
        failed += incomplete
        answered = [task for task in tasks if task.label not in incomplete]
    for task in tasks if len(gpus) < 2 else []:
        print(f"=== {task.label}: answering ===", file=sys.stderr)
        if shards.shard_files_of(task.answers_out):
            try:
                take_in_shard_files(task, answer_run(args), args.overwrite)
            except (ValueError, OSError) as exc:  # StaleAnswers, JsonlError
                print(f"error: {exc}", file=sys.stderr)
                failed.append(task.label)
                continue
        try:
            rc = model_vqa.answer_file(loader, task.questions, task.images, task.answers_out, args.batch_size,
                                       run=answer_run(args), overwrite=args.overwrite)
        except model_vqa.ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if rc == 0:
            answered.append(task)
        else:
            failed.append(task.label)
    del loaded[:]  # free the model before judging

    all_failed = []  # judged, every judgment failed: their reviews are this run's, shown with their failures
    for task in answered:
        print(f"=== {task.label}: judging ===", file=sys.stderr)
        rc = eval_gpt_review_bench.main(judge_argv(args, task))
        if rc not in (0, 3):  # 3: nothing judged; still summarised (all failed) so the table shows it
            failed.append(task.label)
            continue
        if rc == 3:
            failed.append(task.label)
            all_failed.append(task.label)
        print(f"=== {task.label} ===")
        summarize_gpt_review.main(["-f", task.reviews_out])

    if args.bench is not None:
        # Every requested language, so those that could not run are listed as not evaluated; so are those that
        # failed before their reviews were brought up to date (their file may hold an earlier checkpoint's).
        languages = args.languages or available_languages(args.bench)
        stale = [label for label in failed if label not in all_failed]
        if tasks:
            report.main(["--reviews-dir", os.path.join(args.output_dir, "reviews"), "--name", args.name,
                         "--languages", *languages, "--out", os.path.join(args.output_dir, f"{args.name}_summary"),
                         "--skip", *stale])
    if failed:
        print(f"warning: incomplete: {', '.join(failed)} (see the errors above; rerunning the same command resumes "
              "what was done)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
