"""``--model palo``: a PALO checkpoint in this process, batched through ``model_vqa``'s Answerer."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from palo.eval import model_vqa
from palo.eval.lmms.requests import cut_at_stops, to_prompts


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
        conv_mode: The prompt template (PALO: ``vicuna_v1``).
        device: ``cuda``, ``cuda:N`` or ``cpu`` (default: cuda when available).
        batch_size: Questions generated together.
        image_preprocess: ``pad`` (as PALO was trained) or ``crop``.
        engine: ``paged`` (the continuous-batching engine) or ``hf`` (``model.generate``; needed for beams).
        vision_tower: Override ``mm_vision_tower`` (a local CLIP folder).
        max_new_tokens: Used when a task does not set it.

    Raises:
        ValueError: On unknown or malformed arguments.
        palo.eval.model_vqa.ModelLoadError: If the checkpoint cannot be loaded.
    """

    def __init__(self, pretrained: str, model_base: str | None = None, conv_mode: str = "vicuna_v1",
                 device: str | None = None, batch_size: Any = 1, image_preprocess: str = "pad",
                 engine: str = "paged", vision_tower: str | None = None, max_new_tokens: Any = 1024,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"palo: unknown model_args {', '.join(sorted(unknown))}")
        self.batch_size = _int(batch_size, "batch_size")
        self.default_max_new_tokens = _int(max_new_tokens, "max_new_tokens")
        if self.batch_size < 1:
            raise ValueError("palo: batch_size must be at least 1")
        generation = model_vqa.generation_kwargs(0.0, None, 1, self.default_max_new_tokens)
        self.answerer, self.model_name = model_vqa.load_answerer(
            str(pretrained), model_base, conv_mode, generation, image_preprocess, device, vision_tower, engine)

    def generate_until(self, requests: list[Any]) -> list[str]:
        prompts = to_prompts(requests, self.task_dict, self.default_max_new_tokens)
        if self.answerer.image_processor is None and any(p.image is not None for p in prompts):
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
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    texts = self.answerer.answer_images([prompts[i].text for i in batch],
                                                        [prompts[i].image for i in batch])
                    for i, text in zip(batch, texts):
                        answers[i] = cut_at_stops(text, g.until)
                    bar.update(len(batch))
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        task = requests[0].args[4] if requests and len(requests[0].args) > 4 else "?"
        raise NotImplementedError(f"palo: log-likelihood tasks are not supported ({task}); use generation tasks")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("palo: multi-round generation is not supported")
