"""``PaloTrainer``: transformers' Trainer with PALO's sampler, optimizer groups, checkpoint files and logs.

Checkpoint files per mode (the original layouts, written at the end *and* in every ``checkpoint-N``):

* stage 1 (``--tune_mm_mlp_adapter``): ``config.json`` + ``mm_projector.bin``;
* LoRA: ``config.json``, ``adapter_config.json``, ``adapter_model.bin``, ``non_lora_trainables.bin``;
* full: the usual transformers weights + ``config.json`` + tokenizer + ``preprocessor_config.json``.

Every ``checkpoint-N`` is written under ``<output_dir>/.staging`` and renamed into place when complete, so the
latest ``checkpoint-*`` that a resumed run picks is never a half-written one. The stage-1 and LoRA files are
written and read by :mod:`palo.model.checkpoint_files`; resuming checks their keys against the model being trained.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import zipfile
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from palo.constants import IGNORE_INDEX
from palo.jsonl import nearly_full
from palo.model import checkpoint_files
from palo.model.config import MultimodalSpec
from palo.train.dataset import LANGUAGE_NAMES, RowTaggedDataset
from palo.train.flops import FlopCounter, peak_flops
from palo.train.model_setup import unwrap
from palo.train.optim import parameter_groups
from palo.train.run_record import write_record
from palo.train.sampler import LengthGroupedSampler, PackedStepSampler

logger = logging.getLogger(__name__)

STAGING = ".staging"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class DamagedCheckpointsError(RuntimeError):
    """Every ``checkpoint-N`` of a run to resume is damaged (the message names each and why)."""


class CheckpointSaveError(RuntimeError):
    """A ``checkpoint-N`` could not be written (a full disk): the run stopped; the message names the checkpoint, the
    likely cause and the checkpoint a rerun resumes from, which the failed save left as it was."""


# What torch.save says when a write fails: no errno, no file, no "disk full" ("basic_ios::clear: iostream error",
# "[enforce fail at inline_container.cc:672] . unexpected pos 61248 vs 61140", "PytorchStreamWriter failed ...").
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "unexpected pos", "PytorchStreamWriter failed",
                         "file write failed")
def save_failure_cause(exc: BaseException, folder: str) -> str | None:
    """Why saving into ``folder`` failed, said plainly, or None when ``exc`` is no failed write (a defect, to raise).

    torch's own words for a full disk name neither the cause nor the file, so the free space left tells it.
    """
    said = (str(exc).strip().splitlines() or [""])[0][:200]
    free = nearly_full(folder)
    full = free is not None
    if isinstance(exc, OSError):
        cause = exc.strerror or said
    elif isinstance(exc, SafetensorError) or any(s in said for s in _TORCH_WRITE_FAILURES) or full:
        cause = f"{type(exc).__name__}: {said}"
    else:
        return None
    if full and not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
        return f"no space left on the device ({free // 1024} KiB free; {cause})"
    if not isinstance(exc, OSError):
        return f"{cause} (a write that failed: a quota or a file-size limit?)"
    return cause


def checkpoint_damage(folder: str, needs_optimizer: bool = True) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or None when it looks whole.

    Cheap checks that catch a cut or emptied file (a disk fault, a copy cut short): ``trainer_state.json`` parses;
    every JSON file parses; every safetensors file is as long as its header says; every torch pickle (``.bin``,
    ``.pt``, ``.pth``: zip archives) has its directory, which is written last. With ``needs_optimizer`` (every run
    but ``--save_only_model``'s) the optimizer's state must be there too (``optimizer.pt`` and ``scheduler.pt``, or
    DeepSpeed's step folder named by ``latest``): without it the Trainer resumed anyway, its optimizer and
    learning-rate schedule started over.
    """
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json"
    if needs_optimizer:
        missing = _missing_optimizer_state(folder)
        if missing:
            return missing
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            where = os.path.relpath(path, folder)
            try:
                if name.endswith(".json"):
                    with open(path, encoding="utf-8") as f:
                        json.load(f)
                elif name.endswith(".safetensors"):
                    size = os.path.getsize(path)
                    with open(path, "rb") as f:
                        header = int.from_bytes(f.read(8), "little")
                        if 8 + header > size:  # a cut (or garbled) length: never read that much
                            return f"{where} is cut short"
                        meta = json.loads(f.read(header))
                    end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
                    if size < 8 + header + end:
                        return f"{where} is cut short"
                elif name.endswith((".bin", ".pt", ".pth")):
                    with zipfile.ZipFile(path):
                        pass
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
                return f"{where} cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _deepspeed_step(folder: str) -> str | None:
    """The step folder DeepSpeed's ``latest`` names in a checkpoint (None: saved without DeepSpeed)."""
    latest = os.path.join(folder, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        return os.path.join(folder, f.read().strip())


def _missing_optimizer_state(folder: str) -> str | None:
    step_dir = _deepspeed_step(folder)
    if step_dir is not None:  # DeepSpeed's: its step folder holds the optimizer's shards
        if not (os.path.isdir(step_dir) and any(n.endswith("optim_states.pt") for n in os.listdir(step_dir))):
            return f"no optimizer state in {os.path.basename(step_dir) or 'the step folder'}/ (named by 'latest')"
        return None
    for name in ("optimizer.pt", "scheduler.pt"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"no {name}: its optimizer and learning-rate schedule would start over"
    return None


def saved_with_deepspeed(folder: str) -> int | None:
    """The ZeRO stage a checkpoint was saved with (3, or 2 for stages 0-2, which resume alike), None without
    DeepSpeed."""
    step_dir = _deepspeed_step(folder)
    if step_dir is None:
        return None
    names = os.listdir(step_dir) if os.path.isdir(step_dir) else []
    return 3 if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names) else 2


def set_aside(folder: str) -> str:
    """Rename a damaged ``checkpoint-N`` to ``damaged-checkpoint-N`` (``.1``, ``.2`` ... if taken), out of the
    pattern checkpoint rotation keeps: as the highest-numbered folder it was always kept, and every new whole
    checkpoint was deleted right after it was written (``--save_total_limit 1``, the scripts' value)."""
    parent, name = os.path.split(folder.rstrip(os.sep))
    target = os.path.join(parent, f"damaged-{name}")
    k = 0
    while os.path.exists(target):
        k += 1
        target = os.path.join(parent, f"damaged-{name}.{k}")
    os.replace(folder, target)
    return target


def resumable_checkpoint(output_dir: str, needs_optimizer: bool = True, move_damaged: bool = False) -> str | None:
    """The newest whole ``checkpoint-N`` of ``output_dir`` (None when there is none); damaged newer ones are
    passed over with a warning naming each, and with ``move_damaged`` (the process that saves) set aside
    (:func:`set_aside`).

    Raises:
        DamagedCheckpointsError: When checkpoints exist but none is whole: starting over would silently discard
            the run, so the user decides (move the damaged folders away to start over).
    """
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                   reverse=True)
    damaged: list[tuple[str, str]] = []
    for _, name in found:
        folder = os.path.join(output_dir, name)
        why = checkpoint_damage(folder, needs_optimizer)
        if why is None:
            for newer, reason in damaged:
                moved = f"; moved to {set_aside(newer)}" if move_damaged else ""
                logger.warning("not resuming from %s: %s%s", newer, reason, moved)
            return folder
        damaged.append((folder, why))
    if damaged:  # none is whole: nothing is moved, the user decides
        for folder, why in damaged:
            logger.warning("not resuming from %s: %s", folder, why)
        raise DamagedCheckpointsError(f"{output_dir}: no checkpoint to resume from is whole "
                                      f"({'; '.join(f'{os.path.basename(f)}: {w}' for f, w in damaged)}); "
                                      "move them away to start the run over")
    return None


