"""Answer LLaVA-Bench-style questions with a PALO checkpoint (``python -m palo.eval.model_vqa``).

The flags are those of PALO's ``model_vqa.py`` (docs/formats.md §5.4), plus:

* ``--batch-size``: questions generated together. On the engine (the default) it is a window: that many questions
  are in flight, and each one that ends makes room for the next (continuous batching; answers are still written in
  question order); with ``--engine hf`` or beam search, batches of ``model.generate`` with left padding. Greedy
  output is the same as one question at a time.
* ``--max-new-tokens`` (1024, the original's fixed value) and ``--device``.
* ``--image-preprocess``: by default as the checkpoint was trained, from its config's ``image_aspect_ratio`` (``pad``
  for PALO's releases: padded to a square; anything else: the CLIP processor's centre crop, as
  :func:`palo.mm_utils.process_images` does); ``pad`` or ``crop`` overrides it, ``crop`` being what the original
  script did whatever the config (docs/compat.md#evaluation).
* ``--skip-bad``: skip (and report) questions with a malformed line or a missing / unreadable image instead of
  stopping with an error that names the file and line.

``--conv-mode`` defaults to the template the checkpoint was trained with, decided by its config
(:func:`palo.conversation.conv_mode_for_checkpoint`: ``vicuna_v1`` for PALO, as ``llavabench.sh`` passes it), the
same default as ``run_bench`` and the chat CLI; LLaVA-1.5 checkpoints still get the original script's ``llava_v1``.
A template passed explicitly is used as given.

Runs are resumable: questions already answered in ``--answers-file`` are skipped and new answers are appended,
one flushed line each, so a killed run loses nothing it wrote and never writes an answer twice. Every output line
is an answer record (docs/formats.md §5.3): ``question_id, prompt, text, answer_id, model_id, metadata``; this
project's ``metadata`` holds ``settings``: the template, image preprocessing and generation settings it was made with.

An answer is kept on resume only if this run would give it (:class:`AnswerRun`): the same ``model_id``, the same
question text (``prompt``) and the same settings (answers that record none, like the original's, are compared by
model and question). Otherwise the run stops before loading the model, with one line naming the file and what
differs: reusing an output name with another checkpoint, other settings or an edited question file would
otherwise mix two runs in one file without a word. ``--overwrite`` removes those answers and answers their
questions again; answers this run would give are still kept, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import shortuuid
import torch
from tqdm import tqdm

from palo.conversation import conv_mode_for_checkpoint, conv_templates, stop_string
from palo.eval.jsonl import JsonlAppender, JsonlError, iter_jsonl, repair_tail
from palo.jsonl import Record, same_file, scan_jsonl, unique_records
from palo.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    get_model_name_from_path,
    left_pad,
    load_image,
    tokenizer_image_token,
)
from palo.mm_utils import preprocess_image as mm_preprocess_image
from palo.model.builder import add_dtype_argument
from palo.model.config import MultimodalSpec, image_placeholder
from palo.model.multimodal import no_room_for_answer


@dataclass(frozen=True)
class Question:
    """One bench question and where it was read (``file:line``) for error messages."""

    question_id: Any
    text: str
    image: str | None
    where: str


def load_questions(path: str, skip_bad: bool = False) -> list[Question]:
    """Read a question file (docs/formats.md §5.3: ``question_id``, ``text``, optional ``image``).

    Raises:
        JsonlError: On a malformed line or a duplicate question_id (unless ``skip_bad``, which reports and skips).
    """
    def problem(record: Record) -> str | None:
        qid, text, image = record.data["question_id"], record.data["text"], record.data.get("image")
        if not isinstance(text, str):
            return f"question {qid!r}: 'text' must be a string, got {text!r:.60}"
        if image is not None and not isinstance(image, str):
            return f"question {qid!r}: 'image' must be a file name, got {image!r:.60}"
        return None

    records = iter_jsonl(path, skip_bad=skip_bad, required=("question_id", "text"))
    return [Question(r.data["question_id"], r.data["text"], r.data.get("image") or None, r.where)
            for r in unique_records(records, "question_id", skip_bad, check=problem)]


def split_list(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` in consecutive slices of size ceil(len / n) (the original's helper; :func:`get_chunk` picks one)."""
    size = max(1, math.ceil(len(items) / n))
    return [items[i:i + size] for i in range(0, len(items), size)]


