"""Export a PALO checkpoint to transformers' Llava layout (``LlavaForConditionalGeneration`` + ``AutoProcessor``).

Any checkpoint that :func:`palo.model.builder.load_pretrained_model` loads (full, LoRA + base, stage-1 projector
+ base) is loaded here first, so LoRA is merged and the projector and vision tower are exactly those PALO would
use. The folder written needs no ``trust_remote_code``:

* ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (or one ``model.safetensors``): the
  weights under the key names of the published ``llava-hf`` checkpoints (``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``),
  which transformers 4.x and 5, vLLM and SGLang all read;
* ``config.json`` (``LlavaConfig``: CLIP layer ``mm_vision_select_layer``, CLS dropped for ``patch``);
* ``preprocessor_config.json``: ``LlavaImageProcessor`` with ``do_pad`` true when the checkpoint's
  ``image_aspect_ratio`` is ``pad``. Its pad-to-square is PALO's: centred, background = CLIP mean x 255
  truncated (122, 116, 104), then resize of the short side and centre crop. The PIL backend (the one loaded
  where torchvision is absent) gives the same pixels as PALO; the torchvision backend resizes with its own
  bicubic kernel, so its pixels differ slightly (well under one grey level);
* the tokenizer (see :mod:`palo.export.tokenizer`) with ``<image>`` appended, and a chat template that renders the
  checkpoint's conversation template (:mod:`palo.export.chat_template`);
* ``processor_config.json`` (``LlavaProcessor``: patch size and feature strategy, so it expands each ``<image>``
  to the number of positions the projector produces) and ``generation_config.json``.

Vocabulary: ``<image>`` needs an id, so ``embed_tokens`` and ``lm_head`` get one extra row, both zeros. The
image positions' embeddings are replaced by image features, so the embedding row is never read; the ``lm_head``
row gives the image token a logit of exactly 0, and ``generation_config.json`` lists it in ``suppress_tokens``,
which transformers' ``generate`` honours (vLLM and SGLang do not read it; with a logit of 0 against the top logits
of a trained model the token is not chosen in practice). Every other logit equals PALO's.

Projectors: Llava's is ``linear_1 -> act -> linear_2``. ``mlp2x_gelu`` maps onto it directly (exact GELU).
``linear`` and ``mlp1x_gelu`` become ``linear_1`` = the projector with ``act`` = ``linear`` (identity) and
``linear_2`` = the identity matrix (exact; costs one hidden x hidden matrix), ``identity`` both identity
matrices. Such a folder loads in transformers and SGLang, but not in vLLM, whose Llava projector takes only the
activations of its own table, none of them the identity (a warning says so at export). ``mlp{N}x_gelu`` with
N >= 3 and ``ldpnet`` (MobilePALO's LDP: convolutions and a 4x token reduction) have no Llava equivalent and are
refused with :class:`ExportError`; no custom-code folder is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from palo.conversation import conv_mode_for_checkpoint
from palo.export.chat_template import chat_template_for
from palo.export.tokenizer import write_tokenizer
from palo.jsonl import staged_folder
from palo.model.checkpoint_files import WEIGHT_FILE_PATTERNS

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportResult", "check_exportable", "checked_checkpoint_config", "export_hf_llava",
           "llava_projector_state", "parse_size", "recorded_dtype"]

IMAGE_TOKEN = "<image>"
_TOWER = "model.vision_tower.vision_tower."
_PROJECTOR = "model.mm_projector."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """The checkpoint cannot be expressed as a transformers Llava model."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_hf_llava` wrote.

    Attributes:
        output_dir: The folder.
        image_token_id: The id of ``<image>`` in the exported tokenizer.
        num_image_tokens: Positions one image occupies (what the processor expands ``<image>`` to).
        conv_mode: The conversation template the chat template renders.
        weight_files: The safetensors files written.
    """

    output_dir: str
    image_token_id: int
    num_image_tokens: int
    conv_mode: str
    weight_files: tuple[str, ...]


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KB"`` or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", size.upper())
    if not match:
        raise ValueError(f"not a size: {size!r} (e.g. 5GB, 500MB)")
    scale = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def check_exportable(projector_type: str) -> None:
    """Raise :class:`ExportError` unless Llava's two-layer projector can express ``projector_type``."""
    if projector_type.startswith("ldpnet"):
        raise ExportError(
            f"mm_projector_type {projector_type!r} (MobilePALO's LDP: depthwise convolutions, 4x fewer image tokens) "
            "has no transformers Llava equivalent, so it cannot be exported to hf-llava. Serve it with this "
            "package's own worker (palo-worker) instead."
        )
    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if mlp and int(mlp.group(1)) >= 3:
        raise ExportError(
            f"mm_projector_type {projector_type!r} has {mlp.group(1)} linear layers; transformers' Llava projector "
            "has exactly two (linear_1, activation, linear_2), so only linear, identity, mlp1x_gelu and mlp2x_gelu "
            "export."
        )
    if not (mlp and int(mlp.group(1)) >= 1) and projector_type not in ("linear", "identity"):
        raise ExportError(f"unknown mm_projector_type {projector_type!r}")


