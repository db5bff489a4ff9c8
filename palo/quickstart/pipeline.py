"""The quickstart pipeline: data -> small PALO -> tower pre-training -> stage 1 -> stage 2 -> evaluation -> (serving).

Every stage writes under one work folder and is skipped when its output is already there, so a rerun of
``palo quickstart`` goes straight to evaluation / serving. Training runs the real entry point,
:func:`palo.train.train.train`, with the flags the original scripts pass (on CPU: ``--use_cpu True``); evaluation
runs the real :mod:`palo.eval.model_vqa` answerer at temperature 0 and scores with :mod:`palo.quickstart.exact_match`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from palo.jsonl import lock_folder
from palo.quickstart.vision import TowerPretraining
from palo.testing.tiny import TinyShapes


@dataclass(frozen=True)
class QuickstartConfig:
    """Sizes and schedule of one quickstart run.

    ``steps`` is the number of stage-2 optimiser steps; stage 1 (projector only, LLM frozen) gets
    ``stage1_steps``. The CLIP-shaped tower is pre-trained first (``tower``, see :mod:`palo.quickstart.vision`)
    and then frozen, as PALO freezes CLIP. The LLM starts from random weights, so stage 1 cannot align anything to
    it (its loss stays flat; it runs to show the two-stage recipe and its ``mm_projector.bin`` hand-over) and stage
    2 trains the LLM and projector together: the 10 languages' answer words and the grounding.
    """

    train_images: int = 8000
    eval_images: int = 50  # 150 questions per language: one question is 2 % of a column
    image_size: int = 84  # 6 x 6 patches of 14 px; a 3 x 3 shape grid puts each cell on 2 x 2 patches
    steps: int = 1500  # the loss is near zero by step 500; the rest is margin (about 3 min on 2 cores)
    stage1_steps: int = 30
    batch_size: int = 16
    stage1_lr: float = 2e-3
    stage2_lr: float = 1e-3  # at 3e-3 the LLM locked onto shape and count and never learned colour (2 seeds)
    vocab_size: int = 1200
    shapes: TinyShapes = TinyShapes(
        hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, max_position_embeddings=512,
        vision_hidden=96, vision_layers=3, vision_heads=4, image_size=84, patch_size=14,
    )
    tower: TowerPretraining = TowerPretraining()
    eval_batch_size: int = 32
    seed: int = 0

    @classmethod
    def tiny(cls) -> QuickstartConfig:
        """The CI preset: a handful of steps on a few images (the pipeline, not the accuracy, is under test)."""
        return cls(train_images=40, eval_images=2, steps=4, stage1_steps=2, batch_size=4, vocab_size=1000,
                   tower=TowerPretraining(steps=3, batch_size=8),
                   shapes=replace(cls.shapes, hidden_size=64, intermediate_size=128, num_layers=2, vision_hidden=32))


@dataclass(frozen=True)
class Paths:
    workdir: str

    @property
    def data(self) -> str:
        return os.path.join(self.workdir, "data")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.workdir, "models", "tokenizer")

    @property
    def clip(self) -> str:
        return os.path.join(self.workdir, "models", "clip")

    @property
    def llama(self) -> str:
        return os.path.join(self.workdir, "models", "llama")

    @property
    def stage1(self) -> str:
        return os.path.join(self.workdir, "checkpoints", "stage1-projector")

    @property
    def stage2(self) -> str:
        return os.path.join(self.workdir, "checkpoints", "palo-quickstart")

    @property
    def answers(self) -> str:
        return os.path.join(self.workdir, "eval", "answers")

    @property
    def report(self) -> str:
        return os.path.join(self.workdir, "eval", "quickstart_summary")


def banner(text: str) -> None:
    line = "=" * max(60, len(text) + 4)
    print(f"\n{line}\n  {text}\n{line}", flush=True)


@contextmanager
def staged_folder(final: str) -> Iterator[str]:
    """Yield a fresh staging folder next to ``final``; on success it replaces ``final`` in one rename.

    A crash leaves ``final`` absent (or as it was), never half written, so "the folder exists" can mark a finished
    stage. A staging folder left by a crash is cleared on the next attempt.
    """
    staging = final.rstrip(os.sep) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    yield staging
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staging, final)


def build_data(paths: Paths, config: QuickstartConfig):
    """Draw the task (train JSONs + bench); skipped when present."""
    from palo.quickstart import shapes_task

    task = shapes_task.TaskPaths(paths.data, os.path.join(paths.data, "images"),
                                 os.path.join(paths.data, "stage1.json"), os.path.join(paths.data, "stage2.json"),
                                 os.path.join(paths.data, "bench"))
    if os.path.isdir(paths.data):
        print(f"[skip] data already in {paths.data}")
        return task
    with staged_folder(paths.data) as staging:
        shapes_task.write_task(staging, config.train_images, config.eval_images, config.image_size, config.seed)
    print(f"{config.train_images} training images, {config.eval_images} held-out images x 3 questions x 10 languages"
          f" -> {paths.data}")
    return task


def tokenizer_text() -> list[str]:
    """What the quickstart's SentencePiece model is trained on: the task's questions and answers, and the ``v1``
    prompt's system message and roles, which real LLaMA vocabularies cover with whole-word pieces (without them the
    system message alone is 80 pieces, two thirds of a training sample)."""
    from palo.conversation import conv_templates
    from palo.quickstart import shapes_task

    template = conv_templates["vicuna_v1"]
    return shapes_task.all_text() * 4 + [template.system, " ".join(f"{role}:" for role in template.roles)] * 40


def build_models(paths: Paths, config: QuickstartConfig) -> None:
    """Tokenizer trained on the task's text, random CLIP tower and random LLaMA, saved in hub-style folders.

    Each part is skipped when present; the LLaMA is written after (and rebuilt with) its tokenizer, whose size it
    takes. The tower is left alone once it exists, as :func:`pretrain_vision` replaces it with the trained one.
    """
    from palo.testing import tiny

    s = config.shapes
    if os.path.isdir(paths.llama):
        print(f"[skip] tokenizer and language model already in {os.path.dirname(paths.llama)}")
    else:
        with staged_folder(paths.tokenizer) as staging:
            tokenizer = tiny.train_sentencepiece(staging, config.vocab_size, extra_text=tokenizer_text())
        print(f"tokenizer: SentencePiece BPE, {len(tokenizer)} pieces -> {paths.tokenizer}")
        with staged_folder(paths.llama) as staging:
            tiny.save_tiny_llama(staging, paths.tokenizer, config.shapes, seed=config.seed)
        print(f"language model: LLaMA, hidden {s.hidden_size}, {s.num_layers} layers -> {paths.llama}")
    if os.path.isdir(paths.clip):
        print(f"[skip] vision tower already in {paths.clip}")
    else:
        with staged_folder(paths.clip) as staging:
            tiny.save_tiny_clip(staging, config.shapes, seed=config.seed)
        print(f"vision tower: CLIP-shaped, {s.image_size}px / patch {s.patch_size}, hidden {s.vision_hidden}, "
              f"{s.vision_layers} layers -> {paths.clip}")


def pretrain_vision(paths: Paths, config: QuickstartConfig, task) -> None:
    """Train the random tower on the training images' attributes (see :mod:`palo.quickstart.vision`)."""
    from palo.quickstart import shapes_task, vision

    marker = os.path.join(paths.clip, vision.DONE_FILE)
    if os.path.isfile(marker):
        print(f"[skip] vision tower already pre-trained: {marker}")
        return
    specs = shapes_task.load_specs(os.path.join(task.root, "specs.json"))
    with staged_folder(paths.clip) as staging:
        summary = vision.pretrain_tower(paths.clip, staging, task.images, specs, config.tower)
    before, after = summary["held_out_accuracy_before"], summary["held_out_accuracy_after"]
    print(f"probe accuracy on {summary['held_out_images']} held-out training images, before -> after: "
          + ", ".join(f"{k} {100 * before[k]:.0f}% -> {100 * after[k]:.0f}%" for k in vision.ATTRIBUTES))