def get_chunk(items: list[Any], num_chunks: int, chunk_idx: int) -> list[Any]:
    """The ``chunk_idx``-th of ``num_chunks`` consecutive slices of size ceil(n / num_chunks), as the original."""
    if num_chunks < 1:
        raise ValueError(f"--num-chunks must be at least 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is outside 0..{num_chunks - 1}")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size:(chunk_idx + 1) * size]


def answer_settings(conv_mode: str | None, image_preprocess: str | None, generation: dict[str, Any]) -> dict[str, Any]:
    """What an answer depends on besides the checkpoint and the question (stored as ``metadata.settings``)."""
    return {"conv_mode": conv_mode, "image_preprocess": image_preprocess,
            **{key: generation.get(key) for key in ("temperature", "top_p", "num_beams", "max_new_tokens")}}


def model_id_of(model_path: str) -> str:
    """The ``model_id`` answers of a checkpoint carry: its folder name (``<parent>_checkpoint-N`` for a step)."""
    return get_model_name_from_path(os.path.expanduser(model_path))


# Settings whose default (None) the checkpoint's config decides once it loads: not compared before that.
CHECKPOINT_DECIDES = ("conv_mode", "image_preprocess")


def image_preprocess_for(config: Any) -> str:
    """How a checkpoint's images were preprocessed in training, from its config alone: ``pad`` when it says
    ``image_aspect_ratio: pad`` (PALO's releases), else ``crop`` (the rule of :func:`palo.mm_utils.process_images`)."""
    return "pad" if getattr(config, "image_aspect_ratio", None) == "pad" else "crop"


def checkpoint_image_preprocess(model_path: str) -> str | None:
    """:func:`image_preprocess_for` the checkpoint's ``config.json``, read before the model loads, so that answers a
    run resumes are compared with the rule it will use (answers made with ``crop`` were resumed by a run padding its
    images, one file of two kinds); None when the config cannot be read here (loading then says why).
    """
    from transformers import PretrainedConfig

    from palo.model.builder import CheckpointError, resolve_checkpoint_dir

    try:
        values, _ = PretrainedConfig.get_config_dict(resolve_checkpoint_dir(os.path.expanduser(model_path)))
    except (CheckpointError, OSError, ValueError):
        return None
    return "pad" if values.get("image_aspect_ratio") == "pad" else "crop"


@dataclass(frozen=True)
class AnswerRun:
    """Who answers and how, known before the model loads: what an answer must match to be kept on resume.

    Attributes:
        model_id: The checkpoint's :func:`model_id_of`.
        settings: :func:`answer_settings`. A ``conv_mode`` or ``image_preprocess`` of None (the checkpoint's own
            template or preprocessing, not known before it loads) is not compared: the checkpoint, through
            ``model_id``, decides it.
    """

    model_id: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, model_path: str, conv_mode: str | None, image_preprocess: str | None,
           generation: dict[str, Any]) -> AnswerRun:
        return cls(model_id_of(model_path), answer_settings(conv_mode, image_preprocess, generation))

    def difference(self, answer: dict[str, Any], question: Question) -> str | None:
        """Why this run would not give ``answer`` (an answer record) to ``question``, or None.

        A field the record lacks is no difference: the original wrote no settings.
        """
        model_id = answer.get("model_id", self.model_id)
        if model_id != self.model_id:
            return f"model_id {model_id!r}, this run {self.model_id!r}"
        prompt = answer.get("prompt", question.text)
        if prompt != question.text:
            return f"question {question.question_id!r} was {prompt!r:.50}, now {question.text!r:.50}"
        metadata = answer.get("metadata")
        settings = metadata.get("settings") if isinstance(metadata, dict) else None
        for key, value in self.settings.items() if isinstance(settings, dict) else ():
            if key in settings and settings[key] != value and not (value is None and key in CHECKPOINT_DECIDES):
                return f"{key} {settings[key]!r}, this run {value!r}"
        return None


class StaleAnswers(ValueError):
    """An answers file holds answers this run would not give (another model, other settings, another question)."""