def llava_projector_state(
    projector_type: str, state: dict[str, torch.Tensor], mm_hidden_size: int, hidden_size: int
) -> tuple[dict[str, torch.Tensor], str]:
    """PALO projector weights (keys without ``model.mm_projector.``) as Llava's ``linear_1``/``linear_2``.

    Returns:
        The state dict (keys ``linear_1.weight`` ...) and Llava's ``projector_hidden_act``.

    Raises:
        ExportError: For projectors Llava cannot express (``ldpnet``, ``mlp{N}x_gelu`` with N >= 3).
    """
    check_exportable(projector_type)
    dtype = next(iter(state.values())).dtype if state else torch.float32

    def eye(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.eye(rows, cols, dtype=dtype), torch.zeros(rows, dtype=dtype)

    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if projector_type in ("linear", "identity") or (mlp and int(mlp.group(1)) == 1):
        logger.warning("the %s projector exports with projector_hidden_act 'linear' (the identity): the folder loads "
                       "in transformers and SGLang, but vLLM's Llava takes no identity activation and refuses it",
                       projector_type)
    if projector_type == "linear" or (mlp and int(mlp.group(1)) == 1):
        w2, b2 = eye(hidden_size, hidden_size)
        prefix = "" if "weight" in state else "0."
        return {"linear_1.weight": state[prefix + "weight"], "linear_1.bias": state[prefix + "bias"],
                "linear_2.weight": w2, "linear_2.bias": b2}, "linear"
    if mlp and int(mlp.group(1)) == 2:
        return {"linear_1.weight": state["0.weight"], "linear_1.bias": state["0.bias"],
                "linear_2.weight": state["2.weight"], "linear_2.bias": state["2.bias"]}, "gelu"
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ExportError("identity projector with mm_hidden_size != hidden_size")
        w1, b1 = eye(hidden_size, mm_hidden_size)
        w2, b2 = eye(hidden_size, hidden_size)
        return {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}, "linear"
    raise AssertionError(projector_type)  # check_exportable admits nothing else


def _llava_state(model: Any, image_rows: int) -> tuple[dict[str, torch.Tensor], str]:
    """The whole model under llava-hf key names, with ``image_rows`` zero rows appended to the vocabulary."""
    state = model.state_dict()
    spec = model.spec
    projector = {k[len(_PROJECTOR):]: v for k, v in state.items() if k.startswith(_PROJECTOR)}
    projector_state, act = llava_projector_state(
        spec.projector_type, projector, spec.mm_hidden_size, model.config.hidden_size
    )
    out: dict[str, torch.Tensor] = {f"multi_modal_projector.{k}": v for k, v in projector_state.items()}
    for key, value in state.items():
        if key.startswith(_PROJECTOR):
            continue
        if key.startswith(_TOWER):
            if key.endswith("position_ids"):
                continue  # a buffer, rebuilt by CLIP
            out["vision_tower." + key[len(_TOWER):]] = value
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.zeros(image_rows, value.shape[1], dtype=value.dtype)
            name = ("language_model.model.embed_tokens.weight" if key.startswith("model.")
                    else "language_model.lm_head.weight")
            out[name] = torch.cat([value, extra], dim=0)
        elif key.startswith("model."):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            out["language_model." + key] = value
        else:
            raise ExportError(f"unexpected weight {key!r} in the loaded model")
    if "language_model.lm_head.weight" not in out:  # tied embeddings: Llava unties nothing, write the copy
        out["language_model.lm_head.weight"] = out["language_model.model.embed_tokens.weight"]
    return out, act


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """``save_file``, its failure to write raised as the OSError it is.

    Raises:
        OSError: A write that failed (``No space left on device``, with ``path``): safetensors raises its own
            SafetensorError, an "I/O error ... (os error 28)" that callers catching OSError let through as a
            traceback.
        ExportError: For any other SafetensorError.
    """
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code:
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), path) from error
        raise ExportError(f"cannot write {path}: {error}") from error


