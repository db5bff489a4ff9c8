"""``python palo/train/train.py`` / ``deepspeed palo/train/train_mem.py``: PALO fine-tuning.

Takes every flag of the original script (see :mod:`palo.train.arguments`). Runs on transformers' Trainer, with
DeepSpeed through ``--deepspeed scripts/zeroN.json``, multi-GPU and multi-node through the ``deepspeed`` launcher
or ``torchrun``, and on CPU with ``--use_cpu True`` (gloo). Resumes from the latest ``checkpoint-*`` in
``--output_dir`` when there is one.
"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script (the original commands): make ``palo`` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402

from palo.data.json_index import DataFileChangedError, JsonArrayIndex  # noqa: E402
from palo.jsonl import cannot_write, lock_folder  # noqa: E402
from palo.model.attention import AttentionUnavailableError, check_trainable_on  # noqa: E402
from palo.model.checkpoint_files import CheckpointError  # noqa: E402
from palo.model.vision_tower import VisionTowerError  # noqa: E402
from palo.train.arguments import parse_args  # noqa: E402
from palo.train.dataset import (  # noqa: E402
    DataCollator,
    LazySupervisedDataset,
    PackedDataCollator,
    check_invalid_json,
    scan_metadata,
)
from palo.train.model_setup import setup_training, unwrap  # noqa: E402
from palo.train.preprocess import BadSampleError  # noqa: E402
from palo.train.run_record import resume_differences, run_record, unrecorded  # noqa: E402
from palo.train.trainer import (  # noqa: E402
    CheckpointSaveError,
    DamagedCheckpointsError,
    PaloTrainer,
    resume_point,
)

logger = logging.getLogger("palo.train")


def template_for(version: str) -> str:
    """The conversation template of ``--version``, as the original chose it (docs/formats.md §4.1).

    ``v0`` and ``v0.5`` change only the pad token (:func:`palo.train.model_setup.load_tokenizer_for_training`) and
    keep the original's default conversation, ``vicuna_v1``; any other name is its template, and an unknown one
    falls back to ``vicuna_v1``.
    """
    from palo.conversation import conv_templates

    if version in ("v0", "v0.5"):
        return "vicuna_v1"
    if version not in conv_templates:
        logger.warning("--version %s is not a template; using vicuna_v1 as the original did", version)
        return "vicuna_v1"
    return version


def train(argv: list[str] | None = None) -> PaloTrainer:
    """Run one training job; returns the trainer (for tests and notebooks)."""
    try:
        model_args, data_args, training_args = parse_args(argv)
        # (Not training_args.device: reading it sets up the process group, which must wait for DeepSpeed below.)
        on_cpu = training_args.use_cpu or not torch.cuda.is_available()
        check_trainable_on(model_args.attn_implementation, "cpu" if on_cpu else "cuda")
        # transformers' Trainer found it when it first wrote there (a FileExistsError traceback for a file of that
        # name), after the model had loaded.
        unwritable = cannot_write(training_args.output_dir, folder=True)
        if unwritable:
            raise ValueError(f"--output_dir {training_args.output_dir}: {unwritable}")
    except (ValueError, AttentionUnavailableError) as exc:  # a flag's value, named by its own check: one line
        raise SystemExit(f"error: {exc}") from None
    lock = lock_output_dir(training_args.output_dir)
    try:
        return _train(model_args, data_args, training_args)
    finally:
        if lock is not None:
            os.close(lock)


def lock_output_dir(output_dir: str) -> int | None:
    """Lock ``output_dir`` for this run (global rank 0 only: the ranks of one run share it); returns the descriptor
    to close when the run ends, None on the other ranks.

    Two runs on one folder saved over each other: each rotated away checkpoints the other was resuming from, and
    replaced the other's checkpoint being staged, ending in errors that blamed a full disk or a missing adapter.

    Raises:
        SystemExit: If another run holds the folder.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        return lock_folder(output_dir)
    except BlockingIOError:
        raise SystemExit(f"error: --output_dir {output_dir}: another training run is writing it (two runs would "
                         "save over each other's checkpoints); wait for it to finish, or choose another --output_dir"
                         ) from None


