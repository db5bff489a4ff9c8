"""The host-time benchmark measures the engine as it is: its stand-in forward still fits the runner."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))

import engine_host  # noqa: E402


def test_measure_streams_the_same_texts_every_run(world):
    result = engine_host.measure(ROOT, world.tokenizer_dir, streams=3, tokens=12, repeats=2)
    assert len(result["ms_per_step"]) == 2 and all(ms > 0 for ms in result["ms_per_step"])
    assert result["chars"] > 3 * 12  # real text was streamed (each run's digest was checked to be the same)


def test_penalised_streams_stream_the_same_texts_as_unpenalised_ones(world):
    """The ``--repetition-penalty`` comparison times the same work: the stand-in's choices survive the penalty."""
    plain = engine_host.measure(ROOT, world.tokenizer_dir, streams=3, tokens=12, repeats=1)
    penalised = engine_host.measure(ROOT, world.tokenizer_dir, streams=3, tokens=12, repeats=1,
                                    repetition_penalty=1.1)
    assert penalised["texts_sha256"] == plain["texts_sha256"]


def test_eos_after_ends_the_text_and_keeps_generating(world):
    """``--eos-after N``: the answers' text stops after N tokens (the rest is </s>, which adds none) while the
    streams go on to their length, so what is timed is the run of skipped special tokens."""
    full = engine_host.measure(ROOT, world.tokenizer_dir, streams=3, tokens=24, repeats=1)
    cut = engine_host.measure(ROOT, world.tokenizer_dir, streams=3, tokens=24, repeats=1, eos_after=4)
    assert 0 < cut["chars"] < full["chars"]