def _save_sharded(state: dict[str, torch.Tensor], out_dir: str, max_shard_size: int) -> tuple[str, ...]:
    """Save like ``save_pretrained``: shards of at most ``max_shard_size`` bytes (a tensor never splits)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        # Tensors sharing storage (tied weights) must be separate copies in safetensors.
        shards[-1][key] = (tensor.clone() if any(tensor.data_ptr() == t.data_ptr() for t in shards[-1].values())
                           else tensor)
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _save_safetensors(shards[0], os.path.join(out_dir, "model.safetensors"), metadata)
        return ("model.safetensors",)
    names = []
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, os.path.join(out_dir, name), metadata)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return tuple(names)


def _add_legacy_keys(config_path: str, dtype: str) -> None:
    """Add the keys transformers 4.x (what vLLM and SGLang pin) reads where transformers 5 writes others.

    * ``torch_dtype``: transformers 5 writes ``dtype``.
    * ``rope_theta`` and ``rope_scaling`` of the text config: transformers 5 writes one ``rope_parameters`` dict,
      which 4.x ignores, so a LLaMA base with another theta or a scaled RoPE got 4.x's defaults (theta 10000, no
      scaling), and vLLM on 4.x overwrote the theta with that default. transformers 5 reads the two keys back into
      the same ``rope_parameters``.
    """
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["torch_dtype"] = dtype
    text = config.get("text_config", {})
    text["torch_dtype"] = dtype
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", "default")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        text["rope_scaling"] = None if kind == "default" else dict(scaling, type=kind, rope_type=kind)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _image_processor(palo_processor: Any, pad: bool) -> Any:
    try:
        from transformers import LlavaImageProcessorPil as processor_class
    except ImportError:  # pragma: no cover - older transformers: one (PIL) class
        from transformers import LlavaImageProcessor as processor_class
    crop = palo_processor.crop_size
    size = palo_processor.size
    return processor_class(
        do_resize=palo_processor.do_resize,
        size=dict(size) if not hasattr(size, "items") else {k: v for k, v in size.items() if v is not None},
        resample=palo_processor.resample,
        do_center_crop=palo_processor.do_center_crop,
        crop_size={k: v for k, v in dict(crop).items() if v is not None},
        do_rescale=palo_processor.do_rescale,
        rescale_factor=palo_processor.rescale_factor,
        do_normalize=palo_processor.do_normalize,
        image_mean=list(palo_processor.image_mean),
        image_std=list(palo_processor.image_std),
        do_convert_rgb=True,
        do_pad=pad,
    )


def recorded_dtype(config: Any) -> str | None:
    """The weights dtype a checkpoint's config records (``"float16"``, ...), or None.

    transformers 5 names it ``dtype`` (and warns when ``torch_dtype`` is read); configs written by 4.x say
    ``torch_dtype``, which transformers 5 maps onto ``dtype`` when it loads them.
    """
    recorded = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype")
    return str(recorded).replace("torch.", "") if recorded is not None else None


def checked_checkpoint_config(model_path: str, output_dir: str, overwrite: bool) -> tuple[str, Any, Any]:
    """What every export checks before loading gigabytes: a writable ``output_dir`` and a multimodal checkpoint.

    Returns:
        The checkpoint folder, its config and its :class:`palo.model.config.MultimodalSpec`.

    Raises:
        ExportError: If ``output_dir`` is a file or a non-empty folder (without ``overwrite``), or the checkpoint
            is a text-only LLM.
        palo.model.builder.CheckpointError: If ``model_path`` is not a checkpoint.
    """

    from palo.model.builder import detect_checkpoint_kind, read_config, resolve_checkpoint_dir, unreadable_files_named
    from palo.model.config import MultimodalSpec

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ExportError(f"{output_dir!r} is a file; pass a folder to write")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"{output_dir!r} exists and is not empty; choose a new folder (or pass overwrite)")
    model_dir = resolve_checkpoint_dir(model_path)
    inside = os.path.commonpath([os.path.realpath(model_dir), os.path.realpath(output_dir)])
    if inside == os.path.realpath(output_dir):  # the checkpoint is the output, or inside it
        raise ExportError(f"{output_dir!r} holds the checkpoint {model_path!r}: an export there would replace what "
                          "it reads; choose another folder")
    detect_checkpoint_kind(model_dir)
    with unreadable_files_named(model_path, None):
        config = read_config(model_dir)  # as the loader reads it: MobileVLM's flat "mobilevlm" config too
    spec = MultimodalSpec.from_config(config)
    if not spec.is_multimodal:
        raise ExportError(f"{model_path!r} is a text-only LLM (its config names no mm_vision_tower); nothing to export")
    return model_dir, config, spec


def export_hf_llava(
    model_path: str,
    output_dir: str,
    model_base: str | None = None,
    *,
    conv_mode: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    vision_tower: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``output_dir`` as a transformers Llava folder equivalent to the PALO checkpoint ``model_path``.

    Args:
        model_path: A checkpoint folder or hub id (full, LoRA or stage-1 output).
        output_dir: The folder to write; it must not exist or be empty (unless ``overwrite``).
        model_base: The base LLM for LoRA and stage-1 folders.
        conv_mode: The conversation template the chat template renders (default: the checkpoint's,
            ``vicuna_v1`` for PALO).
        dtype: ``auto`` (the config's ``torch_dtype``, else float16), ``float32``, ``float16`` or ``bfloat16``.
        max_shard_size: Largest safetensors shard (``5GB`` as ``save_pretrained``).
        vision_tower: Override ``mm_vision_tower`` (a local CLIP folder for offline use).
        overwrite: Allow a non-empty ``output_dir`` (files of the same names are replaced).

    Returns:
        What was written.

    Raises:
        ExportError: For checkpoints Llava cannot express (``ldpnet``, deep MLP projectors, text-only LLMs).
        palo.model.builder.CheckpointError: If ``model_path`` does not load.
    """
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from palo.model.builder import load_pretrained_model

    if dtype != "auto" and dtype not in _DTYPES:
        raise ExportError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    _, config, spec = checked_checkpoint_config(model_path, output_dir, overwrite)
    check_exportable(spec.projector_type)
    mode = conv_mode or conv_mode_for_checkpoint(config)
    image_placeholder = "<im_start><image><im_end>" if spec.use_im_start_end else IMAGE_TOKEN
    template = chat_template_for(mode, image_placeholder, bos=True)
    if dtype == "auto":
        recorded = recorded_dtype(config)
        dtype = recorded if recorded in _DTYPES else "float16"
    torch_dtype = _DTYPES[dtype]

    tokenizer, model, palo_processor, _ = load_pretrained_model(
        model_path, model_base, device="cpu", device_map=None, dtype=torch_dtype, vision_tower=vision_tower
    )
    final_dir = output_dir
    # A killed export leaves no half-written folder behind; over an earlier export, its weight files go.
    with staged_folder(final_dir, replaces=WEIGHT_FILE_PATTERNS) as output_dir:
        image_token_id = write_tokenizer(tokenizer, output_dir, IMAGE_TOKEN, chat_template=template)
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        if vocab_rows != image_token_id:
            raise ExportError(f"the model has {vocab_rows} embedding rows but the tokenizer {image_token_id} tokens")

        state, act = _llava_state(model, image_rows=1)
        state = {k: v.to(torch_dtype) for k, v in state.items()}
        weight_files = _save_sharded(state, output_dir, max_bytes)

        tower = model.get_vision_tower()
        text_values = {k: v for k, v in model.config.to_dict().items()
                       if not k.startswith(("mm_", "tokenizer_", "tune_mm", "freeze_mm", "use_mm", "image_aspect"))}
        for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
            text_values.pop(key, None)
        text_config = LlamaConfig(**dict(text_values, vocab_size=vocab_rows + 1))
        strategy = "full" if spec.select_feature == "cls_patch" else "default"
        llava_config = LlavaConfig(
            vision_config=CLIPVisionConfig(**tower.config.to_dict()).to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=image_token_id,
            projector_hidden_act=act,
            vision_feature_layer=spec.select_layer,
            vision_feature_select_strategy=strategy,
            multimodal_projector_bias=True,
            tie_word_embeddings=False,
            image_seq_length=tower.num_tokens,
        )
        llava_config.architectures = ["LlavaForConditionalGeneration"]
        llava_config.torch_dtype = dtype
        llava_config.save_pretrained(output_dir)
        _add_legacy_keys(os.path.join(output_dir, "config.json"), dtype)

        generation = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id,
            suppress_tokens=[image_token_id],
        )
        generation.save_pretrained(output_dir)

        image_processor = _image_processor(palo_processor, pad=spec.image_aspect_ratio == "pad")
        from transformers import AutoTokenizer

        fast_tokenizer = AutoTokenizer.from_pretrained(output_dir)
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=fast_tokenizer,
            patch_size=tower.config.patch_size,
            vision_feature_select_strategy=strategy,
            chat_template=template,
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1,
        )
        processor.save_pretrained(output_dir)
        # transformers 5 nests the image processor in processor_config.json; transformers 4.x (vLLM, SGLang) reads
        # preprocessor_config.json.
        image_processor.save_pretrained(output_dir)
        # The processor re-saved the tokenizer through transformers; put back the exact files written above.
        write_tokenizer(tokenizer, output_dir, IMAGE_TOKEN, chat_template=template)
    num_tokens = tower.num_tokens
    logger.info("Exported %s to %s (%d weight files, <image> id %d, %d positions per image, template %s)",
                model_path, final_dir, len(weight_files), image_token_id, num_tokens, mode)
    return ExportResult(final_dir, image_token_id, num_tokens, mode, weight_files)
