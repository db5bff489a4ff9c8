"""``--use_liger_kernel True`` in real training runs: Liger's fused linear cross-entropy and RoPE kernels (run on the
CPU by Triton's interpreter, see tests/train/instrumented_train.py) train like PyTorch's kernels, also under
DeepSpeed ZeRO-3, which partitions ``lm_head``'s weight that the fused head reads without calling ``lm_head``. The
head runs inside the model's forward, as Liger's own causal-LM forward does, and there the weight is gathered (a
fused loss called outside the engine's forward would see an empty shard); the equal training shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from palo.serve.launch import free_port
from palo.testing import tiny_data
from palo.testing.triton_interpreter import ROOT, interpreter_unusable

_why_not = interpreter_unusable("liger_kernel", "deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return tiny_data.write_dataset(str(tmp_path_factory.mktemp("data")), num_samples=16)


def _train(world, data: str, out: str, *extra: str) -> list[dict]:
    """2 CPU ranks under torchrun with ZeRO-3, full fine-tuning (lm_head trained); the logged steps."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
            os.path.join(ROOT, "tests", "train", "instrumented_train.py"),
            os.path.join(ROOT, "palo", "train", "train_mem.py"),
            "--deepspeed", os.path.join(ROOT, "scripts", "zero3.json"),
            "--model_name_or_path", world.base_dir, "--version", "v1", "--data_path", data,
            "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad",
            "--output_dir", out, "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "2e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--model_max_length", "256",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--bf16", "False", "--seed", "7",
            "--dataloader_num_workers", "0", *extra]
    env = dict(os.environ, PALO_TEST_INTERPRETED_LIGER="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(os.path.join(out, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.mark.timeout(900)
def test_zero3_trains_with_the_fused_head_like_without_it(world, data, tmp_path):
    plain = _train(world, data, str(tmp_path / "plain"))
    fused = _train(world, data, str(tmp_path / "liger"), "--use_liger_kernel", "True")
    assert len(fused) == len(plain) == 2
    for key, tolerance in (("loss", 1e-4), ("grad_norm", 1e-3)):
        assert [e[key] for e in fused] == pytest.approx([e[key] for e in plain], rel=tolerance), key
    # Per-language losses come from the fused head's per-token losses (no logits there): the same values.
    for ours, theirs in zip(fused, plain):
        languages = {k for k in theirs if k.startswith("loss_")}
        assert languages and {k for k in ours if k.startswith("loss_")} == languages
        assert [ours[k] for k in sorted(languages)] == pytest.approx([theirs[k] for k in sorted(languages)], abs=2e-4)
    # The fused run really ran Liger's kernels: interpreted, it is far slower than PyTorch's.
    assert sum(e["tokens_per_second"] for e in fused) < sum(e["tokens_per_second"] for e in plain) / 3
