"""The CUDA path (half precision, device_map) on the tiny checkpoints. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from palo.mm_utils import tokenizer_image_token
from palo.model.builder import load_pretrained_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_and_generate_on_cuda(world, dtype):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.dtype == dtype
    assert model.get_vision_tower().dtype == dtype
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None].cuda()
    pixels = torch.randn(1, 3, 56, 56, device="cuda", dtype=dtype)
    out = model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)
    # Half precision agrees with the float32 CPU reference on the first greedy token.
    with torch.no_grad():
        ref = world.model(input_ids=ids.cpu(), images=pixels.float().cpu()).logits[0, -1]
        ours = model(input_ids=ids, images=pixels).logits[0, -1].float().cpu()
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05)


def test_ldp_checkpoint_on_cuda(world):
    tokenizer, model, _, _ = load_pretrained_model(world.ldp_dir, device="cuda")
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None].cuda()
    pixels = torch.randn(1, 3, 56, 56, device="cuda", dtype=torch.float16)
    out = model.generate(ids, images=pixels, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_load_and_generate_on_cuda(world, bits):
    pytest.importorskip("bitsandbytes", reason="4/8-bit loading needs bitsandbytes")
    tokenizer, model, _, _ = load_pretrained_model(
        world.full_dir, device="cuda", load_4bit=bits == 4, load_8bit=bits == 8
    )
    quantized = [n for n, m in model.named_modules()
                 if "Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__]
    assert any(".layers.0.self_attn.q_proj" in n for n in quantized)
    assert not any("mm_projector" in n or "vision_tower" in n for n in quantized)  # kept in half precision
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None].cuda()
    pixels = torch.randn(1, 3, 56, 56, device="cuda", dtype=torch.float16)
    out = model.generate(ids, images=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
