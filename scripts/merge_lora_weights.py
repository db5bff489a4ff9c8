"""Merge a PALO LoRA output into its base LLM and save a full checkpoint.

    python scripts/merge_lora_weights.py --model-path results/PALO-7B --model-base lmsys/vicuna-7b-v1.5 \
        --save-model-path results/PALO-7B-merged

Works whatever the folders are called: the LoRA folder is recognised by its files, not by "lora" in its name.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from palo.jsonl import staged_folder  # noqa: E402
from palo.mm_utils import get_model_name_from_path  # noqa: E402
from palo.model.builder import CheckpointError, load_pretrained_model  # noqa: E402
from palo.model.checkpoint_files import ADAPTER_CONFIG_FILE, WEIGHT_FILE_PATTERNS  # noqa: E402
from palo.model.vision_tower import VisionTowerError  # noqa: E402


def check_output(model_path: str, model_base: str, save_model_path: str) -> None:
    """Refuse a save that would replace what it reads or leave a folder that loads as something else.

    Raises:
        ValueError: Saying why.
    """
    out = os.path.realpath(save_model_path)
    for given, what in ((model_path, "--model-path"), (model_base, "--model-base")):
        if os.path.isdir(given) and os.path.commonpath([os.path.realpath(given), out]) == out:
            raise ValueError(f"--save-model-path {save_model_path} is or holds {what} {given}: choose another folder")
    if os.path.isfile(os.path.join(save_model_path, ADAPTER_CONFIG_FILE)):
        raise ValueError(f"--save-model-path {save_model_path} holds a LoRA adapter ({ADAPTER_CONFIG_FILE}): the "
                         "merged model saved there would still load as that adapter; choose another folder")


def merge_lora(model_path: str, model_base: str, save_model_path: str, dtype: torch.dtype = torch.float16) -> None:
    """Load ``model_path`` (+ ``model_base``) on CPU, merged, and save it in ``dtype`` with its tokenizer."""
    check_output(model_path, model_base, save_model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, model_base, get_model_name_from_path(model_path), device="cpu", dtype=dtype
    )
    # A killed save leaves no half-written checkpoint; an earlier save's weight shards there are replaced.
    with staged_folder(save_model_path, replaces=WEIGHT_FILE_PATTERNS) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if image_processor is not None:
            image_processor.save_pretrained(staging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=str, required=True)
    parser.add_argument("--model-base", type=str, required=True)
    parser.add_argument("--save-model-path", type=str, required=True)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="weights dtype of the merged model (the original saved float16)")
    args = parser.parse_args(argv)
    try:
        merge_lora(args.model_path, args.model_base, args.save_model_path, getattr(torch, args.dtype))
    except (CheckpointError, VisionTowerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model saved to {args.save_model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
