"""What a checkpoint's run was, so that a resume that would train other samples than the run left is refused.

The Trainer counts resumed steps in its own units and skips that many batches of the new run's sampler. When the
global batch, the planned packed steps, the sampler's settings or the data changed since the checkpoint, the same
count lands elsewhere: samples are trained a third time or not at all, the learning-rate schedule jumps, and nothing
says so. Each ``checkpoint-N`` holds ``palo_run.json`` (this record); a resume compares it with the run's own and
stops with one line naming each difference. A global batch split differently (2 ranks x 2 or 1 x 4, or with
gradient accumulation) resumes exactly and stays allowed. Checkpoints written before the record existed are
resumed as before, with a warning that the resume is not checked (:func:`unrecorded`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

RECORD_FILE = "palo_run.json"


def run_record(args: Any, data_args: Any, index: Any, samples: int) -> dict[str, Any]:
    """This run's record.

    Args:
        args: The training arguments.
        data_args: The data arguments (``--packing``).
        index: The data file's :class:`~palo.data.json_index.JsonArrayIndex` (where each sample lies in the file).
        samples: The samples the run trains (corrupt ones filtered).
    """
    digest = hashlib.sha256(index.offsets.tobytes() + index.lengths.tobytes()).hexdigest()[:16]
    world = int(args.world_size)
    return {
        "global_batch": world * int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps),
        "world_size": world,
        "packing": bool(data_args.packing),
        "packing_rows": int(args.packing_rows or 0),
        "model_max_length": int(args.model_max_length),
        "group_by_modality_length": bool(args.group_by_modality_length),
        "seed": int(args.data_seed if args.data_seed is not None else args.seed),
        "data": {"samples": int(samples), "layout": digest},
    }


def write_record(record: dict[str, Any], checkpoint: str) -> None:
    with open(os.path.join(checkpoint, RECORD_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def resume_differences(checkpoint: str, record: dict[str, Any]) -> list[str]:
    """What differs between the run that wrote ``checkpoint`` and this one, in words (empty: resume as is)."""
    path = os.path.join(checkpoint, RECORD_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    said = []
    if saved.get("data") != record["data"]:
        then, now = saved.get("data", {}).get("samples"), record["data"]["samples"]
        said.append(f"the data file changed ({then} samples then, {now} now)" if then != now
                    else "the data file changed (its samples moved)")
    names = {"global_batch": "the global batch (ranks x per-device batch x gradient accumulation)",
             "packing": "--packing", "packing_rows": "--packing_rows", "model_max_length": "--model_max_length",
             "group_by_modality_length": "--group_by_modality_length", "seed": "the data seed"}
    for key, name in names.items():
        if key in saved and saved[key] != record[key]:
            said.append(f"{name}: {saved[key]} then, {record[key]} now")
    if record["packing_rows"] and saved.get("world_size") not in (None, record["world_size"]):
        said.append(f"the ranks with --packing_rows (each takes one planned step): {saved['world_size']} then, "
                    f"{record['world_size']} now")
    return said


def unrecorded(checkpoint: str, per_device_batch: int) -> str | None:
    """The warning for a checkpoint written before checkpoints recorded their run (an earlier version of this
    project), None for a recorded one. Such a resume cannot be checked: with another global batch it trained samples
    twice and nothing said so. Its ``trainer_state.json`` still has the per-device batch, said when it differs (the
    global batch may still be the same, split over other ranks, so this is not refused).
    """
    if os.path.isfile(os.path.join(checkpoint, RECORD_FILE)):
        return None
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            then = json.load(f).get("train_batch_size")
    except (OSError, ValueError, AttributeError):
        then = None
    said = (f"{checkpoint} was written before checkpoints recorded their run ({RECORD_FILE}), so this resume is not "
            "checked: resume it with the global batch, data, packing and seed it was launched with")
    if isinstance(then, int) and then != per_device_batch:
        said += (f" (its per-device batch was {then}, this run's is {per_device_batch}: unless the ranks or the "
                 "gradient accumulation changed to keep the global batch, samples are trained twice or skipped)")
    return said
