"""Benchmark: a LLaVA-Bench-shaped burst through the engine, this tree against another git revision.

LLaVA-Bench asks several questions about each image, and PALO's evaluation asks each in 10 languages; the
evaluation submits them together. Questions on one image share the system prompt and the image rows (576 of about
650 prompt positions at CLIP-L/336), so how much of that shared prefix the engine computes once decides the cost of
the prefill. This submits ``--images`` x ``--questions`` greedy requests at once (each question in another language)
to one engine on a random checkpoint and reports, per side: prompt positions prefilled, images run through the
vision tower, wall time until every answer is done, and a digest of the answers (both sides must answer alike).
Each side runs in its own process with ``palo`` imported from its own tree (``--against``: a git revision checked
out into a temporary worktree), alternating, ``--rounds`` times.

    python scripts/bench/shared_prefix.py --against b4907b1                 # the test suite's tiny shapes
    python scripts/bench/shared_prefix.py --against b4907b1 --shape small   # 576 image rows, as CLIP-L/336 gives

At the tiny shapes (16 image rows, hidden 64) a step costs next to nothing and the figures are the engine's own
overhead; ``small`` lays the prompt out as PALO's (576 image rows) with a wider 4-layer LLM, so that the prefill
is most of the work, as on a GPU at 7B.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from revisions import REPO, add_arguments, checked_out, cpu_name, import_palo_from, measure_in_child, short_revision

QUESTIONS = ["Describe this image in detail.", "ما الذي في هذه الصورة؟", "这张图片里有什么？",
             "Qu'y a-t-il sur cette image ?", "¿Qué hay en esta imagen?", "Что на этом изображении?",
             "この画像には何がありますか？", "इस तस्वीर में क्या है?", "এই ছবিতে কী আছে?", "اس تصویر میں کیا ہے؟"]
COLORS = ["red", "green", "blue", "orange", "purple", "black", "pink", "yellow"]


SHAPES = {
    "tiny": {},  # palo.testing.tiny.TinyShapes as the tests use them
    "small": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, max_position_embeddings=1024,
                  image_size=336),
}


def build_checkpoint(root: str, shape: str) -> str:
    """A random PALO checkpoint of ``SHAPES[shape]``, written to ``root``."""
    from palo.testing import tiny

    shapes = tiny.TinyShapes(**SHAPES[shape])
    tokenizer = tiny.train_sentencepiece(os.path.join(root, "tok"))
    tiny.save_tiny_clip(os.path.join(root, "clip"), shapes)
    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(tokenizer), shapes), os.path.join(root, "clip"))
    model = tiny.build_palo_model(config, os.path.join(root, "clip"), seed=1)
    return tiny.write_full_checkpoint(os.path.join(root, "palo"), model, config, os.path.join(root, "tok"))


def measure(tree: str, model_path: str, images: int, questions: int, max_tokens: int, repeats: int) -> dict:
    """In this process, with ``palo`` imported from ``tree``: the burst's figures (wall time per repeat)."""
    import_palo_from(tree)
    import torch
    from PIL import Image, ImageDraw

    from palo.conversation import conv_templates
    from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
    from palo.mm_utils import process_images, tokenizer_image_token
    from palo.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu")
    model.eval()
    requests = []
    for i in range(images):
        image = Image.new("RGB", (320, 240), "white")
        ImageDraw.Draw(image).ellipse((20 + 9 * i, 20, 160, 200), fill=COLORS[i % len(COLORS)])
        pixels = process_images([image], processor, model.config)
        for q in range(questions):
            conv = conv_templates["vicuna_v1"].copy()
            conv.append_message(conv.roles[0], "<image>\n" + QUESTIONS[(i + q) % len(QUESTIONS)])
            conv.append_message(conv.roles[1], None)
            requests.append((tokenizer_image_token(conv.get_prompt(), tokenizer), pixels))

    counts = {"positions": 0, "images": 0}
    tower = model.encode_images

    def counted_tower(pixels):  # the vision tower and projector, whichever way the engine batches them
        counts["images"] += pixels.shape[0]
        return tower(pixels)

    model.encode_images = counted_tower

    def once() -> tuple[float, int, int, list[list[int]]]:
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=len(requests), cuda_graphs=False))
        counts.update(positions=0, images=0)
        prefill = engine.runner.prefill

        def counted_prefill(chunks):
            counts["positions"] += sum(c.end - c.start for c in chunks)
            return prefill(chunks)

        engine.runner.prefill = counted_prefill
        params = SamplingParams(max_tokens=max_tokens)
        start = time.perf_counter()
        with torch.no_grad():
            outputs = engine.generate([EngineRequest(ids, pixels, params) for ids, pixels in requests])
        seconds = time.perf_counter() - start
        return seconds, counts["positions"], counts["images"], [o.token_ids for o in outputs]

    once()  # warm-up
    seconds, figures = [], set()
    for _ in range(repeats):
        wall, positions, encoded, answers = once()
        seconds.append(wall)
        figures.add((positions, encoded, hashlib.sha256(json.dumps(answers).encode()).hexdigest()))
    if len(figures) != 1:
        raise SystemExit("the same tree computed or answered differently in two runs")
    positions, encoded, digest = figures.pop()
    prompt_positions = sum(len(ids) - 1 + model.image_token_count for ids, _ in requests)
    return {"seconds": seconds, "positions": positions, "images_encoded": encoded, "answers_sha256": digest,
            "requests": len(requests), "prompt_positions": prompt_positions}


