"""Which sequences run in the next step: waiting -> prefilling -> decoding -> finished.

Admission reserves each sequence's whole KV need up front (prompt plus its token budget, capped at the model
length), so a running sequence can never run out of cache mid-answer and nothing is ever preempted; a request that
does not fit yet waits at the head of the queue (first come, first served) until finished sequences free blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from palo.engine.block_manager import BlockManager
from palo.engine.config import EngineConfig
from palo.engine.model_runner import PrefillChunk
from palo.engine.sequence import Sequence, Status


class Scheduler:
    """Queues and batches sequences.

    Args:
        config: Engine settings (``max_num_seqs``, ``max_prefill_tokens``).
        blocks: The KV block manager.
        max_model_len: Longest sequence.
    """

    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, on_error: Callable[[Sequence, Exception], None] | None = None) -> list[Sequence]:
        """Move waiting sequences into the running set while places and KV blocks allow; returns them.

        Args:
            on_error: Called with a sequence whose admission raised (its prefix-cache keys, say), which has then
                left the queue; without it the error propagates and the sequence stays at the head of the queue,
                where it would raise again at every call and hold back everyone behind it.
        """
        admitted = []
        while self.waiting and self.num_running < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                need = seq.max_positions(self.max_model_len)
                if not self.blocks.can_allocate(seq, need):
                    break
                self.waiting.popleft()
                self.blocks.allocate(seq, need)
            except Exception as exc:
                if on_error is None:
                    raise
                if self.waiting and self.waiting[0] is seq:
                    self.waiting.popleft()
                on_error(seq, exc)
                continue
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def prefill_chunks(self) -> list[PrefillChunk]:
        """Up to ``max_prefill_tokens`` prompt positions, oldest sequences first; a long prompt goes in pieces.

        A sequence whose prompt goes on with blocks an older one is still computing waits for them and then takes
        them from the prefix cache, rather than computing them a second time in parallel, when they take it to at
        least half its prompt (the same image and text); a shorter shared start (a system prompt before another
        image) is not worth a step of waiting and is computed again.
        """
        budget = self.config.max_prefill_tokens
        chunks = []
        pending: set[bytes] = set()  # prompt blocks the older sequences have yet to compute
        size = self.blocks.block_size
        for seq in self.prefilling:
            self.blocks.adopt_cached(seq)
            ahead = self.blocks.shareable_ahead(seq)
            shared = next((i for i, key in enumerate(ahead) if key not in pending), len(ahead))
            if shared and 2 * (seq.num_computed + shared * size) >= seq.prompt_len:
                continue
            pending.update(ahead)
            if budget <= 0:
                continue
            n = min(seq.prompt_len - seq.num_computed, budget)
            chunks.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return chunks

    def start_decoding(self, seq: Sequence) -> None:
        self.prefilling.remove(seq)
        seq.status = Status.DECODING
        self.decoding.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop ``seq`` from whichever queue holds it and free its blocks at once."""
        for queue in (self.waiting, self.prefilling, self.decoding):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.blocks.release(seq)
        seq.image_features = None
        seq.status = Status.FINISHED