def _common_flags(paths: Paths, config: QuickstartConfig, data_path: str, image_folder: str, out: str) -> list[str]:
    return [
        "--model_name_or_path", paths.llama,
        "--data_path", data_path,
        "--image_folder", image_folder,
        "--vision_tower", paths.clip,
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--bf16", "False",
        "--output_dir", out,
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", str(config.batch_size),
        "--gradient_accumulation_steps", "1",
        "--save_strategy", "no",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "10",
        "--model_max_length", "256",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--use_cpu", "True",
        "--seed", str(config.seed),
    ]


def stage1_flags(paths: Paths, config: QuickstartConfig, task) -> list[str]:
    """The flags of ``scripts/train/pretrain_projector.sh`` (stage 1: projector only, ``plain`` template)."""
    return _common_flags(paths, config, task.stage1_json, task.images, paths.stage1) + [
        "--version", "plain",
        "--tune_mm_mlp_adapter", "True",
        "--learning_rate", str(config.stage1_lr),
        "--max_steps", str(config.stage1_steps),
    ]


def stage2_flags(paths: Paths, config: QuickstartConfig, task) -> list[str]:
    """The flags of ``scripts/train/finetune_palo.sh`` (stage 2: full fine-tune from the stage-1 projector)."""
    return _common_flags(paths, config, task.stage2_json, task.images, paths.stage2) + [
        "--version", "v1",
        "--pretrain_mm_mlp_adapter", os.path.join(paths.stage1, "mm_projector.bin"),
        "--learning_rate", str(config.stage2_lr),
        "--max_steps", str(config.steps),
    ]


