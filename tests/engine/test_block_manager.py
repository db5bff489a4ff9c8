"""Paged blocks: reservation, release, and prefix sharing by content."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import COLLIDING_BLOCKS

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine.block_manager import BlockManager, OutOfBlocks
from palo.engine.sampling import SamplingParams
from palo.engine.sequence import EngineRequest, Sequence


def _seq(ids, images=None, n=4, salt=None):
    return Sequence(EngineRequest(ids, images, SamplingParams(max_tokens=4), cache_salt=salt), tokens_per_image=n)


def test_blocks_are_reserved_released_and_never_include_the_scratch_block():
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_cache=False)
    a, b = _seq(list(range(1, 10))), _seq(list(range(1, 10)))
    assert blocks.can_allocate(a, 12)
    blocks.allocate(a, 12)
    assert len(a.block_table) == 3 and 0 not in a.block_table and blocks.num_free == 2
    assert not blocks.can_allocate(b, 12)
    blocks.release(a)
    assert blocks.num_free == 5 and blocks.can_allocate(b, 12)


def test_a_shared_prefix_reuses_blocks_and_the_last_position_is_always_recomputed():
    blocks = BlockManager(num_blocks=20, block_size=4)
    first = _seq(list(range(1, 13)))  # 3 full blocks
    blocks.allocate(first, 14)
    first.num_computed = 12
    blocks.register_prefix(first)
    same = _seq(list(range(1, 13)))
    blocks.allocate(same, 14)
    assert same.num_cached == 8  # 2 of 3 blocks: the last prompt position must run to give logits
    assert same.block_table[:2] == first.block_table[:2] and blocks.ref_count[first.block_table[0]] == 2
    longer = _seq(list(range(1, 13)) + [50, 51, 52, 53, 54])
    blocks.allocate(longer, 20)
    assert longer.num_cached == 12
    diverging = _seq([1, 2, 3, 4, 9, 9, 9, 9, 9])
    blocks.allocate(diverging, 10)
    assert diverging.num_cached == 4


def test_freed_cached_blocks_are_found_again_until_handed_out():
    blocks = BlockManager(num_blocks=5, block_size=2)
    seq = _seq([5, 6, 7, 8, 9])
    blocks.allocate(seq, 6)
    seq.num_computed = 5
    blocks.register_prefix(seq)
    blocks.release(seq)
    again = _seq([5, 6, 7, 8, 9])
    assert blocks.can_allocate(again, 6)
    blocks.allocate(again, 6)
    assert again.num_cached == 4
    blocks.release(again)
    other = _seq([1, 1, 1, 1, 1, 1, 1])  # needs every block: the cached ones are evicted
    blocks.allocate(other, 8)
    assert not blocks.hash_to_block and other.num_cached == 0


def test_released_blocks_without_cached_content_are_handed_out_before_cached_ones():
    """A finished sequence's answer blocks (nothing to find again) go to the front of the free list, so a short
    request that comes and goes takes them again and the cached prompt blocks survive it."""
    blocks = BlockManager(num_blocks=4, block_size=2)  # 3 usable blocks
    cached = _seq([5, 6, 7, 8, 9])
    blocks.allocate(cached, 6)  # every block: 2 full prompt blocks and one for the rest
    cached.num_computed = 5
    blocks.register_prefix(cached)
    rest = cached.block_table[2]
    blocks.release(cached)
    for ids in ([1], [2]):  # a short unrelated request, then another
        short = _seq(ids)
        blocks.allocate(short, 2)
        assert short.block_table == [rest]
        blocks.release(short)
    again = _seq([5, 6, 7, 8, 9])
    blocks.allocate(again, 6)
    assert again.num_cached == 4  # both cached prompt blocks are still there


def test_image_rows_are_keyed_by_the_image_content():
    blocks = BlockManager(num_blocks=30, block_size=4)
    red, blue = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    ids = [1, 2, 3, 4, IMAGE_TOKEN_INDEX, 7, 8]  # image rows at 4..11
    first = _seq(ids, red, n=8)
    blocks.allocate(first, first.prompt_len + 2)
    first.num_computed = first.prompt_len
    blocks.register_prefix(first)
    same = _seq(ids, red.clone(), n=8)
    blocks.allocate(same, same.prompt_len + 2)
    assert same.num_cached == 12
    other = _seq(ids, blue, n=8)
    blocks.allocate(other, other.prompt_len + 2)
    assert other.num_cached == 4  # only the text before the image


def test_blocks_that_collide_under_pythons_hash_are_not_shared():
    """Blocks are shared between requests, so their keys must not collide for different content, even for a
    client who chooses its prompt to make them collide."""
    a, b = COLLIDING_BLOCKS
    assert a != b and hash(tuple(a)) == hash(tuple(b))  # the pair really collides
    blocks = BlockManager(num_blocks=8, block_size=16)
    first = _seq(a + [9, 9])
    blocks.allocate(first, 20)
    first.num_computed = first.prompt_len
    blocks.register_prefix(first)
    second = _seq(b + [9, 9])
    assert second.block_keys(16) != first.block_keys(16)
    blocks.allocate(second, 20)
    assert second.num_cached == 0 and second.block_table[0] != first.block_table[0]
    again = _seq(a + [7, 7])
    blocks.allocate(again, 20)
    assert again.num_cached == 16  # the same content still shares


def test_a_blocks_key_holds_its_images_in_their_order():
    """Rows of two images in one block: the same images in the other order, or another image, is another block."""
    red, blue = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    ids = [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 5, 6, 7]  # block 0: id 1, red's 2 rows, blue's first row

    def key(*images):
        return _seq(ids, torch.cat(images), n=2).block_keys(4)[0]

    assert key(red, blue) == key(red.clone(), blue.clone())
    assert len({key(red, blue), key(blue, red), key(red, red), key(blue, blue)}) == 4


def test_a_cache_salt_shares_blocks_only_with_the_same_salt():
    red = torch.zeros(1, 3, 8, 8)
    ids = [1, 2, 3, 4, 5, 6, IMAGE_TOKEN_INDEX, 7, 8]  # blocks of 4: text, text + image, image rows

    def admitted(salt, blocks):
        seq = _seq(ids, red.clone(), n=8, salt=salt)
        blocks.allocate(seq, seq.prompt_len + 2)
        seq.num_computed = seq.prompt_len
        blocks.register_prefix(seq)
        return seq

    for first, second, shared in ((None, None, True), ("alice", "alice", True), ("alice", "bob", False),
                                  (None, "alice", False), ("alice", None, False), ("", None, False)):
        blocks = BlockManager(num_blocks=30, block_size=4)
        admitted(first, blocks)
        later = admitted(second, blocks)
        assert later.num_cached == (12 if shared else 0), (first, second)
    assert _seq(ids, red, n=8, salt="alice").image_keys != _seq(ids, red, n=8, salt="bob").image_keys


def test_a_sequence_admitted_beside_its_prefix_adopts_it_once_cached_and_frees_its_own_blocks():
    blocks = BlockManager(num_blocks=12, block_size=4)
    first, second = _seq(list(range(1, 14))), _seq(list(range(1, 12)) + [40, 41])  # 11 ids shared
    blocks.allocate(first, 16)
    blocks.allocate(second, 16)  # admitted together: nothing cached yet
    assert second.num_cached == 0 and blocks.num_free == 3
    assert blocks.shareable_ahead(second)[:2] == blocks.shareable_ahead(first)[:2]  # 3 full blocks; the last runs
    assert len(blocks.shareable_ahead(first)) == 3 and len(blocks.shareable_ahead(second)) == 3
    own = list(second.block_table)
    first.num_computed = 8  # two blocks computed, a chunk's worth
    blocks.register_prefix(first)
    assert blocks.adopt_cached(second) == 8 and (second.num_computed, second.num_cached) == (8, 8)
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2:] == own[2:]
    assert blocks.num_free == 5 and all(blocks.ref_count[b] == 0 for b in own[:2])  # its unwritten blocks are back
    first.num_computed = 13
    blocks.register_prefix(first)
    assert blocks.adopt_cached(second) == 0  # block 2 differs (ids 9-12 vs 9-11, 40)
    assert blocks.shareable_ahead(first) == [] and len(blocks.shareable_ahead(second)) == 1
    blocks.release(first)
    blocks.release(second)
    assert blocks.num_free == blocks.usable_blocks


def test_an_allocation_that_does_not_fit_is_refused_before_any_block_changes_hands():
    blocks = BlockManager(num_blocks=5, block_size=2)
    first = _seq([5, 6, 7, 8, 9])
    blocks.allocate(first, 6)
    first.num_computed = 5
    blocks.register_prefix(first)  # its two full prompt blocks are now cached and shared
    before = (list(blocks.ref_count), list(blocks.free), dict(blocks.hash_to_block))
    greedy = _seq([5, 6, 7, 8, 9])  # takes the two cached blocks, then wants 3 more of the 1 free
    assert not blocks.can_allocate(greedy, 10)
    with pytest.raises(OutOfBlocks, match="3 new KV blocks needed for 10 positions, 1 free"):
        blocks.allocate(greedy, 10)
    assert (list(blocks.ref_count), list(blocks.free), dict(blocks.hash_to_block)) == before
    assert greedy.block_table == []
    blocks.release(first)
    assert blocks.num_free == blocks.usable_blocks  # nothing leaked to the refused sequence
