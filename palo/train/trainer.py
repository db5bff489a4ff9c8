"""``PaloTrainer``: transformers' Trainer with PALO's sampler, optimizer groups, checkpoint files and logs.

Checkpoint files per mode (the original layouts, written at the end *and* in every ``checkpoint-N``):

* stage 1 (``--tune_mm_mlp_adapter``): ``config.json`` + ``mm_projector.bin``;
* LoRA: ``config.json``, ``adapter_config.json``, ``adapter_model.bin``, ``non_lora_trainables.bin``;
* full: the usual transformers weights + ``config.json`` + tokenizer + ``preprocessor_config.json``.

Every ``checkpoint-N`` is written under ``<output_dir>/.staging`` and renamed into place when complete, so the
latest ``checkpoint-*`` that a resumed run picks is never a half-written one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from palo.constants import IGNORE_INDEX
from palo.train.dataset import LANGUAGE_NAMES
from palo.train.model_setup import unwrap
from palo.train.optim import parameter_groups
from palo.train.sampler import LengthGroupedSampler

logger = logging.getLogger(__name__)

STAGING = ".staging"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


class PaloTrainer(Trainer):
    """Trainer for PALO runs (see the module docstring for what it saves).

    Args:
        image_processor: Saved next to full checkpoints.
        stage1: ``--tune_mm_mlp_adapter``.
        **kwargs: transformers Trainer arguments.
    """

    def __init__(self, *args: Any, image_processor: Any = None, stage1: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_processor = image_processor
        self.stage1 = stage1
        self._staging = False
        self._language_loss = torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64)
        self._language_tokens = torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64)
        self._tokens_seen = 0
        self._tokens_clock: float | None = None  # started by the first step, not by setup

    # -- data order and optimizer ----------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length:
            return LengthGroupedSampler(
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=dataset.modality_lengths,
                group_by_modality=True,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(dataset) if train_dataset is not None else super()._get_train_sampler()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.args.mm_projector_lr is not None:
            target = model if model is not None else self.model
            groups = parameter_groups(target, self.args.weight_decay, self.args.mm_projector_lr)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    # -- loss and logs ---------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        languages = inputs.pop("languages", None)
        if self._tokens_clock is None:
            self._tokens_clock = time.perf_counter()
        self._tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if languages is not None and "spliced_labels" in outputs:
            self._track_language_loss(outputs["logits"], outputs["spliced_labels"], languages)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _track_language_loss(self, logits: torch.Tensor, labels: torch.Tensor, languages: torch.Tensor) -> None:
        for row in range(logits.shape[0]):
            target = labels[row, 1:]
            mask = target != IGNORE_INDEX
            if not mask.any():
                continue
            row_loss = nn.functional.cross_entropy(logits[row, :-1][mask].float(), target[mask], reduction="sum")
            language = int(languages[row])
            self._language_loss[language] += float(row_loss)
            self._language_tokens[language] += float(mask.sum())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            counts = torch.stack([self._language_loss, self._language_tokens])
            if dist.is_available() and dist.is_initialized():
                counts = counts.to(self.args.device)
                dist.all_reduce(counts)
                counts = counts.cpu()
            for i, name in enumerate(LANGUAGE_NAMES):
                if counts[1, i] > 0:
                    logs[f"loss_{name}"] = round(float(counts[0, i] / counts[1, i]), 4)
            self._language_loss.zero_()
            self._language_tokens.zero_()
            now = time.perf_counter()
            elapsed = now - (self._tokens_clock or now)
            logs["tokens_per_second"] = round(self._tokens_seen * self.args.world_size / max(elapsed, 1e-9), 1)
            self._tokens_seen, self._tokens_clock = 0, now
        super().log(logs, *args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._staging = True
        try:
            staging_dir = self._get_output_dir(trial)
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.parallel_mode.value == "distributed" and dist.is_initialized():
            dist.barrier()  # every rank's DeepSpeed shards are written
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_dir, name), final)
            shutil.rmtree(staging_dir, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        if self.args.parallel_mode.value == "distributed" and dist.is_initialized():
            dist.barrier()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        base = unwrap(model)
        if not (self.stage1 or _is_peft(model)):
            super()._save(output_dir, state_dict)
            if self.args.should_save and self.image_processor is not None:
                self.image_processor.save_pretrained(output_dir)
            return
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            state_dict = model.state_dict()
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        base.config.save_pretrained(output_dir)
        if self.stage1:
            projector = {_strip_peft(k): v for k, v in state.items() if "mm_projector" in k or "vision_resampler" in k}
            torch.save(projector, os.path.join(output_dir, "mm_projector.bin"))
            return
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # PEFT keeps the LoRA tensors (and biases per --lora_bias) and drops the adapter name from the keys;
        # .bin as in the original layout.
        model.save_pretrained(output_dir, state_dict=state, safe_serialization=False)
        non_lora = {k: v for k, v in state.items() if "lora_" not in k and k in trainable}
        torch.save(non_lora, os.path.join(output_dir, "non_lora_trainables.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or not (self.stage1 or _is_peft(model)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        base = unwrap(model)
        if self.stage1:
            state = torch.load(os.path.join(resume_from_checkpoint, "mm_projector.bin"), map_location="cpu", weights_only=True)
            base.get_model().mm_projector.load_state_dict({k.split("mm_projector.", 1)[1]: v for k, v in state.items()})
            return
        from peft import set_peft_model_state_dict

        adapter = torch.load(os.path.join(resume_from_checkpoint, "adapter_model.bin"), map_location="cpu", weights_only=True)
        set_peft_model_state_dict(model, adapter)
        non_lora = torch.load(os.path.join(resume_from_checkpoint, "non_lora_trainables.bin"), map_location="cpu", weights_only=True)
        result = model.load_state_dict(non_lora, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{resume_from_checkpoint}: unexpected keys {result.unexpected_keys[:5]}")


def _strip_peft(key: str) -> str:
    """``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight``."""
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key