TRAINED = "quickstart-trained.json"  # written after train() returns: the stage's output is complete


def run_training(flags: list[str], out: str) -> None:
    """Run ``palo/train/train.py`` with ``flags`` unless ``out`` holds a finished run of this pipeline."""
    import json

    from palo.train.train import train

    marker = os.path.join(out, TRAINED)
    if os.path.isfile(marker):
        print(f"[skip] already trained: {out}")
        return
    print("python palo/train/train.py " + " ".join(flags), flush=True)
    trainer = train(flags)
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"flags": flags, "global_step": trainer.state.global_step}, f, indent=1)
    os.replace(marker + ".tmp", marker)


def evaluate(paths: Paths, config: QuickstartConfig, task) -> dict:
    """Answer every language's questions with ``model_vqa`` (greedy) and score them; returns the table."""
    from palo.data.languages import LANGUAGES
    from palo.eval import model_vqa
    from palo.eval.bench import display_name, language_files
    from palo.quickstart import exact_match

    cache: dict = {}

    def loader():
        if "answerer" not in cache:
            cache["answerer"] = model_vqa.load_answerer(
                paths.stage2, None, "vicuna_v1", model_vqa.generation_kwargs(0.0, None, 1, 16), device="cpu")
        return cache["answerer"]

    os.makedirs(paths.answers, exist_ok=True)
    for language in LANGUAGES:
        files = language_files(task.bench, language)
        print(f"{display_name(language)}:", flush=True)
        rc = model_vqa.answer_file(loader, files.questions, files.images,
                                   exact_match.answers_path(paths.answers, language), batch_size=config.eval_batch_size)
        if rc != 0:
            raise StageFailed(f"answering the {display_name(language)} questions failed (model_vqa exit status {rc})")
    return exact_match.build_table(task.bench, paths.answers, os.path.basename(paths.stage2))


@dataclass
class Result:
    checkpoint: str
    table: dict
    report: dict[str, str]
    seconds: dict[str, float]


