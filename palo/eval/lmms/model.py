"""``--model palo``: a PALO checkpoint in this process, batched through ``model_vqa``'s Answerer."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from palo.conversation import conv_templates
from palo.eval import model_vqa
from palo.eval.lmms.requests import cut_at_stops, loglikelihood_response, to_prompts, to_scorings
from palo.eval.lmms.scoring import continuation_start, score_continuation
from palo.mm_utils import preprocess_image, tokenizer_image_token
from palo.model.multimodal import spliced_length

# Log-likelihood requests scored by the engine at once (their images are held until then).
SCORE_BATCH = 256


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"palo: {name} must be an integer, not {value!r}") from None


class PaloLMM(lmms):
    """``--model palo --model_args pretrained=CKPT[,batch_size=8,conv_mode=vicuna_v1,...]``.

    Args:
        pretrained: The checkpoint folder (or hub id in the local cache).
        model_base: For LoRA / projector-only folders, as ``model_vqa --model-base``.
        conv_mode: The prompt template; by default the checkpoint's own (``vicuna_v1`` for PALO), as ``model_vqa``.
        device: ``cuda``, ``cuda:N`` or ``cpu`` (default: cuda when available).
        batch_size: Questions generated together: on the engine, that many in flight, each that ends making room
            for the next; with ``engine=hf``, batches of that many.
        image_preprocess: ``pad`` or ``crop``; default: as the checkpoint was trained (its config's
            ``image_aspect_ratio``: ``pad`` for PALO).
        engine: ``paged`` (the continuous-batching engine) or ``hf`` (``model.generate``; needed for beams).
        vision_tower: Override ``mm_vision_tower`` (a local CLIP folder).
        max_new_tokens: Used when a task does not set it.

    Raises:
        ValueError: On unknown or malformed arguments.
        palo.eval.model_vqa.ModelLoadError: If the checkpoint cannot be loaded.
    """

    def __init__(self, pretrained: str, model_base: str | None = None, conv_mode: str | None = None,
                 device: str | None = None, batch_size: Any = 1, image_preprocess: str | None = None,
                 engine: str = "paged", vision_tower: str | None = None, max_new_tokens: Any = 1024,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"palo: unknown model_args {', '.join(sorted(unknown))}")
        self.batch_size = _int(batch_size, "batch_size")
        self.default_max_new_tokens = _int(max_new_tokens, "max_new_tokens")
        if self.batch_size < 1:
            raise ValueError("palo: batch_size must be at least 1")
        # Checked before loading: an unknown template was a bare KeyError after it, and any preprocessing other than
        # "pad" ran as the centre crop (image_preprocess=Pad scored every image another way without a word).
        if conv_mode is not None and conv_mode not in conv_templates:
            raise ValueError(f"palo: conv_mode={conv_mode!r} is not a template ({', '.join(sorted(conv_templates))})")
        if image_preprocess is not None and image_preprocess not in ("pad", "crop"):
            raise ValueError(f"palo: image_preprocess={image_preprocess!r} must be 'pad' or 'crop'")
        generation = model_vqa.generation_kwargs(0.0, None, 1, self.default_max_new_tokens)
        self.answerer, self.model_name = model_vqa.load_answerer(
            str(pretrained), model_base, conv_mode, generation, image_preprocess, device, vision_tower, engine)

    def generate_until(self, requests: list[Any]) -> list[str]:
        prompts = to_prompts(requests, self.task_dict, self.default_max_new_tokens)
        if self.answerer.image_processor is None and any(p.images for p in prompts):
            raise ValueError("palo: this checkpoint takes text only but the task has images")
        groups: dict[str, list[int]] = defaultdict(list)  # one generation setting per batch
        for i, prompt in enumerate(prompts):
            groups[prompt.generation.key()].append(i)
        answers: list[str | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="palo answering", disable=self.rank != 0) as bar:
            for indices in groups.values():
                g = prompts[indices[0]].generation
                if g.num_beams > 1 and self.answerer.engine is not None:
                    raise ValueError(f"{prompts[indices[0]].where}: num_beams={g.num_beams} needs engine=hf")
                self.answerer.generation = model_vqa.generation_kwargs(g.temperature, g.top_p, g.num_beams,
                                                                       g.max_new_tokens)
                # batch_size questions in flight on the engine, each that ends making room for the next.
                stream = self.answerer.answer_images_in_order([prompts[i].text for i in indices],
                                                              [list(prompts[i].images) for i in indices],
                                                              self.batch_size)
                try:
                    for i, text in zip(indices, stream):
                        answers[i] = cut_at_stops(text, g.until)
                        bar.update(1)
                except model_vqa.QuestionTooLong as exc:
                    raise ValueError(f"{prompts[indices[exc.index]].where}: {exc}") from None
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        """``(loss, is_greedy)`` of each request's continuation after its context.

        The context is the prompt ``generate_until`` would send (template, open assistant turn, one ``<image>`` line
        per image first); the continuation follows it as the assistant's answer. With the paged engine (the
        default) the requests are scored together, ``SCORE_BATCH`` at a time, by the engine's prompt
        log-probabilities, and the options of one document compute their shared image and question once; with
        ``engine=hf``, one forward pass per request. Both give the same values.

        The first value is the mean negative log-likelihood per continuation token (the causal-LM loss), not the
        log-likelihood the method's name suggests: lmms-eval's multiple-choice scorer picks the option with the
        *smallest* value (``argmin``), as its own models return their loss. Returning a true log-likelihood would
        make it choose the least likely option.
        """
        a = self.answerer
        scorings = to_scorings(requests, self.task_dict)
        results = []
        pending: list[tuple[int, list[int], torch.Tensor | None, str]] = []  # (start, full ids, pixels, where)
        # The last document's pixels: its options come one after another and share them (one entry, so a large
        # benchmark does not keep every image in memory).
        last: tuple[str, torch.Tensor] | None = None
        with tqdm(total=len(scorings), desc="palo scoring", disable=self.rank != 0) as bar:
            for s in scorings:
                if s.images and a.image_processor is None:
                    raise ValueError(f"{s.where}: this checkpoint takes text only but the task has images")
                prompt = model_vqa.build_prompt(s.context, a.conv_mode, len(s.images), a.use_im_start_end)
                context_ids = tokenizer_image_token(prompt, a.tokenizer)
                full_ids = tokenizer_image_token(prompt + s.continuation, a.tokenizer)
                # Both engines alike, naming the document: model.generate's scoring ran past the positions and
                # returned a number; the engine refused the whole batch without saying which document.
                length = spliced_length(full_ids, int(getattr(a.model, "image_token_count", 0)))
                if length > a.context_len:
                    raise ValueError(f"{s.where}: the question and its option take {length} of the model's "
                                     f"{a.context_len} positions")
                images = None
                if s.images:
                    if last is None or last[0] != s.where:
                        last = (s.where, torch.stack([preprocess_image(i, a.image_processor, a.image_preprocess)
                                                      for i in s.images]))
                    images = last[1]
                try:
                    if a.engine is None:
                        score = score_continuation(a.model, context_ids, full_ids, images)
                        results.append(loglikelihood_response(score.mean_nll, score.is_greedy))
                        bar.update(1)
                        continue
                    pending.append((continuation_start(context_ids, full_ids), full_ids, images, s.where))
                except ValueError as exc:
                    raise ValueError(f"{s.where}: {exc}") from None
                if len(pending) == SCORE_BATCH:
                    results += self._score_with_engine(pending)
                    bar.update(len(pending))
                    pending = []
            if pending:
                results += self._score_with_engine(pending)
                bar.update(len(pending))
        return results

    def _score_with_engine(self, pending: list[tuple[int, list[int], torch.Tensor | None, str]]) -> list[Any]:
        """``(loss, is_greedy)`` of each ``(continuation start, full ids, pixels, where)`` from the engine's prompt
        log-probabilities (the most likely id alongside each, for ``is_greedy``)."""
        from palo.engine import EngineRequest, SamplingParams

        params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        outputs = self.answerer.engine.generate([EngineRequest(ids, images, params) for _, ids, images, _ in pending])
        results = []
        for (start, ids, _, where), out in zip(pending, outputs):
            if out.finish_reason == "error" or out.prompt_logprobs is None:
                raise RuntimeError(f"{where}: scoring failed: {out.error}")
            entries = out.prompt_logprobs[start:]
            total = sum(lp for lp, _ in entries)
            greedy = all(top and top[0][0] == token for token, (_, top) in zip(ids[start:], entries))
            results.append(loglikelihood_response(-total / len(entries), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("palo: multi-round generation is not supported")
