"""Benchmark: the engine's host overhead per decode step, this tree against another git revision.

With CUDA graphs a decode step is one graph replay; everything else the engine does per step runs on the host, in
Python, between two replays: scheduling, the step's index tensors, sampling's read-back, and for every stream
appending its token, detokenizing it, looking for stop strings and reporting it. At PALO-7B shapes on an H200 a
32-stream step must take under 8 ms in all (the 4,000 tokens/s target), so host time per step counts directly.

This measures that host time alone: the model's decode forward (``ModelRunner.decode_forward``) is replaced by a
stand-in that costs next to nothing and picks each row's next token from the multilingual sample texts by position
and last token (so the answers are real text in 10 languages, the same on both sides). Prefill runs the real
(one-layer) model and is not timed. ``--streams`` requests decode ``--tokens`` tokens each with a stop string that
never matches, greedy; printed is milliseconds per decode step, for this tree and for ``--against`` (a git revision,
checked out into a temporary worktree), in alternating runs of separate processes, and the ratio
baseline / this tree (above 1: this tree spends less host time). Equal work is checked: both sides must stream the
very same texts.

    python scripts/bench/engine_host.py                         # against HEAD (uncommitted changes vs last commit)
    python scripts/bench/engine_host.py --against c804949 --tokens 128 1024
    python scripts/bench/engine_host.py --against 7a6146c~1 --tokens 1024 --eos-after 64   # ignore_eos past </s>
    python scripts/bench/engine_host.py --against none     # this tree alone (a machine without git history, such
                                                           # as a lent GPU's copy: that CPU's host time per step)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from revisions import REPO, add_arguments, checked_out, cpu_name, import_palo_from, measure_in_child, short_revision

PROMPT_TOKENS = 24  # a stream's prompt: the first tokens of a sample text (some are shorter)


def measure(tree: str, tokenizer_dir: str, streams: int, tokens: int, repeats: int,
            repetition_penalty: float = 1.0, eos_after: int | None = None) -> dict:
    """In this process, with ``palo`` imported from ``tree``: milliseconds per decode step (one figure per repeat)
    and a digest of the streamed texts."""
    import_palo_from(tree)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
    from palo.model.tokenizer import load_tokenizer
    from palo.testing.corpus import SAMPLES

    tokenizer = load_tokenizer(tokenizer_dir)
    answers = [tokenizer(t, add_special_tokens=False).input_ids for texts in SAMPLES.values() for t in texts]
    stream_of_ids = torch.tensor([t for ids in answers for t in ids])
    vocab = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         max_position_embeddings=tokens + 64)).eval()
    prompts = [answers[i % len(answers)][:PROMPT_TOKENS] for i in range(streams)]

    calls = [0]

    def stand_in(ids, positions, slots, block_tables, lengths):
        """``[B, V]`` logits whose argmax is a token of the sample texts, chosen by position and last token."""
        calls[0] += 1
        pick = stream_of_ids[(positions * 7 + ids) % len(stream_of_ids)]
        if eos_after is not None:  # from here on </s>, as a model past its answer (ignore_eos keeps generating)
            pick = torch.where(positions >= PROMPT_TOKENS + eos_after, tokenizer.eos_token_id, pick)
        return torch.nn.functional.one_hot(pick, vocab).float()

    def once() -> tuple[float, list[str]]:
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=streams, max_model_len=tokens + 64,
                                                          enable_prefix_cache=False, cuda_graphs=False))
        engine.runner.decode_forward = stand_in
        texts: list[list[str]] = [[] for _ in prompts]
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, stop=("###",),
                                **({"repetition_penalty": repetition_penalty} if repetition_penalty != 1 else {}))
        for i, ids in enumerate(prompts):
            engine.add_request(EngineRequest(ids, None, params, lambda out, i=i: texts[i].append(out.delta)))
        with torch.no_grad():
            while any(not t for t in texts):  # prefill (real model), until every stream has its first token
                engine.step()
            start, steps, calls[0] = time.perf_counter(), 0, 0
            while engine.has_work():
                engine.step()
                steps += 1
        if calls[0] != steps:
            raise SystemExit(f"{calls[0]} of {steps} steps ran the stand-in forward: the runner has changed")
        return 1000 * (time.perf_counter() - start) / steps, ["".join(t) for t in texts]

    once()  # warm-up
    figures, digests = [], set()
    for _ in range(repeats):
        ms, texts = once()
        figures.append(ms)
        digests.add(hashlib.sha256("\x00".join(texts).encode()).hexdigest())
    if len(digests) != 1:
        raise SystemExit("the same tree streamed different texts in two runs")
    return {"ms_per_step": figures, "texts_sha256": digests.pop(), "chars": sum(map(len, texts))}


def run_side(tree: str, tokenizer_dir: str, streams: int, tokens: int, repeats: int,
             repetition_penalty: float = 1.0, eos_after: int | None = None) -> dict:
    """:func:`measure` in a fresh process (each side imports its own ``palo``)."""
    eos = [] if eos_after is None else ["--eos-after", str(eos_after)]
    return measure_in_child(__file__, tree, ["--tokenizer", tokenizer_dir, "--streams", str(streams), "--tokens",
                                             str(tokens), "--repeats", str(repeats), "--repetition-penalty",
                                             str(repetition_penalty), *eos])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, "git revision to compare with (default: HEAD), or 'none' to measure this tree alone")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024], help="answer length(s) to measure")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="every stream asks for this penalty (the stand-in's one-hot logits keep their argmax "
                             "under it, so the texts stay the same): the host cost of penalised sampling")
    parser.add_argument("--eos-after", type=int, default=None, metavar="N",
                        help="the stand-in picks </s> for every answer token after the first N (with ignore_eos, "
                             "as serving benchmarks ask): the host cost of a run of skipped special tokens")
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)  # both sides alike, and less noise from the other core
        print(json.dumps(measure(args.child, args.tokenizer, args.streams, args.tokens[0], args.repeats,
                                 args.repetition_penalty, args.eos_after)))
        return

    sys.path.insert(0, str(REPO))
    from palo.testing.tiny import train_sentencepiece

    penalty = f", repetition penalty {args.repetition_penalty}" if args.repetition_penalty != 1 else ""
    if args.eos_after is not None:
        penalty += f", </s> after {args.eos_after} answer tokens (ignore_eos)"
    print(f"# engine host time per decode step, {args.streams} streams{penalty}, on {cpu_name()} ({os.cpu_count()} "
          "cores; each measuring process uses one thread)", flush=True)

    alone = args.against == "none"
    revision = None if alone else short_revision(args.against)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tokenizer_dir = os.path.join(tmp, "tokenizer")
        train_sentencepiece(tokenizer_dir)  # one tokenizer for both sides
        sides = {"this tree": str(REPO)}
        if not alone:
            baseline = stack.enter_context(checked_out(revision, os.path.join(tmp, "baseline")))
            sides = {f"baseline {revision}": baseline, **sides}
        for tokens in args.tokens:
            figures: dict[str, list[float]] = {name: [] for name in sides}
            digests = set()
            for i in range(args.rounds):
                for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                    result = run_side(sides[name], tokenizer_dir, args.streams, tokens, args.repeats,
                                      args.repetition_penalty, args.eos_after)
                    figures[name].extend(result["ms_per_step"])
                    digests.add(result["texts_sha256"])
            if len(digests) != 1:
                raise SystemExit(f"the two sides streamed different texts at {tokens} tokens")
            if alone:
                ours = statistics.median(figures["this tree"])
                rows.append({"streams": args.streams, "tokens": tokens, "ms_per_step": ours, "runs": figures})
                print(f"{args.streams} streams x {tokens} tokens: {ours:.3f} ms/step (median of "
                      f"{len(figures['this tree'])} runs)", flush=True)
                continue
            base, ours = (statistics.median(figures[name]) for name in sides)
            row = {"streams": args.streams, "tokens": tokens, "baseline": revision, "baseline_ms_per_step": base,
                   "ms_per_step": ours, "ratio": base / ours, "same_texts": True, "runs": figures}
            rows.append(row)
            print(f"{args.streams} streams x {tokens} tokens: baseline {revision} {base:.3f} ms/step, this tree "
                  f"{ours:.3f} ms/step, ratio {base / ours:.2f}x (median of {len(figures['this tree'])} runs "
                  "each); same texts: yes", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
