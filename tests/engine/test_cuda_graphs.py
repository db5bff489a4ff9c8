"""The CUDA-graph ladders (the capture itself needs a GPU: tests/engine/test_cuda_engine.py)."""

from __future__ import annotations

from palo.engine.cuda_graphs import batch_ladder, width_ladder


def test_every_batch_size_and_width_has_a_captured_shape_not_far_above_it():
    for max_seqs in (1, 5, 32, 64):
        ladder = batch_ladder(max_seqs)
        assert ladder[0] == 1 and ladder[-1] == max_seqs and ladder == sorted(set(ladder))
        assert all(min(b for b in ladder if b >= n) <= max(2 * n, n + 8) for n in range(1, max_seqs + 1))
    for max_blocks in (3, 8, 256):
        widths = width_ladder(max_blocks)
        assert widths[-1] == max_blocks and widths == sorted(set(widths))
        assert all(min(w for w in widths if w >= n) <= max(8, 1.5 * n) for n in range(1, max_blocks + 1))
