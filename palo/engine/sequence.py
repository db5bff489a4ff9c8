"""A request as the engine sees it: its spliced prompt, its place in the KV cache and its answer so far."""

from __future__ import annotations

import enum
import hashlib
import itertools
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine.sampling import SamplingParams, TokenLogprob, prompt_token_set
from palo.model.multimodal import plan_splice


@dataclass
class RequestOutput:
    """What the engine reports about a request after a step that changed it.

    Attributes:
        request_id: The request.
        text: The answer so far, cut at a stop string; it only ever grows.
        delta: What ``text`` gained since the last output.
        answer_ids: The sequence's growing list of answer ids (end-of-sequence excluded); read it through
            :attr:`token_ids`.
        num_tokens: How many of them this output covers.
        finished: Whether this is the last output.
        finish_reason: ``"stop"`` (end-of-sequence or stop string), ``"length"`` (token budget or model length),
            ``"abort"`` (cancelled) or ``"error"``.
        error: The error message when ``finish_reason == "error"``.
        prompt_positions: Context positions of the prompt (image rows included).
        cached_positions: Prompt positions whose KV came from the prefix cache.
        first_token_s: Seconds from submission to the first token (None before it).
        latency_s: Seconds from submission to this output, on the last output (None before it).
        answer_logprobs: The sequence's growing list of per-token log-probabilities when the request asked for
            them (empty otherwise); read it through :attr:`logprobs`.
        prompt_logprobs: When the request asked for them and its prompt is computed: one entry per id of the
            request's ``input_ids``, None for the first and for image placeholders, else the id's log-probability
            after everything before it (images included) and the k most likely ids there.
    """

    request_id: str
    text: str
    delta: str
    answer_ids: list[int] = field(repr=False, compare=False)
    num_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_positions: int = 0
    cached_positions: int = 0
    first_token_s: float | None = None
    latency_s: float | None = None
    answer_logprobs: list[TokenLogprob] = field(default_factory=list, repr=False, compare=False)
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, repr=False, compare=False)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """Per answer token (as :attr:`token_ids`): its log-probability and the step's most likely alternatives."""
        return self.answer_logprobs[: self.num_tokens]

    @property
    def token_ids(self) -> list[int]:
        """The answer's token ids up to this output. Copied when read, not per output: copying the whole answer
        for every streamed token would cost time quadratic in its length (answers only ever grow)."""
        return self.answer_ids[: self.num_tokens]


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class EngineRequest:
    """One generation request.

    Attributes:
        input_ids: Prompt ids with ``IMAGE_TOKEN_INDEX`` (-200) where each image goes.
        images: Pixel values ``[k, 3, H, W]`` for the k placeholders, or None.
        sampling: How to choose tokens.
        on_output: Called from the engine thread with each :class:`RequestOutput`; if it raises, the request is
            cancelled (its client went away).
        request_id: Unique among the requests in flight (the engine refuses a second one under a live id);
            generated when empty.
        cache_salt: vLLM's ``cache_salt``: when set, the request shares cached prompt blocks and image features
            only with requests that send the same salt (so that a client outside that group cannot learn from its
            own timings whether someone's prompt or image was recently asked).
    """

    input_ids: list[int]
    images: torch.Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    on_output: OutputCallback | None = None
    request_id: str = ""
    cache_salt: str | None = None


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


_ids = itertools.count()


def image_digest(pixels: torch.Tensor) -> str:
    """A content hash of one image's pixel values (the prefix cache's key for its rows)."""
    data = pixels.detach().to("cpu").contiguous().flatten().view(torch.uint8)
    return f"{hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()}:{pixels.dtype}:{tuple(pixels.shape)}"