CONFIG_FILE = "quickstart-config.json"


class WorkdirInUse(ValueError):
    """The workdir holds a run made with other settings (its stages would be skipped as done), or another quickstart
    is running in it."""


class StageFailed(RuntimeError):
    """A stage stopped after saying why (its own error line); the stages finished before it are kept."""


def claim_workdir(workdir: str, config: QuickstartConfig) -> None:
    """Record ``config`` in ``workdir``, or check it against the one recorded there.

    Every stage skips what the workdir already holds, so a rerun with other settings (``--steps``, ``--preset``)
    would report the earlier run's table as if it were the new one's.

    Raises:
        WorkdirInUse: Naming the settings that differ.
    """
    import json

    path = os.path.join(workdir, CONFIG_FILE)
    wanted = json.loads(json.dumps(asdict(config)))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        differ = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        if differ:
            raise WorkdirInUse(f"{workdir} holds a quickstart run with other settings ({', '.join(differ)}); "
                               "choose another --workdir, or delete this one to start over")
        return
    # A workdir from before settings were recorded: its stage-2 run still says how many steps it took.
    marker = os.path.join(Paths(workdir).stage2, TRAINED)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            flags = json.load(f).get("flags") or []
        ran = flags[flags.index("--max_steps") + 1] if "--max_steps" in flags[:-1] else None
        if ran is not None and ran != str(config.steps):
            raise WorkdirInUse(f"{workdir} holds a quickstart run of {ran} stage-2 steps, not {config.steps}; "
                               "choose another --workdir, or delete this one to start over")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(wanted, f, indent=1)
    os.replace(path + ".tmp", path)


def run(workdir: str, config: QuickstartConfig) -> Result:
    """Every stage but serving; returns where things are and the timings.

    Raises:
        WorkdirInUse: ``workdir`` holds a run with other settings, or another quickstart runs in it.
        StageFailed: A stage stopped (said in its own line); the finished ones are kept for a rerun.
    """
    paths = Paths(os.path.abspath(workdir))
    try:  # two runs in one workdir replaced each other's stage folders while the other read them
        lock = lock_folder(paths.workdir)
    except BlockingIOError:
        raise WorkdirInUse(f"{workdir}: another quickstart is running in it; wait for it to finish, or choose "
                           "another --workdir") from None
    try:
        return _run_locked(paths, config)
    finally:
        os.close(lock)


def _run_locked(paths: Paths, config: QuickstartConfig) -> Result:
    """:func:`run`'s stages, the workdir locked."""
    from palo.quickstart import exact_match

    claim_workdir(paths.workdir, config)
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - start
        return out

    banner("1/6  Drawing the synthetic multilingual shapes task")
    task = timed("data", build_data, paths, config)
    banner("2/6  Building a small PALO locally (tokenizer, CLIP tower, LLaMA)")
    timed("models", build_models, paths, config)
    banner(f"3/6  Pre-training the vision tower ({config.tower.steps} steps, training images only)")
    timed("vision", pretrain_vision, paths, config, task)
    banner(f"4/6  Stage 1: projector pre-training ({config.stage1_steps} steps, palo/train/train.py)")
    timed("stage1", run_training, stage1_flags(paths, config, task), paths.stage1)
    banner(f"5/6  Stage 2: instruction fine-tuning ({config.steps} steps, palo/train/train.py)")
    timed("stage2", run_training, stage2_flags(paths, config, task), paths.stage2)
    banner("6/6  Evaluating every language (model_vqa, temperature 0, exact-match judge)")
    table = timed("eval", evaluate, paths, config, task)
    report = exact_match.write_report(table, paths.report)
    print()
    print(exact_match.to_markdown(table))
    print("written: " + ", ".join(report.values()))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f", total {sum(seconds.values()):.0f}")
    sys.stdout.flush()
    return Result(paths.stage2, table, report, seconds)
