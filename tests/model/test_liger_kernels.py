"""--use_liger_kernel: falls back with a warning where Liger cannot run; where it can, only the language-model call
after the image splice changes (checked with a stand-in liger package), and Liger's real RoPE and fused linear
cross-entropy kernels, run on the CPU by Triton's interpreter, give PyTorch's losses and gradients."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from palo.testing.triton_interpreter import ROOT, interpreter_unusable, run_interpreted
from palo.train.arguments import parse_args

CHECK = os.path.join(ROOT, "tests", "model", "liger_check.py")
COMMON = ["--output_dir", "/tmp/unused", "--use_cpu", "True", "--report_to", "none"]


def test_cpu_run_warns_and_keeps_pytorch_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="--use_liger_kernel ignored: no CUDA device"):
        _, _, args = parse_args([*COMMON, "--use_liger_kernel", "True"])
    assert not args.palo_liger_kernel and not args.use_liger_kernel  # transformers' Trainer will not try either
    _, _, args = parse_args(COMMON)
    assert not args.palo_liger_kernel


def test_missing_package_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    from palo.model.kernels import liger_available

    usable, why = liger_available()
    assert not usable and "pip install liger-kernel" in why


def test_applied_kernels_keep_the_image_splice_and_the_per_token_losses(world, liger_stand_in):
    """With a stand-in liger package (plain PyTorch behind Liger's names): the module swaps are requested for this
    model only, evaluation keeps LLaMA's logits, and in training the fused head receives the *spliced* hidden states
    and returns the loss and per-token losses of PyTorch's cross-entropy, with no logits."""
    from palo.model.kernels import apply_liger_kernels
    from palo.testing import tiny

    model = tiny.build_palo_model(world.config, world.clip_dir, seed=1).eval()
    ids = torch.tensor([[1, 5, -200, 9, 30, 31], [1, 7, 8, 9, 10, 0]])
    labels = torch.tensor([[-100, -100, -100, 9, 30, 31], [-100, -100, 8, 9, 10, -100]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = model(input_ids=ids, images=pixels, attention_mask=mask, labels=labels)
        apply_liger_kernels(model)
        evaluated = model(input_ids=ids, images=pixels, attention_mask=mask, labels=labels)
        model.train()
        trained = model(input_ids=ids, images=pixels, attention_mask=mask, labels=labels, num_items_in_batch=16)
    calls = liger_stand_in["apply"]
    assert calls["model"] is model and calls["fused_linear_cross_entropy"] is False
    torch.testing.assert_close(evaluated.logits, expected.logits)
    assert trained.logits is None and "hidden" in liger_stand_in
    assert liger_stand_in["hidden"].shape == (2 * (5 + model.image_token_count - 1), model.config.hidden_size)
    target = expected.spliced_labels[:, 1:]
    per_token = nn.functional.cross_entropy(expected.logits[:, :-1].transpose(1, 2), target, reduction="none")
    torch.testing.assert_close(trained.token_losses, per_token)
    assert trained.token_losses[target == -100].eq(0).all()
    torch.testing.assert_close(trained.loss, per_token.sum() / 16)  # the Trainer's count, as transformers' loss


@pytest.mark.skipif(interpreter_unusable("liger_kernel") is not None, reason=interpreter_unusable("liger_kernel") or "")
def test_real_liger_rope_and_fused_cross_entropy_keep_losses_and_gradients(tmp_path):
    """Liger's own RoPE and fused linear cross-entropy kernels, run by Triton's interpreter, inside PALO's forward.

    A padded batch (one image) and a packed batch (positions restarting per sample), with ``num_items_in_batch`` as
    the Trainer passes it under gradient accumulation: the loss, the per-token losses (what ``loss_<language>`` is
    computed from) and every gradient equal PyTorch's kernels'. The interpreter cannot run Liger's RMSNorm and
    SwiGLU kernels (their scalar arguments), so those two modules keep PyTorch's here; on CUDA all four are Liger's.
    """
    out = run_interpreted(f"""
        import runpy, sys
        from palo.testing.triton_interpreter import interpretable_liger
        interpretable_liger()
        sys.argv = ["liger_check.py", "cpu", "1e-5", "1e-6"]
        runpy.run_path({CHECK!r}, run_name="__main__")
    """, cwd=str(tmp_path))
    assert out.count("equal") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a CUDA device and liger-kernel")
def test_all_four_liger_kernels_on_cuda_keep_losses_and_gradients(tmp_path):
    """The same check with every kernel Liger's (RMSNorm and SwiGLU too), compiled for the GPU, float32."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, CHECK, "cuda", "1e-4", "1e-5"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("equal") == 2
