"""Benchmark: one PALO training step against transformers' LlavaForConditionalGeneration, same shapes and settings.

Each side runs in its own child process (so peak memory is its own): it builds the PALO model from a fixed seed
(the baseline then receives exactly those weights), freezes the vision tower, optionally wraps the language model
with LoRA (r 128 / alpha 256 on every linear of the LLM, projector trained too, as PALO-7B), and times full
optimizer steps (forward, backward, AdamW) on a batch of prompts with one image each. Printed: step time,
tokens per second (text + image positions), peak memory, the first-step loss of each (equal work: they must
agree), and the ratio baseline / PALO (above 1 means PALO is faster or leaner).

    python scripts/bench/train_step.py                                  # tiny shapes, CPU
    python scripts/bench/train_step.py --shape 7b --lora --device cuda --dtype bfloat16 --batch 4

``--workload llava665k``: packing against padded batches on the same data in the same run. Samples follow a
LLaVA-665K-like mix (:func:`llava665k_lengths`: many short single-turn image questions, some long multi-turn image
conversations, ShareGPT-like text-only ones), each image 576 positions (CLIP-L/336: 24 x 24 patches; with
``--shape cpu``, a CLIP of that resolution with two narrow layers, one of which runs). Batches come from the project's
modality-grouped sampler (the original recipe), are collated by :class:`~palo.train.dataset.DataCollator` (padded) or
:class:`~palo.train.dataset.PackedDataCollator` (``--model-max-length`` rows), and both sides run the same batches
through full optimizer steps, alternating step by step in one process (ABBA, so that machine drift hits both
alike; peak memory and the first loss come from one process per side). Printed: real (non-padding) tokens/s,
padding fraction, model TFLOP/s and MFU (:mod:`palo.train.flops`; on CPU against the measured fp32 matmul rate of
this machine), peak memory, and the first loss of each (equal work: they must agree). ``--packing-rows R`` adds
a third side, ``rows``: the same samples planned into steps of ``R`` nearly full rows
(:class:`~palo.train.sampler.PackedStepSampler`, ``--packing_rows`` in training); its steps hold other samples, so
its first loss is not comparable, but over the run every side trains on the same tokens.

This project's training options apply to PALO's sides: ``--liger`` (Liger's fused kernels, ``--use_liger_kernel``;
CUDA with the liger-kernel package only) and ``--compile-layers`` (``--compile_layers``). ``--llava-baseline`` adds
the issue's baseline, transformers' LlavaForConditionalGeneration with padded batches and its stock kernels, on the
same weights and batches in a process of its own (Liger patches transformers' LLaMA functions process-wide, so the
baseline cannot share PALO's process); its steps run one after another rather than interleaved with PALO's, which
is fine on a GPU and only indicative on a busy CPU. Its first loss must equal the padded side's without ``--liger``.

    python scripts/bench/train_step.py --workload llava665k --shape cpu            # the CPU figure
    python scripts/bench/train_step.py --workload llava665k --shape mobile --device cuda --dtype bfloat16 \
        --packing-rows 6 --liger --llava-baseline                                   # the issue's GPU comparison
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import resource
import statistics
import sys
import time
from queue import Empty

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from generate import SHAPES, Shape, build_models  # noqa: E402

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402

LLM_LINEARS = r"(q|k|v|o|gate|up|down)_proj"
CPU_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=336,
                  patch_size=14, projection_dim=32, hidden_act="quick_gelu")
# A narrow LLM with CLIP-L/336's 576 image positions per image: small enough for a 2-core CPU.
SHAPES = {**SHAPES, "cpu": Shape(256, 2, 4, 688, 8000, CPU_VISION)}


def _lora(model: torch.nn.Module, prefix: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=rf"{prefix}\.layers\.\d+\.(self_attn|mlp)\.{LLM_LINEARS}")
    return get_peft_model(model, config)


def _measure(side: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    dtype = getattr(torch, args.dtype)
    palo, llava = build_models(SHAPES[args.shape], args.device, dtype)
    model = palo if side == "palo" else llava
    del palo, llava
    if side == "palo":
        tower, projector, prefix = model.model.vision_tower, model.model.mm_projector, r"model"
    else:
        tower, projector, prefix = model.model.vision_tower, model.model.multi_modal_projector, r"model\.language_model"
    if args.lora:
        model = _lora(model, prefix)
        projector.requires_grad_(True)
    tower.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    shape = SHAPES[args.shape]
    n_img = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, shape.vocab - 2, (args.batch, args.prompt_len), generator=gen)
    pixels = torch.randn(args.batch, 3, shape.vision["image_size"], shape.vision["image_size"], generator=gen)
    pixels = pixels.to(args.device, dtype)
    if side == "palo":
        ids = torch.cat([text[:, :5], torch.full((args.batch, 1), IMAGE_TOKEN_INDEX), text[:, 5:]], dim=1)
        labels = ids.clone()
        labels[:, :6] = IGNORE_INDEX
        inputs = {"input_ids": ids.to(args.device), "labels": labels.to(args.device), "images": pixels}
    else:
        ids = torch.cat([text[:, :5], torch.full((args.batch, n_img), shape.vocab - 1), text[:, 5:]], dim=1)
        labels = ids.clone()
        labels[:, : 5 + n_img] = IGNORE_INDEX
        inputs = {"input_ids": ids.to(args.device), "labels": labels.to(args.device), "pixel_values": pixels}
    tokens = args.batch * (args.prompt_len + n_img)

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    first_loss = step()  # warm-up; its loss shows both sides computed the same thing
    sync()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process-wide
    step_s = statistics.median(times)
    queue.put({"side": side, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_gib": peak,
               "first_loss": first_loss})


def llava665k_lengths(count: int, seed: int = 0) -> list[tuple[int, bool]]:
    """(text tokens, has image) per sample, in the proportions of LLaVA-665K's sources.

    About 60 % short VQA-style single-turn image samples (30-120 text tokens), 25 % multi-turn image conversations
    (LLaVA-Instruct, GQA/VQAv2 grouped questions: 150-900), 10 % long ShareGPT text-only ones (300-1500), 5 % short
    text-only ones (20-200); lengths uniform within each band.
    """
    import random

    rng = random.Random(seed)
    bands = [(0.60, 30, 120, True), (0.25, 150, 900, True), (0.10, 300, 1500, False), (0.05, 20, 200, False)]
    out = []
    for _ in range(count):
        x, acc = rng.random(), 0.0
        band = bands[-1]
        for band in bands:
            acc += band[0]
            if x < acc:
                break
        _, low, high, image = band
        out.append((rng.randint(low, high), image))
    return out


def _mix_batches(args: argparse.Namespace, vocab: int, image_size: int) -> list[list[dict]]:
    from palo.train.sampler import LengthGroupedSampler

    vision = SHAPES[args.shape].vision
    image_rows = (vision["image_size"] // vision["patch_size"]) ** 2
    # Each sample fits --model-max-length as it is: PALO truncates what is longer and transformers' Llava does not,
    # so a cut sample would give the two sides different work (the mix fits the default 2,048 whole).
    samples = [(min(length, args.model_max_length - (image_rows if image else 0)), image)
               for length, image in llava665k_lengths(args.batch * (args.repeats + 1), seed=0)]
    gen = torch.Generator().manual_seed(0)
    items = []
    for length, image in samples:
        text = torch.randint(3, vocab - 2, (length,), generator=gen)
        prompt = max(4, length // 4)
        ids = torch.cat([text[:1], torch.tensor([IMAGE_TOKEN_INDEX]), text[1:]]) if image else text
        labels = ids.clone()
        labels[: prompt + int(image)] = IGNORE_INDEX
        item = {"input_ids": ids, "labels": labels, "language": 0}
        if image:
            item["image"] = torch.randn(3, image_size, image_size, generator=gen)
        items.append(item)
    lengths = [(n if image else -n) for n, image in samples]
    order = list(LengthGroupedSampler(args.batch, 1, lengths, group_by_modality=True, seed=0))
    return [[items[i] for i in order[k: k + args.batch]] for k in range(0, len(order), args.batch)]


def _mix_model(args: argparse.Namespace, side: str = "palo"):
    """The model one side trains: PALO (with this project's options) or, for ``side="llava"``, transformers' Llava
    holding the same weights with its stock kernels. Returns (model, PALO model under any adapter, optimizer)."""
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    model, llava = build_models(shape, args.device, dtype)
    base_palo = model
    if side == "llava":
        model, prefix, projector = llava, r"model\.language_model", llava.model.multi_modal_projector
    else:
        del llava
        prefix, projector = "model", model.model.mm_projector
        model.config.tokenizer_model_max_length = args.model_max_length
        if args.liger:
            from palo.model.kernels import apply_liger_kernels

            apply_liger_kernels(model)  # before LoRA, as training does
    model.config.use_cache = False
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    if args.lora:
        model = _lora(model, prefix)
        projector.requires_grad_(True)
    base_palo.model.vision_tower.requires_grad_(False)  # the Llava's tower holds the same tensors
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if args.compile_layers and side != "llava":
        from palo.train.model_setup import compile_decoder_layers

        compile_decoder_layers(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    return model, base_palo, optimizer


def _llava_batch(batch: list[dict], image_token: int, n_img: int) -> dict:
    """A padded batch for transformers' Llava: each image sentinel becomes ``n_img`` image-token positions (what
    PALO's splice makes of it), labels ignored there and on padding, right padding with id 0."""
    rows, labels, pixels = [], [], []
    for item in batch:
        ids, lab = [], []
        for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
            if token == IMAGE_TOKEN_INDEX:
                ids += [image_token] * n_img
                lab += [IGNORE_INDEX] * n_img
            else:
                ids.append(token)
                lab.append(label)
        rows.append(ids)
        labels.append(lab)
        if "image" in item:
            pixels.append(item["image"])
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out


def _llava_mix(args: argparse.Namespace, queue: mp.Queue) -> None:
    """transformers' Llava on the padded batches, in a process of its own: time, padding, peak memory, first loss."""
    from palo.train.flops import FlopCounter

    shape = SHAPES[args.shape]
    model, base, optimizer = _mix_model(args, side="llava")
    flops = FlopCounter.of(base)  # the same architecture and shapes: PALO's count applies
    batches = [_llava_batch(b, shape.vocab - 1, base.image_token_count)
               for b in _mix_batches(args, shape.vocab, shape.vision["image_size"])]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_loss = _mix_step(model, optimizer, flops, batches[0], args)[0]  # warm-up
    elapsed, real, positions, model_flops = 0.0, 0, 0, 0.0
    for batch in batches[1:]:
        _sync(args)
        start = time.perf_counter()
        _, r, p, f = _mix_step(model, optimizer, flops, batch, args)
        _sync(args)
        elapsed += time.perf_counter() - start
        real, positions, model_flops = real + r, positions + p, model_flops + f
    queue.put({**_rates(elapsed, real, positions, model_flops, len(batches) - 1, args),
               "peak_gib": _peak_gib(args), "first_loss": first_loss})


def _rates(elapsed: float, real: int, positions: int, model_flops: float, steps: int,
           args: argparse.Namespace) -> dict:
    """A side's throughput figures from its timed steps."""
    return {"real_tokens_per_s": real / elapsed, "padding_fraction": 1 - real / positions,
            "model_tflops_per_s": model_flops / elapsed / 1e12, "mfu": model_flops / elapsed / args.peak_flops,
            "steps": steps, "seconds": elapsed, "real_tokens": real, "positions": positions}


def _peak_gib(args: argparse.Namespace) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _mix_step(model, optimizer, flops, batch: dict, args: argparse.Namespace) -> tuple[float, int, int, float]:
    """One optimizer step of PALO or of transformers' Llava (``pixel_values``, image rows already in the ids);
    returns (loss, real positions, all positions, model FLOPs)."""
    inputs = {k: (v.to(args.device) if isinstance(v, torch.Tensor) else v)
              for k, v in batch.items() if k != "languages"}
    image_key = "images" if "images" in inputs else "pixel_values" if "pixel_values" in inputs else None
    if image_key:
        inputs[image_key] = inputs[image_key].to(getattr(torch, args.dtype))
    out = model(**inputs)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mask = out.get("spliced_attention_mask")
    mask = inputs["attention_mask"] if mask is None else mask  # the Llava's positions are its inputs'
    positions = out.get("spliced_position_ids")
    if positions is None:
        samples = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand(mask.shape)
    else:
        samples = ((positions == 0) & (mask != 0)).reshape(-1).cumsum(0).view(mask.shape) - 1
    real = int(mask.sum())
    lengths = torch.bincount(samples[mask != 0]).cpu()
    images = len(inputs[image_key]) if image_key else 0
    return out.loss.item(), real, mask.numel(), flops.step(real, lengths, images)


def _collated(side: str, base, args: argparse.Namespace) -> list[dict]:
    from palo.model.multimodal import spliced_length
    from palo.train.dataset import DataCollator, PackedDataCollator
    from palo.train.sampler import PackedStepSampler

    shape = SHAPES[args.shape]
    batches = _mix_batches(args, shape.vocab, shape.vision["image_size"])
    if side == "padded":
        collate = DataCollator(pad_token_id=0)
        return [collate(b) for b in batches]
    collate = PackedDataCollator(0, args.model_max_length, base.image_token_count)
    if side == "packed":
        return [collate(b) for b in batches]
    # "rows": the same samples planned into steps of --packing-rows nearly full rows (--packing_rows).
    items = [item for batch in batches for item in batch]
    lengths = [min(spliced_length(x["input_ids"], base.image_token_count), args.model_max_length) for x in items]
    sampler = PackedStepSampler(lengths, args.model_max_length, args.packing_rows, seed=0)
    return [collate([{**items[i], "pack_row": row} for i, row in step]) for step in sampler]


def _sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def _memory_mix(side: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    """Peak memory and first loss of one side, in a process of its own (first batch, then the largest)."""
    from palo.train.flops import FlopCounter

    model, base, optimizer = _mix_model(args)
    flops = FlopCounter.of(model)
    batches = _collated(side, base, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_loss = _mix_step(model, optimizer, flops, batches[0], args)[0]
    _mix_step(model, optimizer, flops, max(batches[1:], key=lambda b: b["input_ids"].numel()), args)
    _sync(args)
    queue.put({"side": side, "peak_gib": _peak_gib(args), "first_loss": first_loss})


def _time_mix(args: argparse.Namespace, queue: mp.Queue) -> None:
    """Both sides in one process, step by step in alternating order (ABBA), so machine drift hits both alike."""
    from palo.train.flops import FlopCounter

    model, base, optimizer = _mix_model(args)
    flops = FlopCounter.of(model)
    batches = {side: _collated(side, base, args) for side in _sides(args)}
    for side, steps in batches.items():
        if len(steps) < 2:
            raise ValueError(f"the {side} side has {len(steps)} step(s) of data, and the first is the warm-up: "
                             "raise --repeats or --batch")
    for side in batches:  # warm-up
        _mix_step(model, optimizer, flops, batches[side][0], args)
    totals = {side: [0.0, 0, 0, 0.0] for side in batches}  # seconds, real, positions, FLOPs
    sides = list(batches)
    for k in range(1, max(len(b) for b in batches.values())):
        for side in (sides if k % 2 else sides[::-1]):
            if k >= len(batches[side]):
                continue
            _sync(args)
            start = time.perf_counter()
            _, real, positions, model_flops = _mix_step(model, optimizer, flops, batches[side][k], args)
            _sync(args)
            t = totals[side]
            t[0] += time.perf_counter() - start
            t[1], t[2], t[3] = t[1] + real, t[2] + positions, t[3] + model_flops
    results = {}
    for side, (elapsed, real, positions, model_flops) in totals.items():
        results[side] = _rates(elapsed, real, positions, model_flops, len(batches[side]) - 1, args)
    queue.put(results)


def _sides(args: argparse.Namespace) -> tuple[str, ...]:
    """PALO's sides (timed interleaved in one process)."""
    return ("padded", "packed", "rows") if args.packing_rows else ("padded", "packed")


def _cpu_matmul_flops() -> float:
    """FLOP/s of a large fp32 matmul on this CPU: the "peak" CPU MFU is measured against (no datasheet figure)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return n * 2 * 2048**3 / (time.perf_counter() - start)


def _in_process(target, *args) -> dict:
    """Run ``target(*args, queue)`` in a fresh (spawned) process and return what it puts on the queue.

    Each side measures in a process of its own so its peak memory is its own. A process that dies without a result
    (an exception, out of memory) ends the benchmark at once with its exit code, instead of waiting on the queue
    for ever; its traceback is already on stderr.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive() and queue.empty():
                sys.exit(f"{target.__name__} failed (exit code {proc.exitcode}); see its traceback above")
    proc.join()
    return result


def main_mix(args: argparse.Namespace) -> int:
    from palo.train.flops import peak_flops

    # One peak for both sides (measured once, before either runs, on CPU).
    args.peak_flops = peak_flops(torch.device(args.device)) or _cpu_matmul_flops()
    results = _in_process(_time_mix, args)
    for side in _sides(args):
        results[side].update(_in_process(_memory_mix, side, args))
    if args.llava_baseline:
        results["llava"] = _in_process(_llava_mix, args)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    mode = "LoRA r128" if args.lora else "full"
    options = " ".join(name for name, on in (("liger", args.liger), ("compile-layers", args.compile_layers)) if on)
    print(f"# llava665k mix: shape={args.shape} {mode} dtype={args.dtype} batch={args.batch} "
          f"model_max_length={args.model_max_length} steps={results['packed']['steps']} device={device} "
          f"peak={args.peak_flops / 1e12:.3f} TFLOP/s palo options: {options or 'none'}")
    # Ratios are against the first column: PALO padded, or transformers' Llava padded with --llava-baseline.
    sides = (("llava",) if args.llava_baseline else ()) + _sides(args)
    print(f"{'metric':<18} " + " ".join(f"{s:>10}" for s in sides) + " "
          + " ".join(f"{s + '/' + sides[0]:>14}" for s in sides[1:]))
    # The rows side takes other samples per step: its first loss is not comparable (the other two must agree).
    for key, fmt in (("real_tokens_per_s", ".1f"), ("padding_fraction", ".4f"), ("model_tflops_per_s", ".5f"),
                     ("mfu", ".4f"), ("peak_gib", ".2f"), ("first_loss", ".4f"), ("steps", "d")):
        values = [results[s][key] for s in sides]
        ratios = [v / values[0] if values[0] else float("nan") for v in values[1:]]
        print(f"{key:<18} " + " ".join(f"{v:>10{fmt}}" for v in values) + " " + " ".join(f"{r:>14.2f}" for r in ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", action="store_true",
                        help="LoRA on the LLM (PALO-7B recipe) instead of full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--workload", choices=["fixed", "llava665k"], default="fixed",
                        help="fixed: PALO vs HF Llava on equal prompts; llava665k: packing vs padding on a mix")
    parser.add_argument("--model-max-length", type=int, default=2048)
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--packing-rows", type=int, default=0,
                        help="llava665k: also a third side, the same samples in steps of this many planned rows")
    parser.add_argument("--liger", action="store_true",
                        help="llava665k: PALO's sides use Liger's fused kernels (CUDA and liger-kernel needed)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="llava665k: PALO's sides torch.compile each decoder layer (--compile_layers)")
    parser.add_argument("--llava-baseline", action="store_true",
                        help="llava665k: also transformers' Llava on the padded batches (the issue's baseline)")
    args = parser.parse_args(argv)
    if args.liger:
        from palo.model.kernels import liger_available

        usable, why = liger_available() if args.device.startswith("cuda") else (False, "--device is not cuda")
        if not usable:
            parser.error(f"--liger cannot run here: {why}")
    if args.workload == "llava665k":
        return main_mix(args)
    results = {side: _in_process(_measure, side, args) for side in ("palo", "hf_llava")}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    mode = "LoRA r128" if args.lora else "full"
    print(f"# train-step benchmark: shape={args.shape} {mode} dtype={args.dtype} batch={args.batch} device={device}")
    p, h = results["palo"], results["hf_llava"]
    print(f"{'metric':<16} {'palo':>10} {'hf_llava':>10} {'hf/palo':>8}")
    print(f"{'step s':<16} {p['step_s']:>10.4f} {h['step_s']:>10.4f} {h['step_s'] / p['step_s']:>8.2f}")
    print(f"{'tokens/s':<16} {p['tokens_per_s']:>10.1f} {h['tokens_per_s']:>10.1f} "
          f"{p['tokens_per_s'] / h['tokens_per_s']:>8.2f}")
    print(f"{'peak GiB':<16} {p['peak_gib']:>10.2f} {h['peak_gib']:>10.2f} {h['peak_gib'] / p['peak_gib']:>8.2f}")
    print(f"{'first loss':<16} {p['first_loss']:>10.4f} {h['first_loss']:>10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
