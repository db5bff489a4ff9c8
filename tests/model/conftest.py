"""Fixtures shared by the model tests."""

from __future__ import annotations

import sys
import types

import pytest
from torch import nn


@pytest.fixture
def liger_stand_in(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in ``liger_kernel`` package: plain PyTorch behind Liger's names, so the code that drives Liger runs on
    any CPU. Returns a record: ``apply`` (the arguments of ``apply_liger_kernel_to_llama``) and ``hidden`` (what the
    fused head was last given)."""
    record: dict = {"apply": {}}

    def apply_liger_kernel_to_llama(**kwargs):
        record["apply"].update(kwargs)

    class LigerFusedLinearCrossEntropyLoss:
        def __init__(self, ignore_index, reduction):
            self.ignore_index, self.reduction = ignore_index, reduction

        def __call__(self, weight, hidden, target, bias=None):
            record["hidden"] = hidden
            return nn.functional.cross_entropy(nn.functional.linear(hidden, weight, bias), target,
                                               ignore_index=self.ignore_index, reduction=self.reduction)

    package = types.ModuleType("liger_kernel")
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    transformers_module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    return record
