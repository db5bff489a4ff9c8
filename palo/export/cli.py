"""``palo export --to hf-llava|gguf --model-path P [--model-base B] --output O``: see :mod:`palo.export.hf_llava`
and :mod:`palo.export.gguf`."""

from __future__ import annotations

import argparse
import errno
import os
import sys

TARGETS = ("hf-llava", "gguf")
# Errors only a write raises: a full disk, a quota, a file-size limit.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palo export",
        description="Export a PALO checkpoint (full, LoRA + base, stage-1 projector + base) to transformers' Llava "
        "layout (hf-llava: loadable by LlavaForConditionalGeneration/AutoProcessor without trust_remote_code and "
        "served by vLLM and SGLang), or to GGUF (gguf: a language-model file and an mmproj file for llama.cpp's "
        "llama-mtmd-cli / llama-server --mmproj, llama-cpp-python and runtimes built on llama.cpp).",
    )
    parser.add_argument("--to", required=True, choices=TARGETS, help="target format")
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--model-base", default=None, help="base LLM of a LoRA or stage-1 folder")
    parser.add_argument("--output", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template the chat template renders (default: the checkpoint's, vicuna_v1)")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "float16", "bfloat16"),
                        help="hf-llava: weights dtype (auto, the default: the checkpoint's torch_dtype, else float16)")
    parser.add_argument("--max-shard-size", default=None, help="hf-llava: largest safetensors shard, e.g. 5GB, 500MB "
                        "(default 5GB)")
    parser.add_argument("--outtype", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                        help="gguf: weights storage (default f16; q8_0 quantises the language model's matrices)")
    parser.add_argument("--name", default=None,
                        help="gguf: the files' stem (default: the checkpoint folder's or hub repository's name)")
    parser.add_argument("--vision-tower", default=None, help="override mm_vision_tower (e.g. a local CLIP folder)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output")
    return parser


def _writing_output(error: OSError, output: str) -> bool:
    """Whether ``error`` came from writing the export (not from reading the checkpoint): a write-only errno, or a
    file in ``output`` or in its staging folder (``.<name>.partial-...`` beside it)."""
    if error.errno in _WRITE_ERRNOS:
        return True
    if not error.filename:
        return False
    final = os.path.abspath(output)
    folder = os.path.dirname(os.path.abspath(str(error.filename)))
    return folder == final or (os.path.dirname(folder) == os.path.dirname(final)
                               and os.path.basename(folder).startswith(f".{os.path.basename(final)}.partial-"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output.strip():
        parser.error("--output must name a folder")
    only = {"hf-llava": ("dtype", "max_shard_size"), "gguf": ("outtype", "name")}
    for target, options in only.items():
        for option in options:
            if args.to != target and getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} applies to --to {target} only")
    from palo.export.hf_llava import ExportError
    from palo.model.builder import CheckpointError
    from palo.model.vision_tower import VisionTowerError

    try:
        if args.to == "gguf":
            from palo.export.gguf import export_gguf

            written = export_gguf(args.model_path, args.output, args.model_base, outtype=args.outtype or "f16",
                                  conv_mode=args.conv_mode, vision_tower=args.vision_tower, name=args.name,
                                  overwrite=args.overwrite)
            print(f"wrote {written.model_file} and {written.mmproj_file} ({written.outtype}, {written.projector_type} "
                  f"projector, chat template {written.conv_mode})")
            return 0
        from palo.export.hf_llava import export_hf_llava

        result = export_hf_llava(
            args.model_path, args.output, args.model_base, conv_mode=args.conv_mode, dtype=args.dtype or "auto",
            max_shard_size=args.max_shard_size or "5GB", vision_tower=args.vision_tower, overwrite=args.overwrite,
        )
    except (ExportError, CheckpointError, VisionTowerError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file of the checkpoint missing or not JSON, an output that cannot be written
        if _writing_output(error, args.output):  # named by --output: the file named is in a staging folder, now gone
            name = f" ({os.path.basename(str(error.filename))})" if error.filename else ""
            print(f"error: cannot write --output {args.output}{name}: {error.strerror or error}; nothing of this "
                  "export was left there", file=sys.stderr)
            return 2
        print(f"error: {error.strerror + ': ' + str(error.filename) if error.filename else error}", file=sys.stderr)
        return 2
    print(f"wrote {result.output_dir}: {len(result.weight_files)} weight file(s), <image> id {result.image_token_id}, "
          f"{result.num_image_tokens} positions per image, chat template {result.conv_mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
