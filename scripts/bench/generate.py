"""Benchmark: the generation engine against ``model.generate``, and PALO against transformers' Llava.

``--baseline generate`` (default): :mod:`palo.engine` against PALO's ``model.generate`` (transformers' generation
loop with static batches) on the same model, for batches of 1, 8 and 32 requests (one image + ``--prompt-len`` text
tokens each, ``--new-tokens`` greedy tokens each, end-of-sequence ignored). Measured: time to first token (a request
submitted with all others; ``generate`` gives every row its first token at once) and decode tokens/s over all rows
after the first token. Equal work is checked: in float32 both give every row the same tokens; in half precision,
where the two sides' rounding can flip near-ties, rows may part, and the check reports the largest logit difference
on the shared prefixes and how close ``generate``'s two best logits were where each row parted. Each side runs
``--repeats`` times after a warm-up; medians are printed with the ratio engine / generate for throughput and
generate / engine for time to first token (above 1: the engine is better). On CUDA it also prints the engine's
peak memory split into the weights, the KV cache the engine announced, and what goes beyond the two (activations,
logits, the CUDA graphs' pool).

``--baseline llava``: PALO against transformers' LlavaForConditionalGeneration with the same weights:

Both models hold the *same tensors* (the baseline's parameters alias ours, so memory is not doubled) and see the
same prompts and images. Measured, as the median of ``--repeats`` runs after a warm-up:

* prefill: one forward over the prompt with its image(s) (vision tower, projector, language model);
  the two models run alternately (ABBA) so that machine drift affects both alike;
* decode: per-token time of greedy generation with the KV cache, ``(t(n new) - t(1 new)) / (n - 1)``;

at batch 1 and at ``--batch`` (same-length prompts, one image each). Printed as a table with the ratio
baseline / PALO (above 1 means PALO is faster). Equal work is checked: the last-token logits of both agree to
rounding and, in float32, both produce the same greedy tokens (in half precision, rounding differences between the
two graphs can flip near-ties of random weights, so only the logit difference is meaningful there).

Examples::

    python scripts/bench/generate.py                      # engine vs generate, tiny shapes, CPU
    python scripts/bench/generate.py --shape 7b --device cuda --dtype bfloat16 --batches 1 8 32
    python scripts/bench/generate.py --baseline llava     # PALO vs HF Llava, tiny shapes, CPU
    python scripts/bench/generate.py --shape mobile       # MobileLLaMA-1.4B-sized LLM + CLIP-L/336 (fp32, ~12 GB)
    python scripts/bench/generate.py --shape 7b --device cuda --dtype bfloat16   # PALO-7B shapes, random weights
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from palo.constants import IMAGE_TOKEN_INDEX
from palo.model.config import PaloConfig
from palo.model.palo_llama import PaloForCausalLM
from palo.model.vision_tower import VISION_PRESETS
from palo.testing.hf_llava import llava_config, to_llava_state_dict


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    vision: dict


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                   patch_size=14, projection_dim=32, hidden_act="quick_gelu")
SHAPES = {
    "tiny": Shape(64, 2, 4, 128, 1000, TINY_VISION),
    "mobile": Shape(2048, 24, 16, 5632, 32000, VISION_PRESETS["openai/clip-vit-large-patch14-336"]),
    "7b": Shape(4096, 32, 32, 11008, 32000, VISION_PRESETS["openai/clip-vit-large-patch14-336"]),
}


def build_models(shape: Shape, device: str,
                 dtype: torch.dtype) -> tuple[PaloForCausalLM, LlavaForConditionalGeneration]:
    """Random PALO model (mlp2x_gelu) and an HF Llava whose parameters are the same tensors."""
    llama = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                 num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, pad_token_id=0)
    vision = CLIPVisionConfig(**shape.vision)
    config = PaloConfig(**llama, mm_vision_tower="benchmark/clip", mm_vision_config=vision.to_dict(),
                        mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                        mm_hidden_size=vision.hidden_size, mm_projector_type="mlp2x_gelu", mm_use_im_patch_token=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            palo = PaloForCausalLM(config)
            for p in palo.parameters():  # scaled init keeps activations finite at depth
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
            llava = LlavaForConditionalGeneration(llava_config(LlamaConfig(**llama), vision, shape.vocab - 1))
    finally:
        torch.set_default_dtype(default_dtype)
    mapped = to_llava_state_dict(palo.state_dict())
    # assign=True makes the baseline's parameters the very same tensors (its own random ones are freed).
    result = llava.load_state_dict(mapped, strict=False, assign=True)
    if result.unexpected_keys or [k for k in result.missing_keys if "position_ids" not in k]:
        raise RuntimeError(f"weight mapping incomplete: {result}")
    return palo.eval(), llava.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _paired_medians(fn_a, fn_b, repeats: int, device: str) -> tuple[float, float]:
    """Median wall time of two callables, measured in alternating (ABBA) order so drift hits both alike."""
    fn_a(), fn_b()  # warm-up
    _sync(device)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(repeats):
        order = (("a", fn_a), ("b", fn_b)) if i % 2 == 0 else (("b", fn_b), ("a", fn_a))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["a"]), statistics.median(times["b"])


def run(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    palo, llava = build_models(shape, args.device, dtype)
    vision = CLIPVisionConfig(**shape.vision)
    n_img = palo.get_vision_tower().num_tokens
    image_token = shape.vocab - 1
    results = []
    for batch in sorted({1, args.batch}):
        gen = torch.Generator().manual_seed(batch)
        text = torch.randint(3, shape.vocab - 2, (batch, args.prompt_len), generator=gen)
        ids = torch.cat([text[:, :5], torch.full((batch, 1), IMAGE_TOKEN_INDEX), text[:, 5:]], dim=1).to(args.device)
        hf_ids = torch.cat([text[:, :5], torch.full((batch, n_img), image_token), text[:, 5:]], dim=1).to(args.device)
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=gen).to(args.device, dtype)

        def palo_prefill():
            with torch.no_grad():
                palo(input_ids=ids, images=pixels, logits_to_keep=1)

        def hf_prefill():
            with torch.no_grad():
                llava(input_ids=hf_ids, pixel_values=pixels, logits_to_keep=1)

        def palo_gen(n):
            return lambda: palo.generate(ids, images=pixels, max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, pad_token_id=0)

        def hf_gen(n):
            return lambda: llava.generate(input_ids=hf_ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=0)

        # Equal work: the same last-token logits (to rounding) and, in float32, the same greedy tokens.
        with torch.no_grad():
            ours = palo(input_ids=ids, images=pixels, logits_to_keep=1).logits.float()
            theirs = llava(input_ids=hf_ids, pixel_values=pixels, logits_to_keep=1).logits.float()
        logit_diff = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        same = torch.equal(palo_gen(args.new_tokens)()[:, ids.shape[1]:],
                           hf_gen(args.new_tokens)()[:, hf_ids.shape[1]:])
        row = {"batch": batch, "same_tokens": same, "logit_rel_diff": logit_diff}
        row["palo_prefill_ms"], row["hf_llava_prefill_ms"] = (
            1000 * t for t in _paired_medians(palo_prefill, hf_prefill, args.repeats, args.device)
        )
        p1, h1 = _paired_medians(palo_gen(1), hf_gen(1), args.repeats, args.device)
        pn, hn = _paired_medians(palo_gen(args.new_tokens), hf_gen(args.new_tokens), args.repeats, args.device)
        row["palo_decode_ms_per_token"] = 1000 * (pn - p1) / (args.new_tokens - 1)
        row["hf_llava_decode_ms_per_token"] = 1000 * (hn - h1) / (args.new_tokens - 1)
        row["prefill_ratio"] = row["hf_llava_prefill_ms"] / row["palo_prefill_ms"]
        row["decode_ratio"] = row["hf_llava_decode_ms_per_token"] / row["palo_decode_ms_per_token"]
        results.append(row)
    return results


def _logit_check(tokens: list[list[int]], expected: list[list[int]], scores: torch.Tensor,
                 steps: list[tuple[list[tuple[int, int]], torch.Tensor]]) -> dict:
    """How the engine's decode logits compare with ``generate``'s scores where both answers still agree.

    Args:
        tokens: The engine's answers (each the list object its sequence filled, which identifies it in ``steps``).
        expected: ``generate``'s answers, in the same order.
        scores: ``[B, n, V]`` ``generate``'s processed scores (-inf where a processor masked a token).
        steps: Per engine decode step: ``(id of the answer list, its length before the step)`` for each row, and
            the step's ``[rows, V]`` logits.

    Returns:
        ``max_logit_diff`` over the steps whose answers so far equal ``generate``'s, ``diverging_rows``, and
        ``max_margin_at_divergence``: the largest top-1 minus top-2 gap of ``generate``'s scores where a row's
        tokens first part (a near-tie when it is not above ``max_logit_diff``; None when no row parts).
    """
    row_of = {id(answer): i for i, answer in enumerate(tokens)}
    diff, margins = 0.0, []
    for rows, logits in steps:
        for (answer, length), row_logits in zip(rows, logits.float().cpu()):
            i = row_of[answer]
            if length >= len(expected[i]) or tokens[i][:length] != expected[i][:length]:
                continue
            reference = scores[i, length].cpu()
            live = torch.isfinite(reference)
            diff = max(diff, float((row_logits[live] - reference[live]).abs().max()))
            if tokens[i][length] != expected[i][length]:
                top = reference.topk(2).values
                margins.append(float(top[0] - top[1]))
    return {"max_logit_diff": diff, "diverging_rows": sum(t != e for t, e in zip(tokens, expected)),
            "max_margin_at_divergence": max(margins, default=None)}


def run_engine(args: argparse.Namespace) -> list[dict]:
    """The engine against ``model.generate`` on the same model and requests (see the module docstring)."""
    from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams

    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    palo, _ = build_models(shape, args.device, dtype)
    vision = CLIPVisionConfig(**shape.vision)
    positions = args.prompt_len + 1 + palo.image_token_count + args.new_tokens
    results = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        text = torch.randint(3, shape.vocab - 2, (batch, args.prompt_len), generator=gen)
        ids = torch.cat([text[:, :5], torch.full((batch, 1), IMAGE_TOKEN_INDEX), text[:, 5:]], dim=1)
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=gen).to(args.device, dtype)
        # A cache sized for this batch (plus the scratch block), not the default share of the device's memory: the
        # baseline's own cache needs room next to it, and the figures do not depend on the GPU's size.
        max_model_len = positions + 16
        blocks = batch * math.ceil(max_model_len / EngineConfig.block_size) + 1
        config = EngineConfig(max_num_seqs=max(batch, 1), max_model_len=max_model_len, num_blocks=blocks,
                              enable_prefix_cache=False, max_prefill_tokens=max(2048, positions),
                              cuda_graphs=not args.no_cuda_graphs)
        cuda = args.device.startswith("cuda")
        before_engine = torch.cuda.memory_allocated() if cuda else 0  # the weights (and this batch's inputs)
        engine = LLMEngine(palo, None, config)
        device_ids = ids.to(args.device)

        def baseline(n: int) -> torch.Tensor:
            with torch.no_grad():
                return palo.generate(device_ids, images=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0)[:, ids.shape[1]:]

        def with_engine(engine: LLMEngine) -> tuple[list[list[int]], float, float]:
            seqs = [engine.add_request(EngineRequest(ids[i].tolist(), pixels[i:i + 1],
                                                     SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)))
                    for i in range(batch)]
            start = time.monotonic()
            engine.run_until_done()
            _sync(args.device)
            end = time.monotonic()
            firsts = [s.first_token_at for s in seqs]
            ttft = statistics.median(f - start for f in firsts)
            decode_tps = batch * (args.new_tokens - 1) / (end - max(firsts))
            return [s.output_ids for s in seqs], ttft, decode_tps

        def timed(fn):
            start = time.perf_counter()
            out = fn()
            _sync(args.device)
            return out, time.perf_counter() - start

        # Warm-up, and the equal-work check: the same tokens, or (in half precision) tokens that part only where
        # generate's two best logits are within the logit difference of the two sides on the shared prefix.
        with torch.no_grad():
            reference = palo.generate(device_ids, images=pixels, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                                      return_dict_in_generate=True, output_scores=True)
        expected = reference.sequences[:, ids.shape[1]:].tolist()
        steps: list = []  # each decode step's rows (answer list id, its length) and logits
        decode = engine.runner.decode

        def recording(seqs):
            logits = decode(seqs)
            steps.append(([(id(s.output_ids), len(s.output_ids)) for s in seqs], logits.clone()))
            return logits

        engine.runner.decode = recording
        tokens, _, _ = with_engine(engine)
        del engine.runner.decode  # the class's method again
        same = tokens == expected
        check = _logit_check(tokens, expected, torch.stack(reference.scores, 1).float(), steps)
        base_first, base_total, eng_ttft, eng_tps, eng_peak = [], [], [], [], []
        for _ in range(args.repeats):
            base_first.append(timed(lambda: baseline(1))[1])
            base_total.append(timed(lambda: baseline(args.new_tokens))[1])
            if cuda:  # the engine's own peak: generate's cache is freed by now and not counted
                torch.cuda.reset_peak_memory_stats()
            _, t, tps = with_engine(engine)
            if cuda:
                eng_peak.append(torch.cuda.max_memory_allocated())
            eng_ttft.append(t)
            eng_tps.append(tps)
        t1, tn = statistics.median(base_first), statistics.median(base_total)
        row = {
            "batch": batch, "same_tokens": same, **check,
            "generate_ttft_ms": 1000 * t1, "engine_ttft_ms": 1000 * statistics.median(eng_ttft),
            "generate_decode_tokens_per_s": batch * (args.new_tokens - 1) / (tn - t1),
            "engine_decode_tokens_per_s": statistics.median(eng_tps),
        }
        if cuda:  # issue 11's memory rule: the engine's peak is the weights plus the KV cache it announced
            gib = 1 << 30
            row["weights_gib"] = before_engine / gib
            row["engine_kv_cache_gib"] = engine.runner.cache_bytes / gib
            row["engine_peak_gib"] = max(eng_peak) / gib
            row["engine_peak_beyond_weights_and_cache_gib"] = (max(eng_peak) - before_engine
                                                               - engine.runner.cache_bytes) / gib
        row["ttft_ratio"] = row["generate_ttft_ms"] / row["engine_ttft_ms"]
        row["decode_ratio"] = row["engine_decode_tokens_per_s"] / row["generate_decode_tokens_per_s"]
        results.append(row)
        del engine
        gc.collect()  # this batch's cache is gone before the next engine and generate allocate theirs
        if cuda:
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--baseline", choices=["generate", "llava"], default="generate")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="(--baseline generate)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="(--baseline generate) decode eagerly")
    parser.add_argument("--batch", type=int, default=4, help="(--baseline llava)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else f"CPU ({torch.get_num_threads()} threads)")
    print(f"# generate benchmark: shape={args.shape} dtype={args.dtype} device={device_name} torch={torch.__version__}")
    if args.baseline == "generate":
        results = run_engine(args)
        print(f"{'batch':>5} {'metric':<22} {'engine':>10} {'generate':>10} {'ratio':>8}  same tokens")
        for row in results:
            parted = "" if row["same_tokens"] else (
                f" ({row['diverging_rows']} rows part where generate's top two logits are "
                f"{row['max_margin_at_divergence']:.4g} apart at most; logits on shared prefixes within "
                f"{row['max_logit_diff']:.4g})")
            print(f"{row['batch']:>5} {'time to first token ms':<22} {row['engine_ttft_ms']:>10.2f} "
                  f"{row['generate_ttft_ms']:>10.2f} {row['ttft_ratio']:>8.2f}  {row['same_tokens']}{parted}")
            print(f"{row['batch']:>5} {'decode tokens/s':<22} {row['engine_decode_tokens_per_s']:>10.1f} "
                  f"{row['generate_decode_tokens_per_s']:>10.1f} {row['decode_ratio']:>8.2f}")
            if "engine_peak_gib" in row:
                print(f"{row['batch']:>5} engine peak GiB {row['engine_peak_gib']:.2f} = weights "
                      f"{row['weights_gib']:.2f} + announced KV cache {row['engine_kv_cache_gib']:.2f} + "
                      f"{row['engine_peak_beyond_weights_and_cache_gib']:.2f} beyond")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": device_name, "results": results}, f, indent=2)
        return 0
    results = run(args)
    print(f"{'batch':>5} {'metric':<22} {'palo':>10} {'hf_llava':>10} {'hf/palo':>8}  same tokens / logit rel. diff")
    for row in results:
        print(f"{row['batch']:>5} {'prefill ms':<22} {row['palo_prefill_ms']:>10.2f} "
              f"{row['hf_llava_prefill_ms']:>10.2f} {row['prefill_ratio']:>8.2f}  {row['same_tokens']} / "
              f"{row['logit_rel_diff']:.1e}")
        print(f"{row['batch']:>5} {'decode ms/token':<22} {row['palo_decode_ms_per_token']:>10.2f} "
              f"{row['hf_llava_decode_ms_per_token']:>10.2f} {row['decode_ratio']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
