"""``--packing True`` through the real entry point: the same training as padded batches, with less padding.

The packed run takes the same samples per optimizer step as the padded one and its loss is the same mean over the
same answer tokens, so its losses must equal the padded run's (up to float rounding), per language too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from palo.constants import IGNORE_INDEX
from palo.mm_utils import tokenizer_image_token
from palo.model.builder import load_pretrained_model
from palo.serve.launch import free_port
from palo.testing import tiny_data
from palo.train.dataset import PackedDataCollator, pack_rows
from palo.train.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return tiny_data.write_dataset(str(tmp_path_factory.mktemp("data")), num_samples=24)


def _flags(world, data: str, out: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", world.base_dir, "--version", "v1", "--data_path", data,
        "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--output_dir", out,
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
        "--weight_decay", "0.", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--model_max_length", "256",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--seed", "7",
        "--dataloader_num_workers", "0", *extra,
    ]


def _history(trainer_or_dir) -> list[dict]:
    if isinstance(trainer_or_dir, str):
        with open(os.path.join(trainer_or_dir, "trainer_state.json")) as f:
            history = json.load(f)["log_history"]
    else:
        history = trainer_or_dir.state.log_history
    return [entry for entry in history if "loss" in entry]


def _losses(trainer_or_dir) -> list[float]:
    return [entry["loss"] for entry in _history(trainer_or_dir)]


def test_packed_run_has_the_padded_runs_losses_with_less_padding(world, data, tmp_path):
    flags = lambda out, *x: _flags(world, data, str(tmp_path / out), "--group_by_modality_length", "True",  # noqa: E731
                                   "--max_steps", "3", *x)
    padded = _history(train(flags("padded")))
    packed = _history(train(flags("packed", "--packing", "True")))
    assert len(padded) == len(packed) == 3
    assert [e["loss"] for e in packed] == pytest.approx([e["loss"] for e in padded], rel=1e-5, abs=1e-5)
    for ours, theirs in zip(packed, padded):
        languages = {k for k in theirs if k.startswith("loss_")}
        assert languages and languages == {k for k in ours if k.startswith("loss_")}
        for key in languages:  # logged rounded to 4 decimals
            assert ours[key] == pytest.approx(theirs[key], abs=2e-4), key
        for key in ("real_tokens_per_second", "padding_fraction", "model_tflops_per_second", "peak_memory_gb"):
            assert key in ours and key in theirs
        assert ours["padding_fraction"] < theirs["padding_fraction"]
        assert ours["padding_fraction"] < 0.25


def _run(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = (launcher or [sys.executable]) + [os.path.join(ROOT, "palo", "train", "train_mem.py"), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_packed_run_resumes_with_identical_losses(world, data, tmp_path):
    flags = lambda out: _flags(world, data, out, "--num_train_epochs", "4", "--save_strategy", "steps",  # noqa: E731
                               "--save_steps", "4", "--save_total_limit", "2", "--lora_enable", "True",
                               "--lora_r", "8", "--lora_alpha", "16", "--group_by_modality_length", "True",
                               "--per_device_train_batch_size", "4", "--packing", "True")
    reference = str(tmp_path / "reference")
    proc = _run(flags(reference))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]

    interrupted = str(tmp_path / "interrupted")
    proc = _run(flags(interrupted))
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(interrupted, "checkpoint-8")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isdir(os.path.join(interrupted, "checkpoint-24"))  # it really stopped mid-way
    proc = _run(flags(interrupted))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    ours, theirs = _losses(interrupted), _losses(reference)
    assert len(ours) == len(theirs) == 24
    assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.mark.slow
def test_zero2_with_packing_on_two_cpu_ranks_trains_and_saves_loadable_checkpoints(world, data, tmp_path):
    """The original finetune script under torchrun (2 CPU processes, gloo) with ZeRO-2 and --packing True."""
    out = str(tmp_path / "results" / "PALO-packed")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, LAUNCHER=f"{torchrun} --nproc_per_node 2 --master_port {free_port()}",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    projector = os.path.join(world.projector_dir, "mm_projector.bin")
    args = ["bash", os.path.join(ROOT, "scripts", "train", "finetune_palo.sh"), world.base_dir, data, projector,
            "mlp2x_gelu", out, "2", "1e-3",
            "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
            "--use_cpu", "True", "--bf16", "False", "--tf32", "False", "--per_device_train_batch_size", "4",
            "--max_steps", "3", "--save_steps", "3", "--dataloader_num_workers", "0",
            "--gradient_checkpointing", "False", "--model_max_length", "256", "--packing", "True"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    history = _history(out)
    assert len(history) == 3 and all(0 < e["loss"] < 20 for e in history)
    assert all(e["padding_fraction"] < 0.25 for e in history)
    shards = sorted(f for _, _, files in os.walk(os.path.join(out, "checkpoint-3")) for f in files
                    if f.endswith("optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO-2 optimizer shard per rank
    for folder in (out, os.path.join(out, "checkpoint-3")):
        tokenizer, model, _, _ = load_pretrained_model(folder, device="cpu")
        ids = tokenizer_image_token("USER: <image>\nما لون الشكل؟ ASSISTANT:", tokenizer, return_tensors="pt")[None]
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids, images=torch.randn(1, 3, 56, 56)).logits).all()


# -- --packing_rows: steps of nearly full rows planned over the dataset ---------------------------------------------
def _dataset(world, data: str, max_length: int = 256, over_length: str = "truncate"):
    from palo.model.tokenizer import load_tokenizer
    from palo.model.vision_tower import load_image_processor
    from palo.train.dataset import LazySupervisedDataset

    processor = load_image_processor(world.clip_dir, 56)
    return LazySupervisedDataset(data, load_tokenizer(world.tokenizer_dir), "vicuna_v1",
                                 image_folder=os.path.join(os.path.dirname(data), "images"), image_processor=processor,
                                 image_aspect_ratio="pad", model_max_length=max_length,
                                 image_tokens=world.model.image_token_count, over_length=over_length)


def test_token_lengths_are_the_items_spliced_lengths_and_are_cached(world, data, monkeypatch):
    from palo.model.multimodal import spliced_length
    from palo.train.dataset import LazySupervisedDataset

    dataset = _dataset(world, data, max_length=100)
    lengths = dataset.token_lengths()
    expected = [min(spliced_length(dataset[i]["input_ids"], dataset.image_tokens), 100) for i in range(len(dataset))]
    assert lengths.tolist() == expected and max(expected) == 100  # some are cut at model_max_length
    monkeypatch.setattr(LazySupervisedDataset, "_compute_lengths", lambda self: pytest.fail("not read from cache"))
    assert _dataset(world, data, max_length=100).token_lengths().tolist() == expected
    monkeypatch.undo()
    assert _dataset(world, data, max_length=256).token_lengths().tolist() != expected  # other settings, other key
    # Damaged caches (an empty or cut file, a kill mid-write on another file system) are rebuilt, not a crash.
    folder = os.path.dirname(data)
    caches = [os.path.join(folder, f) for f in os.listdir(folder) if ".lengths-" in f or f.endswith(".meta.npz")]
    assert len(caches) >= 2
    for damage in (b"", b"\x93NUMPY\x01\x00v"):
        for cache in caches:
            with open(cache, "wb") as f:
                f.write(damage)
        assert _dataset(world, data, max_length=100).token_lengths().tolist() == expected
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]  # no temp file stays behind


def test_token_lengths_are_cached_per_over_length(world, data):
    """Under --over_length skip an over-long sample counts 1 position (it is never trained), truncated it counts
    model_max_length; switching the flag reused the other setting's cached lengths to plan --packing_rows."""
    whole = _dataset(world, data, max_length=4096).token_lengths()
    truncated = _dataset(world, data, max_length=100).token_lengths()
    skipped = _dataset(world, data, max_length=100, over_length="skip").token_lengths()
    assert (whole > 100).any() and truncated.tolist() == np.minimum(whole, 100).tolist()
    assert skipped.tolist() == np.where(whole > 100, 1, whole).tolist()


