"""--use_liger_kernel: falls back with a warning where Liger cannot run; where it can, only the language-model call
after the image splice changes (checked with a stand-in liger package), and Liger's real RoPE and fused linear
cross-entropy kernels, run on the CPU by Triton's interpreter, give PyTorch's losses and gradients."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from palo.testing.triton_interpreter import interpreter_unusable, run_interpreted
from palo.train.arguments import parse_args

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


def test_applied_kernels_keep_the_image_splice_and_the_per_token_losses(world, monkeypatch):
    """With a stand-in liger package (plain PyTorch behind Liger's names): the module swaps are requested for this
    model only, evaluation keeps LLaMA's logits, and in training the fused head receives the *spliced* hidden states
    and returns the loss and per-token losses of PyTorch's cross-entropy, with no logits."""
    calls: dict = {}
    seen: dict = {}

    def apply_liger_kernel_to_llama(**kwargs):
        calls.update(kwargs)

    class LigerFusedLinearCrossEntropyLoss:
        def __init__(self, ignore_index, reduction):
            self.ignore_index, self.reduction = ignore_index, reduction

        def __call__(self, weight, hidden, target, bias=None):
            seen["hidden"] = hidden
            return nn.functional.cross_entropy(nn.functional.linear(hidden, weight, bias), target,
                                               ignore_index=self.ignore_index, reduction=self.reduction)

    package = types.ModuleType("liger_kernel")
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    transformers_module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
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
    assert calls["model"] is model and calls["fused_linear_cross_entropy"] is False
    torch.testing.assert_close(evaluated.logits, expected.logits)
    assert trained.logits is None and "hidden" in seen
    assert seen["hidden"].shape == (2 * (5 + model.image_token_count - 1), model.config.hidden_size)
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
    computed from) and every gradient equal PyTorch's kernels'. The
    interpreter cannot run Liger's RMSNorm and SwiGLU kernels (their scalar arguments), so those two modules keep
    PyTorch's here; on CUDA all four are Liger's.
    """
    out = run_interpreted("""
        import torch
        import liger_kernel.transformers.monkey_patch as monkey_patch
        from transformers.models.llama import modeling_llama
        from palo.constants import IGNORE_INDEX
        from palo.model.kernels import apply_liger_kernels
        from palo.testing import tiny

        monkey_patch._patch_rms_norm_module = lambda *a, **k: None
        monkey_patch._patch_swiglu_module = lambda *a, **k: None
        config = tiny.palo_config_dict(tiny.tiny_llama_config(300), tiny.save_tiny_clip("clip"))
        model = tiny.build_palo_model(config, "clip", seed=1).train()
        torch.manual_seed(0)
        pixels = torch.randn(1, 3, 56, 56)
        ids = torch.tensor([[1, 5, -200, 9, 30, 44, 12, 7], [1, 8, 9, 10, 11, 12, 13, 0]])
        labels = ids.clone()
        labels[:, :3] = IGNORE_INDEX
        labels[1, -1] = IGNORE_INDEX
        padded = dict(input_ids=ids, labels=labels, attention_mask=(labels != IGNORE_INDEX) | (ids != 0),
                      images=pixels, num_items_in_batch=torch.tensor(16))  # 9 targets here: as in accumulation
        packed_ids = torch.tensor([[1, 5, -200, 9, 30, 44, 12, 7, 1, 8, 9, 10, 11, 12, 13]])
        packed_labels = packed_ids.clone()
        packed_labels[0, :3] = IGNORE_INDEX
        packed_labels[0, 8:11] = IGNORE_INDEX
        packed = dict(input_ids=packed_ids, labels=packed_labels, images=pixels, packed=True,
                      attention_mask=torch.ones_like(packed_ids),
                      position_ids=torch.tensor([list(range(8)) + list(range(7))]))

        def run(batch):
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            if out.logits is None:  # the fused head never built the [tokens x vocabulary] logits
                return out.loss.detach(), grads, out.token_losses.detach()
            target = out.spliced_labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(out.logits[:, :-1].detach().transpose(1, 2), target,
                                                          reduction="none")
            return out.loss.detach(), grads, per_token

        reference = [run(padded), run(packed)]
        rope = modeling_llama.apply_rotary_pos_emb
        apply_liger_kernels(model)
        assert modeling_llama.apply_rotary_pos_emb is not rope  # Liger's RoPE kernel is the one running now
        for batch, (loss, grads, per_token) in zip((padded, packed), reference):
            fused_loss, fused_grads, token_losses = run(batch)
            torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(token_losses, per_token, rtol=1e-5, atol=1e-6)  # for loss_<language>
            assert fused_grads.keys() == grads.keys() and len(grads) > 20
            for name in grads:
                torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)
            print("equal", float(loss), float(fused_loss))
    """, cwd=str(tmp_path))
    assert out.count("equal") == 2
