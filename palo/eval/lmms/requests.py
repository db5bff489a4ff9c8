"""lmms-eval requests unpacked, shared by both models: ``generate_until`` as (question text, images, generation
settings), ``loglikelihood`` as (context, continuation, images)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.image_io import viewed


@dataclass(frozen=True)
class Generation:
    """One request's generation settings, from the task's ``generation_kwargs``."""

    max_new_tokens: int
    temperature: float
    top_p: float | None
    num_beams: int
    until: tuple[str, ...]

    def key(self) -> str:
        return json.dumps([self.max_new_tokens, self.temperature, self.top_p, self.num_beams, self.until])


@dataclass(frozen=True)
class Prompt:
    """What the model is asked: the task's text and its RGB images (none, one, or several, in the task's order)."""

    text: str
    images: tuple[Any, ...]  # PIL.Image.Image
    generation: Generation
    where: str  # task/split/doc_id, for messages


def parse_generation(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> Generation:
    """The settings of a task's ``generation_kwargs`` (``until`` a string or list; greedy unless ``do_sample``).

    Raises:
        ValueError: If ``until`` is neither a string nor a list of strings.
    """
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation_kwargs 'until' must be a string or a list of strings, not {until!r}")
    sample = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
    return Generation(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        temperature=float(gen_kwargs.get("temperature") or 0) if sample else 0.0,
        top_p=gen_kwargs.get("top_p") if sample else None,
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        until=tuple(u for u in until if u),
    )


def _images(doc_to_visual: Any, doc: Any, where: str) -> tuple[Any, ...]:
    """The document's images as RGB, in order (PALO trained on one per question; several go in one prompt, each
    with its own placeholder, as the OpenAI-compatible API lays them out), read as every other path reads images
    (:func:`palo.image_io.viewed`): a plain ``convert("RGB")`` turned the transparent background of a chart or a
    diagram black, hiding its black lines and text.

    Raises:
        ValueError: If a visual is not an image (lmms-eval's video or audio tasks).
    """
    visuals = doc_to_visual(doc) if doc_to_visual is not None else []
    visuals = [v for v in (visuals or []) if v is not None]
    for v in visuals:
        if not hasattr(v, "convert"):
            raise ValueError(f"{where}: a visual of type {type(v).__name__}; PALO takes images only")
    return tuple(viewed(v) for v in visuals)


def _without_placeholders(context: str, images: tuple[Any, ...], where: str) -> str:
    """The task's text without the ``<image>`` markers some tasks write into it (MMMU's ``<image 1>`` made
    ``<image>``, MM-Vet's interleaved mode): PALO takes its images before the question, as it was trained, and both
    adapters put one placeholder per image there (a marker left in the text was a placeholder too many, and the
    API refuses it in message text).

    Raises:
        ValueError: If the text holds markers but not one per image.
    """
    markers = context.count(DEFAULT_IMAGE_TOKEN)
    if not markers:
        return context
    if markers != len(images):
        raise ValueError(f"{where}: the task's text places {markers} {DEFAULT_IMAGE_TOKEN} but gives {len(images)} "
                         "image(s)")
    return re.sub(rf"[ \t]*{re.escape(DEFAULT_IMAGE_TOKEN)}[ \t]*\n?", " ", context).strip()


def _with_delimiter(continuation: str) -> str:
    """The answer to score as it follows the open assistant turn (``ASSISTANT:``): after the space the template
    puts there. lmms-eval's ``loglikelihood`` tasks send their target without ``target_delimiter`` ("red"), its
    ``multiple_choice`` tasks with it (" red" by default); scored as given, "red" was glued to the colon
    (``ASSISTANT:red``), a text the model never saw, and the API adapter (which renders the answer as a message)
    gave another value."""
    return continuation if not continuation or continuation.startswith(" ") else " " + continuation


def to_prompts(requests: list[Any], task_dict: dict, default_max_new_tokens: int) -> list[Prompt]:
    """Unpack ``Instance.args`` = (context, generation_kwargs, doc_to_visual, doc_id, task, split).

    Raises:
        ValueError: If a visual is not an image.
    """
    prompts = []
    for request in requests:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        where = f"{task}/{split}/{doc_id}"
        images = _images(doc_to_visual, task_dict[task][split][doc_id], where)
        prompts.append(Prompt(_without_placeholders(str(context), images, where), images,
                              parse_generation(dict(gen_kwargs or {}), default_max_new_tokens), where))
    return prompts


@dataclass(frozen=True)
class Scoring:
    """One ``loglikelihood`` request: how likely is ``continuation`` as the answer to ``context``."""

    context: str
    continuation: str  # after the assistant tag: with a leading space (the task's delimiter, or one added)
    images: tuple[Any, ...]  # PIL.Image.Image
    where: str


def to_scorings(requests: list[Any], task_dict: dict) -> list[Scoring]:
    """Unpack ``Instance.args`` = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split).

    ``multiple_choice`` tasks send one request per option with the option as a string; ``loglikelihood`` tasks
    send ``doc_to_target``, a callable of the document.

    Raises:
        ValueError: If a visual is not an image, or the continuation is not text.
    """
    scorings = []
    for request in requests:
        context, target, doc_to_visual, doc_id, task, split = request.args
        where = f"{task}/{split}/{doc_id}"
        doc = task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        if isinstance(continuation, list) and len(continuation) == 1:
            continuation = continuation[0]
        if not isinstance(continuation, str):
            raise ValueError(f"{where}: the continuation to score must be text, not {type(continuation).__name__}")
        context = context[0] if isinstance(context, list) else context
        images = _images(doc_to_visual, doc, where)
        scorings.append(Scoring(_without_placeholders(str(context), images, where), _with_delimiter(continuation),
                                images, where))
    return scorings


def cut_at_stops(text: str, until: tuple[str, ...]) -> str:
    """The text before the first of the task's stop strings, stripped (as lmms-eval's own LLaVA model does)."""
    for stop in until:
        text = text.split(stop)[0]
    return text.strip()


def loglikelihood_response(loss: float, is_greedy: bool) -> Any:
    """One ``loglikelihood`` answer in the form the installed lmms-eval passes on to ``process_results`` intact.

    lmms-eval 0.7.3 runs every model output through ``unwrap_generation_output``, which turns anything that is
    not a string, a ``(str, meta)`` pair or a ``GenerationResult`` into ``str(output)``: a plain
    ``(float, bool)`` tuple would reach the multiple-choice scorer as the text ``"(-1.2, True)"``. A
    ``GenerationResult`` is unwrapped to its ``text`` field unchanged, so the pair travels inside one.
    """
    pair = (float(loss), bool(is_greedy))
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # versions before the wrapper pass the tuple through as it is
        return pair
    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)  # type: ignore[arg-type]  # see the docstring
