"""A checkpoint's record of its run, and what a resume may change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from palo.train.run_record import resume_differences, run_record, write_record


def _record(world=2, per_device=2, accumulation=1, packing_rows=0, offsets=(0, 10, 20)):
    args = SimpleNamespace(world_size=world, per_device_train_batch_size=per_device,
                           gradient_accumulation_steps=accumulation, packing_rows=packing_rows, model_max_length=64,
                           group_by_modality_length=True, data_seed=None, seed=7)
    index = SimpleNamespace(offsets=np.array(offsets), lengths=np.array([9] * len(offsets)))
    return run_record(args, SimpleNamespace(packing=bool(packing_rows)), index, len(offsets))


def test_what_a_resume_may_change_and_what_it_may_not(tmp_path):
    write_record(_record(), str(tmp_path))
    assert resume_differences(str(tmp_path), _record(world=1, per_device=4)) == []  # the same global batch
    assert resume_differences(str(tmp_path), _record(world=1, per_device=2, accumulation=2)) == []
    assert resume_differences(str(tmp_path), _record(world=1)) == [
        "the global batch (ranks x per-device batch x gradient accumulation): 4 then, 2 now"]
    assert resume_differences(str(tmp_path), _record(offsets=(0, 12, 20))) == [
        "the data file changed (its samples moved)"]
    write_record(_record(packing_rows=2), str(tmp_path))  # each rank takes one planned step: the ranks count
    assert "the ranks with --packing_rows (each takes one planned step): 2 then, 1 now" in resume_differences(
        str(tmp_path), _record(world=1, per_device=4, packing_rows=2))
    assert resume_differences(str(tmp_path / "written-before-the-record"), _record(world=1)) == []
