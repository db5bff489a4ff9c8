"""The engine on CUDA: decode replayed from CUDA graphs gives the eager engine's tokens. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import QUESTIONS, pixels, prompt_ids

from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
from palo.model.builder import load_pretrained_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode(world, dtype):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cuda", dtype=dtype)
    requests = lambda: [EngineRequest(prompt_ids(tokenizer, QUESTIONS[i], i % 2),  # noqa: E731
                                      pixels(processor, model, ["red"]).to("cuda", dtype) if i % 2 else None,
                                      SamplingParams(max_tokens=12 + i, ignore_eos=True)) for i in range(5)]
    eager = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8, cuda_graphs=False, kv_cache_gb=0.05))
    graphed = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8, kv_cache_gb=0.05))
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    replays = []
    run = graphed.runner.graphs.run
    graphed.runner.graphs.run = lambda seqs: (replays.append(len(seqs)), run(seqs))[1]
    out_e = [o.token_ids for o in eager.generate(requests())]
    out_g = [o.token_ids for o in graphed.generate(requests())]
    assert replays and out_g == out_e


def test_cuda_float32_engine_equals_generate(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cuda", dtype=torch.float32)
    ids = prompt_ids(tokenizer, QUESTIONS[8], 1)
    image = pixels(processor, model, ["green"]).to("cuda")
    expected = model.generate(torch.tensor([ids], device="cuda"), images=image, max_new_tokens=16, min_new_tokens=16,
                              do_sample=False)[0, len(ids):].tolist()
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8, kv_cache_gb=0.05))
    out = engine.generate([EngineRequest(ids, image, SamplingParams(max_tokens=16, ignore_eos=True))])[0]
    assert out.token_ids == expected


def test_triton_decode_kernel_equals_gathered_sdpa_on_cuda(world):
    pytest.importorskip("triton")
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cuda", dtype=torch.float32)
    requests = lambda: [EngineRequest(prompt_ids(tokenizer, QUESTIONS[i], 1), pixels(processor, model, ["blue"]).cuda(),  # noqa: E731
                                      SamplingParams(max_tokens=20, ignore_eos=True)) for i in range(4)]
    outputs = {}
    for attention in ("sdpa", "triton"):
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, block_size=8, kv_cache_gb=0.05,
                                                          attention=attention, cuda_graphs=False))
        assert engine.stats()["decode_attention"] == attention
        outputs[attention] = [o.token_ids for o in engine.generate(requests())]
    assert outputs["triton"] == outputs["sdpa"]


def test_per_request_sampling_settings_on_cuda_give_the_cpu_engines_tokens(world):
    """Penalties (counts kept on the device), logit bias, min_p/min_tokens and stop ids, greedy, in one CUDA-graph
    batch: the same tokens as the engine on CPU (float32 both)."""
    settings = [dict(repetition_penalty=1.6), dict(frequency_penalty=1.2, presence_penalty=0.5),
                dict(logit_bias={7: 3.0, 11: -100}), dict(min_tokens=6, stop_token_ids=[5]), dict()]
    answers = {}
    for device in ("cpu", "cuda"):
        tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device=device, dtype=torch.float32)
        requests = [EngineRequest(prompt_ids(tokenizer, QUESTIONS[i], i % 2),
                                  pixels(processor, model, ["red"]).to(device) if i % 2 else None,
                                  SamplingParams(max_tokens=16, **extra)) for i, extra in enumerate(settings)]
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, block_size=8, kv_cache_gb=0.05))
        answers[device] = [o.token_ids for o in engine.generate(requests)]
    assert answers["cuda"] == answers["cpu"]
