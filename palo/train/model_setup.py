"""Building the model and tokenizer for a training run, freezing made explicit.

The order follows the original (docs/formats.md §4.7) where it matters for the saved files: LoRA wraps the
language model *before* the vision modules are attached, so adapter targets never include CLIP's or the
projector's layers; then the tower and projector are attached and the config records every ``mm_*`` key.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from palo.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from palo.model.builder import QUANTIZATION_SKIP, require_bitsandbytes, resolve_checkpoint_dir
from palo.model.checkpoint_files import load_into_projector, load_projector, new_token_rows
from palo.model.config import MultimodalSpec, PaloConfig
from palo.model.palo_llama import PaloForCausalLM, build_vision_tower
from palo.model.projectors import build_projector
from palo.model.tokenizer import load_tokenizer
from palo.model.vision_tower import load_image_processor
from palo.train.arguments import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MULTIMODAL_MODULES = ("mm_projector", "vision_tower", "vision_resampler")


@dataclass
class TrainingSetup:
    """What ``train()`` works with."""

    model: nn.Module  # PaloForCausalLM, a PEFT wrapper around it, or a plain LLaMA
    tokenizer: Any
    image_processor: Any
    image_tokens: int
    embeddings_resized: bool = False  # tokens were added to the LLM's vocabulary (LoRA saves then carry embeddings)


def compute_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The PALO/LLaMA model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _quantization_kwargs(args: TrainingArguments) -> dict[str, Any]:
    if args.bits == 16:
        return {}
    require_bitsandbytes(f"--bits {args.bits} (QLoRA)")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=args.bits == 4,
            load_in_8bit=args.bits == 8,
            llm_int8_skip_modules=QUANTIZATION_SKIP,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=compute_dtype(args),
            bnb_4bit_use_double_quant=args.double_quant,
            bnb_4bit_quant_type=args.quant_type,
        ),
        # As the original: the quantised weights are placed on this rank's device when they are loaded.
        "device_map": {"": args.device},
    }


def load_tokenizer_for_training(model_args: ModelArguments, args: TrainingArguments) -> Any:
    """Right-padded tokenizer with ``model_max_length``; pad = unk except for ``v0`` (a new ``[PAD]``).

    A tokenizer without an unk token (byte-level BPEs: GPT-2, Qwen, Llama 3) keeps its own pad token, or pads with
    its end-of-sequence token: padding is masked out of attention and labels, so any id serves, and the
    vocabulary stays as it is.

    Raises:
        ValueError: For a tokenizer with no unk, pad or end-of-sequence token to pad with.
    """
    tokenizer = load_tokenizer(
        resolve_checkpoint_dir(model_args.model_name_or_path, args.cache_dir), model_max_length=args.model_max_length,
        padding_side="right"
    )
    if model_args.version == "v0":
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {model_args.model_name_or_path} has no unk, pad or end-of-sequence "
                             "token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _rows(weight: torch.Tensor) -> int:
    """Rows of an embedding matrix, also when ZeRO-3 has partitioned it (its local shape is then empty)."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def _gathered(weights: list[torch.Tensor]) -> Any:
    """A context in which ZeRO-3-partitioned ``weights`` are whole (and changes on rank 0 are kept)."""
    if any(hasattr(w, "ds_shape") for w in weights):
        import deepspeed

        return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    return contextlib.nullcontext()