def test_a_read_only_data_folder_keeps_its_caches_in_the_user_cache(world, data, tmp_path, monkeypatch):
    """They were written nowhere, so a large set was re-tokenised at every --packing_rows run."""
    import tempfile

    from palo.train import dataset as dataset_module
    from palo.train.dataset import LazySupervisedDataset

    folder = os.path.dirname(data)
    for name in os.listdir(folder):  # start without caches beside the data
        if ".lengths-" in name or name.endswith((".meta.npz", ".idx.npz")):
            os.remove(os.path.join(folder, name))
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - mirrors tempfile.mkstemp
        if os.path.abspath(dir) == folder:  # root ignores chmod: fail the way a read-only file system does
            raise OSError(30, "Read-only file system", dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = _dataset(world, data, max_length=100).token_lengths().tolist()
    assert not [f for f in os.listdir(folder) if ".lengths-" in f or f.endswith(".meta.npz")]
    monkeypatch.setattr(LazySupervisedDataset, "_compute_lengths", lambda self: pytest.fail("lengths not cached"))
    monkeypatch.setattr(dataset_module, "_map_ranges", lambda *a, **k: pytest.fail("metadata not cached"))
    assert _dataset(world, data, max_length=100).token_lengths().tolist() == expected


def test_collator_keeps_the_planned_rows_unless_one_overflows(world, data):
    dataset = _dataset(world, data)
    items = [dict(dataset[i]) for i in range(4)]
    lengths = [len(x["input_ids"]) - 1 + dataset.image_tokens * ("image" in x) for x in items]
    collator = PackedDataCollator(pad_token_id=0, max_length=sum(lengths), image_tokens=dataset.image_tokens)
    for item, row in zip(items, [1, 0, 1, 0]):
        item["pack_row"] = row
    batch = collator(items)
    assert batch["input_ids"].shape[0] == 2  # the plan: samples 0+2 and 1+3, although all four fit one row
    starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    assert starts.sum(dim=1).tolist() == [2, 2]
    collator.max_length = max(lengths[0] + lengths[2], lengths[1] + lengths[3]) - 1  # the plan no longer fits
    assert collator.planned_rows(items, [collator.spliced_length(x) for x in items]) is None
    assert collator(items)["input_ids"].shape[0] >= 2


@pytest.mark.slow
def test_packing_rows_run_trains_every_sample_each_epoch_and_resumes_identically(world, data, tmp_path):
    """Two epochs of steps of 2 planned rows; a run resumed from a checkpoint in the second epoch logs the losses
    of the uninterrupted run (the epoch's order comes from the seed and the epoch, also after a resume)."""
    flags = lambda out: _flags(world, data, str(tmp_path / out), "--packing", "True", "--packing_rows", "2",  # noqa: E731
                               "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "3",
                               "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16")
    reference = train(flags("reference"))
    sampler = reference.packed_sampler
    steps = len(sampler)
    assert steps >= 4 and reference.state.global_step == 2 * steps
    for epoch in range(2):
        assert sorted(i for step in sampler.steps(epoch) for i, _ in step) == list(range(24))
    history = _history(reference)
    assert all(len({k for k in e if k.startswith("loss_")}) >= 1 for e in history)
    assert sum(e["padding_fraction"] for e in history) / len(history) < 0.25
    checkpoint = 3 * ((steps + 1) // 3 + 1)  # a checkpoint inside the second epoch
    assert steps < checkpoint < 2 * steps, (steps, checkpoint)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "reference" / f"checkpoint-{checkpoint}", resumed / f"checkpoint-{checkpoint}")
    again = train(flags("resumed"))
    assert again.state.global_step == 2 * steps
    assert not (resumed / "checkpoint-3").exists()  # it resumed rather than started over
    assert _losses(again) == pytest.approx(_losses(reference), abs=1e-4)


def test_pack_rows_fills_a_row_exactly_to_capacity():
    """Samples whose lengths add up to exactly ``max_length`` share one row: a full row is not an overflow (two
    rows would widen the batch for nothing)."""
    assert pack_rows([4, 4], 8) == [[0, 1]]
    assert pack_rows([3, 5, 8], 8) == [[2], [1, 0]]  # 8 alone (capacity or more), then 5 + 3 exactly full
    assert pack_rows([4, 5], 8) == [[1], [0]]  # one position over: two rows


def test_packed_collator_never_trains_a_sample_on_the_one_before_it():
    """Each packed sample's first label is IGNORE_INDEX even where the item labels it, so no position learns to
    predict the next sample's first token from the previous sample's last one."""
    items = [{"input_ids": torch.tensor([11, 12, 13]), "labels": torch.tensor([11, 12, 13])},
             {"input_ids": torch.tensor([21, 22]), "labels": torch.tensor([21, 22])}]
    batch = PackedDataCollator(pad_token_id=0, max_length=8, image_tokens=0)(items)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22]]  # one row, samples back to back
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22]]
