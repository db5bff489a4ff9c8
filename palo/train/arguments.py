"""Training arguments: every flag of the original ``palo/train/train.py``, plus a few of this project's.

Parsed with ``transformers.HfArgumentParser`` (``--field_name value``, booleans as ``True``/``False``), so the
original shell scripts' command lines work unchanged.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import transformers

from palo.model.config import DEFAULT_VISION_SELECT_LAYER
from palo.model.projectors import check_projector_type

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """What to build: the base LLM, the vision tower, the projector and what is trained."""

    model_name_or_path: str = field(default="lmsys/vicuna-7b-v1.5", metadata={"help": "base LLM (hub id or folder)"})
    version: str = field(default="v1", metadata={"help": "conversation template key (PALO: v1)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP id or folder; None = text-only LLaMA"})
    # PALO's layer (config.DEFAULT_VISION_SELECT_LAYER, -2), which loading also assumes, rather than the original
    # flag's -1: every PALO/LLaVA-1.5 script passes -2, so a run that omits the flag trains what the checkpoints use.
    mm_vision_select_layer: int = field(
        default=DEFAULT_VISION_SELECT_LAYER,
        metadata={"help": "CLIP hidden state fed to the projector (-2: the penultimate layer, as PALO)"},
    )
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    mm_projector_type: str = field(default="mlp2x_gelu")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=True)
    mm_vision_select_feature: str = field(default="patch")
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "accepted for LLaVA scripts; only flat"})
    vision_tower_type: str = field(default="clip", metadata={"help": "accepted for MobileVLM scripts; only clip"})
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "attention kernel of the LLM: sdpa, flash_attention_2, flex_attention or eager"},
    )

    def __post_init__(self) -> None:
        from palo.model.attention import check_attn_implementation

        check_attn_implementation(self.attn_implementation)
        # Accepted so that LLaVA's and MobileVLM's scripts run; another value would ask for a model this is not
        # (LLaVA's spatial_unpad adds a learned image_newline row), so it is refused rather than ignored.
        if self.mm_patch_merge_type != "flat":
            raise ValueError(f"--mm_patch_merge_type {self.mm_patch_merge_type!r} is not supported: PALO's projector "
                             "takes the image's features flat (only 'flat')")
        if self.vision_tower_type != "clip":
            raise ValueError(f"--vision_tower_type {self.vision_tower_type!r} is not supported: PALO's vision tower is "
                             "CLIP (only 'clip')")
        if self.vision_tower is not None:  # refused here, not after the language model has loaded
            check_projector_type(self.mm_projector_type)
            if self.mm_vision_select_feature not in ("patch", "cls_patch"):
                raise ValueError(f"--mm_vision_select_feature {self.mm_vision_select_feature!r} is not supported; use "
                                 "'patch' or 'cls_patch'")


@dataclass
class DataArguments:
    """Where the data is and how samples become tensors."""

    data_path: str | None = field(default=None, metadata={"help": "training JSON (one array of samples)"})
    lazy_preprocess: bool = field(default=False, metadata={"help": "accepted for compatibility: always lazy"})
    is_multimodal: bool = field(default=False, metadata={"help": "set automatically with a vision tower"})
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str = field(default="square", metadata={"help": "pad or square"})
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "skip (and count) samples with a missing/corrupt image or malformed turns "
                          "instead of stopping"},
    )
    over_length: str = field(
        default="truncate",
        metadata={"help": "samples longer than model_max_length (after images): 'truncate' or 'skip'"},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack a batch's samples into rows of model_max_length (attention stays within samples)"},
    )

    def __post_init__(self) -> None:
        if self.over_length not in ("truncate", "skip"):
            raise ValueError(f"--over_length must be 'truncate' or 'skip', not {self.over_length!r}")
        if self.image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"--image_aspect_ratio must be 'pad' or 'square', not {self.image_aspect_ratio!r}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments plus PALO's fields (docs/formats.md §4.3)."""

    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "accepted for compatibility; unused"})
    model_max_length: int = field(default=512, metadata={"help": "maximum sequence length (images included)"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: double quantisation"})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA: fp4 or nf4"})
    bits: int = field(default=16, metadata={"help": "16, or 8 / 4 to load the LLM quantised (QLoRA; bitsandbytes)"})
    packing_rows: int = field(
        default=0,
        metadata={"help": "with --packing True: steps of this many nearly full rows of model_max_length, planned over "
                          "the whole dataset (samples per step vary); 0: pack each batch's samples"},
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (dynamic shapes; exact; the first steps pay the compile)"},
    )
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = "none"
    mm_projector_lr: float | None = None
    group_by_modality_length: bool = field(default=False)
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "old name of eval_strategy, accepted for the original scripts"}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "old form of a fractional --warmup_steps, accepted for the original scripts"}
    )

    def __post_init__(self) -> None:
        # Flags transformers 5 renamed; the original scripts still pass the old names.
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
            if self.warmup_steps:  # as transformers 4.31: a number of steps given wins over the ratio
                warnings.warn(f"--warmup_steps {self.warmup_steps} given: --warmup_ratio {self.warmup_ratio} ignored",
                              stacklevel=2)
            else:
                self.warmup_steps = self.warmup_ratio
        if self.tf32 and not torch.cuda.is_available():
            # The original scripts pass --tf32 True; it only means something on Ampere+ GPUs.
            warnings.warn("--tf32 ignored: no CUDA device", stacklevel=2)
            self.tf32 = None
        if self.max_steps <= 0 and self.num_train_epochs <= 0:  # it exited 0, saving the untrained model as trained
            raise ValueError(f"--num_train_epochs {self.num_train_epochs:g} trains nothing: give a positive number of "
                             "epochs (a fraction trains part of one), or --max_steps")
        # Refused here, not where they break once the model has loaded: a batch of 0 in torch's sampler, no steps to
        # accumulate as a ZeroDivisionError, and a --model_max_length with no room for a prompt token and an answer
        # token as the first sample's fault.
        for flag in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, not {getattr(self, flag)}")
        if self.model_max_length < 2:
            raise ValueError(f"--model_max_length must be at least 2 (a prompt token and an answer token), not "
                             f"{self.model_max_length}")
        if self.bits not in (4, 8, 16):
            raise ValueError(f"--bits must be 4, 8 or 16, not {self.bits}")
        if self.packing_rows < 0:
            raise ValueError(f"--packing_rows must be 0 (off) or a number of rows, not {self.packing_rows}")
        if self.packing_rows and self.group_by_modality_length:  # PALO's scripts pass the grouping flag
            warnings.warn("--group_by_modality_length is not applied with --packing_rows: steps are planned by "
                          "length, so image and text samples may share one", stacklevel=2)
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be none, all or lora_only, not {self.lora_bias!r}")
        # PALO applies Liger itself (palo.model.kernels); transformers' Trainer must not try its own.
        self.palo_liger_kernel = False
        if self.use_liger_kernel:
            from palo.model.kernels import liger_available

            usable, why = liger_available()
            if usable:
                self.palo_liger_kernel = True
            else:
                warnings.warn(f"--use_liger_kernel ignored: {why}; training runs with PyTorch's kernels", stacklevel=2)
            self.use_liger_kernel = False
        super().__post_init__()


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line into the three argument groups.

    Raises:
        SystemExit: On unknown flags (argparse's behaviour).
    """
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args
