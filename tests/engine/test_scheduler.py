"""Prefill planning: a prompt that another is computing waits for it, a short shared start does not."""

from __future__ import annotations

from palo.engine.block_manager import BlockManager
from palo.engine.config import EngineConfig
from palo.engine.sampling import SamplingParams
from palo.engine.scheduler import Scheduler
from palo.engine.sequence import EngineRequest, Sequence


def _seq(ids):
    return Sequence(EngineRequest(ids, None, SamplingParams(max_tokens=4)), tokens_per_image=0)


def _scheduler(prefix_cache: bool = True) -> Scheduler:
    config = EngineConfig(max_num_seqs=8, block_size=4, max_prefill_tokens=1000, enable_prefix_cache=prefix_cache)
    return Scheduler(config, BlockManager(num_blocks=64, block_size=4, enable_prefix_cache=prefix_cache), 512)


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