def _train(model_args, data_args, training_args) -> PaloTrainer:
    """:func:`train` after its flag checks, ``output_dir`` locked."""
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.set_seed(training_args.seed)
    if training_args.deepspeed and training_args.world_size > 1:
        # ZeRO-3 builds the model inside deepspeed.zero.Init, which needs DeepSpeed's view of the process group
        # before the Trainer exists; on GPUs transformers sets it up, on CPU (gloo) nobody else does.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
    # Bad data is found before the model is loaded, and reported as one line, not a traceback.
    if data_args.data_path is None:
        raise SystemExit("error: --data_path is required")
    if not os.path.isfile(data_args.data_path):
        raise SystemExit(f"error: --data_path {data_args.data_path}: no such file")
    try:  # the index (cached beside the file) does not need the model; the dataset takes it as built here
        index = JsonArrayIndex.build(data_args.data_path)
    except ValueError as exc:  # not one JSON array, an unreadable index cache
        raise SystemExit(f"error: {exc}") from None
    if len(index) == 0:
        raise SystemExit(f"error: --data_path {data_args.data_path} holds no samples")
    try:  # every sample decoded once (cached too): one that is not JSON is named here, not after the model loaded
        meta = scan_metadata(index, data_args.data_path)
        check_invalid_json(index, meta, data_args.skip_bad_samples)
    except BadSampleError as exc:
        raise SystemExit(f"error: {exc}") from None
    # --resume_from_checkpoint, else the latest whole checkpoint-N (a save cut short stays in <output_dir>/.staging,
    # which is never picked; one damaged later, by a disk fault or a cut copy, is passed over with a warning and set
    # aside). Found before the model loads: a checkpoint this run cannot resume is one line.
    try:
        checkpoint = resume_point(training_args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    setup = setup_training(model_args, data_args, training_args)
    dataset = LazySupervisedDataset(
        data_args.data_path,
        setup.tokenizer,
        template_for(model_args.version),
        image_folder=data_args.image_folder,
        image_processor=setup.image_processor,
        image_aspect_ratio=data_args.image_aspect_ratio,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
        model_max_length=training_args.model_max_length,
        image_tokens=setup.image_tokens,
        over_length=data_args.over_length,
        skip_bad_samples=data_args.skip_bad_samples,
        index=index,
        meta=meta,
    )
    if len(dataset) == 0:  # every sample was marked corrupt
        raise SystemExit(f"error: --data_path {data_args.data_path} holds no samples that are not corrupt")
    if data_args.packing:
        if model_args.vision_tower is None:
            raise SystemExit("--packing True needs PALO's multimodal model (--vision_tower); text-only runs pad")
        collator = PackedDataCollator(setup.tokenizer.pad_token_id, training_args.model_max_length, setup.image_tokens)
    else:
        if training_args.packing_rows:
            raise SystemExit("--packing_rows needs --packing True")
        collator = DataCollator(pad_token_id=setup.tokenizer.pad_token_id)
    trainer = PaloTrainer(
        model=setup.model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=setup.tokenizer,
        image_processor=setup.image_processor,
        stage1=model_args.tune_mm_mlp_adapter,
        save_embeddings=setup.embeddings_resized,
    )
    trainer.run_record = run_record(training_args, data_args, index, len(dataset))
    if checkpoint is not None:
        changed = resume_differences(checkpoint, trainer.run_record)
        if changed:
            raise SystemExit(f"error: {checkpoint} cannot be resumed by this run, which would train other samples "
                             f"than its run left: {'; '.join(changed)}. Resume as it was launched, or start over in "
                             "another --output_dir")
        unchecked = unrecorded(checkpoint, training_args.per_device_train_batch_size)
        if unchecked:
            logger.warning(unchecked)
        logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()
    unwrap(setup.model).config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if dataset.bad_samples.value:
        logger.warning("Skipped %d bad samples (--skip_bad_samples)", dataset.bad_samples.value)
    if dataset.over_length_skipped.value:
        logger.warning("Skipped %d samples over --model_max_length (--over_length skip)",
                       dataset.over_length_skipped.value)
    return trainer


def finish_distributed() -> None:
    """End a distributed run cleanly: wait for every rank, then destroy the process groups, while Python is alive.

    Call it once per process after its last collective (``main`` does, after :func:`train` has saved).

    Without it a run could end red after saving: a gloo worker thread drops its reference to a finished collective
    just after waking the rank that waits for it; when that rank has meanwhile returned and the interpreter is
    finalizing, freeing a tensor that still has a Python object needs the GIL, the thread is made to exit inside a
    destructor, and the rank aborts with ``terminate called without an active exception`` (exit -6); torchrun then
    kills the other ranks. A barrier on every gloo group (in creation order, the same on every rank) lets each
    group's last collectives finish, and be released, before the teardown; ``destroy_process_group`` (DeepSpeed's
    when it set the groups up: it also drops its cached references) then shuts the groups down while the
    interpreter can still run their cleanup. The world barrier also keeps a rank from tearing down while another
    is still saving.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.distributed_c10d import _world

    dist.barrier()
    for group in sorted(_world.pg_names, key=lambda g: _world.pg_names[g]):
        if group is not dist.GroupMember.WORLD and dist.get_backend(group) == "gloo":
            dist.barrier(group=group)
    if "deepspeed.comm" in sys.modules:
        from deepspeed import comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups nothing references any more are destroyed (their threads joined) now, not at exit


def _own_message(exc: Exception) -> str:
    """The exception's message; for one a DataLoader worker raised, the worker's own (torch re-raises it in the main
    process with the worker's whole traceback as its message, ending in ``<type>: <message>``)."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main() -> None:
    try:
        train()
    except (BadSampleError, DataFileChangedError, DamagedCheckpointsError, CheckpointError, VisionTowerError,
            CheckpointSaveError) as exc:
        # Each message names what and where (a sample, the data file, a checkpoint or weights that cannot be read or
        # saved); files stay.
        raise SystemExit(f"error: {_own_message(exc)}") from None
    finish_distributed()


if __name__ == "__main__":
    main()
