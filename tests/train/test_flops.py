"""The MFU denominator: each GPU's dense bf16 peak, the board variant's own where it differs."""

from __future__ import annotations

import pytest
import torch

from palo.train import flops


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_by_device_name(monkeypatch, name, tflops):
    monkeypatch.delenv("PALO_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = flops.peak_flops(torch.device("cuda"))
    assert peak == (None if tflops is None else tflops * 1e12)


def test_peak_flops_from_the_environment_and_none_on_cpu(monkeypatch):
    monkeypatch.setenv("PALO_PEAK_TFLOPS", "100")
    assert flops.peak_flops(torch.device("cpu")) == 100e12
    monkeypatch.delenv("PALO_PEAK_TFLOPS")
    assert flops.peak_flops(torch.device("cpu")) is None