def resume_point(args: Any) -> str | None:
    """The checkpoint a run resumes from: ``--resume_from_checkpoint PATH`` when given (it was ignored), else the
    newest whole one of ``--output_dir`` (:func:`resumable_checkpoint`).

    Raises:
        ValueError: A given checkpoint that is not there or not whole, or one saved with DeepSpeed (or a ZeRO stage)
            that this run does not use: its optimizer state cannot be resumed across that (without DeepSpeed the
            Trainer silently started the optimizer and the schedule over; across stages DeepSpeed failed with a
            bare assertion).
        DamagedCheckpointsError: When checkpoints exist but none is whole.
    """
    needs_optimizer = not getattr(args, "save_only_model", False)
    given = args.resume_from_checkpoint
    if given and str(given).lower() not in ("true", "1"):
        if not os.path.isdir(given):
            raise ValueError(f"--resume_from_checkpoint {given}: no such folder")
        why = checkpoint_damage(given, needs_optimizer)
        if why is not None:
            raise ValueError(f"--resume_from_checkpoint {given} cannot be resumed from: {why}")
        checkpoint = given
    else:
        checkpoint = resumable_checkpoint(args.output_dir, needs_optimizer, move_damaged=args.should_save)
    if checkpoint is not None and needs_optimizer:
        saved, running = saved_with_deepspeed(checkpoint), _zero_stage(args)
        if saved != running:  # each None, 2 (stages 0-2) or 3
            said = lambda stage: "without DeepSpeed" if stage is None else f"with ZeRO-{stage}"  # noqa: E731
            raise ValueError(f"{checkpoint} was saved {said(saved)}{' (or a lower stage)' if saved == 2 else ''} and "
                             f"this run is {said(running)}: its optimizer state cannot be resumed across that; launch "
                             "as it was saved, or move the checkpoints away to start over")
    return checkpoint


