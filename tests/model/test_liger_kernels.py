"""--use_liger_kernel: falls back with a warning where Liger cannot run; where it can, only the language-model call
after the image splice changes (checked with a stand-in liger package, since Liger's kernels need a GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

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
