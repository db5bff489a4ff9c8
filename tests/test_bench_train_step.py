"""The training-mix benchmark's baseline does the same work as PALO: transformers' Llava on the padded batches
(each image sentinel expanded to its image-token rows) gives PALO's loss and counts the same real positions."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
train_step = pytest.importorskip("train_step")


def test_llava_baseline_batches_train_on_what_palo_trains_on():
    from palo.train.dataset import DataCollator
    from palo.train.flops import FlopCounter

    # model_max_length under most samples' lengths: PALO truncates, Llava does not, so the mix must cut them first.
    args = argparse.Namespace(shape="tiny", device="cpu", dtype="float32", batch=4, repeats=1, lora=False,
                              gradient_checkpointing=False, model_max_length=96, attn_implementation=None,
                              liger=False, compile_layers=False, peak_flops=1e12)
    shape = train_step.SHAPES["tiny"]
    batch = train_step._mix_batches(args, shape.vocab, shape.vision["image_size"])[0]
    assert any("image" in item for item in batch)
    results = {}
    for side in ("palo", "llava"):
        torch.manual_seed(0)
        model, base, optimizer = train_step._mix_model(args, side=side)
        collated = (DataCollator(pad_token_id=0)(batch) if side == "palo"
                    else train_step._llava_batch(batch, shape.vocab - 1, base.image_token_count))
        results[side] = train_step._mix_step(model, optimizer, FlopCounter.of(base), collated, args)
    (palo_loss, *palo_counts), (llava_loss, *llava_counts) = results["palo"], results["llava"]
    assert llava_loss == pytest.approx(palo_loss, rel=1e-5)
    assert llava_counts == pytest.approx(palo_counts)  # real positions, all positions, FLOPs


@pytest.mark.timeout(120)  # without the fix the benchmark waits for ever
def test_a_measuring_process_that_dies_ends_the_benchmark_with_its_reason(capfd):
    """Each side measures in a spawned process; one that fails (here: too little data for a timed step after the
    warm-up) must end the run at once, not leave the benchmark waiting for its result."""
    args = argparse.Namespace(shape="tiny", device="cpu", dtype="float32", batch=1, repeats=0, lora=False,
                              gradient_checkpointing=False, model_max_length=96, attn_implementation=None,
                              liger=False, compile_layers=False, packing_rows=0, peak_flops=1e12)
    with pytest.raises(SystemExit, match=r"_time_mix failed \(exit code 1\)"):
        train_step._in_process(train_step._time_mix, args)
    assert "raise --repeats or --batch" in capfd.readouterr().err  # the child's reason, on stderr
