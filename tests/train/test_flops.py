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


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "ldpnet"])
def test_the_projector_is_counted_on_the_rows_it_runs_on(world, projector_type):
    """LDP runs its MLP on every patch row and its convolutions before pooling to a quarter of them; counted as
    "weights x output rows" it came out at 1/18 of torch's own count at tiny size (34 GFLOP per image missing at
    MobilePALO's). Counted now as torch counts the real projector's forward (and three times that trained)."""
    from torch.utils.flop_counter import FlopCounterMode

    from palo.testing import tiny

    config = tiny.palo_config_dict(tiny.tiny_llama_config(1000), world.clip_dir, projector_type=projector_type)
    model = tiny.build_palo_model(config, world.clip_dir, seed=3)
    tower, projector = model.get_model().vision_tower, model.get_model().mm_projector
    rows = torch.zeros(1, tower.num_tokens, model.config.mm_hidden_size)
    with FlopCounterMode(display=False) as counted:
        projector(rows)
    forward = counted.get_total_flops()
    trained = flops.FlopCounter.of(model).image_flops
    projector.requires_grad_(False)
    frozen = flops.FlopCounter.of(model).image_flops
    assert trained - frozen == forward  # trained 3x its forward, frozen 2x: the difference is one forward
    weights_times_outputs = 2 * sum(m.in_features * m.out_features for m in projector.modules()
                                    if isinstance(m, torch.nn.Linear)) * model.image_token_count
    assert (forward == weights_times_outputs) == (projector_type == "mlp2x_gelu")
