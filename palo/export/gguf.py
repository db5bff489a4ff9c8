"""Export a PALO checkpoint to GGUF: llama.cpp, and what runs on it (llama-cpp-python, runtimes built on it).

llama.cpp's multimodal tools (``llama-mtmd-cli``, ``llama-server --mmproj``, libmtmd) load a LLaVA-style model as
two files, and the export writes both, each staged and renamed into place (a killed export leaves nothing half
written):

* ``<name>-<outtype>.gguf``: the language model, architecture ``llama``, with its SentencePiece vocabulary (pieces,
  scores and piece types as the model holds them, ``<s>``/``</s>``/``<unk>``, the dummy-prefix setting) and a chat
  template that renders the checkpoint's conversation template with llama.cpp's media marker ``<__media__>`` where
  an image goes (and lays out the markers llama.cpp's CLI and server put into plain-text messages as PALO lays out
  images: first, one newline after each);
* ``mmproj-<name>-<storage>.gguf``: the CLIP vision tower and the projector (``clip.projector_type`` ``mlp`` for
  PALO-7B/13B's ``mlp2x_gelu``, ``ldp`` for MobilePALO's ``ldpnet``), named after what it holds: ``outtype``, but
  ``f16`` for ``q8_0`` (the vision tower is not quantized).

What the format needs, and how PALO's model maps onto it:

* **Vision layers.** PALO reads CLIP's ``hidden_states[mm_vision_select_layer]`` (-2: the input of the last layer)
  without the post-layernorm. The export writes the layers up to that one only and names it in
  ``clip.vision.feature_layer``, so llama.cpp stops there; the post-layernorm is left out. The class position is
  computed and dropped, as PALO's ``patch`` features do (``cls_patch`` checkpoints are refused). llama.cpp's own
  LLaVA graph currently appends the class position after the patches instead of before them
  (ggml-org/llama.cpp#25814); no file can make up for that, and its image features differ from PALO's until it is
  fixed there.
* **Rotary layout.** transformers' LLaMA rotates the two halves of each head; llama.cpp's ``llama`` rotates
  adjacent pairs, so the rows of ``q_proj`` and ``k_proj`` are reordered within each head (the logits are the
  same).
* **Activations.** llama.cpp's projector applies its tanh-approximated GELU where PALO's applies the exact one; the
  difference (below 1e-3 per feature) is llama.cpp's, not the file's.
* **Images.** llama.cpp pads an image to a square with CLIP's mean colour (122, 116, 104) and resizes it to the
  tower's size, as PALO's ``pad`` does; its own bicubic resize gives pixels slightly unlike PIL's. Checkpoints
  that resize and centre-crop instead (``image_aspect_ratio`` other than ``pad``) are padded there too.
* **LDP.** llama.cpp's LDP graph assumes a 24 x 24 patch grid (CLIP-L/336, which MobilePALO uses); other grids are
  refused.

``outtype`` chooses the weights' storage: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0`` (8-bit blocks of 32,
for matrices whose rows are a multiple of 32; other tensors stay ``f16``). Norms, biases and embeddings of the
vision tower stay ``f32``, as llama.cpp's own converters keep them; the projector and tower matrices of a ``q8_0``
export are written in ``f16``, and LDP's depthwise kernels are ``f16`` (``bf16`` in a ``bf16`` export) in every
export, the only storage ggml's depthwise convolution multiplies with (it unfolds the image into ``f16`` columns
itself).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from palo.conversation import conv_mode_for_checkpoint
from palo.export.chat_template import chat_template_for
from palo.export.hf_llava import ExportError, checked_checkpoint_config, recorded_dtype
from palo.export.tokenizer import read_sentencepiece_bpe
from palo.jsonl import nearly_full, staged_folder

logger = logging.getLogger(__name__)

__all__ = ["GGUF_OUTTYPES", "GGUFExportResult", "MEDIA_MARKER", "export_gguf", "gguf_projector_type"]

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# What llama.cpp's libmtmd replaces with an image's embeddings (mtmd_default_marker()); llama-server writes
# <__media_<random>__> instead, so the chat template recognises the family.
MEDIA_MARKER = "<__media__>"
MEDIA_MARKERS = ("<__media", "__>")
_TOWER = "model.vision_tower.vision_tower."
_PROJECTOR = "model.mm_projector."
# llama.cpp's LDP graph lays the projected patches out on a fixed 24 x 24 grid (CLIP-L/14 at 336 pixels).
_LDP_GRID = 24
# SentencePiece piece types and GGUF token types share their numbers (normal 1, unknown 2, control 3,
# user-defined 4, unused 5, byte 6).
_USER_DEFINED, _CONTROL, _UNUSED = 4, 3, 5


@dataclass(frozen=True)
class GGUFExportResult:
    """What :func:`export_gguf` wrote.

    Attributes:
        model_file: The language model's GGUF file.
        mmproj_file: The vision tower and projector's GGUF file.
        projector_type: ``clip.projector_type`` (``mlp`` or ``ldp``).
        outtype: The weights' storage type.
        conv_mode: The conversation template the chat template renders.
    """

    model_file: str
    mmproj_file: str
    projector_type: str
    outtype: str
    conv_mode: str


def gguf_projector_type(projector_type: str) -> str:
    """llama.cpp's name for PALO's ``mm_projector_type``.

    Raises:
        ExportError: For projectors llama.cpp's LLaVA graph cannot run as they are.
    """
    if projector_type == "mlp2x_gelu":
        return "mlp"
    if projector_type == "ldpnet":
        return "ldp"
    raise ExportError(
        f"mm_projector_type {projector_type!r} has no llama.cpp equivalent: its LLaVA graph runs mlp2x_gelu "
        "(linear, GELU, linear: PALO-7B/13B) and ldpnet (MobileVLM's LDP: MobilePALO); a single linear projector "
        "would get a GELU it does not have"
    )


# -- tensors --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    """One tensor of a GGUF file: its name, how to make its float32 values, and its storage type."""

    name: str
    values: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def _storage(gguf: Any, shape: tuple[int, ...], outtype: str, rounded_ok: bool) -> Any:
    """The storage type of a tensor for ``outtype``: 1-D tensors (norms, biases) and those added to activations as
    they are (``rounded_ok`` false: the tower's position and class embeddings) stay F32; q8_0 applies to matrices
    whose rows split into blocks of 32, other matrices are F16."""
    types = gguf.GGMLQuantizationType
    if outtype == "f32" or len(shape) == 1 or not rounded_ok:
        return types.F32
    if outtype == "bf16":
        return types.BF16
    if outtype == "q8_0" and len(shape) == 2 and shape[-1] % 32 == 0:
        return types.Q8_0
    return types.F16


def _plain_dtype(gguf: Any, qtype: Any) -> Any:
    """The numpy dtype of a storage type numpy holds itself (F32, F16), or None for those gguf packs into bytes."""
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)


def _encode(gguf: Any, values: np.ndarray, qtype: Any) -> np.ndarray:
    dtype = _plain_dtype(gguf, qtype)
    if dtype is not None:
        return values.astype(dtype)
    return gguf.quants.quantize(values.astype(np.float32), qtype)  # BF16, Q8_0: the library's bit layout


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a ``q_proj``/``k_proj`` weight ``[heads * head_dim, D]`` from transformers' rotary
    layout (dimension i pairs with i + head_dim/2) to llama.cpp's (2i pairs with 2i + 1)."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _llm_tensors(gguf: Any, model: Any, outtype: str) -> list[_Tensor]:
    """The language model's tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ``output`` ...)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for key, value in model.state_dict().items():
        if key.startswith((_TOWER, _PROJECTOR)) or key.endswith("rotary_emb.inv_freq"):
            continue
        stem, suffix = key.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise ExportError(f"no llama.cpp name for the language model's weight {key!r}")
        permute = heads if stem.endswith("q_proj") else kv_heads if stem.endswith("k_proj") else 0

        def values(value: torch.Tensor = value, permute: int = permute) -> np.ndarray:
            array = _as_numpy(value)
            return _rotary_rows(array, permute) if permute else array

        shape = tuple(value.shape)
        out.append(_Tensor(f"{name}.{suffix}", values, shape, _storage(gguf, shape, outtype, True)))
    return out


def _mmproj_outtype(outtype: str) -> str:
    """The mmproj's storage for an export's ``outtype``: the vision tower and projector are not quantized."""
    return "f16" if outtype == "q8_0" else outtype


def _vision_tensors(gguf: Any, model: Any, layers: int, outtype: str) -> list[_Tensor]:
    """The tower's tensors up to the layer PALO reads (no post-layernorm), under llama.cpp's ``v.*`` names."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, layers)
    mm_outtype = _mmproj_outtype(outtype)
    out = []
    for key, value in model.state_dict().items():
        if not key.startswith(_TOWER) or key.endswith("position_ids") or ".post_layernorm." in key:
            continue
        layer = re.search(r"\.encoder\.layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= layers:
            continue
        stem = "vision_tower." + key[len(_TOWER):]
        if stem.endswith("class_embedding"):
            name = names.get_name(stem)
        else:
            stem, suffix = stem.rsplit(".", 1)
            name = names.get_name(stem)
            name = name and f"{name}.{suffix}"
        if name is None:
            raise ExportError(f"no llama.cpp name for the vision tower's weight {key!r}")
        shape = tuple(value.shape)
        # Position and class embeddings are added to activations: F32, as llama.cpp's converters keep them.
        rounded_ok = "embd" not in name or name.startswith("v.patch_embd")
        out.append(_Tensor(name, lambda value=value: _as_numpy(value), shape,
                           _storage(gguf, shape, mm_outtype, rounded_ok)))
    return out


def _projector_tensors(gguf: Any, model: Any, outtype: str) -> list[_Tensor]:
    """The projector under llama.cpp's names: ``mm.0``/``mm.2`` (mlp), ``mm.model.*`` (ldp, 1x1 convolutions as
    matrices and depthwise kernels as ``[C, 3, 3]``, as its LDP graph reads them)."""
    mm_outtype = _mmproj_outtype(outtype)
    out = []
    for key, value in model.state_dict().items():
        if not key.startswith(_PROJECTOR):
            continue
        name = "mm." + key[len(_PROJECTOR):]
        array_shape = tuple(s for s in value.shape if s != 1) if value.dim() == 4 else tuple(value.shape)

        def values(value: torch.Tensor = value, shape: tuple[int, ...] = array_shape) -> np.ndarray:
            return _as_numpy(value).reshape(shape)

        if len(array_shape) == 3:
            # A depthwise kernel: ggml's depthwise convolution unfolds the image into F16 columns (F32 for a BF16
            # kernel) and multiplies them with the kernel, which must be F16 (or BF16) for that product to exist.
            qtype = gguf.GGMLQuantizationType.BF16 if mm_outtype == "bf16" else gguf.GGMLQuantizationType.F16
        else:
            qtype = _storage(gguf, array_shape, mm_outtype, True)
        out.append(_Tensor(name, values, array_shape, qtype))
    return out


def _write_error(path: str, error: OSError) -> OSError:
    """The OSError to report for a failed write of ``path``: with the file, and with the cause that numpy drops.

    numpy's ``tofile`` reports a short write as "8192 requested and 2768 written", without errno or file; the likely
    cause, a full disk, is read from the free space left.
    """
    if error.errno is not None:
        return OSError(error.errno, error.strerror, error.filename or path)
    if nearly_full(path) is not None:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return OSError(None, f"the write stopped short ({error}): a quota or a file-size limit?", path)


def _write(gguf: Any, writer: Any, tensors: list[_Tensor]) -> None:
    """Header, metadata and tensors, one tensor in memory at a time.

    Raises:
        OSError: A write that failed (a full disk), naming the file.
    """
    try:
        _write_all(gguf, writer, tensors)
    except OSError as error:
        with contextlib.suppress(OSError):  # what it still buffers would go to the same full disk
            writer.close()
        raise _write_error(str(writer.path), error) from error


def _write_all(gguf: Any, writer: Any, tensors: list[_Tensor]) -> None:
    for t in tensors:
        plain = _plain_dtype(gguf, t.qtype)
        if plain is not None:
            shape, dtype, raw = t.shape, np.dtype(plain), None
        else:  # packed bytes, whose type the writer is told
            shape, dtype, raw = gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8), t.qtype
        writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(_encode(gguf, t.values(), t.qtype))
    writer.close()


# -- vocabulary -----------------------------------------------------------------------------------------------------
def _vocabulary(tokenizer: Any, rows: int) -> tuple[list[str], list[float], list[int], bool]:
    """Tokens, scores and token types for ``rows`` embedding rows, and SentencePiece's dummy-prefix setting.

    The SentencePiece pieces come first, as the model numbers them; tokens the loader added (``<im_patch>`` ...)
    keep their ids; rows no token names (a vocabulary padded to a multiple) get unused placeholders.
    """
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if not (vocab_file and os.path.isfile(vocab_file) and hasattr(tokenizer, "sp_model")):
        raise ExportError(f"cannot export a {type(tokenizer).__name__} to GGUF: a SentencePiece (LLaMA) tokenizer "
                          "is needed")
    try:
        proto = read_sentencepiece_bpe(vocab_file)
    except ValueError as error:
        raise ExportError(str(error)) from None
    tokens = [piece.piece for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [piece.type for piece in proto.pieces]
    for token_id in sorted(tokenizer.added_tokens_decoder):
        if token_id < len(proto.pieces):
            continue
        if token_id != len(tokens):
            raise ExportError(f"added token id {token_id} leaves a gap after {len(tokens)} tokens")
        added = tokenizer.added_tokens_decoder[token_id]
        tokens.append(added.content)
        scores.append(0.0)
        types.append(_CONTROL if added.special else _USER_DEFINED)
    if len(tokens) > rows:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {rows} embedding rows")
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        scores.append(0.0)
        types.append(_UNUSED)
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


# -- export ---------------------------------------------------------------------------------------------------------
def _file_type(gguf: Any, outtype: str) -> int:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _write_language_model(gguf: Any, path: str, model: Any, tokenizer: Any, name: str, outtype: str,
                          template: str) -> None:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(_file_type(gguf, outtype))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise ExportError(f"rope scaling {kind!r} is not exported (PALO's LLMs use none)")
    tokens, scores, types, dummy_prefix = _vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id")
        if token_id is not None:
            add(token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if pad is not None:
        writer.add_pad_token_id(pad)  # PALO pads with <unk>
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", True)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    writer.add_add_space_prefix(dummy_prefix)
    writer.add_chat_template(template)
    _write(gguf, writer, _llm_tensors(gguf, model, outtype))


def _tower_layers(model: Any, projector: str) -> int:
    """The CLIP layers llama.cpp must run (those before the one PALO reads).

    Raises:
        ExportError: For a tower llama.cpp's LLaVA graph cannot run as PALO does.
    """
    vision = model.get_vision_tower().config
    select, total = model.spec.select_layer, vision.num_hidden_layers
    layers = select if select >= 0 else total + 1 + select
    if not 0 < layers <= total:
        raise ExportError(f"mm_vision_select_layer {select} is outside CLIP's {total} layers")
    grid = vision.image_size // vision.patch_size
    if projector == "ldp" and grid != _LDP_GRID:
        raise ExportError(f"llama.cpp's LDP graph needs a {_LDP_GRID} x {_LDP_GRID} patch grid (CLIP-L/14 at 336 "
                          f"pixels); this tower has {grid} x {grid}")
    if vision.hidden_act != "quick_gelu":
        raise ExportError(f"CLIP hidden_act {vision.hidden_act!r}: llama.cpp's LLaVA tower runs quick_gelu")
    return layers


def _write_mmproj(gguf: Any, path: str, model: Any, processor: Any, name: str, outtype: str, projector: str,
                  layers: int) -> None:
    vision = model.get_vision_tower().config
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name(name)
    writer.add_file_type(_file_type(gguf, _mmproj_outtype(outtype)))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(projector)
    writer.add_bool("clip.use_gelu", False)  # quick GELU, CLIP's own
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_projection_dim(model.config.hidden_size)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_block_count(layers)
    # The layer whose input PALO reads (hidden_states[select_layer]): llama.cpp runs the layers before it only.
    writer.add_array("clip.vision.feature_layer", [layers])
    writer.add_vision_image_mean([float(v) for v in processor.image_mean])
    writer.add_vision_image_std([float(v) for v in processor.image_std])
    tensors = _vision_tensors(gguf, model, layers, outtype) + _projector_tensors(gguf, model, outtype)
    _write(gguf, writer, tensors)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package (llama.cpp's own writer): pip install gguf") from None
    return gguf


def export_gguf(
    model_path: str,
    output_dir: str,
    model_base: str | None = None,
    *,
    outtype: str = "f16",
    conv_mode: str | None = None,
    vision_tower: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFExportResult:
    """Write the language model and the vision tower + projector of ``model_path`` as two GGUF files.

    Args:
        model_path: A checkpoint folder or hub id (full, LoRA or stage-1 output: LoRA is merged first).
        output_dir: The folder to write; it must not exist or be empty (unless ``overwrite``).
        model_base: The base LLM for LoRA and stage-1 folders.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        conv_mode: The conversation template the chat template renders (default: the checkpoint's).
        vision_tower: Override ``mm_vision_tower`` (a local CLIP folder for offline use).
        name: The files' stem and ``general.name`` (default: the checkpoint folder's or hub repository's name).
        overwrite: Allow a non-empty ``output_dir``.

    Returns:
        What was written.

    Raises:
        ExportError: For checkpoints llama.cpp cannot run as they are (see the module doc), a missing ``gguf``
            package or a bad ``outtype``.
        palo.model.builder.CheckpointError: If ``model_path`` does not load.
    """
    from palo.model.builder import load_pretrained_model

    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}")
    gguf = _import_gguf()
    model_dir, config, spec = checked_checkpoint_config(model_path, output_dir, overwrite)
    projector = gguf_projector_type(spec.projector_type)
    if spec.select_feature != "patch":
        raise ExportError(f"mm_vision_select_feature {spec.select_feature!r}: llama.cpp's LLaVA graph drops the "
                          "class position, as 'patch' does")
    if spec.use_im_start_end:
        raise ExportError("mm_use_im_start_end checkpoints wrap images in tokens llama.cpp does not add")
    mode = conv_mode or conv_mode_for_checkpoint(config)
    template = chat_template_for(mode, MEDIA_MARKER, marker=MEDIA_MARKERS)
    # The folder's or the hub repository's name ("MBZUAI/PALO-7B" -> PALO-7B), never the cache's snapshot folder.
    # A local folder by its absolute path: "." and ".." name the folder they stand for.
    where = os.path.abspath(model_path) if os.path.isdir(model_path) else os.path.normpath(model_path)
    name = name or os.path.basename(where) or "palo"
    if os.sep in name or not name.strip("."):
        raise ExportError(f"name {name!r} must be a plain file stem")

    recorded = recorded_dtype(config)
    if recorded in ("float16", "bfloat16"):  # read at the checkpoint's own precision: a 7B in float32 is 28 GB
        dtype = getattr(torch, recorded)
    else:
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}.get(outtype, torch.float16)
    tokenizer, model, processor, _ = load_pretrained_model(
        model_path, model_base, device="cpu", device_map=None, dtype=dtype, vision_tower=vision_tower
    )
    layers = _tower_layers(model, projector)  # refused now, not after the language model's file is written
    model_file = f"{name}-{outtype}.gguf"
    # Named after what it holds: a q8_0 export's mmproj is f16 (mmproj-<name>-q8_0.gguf named a file that is not).
    mmproj_file = f"mmproj-{name}-{_mmproj_outtype(outtype)}.gguf"
    with staged_folder(output_dir) as staging:
        _write_language_model(gguf, os.path.join(staging, model_file), model, tokenizer, name, outtype, template)
        _write_mmproj(gguf, os.path.join(staging, mmproj_file), model, processor, name, outtype, projector, layers)
    logger.info("Exported %s to %s (%s, %s projector, template %s)", model_path, output_dir, outtype, projector, mode)
    return GGUFExportResult(os.path.join(output_dir, model_file), os.path.join(output_dir, mmproj_file), projector,
                            outtype, mode)