def _zero_stage(args: Any) -> int | None:
    """This run's ZeRO stage (3, or 2 for 0-2), None without DeepSpeed."""
    config = args.deepspeed
    if not config:
        return None
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    stage = int((config.get("zero_optimization") or {}).get("stage", 0) or 0)
    return 3 if stage == 3 else 2


class _SamplerEpoch(TrainerCallback):
    """Tells PALO's samplers (``--packing_rows``, ``--group_by_modality_length``) which epoch starts, on every path.

    accelerate forwards ``set_epoch`` through most of its dataloader wrappers but not through the one a resumed
    multi-process run iterates (its skipping sampler around its sharding one): the resumed epoch replayed epoch 0's
    order. So the epoch is also taken from the Trainer's state here: ``int(state.epoch)`` is the epoch the loop is
    about to run, on a fresh or a resumed run.
    """

    def __init__(self, trainer: PaloTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sampler in (self.trainer.packed_sampler, self.trainer.grouped_sampler):
            if sampler is not None:
                sampler.set_epoch(int(state.epoch or 0))


class _SaveOnSchedule(TrainerCallback):
    """Checkpoints on the ``--save_steps`` schedule only, as the original's transformers (4.31) wrote them.

    transformers 5 also saves one at the last step, whatever the schedule: the original scripts' ``--save_steps
    50000``, longer than any PALO run, then wrote a whole checkpoint (with the optimizer state: tens of GB for a
    full fine-tune) beside the final model, which the run saves anyway. Runs after DefaultFlowCallback, which asked.
    """

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        on_schedule = state.save_steps > 0 and state.global_step % state.save_steps == 0
        if state.global_step >= state.max_steps and args.save_strategy == "steps" and not on_schedule:
            control.should_save = False


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


class PaloTrainer(Trainer):
    """Trainer for PALO runs (see the module docstring for what it saves).

    Args:
        image_processor: Saved next to full checkpoints.
        stage1: ``--tune_mm_mlp_adapter``.
        save_embeddings: Whether LoRA checkpoints carry the embedding and output layers (PEFT's
            ``save_embedding_layers``): True where tokens were added to the vocabulary. ``"auto"`` lets PEFT find out
            by loading the base model's config at every save, which warns that a ``llama`` config makes a ``palo``
            one and, for a hub id, asks the hub each time.
        **kwargs: transformers Trainer arguments.
    """

    def __init__(self, *args: Any, image_processor: Any = None, stage1: bool = False,
                 save_embeddings: bool | str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_processor = image_processor
        self.stage1 = stage1
        self.save_embeddings = save_embeddings
        self.run_record: dict | None = None  # written into each checkpoint (palo.train.run_record)
        self._staging = False
        self._language_loss = torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64)
        self._language_tokens = torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64)
        self._tokens_seen = 0
        self._tokens_clock: float | None = None  # started by the first step, not by setup
        # Throughput since the last log: real (non-padding) positions through the LLM, all positions, model FLOPs.
        self._throughput = torch.zeros(3, dtype=torch.float64)
        self._flops: FlopCounter | None = None
        self.packed_sampler: PackedStepSampler | None = None  # set by get_train_dataloader with --packing_rows
        self.grouped_sampler: LengthGroupedSampler | None = None  # set by _get_train_sampler with grouping
        self.add_callback(_SamplerEpoch(self))
        self.add_callback(_SaveOnSchedule())

    # -- data order and optimizer ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """With ``--packing_rows R``, steps of ``R`` planned rows (:class:`PackedStepSampler`); else the Trainer's."""
        if not self.args.packing_rows:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        sampler = PackedStepSampler(
            dataset.token_lengths(),
            capacity=self.args.model_max_length,
            rows_per_step=self.args.packing_rows,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        self.packed_sampler = sampler
        logger.info("--packing_rows %d: %d samples in %d rows of %d positions, %d steps per epoch, padding %.2f%%",
                    sampler.rows_per_step, len(dataset), len(sampler.rows), sampler.capacity, len(sampler),
                    100 * sampler.padding_fraction())
        loader = DataLoader(
            RowTaggedDataset(dataset),
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
        )
        # accelerate deals the global steps to the ranks (a batch sampler without batch_size: steps of any size).
        return self.accelerator.prepare(loader)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length:
            self.grouped_sampler = LengthGroupedSampler(
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=dataset.modality_lengths,
                group_by_modality=True,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
            return self.grouped_sampler
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
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        languages = inputs.pop("languages", None)
        if self._tokens_clock is None:
            self._tokens_clock = time.perf_counter()
        self._tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
        num_images = len(inputs["images"]) if inputs.get("images") is not None else 0
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if "spliced_labels" in outputs:
            samples = self._sample_of_position(outputs["spliced_attention_mask"], outputs.get("spliced_position_ids"))
            if model.training:
                self._track_throughput(model, outputs["spliced_attention_mask"], samples, num_images)
            if languages is not None:
                self._track_language_loss(outputs, languages, samples)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _sample_of_position(mask: torch.Tensor, packed_positions: torch.Tensor | None) -> torch.Tensor:
        """``[B, L]``: the batch-wide index of the sample each position belongs to (padding: its row's last one).

        One sample per row, or in packed batches, one per position 0 on a real position, in row-major order (the
        order of the packing collator's ``languages``).
        """
        if packed_positions is None:
            return torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand(mask.shape)
        starts = (packed_positions == 0) & (mask != 0)
        return starts.reshape(-1).cumsum(0).view(mask.shape) - 1

    @torch.no_grad()
    def _track_language_loss(self, outputs: Any, languages: torch.Tensor, samples: torch.Tensor) -> None:
        """Add each labelled token's loss to its sample's language: from the logits, or from the per-token losses
        of Liger's fused head, which returns no logits."""
        target = outputs["spliced_labels"][:, 1:]
        mask = target != IGNORE_INDEX
        if not mask.any():
            return
        if outputs.get("token_losses") is not None:
            token_loss = outputs["token_losses"][mask].float()
        elif outputs.get("logits") is not None:
            token_loss = nn.functional.cross_entropy(outputs["logits"][:, :-1][mask].float(), target[mask],
                                                     reduction="none")
        else:
            return
        token_language = languages.to(samples.device)[samples[:, 1:][mask]].cpu()
        self._language_loss.index_add_(0, token_language, token_loss.detach().double().cpu())
        self._language_tokens.index_add_(0, token_language, torch.ones_like(token_language, dtype=torch.float64))

    @torch.no_grad()
    def _track_throughput(self, model: nn.Module, mask: torch.Tensor, samples: torch.Tensor, num_images: int) -> None:
        if self._flops is None:
            self._flops = FlopCounter.of(self.accelerator.unwrap_model(model, keep_torch_compile=False))
        real = mask != 0
        lengths = torch.bincount(samples[real].reshape(-1)).cpu()
        tokens = int(real.sum())
        self._throughput += torch.tensor([tokens, mask.numel(), self._flops.step(tokens, lengths, num_images)],
                                         dtype=torch.float64)

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
            logs.update(self._throughput_logs(elapsed))
        super().log(logs, *args, **kwargs)

    def _throughput_logs(self, elapsed: float) -> dict[str, float]:
        """Real tokens/s, padding fraction, MFU and peak memory since the last log, summed over ranks."""
        totals = self._throughput.clone()
        self._throughput.zero_()
        if dist.is_available() and dist.is_initialized():
            totals = totals.to(self.args.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        real, positions, flops = (float(x) for x in totals)
        if positions == 0:
            return {}
        elapsed = max(elapsed, 1e-9)
        logs = {"real_tokens_per_second": round(real / elapsed, 1), "padding_fraction": round(1 - real / positions, 4)}
        peak = peak_flops(self.args.device)
        if peak is not None:
            logs["mfu"] = round(flops / elapsed / (peak * self.args.world_size), 4)
        logs["model_tflops_per_second"] = round(flops / elapsed / 1e12, 4)
        if self.args.device.type == "cuda":
            logs["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.args.device) / 2**30, 3)
        else:
            import resource

            # ru_maxrss is in KiB on Linux
            logs["peak_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        return logs

    # -- saving ----------------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        try:
            self._save_staged_checkpoint(model, trial, run_dir, name)
        except (OSError, RuntimeError, SafetensorError) as exc:
            cause = save_failure_cause(exc, os.path.join(run_dir, STAGING))
            if cause is None:
                raise
            if self.args.should_save:  # the half-written checkpoint: its room is what the rerun needs
                shutil.rmtree(os.path.join(run_dir, STAGING), ignore_errors=True)
            # A traceback from deep in torch ("basic_ios::clear: iostream error") said neither which checkpoint
            # nor why, nor that the run can go on from the one before.
            try:
                previous = resumable_checkpoint(run_dir, not self.args.save_only_model)
            except DamagedCheckpointsError:
                previous = None
            resume = (f"{previous} is intact: make room and rerun the same command to resume from it" if previous
                      else "no earlier checkpoint to resume from: a rerun starts over")
            raise CheckpointSaveError(f"cannot save {os.path.join(run_dir, name)}: {cause}; the run stopped, "
                                      f"{resume}") from exc

    def _save_staged_checkpoint(self, model: nn.Module, trial: Any, run_dir: str, name: str) -> None:
        """The checkpoint written under ``.staging`` and renamed into place when whole."""
        self._staging = True
        try:
            staging_dir = self._get_output_dir(trial)
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.parallel_mode.value == "distributed" and dist.is_initialized():
            dist.barrier()  # every rank's DeepSpeed shards are written
        if self.args.should_save:
            if self.run_record is not None:
                write_record(self.run_record, os.path.join(staging_dir, name))
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
            embeddings = MultimodalSpec.from_config(base.config).use_im_start_end
            checkpoint_files.save_projector(output_dir, state, embeddings=embeddings)
            return
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # PEFT keeps the LoRA tensors (and biases per --lora_bias) and drops the adapter name from the keys;
        # .bin as in the original layout.
        model.save_pretrained(output_dir, state_dict=state, safe_serialization=False,
                              save_embedding_layers=self.save_embeddings)
        checkpoint_files.save_non_lora(output_dir, checkpoint_files.non_lora_state(state, trainable))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or not (self.stage1 or _is_peft(model)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.stage1:
            checkpoint_files.restore_projector(unwrap(model), resume_from_checkpoint)
        else:
            checkpoint_files.restore_lora(model, resume_from_checkpoint)