def _resize_with_mean_rows(model: PreTrainedModel, size: int) -> None:
    """Grow the embeddings to ``size`` rows; new rows start at the mean of the old ones (as the original)."""
    old = _rows(model.get_input_embeddings().weight)
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    if size <= old:
        return
    weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    with _gathered(weights), torch.no_grad():
        for weight in weights:
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def load_language_model(model_args: ModelArguments, args: TrainingArguments) -> PreTrainedModel:
    """The base LLM as ``PaloForCausalLM`` (multimodal runs) or ``AutoModelForCausalLM`` (text-only)."""
    path = resolve_checkpoint_dir(model_args.model_name_or_path, args.cache_dir)
    # 16-bit runs load in float32, whatever the checkpoint was saved in (Vicuna's config says float16, which
    # transformers 5 would keep): the weights a run without DeepSpeed updates are its master weights, and float16
    # ones overflow at the first step. DeepSpeed casts to bf16/fp16 itself and keeps float32 copies, as the original.
    kwargs: dict[str, Any] = dict(dtype=compute_dtype(args) if args.bits != 16 else torch.float32,
                                  **_quantization_kwargs(args))
    kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.vision_tower is None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        config = AutoConfig.from_pretrained(path)
        if not isinstance(config, PaloConfig):
            values = config.to_dict()
            values.pop("model_type", None)
            config = PaloConfig(**values)
        model = PaloForCausalLM.from_pretrained(path, config=config, **kwargs)
    model.config.use_cache = False
    return model


def apply_lora(model: PreTrainedModel, args: TrainingArguments) -> nn.Module:
    """Wrap the language model's linear layers with LoRA adapters (never CLIP's or the projector's)."""
    from peft import LoraConfig, get_peft_model

    if args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.bf16 or args.fp16:
        model.to(compute_dtype(args))
    # Only when the base is already multimodal does anything need excluding (CLIP also has q_proj/k_proj/v_proj);
    # otherwise the adapter config stays exactly the original's.
    multimodal = any(name.startswith(MULTIMODAL_MODULES) for name, _ in model.get_decoder().named_children())
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=LORA_TARGETS,
        exclude_modules=r".*(mm_projector|vision_tower|vision_resampler).*" if multimodal else None,
        lora_dropout=args.lora_dropout,
        bias=args.lora_bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def attach_vision_modules(model: PaloForCausalLM, model_args: ModelArguments, args: TrainingArguments) -> Any:
    """Record the mm_* config keys, build the CLIP tower (weights from ``--vision_tower``) and the projector.

    Returns:
        The CLIP image processor.
    """
    config = model.config
    config.mm_vision_tower = model_args.vision_tower
    config.mm_vision_select_layer = model_args.mm_vision_select_layer
    config.mm_vision_select_feature = model_args.mm_vision_select_feature
    config.mm_projector_type = model_args.mm_projector_type
    config.use_mm_proj = True
    spec = MultimodalSpec.from_config(config)
    inner = model.get_model()
    if getattr(inner, "vision_tower", None) is None:
        tower = build_vision_tower(config, spec)
        tower.load_weights_from(model_args.vision_tower)
        inner.vision_tower = tower
    tower = inner.vision_tower
    tower.requires_grad_(False)
    # The tower is frozen; keep it in the compute dtype (the original casts it to bf16/fp16 too).
    tower.to(device=model.lm_head.weight.device, dtype=compute_dtype(args))
    config.mm_hidden_size = tower.hidden_size
    config.mm_vision_config = tower.config.to_dict()  # lets this checkpoint load with no CLIP download
    if getattr(inner, "mm_projector", None) is None:
        # float32 in 16-bit runs even when LoRA cast the LLM to bf16/fp16 (as the original): the projector trains
        # whole, and at its learning rate (2e-5) most bf16 updates round away. QLoRA computes it in its dtype.
        inner.mm_projector = build_projector(spec.projector_type, tower.hidden_size, config.hidden_size).to(
            device=model.lm_head.weight.device, dtype=torch.float32 if args.bits == 16 else compute_dtype(args)
        )
    inner.mm_projector.requires_grad_(True)
    if model_args.pretrain_mm_mlp_adapter:
        source = f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}"
        load_into_projector(
            inner.mm_projector,
            load_projector(model_args.pretrain_mm_mlp_adapter),
            source,
            f"the projector '{spec.projector_type}' of --mm_projector_type",
        )
    return load_image_processor(model_args.vision_tower, tower.config.image_size)


