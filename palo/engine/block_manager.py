"""Paged KV blocks: a free list, reference counts and hash-based sharing of prompt prefixes.

Block 0 is never handed out: padded rows of a batch (CUDA-graph batch sizes) write their K/V there.

A block that held a full prompt block keeps its hash after its sequences finish. It stays in the free list (least
recently freed first), so a later prompt with the same prefix takes it back instead of recomputing it, until the
block is handed out for something else.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from palo.engine.sampling import TokenLogprob
from palo.engine.sequence import Sequence

SCRATCH_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The free list cannot hold what a sequence asks for."""


@dataclass
class BlockScores:
    """What a prompt that scores itself keeps with a cached block, so a later one can take the block.

    Attributes:
        k: Alternatives per position (a request asking for more computes the block again).
        entries: Per position of the block, its id's log-probability entry (None: the first position, an image row).
        end_hidden: ``[D]`` the hidden row at the block's last position: it predicts the next block's first id.
    """

    k: int
    entries: list[TokenLogprob | None]
    end_hidden: torch.Tensor


class BlockManager:
    """Hands out KV blocks to sequences.

    Args:
        num_blocks: Blocks in the cache (block 0 included).
        block_size: Positions per block.
        enable_prefix_cache: Share full prompt blocks by content.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.scores: dict[bytes, BlockScores] = {}  # by block key, for prompts that score themselves
        self.hits = 0  # prompt positions served from the cache, for statistics
        self.queries = 0

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    # -- admission -----------------------------------------------------------------------------------------------
    def _can_take(self, seq: Sequence, key: bytes) -> bool:
        """Whether ``seq`` may take the cached block ``key``: a prompt that scores itself only one whose scores were
        kept, with at least as many alternatives."""
        k = seq.sampling.prompt_logprobs
        if k is None:
            return True
        found = self.scores.get(key)
        return found is not None and found.k >= k

    def _take_scores(self, seq: Sequence, first: int, end: int) -> None:
        """Give a prompt that scores itself the kept scores of the blocks ``[first, end)`` it took from the cache."""
        k = seq.sampling.prompt_logprobs
        if k is None or end <= first:
            return
        keys, size = seq.block_keys(self.block_size), self.block_size
        for b in range(first, end):
            for j, entry in enumerate(self.scores[keys[b]].entries):
                seq.position_logprobs[b * size + j] = None if entry is None else (entry[0], entry[1][:k])
        seq.block_end_hidden[end * size - 1] = self.scores[keys[end - 1]].end_hidden

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the start of ``seq``'s prompt; the last prompt position is always recomputed
        (its logits give the first answer token)."""
        if not self.enable_prefix_cache:
            return []
        usable = (seq.prompt_len - 1) // self.block_size
        found: list[int] = []
        for key in seq.block_keys(self.block_size)[:usable]:
            block = self.hash_to_block.get(key)
            if block is None or not self._can_take(seq, key):
                break
            found.append(block)
        return found

    def _fits(self, cached: list[int], positions: int) -> bool:
        revived = sum(1 for b in cached if self.ref_count[b] == 0)  # cached blocks sitting in the free list
        return self.blocks_for(positions) - len(cached) <= self.num_free - revived

    def can_allocate(self, seq: Sequence, positions: int) -> bool:
        """Whether ``positions`` positions of KV can be reserved for ``seq`` now."""
        return self._fits(self._cached_prefix(seq), positions)

    def allocate(self, seq: Sequence, positions: int) -> None:
        """Reserve KV for ``positions`` positions of ``seq``, reusing cached prompt blocks.

        Sets ``seq.block_table``, ``seq.num_computed`` and ``seq.num_cached``. All or nothing: the check comes
        before any block changes hands, so a refused sequence holds none (and no cached block keeps a count for it).

        Raises:
            OutOfBlocks: When the free blocks cannot hold ``positions`` (:meth:`can_allocate` says so first).
        """
        cached = self._cached_prefix(seq)
        if not self._fits(cached, positions):
            raise OutOfBlocks(
                f"{self.blocks_for(positions) - len(cached)} new KV blocks needed for {positions} positions, "
                f"{self.num_free} free (some of them cached blocks this sequence reuses)"
            )
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
        table = list(cached)
        for _ in range(self.blocks_for(positions) - len(cached)):
            block, _ = self.free.popitem(last=False)
            if self.block_hash[block] is not None:  # evict its old content from the cache index
                if self.hash_to_block.get(self.block_hash[block]) == block:
                    del self.hash_to_block[self.block_hash[block]]
                    self.scores.pop(self.block_hash[block], None)
                self.block_hash[block] = None
            self.ref_count[block] = 1
            table.append(block)
        seq.block_table = table
        seq.num_cached = seq.num_computed = len(cached) * self.block_size
        self._take_scores(seq, 0, len(cached))
        self.hits += seq.num_cached
        self.queries += seq.prompt_len

    def adopt_cached(self, seq: Sequence) -> int:
        """Swap cached blocks in for the prompt blocks ``seq`` has not computed yet, as far as they match.

        For a sequence admitted while another one was still computing the same prefix (the answers of one prompt,
        the questions on one image): once that prefix is cached, this one takes it instead of recomputing it. Its
        own blocks there were never written and go back to the free list.

        Returns:
            Prompt positions gained.
        """
        if not self.enable_prefix_cache or seq.num_computed % self.block_size:
            return 0
        keys = seq.block_keys(self.block_size)
        usable = (seq.prompt_len - 1) // self.block_size  # the last position is always recomputed
        first = b = seq.num_computed // self.block_size
        while b < usable and (block := self.hash_to_block.get(keys[b])) is not None and self._can_take(seq, keys[b]):
            own = seq.block_table[b]
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table[b] = block
            self.ref_count[own] -= 1
            if self.ref_count[own] == 0:
                self.free[own] = None
                self.free.move_to_end(own, last=False)  # nothing worth keeping: hand it out first
            b += 1
        gained = (b - first) * self.block_size
        self._take_scores(seq, first, b)
        if gained:
            seq.block_table_row = None  # the runner's copy of the table is stale
            seq.num_computed += gained
            seq.num_cached += gained
            self.hits += gained
        return gained

    def shareable_ahead(self, seq: Sequence) -> list[bytes]:
        """Keys of the prompt blocks ``seq`` has yet to compute that it could take from the cache instead."""
        if not self.enable_prefix_cache:
            return []
        usable = (seq.prompt_len - 1) // self.block_size
        return seq.block_keys(self.block_size)[seq.num_computed // self.block_size:usable]

    def register_prefix(self, seq: Sequence) -> None:
        """Index ``seq``'s full prompt blocks computed so far, so later prompts can share them."""
        if not self.enable_prefix_cache:
            return
        keys = seq.block_keys(self.block_size)
        k, size = seq.sampling.prompt_logprobs, self.block_size
        for b, key in enumerate(keys[: seq.num_computed // size]):
            block = seq.block_table[b]
            if self.block_hash[block] is None and key not in self.hash_to_block:
                self.block_hash[block] = key
                self.hash_to_block[key] = block
            kept = self.scores.get(key)
            end_hidden = seq.block_end_hidden.get((b + 1) * size - 1)
            if k is not None and (kept is None or kept.k < k) and end_hidden is not None:
                self.scores[key] = BlockScores(k, seq.position_logprobs[b * size:(b + 1) * size], end_hidden)

    def release(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks (cached prompt blocks stay findable until they are handed out again)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:  # nothing worth keeping: hand it out first
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