def run_side(tree: str, args: argparse.Namespace, model_path: str) -> dict:
    """:func:`measure` in a fresh process (each side imports its own ``palo``)."""
    return measure_in_child(__file__, tree, ["--model", model_path, "--images", str(args.images), "--questions",
                                             str(args.questions), "--max-tokens", str(args.max_tokens), "--repeats",
                                             str(args.repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, "git revision to compare with (default: HEAD)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--questions", type=int, default=3, help="questions per image, each in another language")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)  # both sides alike, and less noise from the other core
        print(json.dumps(measure(args.child, args.model, args.images, args.questions, args.max_tokens,
                                 args.repeats)))
        return

    sys.path.insert(0, str(REPO))
    revision = short_revision(args.against)
    print(f"# {args.images} images x {args.questions} questions submitted at once, {args.shape} checkpoint, on "
          f"{cpu_name()} (each measuring process uses one thread)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_checkpoint(tmp, args.shape)
        with checked_out(revision, os.path.join(tmp, "baseline")) as baseline:
            sides = {f"baseline {revision}": baseline, "this tree": str(REPO)}
            results: dict[str, list[dict]] = {name: [] for name in sides}
            for i in range(args.rounds):
                for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                    results[name].append(run_side(sides[name], args, model_path))
    summary = {}
    for name, runs in results.items():
        summary[name] = {"seconds": statistics.median(s for r in runs for s in r["seconds"]),
                         **{k: runs[0][k] for k in ("positions", "images_encoded", "answers_sha256", "requests",
                                                    "prompt_positions")}}
        print(f"{name:>18}: {summary[name]['positions']:6d} of {summary[name]['prompt_positions']} prompt positions "
              f"prefilled, {summary[name]['images_encoded']:3d} images through the tower, "
              f"{summary[name]['seconds']:.3f} s for the burst (median of {len(runs) * args.repeats})", flush=True)
    base, ours = summary.values()
    same = base["answers_sha256"] == ours["answers_sha256"]
    print(f"positions prefilled {base['positions'] / ours['positions']:.2f}x fewer, images encoded "
          f"{base['images_encoded'] / max(ours['images_encoded'], 1):.2f}x fewer, wall time "
          f"{base['seconds'] / ours['seconds']:.2f}x; same answers: {'yes' if same else 'NO'}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"baseline": revision, "shape": args.shape, **summary},
                                                      indent=2))
    if not same:
        raise SystemExit("the two sides answered differently")


if __name__ == "__main__":
    main()
