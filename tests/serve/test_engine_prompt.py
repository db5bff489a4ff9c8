"""The worker engine's prompt preparation follows the checkpoint's prompt rules (palo.model.config)."""

from __future__ import annotations

import pytest
from serve_helpers import image_b64, make_image, vicuna_prompt

from palo.constants import IMAGE_TOKEN_INDEX
from palo.mm_utils import tokenizer_image_token
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


def _params(question: str, images: int = 1) -> dict:
    return {"prompt": vicuna_prompt(question, image=images > 0), "images": [image_b64(make_image("red"))] * images,
            "temperature": 0, "max_new_tokens": 4}


def test_im_start_end_checkpoints_get_bracketed_placeholders(loaded):
    tokenizer, model, image_processor, context_len = loaded
    engine = GenerationEngine(tokenizer, model, image_processor, context_len)
    plain = engine.prepare(_params("What is this?"))
    assert plain.input_ids == tokenizer_image_token(vicuna_prompt("What is this?"), tokenizer)
    model.config.mm_use_im_start_end = True
    try:
        wrapped = engine.prepare(_params("What is this?"))
    finally:
        model.config.mm_use_im_start_end = False
    expected = vicuna_prompt("What is this?").replace("<image>", "<im_start><image><im_end>")
    assert wrapped.input_ids == tokenizer_image_token(expected, tokenizer)
    assert wrapped.input_ids != plain.input_ids and wrapped.prompt == plain.prompt  # the client's text is kept


def test_prompt_tokens_count_each_image_once(loaded):
    tokenizer, model, image_processor, context_len = loaded
    engine = GenerationEngine(tokenizer, model, image_processor, context_len)
    per_image = engine.image_token_count
    assert per_image > 1
    one = engine.prepare(_params("What is this?"))
    assert one.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    # The sentinel is replaced by the image rows: it is not a position of its own.
    assert one.prompt_tokens == len(one.input_ids) - 1 + per_image
    text = engine.prepare(_params("What is this?", images=0))
    assert text.prompt_tokens == len(text.input_ids)
