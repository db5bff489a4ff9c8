"""``palo export --to hf-llava --model-path P [--model-base B] --output O``: see :mod:`palo.export.hf_llava`."""

from __future__ import annotations

import argparse
import sys

TARGETS = ("hf-llava",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palo export",
        description="Export a PALO checkpoint (full, LoRA + base, stage-1 projector + base) to transformers' Llava "
        "layout, loadable by LlavaForConditionalGeneration/AutoProcessor without trust_remote_code and served by "
        "vLLM and SGLang.",
    )
    parser.add_argument("--to", required=True, choices=TARGETS, help="target format")
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--model-base", default=None, help="base LLM of a LoRA or stage-1 folder")
    parser.add_argument("--output", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template the chat template renders (default: the checkpoint's, vicuna_v1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="weights dtype (auto: the checkpoint's torch_dtype, else float16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--vision-tower", default=None, help="override mm_vision_tower (e.g. a local CLIP folder)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from palo.export.hf_llava import ExportError, export_hf_llava
    from palo.model.builder import CheckpointError

    try:
        result = export_hf_llava(
            args.model_path, args.output, args.model_base, conv_mode=args.conv_mode, dtype=args.dtype,
            max_shard_size=args.max_shard_size, vision_tower=args.vision_tower, overwrite=args.overwrite,
        )
    except (ExportError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result.output_dir}: {len(result.weight_files)} weight file(s), <image> id {result.image_token_id}, "
          f"{result.num_image_tokens} positions per image, chat template {result.conv_mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
