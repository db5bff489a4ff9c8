"""Greedy generation with its margins: when two answers may differ only by floating-point rounding.

Batching changes the shapes of the matrix products (padding, other rows, a different KV layout), so the logits a
request gets in a batch differ from those it gets alone in their last bits (about 1e-7 in float32 on CPU, more in
float16 / bfloat16). Greedy decoding then picks the same token unless the two best candidates are within that
rounding of each other: a near-tie. :func:`greedy_trace` records, for one request alone, each step's margin between
the best and the second-best logit; :func:`divergence_is_a_near_tie` says whether another answer to the same
request departs from it only at such a step. Tests use it to demand identical answers wherever the model is not at
a near-tie, instead of tolerating a share of differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# Margins below this (in logits) count as near-ties. Batched and lone float32 logits differ by ~3e-7 on the
# quickstart and test models; an actual error (another prompt, image or position) moves them by ~0.1-1.
NEAR_TIE = 1e-4


class _Margins(LogitsProcessor):
    def __init__(self) -> None:
        self.margins: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores[0].float().topk(2).values
        self.margins.append(float(top[0] - top[1]))
        return scores


@dataclass
class GreedyTrace:
    """One greedy answer: its new token ids and, per step, the margin between the two best logits."""

    tokens: list[int]
    margins: list[float]

    def min_margin(self) -> float:
        return min(self.margins, default=float("inf"))


def greedy_trace(model: Any, input_ids: torch.Tensor, images: torch.Tensor | None = None, **generate_kwargs: Any
                 ) -> GreedyTrace:
    """Generate greedily for one prompt ``[1, T]`` alone, recording each step's top-1 / top-2 margin."""
    recorder = _Margins()
    with torch.inference_mode():
        out = model.generate(input_ids, images=images, do_sample=False, num_beams=1,
                             logits_processor=LogitsProcessorList([recorder]), **generate_kwargs)
    return GreedyTrace(out[0, input_ids.shape[1]:].tolist(), recorder.margins)


def divergence_is_a_near_tie(trace: GreedyTrace, other_text: str, tokenizer: Any, tolerance: float = NEAR_TIE) -> bool:
    """Whether ``other_text`` (a stripped answer to the same request) departs from ``trace`` only at a near-tie.

    The first step whose decoded prefix is no longer a prefix of ``other_text`` is where the two answers part (steps
    ending in an incomplete character are skipped, so the parting may lie a few byte tokens earlier); it is a
    near-tie when some step since the last agreeing one had a margin below ``tolerance``. An answer that runs past
    ``trace``'s end parted at its last step (where ``trace`` stopped).
    """
    agreed = 0  # steps known to agree
    for k in range(1, len(trace.tokens) + 1):
        prefix = tokenizer.decode(trace.tokens[:k], skip_special_tokens=True).lstrip()
        if prefix.endswith("\ufffd"):
            continue
        if not other_text.startswith(prefix):
            return min(trace.margins[agreed:k], default=float("inf")) < tolerance
        agreed = k
    full = tokenizer.decode(trace.tokens, skip_special_tokens=True).strip()
    if full == other_text:
        return True  # no divergence at all
    # Every step agreed but the answers differ: they parted where this trace stopped (its last step) or after it.
    return min(trace.margins[max(agreed - 1, 0):], default=float("inf")) < tolerance
