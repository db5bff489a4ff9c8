"""One-shot inference, as LLaVA's ``llava/eval/run_llava.py``: one query about one or more images, answer printed.

    python palo/eval/run_llava.py --model-path MBZUAI/PALO-7B --image-file a.jpg,b.jpg --query "Compare them"

``--image-file`` takes several images joined by ``--sep`` (default ``,``); http(s) URLs are fetched only with
``--allow-remote-images`` (see :mod:`palo.remote_images`). The query is put in the checkpoint's conversation
template (``--conv-mode``, default the checkpoint's: ``vicuna_v1`` for PALO) with one ``<image>`` per image at its
front, or where the query writes ``<image-placeholder>`` (LLaVA's ``IMAGE_PLACEHOLDER``). Sampling follows
``--temperature`` (0 decodes greedily), ``--top_p`` and ``--num_beams``; ``--max_new_tokens`` caps the answer.

:func:`eval_model` takes the parsed arguments and returns (and prints) the answer, so notebooks can call it as
LLaVA users did with ``eval_model(args)``.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
from typing import Any

from palo.constants import IMAGE_PLACEHOLDER
from palo.remote_images import add_remote_image_args, policy_from_args


def build_parser() -> argparse.ArgumentParser:
    from palo.model.builder import add_dtype_argument

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, required=True, help="image paths/URLs joined by --sep")
    parser.add_argument("--query", type=str, required=True)
    parser.add_argument("--conv-mode", type=str, default=None, help="default: the checkpoint's template")
    parser.add_argument("--sep", type=str, default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    # Also spelled as model_vqa's flag, which its shared checks (model_vqa.generation_kwargs) name in their errors.
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=512)
    parser.add_argument("--device", type=str, default="cuda", help="cuda, cuda:N, cpu (cuda falls back to cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--vision-tower", type=str, default=None, help="override mm_vision_tower (a local CLIP folder)")
    add_remote_image_args(parser)
    return parser


def image_parser(args: Any) -> list[str]:
    """The images ``args.image_file`` names, split at ``args.sep`` (LLaVA's helper of the same name)."""
    return [f for f in args.image_file.split(getattr(args, "sep", ",")) if f]


def load_image(image_file: str, allow_remote: bool = False, policy: Any = None) -> Any:
    """One image as RGB (LLaVA's helper of the same name; :func:`palo.mm_utils.load_image`): an http(s) URL is
    fetched only with ``allow_remote``, within ``policy`` (a :class:`palo.remote_images.RemoteImagePolicy`)."""
    from palo.mm_utils import load_image as load

    return load(image_file, allow_remote=allow_remote, policy=policy)


def load_images(image_files: list[str], allow_remote: bool = False, policy: Any = None) -> list[Any]:
    """:func:`load_image` of each file, in order (LLaVA's helper of the same name)."""
    return [load_image(f, allow_remote, policy) for f in image_files]


def _query_with_images(query: str, num_images: int, token: str) -> str:
    """``query`` with one image ``token`` (``MultimodalSpec.image_placeholder``) per image.

    The tokens go where the query writes ``<image-placeholder>``, else one per line at its front.
    """
    if IMAGE_PLACEHOLDER in query:
        if query.count(IMAGE_PLACEHOLDER) != num_images:
            raise ValueError(f"the query has {query.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} but {num_images} "
                             "images were given")
        return query.replace(IMAGE_PLACEHOLDER, token)
    return (token + "\n") * num_images + query


def eval_model(args: Any) -> str:
    """Load the model, answer ``args.query`` about the images of ``args.image_file``, print and return the answer.

    Raises:
        palo.mm_utils.ImageLoadError: If an image cannot be read or a URL is refused.
        palo.model.builder.CheckpointError: If the checkpoint does not load (and OSError for a missing tokenizer
            file or a config.json that is not JSON, as transformers raises them).
        ValueError: If a generation setting cannot be used (``--num_beams 0``, ``--temperature -1`` ...) or
            ``--conv-mode`` is unknown (both said before anything loads), the query's placeholders and the images
            disagree, the checkpoint takes text only, or the prompt leaves no room for an answer in the model's
            positions.
    """
    import torch

    from palo.conversation import conv_mode_for_checkpoint, conv_templates, stop_string
    from palo.eval.model_vqa import generation_kwargs
    from palo.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from palo.model.builder import load_pretrained_model
    from palo.model.config import MultimodalSpec
    from palo.model.multimodal import no_room_for_answer

    # model_vqa's checks: a setting no generation takes is one line before the model loads, not a ZeroDivisionError
    # from beam search (--num_beams 0) or a negative temperature passed through as greedy decoding.
    generation = generation_kwargs(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    generation.pop("top_k", None)  # sampling keeps generate's default top_k, as LLaVA's run_llava did
    if args.conv_mode is not None and args.conv_mode not in conv_templates:
        raise ValueError(f"unknown --conv-mode {args.conv_mode!r}; known: {sorted(conv_templates)}")
    files = image_parser(args)
    if not files:
        raise ValueError("--image-file names no image")
    images = load_images(files, getattr(args, "allow_remote_images", False), policy_from_args(args))
    device = getattr(args, "device", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, device=device, vision_tower=getattr(args, "vision_tower", None),
        dtype=getattr(args, "dtype", None))
    if image_processor is None:
        raise ValueError(f"{args.model_path} takes text only; it cannot answer about images")
    conv = conv_templates[args.conv_mode or conv_mode_for_checkpoint(model.config)].copy()
    query = _query_with_images(args.query, len(images), MultimodalSpec.from_config(model.config).image_placeholder)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None].to(model.device)
    positions = getattr(model.config, "max_position_embeddings", None)
    problem = positions and no_room_for_answer(input_ids[0], model.image_token_count, positions)
    if problem:
        raise ValueError(f"{problem}: shorten --query")
    pixels = process_images(images, image_processor, model.config)
    pixels = (pixels.to(model.device, dtype=next(model.parameters()).dtype) if isinstance(pixels, torch.Tensor)
              else pixels)
    with torch.inference_mode():
        output = model.generate(input_ids, images=pixels, **generation, use_cache=True)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    stop = stop_string(conv)
    if stop and answer.endswith(stop):
        answer = answer[: -len(stop)].strip()
    print(answer)
    return answer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from palo.mm_utils import ImageLoadError
    from palo.model.builder import CheckpointError
    from palo.model.vision_tower import VisionTowerError

    try:
        eval_model(args)
    # OSError: what transformers raises for a checkpoint without tokenizer files or with a config.json that is not
    # JSON (a traceback before); the same errors model_vqa's loader turns into one line.
    except (ImageLoadError, CheckpointError, VisionTowerError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