def kept_answers(answers_file: str, questions: Sequence[Question] = (), run: AnswerRun | None = None,
                 out: JsonlAppender | None = None, overwrite: bool = False) -> set[str]:
    """question_ids (as strings, so ``1`` and ``"1"`` agree) answered in ``answers_file`` that a run keeps.

    A torn tail is cut first. A damaged line (not JSON, no ``question_id``) is reported and its question counts as
    unanswered. With ``out``, the run's own locked appender to ``answers_file``, such lines are also removed from
    the file, so that it holds only whole answers for the review that reads it next (the question is answered
    again). With ``run``, an answer to one of ``questions`` that ``run`` would not give (:meth:`AnswerRun.difference`)
    stops the run, or with ``overwrite`` (and ``out``) is removed and its question answered again.

    Raises:
        StaleAnswers: On answers ``run`` would not give that may not be removed; its message (one line) names the
            file, how many, what differs and what to do. The file is left as it was.
    """
    if not os.path.isfile(answers_file):
        return set()
    repair_tail(answers_file)
    records, bad = scan_jsonl(answers_file, required=("question_id",))
    by_id = {str(q.question_id): q for q in questions}
    stale = {}
    for record in records if run is not None else ():
        question = by_id.get(str(record.data["question_id"]))
        why = run.difference(record.data, question) if question is not None else None
        if why is not None:
            stale[record.line] = why
    if stale:
        reasons = list(dict.fromkeys(stale.values()))  # distinct, first seen first
        what = "; ".join(reasons[:2]) + (f"; and {len(reasons) - 2} more" if len(reasons) > 2 else "")
        if not (overwrite and out is not None):
            raise StaleAnswers(f"{answers_file} holds {len(stale)} answer(s) this run would not give ({what}): write "
                               "to another answers file, or pass --overwrite to answer those questions again")
        print(f"[overwrite] {answers_file}: {len(stale)} answer(s) removed ({what}); answering them again",
              file=sys.stderr)
    for number, problem in bad:
        fate = "removed, its question is answered again" if out is not None else "skipped"
        print(f"[skip] {answers_file}:{number}: {problem} ({fate})", file=sys.stderr)
    drop = set(stale) | ({number for number, _ in bad} if out is not None else set())
    if drop:
        out.drop_lines(drop)
    return {str(r.data["question_id"]) for r in records if r.line not in drop}


def answered_ids(answers_file: str, out: JsonlAppender | None = None) -> set[str]:
    """question_ids answered in an answers file, whoever answered them (:func:`kept_answers` without a run)."""
    return kept_answers(answers_file, out=out)


def check_answers_files(question_file: str, answers_files: list[str], run: AnswerRun, overwrite: bool) -> None:
    """:func:`kept_answers` on files other processes will resume (a sharded run's merged and shard files), before
    they start: one refusal for the task instead of one per shard, and with ``overwrite`` the answers another run
    made removed once.

    Raises:
        StaleAnswers: As :func:`kept_answers`.
        JsonlError: If the question file is malformed, or another process is writing one of the files.
    """
    questions = load_questions(question_file)
    for path in answers_files:
        if os.path.isfile(path):
            with JsonlAppender(path) as out:
                kept_answers(path, questions, run, out, overwrite)


def build_prompt(question: str, conv_mode: str, with_image: bool | int, use_im_start_end: bool) -> str:
    """The model prompt: ``<image>\\n`` + question in the template, with an open assistant turn (docs/formats.md §5.4).

    The placeholder is :func:`palo.model.config.image_placeholder` (``<im_start><image><im_end>`` with
    ``use_im_start_end``). ``with_image`` may also be a count: several images each get a ``<image>\\n`` line, in
    order, before the question (the layout of the OpenAI-compatible API's image parts).
    """
    text = (image_placeholder(use_im_start_end) + "\n") * int(with_image) + question
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def preprocess_image(path: str, image_processor: Any, mode: str) -> torch.Tensor:
    """Pixel values ``[3, H, W]`` for one image file.

    Args:
        path: The image file.
        image_processor: The CLIP processor.
        mode: ``pad`` (square with the CLIP-mean colour, as in training) or ``crop`` (processor only: shortest side
            resized, then centre-cropped, as the original benchmark script).

    Raises:
        ImageLoadError: If the file is missing or unreadable.
    """
    return mm_preprocess_image(load_image(path), image_processor, mode)


