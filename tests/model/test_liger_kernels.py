"""--use_liger_kernel: falls back with a warning where Liger cannot run; where it can, only the language-model call
after the image splice changes (checked with a stand-in liger package), and Liger's real RoPE and fused linear
cross-entropy kernels, run on the CPU by Triton's interpreter, give PyTorch's losses and gradients."""

from __future__ import annotations

import sys
import types

import pytest
import torch

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


def test_applied_kernels_keep_the_image_splice(world, monkeypatch):
    """The stand-in records the call and supplies a fused forward that must receive the *spliced* embeddings."""
    calls: dict = {}
    seen: dict = {}

    def apply_liger_kernel_to_llama(**kwargs):
        calls.update(kwargs)

    def lce_forward(self, **kwargs):
        seen.update(kwargs)
        return type(self).__mro__[1].forward(self, **kwargs)  # LlamaForCausalLM's, as the real one computes

    package = types.ModuleType("liger_kernel")
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    model_module = types.ModuleType("liger_kernel.transformers.model")
    llama_module = types.ModuleType("liger_kernel.transformers.model.llama")
    llama_module.lce_forward = lce_forward
    for name, module in [("liger_kernel", package), ("liger_kernel.transformers", transformers_module),
                         ("liger_kernel.transformers.model", model_module),
                         ("liger_kernel.transformers.model.llama", llama_module)]:
        monkeypatch.setitem(sys.modules, name, module)
    from palo.model.kernels import apply_liger_kernels
    from palo.testing import tiny

    model = tiny.build_palo_model(world.config, world.clip_dir, seed=1).eval()
    ids = torch.tensor([[1, 5, -200, 9, 30]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = model(input_ids=ids, images=pixels).logits
        apply_liger_kernels(model)
        got = model(input_ids=ids, images=pixels).logits
    assert calls["model"] is model and calls["fused_linear_cross_entropy"] is False
    assert seen["input_ids"] is None and seen["inputs_embeds"].shape[1] == 4 + model.image_token_count
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(interpreter_unusable("liger_kernel") is not None, reason=interpreter_unusable("liger_kernel") or "")
def test_real_liger_rope_and_fused_cross_entropy_keep_losses_and_gradients(tmp_path):
    """Liger's own RoPE and fused linear cross-entropy kernels, run by Triton's interpreter, inside PALO's forward.

    A padded batch (one image) and a packed batch (positions restarting per sample), with ``num_items_in_batch`` as
    the Trainer passes it under gradient accumulation: the loss and every gradient equal PyTorch's kernels'. The
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
            return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        reference = [run(padded), run(packed)]
        rope = modeling_llama.apply_rotary_pos_emb
        apply_liger_kernels(model)
        assert modeling_llama.apply_rotary_pos_emb is not rope  # Liger's RoPE kernel is the one running now
        for batch, (loss, grads) in zip((padded, packed), reference):
            fused_loss, fused_grads = run(batch)
            torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
            assert fused_grads.keys() == grads.keys() and len(grads) > 20
            for name in grads:
                torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)
            print("equal", float(loss), float(fused_loss))
        assert model(**packed).logits is None  # the fused head never built the [tokens x vocabulary] logits
    """, cwd=str(tmp_path))
    assert out.count("equal") == 2