def setup_training(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> TrainingSetup:
    """Build tokenizer and model and set what trains, per the flags."""
    tokenizer = load_tokenizer_for_training(model_args, args)
    model = load_language_model(model_args, args)
    if model_args.freeze_backbone:
        model.get_decoder().requires_grad_(False)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    if args.palo_liger_kernel:
        from palo.model.kernels import apply_liger_kernels

        apply_liger_kernels(model)
    if args.lora_enable:
        model = apply_lora(model, args)

    base = unwrap(model)
    vocabulary = _rows(base.get_input_embeddings().weight)
    image_processor = None
    image_tokens = 0
    if model_args.vision_tower is not None:
        image_processor = attach_vision_modules(base, model_args, args)
        data_args.is_multimodal = True
        config = base.config
        config.image_aspect_ratio = data_args.image_aspect_ratio
        config.tokenizer_padding_side = tokenizer.padding_side
        config.tokenizer_model_max_length = tokenizer.model_max_length
        config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
        config.freeze_mm_mlp_adapter = args.freeze_mm_mlp_adapter
        config.mm_use_im_start_end = model_args.mm_use_im_start_end
        config.mm_projector_lr = args.mm_projector_lr
        config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
        if model_args.tune_mm_mlp_adapter:
            model.requires_grad_(False)
            base.get_model().mm_projector.requires_grad_(True)
        if args.freeze_mm_mlp_adapter:
            base.get_model().mm_projector.requires_grad_(False)
        _add_vision_tokens(base, tokenizer, model_args)
        image_tokens = base.image_token_count
    elif model_args.version == "v0" and len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
        _resize_with_mean_rows(base, len(tokenizer))
    if args.compile_layers:
        compile_decoder_layers(base)
    return TrainingSetup(model=model, tokenizer=tokenizer, image_processor=image_processor, image_tokens=image_tokens,
                         embeddings_resized=_rows(base.get_input_embeddings().weight) != vocabulary)


def compile_decoder_layers(model: PreTrainedModel) -> int:
    """``torch.compile`` every decoder layer of the language model in place (``--compile_layers True``).

    Per layer rather than the whole model: the image splice, the loss and DeepSpeed's hooks stay eager (they change
    shape or break graphs every step), while the layers, where the FLOPs are, are identical modules with identical
    shapes, so one compiled graph serves them all. ``dynamic=True`` because sequence lengths change every batch
    (padding to the longest sample, or packed rows). Called after LoRA is applied, so the adapters are compiled with
    their layer. Exact up to floating-point reassociation of fused kernels.

    Returns:
        How many layers were compiled.
    """
    import torch._inductor.config as inductor_config

    # Dropout (LoRA's) must draw the masks eager draws: with gradient checkpointing the backward recomputes each
    # layer after restoring the RNG state, and Inductor's own RNG (torch 2.11) ignores that restore.
    inductor_config.fallback_random = True
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _add_vision_tokens(model: PaloForCausalLM, tokenizer: Any, model_args: ModelArguments) -> None:
    """The original ``initialize_vision_tokenizer``: optional <im_patch>, <im_start>/<im_end> rows."""
    new_tokens = []
    if model_args.mm_use_im_patch_token:
        new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if model_args.mm_use_im_start_end:
        new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    _resize_with_mean_rows(model, len(tokenizer))
    if model_args.mm_use_im_start_end and model_args.tune_mm_mlp_adapter:
        # Stage 1 with start/end tokens learns their input rows; the output rows stay frozen.
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(False)
    if model_args.mm_use_im_start_end and model_args.pretrain_mm_mlp_adapter:
        # Those learnt rows travel in the stage-1 mm_projector.bin (model.embed_tokens.weight), as in the original.
        weight = model.get_input_embeddings().weight
        rows = new_token_rows(
            load_projector(model_args.pretrain_mm_mlp_adapter), 2, _rows(weight),
            f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}",
        )
        with _gathered([weight]), torch.no_grad():
            weight[-2:] = rows.to(dtype=weight.dtype, device=weight.device)