def clean_answer(text: str, stop: str | None) -> str:
    """Strip, drop a trailing stop string, strip again (the original's clean-up)."""
    text = text.strip()
    if stop and text.endswith(stop):
        text = text[: -len(stop)].strip()
    return text


class QuestionTooLong(ValueError):
    """A question's prompt (its images spliced in) leaves no room for an answer in the model's context.

    Args:
        index: The question's place in the batch.
        message: What is wrong.
    """

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class Answerer:
    """Generates answers for batches of prompts with one loaded model.

    Args:
        tokenizer: The checkpoint's tokenizer.
        model: A PALO model.
        image_processor: Its CLIP processor.
        conv_mode: A key of ``conv_templates``.
        generation: ``generate`` keyword arguments (sampling, beams, max_new_tokens).
        image_preprocess: ``pad`` or ``crop``; None: as the checkpoint was trained (:func:`image_preprocess_for`).
        engine: ``paged`` (the continuous-batching engine, :mod:`palo.engine`) or ``hf`` (``model.generate``);
            beam search always runs through ``model.generate``.
    """

    def __init__(self, tokenizer: Any, model: Any, image_processor: Any, conv_mode: str, generation: dict[str, Any],
                 image_preprocess: str | None = None, engine: str = "paged") -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.generation = generation
        self.image_preprocess = image_preprocess or image_preprocess_for(model.config)
        self.stop = stop_string(conv_templates[conv_mode])
        self.use_im_start_end = MultimodalSpec.from_config(model.config).use_im_start_end
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.unk_token_id or 0)
        from palo.engine.llm_engine import DEFAULT_MAX_MODEL_LEN

        self.context_len = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        if engine not in ("paged", "hf"):
            raise ValueError(f"engine must be 'paged' or 'hf', not {engine!r}")
        self.engine = None
        if engine == "paged" and generation.get("num_beams", 1) == 1:
            from palo.engine import LLMEngine

            self.engine = LLMEngine(model, tokenizer)

    @property
    def settings(self) -> dict[str, Any]:
        """:func:`answer_settings` of this answerer, written into every answer's metadata."""
        return answer_settings(self.conv_mode, self.image_preprocess, self.generation)

    def answer(self, questions: list[Question], image_folder: str) -> list[str]:
        """Answers for a batch, in order.

        Raises:
            ImageLoadError: If an image is missing or unreadable (the message names the question line).
            QuestionTooLong: If a prompt leaves no room for an answer (the message names the question line).
        """
        images = []
        for q in questions:
            try:
                images.append(load_image(os.path.join(image_folder, q.image)) if q.image is not None else None)
            except ImageLoadError as exc:
                raise ImageLoadError(f"{q.where}: question {q.question_id!r}: {exc}") from exc
        try:
            return self.answer_images([q.text for q in questions], images)
        except QuestionTooLong as exc:
            q = questions[exc.index]
            raise QuestionTooLong(exc.index, f"{q.where}: question {q.question_id!r}: {exc}") from exc

    def answer_in_order(self, questions: list[Question], image_folder: str,
                        window: int) -> Iterator[tuple[Question, str | Exception]]:
        """Answers as a stream, in question order, with up to ``window`` questions in flight on the engine.

        A question that ends frees its place for the next one at once (continuous batching), instead of waiting for
        the longest answer of a fixed batch. Each question's image is read when it is submitted, so memory holds
        ``window`` of them at most. Without the engine (``--engine hf``, beam search), batches of ``window``.

        Yields:
            ``(question, answer)``, or ``(question, error)`` for one whose image cannot be read
            (:class:`ImageLoadError`) or whose prompt leaves no room (:class:`QuestionTooLong`); the error names the
            question line, and comes after every earlier question's answer.
        """
        if self.engine is None:
            for start in range(0, len(questions), window):
                batch = questions[start:start + window]
                try:
                    yield from zip(batch, self.answer(batch, image_folder))
                except (ImageLoadError, QuestionTooLong):  # then question by question, to name the bad one
                    for q in batch:
                        try:
                            yield q, self.answer([q], image_folder)[0]
                        except (ImageLoadError, QuestionTooLong) as exc:
                            yield q, exc
            return
        for index, result in self._in_order(len(questions), lambda i: self._engine_request(questions[i], image_folder),
                                            window):
            yield questions[index], result

    def answer_images_in_order(self, texts: list[str], images: list[Any], window: int) -> Iterator[str]:
        """:meth:`answer_images` as a stream with up to ``window`` questions in flight on the engine, each that ends
        making room for the next (lmms-eval's path); without the engine, batches of ``window``.

        Raises:
            QuestionTooLong: With the question's index, after the answers of the questions before it.
        """
        if self.engine is None:
            for start in range(0, len(texts), window):
                end = start + window
                try:
                    answers = self.answer_images(texts[start:end], images[start:end])
                except QuestionTooLong as exc:  # the questions before it are answered first, as on the engine
                    if exc.index:
                        yield from self.answer_images(texts[start:start + exc.index], images[start:start + exc.index])
                    raise QuestionTooLong(start + exc.index, str(exc)) from None
                yield from answers
            return

        def request_for(index: int) -> Any:
            try:
                return self._request(texts[index], images[index])
            except QuestionTooLong as exc:
                raise QuestionTooLong(index, str(exc)) from None

        for _, result in self._in_order(len(texts), request_for, window):
            if isinstance(result, Exception):
                raise result
            yield result

    def _in_order(self, count: int, request_for: Callable[[int], Any],
                  window: int) -> Iterator[tuple[int, str | Exception]]:
        """Run ``count`` engine requests, ``window`` in flight, and yield ``(index, answer)`` in index order.

        ``request_for(i)`` builds request ``i`` when it is its turn to be submitted; an :class:`ImageLoadError` or
        :class:`QuestionTooLong` it raises is yielded in that request's place. The engine is stepped in this thread.
        """
        results: dict[int, str | Exception] = {}  # by index, until every earlier one is out
        submitted = emitted = 0
        in_flight = 0

        def finished(index: int) -> Callable[[Any], None]:
            def on_output(output: Any) -> None:
                nonlocal in_flight
                if output.finished:
                    in_flight -= 1
                    results[index] = (RuntimeError(f"generation failed: {output.error}") if output.error
                                      else clean_answer(output.text, self.stop))
            return on_output

        while emitted < count:
            while submitted < count and in_flight < window:
                try:
                    request = request_for(submitted)
                except (ImageLoadError, QuestionTooLong) as exc:
                    results[submitted] = exc
                else:
                    request.on_output = finished(submitted)
                    self.engine.add_request(request)
                    in_flight += 1
                submitted += 1
            while emitted in results:
                result = results.pop(emitted)
                if isinstance(result, RuntimeError):
                    raise result
                yield emitted, result
                emitted += 1
            if emitted < count and emitted not in results:
                self.engine.step()

    def _engine_request(self, q: Question, image_folder: str) -> Any:
        """One question as an engine request (its image read now).

        Raises:
            ImageLoadError, QuestionTooLong: Naming the question line.
        """
        try:
            image = load_image(os.path.join(image_folder, q.image)) if q.image is not None else None
        except ImageLoadError as exc:
            raise ImageLoadError(f"{q.where}: question {q.question_id!r}: {exc}") from exc
        try:
            return self._request(q.text, image)
        except QuestionTooLong as exc:
            raise QuestionTooLong(0, f"{q.where}: question {q.question_id!r}: {exc}") from exc

    def _request(self, text: str, image: Any) -> Any:
        """A question as an engine request with this run's sampling settings.

        Raises:
            QuestionTooLong: When the prompt leaves no room for an answer.
        """
        from palo.engine import EngineRequest

        row, count, pixels = self._prompt(text, image)
        return EngineRequest(row.tolist(), torch.stack(pixels) if count else None, self._sampling())

    def _prompt(self, text: str, image: Any) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
        """A question's prompt ids, its image count and their pixels.

        Raises:
            QuestionTooLong: When the prompt leaves no room for an answer.
        """
        own = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        pixels = [mm_preprocess_image(i, self.image_processor, self.image_preprocess) for i in own]
        prompt = build_prompt(text, self.conv_mode, len(own), self.use_im_start_end)
        row = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")
        # Both paths refuse it alike: the engine has no room to place it, generate would run past the context.
        problem = no_room_for_answer(row, int(getattr(self.model, "image_token_count", 0)), self.context_len)
        if problem:
            raise QuestionTooLong(0, problem)
        return row, len(own), pixels

    def answer_images(self, texts: list[str], images: list[Any]) -> list[str]:
        """Answers for questions given as text and an RGB PIL image, a list of them, or None, in order (lmms-eval's
        path)."""
        if self.engine is not None:  # all in flight at once
            return list(self.answer_images_in_order(texts, images, max(1, len(texts))))
        rows, pixels, with_image = [], [], []
        for index, (text, image) in enumerate(zip(texts, images, strict=True)):
            try:
                row, count, own = self._prompt(text, image)
            except QuestionTooLong as exc:
                raise QuestionTooLong(index, str(exc)) from None
            rows.append(row)
            with_image.append(count)
            pixels.extend(own)
        ids, mask = left_pad(rows, self.pad_id)
        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        images = torch.stack(pixels).to(device, dtype=self.model.dtype) if pixels else None
        # Each row stops on its own (per-row flags), so batching does not change any row's text.
        criteria = [KeywordsStoppingCriteria([self.stop], self.tokenizer, ids)] if self.stop else None
        with torch.inference_mode():
            out = self.model.generate(
                ids, images=images, attention_mask=mask, stopping_criteria=criteria,
                pad_token_id=self.pad_id, use_cache=True, **self.generation,
            )
        new = out[:, ids.shape[1]:]
        return [clean_answer(self.tokenizer.decode(row, skip_special_tokens=True), self.stop) for row in new]


    def _sampling(self) -> Any:
        """The engine's settings for this run's ``generate`` keyword arguments."""
        from palo.engine import SamplingParams

        generation = self.generation
        return SamplingParams(
            max_tokens=generation["max_new_tokens"],
            temperature=(generation.get("temperature") or 0.0) if generation.get("do_sample") else 0.0,
            top_p=generation.get("top_p") or 1.0,
            stop=(self.stop,) if self.stop else (),
        )

