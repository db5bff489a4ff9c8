"""Per-request sampling settings and the on-device sampler that applies them row by row in one batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from palo.constants import MAX_LOGIT_BIAS
from palo.engine.structured import StructuredOutput

# The original worker's rule: at or below this temperature decoding is greedy.
GREEDY_TEMPERATURE = 1e-3
# Most alternatives a request may ask log-probabilities for (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20

# A chosen token's log-probability and the ``k`` most likely ``(token id, log-probability)`` of its step.
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens.

    Attributes:
        max_tokens: Most new tokens.
        temperature: 0 (or anything up to 1e-3) is greedy.
        top_p: Nucleus mass kept, in (0, 1].
        top_k: Most candidates kept; 0 keeps all.
        min_p: Candidates less likely than this fraction of the most likely one are dropped (vLLM's), in [0, 1];
            0 keeps all.
        stop: Strings that end the answer (not included in it).
        seed: Seeds this request's own random stream, so its tokens do not depend on what it was batched with.
        ignore_eos: Keep going past end-of-sequence (benchmarks).
        min_tokens: End-of-sequence and ``stop_token_ids`` cannot be chosen before this many tokens, and stop
            strings are looked for only in the text after it (vLLM's rule: one that began before it and ends after
            it counts).
        stop_token_ids: Further ids that end the answer like end-of-sequence (not included in it).
        presence_penalty: Subtracted once from the logit of every token the answer already holds (OpenAI's), in
            [-2, 2]; negative values favour repeating.
        frequency_penalty: Subtracted from a token's logit once per time the answer holds it (OpenAI's), in [-2, 2].
        repetition_penalty: Divides the positive logits (multiplies the negative ones) of every token seen in the
            prompt's text or the answer (the CTRL rule as transformers and vLLM apply it); 1 does nothing, above 1
            discourages repeating.
        logprobs: None: none; k (0 to 20): each answer token's log-probability under the model (before penalties
            and temperature), with the step's k most likely tokens.
        prompt_logprobs: None: none; k (0 to 20): the same for every text token of the prompt after the first (how
            likely the model finds the given text: scoring, perplexity, multiple-choice evaluation). Such a prompt
            takes from the prefix cache only blocks an earlier scored prompt computed (their scores are kept with
            them, for as many alternatives or more). With it ``max_tokens`` may be 0 (score only).
        structured: Hold the answer to a JSON schema, a regular expression or a list of choices
            (:mod:`palo.engine.structured`): tokens that cannot continue it within that shape are masked out, after
            the penalties and the logit bias.
        logit_bias: ``(token id, bias)`` pairs (a mapping is accepted), each bias in [-100, 100], added to the
            token's logit after the penalties and before temperature (OpenAI's ``logit_bias``): -100 bans a token,
            100 all but forces it. Reported log-probabilities stay the model's own.
        continuation: The answer's text continues the prompt's (raw completions, a continued final message): it is
            decoded after the prompt's last tokens, so a word-initial first token keeps its space ("is" + " The").
            Otherwise the answer is decoded on its own, as the original worker showed chat answers ("The").
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    structured: StructuredOutput | None = None
    continuation: bool = False
    # Whether the tokens seen so far change this request's logits: read for every row at every step, so set once
    # rather than computed by a property.
    penalized: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:  # also refuses NaN
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:  # also refuses NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be None or 0 to {MAX_LOGPROBS}, got {value}")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in pairs)))
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {token}: {bias}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise ValueError("logit_bias names a token twice")
        if self.structured is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError("a structured answer ends where its shape is complete; it cannot ignore end-of-sequence "
                             "or ask for a least number of tokens")
        object.__setattr__(self, "penalized",
                           bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1))

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def _token_counts(rows: Sequence[Sequence[int] | torch.Tensor], vocab: int, device: torch.device) -> torch.Tensor:
    """``[R, V]`` float: how often each token id occurs in each row (negative ids, image positions, are skipped)."""
    # Padding and skipped ids count into an extra column that is dropped.
    ids = pad_sequence([torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in rows], batch_first=True,
                       padding_value=vocab)
    ids = ids.masked_fill_((ids < 0) | (ids >= vocab), vocab).to(device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


def prompt_token_set(prompt_ids: Sequence[int]) -> torch.Tensor:
    """The distinct text ids of a prompt (``[n]`` long, CPU): all the repetition penalty needs of it, made once per
    request rather than at every step."""
    return torch.tensor(sorted({t for t in prompt_ids if t >= 0}), dtype=torch.long)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int] | torch.Tensor] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
    counts: PenaltyCounts | None = None,
) -> torch.Tensor:
    """The logits after each row's repetition, frequency and presence penalties, on the logits' device.

    The repetition penalty looks at the prompt's text and the answer; frequency and presence at the answer only
    (OpenAI's rule). Rows that ask for no penalty are returned unchanged.

    Args:
        logits: ``[B, V]``.
        params: B settings.
        prompt_ids: B prompts (ids below 0, the image positions, are ignored), or their
            :func:`prompt_token_set`; not needed with ``counts``.
        output_ids: B answers so far; not needed with ``counts``.
        counts: What the penalised rows (in order) have seen, kept on the device (:class:`PenaltyState`), instead
            of counting ``prompt_ids`` and ``output_ids`` again.

    Returns:
        ``[B, V]``: ``logits`` itself when no row is penalised, otherwise a float32 copy.
    """
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index).float()
    repetition = [params[i].repetition_penalty for i in rows]
    if counts is not None:
        prompt_seen, answer = counts
    else:
        if prompt_ids is None or output_ids is None:
            raise ValueError("penalised rows need the prompts and answers so far")
        answer = _token_counts([output_ids[i] for i in rows], vocab, device)
        prompt_seen = (_token_counts([prompt_ids[i] for i in rows], vocab, device) > 0
                       if any(r != 1 for r in repetition) else None)
    if any(r != 1 for r in repetition):
        seen = prompt_seen | (answer > 0)
        r = torch.tensor(repetition, device=device)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]
    sub = sub - answer * frequency - (answer > 0).float() * presence
    return logits.float().index_copy(0, index, sub)


# ``(prompt_seen [R, V] bool, answer_counts [R, V] float)`` of R penalised rows.
PenaltyCounts = tuple[torch.Tensor, torch.Tensor]


class PenaltyState:
    """What each penalised sequence has seen, kept on the device and updated by one scatter per step.

    Counting a sequence's answer again at every step sends its whole id list to the device and costs more the
    longer the answer grows; here a sequence takes a row when it starts (its prompt's text ids marked once) and each
    step adds the chosen tokens, so a step costs the same at token 1,000 as at token 1.

    Args:
        rows: Sequences held at once (more are made room for when needed).
        vocab: Width of the logits.
        device: The logits' device.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device | str) -> None:
        self.prompt_seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.answer_counts = torch.zeros(rows, vocab, device=device)
        self._free = list(range(rows - 1, -1, -1))

    def open(self, prompt_set: torch.Tensor) -> int:
        """A row for a sequence whose prompt holds the text ids ``prompt_set`` (:func:`prompt_token_set`)."""
        if not self._free:  # more sequences than planned: double the rows
            rows = self.prompt_seen.shape[0]
            self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros_like(self.prompt_seen)])
            self.answer_counts = torch.cat([self.answer_counts, torch.zeros_like(self.answer_counts)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free.pop()
        self.prompt_seen[row] = False
        self.answer_counts[row] = 0
        self.prompt_seen[row, prompt_set.to(self.prompt_seen.device)] = True
        return row

    def close(self, row: int) -> None:
        self._free.append(row)

    def gather(self, rows: torch.Tensor) -> PenaltyCounts:
        """The counts of ``rows`` (``[R]`` long, on the device), in that order."""
        return self.prompt_seen.index_select(0, rows), self.answer_counts.index_select(0, rows)

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's chosen token (``[R]`` each, on the device)."""
        self.answer_counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.answer_counts.dtype),
                                      accumulate=True)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The logits with each row's ``logit_bias`` added, on the logits' device.

    Args:
        logits: ``[B, V]``.
        params: B settings; their token ids must be below V.

    Returns:
        ``[B, V]``: ``logits`` itself when no row has a bias, otherwise a float32 copy (the caller's logits still
        give the model's own log-probabilities).
    """
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    device = logits.device
    biased = logits.to(torch.float32, copy=True)
    biased.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                      torch.tensor(biases, device=device), accumulate=True)
    return biased


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_ids: Sequence[Sequence[int] | torch.Tensor] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
    counts: PenaltyCounts | None = None,
) -> torch.Tensor:
    """Choose one token per row, each row with its own settings, on the logits' device.

    Penalties come first (:func:`apply_penalties`), then each row's logit bias, then temperature, min-p, top-k and
    top-p.
    Sampling uses the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``), so each row's
    randomness is one draw from its own generator and no row's choice depends on another's.

    Args:
        logits: ``[B, V]`` (float32 preferred).
        params: B settings.
        generators: B generators on the logits' device (None: the global stream).
        prompt_ids: B prompts; needed when a row has a repetition penalty (unless ``counts`` are given).
        output_ids: B answers so far; needed when a row has a penalty (unless ``counts`` are given).
        counts: What the penalised rows have seen, from a :class:`PenaltyState`.

    Returns:
        ``[B]`` token ids (long, on the logits' device).
    """
    logits = apply_penalties(logits, params, prompt_ids, output_ids, counts)
    logits = apply_logit_bias(logits, params)
    greedy_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_ids
    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    sub = logits.index_select(0, rows).float()
    temperature = torch.tensor([params[i].temperature for i in sampled_rows], device=device)[:, None]
    probs = torch.softmax(sub / temperature, dim=-1)
    min_p = [params[i].min_p for i in sampled_rows]
    if any(min_p):  # relative to each row's most likely candidate, after temperature
        floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=device)[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # top-p then counts mass among what min-p kept
    top_k = [params[i].top_k for i in sampled_rows]
    top_p = [params[i].top_p for i in sampled_rows]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)[:, None]  # any int
        rank = torch.arange(vocab, device=device)[None, :]
        # Top-k first, then top-p within what top-k kept (transformers' and vLLM's order): keep a candidate while
        # the mass before it, out of the top-k candidates' mass, is under top_p (the first is always kept).
        sorted_probs = sorted_probs * (rank < k)
        before = (sorted_probs.cumsum(dim=-1) - sorted_probs) / sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs = sorted_probs * (before < torch.tensor(top_p, device=device)[:, None])
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    noise = torch.empty_like(probs)
    for j, i in enumerate(sampled_rows):
        noise[j].exponential_(generator=generators[i])
    choice = (probs / noise).argmax(dim=-1)
    return greedy_ids.index_copy(0, rows, choice)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Each asking row's chosen-token log-probability and its ``top[i]`` most likely alternatives.

    Args:
        logits: ``[B, V]``, as the model gave them (the distribution reported is the model's own).
        tokens: ``[B]`` the chosen ids.
        top: B alternatives counts; None for a row that asks for nothing.

    Returns:
        B entries, None where the row asks for nothing (one host transfer for all rows).
    """
    rows = [i for i, k in enumerate(top) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(top)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0].tolist()
    k = min(max(top[i] for i in rows), logprobs.shape[-1])
    best_lp, best_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    best_lp, best_ids = best_lp.tolist(), best_ids.tolist()
    for j, i in enumerate(rows):
        out[i] = (chosen[j], list(zip(best_ids[j][: top[i]], best_lp[j][: top[i]])))
    return out
