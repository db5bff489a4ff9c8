"""Interactive chat about an image in the terminal, streamed (``python -m palo.serve.cli``).

The flags are those of LLaVA's ``cli.py``; ``--conv-mode`` defaults to the template the checkpoint was trained
with (from its config, not its name). Type in any of the 10 languages; an empty line, EOF or Ctrl-C at the prompt
ends the chat, and Ctrl-C during an answer stops that answer (what it said so far stays in the conversation; a second
Ctrl-C quits).
Answers come from :mod:`palo.engine`, whose prefix cache keeps the image and the earlier turns: each turn computes
only what is new.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.conversation import conv_mode_for_checkpoint, conv_templates, stop_string
from palo.mm_utils import ImageLoadError, get_model_name_from_path, load_image, process_images, tokenizer_image_token
from palo.model.builder import add_dtype_argument
from palo.model.config import MultimodalSpec
from palo.model.multimodal import spliced_length


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, default=None,
                        help="image to talk about: a local file, or an http(s) URL with --allow-remote-images "
                             "(omit for text-only)")
    parser.add_argument("--device", type=str, default=None, help="cuda, cuda:N, cpu (default: cuda when available)")
    add_dtype_argument(parser)
    parser.add_argument("--conv-mode", type=str, default=None, choices=sorted(conv_templates))
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--vision-tower", type=str, default=None, help="override mm_vision_tower (a local CLIP folder)")
    parser.add_argument("--debug", action="store_true")
    from palo.remote_images import add_remote_image_args

    add_remote_image_args(parser)  # --image-file may be an http(s) URL with --allow-remote-images
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or not args.temperature >= 0:
        print(f"error: --max-new-tokens must be at least 1 and --temperature at least 0 (0: greedy), got "
              f"{args.max_new_tokens} and {args.temperature}", file=sys.stderr)
        return 2
    from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
    from palo.model.builder import CheckpointError, load_pretrained_model
    from palo.model.vision_tower import VisionTowerError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = None
    if args.image_file:
        try:
            from palo.remote_images import policy_from_args

            image = load_image(args.image_file, allow_remote=args.allow_remote_images, policy=policy_from_args(args))
        except (ImageLoadError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    model_name = get_model_name_from_path(args.model_path)
    try:
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit, device=device,
            vision_tower=args.vision_tower, dtype=args.dtype,
        )
    except (CheckpointError, VisionTowerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if image is not None and image_processor is None:
        print("error: this checkpoint takes text only; drop --image-file", file=sys.stderr)
        return 2

    conv_mode = conv_mode_for_checkpoint(model.config)
    if args.conv_mode and args.conv_mode != conv_mode:
        print(f"[note] the checkpoint was trained with --conv-mode {conv_mode}; using {args.conv_mode} as asked")
        conv_mode = args.conv_mode
    conv = conv_templates[conv_mode].copy()
    roles = conv.roles
    images = None
    if image is not None:
        images = process_images([image], image_processor, model.config).to(model.device, dtype=model.dtype)
    # Positions per image from the tower's and projector's config (MultimodalSpec.tokens_per_image): the tower runs
    # only when the engine encodes the image. A text-only LLM has none.
    tokens_per_image = int(getattr(model, "image_token_count", 0))
    # The model's own positions, as the worker, palo.LLM, model_vqa and model.generate hold it to; the loader's
    # context length (the original's max_sequence_length, else 2048) only where the config names none.
    context_len = int(getattr(model.config, "max_position_embeddings", None) or context_len)
    # One conversation: a cache for one sequence at the full context (earlier turns' blocks are its prefix-cache
    # hits), not the default share of a GPU's memory that a server takes.
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=context_len,
                                                      num_blocks=-(-context_len // EngineConfig.block_size) + 1))
    placeholder = MultimodalSpec.from_config(model.config).image_placeholder

    while True:
        try:
            inp = input(f"{roles[0]}: ")
        except (EOFError, KeyboardInterrupt):
            print()
            inp = ""
        if not sys.stdin.isatty() and inp:
            print(inp)  # piped input is not echoed by the terminal: show it so transcripts read as a chat
        if not inp:
            print("exit...")
            return 0
        refused = _refused_turn(inp)
        if refused:  # the turn is not sent; the conversation goes on
            print(f"[{refused}]")
            continue
        print(f"{roles[1]}: ", end="", flush=True)
        if image is not None and len(conv.messages) == conv.offset:  # the image rides on the first user turn
            inp = placeholder + "\n" + inp
        conv.append_message(roles[0], inp)
        conv.append_message(roles[1], None)
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tokenizer)
        prompt_tokens = spliced_length(input_ids, tokens_per_image)
        budget = context_len - prompt_tokens
        if budget <= 0:
            del conv.messages[-2:]  # not sent: a shorter question may still fit
            print(f"\n[the conversation is {prompt_tokens} tokens, over the model's {context_len}; this turn was "
                  "not sent: ask something shorter, or end the chat (empty line) and start a new one]")
            continue
        stop = stop_string(conv)
        sampling = SamplingParams(max_tokens=min(args.max_new_tokens, budget), temperature=max(args.temperature, 0.0),
                                  stop=(stop,) if stop else ())
        stream = _Stream()
        request = EngineRequest(input_ids, images, sampling, on_output=stream.show)
        try:
            with _ctrl_c_stops(stream.stopped):
                result = engine.generate([request])[0]
        except (ValueError, TimeoutError) as exc:
            # A request the engine refuses (ValueError: ImagePlaceholderMismatch, RequestTooLarge, a bad sampling
            # setting) or one that took too long: generate cancelled it and the engine is intact, so say why and
            # leave the turn out; the conversation before it can go on.
            del conv.messages[-2:]
            print(f"\n[this turn could not be answered: {exc}; it is left out of the conversation]")
            continue
        print(" [stopped]" if stream.stopped.is_set() else "")
        if result.error:
            print(f"[generation failed: {result.error}]", file=sys.stderr)
            return 1
        # A stopped answer enters the conversation as far as it was shown. A literal <image> in it (a model asked
        # which tag marks the image) would be one placeholder more than there are images in every later prompt, which
        # the engine refuses: it is kept as "(image)", as the web demo keeps it.
        outputs = (stream.shown if stream.stopped.is_set() else result.text).strip()
        outputs = outputs.replace(DEFAULT_IMAGE_TOKEN, "(image)")
        if not outputs:  # an empty answer renders as an open turn, so the next prompt would lose its separator
            del conv.messages[-2:]  # (the image, if it rode on this turn, rides on the next)
            print("[no answer: this turn is left out of the conversation]")
            continue
        conv.messages[-1][-1] = outputs
        if args.debug:
            print("\n", {"prompt": prompt, "outputs": outputs}, "\n")


def _refused_turn(text: str) -> str | None:
    """Why a typed turn cannot be sent, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates by the terminal's decoding
        return "that line is not UTF-8 text; type it again"
    if DEFAULT_IMAGE_TOKEN in text:
        return (f"{DEFAULT_IMAGE_TOKEN} marks where an image goes and cannot be typed; the image is the one given by "
                "--image-file")
    return None


class _AnswerStopped(Exception):
    """Raised from the output callback: the engine then cancels the request and frees its cache."""


class _Stream:
    """The engine's output callback for one answer: prints each new piece until ``stopped`` is set.

    Attributes:
        stopped: Set by Ctrl-C (see :func:`_ctrl_c_stops`).
        shown: The text printed so far.
    """

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.shown = ""

    def show(self, output) -> None:
        if self.stopped.is_set():
            if not output.finished:
                raise _AnswerStopped  # from the callback, between engine steps: no step is cut in half
            return
        print(output.delta, end="", flush=True)
        self.shown += output.delta


@contextlib.contextmanager
def _ctrl_c_stops(stopped: threading.Event) -> Iterator[None]:
    """While generating: the first Ctrl-C sets ``stopped`` (the answer ends at the next token, the engine intact);
    a second one raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def first_ctrl_c(signum, frame) -> None:
        stopped.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
