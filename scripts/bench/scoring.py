"""Benchmark: scoring multiple-choice options, the engine's prompt log-probabilities against one forward pass each.

A multiple-choice task asks, for every option of every document, how likely the model finds the option as the
answer to the document's image question (lmms-eval's ``loglikelihood`` requests; lm-evaluation-harness's through
``/v1/completions``). ``--model palo`` scores each option with one forward pass of the whole prompt
(:func:`palo.eval.lmms.scoring.score_continuation`); a server scores them through the engine
(``SamplingParams(prompt_logprobs=1, max_tokens=0)``), where all the options submitted together are prefilled in
shared steps and the options of one question take the shared image and question from the prefix cache. This scores
``--docs`` image questions x ``--options`` options both ways on a random checkpoint, checks that both give the same
values, and reports the prompt positions the engine computed, the wall time of each way (medians over
``--repeats``, a fresh engine for each pass) and their ratio.

    python scripts/bench/scoring.py                  # the test suite's tiny shapes
    python scripts/bench/scoring.py --shape small    # 576 image rows, as CLIP-L/336 gives, a wider 4-layer LLM
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from revisions import cpu_name
from shared_prefix import COLORS, QUESTIONS, SHAPES, build_checkpoint

OPTIONS = [" A red circle.", " Un cercle bleu.", " 一个绿色的圆。", " Зелёный квадрат.", " एक पीला वृत्त।",
           " দুটি বিড়াল।"]


def build_documents(tokenizer, processor, model, docs: int, options: int):
    """Per document: ``(context ids, [full ids per option], pixels [1, 3, H, W])``, as ``--model palo`` builds
    them (the question in the template with an open assistant turn, the option right after it)."""
    from PIL import Image, ImageDraw

    from palo.eval import model_vqa
    from palo.mm_utils import process_images, tokenizer_image_token

    out = []
    for d in range(docs):
        image = Image.new("RGB", (320, 240), "white")
        ImageDraw.Draw(image).ellipse((20 + 9 * d, 20, 160, 200), fill=COLORS[d % len(COLORS)])
        prompt = model_vqa.build_prompt(QUESTIONS[d % len(QUESTIONS)], "vicuna_v1", 1, False)
        fulls = [tokenizer_image_token(prompt + OPTIONS[(d + o) % len(OPTIONS)], tokenizer) for o in range(options)]
        out.append((tokenizer_image_token(prompt, tokenizer), fulls, process_images([image], processor, model.config)))
    return out


def score_forward(model, documents) -> list[float]:
    """Each option's summed log-probability, one forward pass per option (``--model palo``)."""
    from palo.eval.lmms.scoring import score_continuation

    return [score_continuation(model, context, full, pixels).logprob
            for context, fulls, pixels in documents for full in fulls]


def score_engine(engine, documents) -> list[float]:
    """The same through the engine: every option submitted at once, prompt log-probabilities only."""
    from palo.engine import EngineRequest, SamplingParams
    from palo.eval.lmms.scoring import continuation_start

    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    requests, starts = [], []
    for context, fulls, pixels in documents:
        for full in fulls:
            requests.append(EngineRequest(full, pixels, params))
            starts.append(continuation_start(context, full))
    outputs = engine.generate(requests)
    return [sum(entry[0] for entry in out.prompt_logprobs[start:]) for out, start in zip(outputs, starts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--options", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-prefill-tokens", type=int, default=2048)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from palo.engine import EngineConfig, LLMEngine
    from palo.model.builder import load_pretrained_model

    with tempfile.TemporaryDirectory() as root:
        path = build_checkpoint(root, args.shape)
        tokenizer, model, processor, _ = load_pretrained_model(path, device="cpu")
    model.eval()
    documents = build_documents(tokenizer, processor, model, args.docs, args.options)
    def fresh_engine() -> LLMEngine:
        # A new engine (and prefix cache) for every pass: a second pass over the same documents would find every
        # prompt cached, which an evaluation never does.
        return LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=args.docs * args.options,
                                                        max_prefill_tokens=args.max_prefill_tokens))

    reference = score_forward(model, documents)
    scored = score_engine(fresh_engine(), documents)
    worst = max(abs(a - b) for a, b in zip(reference, scored))
    if worst > 1e-3:
        print(f"the two ways disagree by up to {worst:.2e}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"forward": [], "engine": []}
    for _ in range(args.repeats):  # alternating, so that drift in the machine's speed hits both alike
        engine = fresh_engine()
        for name, run in (("forward", lambda: score_forward(model, documents)),
                          ("engine", lambda: score_engine(engine, documents))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        positions = engine.blocks.queries - engine.blocks.hits
    forward, engine_s = statistics.median(times["forward"]), statistics.median(times["engine"])
    figures = {"shape": args.shape, "docs": args.docs, "options": args.options, "repeats": args.repeats,
               "prompt_positions": sum(len(f) + model.image_token_count - 1 for _, fs, _ in documents for f in fs),
               "engine_positions_computed": positions,
               "max_abs_difference": worst, "forward_s": round(forward, 4), "engine_s": round(engine_s, 4),
               "speedup": round(forward / engine_s, 2), "cpu": cpu_name(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
