"""The tiny checkpoint, loaded once for the engine tests."""

from __future__ import annotations

import pytest

from palo.model.builder import load_pretrained_model


@pytest.fixture(scope="session")
def loaded(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    return tokenizer, model.eval(), processor
