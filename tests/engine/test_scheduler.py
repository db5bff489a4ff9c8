"""Admission in arrival order, and prefill planning: a prompt that another is computing waits for it, a short shared
start does not."""

from __future__ import annotations

from palo.engine.block_manager import BlockManager
from palo.engine.config import EngineConfig
from palo.engine.sampling import SamplingParams
from palo.engine.scheduler import Scheduler
from palo.engine.sequence import EngineRequest, Sequence


def _seq(ids):
    return Sequence(EngineRequest(ids, None, SamplingParams(max_tokens=4)), tokens_per_image=0)


def _scheduler(prefix_cache: bool = True, num_blocks: int = 64) -> Scheduler:
    config = EngineConfig(max_num_seqs=8, block_size=4, max_prefill_tokens=1000, enable_prefix_cache=prefix_cache)
    return Scheduler(config, BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_cache=prefix_cache), 512)


def test_a_request_that_does_not_fit_yet_holds_back_the_later_ones():
    """First come, first served: a small request behind a large one that must wait does not jump ahead of it (it
    would fit, but then the large one could wait for ever behind a stream of small ones)."""
    scheduler = _scheduler(num_blocks=11)  # 10 usable blocks of 4 positions
    a, b = _seq(list(range(1, 29))), _seq(list(range(101, 129)))  # 28 + 4 positions: 8 blocks each
    c = _seq([201, 202, 203, 204])  # 2 blocks: it would fit beside a
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.admit() == [a]
    assert list(scheduler.waiting) == [b, c]
    assert scheduler.admit() == [] and list(scheduler.waiting) == [b, c]
    scheduler.finish(a)
    assert scheduler.admit() == [b, c] and not scheduler.waiting


def test_a_prompt_mostly_shared_with_one_being_computed_waits_and_then_takes_its_blocks():
    scheduler = _scheduler()
    leader = _seq(list(range(1, 41)))
    same = _seq(list(range(1, 41)))  # the second answer of one prompt
    mostly = _seq(list(range(1, 33)) + [90, 91, 92, 93, 94])  # the same image, another question
    barely = _seq(list(range(1, 9)) + list(range(100, 132)))  # the same system prompt, another image
    for seq in (leader, same, mostly, barely):
        scheduler.add(seq)
    scheduler.admit()
    planned = [c.seq for c in scheduler.prefill_chunks()]
    assert planned == [leader, barely]  # 8 shared positions of 40 are not worth a step's wait
    leader.num_computed = leader.prompt_len
    scheduler.blocks.register_prefix(leader)
    chunks = {c.seq: (c.start, c.end) for c in scheduler.prefill_chunks()}
    assert chunks[same] == (36, 40) and chunks[mostly] == (32, 37)  # they took the leader's blocks
    assert same.num_cached == 36 and mostly.num_cached == 32


def test_without_the_prefix_cache_nothing_waits():
    scheduler = _scheduler(prefix_cache=False)
    seqs = [_seq(list(range(1, 41))) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.admit()
    assert [c.seq for c in scheduler.prefill_chunks()] == seqs
