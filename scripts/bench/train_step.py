"""Benchmark: one PALO training step against transformers' LlavaForConditionalGeneration, same shapes and settings.

Each side runs in its own child process (so peak memory is its own): it builds the PALO model from a fixed seed
(the baseline then receives exactly those weights), freezes the vision tower, optionally wraps the language model
with LoRA (r 128 / alpha 256 on every linear of the LLM, projector trained too, as PALO-7B), and times full
optimizer steps (forward, backward, AdamW) on a batch of prompts with one image each. Printed: step time,
tokens per second (text + image positions), peak memory, the first-step loss of each (equal work: they must
agree), and the ratio baseline / PALO (above 1 means PALO is faster or leaner).

    python scripts/bench/train_step.py                                  # tiny shapes, CPU
    python scripts/bench/train_step.py --shape 7b --lora --device cuda --dtype bfloat16 --batch 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from generate import SHAPES, build_models  # noqa: E402

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402

LLM_LINEARS = r"(q|k|v|o|gate|up|down)_proj"


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
    queue.put({"side": side, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_gib": peak, "first_loss": first_loss})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", action="store_true", help="LoRA on the LLM (PALO-7B recipe) instead of full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = {}
    for side in ("palo", "hf_llava"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(side, args, queue))
        proc.start()
        results[side] = queue.get()
        proc.join()
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    mode = "LoRA r128" if args.lora else "full"
    print(f"# train-step benchmark: shape={args.shape} {mode} dtype={args.dtype} batch={args.batch} device={device}")
    p, h = results["palo"], results["hf_llava"]
    print(f"{'metric':<16} {'palo':>10} {'hf_llava':>10} {'hf/palo':>8}")
    print(f"{'step s':<16} {p['step_s']:>10.4f} {h['step_s']:>10.4f} {h['step_s'] / p['step_s']:>8.2f}")
    print(f"{'tokens/s':<16} {p['tokens_per_s']:>10.1f} {h['tokens_per_s']:>10.1f} {p['tokens_per_s'] / h['tokens_per_s']:>8.2f}")
    print(f"{'peak GiB':<16} {p['peak_gib']:>10.2f} {h['peak_gib']:>10.2f} {h['peak_gib'] / p['peak_gib']:>8.2f}")
    print(f"{'first loss':<16} {p['first_loss']:>10.4f} {h['first_loss']:>10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
