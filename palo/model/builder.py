"""``load_pretrained_model``: load any released or trained PALO / LLaVA-1.5 checkpoint.

What a folder holds decides how it loads, never its name (docs/formats.md §1.7; why: docs/compat.md#loading):

=====================  ==================================================  =====================================
kind                   files                                               needs
=====================  ==================================================  =====================================
full                   config.json + model*.safetensors / pytorch_model*.bin  nothing
LoRA                   adapter_config.json + adapter_model.* (+ non_lora_trainables.bin)  ``model_base``
stage-1 projector      config.json + mm_projector.bin, no model weights    ``model_base``
=====================  ==================================================  =====================================

A config with ``mm_vision_tower`` is multimodal (PALO); without it the folder is a plain LLM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from palo.model.attention import check_attn_implementation

# Callers also import CheckpointError, CheckpointKind and detect_checkpoint_kind from this module.
from palo.model.checkpoint_files import (
    NON_LORA_FILE,
    PROJECTOR_FILE,
    CheckpointError,
    CheckpointKind,
    detect_checkpoint_kind,
    load_into_projector,
    load_non_lora,
    load_projector,
    new_token_rows,
)
from palo.model.config import LlavaLlamaConfig, MultimodalSpec, PaloConfig
from palo.model.palo_llama import PaloForCausalLM
from palo.model.tokenizer import load_tokenizer
from palo.model.vision_tower import VisionTowerError, load_image_processor

logger = logging.getLogger(__name__)

# Modules kept in half precision under 4/8-bit loading. transformers 5 matches these from the start of a module's
# full name (or as its suffix), older versions as substrings: the prefixed and bare forms cover both.
QUANTIZATION_SKIP = ["model.mm_projector", "model.vision_tower", "lm_head", "mm_projector", "vision_tower"]


def resolve_checkpoint_dir(path: str, cache_dir: str | None = None) -> str:
    """A local folder for ``path``: the folder itself, or the snapshot of a hub id in the local HF cache (``cache_dir``
    when given: training's ``--cache_dir``, as the original passed it to ``from_pretrained``).

    Raises:
        CheckpointError: If ``path`` is neither.
    """
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path!r} is a file; pass the checkpoint folder that holds config.json")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:  # an absolute or relative path, not an "org/name" id: say only what is wrong
        raise CheckpointError(f"{path!r}: no such folder") from None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=path, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
        offline = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise CheckpointError(
            f"{path!r} is not a local folder and could not be found as a Hugging Face repo{offline}: {exc}"
        ) from exc


@contextlib.contextmanager
def _without_multimodal_modules(model: PaloForCausalLM) -> Iterator[None]:
    """Hide the tower and projector while PEFT merges a LoRA adapter.

    The original applied LoRA before those modules existed, so adapter target names (``q_proj`` ...) must only
    match the language model, not CLIP's attention layers of the same names.
    """
    inner = model.model
    saved = {name: inner._modules.pop(name) for name in ("vision_tower", "mm_projector") if name in inner._modules}
    try:
        yield
    finally:
        for name, module in saved.items():
            inner._modules[name] = module


# Flat LLaMA + mm_* configs written under a model_type that transformers does not map to a LLaMA config: LLaVA-1.5's
# release (LLaVA v1.1.x registered its config as "llava", and the released liuhaotian/llava-v1.5-* configs say so),
# and MobileVLM. transformers maps "llava" to its own nested LlavaConfig (text_config / vision_config), which is
# another format, and does not know "mobilevlm" at all; both are read as the flat format they are.
FLAT_MULTIMODAL_CONFIGS: dict[str, type[PaloConfig]] = {"llava": LlavaLlamaConfig, "mobilevlm": PaloConfig}


# LLaVA's checkpoints on other language models: their LLMs are not LLaMA, which PALO's model is built on.
OTHER_LLAVA_FORMATS = {"llava_mistral": "LLaVA's Mistral model", "llava_mpt": "LLaVA's MPT model"}


def read_config(model_dir: str) -> Any:
    """The config of a checkpoint folder, as its format is rather than as its ``model_type`` alone says.

    A flat LLaMA config with ``mm_*`` keys whose ``model_type`` is one of :data:`FLAT_MULTIMODAL_CONFIGS` loads as
    that PALO config class; everything else (``palo``, ``llava_llama``, ``llama``, and a transformers Llava config
    with ``text_config``/``vision_config``) goes through ``AutoConfig`` as before.

    Args:
        model_dir: A local checkpoint folder.

    Returns:
        The config object.

    Raises:
        CheckpointError: For LLaVA's ``llava_mistral`` and ``llava_mpt``, which are not PALO formats.
    """
    values, _ = PretrainedConfig.get_config_dict(model_dir)
    if values.get("model_type") in OTHER_LLAVA_FORMATS:  # transformers would advise an upgrade that cannot help
        raise CheckpointError(
            f"{model_dir}: model_type {values['model_type']!r} is {OTHER_LLAVA_FORMATS[values['model_type']]}, not "
            "a format PALO loads (palo, llava_llama, llava, mobilevlm; docs/formats.md)")
    config_class = FLAT_MULTIMODAL_CONFIGS.get(values.get("model_type"))
    nested = "text_config" in values or "vision_config" in values
    if config_class is None or nested or not any(key.startswith("mm_") for key in values):
        return AutoConfig.from_pretrained(model_dir)
    return config_class.from_dict({key: value for key, value in values.items() if key != "model_type"})


def _base_vocabulary(config: Any, base_dir: str, base_tokens: int) -> int | None:
    """Make the config of a LoRA or stage-1 folder load its base's weights: a run that added tokens (<im_patch> by
    default, <im_start>/<im_end>, v0's [PAD]) records its grown vocabulary, which the base's rows do not have, so
    the base loads at its own size and :func:`_add_trained_tokens` grows it.

    Returns:
        The id of the [PAD] token a ``--version v0`` run added (its config's ``pad_token_id`` is no token of the
        base's tokenizer, of ``base_tokens``), or None.
    """
    base_config = read_config(base_dir)
    base_vocab = getattr(base_config, "vocab_size", None)
    if not base_vocab or base_vocab == config.vocab_size:
        return None
    config.vocab_size = base_vocab
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= base_tokens:
        config.pad_token_id = getattr(base_config, "pad_token_id", None)
        return pad
    return None


def _add_trained_tokens(model: PreTrainedModel, tokenizer: Any, added_pad: int | None, image_tokens: Sequence[str],
                        model_path: str) -> int:
    """Add the tokens training added, in its order (v0's [PAD] first: ``load_tokenizer_for_training``; then the
    image tokens), and grow the embeddings to the tokenizer; before a LoRA adapter is merged, since one made after
    tokens were added carries the grown rows. Returns the rows the model had before."""
    if added_pad is not None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        if tokenizer.pad_token_id != added_pad:
            raise CheckpointError(f"{model_path!r}: its config's pad_token_id {added_pad} is no token of the base, "
                                  f"and not the [PAD] token --version v0 adds ({tokenizer.pad_token_id})")
        model.config.pad_token_id = added_pad
    if image_tokens:
        tokenizer.add_tokens(image_tokens, special_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        model.resize_token_embeddings(len(tokenizer))
    return rows


def _merge_lora(model: PreTrainedModel, adapter_dir: str) -> PreTrainedModel:
    from peft import PeftModel
    from safetensors import SafetensorError

    logger.info("Merging LoRA weights from %s", adapter_dir)
    try:
        if isinstance(model, PaloForCausalLM):
            with _without_multimodal_modules(model):
                merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            return merged
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    # A cut adapter file: torch's memory map says EINVAL (an OSError naming no file), its zip reader RuntimeError.
    except (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise
        raise CheckpointError(f"{adapter_dir}: the LoRA adapter cannot be read ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); is adapter_model.* cut short?") from exc


def _available_locally(name: str) -> bool:
    """Whether a CLIP id/path can be loaded with no download: a local folder, or a hub id in the local cache."""
    if os.path.isdir(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply "not available"
        return False


def _load_vision_tower_weights(tower: Any, carried: bool, forced: bool) -> None:
    """Give the tower its weights: from ``mm_vision_tower`` when it was forced (``--vision-tower``), is not carried,
    or is available locally; otherwise (offline, not cached) the checkpoint's own copy, with no network.

    Why this order: docs/compat.md#loading.
    """
    if forced or not carried or _available_locally(tower.name):
        try:
            tower.load_weights_from(tower.name)
            return
        except VisionTowerError:
            if not carried:
                raise
    logger.info("Using the vision tower weights stored in the checkpoint (%s is not available locally)", tower.name)


@contextlib.contextmanager
def _transformers_log_level(level: int) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def require_bitsandbytes(what: str) -> None:
    """Fail with the install command when bitsandbytes (the ``train`` extra) is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{what} needs bitsandbytes: pip install 'bitsandbytes>=0.50' (or pip install -e '.[train]')")


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_dtype_argument(parser: Any) -> None:
    """``--dtype`` of every command that loads a model for inference (the worker, the chat CLI, the evaluations)."""
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="the weights' and the computation's dtype; auto: float16 on CUDA (as the original), "
                             "float32 elsewhere. bfloat16 suits GPUs that have it and checkpoints trained in it")


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """``--dtype``'s value (a name, ``auto`` or None, or a torch dtype) as ``load_pretrained_model``'s ``dtype``.

    Raises:
        ValueError: For a name that is not a dtype a model loads in.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _quantization_kwargs(load_8bit: bool, load_4bit: bool, dtype: torch.dtype) -> dict[str, Any]:
    """bitsandbytes settings of the original builder; 4-bit computes in the model's dtype (by default float16 on
    CUDA, as the original, and float32 elsewhere)."""
    if not (load_8bit or load_4bit):
        return {}
    if load_8bit and load_4bit:
        raise ValueError("choose one of --load-8bit and --load-4bit")
    require_bitsandbytes("--load-8bit/--load-4bit")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZATION_SKIP)}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=QUANTIZATION_SKIP,
        )
    }


def _as_palo_config(config: Any) -> PaloConfig:
    """LoRA folders may carry a plain ``llama`` config with the mm_* keys; treat it as PALO."""
    if isinstance(config, PaloConfig):
        return config
    values = config.to_dict()
    values.pop("model_type", None)
    return PaloConfig(**values)


def _check_loading_info(info: dict[str, Any], allowed_missing: tuple[str, ...], source: str) -> list[str]:
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(allowed_missing)]
    if missing:
        raise CheckpointError(f"{source} is incomplete: {len(missing)} weights missing, e.g. {sorted(missing)[:5]}")
    return list(info.get("missing_keys", []))


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: Any = "auto",
    device: str = "cuda",
    *,
    vision_tower: str | None = None,
    dtype: torch.dtype | str | None = None,
    use_flash_attn: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> tuple[Any, PreTrainedModel, Any, int]:
    """Load a PALO / LLaVA-1.5 checkpoint (or a plain LLM) for inference.

    Args:
        model_path: A checkpoint folder or hub id (resolved through the local Hugging Face cache).
        model_base: The base LLM for LoRA and stage-1 folders.
        model_name: Kept for compatibility with the original signature; it no longer changes behaviour.
        load_8bit: Quantise the language model to 8 bits (bitsandbytes; CUDA, or CPU from bitsandbytes 0.50).
        load_4bit: Quantise it to 4-bit NF4 (same); CLIP, the projector and ``lm_head`` stay unquantised.
        device_map: transformers ``device_map`` on CUDA; on other devices everything goes to ``device``.
        device: ``cuda``, ``cuda:N``, ``cpu`` or ``mps``; ``cuda`` on a machine without CUDA loads on ``cpu``.
        vision_tower: Override ``mm_vision_tower`` (e.g. a local CLIP folder for offline use).
        dtype: Weights dtype; default float32 on CPU, float16 on CUDA (a name as ``--dtype`` takes it, too).
            ``torch_dtype=``, its name before transformers 5, is taken as the same argument.
        use_flash_attn: Use FlashAttention-2 (CUDA, flash-attn installed); the same as
            ``attn_implementation="flash_attention_2"``.
        attn_implementation: The language model's attention kernel: ``sdpa`` (default), ``flash_attention_2``,
            ``flex_attention`` or ``eager`` (:mod:`palo.model.attention`).
        **kwargs: Extra ``from_pretrained`` arguments.

    Returns:
        ``(tokenizer, model, image_processor, context_len)``; ``image_processor`` is None for a text-only LLM.

    Raises:
        CheckpointError: If the folder is not a checkpoint, lacks what its kind needs, or a file of it cannot be
            read (cut short, not JSON, a config field of the wrong type).
        palo.model.vision_tower.VisionTowerError: If the vision tower cannot be found.
        palo.model.attention.AttentionUnavailableError: If the chosen attention kernel is not installed.
        ValueError: For a dtype that is no dtype a model loads in, ``dtype`` and ``torch_dtype`` that disagree, or
            an ``mm_*`` value the model cannot take (e.g. an ``mm_vision_select_layer`` outside CLIP's layers).
    """
    dtype = dtype_from_name(dtype)
    if "torch_dtype" in kwargs:
        # transformers < 5's name for dtype, which LLaVA-family callers pass; transformers 5 would drop it in
        # favour of the dtype given next to it, and load in another dtype without a word.
        torch_dtype = dtype_from_name(kwargs.pop("torch_dtype"))
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
        dtype = dtype or torch_dtype
    with unreadable_files_named(model_path, model_base):
        return _load_pretrained_model(model_path, model_base, load_8bit, load_4bit, device_map, device,
                                      vision_tower=vision_tower, dtype=dtype,
                                      use_flash_attn=use_flash_attn,
                                      attn_implementation=attn_implementation, **kwargs)


@contextlib.contextmanager
def unreadable_files_named(model_path: str, model_base: str | None) -> Iterator[None]:
    """Turn a library's error about a damaged file (a cut safetensors file, a config field of the wrong type, a cut
    pickle) into a :class:`CheckpointError` that names the checkpoint; every caller already answers those."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, StrictDataclassError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
            RuntimeError) as exc:
        # torch's zip reader says a cut pytorch_model.bin with a RuntimeError; any other RuntimeError is no file's
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise
        where = model_path if model_base is None else f"{model_path} (base {model_base})"
        raise CheckpointError(f"{where}: a file cannot be read ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _load_pretrained_model(
    model_path: str,
    model_base: str | None,
    load_8bit: bool,
    load_4bit: bool,
    device_map: Any,
    device: str,
    *,
    vision_tower: str | None,
    dtype: torch.dtype | None,
    use_flash_attn: bool,
    attn_implementation: str | None,
    **kwargs: Any,
) -> tuple[Any, PreTrainedModel, Any, int]:
    """:func:`load_pretrained_model`, whose errors it names."""
    model_dir = resolve_checkpoint_dir(model_path)
    kind = detect_checkpoint_kind(model_dir)
    base_dir = resolve_checkpoint_dir(model_base) if model_base else None
    if kind is CheckpointKind.FULL and base_dir:
        logger.warning("%s is a full checkpoint; ignoring --model-base %s", model_path, model_base)
        base_dir = None
    if kind is not CheckpointKind.FULL and base_dir is None:
        what = "a LoRA adapter" if kind is CheckpointKind.LORA else f"a stage-1 projector ({PROJECTOR_FILE})"
        raise CheckpointError(f"{model_path!r} holds {what}; pass the base LLM with --model-base (model_base=)")

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        # "cuda" is the original's default; without CUDA, device_map="auto" would still put every weight on the CPU,
        # in float16 (slow there, and less exact for nothing), so the CPU gets what it would get when asked for.
        logger.warning("no CUDA device: loading %s on cpu", model_path)
        device = "cpu"
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else torch.float16
    if not str(device).startswith("cuda"):
        device_map = {"": device}
    load_kwargs: dict[str, Any] = dict(dtype=dtype, device_map=device_map, **kwargs)
    load_kwargs.update(_quantization_kwargs(load_8bit, load_4bit, dtype))
    if use_flash_attn:
        if attn_implementation not in (None, "flash_attention_2"):
            raise ValueError(f"use_flash_attn contradicts attn_implementation={attn_implementation!r}")
        attn_implementation = "flash_attention_2"
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = check_attn_implementation(attn_implementation)

    config = read_config(model_dir)
    if kind is not CheckpointKind.FULL and getattr(config, "quantization_config", None) is not None:
        # A QLoRA run's config records how its base was quantised during training; the base's weights on disk are
        # not quantised, and whether to quantise them now is the caller's choice (load_4bit / load_8bit).
        delattr(config, "quantization_config")
    if vision_tower:
        config.mm_vision_tower = vision_tower
    spec = MultimodalSpec.from_config(config)
    tokenizer = load_tokenizer(base_dir or model_dir, use_fast=False)
    added_pad = _base_vocabulary(config, base_dir, len(tokenizer)) if base_dir is not None else None

    if not spec.is_multimodal:
        if kind is CheckpointKind.PROJECTOR:
            raise CheckpointError(f"{model_path!r} has {PROJECTOR_FILE} but its config names no mm_vision_tower")
        model = AutoModelForCausalLM.from_pretrained(base_dir or model_dir, **load_kwargs)
        _add_trained_tokens(model, tokenizer, added_pad, (), model_path)
        if kind is CheckpointKind.LORA:
            model = _merge_lora(model, model_dir)
        return tokenizer, model, None, getattr(model.config, "max_sequence_length", 2048)

    config = _as_palo_config(config)
    tower_prefix = "model.vision_tower."
    # transformers prints a "MISSING" table for the tower and projector of LoRA/stage-1 bases (and for full
    # checkpoints without the tower); those are expected and filled below, and anything else raises, so quiet it.
    with _transformers_log_level(logging.ERROR):
        model, info = PaloForCausalLM.from_pretrained(
            base_dir or model_dir, config=config, output_loading_info=True, **load_kwargs
        )
    # The original adds the image tokens at load time; <im_patch> by default when the config does not say otherwise.
    image_tokens = ([DEFAULT_IMAGE_PATCH_TOKEN] if spec.use_im_patch_token else []) + (
        [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN] if spec.use_im_start_end else [])
    base_rows = _add_trained_tokens(model, tokenizer, added_pad, image_tokens, model_path)
    if kind is CheckpointKind.FULL:
        missing = _check_loading_info(info, (tower_prefix,), model_path)
    else:
        missing = _check_loading_info(info, (tower_prefix, "model.mm_projector."), model_base or "")
        projector = f"the projector '{model.spec.projector_type}' of this config"
        if kind is CheckpointKind.LORA:
            state = load_non_lora(model_dir, wrapped=False)
            load_into_projector(model.projector, state, os.path.join(model_path, NON_LORA_FILE), projector)
            model = _merge_lora(model, model_dir)
        else:
            # The original rounds stage-1 projector weights through float16 in this branch; released projectors are
            # bf16/fp16 already (so this is exact for them), and doing the same keeps logits identical for others.
            state = load_projector(model_dir, dtype=torch.float16)
            load_into_projector(model.projector, state, os.path.join(model_path, PROJECTOR_FILE), projector)

    _load_vision_tower_weights(
        model.get_vision_tower(),
        carried=not any(k.startswith(tower_prefix) for k in missing),
        forced=bool(vision_tower),
    )
    tower = model.get_vision_tower()
    tower.image_processor = load_image_processor(spec.vision_tower, tower.config.image_size, fallback_dirs=(model_dir,))

    if kind is CheckpointKind.PROJECTOR and spec.use_im_start_end and len(tokenizer) > base_rows:
        # Stage 1 with <im_start>/<im_end> trained those rows and saved them in mm_projector.bin; without them the
        # new tokens would keep resize_token_embeddings' initialisation.
        num_new = len(tokenizer) - base_rows
        rows = new_token_rows(state, num_new, len(tokenizer), os.path.join(model_path, PROJECTOR_FILE))
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[-num_new:] = rows.to(weight.device, weight.dtype)
    model.eval()
    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, tower.image_processor, context_len
