"""Benchmark: streaming detokenization through the tokenizer's generic ``decode`` against its streaming decoder.

The engine turns every generated token of every stream into text with
:class:`palo.engine.detokenizer.IncrementalDetokenizer`, which decodes short windows of the answer's last tokens.
This measures, on the same answers and the same tokenizer, the cost per token of doing so through
``tokenizer.decode(..., skip_special_tokens=True)`` alone (the baseline) and through the tokenizer's streaming path
(``PaloLlamaTokenizer.streaming_decoder()`` for the windows, ``streaming_piece_texts()`` for word pieces that need
no decode), and checks that both stream the very same chunks. The answers are the multilingual sample texts of
:mod:`palo.testing.corpus` (all 10 languages), each pushed token by token. Printed: microseconds per token for both,
the ratio baseline / streaming (above 1: the streaming path is faster) and what one decode step of 32 streams spends
on detokenization with each.

    python scripts/bench/detokenize.py                        # a SentencePiece model trained on the corpus here
    python scripts/bench/detokenize.py --tokenizer /path/to/PALO-7B   # a checkpoint's own tokenizer
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams  # noqa: E402
from palo.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from palo.model.tokenizer import load_tokenizer  # noqa: E402
from palo.testing.corpus import SAMPLES  # noqa: E402


class GenericDecode:
    """The tokenizer seen through ``decode`` only (what the detokenizer did before the streaming decoder)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def alternating(repeats: int, sides: dict, measure) -> tuple[dict[str, float], list]:
    """Median of ``measure(side) -> (figure, output)`` for each side over ``repeats`` rounds in alternating order
    (so machine drift hits both alike), and every output, for the equal-work check."""
    figures: dict[str, list[float]] = {name: [] for name in sides}
    outputs = []
    for i in range(repeats):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            figure, output = measure(sides[name])
            figures[name].append(figure)
            outputs.append(output)
    return {name: statistics.median(values) for name, values in figures.items()}, outputs


def stream(tokenizer, answers: list[list[int]]) -> tuple[float, list[list[str]]]:
    """Push every answer token by token; returns the seconds per token and the chunks."""
    chunks = []
    start = time.perf_counter()
    for ids in answers:
        detok = IncrementalDetokenizer(tokenizer)
        chunks.append([detok.push(t) for t in ids] + [detok.flush()])
    return (time.perf_counter() - start) / sum(len(ids) for ids in answers), chunks


def engine_step_ms(tokenizer, model, prompts: list[list[int]]) -> tuple[float, list[str]]:
    """Milliseconds per engine step while ``prompts`` stream 128 tokens each, and the texts they streamed."""
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts), max_model_len=512,
                                                      enable_prefix_cache=False))
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=128, ignore_eos=True, stop=("###",))
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(ids, None, params, lambda out, i=i: texts[i].append(out.delta)))
    with torch.no_grad():
        engine.step()  # prefill
        start, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
    return 1000 * (time.perf_counter() - start) / steps, ["".join(t) for t in texts.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: train one on the corpus)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer is None:
            from palo.testing.tiny import train_sentencepiece

            train_sentencepiece(tmp)
        tokenizer = load_tokenizer(args.tokenizer or tmp)
    if not hasattr(tokenizer, "streaming_decoder"):
        sys.exit(f"{type(tokenizer).__name__} has no streaming decoder: nothing to compare")
    answers = [tokenizer(text, add_special_tokens=False).input_ids for texts in SAMPLES.values() for text in texts]
    baseline = GenericDecode(tokenizer)
    sides = {"generic": baseline, "streaming": tokenizer}
    stream(baseline, answers), stream(tokenizer, answers)  # warm-up
    seconds, chunks = alternating(args.repeats, sides, lambda tok: stream(tok, answers))
    if any(c != chunks[0] for c in chunks):
        sys.exit("the streaming decoder streamed other chunks than the generic decode")
    generic, streaming = seconds["generic"] * 1e6, seconds["streaming"] * 1e6
    row = {"tokenizer": type(tokenizer).__name__, "answers": len(answers), "tokens": sum(map(len, answers)),
           "generic_us_per_token": generic, "streaming_us_per_token": streaming, "ratio": generic / streaming,
           "generic_ms_per_step_32_streams": 32 * generic / 1000, "streaming_ms_per_step_32_streams":
           32 * streaming / 1000, "same_chunks": True}
    print(f"{row['tokens']} tokens of {row['answers']} answers in 10 languages, {row['tokenizer']}")
    print(f"generic decode:    {generic:6.2f} us/token ({row['generic_ms_per_step_32_streams']:.2f} ms per step "
          "of 32 streams)")
    print(f"streaming decoder: {streaming:6.2f} us/token ({row['streaming_ms_per_step_32_streams']:.2f} ms per step "
          "of 32 streams)")
    print(f"ratio generic / streaming: {row['ratio']:.2f}x; identical chunks: yes")

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=512))
    prompts = [answers[i % len(answers)][:24] for i in range(32)]
    engine_step_ms(baseline, model.eval(), prompts)  # warm-up
    steps, streamed = alternating(3, sides, lambda tok: engine_step_ms(tok, model, prompts))
    if not all(streamed[0]) or any(texts != streamed[0] for texts in streamed):
        sys.exit("the engine streamed empty texts, or other texts with the streaming decoder than with the generic "
                 "decode")
    row["engine_step_ms_generic"], row["engine_step_ms_streaming"] = steps["generic"], steps["streaming"]
    print(f"engine step, 32 streams, one-layer model: {row['engine_step_ms_generic']:.2f} ms with the generic decode, "
          f"{row['engine_step_ms_streaming']:.2f} ms with the streaming decoder "
          f"({row['engine_step_ms_generic'] / row['engine_step_ms_streaming']:.2f}x); same texts: yes")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
