"""The generation benchmark's equal-work check: where the engine's answer parts from ``generate``'s, it reports how
close ``generate``'s two best logits were there, and how far the two sides' logits are on the shared prefix."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
generate = pytest.importorskip("generate")


def test_logit_check_measures_shared_prefixes_and_the_margin_where_rows_part():
    vocab = 5
    scores = torch.full((2, 3, vocab), -1.0)
    scores[:, :, 0] = float("-inf")  # masked by a processor (min_new_tokens): never compared
    scores[0, 0, 1], scores[0, 1, 2], scores[0, 2, 3] = 2.0, 2.0, 2.0  # row 0: generate says 1, 2, 3
    scores[1, 0, 4], scores[1, 1, 2] = 2.0, 2.0  # row 1: 4, then 2 by a hair over 3, then 1
    scores[1, 1, 3] = 1.99
    scores[1, 2, 1] = 2.0
    expected = [[1, 2, 3], [4, 2, 1]]
    tokens = [[1, 2, 3], [4, 3, 1]]  # row 1 parts at its second token
    engine = scores.clone()
    engine[:, :, 0] = 0.0
    engine[0, 1, 2] += 0.001
    engine[1, 1, 3] += 0.02  # the engine's logits there: 3 wins
    engine[1, 2, 1] += 5.0  # after parting: not comparable, must be left out
    # Decode steps start after the first token (it comes from prefill): step k holds each row at answer length k.
    steps = [([(id(tokens[0]), k), (id(tokens[1]), k)], engine[:, k]) for k in (1, 2)]
    check = generate._logit_check(tokens, expected, scores, steps)
    assert check["diverging_rows"] == 1
    assert check["max_margin_at_divergence"] == pytest.approx(0.01, abs=1e-6)
    assert check["max_logit_diff"] == pytest.approx(0.02, abs=1e-6)  # row 1 step 1 (shared prefix [4]) counts
    same = generate._logit_check(expected, expected, scores, [([(id(expected[0]), 1)], scores[:1, 1])])
    assert same == {"max_logit_diff": 0.0, "diverging_rows": 0, "max_margin_at_divergence": None}
