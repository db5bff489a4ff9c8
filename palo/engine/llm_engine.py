"""The engine loop: continuous batching over a paged KV cache, with streaming outputs.

One thread owns the model. Each iteration of :meth:`LLMEngine.step`:

1. takes in new requests and cancellations (from any thread);
2. admits waiting requests while there are places and KV blocks (prefix-cache hits cost no new blocks);
3. prefills up to ``max_prefill_tokens`` prompt positions (a long prompt in chunks), running the vision tower only
   for images whose rows are not already cached; a sequence whose prompt is complete samples its first token;
4. decodes one token for every sequence past its prompt, each with its own sampling settings (and grammar);
5. reports each changed request through its callback and frees the KV of every finished one at once.

So a request joins the running batch between two decode steps and leaves it as soon as it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine.block_manager import BlockManager
from palo.engine.config import EngineConfig, plan_num_blocks
from palo.engine.detokenizer import IncrementalDetokenizer, prompt_context
from palo.engine.errors import EngineClosed, QueueFull, RequestTooLarge
from palo.engine.model_runner import ModelRunner, PrefillChunk, cache_shape
from palo.engine.sampling import PenaltyState, TokenLogprob, sample, token_logprobs
from palo.engine.scheduler import Scheduler
from palo.engine.sequence import EngineRequest, RequestOutput, Sequence, Status
from palo.engine.structured import StructuredOutputs, accept
from palo.model.multimodal import ImagePlaceholderMismatch

logger = logging.getLogger("palo.engine")

DEFAULT_MAX_MODEL_LEN = 2048
RATE_WINDOW_S = 10.0  # tokens/s is measured over this window


class TokenRate:
    """Tokens generated over the last ``window`` seconds: the engine thread records them, any thread reads the rate.

    The record is pruned as it grows (an offline run that never asks for the rate must not keep a timestamp per token
    forever) and read under a lock: the worker's heart-beat thread and its status requests read it at the same time.

    Args:
        window: Seconds the rate is measured over.
    """

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Timestamps held: those within ``window`` seconds of the latest one."""
        return len(self._times)

    def _prune(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()

    def record(self, now: float) -> None:
        """One token generated at ``now`` (``time.monotonic()``)."""
        with self._lock:
            self._times.append(now)
            self._prune(now)

    def per_second(self, now: float) -> float:
        """Tokens per second over the window that ends at ``now``."""
        with self._lock:
            self._prune(now)
            return len(self._times) / self.window


def _check_prompt_ids(input_ids: Seq[int], vocab: int) -> int:
    """Check every prompt id once, at admission (O(prompt length)); returns the number of image placeholders.

    An id outside the embedding table would otherwise fail (or, negative, be read as id 0 or as an image row) only
    deep in the engine thread, where it took down the other requests of its step or jammed the queue.

    Raises:
        ValueError: Naming the first bad position: an empty prompt, an id that is not an integer, or one outside
            ``[0, vocab)`` that is not ``IMAGE_TOKEN_INDEX``.
    """
    if len(input_ids) == 0:
        raise ValueError("input_ids is empty: a prompt needs at least one token")
    placeholders = 0
    for position, token in enumerate(input_ids):
        if type(token) is int and 0 <= token < vocab:  # nearly every id: the cheapest test first
            continue
        try:
            value = operator.index(token)  # NumPy and 0-d integer tensor ids too; never a float or a string
        except TypeError:
            raise ValueError(f"input_ids[{position}] is {token!r}, not an integer token id") from None
        if 0 <= value < vocab and not isinstance(token, bool):
            continue
        if value == IMAGE_TOKEN_INDEX:
            placeholders += 1
            continue
        raise ValueError(
            f"input_ids[{position}] = {token!r} is not a token id of this model: ids must be in [0, {vocab}), or "
            f"{IMAGE_TOKEN_INDEX} where an image goes"
        )
    return placeholders


def _tower_input_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` of one image as ``model``'s vision tower takes it, when its config says so."""
    getter = getattr(model, "get_vision_tower", None)
    config = getattr(getter() if callable(getter) else None, "config", None)
    size = getattr(config, "image_size", None)
    if not isinstance(size, int):
        return None
    return int(getattr(config, "num_channels", 3)), size, size


class LLMEngine:
    """Continuous-batching generation for one loaded model.

    Args:
        model: A loaded PALO (or plain LLaMA-family) causal LM.
        tokenizer: Its tokenizer (None: outputs carry token ids only, no text).
        config: Engine settings.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        model_len = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        device = model.get_input_embeddings().weight.device
        shape = cache_shape(model)
        self.tokens_per_image = int(getattr(model, "image_token_count", 0) or 0)
        # [3, H, W] of one image as the vision tower takes it (None: unknown, not checked at the door).
        self.image_shape = _tower_input_shape(model) if self.tokens_per_image else None
        images_kept = config.image_cache_size if config.enable_prefix_cache and self.tokens_per_image else 0
        activation = config.max_prefill_tokens * model.config.hidden_size * 4 * 16  # a prefill's largest temporaries
        image_bytes = images_kept * self.tokens_per_image * model.config.hidden_size * shape.bytes_per_value
        num_blocks = plan_num_blocks(config, shape, self.max_model_len, device, activation + image_bytes)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.attention, self.max_model_len,
                                  image_cache_size=images_kept)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len)
        self.eos_ids = self._eos_ids()
        self._inbox: list[Sequence] = []
        self._aborts: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._structured: StructuredOutputs | None = None
        self._penalties: PenaltyState | None = None  # made with the first penalised request
        self.token_rate = TokenRate()
        # Called from the engine thread with each request's last output (metrics); one that raises is logged.
        self.finish_observers: list[Callable[[RequestOutput], None]] = []
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # sequences per decode step, for statistics and tests
        # Since start: decode steps and the tokens they decoded (their ratio over an interval is its mean batch).
        self.decode_steps = 0
        self.decoded_tokens = 0
        self.steps = 0
        if device.type == "cuda" and config.cuda_graphs:
            from palo.engine.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs.capture(self.runner, config.max_num_seqs, self.max_model_len)
        logger.info(
            "KV cache: %d blocks of %d positions (%.2f GiB, %s) = %d positions; up to %d sequences of %d positions; "
            "decode attention: %s",
            num_blocks - 1, config.block_size, self.runner.cache_bytes / (1 << 30), shape.dtype,
            (num_blocks - 1) * config.block_size, config.max_num_seqs, self.max_model_len,
            "triton (paged)" if self.runner.paged_attention else "sdpa (gathered)",
        )

    def _eos_ids(self) -> set[int]:
        ids = {getattr(self.tokenizer, "eos_token_id", None)}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return {i for i in ids if i is not None}

    # -- requests (any thread) ------------------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> Sequence:
        """Queue a request; its outputs go to ``request.on_output`` from the engine thread.

        Everything that depends on the request alone is checked here, so that a bad request is refused to its caller
        and never reaches the engine thread, where it could only fail there (with whatever shared the step).

        Raises:
            ImagePlaceholderMismatch: When the images do not match the prompt's placeholders.
            RequestTooLarge: When the prompt leaves no room for an answer, or the request needs more KV than the
                whole cache holds.
            QueueFull: When ``max_waiting`` requests already wait.
            EngineClosed: After :meth:`close`, or once the engine thread has died.
            ValueError: When a prompt id is not an integer in ``[0, vocab)`` (or ``IMAGE_TOKEN_INDEX``), the images
                are not a floating-point ``[k, 3, H, W]`` tensor of the vision tower's size, ``request_id`` names a
                request still in flight, ``logit_bias`` or ``stop_token_ids`` name an id outside the vocabulary, or
                stop strings or a structured output come without a tokenizer.
            GrammarError: When the structured output's schema, pattern or choices cannot be compiled.
        """
        vocab = int(self.model.config.vocab_size)
        placeholders = _check_prompt_ids(request.input_ids, vocab)
        count = self._check_images(request.images)
        if placeholders != count:
            raise ImagePlaceholderMismatch(
                f"Image features and image tokens do not match: {count} image(s) for {placeholders} <image> "
                "placeholder(s). Give exactly one image per <image> in the prompt."
            )
        if count and self.tokens_per_image == 0:
            raise ImagePlaceholderMismatch("this model takes text only (its config has no vision tower)")
        seq = Sequence(request, self.tokens_per_image)
        if seq.prompt_len + min(request.sampling.max_tokens, 1) > self.max_model_len:
            raise RequestTooLarge(
                f"the prompt takes {seq.prompt_len} of the model's {self.max_model_len} positions; no room is left "
                "for an answer"
            )
        need = self.blocks.blocks_for(seq.max_positions(self.max_model_len))
        if need > self.blocks.usable_blocks:
            raise RequestTooLarge(
                f"the request needs {need} KV blocks but the cache holds {self.blocks.usable_blocks}: lower its "
                "max_tokens or enlarge the cache (--kv-cache-gb)"
            )
        if any(token >= vocab for token, _ in request.sampling.logit_bias):
            raise ValueError(f"logit_bias names a token id outside the model's vocabulary [0, {vocab})")
        if any(token >= vocab for token in request.sampling.stop_token_ids):
            raise ValueError(f"stop_token_ids names a token id outside the model's vocabulary [0, {vocab})")
        if request.sampling.structured is not None:
            seq.matcher = self.structured_outputs().matcher(request.sampling.structured)
        if request.sampling.penalized and self._penalties is None:
            with self._cond:
                if self._penalties is None:  # [max_num_seqs, vocab] counts: 5 bytes per sequence and vocab entry
                    self._penalties = PenaltyState(self.config.max_num_seqs, vocab, self.runner.device)
        if request.sampling.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(request.sampling.seed)
        if self.tokenizer is not None:  # without one (benchmarks) the engine reports token ids only
            context = prompt_context(self.tokenizer, request.input_ids) if request.sampling.continuation else ()
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, stops=request.sampling.stop, context=context)
        elif request.sampling.stop:
            raise ValueError("stop strings need a tokenizer")
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
            if seq.request_id in self._by_id:
                if request.request_id:
                    # abort(id) and the output routing go by id: a second live request under it could not be
                    # told apart from the first (and finishing either one would unregister the other).
                    raise ValueError(f"request_id {request.request_id!r} is already in flight")
                # A caller named its own request like this automatic id: number this one past it.
                taken = seq.request_id
                suffix = 1
                while f"{taken}.{suffix}" in self._by_id:
                    suffix += 1
                seq.request_id = f"{taken}.{suffix}"
            self._inbox.append(seq)
            self._by_id[seq.request_id] = seq
            self._cond.notify_all()
        return seq

    def _check_images(self, images: Any) -> int:
        """The number of images of a request, after checking that they are a pixel tensor the tower can take.

        Raises:
            ValueError: When ``images`` is not a floating-point ``[k, C, H, W]`` tensor of the vision tower's size.
        """
        if images is None:
            return 0
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be one pixel tensor [k, 3, H, W], not {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must hold floating-point pixel values, not {images.dtype}")
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"the images are {list(images.shape[1:])} (channels, height, width) but the vision tower takes "
                f"{list(self.image_shape)}: make them with palo.mm_utils.process_images"
            )
        return int(images.shape[0])

    def structured_outputs(self) -> StructuredOutputs:
        """The grammar compiler and masker for this model's tokenizer, made on the first structured request.

        Raises:
            ValueError: Without a tokenizer (a grammar is spelled in text).
        """
        with self._cond:
            if self._structured is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer")
                self._structured = StructuredOutputs(self.tokenizer, int(self.model.config.vocab_size), self.eos_ids)
            return self._structured

    def abort(self, seq_or_id: Sequence | str) -> None:
        """Cancel a request: it leaves the batch at the next step and its KV is freed then."""
        with self._cond:
            seq = self._by_id.get(seq_or_id) if isinstance(seq_or_id, str) else seq_or_id
            if seq is not None and seq.status != Status.FINISHED:
                seq.cancelled = True
                self._aborts.append(seq)
                self._cond.notify_all()

    # -- the loop -------------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._cond:
            return bool(self._inbox or self._aborts) or self.scheduler.has_work()

    def step(self) -> None:
        """One iteration: take in requests, admit, prefill a chunk, decode one token for the running batch.

        An error that belongs to one request (its input, its grammar) fails that request only; one the step cannot
        pin on a request fails the requests of the phase it came from. The engine goes on serving either way.
        """
        self._take_in()
        self.scheduler.admit(on_error=self._fail_one)
        self.steps += 1

        chunks = self.scheduler.prefill_chunks()
        if chunks:
            self._prefill(chunks)

        running = [s for s in self.scheduler.decoding if len(s.output_ids) > 0 and s.num_computed < s.num_tokens]
        if running:
            self.batch_sizes.append(len(running))
            self.decode_steps += 1
            self.decoded_tokens += len(running)
            try:
                logits = self.runner.decode(running)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the others
                self._fail(running, exc)
            else:
                tokens, logprobs, refused = self._sample_each(logits, running)
                if refused:
                    running, tokens, logprobs = self._drop_refused(running, tokens, logprobs, refused)
                for seq, token, logprob in zip(running, tokens, logprobs):
                    seq.num_computed = seq.num_tokens
                    # Free until it catches (Python 3.11); what it catches (say a detokenizer choking on an id the
                    # tokenizer lacks, in a padded vocabulary) belongs to this request alone.
                    try:
                        self._append(seq, token, logprob)
                    except Exception as exc:  # noqa: BLE001
                        self._fail_one(seq, exc)

    def _take_in(self) -> None:
        """Queue the requests added and finish those cancelled since the last step (any thread adds them)."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq in inbox:
            self.scheduler.add(seq)
        for seq in aborts:
            if seq.status != Status.FINISHED:
                self._finish(seq, "abort")

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        """Compute the chunks' prompt positions (their images first) and sample the first token of each prompt the
        step completes.

        When the batch raises and holds more than one chunk, each chunk is run again on its own, so that one
        request's bad input (an image the tower cannot take, say) fails that request only. Nothing a failed prefill
        did is kept: a chunk's positions count as computed only after its prefill returned, and a retry writes the
        same cache slots again.
        """
        try:
            encode = [c.seq for c in chunks if c.seq.image_features is None and c.seq.images_needed_from(c.start)]
            if encode:
                self.runner.encode_images(encode)
            logits, scores = self.runner.prefill(chunks)
        except Exception as exc:  # noqa: BLE001 - find whose request it was, keep serving the others
            if len(chunks) == 1:
                self._fail([chunks[0].seq], exc)
            else:
                logger.warning("a prefill of %d requests failed (%s: %s); running them one at a time",
                               len(chunks), type(exc).__name__, exc)
                for chunk in chunks:
                    self._prefill([chunk])
            return
        completed = []
        for i, c in enumerate(chunks):
            c.seq.num_computed = c.end
            for position, entry in scores.get(i, {}).items():
                c.seq.position_logprobs[position] = entry
            self.blocks.register_prefix(c.seq)  # with the block's scores, when they are asked for
            if c.completes_prompt:
                c.seq.collect_prompt_logprobs()
                c.seq.block_end_hidden = {}  # kept with its cached blocks, if anywhere
                completed.append(c.seq)
        if not completed:
            return
        tokens, logprobs, refused = self._sample_each(logits, completed)
        if refused:
            completed, tokens, logprobs = self._drop_refused(completed, tokens, logprobs, refused)
        for seq, token, logprob in zip(completed, tokens, logprobs):
            seq.image_features = None
            if seq.sampling.max_tokens == 0:  # the prompt's scores were all it asked for
                self._finish(seq, "length")
                continue
            self.scheduler.start_decoding(seq)
            seq.first_token_at = time.monotonic()
            try:
                self._append(seq, token, logprob)
            except Exception as exc:  # noqa: BLE001 - this request's alone (see step)
                self._fail_one(seq, exc)

    def _drop_refused(self, seqs: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None],
                      refused: dict[int, Exception]) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Fail the sequences whose token their grammar refused (by index in ``seqs``); the others, kept in order."""
        for i, exc in refused.items():
            self._fail_one(seqs[i], exc)
        keep = [i for i in range(len(seqs)) if i not in refused]
        return [seqs[i] for i in keep], [tokens[i] for i in keep], [logprobs[i] for i in keep]

    def _sample_each(self, logits: torch.Tensor, seqs: Seq[Sequence],
                     ) -> tuple[list[int], list[TokenLogprob | None], dict[int, Exception]]:
        """:meth:`_sample` for the batch; when that raises, each row on its own, so that what fails for one
        request (its grammar's mask, its penalty row) fails that request only (in the returned refusals).

        A row sampled again draws its randomness again: a seeded request in a batch that failed may answer
        differently than alone. Nothing else is drawn twice (:meth:`_sample` changes state only after the last
        thing that can raise for the batch).
        """
        try:
            return self._sample(logits, seqs)
        except Exception as exc:  # noqa: BLE001 - find whose request it was, keep serving the others
            if len(seqs) == 1:
                return [0], [None], {0: exc}
            logger.warning("sampling %d requests failed (%s: %s); sampling them one at a time",
                           len(seqs), type(exc).__name__, exc)
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        refused: dict[int, Exception] = {}
        for i, seq in enumerate(seqs):
            try:
                token, logprob, own = self._sample(logits[i:i + 1], [seq])
            except Exception as exc:  # noqa: BLE001
                token, logprob, own = [0], [None], {0: exc}
            tokens += token
            logprobs += logprob
            if own:
                refused[i] = own[0]
        return tokens, logprobs, refused

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence],
                ) -> tuple[list[int], list[TokenLogprob | None], dict[int, Exception]]:
        """One token for each sequence, with its own settings, (for penalties) what it has seen so far and (for a
        structured answer) what its grammar allows next, and its log-probability for those that ask.

        Args:
            logits: ``[B, V]`` float32 logits, one row per sequence.
            seqs: The B sequences.

        Returns:
            The B tokens, their log-probabilities (None where not asked for), and by row index the error of each
            sequence whose grammar refused its token (those rows must be failed, not appended).
        """
        params = [s.sampling for s in seqs]
        matchers = [s.matcher for s in seqs]
        allowed = logits if self._structured is None else self._structured.mask(logits, matchers)
        early = [(i, s) for i, s in enumerate(seqs) if len(s.output_ids) < s.sampling.min_tokens]
        if early:  # not allowed to end yet: their ending ids are out of reach
            ends = [(i, t) for i, s in early for t in (*self.eos_ids, *s.sampling.stop_token_ids)]
            allowed = allowed.to(torch.float32, copy=True) if allowed is logits else allowed
            allowed[[i for i, _ in ends], [t for _, t in ends]] = -torch.inf
        penalised = [i for i, s in enumerate(seqs) if s.sampling.penalized]
        counts = rows = None
        if penalised:
            for i in penalised:
                if seqs[i].penalty_row is None:
                    seqs[i].penalty_row = self._penalties.open(seqs[i].prompt_token_set)
            rows = torch.tensor([seqs[i].penalty_row for i in penalised], device=logits.device)
            counts = self._penalties.gather(rows)
        tokens = sample(allowed, params, [s.generator for s in seqs], counts=counts)
        logprobs = token_logprobs(logits, tokens, [p.logprobs for p in params])
        ids = tokens.tolist()
        # State changes last, once nothing else can raise: a batch that failed is sampled again row by row.
        if rows is not None:  # what they have seen now includes this step's token
            self._penalties.add(rows, tokens.index_select(0, torch.tensor(penalised, device=logits.device)))
        refused: dict[int, Exception] = {}
        for i, (matcher, token) in enumerate(zip(matchers, ids)):
            if matcher is not None:
                try:
                    accept(matcher, token)
                except Exception as exc:  # noqa: BLE001 - that request's grammar is broken, not the batch
                    refused[i] = exc
        return ids, logprobs, refused

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token (and its log-probability, when asked): finish the sequence or stream what it adds."""
        self.token_rate.record(time.monotonic())
        if seq.cancelled:
            return self._finish(seq, "abort")
        if (token in self.eos_ids and not seq.sampling.ignore_eos) or token in seq.sampling.stop_token_ids:
            return self._finish(seq, "stop")
        seq.output_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        shown, stopped = "", False
        if seq.detokenizer is not None:
            seq.detokenizer.push(token)
            # vLLM's rule: stop strings are looked for once the answer holds more than min_tokens tokens.
            shown, stopped = seq.detokenizer.visible(search=len(seq.output_ids) > seq.sampling.min_tokens)
        if stopped:
            return self._finish(seq, "stop")
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length")
        if shown != seq.text or seq.detokenizer is None:
            delta, seq.text = shown[len(seq.text):], shown
            self._emit(seq, RequestOutput(seq.request_id, shown, delta, seq.output_ids, len(seq.output_ids),
                                          answer_logprobs=seq.output_logprobs))

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(seq)
        if seq.penalty_row is not None:
            self._penalties.close(seq.penalty_row)
            seq.penalty_row = None
        with self._cond:
            if self._by_id.get(seq.request_id) is seq:  # never unregister another request under the same id
                del self._by_id[seq.request_id]
        seq.finish_reason, seq.error = reason, error
        shown = seq.text
        if seq.detokenizer is not None:
            try:
                seq.detokenizer.flush()
                shown, _ = seq.detokenizer.visible(final=True, search=len(seq.output_ids) > seq.sampling.min_tokens)
            except Exception:  # noqa: BLE001 - the request is already out of the scheduler: it must get its event
                # A detokenizer that choked on a token (an id the tokenizer lacks, in a padded vocabulary) chokes
                # again on the whole answer. Raising here would skip the final event (its caller waits forever) and
                # fail the step, with every other request in it: end with the text already streamed instead.
                logger.exception("detokenizing the end of request %s failed; its text ends where it stood",
                                 seq.request_id)
                shown = seq.text
        delta = shown[len(seq.text):] if shown.startswith(seq.text) else shown
        seq.text = shown
        self._emit(seq, RequestOutput(seq.request_id, shown, delta, seq.output_ids, len(seq.output_ids),
                                      finished=True, finish_reason=reason, error=error,
                                      answer_logprobs=seq.output_logprobs))

    def _fail(self, seqs: Seq[Sequence], exc: BaseException) -> None:
        """End ``seqs`` with ``exc`` as their error (those not finished yet) and log its traceback."""
        logger.error("generation failed for %d request(s):\n%s", len(seqs), "".join(traceback.format_exception(exc)))
        message = f"{type(exc).__name__}: {exc}"
        for seq in seqs:
            if seq.status != Status.FINISHED:
                self._finish(seq, "error", message)
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a sticky CUDA error raises here too: the requests are failed already
                # Raising from the error handler would kill the engine thread (it runs inside _loop's handler).
                logger.exception("emptying the CUDA cache after a failure failed")

    def _fail_one(self, seq: Sequence, exc: BaseException) -> None:
        self._fail([seq], exc)

    def _emit(self, seq: Sequence, output: RequestOutput) -> None:
        output.prompt_positions = seq.prompt_len
        output.cached_positions = seq.num_cached
        output.prompt_logprobs = seq.prompt_logprobs
        if seq.first_token_at is not None:
            output.first_token_s = seq.first_token_at - seq.arrival
        if output.finished:
            output.latency_s = time.monotonic() - seq.arrival
            for observe in self.finish_observers:
                try:
                    observe(output)
                except Exception:  # noqa: BLE001 - statistics must never fail a request
                    logger.exception("a finish observer failed")
        callback = seq.request.on_output
        if callback is None:
            return
        try:
            callback(output)
        except Exception:  # noqa: BLE001 - the client went away: stop generating for it
            if not output.finished:
                seq.cancelled = True
                self.abort(seq)

    # -- background thread ----------------------------------------------------------------------------------------
    def start(self) -> LLMEngine:
        """Run :meth:`step` in a background thread whenever there is work (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="palo-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not (self._inbox or self._aborts or self.scheduler.has_work()):
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bug in one step must not kill the worker
                    logger.error("engine step failed:\n%s", traceback.format_exc())
                    running = list(self.scheduler.prefilling) + list(self.scheduler.decoding)
                    self._fail(running, RuntimeError("engine step failed"))
        except BaseException:
            logger.critical("the engine thread died; failing every request:\n%s", traceback.format_exc())
            raise
        finally:
            # However the thread ends (close, or an error its own handler raised), nobody steps after it: refuse
            # new requests and end every queued one, or their callers would wait forever.
            self._shut_down()

    def _shut_down(self) -> None:
        """Close the engine and end every request not finished yet (queued, running, or still in the inbox) with
        an error; only ever run by whoever steps the engine (its thread, or :meth:`close` when none was started)."""
        with self._cond:
            self._closed = True
            # Swapped out under the lock: add_request sees the engine closed from now on, and stats() stops
            # counting requests that were ended here.
            inbox, self._inbox = self._inbox, []
            self._aborts = []
            self._cond.notify_all()
        for seq in list(self.scheduler.waiting) + self.scheduler.prefilling + self.scheduler.decoding + inbox:
            if seq.status == Status.FINISHED:
                continue
            try:
                self._finish(seq, "error", "the engine was shut down")
            except Exception:  # noqa: BLE001 - one that cannot be ended cleanly must not keep the others waiting
                logger.exception("ending request %s at shutdown failed", seq.request_id)

    def is_running(self) -> bool:
        """Whether the background thread is running (started, not closed, not died)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 30.0) -> None:
        """Stop the background thread; unfinished requests end with an error (at once when it was never started)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is None:  # never started: no thread will end the requests already added
            self._shut_down()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run_until_done(self, max_steps: int = 1_000_000) -> None:
        """Step in this thread until every queued request has finished (tests, scripts; no background thread)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"requests still running after {max_steps} steps")

    def generate(self, requests: Seq[EngineRequest], timeout: float = 600.0) -> list[RequestOutput]:
        """Submit requests and wait for their final outputs (in order).

        Uses the background thread when it runs, else steps in this thread. All or nothing: when it raises (a
        request refused, the timeout, an interrupt) it first cancels every request it had queued, so that none of
        them goes on running unseen (or answers later, inside another caller's ``generate``).

        Raises:
            TimeoutError: When the answers are not all in after ``timeout`` seconds.
            Whatever :meth:`add_request` raises for one of the requests.
        """
        finals: list[RequestOutput | None] = [None] * len(requests)
        done = [threading.Event() for _ in requests]

        def collect(i: int, inner):
            def callback(output: RequestOutput) -> None:
                if inner is not None:
                    inner(output)
                if output.finished:
                    finals[i] = output
                    done[i].set()
            return callback

        submitted: list[Sequence] = []
        try:
            for i, request in enumerate(requests):
                # A copy carries the collecting callback: the caller's request is left as it is, so one request
                # given twice (n samples of a prompt) reports to two callbacks, and a later generate() adds none.
                own = dataclasses.replace(request, on_output=collect(i, request.on_output))
                submitted.append(self.add_request(own))
            if self._thread is None:
                self.run_until_done()
            deadline = time.monotonic() + timeout
            for event in done:
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"generation did not finish within {timeout} s")
        except BaseException:
            for seq in submitted:
                self.abort(seq)
            if self._thread is None:  # nobody else steps: end them now (their callbacks see "abort")
                self._take_in()
            raise
        return [f for f in finals if f is not None]

    # -- statistics -----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Queue, running sequences, KV use, prefix-cache hits and recent throughput."""
        usable = self.blocks.usable_blocks
        with self._cond:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
        return {
            "waiting": waiting,
            "running": self.scheduler.num_running,
            "kv_blocks_total": usable,
            "kv_blocks_used": sum(1 for b in range(1, self.blocks.num_blocks) if self.blocks.ref_count[b] > 0),
            "kv_cache_gb": round(self.runner.cache_bytes / (1 << 30), 4),
            "block_size": self.config.block_size,
            "max_num_seqs": self.config.max_num_seqs,
            "prefix_cache_hit_rate": round(self.blocks.hits / self.blocks.queries, 4) if self.blocks.queries else 0.0,
            "images_encoded": self.runner.images_encoded,  # since start: images run through the vision tower
            "decode_attention": "triton" if self.runner.paged_attention else "sdpa",
            "tokens_per_s": round(self.token_rate.per_second(time.monotonic()), 2),
            "decode_batch_max": max(self.batch_sizes, default=0),  # largest decode batch of the recent steps
            "decode_steps": self.decode_steps,  # counters since start: two readings give an interval's mean batch
            "decoded_tokens": self.decoded_tokens,
        }