class Sequence:
    """The engine's state of one request.

    The prompt is kept *spliced*: position ``p`` is either a text token id or row ``r`` of image ``i``. Both the
    model runner (what to embed at each position) and the prefix cache (what identifies a block) read it from here.

    Args:
        request: The request.
        tokens_per_image: Positions one image occupies.
    """

    def __init__(self, request: EngineRequest, tokens_per_image: int) -> None:
        self.request = request
        self.seq_id = next(_ids)
        self.request_id = request.request_id or f"req-{self.seq_id}"
        self.sampling = request.sampling
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.status = Status.WAITING
        self.tokens_per_image = tokens_per_image
        # The prompt spliced as the model's one contract lays it out (palo.model.multimodal): text ids in place and
        # IMAGE_TOKEN_INDEX on every image row; image_rows maps each image position to its row of the stacked
        # features [k * n, D], and image i starts at image_starts[i].
        tokens = [int(t) for t in request.input_ids]
        count = 0 if request.images is None else int(request.images.shape[0])
        plan = plan_splice(torch.tensor([tokens], dtype=torch.long), count, tokens_per_image)
        self.prompt_ids: list[int] = [IMAGE_TOKEN_INDEX] * plan.length
        for src, dst in zip(plan.text_src, plan.text_dst):
            self.prompt_ids[dst] = tokens[src]
        self.image_rows: dict[int, int] = dict(zip(plan.image_dst, plan.image_src))
        # When scoring the prompt: where each request id landed (None: an image placeholder), to report its
        # log-probabilities per id.
        self.input_positions: list[int | None] = []
        if self.sampling.prompt_logprobs is not None:
            self.input_positions = [None] * len(tokens)
            for src, dst in zip(plan.text_src, plan.text_dst):
                self.input_positions[src] = dst
        self.image_starts: list[int] = plan.image_dst[::tokens_per_image] if tokens_per_image else []
        self.num_images = len(self.image_starts)
        # What the caches know this request's blocks and images by: their content, within its cache salt.
        self.cache_namespace = b"" if request.cache_salt is None else hashlib.blake2b(
            request.cache_salt.encode("utf-8", "surrogatepass"), digest_size=32, person=b"palo-cache-salt").digest()
        suffix = f"@{self.cache_namespace.hex()}" if self.cache_namespace else ""
        self.image_keys = [image_digest(request.images[i]) + suffix for i in range(self.num_images)]
        self.output_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []  # one per output id when the request asks for them
        # Per spliced prompt position when the request asks: the log-probability of its id after the positions
        # before it (filled chunk by chunk as the prompt is computed).
        self.position_logprobs: list[TokenLogprob | None] | None = (
            None if self.sampling.prompt_logprobs is None else [None] * len(self.prompt_ids))
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # per request input id, once computed
        # When scoring the prompt: the hidden row at the last position of each prompt block (see BlockScores).
        self.block_end_hidden: dict[int, torch.Tensor] = {}
        self.block_table: list[int] = []
        self.block_table_row: tuple[list[int], torch.Tensor, int] | None = None  # the runner's tensor of it
        self.num_computed = 0  # positions whose K/V are in the cache
        self.num_cached = 0  # of which came from the prefix cache
        self.image_features: torch.Tensor | None = None  # [k, n, D] while the prompt is being prefilled
        self.generator: torch.Generator | None = None
        self.matcher: Any = None  # the grammar's state when the answer is held to a shape (palo.engine.structured)
        self.penalty_row: int | None = None  # its row of the engine's PenaltyState while it decodes, when penalised
        self.cancelled = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        # Streaming state, owned by the engine (see palo.engine.detokenizer).
        self.detokenizer: Any = None
        self.text = ""
        self._block_keys: tuple[int, list[bytes]] | None = None
        self._prompt_token_set: torch.Tensor | None = None

    # -- sizes ----------------------------------------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Positions so far: prompt plus answer."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def prompt_token_set(self) -> torch.Tensor:
        """The prompt's distinct text ids (for the repetition penalty), made on first use."""
        if self._prompt_token_set is None:
            self._prompt_token_set = prompt_token_set(self.prompt_ids)
        return self._prompt_token_set

    def collect_prompt_logprobs(self) -> None:
        """Once the prompt is computed: :attr:`prompt_logprobs` per request input id (see :class:`RequestOutput`)."""
        if self.position_logprobs is not None:
            self.prompt_logprobs = [None if p is None else self.position_logprobs[p] for p in self.input_positions]

    def max_positions(self, max_model_len: int) -> int:
        """Positions this sequence can ever need: the KV reserved for it on admission."""
        return min(self.prompt_len + self.sampling.max_tokens, max_model_len)

    # -- prefix-cache keys ---------------------------------------------------------------------------------------
    def block_keys(self, block_size: int) -> list[bytes]:
        """A chained digest for each *full* prompt block: equal digests mean equal prompts up to the block's end.

        The digest is cryptographic (BLAKE2b, 256 bits) because blocks are shared between requests: with a fast
        non-cryptographic hash (Python's ``hash`` of the ids is not even seeded for integers) a client could send a
        prompt whose block collides with another prompt's, and whichever came second would be answered from the
        first one's K/V. Each block's bytes are its positions as int64 (a text id, or ``-1 - row`` for row ``row``
        of the stacked image features), then the keys of the images those rows belong to. The first block's chain
        starts from the request's cache salt, if it has one.
        """
        if self._block_keys is not None and self._block_keys[0] == block_size:
            return self._block_keys[1]
        values = list(self.prompt_ids)
        for p, row in self.image_rows.items():
            values[p] = -1 - row
        keys: list[bytes] = []
        parent = self.cache_namespace
        for b in range(self.prompt_len // block_size):
            block = values[b * block_size:(b + 1) * block_size]
            digest = hashlib.blake2b(parent, digest_size=32)
            digest.update(array("q", block).tobytes())
            for image in sorted({(-1 - v) // self.tokens_per_image for v in block if v < 0}):
                digest.update(self.image_keys[image].encode() + b"\n")
            parent = digest.digest()
            keys.append(parent)
        self._block_keys = (block_size, keys)
        return keys

    def images_needed_from(self, start: int) -> bool:
        """Whether any image row lies at or after prompt position ``start`` (the tower must run)."""
        return any(s + self.tokens_per_image > start for s in self.image_starts)
