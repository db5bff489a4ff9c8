"""Per-request sampling settings and the on-device sampler that applies them row by row in one batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# The original worker's rule: at or below this temperature decoding is greedy.
GREEDY_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens.

    Attributes:
        max_tokens: Most new tokens.
        temperature: 0 (or anything up to 1e-3) is greedy.
        top_p: Nucleus mass kept, in (0, 1].
        top_k: Most candidates kept; 0 keeps all.
        stop: Strings that end the answer (not included in it).
        seed: Seeds this request's own random stream, so its tokens do not depend on what it was batched with.
        ignore_eos: Keep going past end-of-sequence (benchmarks).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Choose one token per row, each row with its own settings, on the logits' device.

    Sampling uses the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``), so each row's
    randomness is one draw from its own generator and no row's choice depends on another's.

    Args:
        logits: ``[B, V]`` (float32 preferred).
        params: B settings.
        generators: B generators on the logits' device (None: the global stream).

    Returns:
        ``[B]`` token ids (long, on the logits' device).
    """
    greedy_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_ids
    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    sub = logits.index_select(0, rows).float()
    temperature = torch.tensor([params[i].temperature for i in sampled_rows], device=device)[:, None]
    probs = torch.softmax(sub / temperature, dim=-1)
    top_k = [params[i].top_k for i in sampled_rows]
    top_p = [params[i].top_p for i in sampled_rows]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[-1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)[:, None]
        rank = torch.arange(vocab, device=device)[None, :]
        # Keep a candidate while the mass before it is under top_p (the first is always kept).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep = (rank < k) & (before < torch.tensor(top_p, device=device)[:, None])
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    noise = torch.empty_like(probs)
    for j, i in enumerate(sampled_rows):
        noise[j].exponential_(generator=generators[i])
    choice = (probs / noise).argmax(dim=-1)
    return greedy_ids.index_copy(0, rows, choice)
