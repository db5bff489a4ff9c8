"""The paged decode-attention kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess.

On a GPU the same kernel is what the engine decodes with (tests/engine/test_cuda_engine.py covers the graphs);
here it is checked against SDPA over gathered blocks, and end to end against ``model.generate``.
"""

from __future__ import annotations

import os

import pytest

from palo.testing.triton_interpreter import ROOT, interpreter_unusable, run_interpreted

_why_not = interpreter_unusable()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


def test_kernel_equals_sdpa_over_gathered_blocks_with_gqa_and_ragged_lengths():
    out = run_interpreted("""
        import torch
        from palo.engine.triton_attention import paged_decode_attention
        torch.manual_seed(0)
        B, H, Hkv, D, bs, nb = 4, 8, 2, 24, 4, 40          # head dim not a power of two, 4 query heads per kv head
        kv = torch.randn(2, 2, nb * bs, Hkv, D)             # (layer, k/v, slot, head, dim): layer 1 is read
        q = torch.randn(B, H, D)
        lengths = torch.tensor([5, 13, 1, 70])              # 70 > the kernel's 64-position tile
        tables = torch.zeros(B, 18, dtype=torch.long)
        perm = torch.randperm(nb - 1) + 1
        used = 0
        for b, n in enumerate(lengths.tolist()):
            k = -(-n // bs)
            tables[b, :k] = perm[used:used + k] if used + k <= len(perm) else torch.arange(1, k + 1)
            used += k
        out = paged_decode_attention(q, kv[1, 0], kv[1, 1], tables, lengths, bs, D ** -0.5)
        worst = 0.0
        for b in range(B):
            n = int(lengths[b])
            slots = torch.tensor([int(tables[b, p // bs]) * bs + p % bs for p in range(n)])
            k = kv[1, 0][slots].transpose(0, 1).repeat_interleave(H // Hkv, 0)
            v = kv[1, 1][slots].transpose(0, 1).repeat_interleave(H // Hkv, 0)
            ref = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, scale=D ** -0.5)[:, 0]
            worst = max(worst, (out[b] - ref).abs().max().item())
        print(worst)
    """)
    assert float(out.strip().splitlines()[-1]) < 1e-5


def test_the_engine_with_the_kernel_gives_the_tokens_of_generate(world):
    out = run_interpreted(f"""
        import os, sys, torch
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.path.insert(0, {os.path.join(ROOT, "tests", "engine")!r})
        from engine_helpers import QUESTIONS, pixels, prompt_ids, reference_tokens
        from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
        from palo.model.builder import load_pretrained_model
        tokenizer, model, processor, _ = load_pretrained_model({world.full_dir!r}, device="cpu")
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8, attention="triton"))
        assert engine.stats()["decode_attention"] == "triton"
        requests, expected = [], []
        for i in range(3):
            ids = prompt_ids(tokenizer, QUESTIONS[i * 3], i % 2)
            image = pixels(processor, model, ["red"]) if i % 2 else None
            requests.append(EngineRequest(ids, image, SamplingParams(max_tokens=6 + 3 * i)))
            expected.append(reference_tokens(model, tokenizer, ids, image, 6 + 3 * i, engine.eos_ids))
        got = [o.token_ids for o in engine.generate(requests)]
        print(got == expected, got, expected)
    """, timeout=600)
    assert out.strip().splitlines()[-1].startswith("True"), out[-2000:]
