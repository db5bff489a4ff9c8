"""The scoring benchmark: the engine's prompt log-probabilities give each option the forward pass's value."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))

import scoring  # noqa: E402


def test_both_ways_score_every_option_alike(world):
    from palo.engine import EngineConfig, LLMEngine
    from palo.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    model.eval()

    documents = scoring.build_documents(tokenizer, processor, model, docs=2, options=3)
    reference = scoring.score_forward(model, documents)
    scored = scoring.score_engine(LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=6, max_prefill_tokens=64)),
                                  documents)
    assert len(reference) == len(scored) == 6 and len(set(reference)) == 6
    assert max(abs(a - b) for a, b in zip(reference, scored)) < 1e-4