def generation_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` arguments of the original: sampling only when temperature > 0.

    Raises:
        ValueError: For settings no generation takes (checked before a model is loaded), naming the flag.
    """
    if not temperature >= 0:  # NaN too
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise ValueError(f"--num_beams must be at least 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sample = temperature > 0
    return dict(
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )


def check_images(questions: list[Question], image_folder: str, skip_bad: bool) -> list[Question]:
    """Fail (or skip and report) before loading the model if an image file is missing, not an hour into the run.

    Raises:
        ImageLoadError: On the first missing image, naming the question file and line (unless ``skip_bad``).
    """
    kept = []
    for q in questions:
        if q.image is not None and not os.path.isfile(os.path.join(image_folder, q.image)):
            message = f"{q.where}: question {q.question_id!r}: no such image {os.path.join(image_folder, q.image)}"
            if not skip_bad:
                raise ImageLoadError(message)
            print(f"[skip] {message}", file=sys.stderr)
            continue
        kept.append(q)
    return kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--conv-mode", type=str, default=None, choices=sorted(conv_templates),
                        help="prompt template (default: the checkpoint's, from its config: vicuna_v1 for PALO)")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="questions in flight together (continuous batching on the engine; batches with left "
                             "padding for --engine hf and beam search)")
    parser.add_argument("--device", type=str, default=None, help="cuda, cuda:N, cpu (default: cuda when available)")
    add_dtype_argument(parser)
    parser.add_argument("--image-preprocess", choices=("pad", "crop"), default=None,
                        help="default: as the checkpoint was trained (its config's image_aspect_ratio: pad for "
                             "PALO); pad: square padding; crop: the CLIP processor's centre crop (the original "
                             "script's, whatever the config)")
    parser.add_argument("--vision-tower", type=str, default=None, help="override mm_vision_tower (a local CLIP folder)")
    parser.add_argument("--engine", choices=("paged", "hf"), default="paged",
                        help="paged: continuous batching over a paged KV cache (default); hf: model.generate "
                             "(beam search always uses it)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip and report malformed lines and missing/unreadable images instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="answer again the questions whose answers in --answers-file another checkpoint, other "
                             "settings or another question text made (default: stop with an error); answers this "
                             "run would give are kept, so a rerun still resumes")
    return parser


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded (the message says why)."""


def load_answerer(model_path: str, model_base: str | None, conv_mode: str | None, generation: dict[str, Any],
                  image_preprocess: str | None = None, device: str | None = None,
                  vision_tower: str | None = None, engine: str = "paged",
                  dtype: str | None = None) -> tuple[Answerer, str]:
    """Load a checkpoint and wrap it in an :class:`Answerer`.

    Args:
        model_path: The checkpoint folder.
        model_base: The base LLM of a LoRA or projector-only checkpoint, or None.
        conv_mode: A key of ``conv_templates``, used as given; None: the checkpoint's own template
            (:func:`palo.conversation.conv_mode_for_checkpoint`, ``vicuna_v1`` for PALO).
        generation: ``generate`` keyword arguments (:func:`generation_kwargs`).
        image_preprocess: ``pad`` or ``crop``; None: as the checkpoint was trained (:func:`image_preprocess_for`).
        device: Where to load the model (default: cuda when available).
        vision_tower: A local CLIP folder replacing ``mm_vision_tower``, or None.
        engine: ``paged`` or ``hf`` (see :class:`Answerer`).
        dtype: ``--dtype``: ``float16``, ``bfloat16``, ``float32``; None or ``auto``: float16 on CUDA, else float32.

    Returns:
        The answerer and the model id written into answers (the checkpoint's folder name).

    Raises:
        ModelLoadError: If the checkpoint cannot be loaded or takes no images.
    """
    from palo.model.builder import CheckpointError, load_pretrained_model
    from palo.model.vision_tower import VisionTowerError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_name = model_id_of(model_path)
    model_path = os.path.expanduser(model_path)
    try:
        tokenizer, model, image_processor, _ = load_pretrained_model(
            model_path, model_base, model_name, device=device, vision_tower=vision_tower, dtype=dtype
        )
    except (CheckpointError, VisionTowerError, OSError, ValueError) as exc:  # ValueError: a config value it cannot take
        raise ModelLoadError(str(exc)) from exc
    conv_mode = conv_mode or conv_mode_for_checkpoint(model.config)
    return Answerer(tokenizer, model, image_processor, conv_mode, generation, image_preprocess, engine), model_name


def answer_file(get_answerer: Callable[[], tuple[Answerer, str]], question_file: str, image_folder: str,
                answers_file: str, batch_size: int = 1, num_chunks: int = 1, chunk_idx: int = 0,
                skip_bad: bool = False, done_files: tuple[str, ...] = (), run: AnswerRun | None = None,
                overwrite: bool = False) -> int:
    """Answer the pending questions of one question file, appending to ``answers_file``.

    Args:
        get_answerer: Returns the answerer and model id; called only when something is left to answer, so a
            finished run costs no model load (callers answering several files pass a cached loader).
        question_file: Questions jsonl.
        image_folder: Folder the ``image`` fields are relative to.
        answers_file: Output; questions already answered in it are skipped (see ``run``).
        batch_size: Questions generated together.
        num_chunks: Split the questions into this many slices ...
        chunk_idx: ... and answer this one.
        skip_bad: Skip and report bad lines and images instead of stopping.
        done_files: Other answers files whose questions count as answered (a shard skips what the merged file has).
        run: The model and settings, known before loading: an answer in ``answers_file`` or ``done_files`` this run
            would not give stops it (see :func:`kept_answers`). None: every answer is kept (resume by question_id).
        overwrite: Remove such answers from ``answers_file`` and answer their questions again instead.

    Returns:
        0 on success, 2 on bad input, answers another run made or an answers file that cannot be written (a full
        disk: the answers written before stay, for a rerun to resume from; reported on stderr).

    Raises:
        ModelLoadError: From ``get_answerer``.
    """
    if batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if same_file(answers_file, question_file):
        print(f"error: the answers file {answers_file} is the question file", file=sys.stderr)
        return 2
    try:
        questions = get_chunk(load_questions(question_file, skip_bad), num_chunks, chunk_idx)
    except (JsonlError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # Opened (and locked: one run per answers file) before reading what it holds, so that two runs cannot both
        # take the same questions as still to do.
        out = JsonlAppender(answers_file)
    except (JsonlError, OSError) as exc:
        print(f"error: cannot write the answers file: {exc}", file=sys.stderr)
        return 2
    with out:
        return _answer_pending(get_answerer, questions, image_folder, answers_file, out, batch_size, skip_bad,
                               done_files, run, overwrite)


def _answer_pending(get_answerer: Callable[[], tuple[Answerer, str]], questions: list[Question], image_folder: str,
                    answers_file: str, out: JsonlAppender, batch_size: int, skip_bad: bool,
                    done_files: tuple[str, ...], run: AnswerRun | None, overwrite: bool) -> int:
    """:func:`answer_file` once its questions are read and its output is open."""
    try:
        done = kept_answers(answers_file, questions, run, out, overwrite).union(
            *(kept_answers(f, questions, run) for f in done_files))
        todo = [q for q in questions if str(q.question_id) not in done]
        pending = check_images(todo, image_folder, skip_bad)
    except (JsonlError, ImageLoadError, ValueError) as exc:  # StaleAnswers included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(todo) < len(questions):
        print(f"[resume] {len(questions) - len(todo)} of {len(questions)} questions already answered in "
              f"{answers_file}", file=sys.stderr)
    if not pending:
        print(f"nothing to do: all {len(questions)} questions are answered in {answers_file}", file=sys.stderr)
        return 0

    answerer, model_name = get_answerer()
    if answerer.image_processor is None and any(q.image for q in pending):
        print("error: this checkpoint takes text only but the questions have images", file=sys.stderr)
        return 2
    skipped = written = 0
    failed: OSError | None = None
    with tqdm(total=len(pending), desc="answering", file=sys.stderr) as bar:
        for q, text in answerer.answer_in_order(pending, image_folder, batch_size):
            bar.update(1)
            if isinstance(text, Exception):
                if not skip_bad:
                    print(f"error: {text}", file=sys.stderr)
                    return 2
                print(f"[skip] {text}", file=sys.stderr)
                skipped += 1
                continue
            try:
                out.write({
                    "question_id": q.question_id,
                    "prompt": q.text,
                    "text": text,
                    "answer_id": shortuuid.uuid(),
                    "model_id": model_name,
                    "metadata": {"settings": answerer.settings},
                })
            except OSError as exc:  # a full disk, a quota: a traceback said neither which file nor that answers stay
                failed = exc
                break
            written += 1
    if failed is not None:  # once the bar is closed, so that the line is not appended to it
        print(f"error: cannot write the answers file {answers_file}: {failed.strerror or failed}; the {written} "
              "answer(s) this run wrote are kept, rerun with room to answer the rest", file=sys.stderr)
        return 2
    if skipped:
        print(f"[skip] {skipped} question(s) skipped (unreadable images or prompts too long)", file=sys.stderr)
    return 0


def _answer(args: argparse.Namespace, generation: dict[str, Any]) -> int:
    def loader() -> tuple[Answerer, str]:
        return load_answerer(args.model_path, args.model_base, args.conv_mode, generation, args.image_preprocess,
                             args.device, args.vision_tower, args.engine, args.dtype)

    image_preprocess = args.image_preprocess or checkpoint_image_preprocess(args.model_path)
    run = AnswerRun.of(args.model_path, args.conv_mode, image_preprocess, generation)
    return answer_file(loader, args.question_file, args.image_folder, args.answers_file, args.batch_size,
                       args.num_chunks, args.chunk_idx, args.skip_bad, run=run, overwrite=args.overwrite)


def eval_model(args: Any) -> int:
    """The original's entry point: answer ``args.question_file`` into ``args.answers_file``, as the command does.

    Args:
        args: The parsed arguments of the original's parser (``model_path``, ``question_file``, ``answers_file``,
            ``image_folder``, ``conv_mode``, ``num_chunks``, ``chunk_idx``, ``temperature``, ``top_p``,
            ``num_beams`` ...), or any object with such attributes; those it lacks take this command's defaults.

    Returns:
        0 when every question has its answer, 1 otherwise (each reason printed).

    Raises:
        ValueError: For generation settings that cannot be used.
        ModelLoadError: When the checkpoint does not load.
    """
    settings = argparse.Namespace(**{**vars(build_parser().parse_args([])), **vars(args)})
    generation = generation_kwargs(settings.temperature, settings.top_p, settings.num_beams, settings.max_new_tokens)
    return _answer(settings, generation)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        generation = generation_kwargs(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _answer(args, generation)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
