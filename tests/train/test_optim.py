"""Tests for the optimizer parameter groups (weight decay split and ``mm_projector_lr``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from palo.train.optim import decay_parameter_names, is_norm_module, parameter_groups


class TinyRMSNorm(nn.Module):
    """Stands in for ``LlamaRMSNorm``: a norm recognised by its class name only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class ScaledNorm2d(nn.Module):
    """A norm with a child module: parameters at any depth inside a norm are not decayed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.affine = nn.Linear(dim, dim)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.norm = TinyRMSNorm(4)
        self.deep = ScaledNorm2d(4)
        self.mm_projector = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 4, bias=False))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in groups]


DECAY = {"linear.weight", "mm_projector.0.weight", "mm_projector.3.weight", "frozen.weight"}
NO_DECAY_TRAINABLE = {"linear.bias", "ln.weight", "ln.bias", "norm.weight", "deep.affine.weight", "deep.affine.bias"}
PROJECTOR_NO_DECAY = {"mm_projector.0.bias", "mm_projector.1.weight", "mm_projector.1.bias"}


def test_norm_detection() -> None:
    assert is_norm_module(nn.LayerNorm(2))
    assert is_norm_module(TinyRMSNorm(2))
    assert is_norm_module(nn.GroupNorm(1, 2))
    assert not is_norm_module(nn.Linear(2, 2))


def test_decay_names() -> None:
    # Frozen parameters are still classified; trainability is filtered later.
    assert decay_parameter_names(Tiny()) == DECAY


def test_two_groups_without_projector_lr() -> None:
    model = Tiny()
    groups = parameter_groups(model, weight_decay=0.1, projector_lr=None)
    assert len(groups) == 2
    assert _names(model, groups) == [
        {"linear.weight", "mm_projector.0.weight", "mm_projector.3.weight"},
        NO_DECAY_TRAINABLE | PROJECTOR_NO_DECAY,
    ]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all("lr" not in g for g in groups)


def test_four_groups_with_projector_lr() -> None:
    model = Tiny()
    groups = parameter_groups(model, weight_decay=0.05, projector_lr=2e-5)
    assert _names(model, groups) == [
        {"linear.weight"},
        NO_DECAY_TRAINABLE,
        {"mm_projector.0.weight", "mm_projector.3.weight"},
        PROJECTOR_NO_DECAY,
    ]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]
    assert [g.get("lr") for g in groups] == [None, None, 2e-5, 2e-5]


def test_frozen_parameters_are_excluded_and_nothing_is_duplicated() -> None:
    model = Tiny()
    for projector_lr in (None, 1e-3):
        groups = parameter_groups(model, 0.1, projector_lr)
        params = [p for g in groups for p in g["params"]]
        assert len(params) == len({id(p) for p in params})
        assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_empty_groups_are_dropped() -> None:
    model = Tiny()
    model.mm_projector.requires_grad_(False)
    groups = parameter_groups(model, 0.1, projector_lr=2e-5)
    assert _names(model, groups) == [{"linear.weight"}, NO_DECAY_TRAINABLE]
    model.requires_grad_(False)
    assert parameter_groups(model, 0.1, projector_lr=2e-5) == []


def test_tied_parameters_appear_once() -> None:
    model = Tiny()
    model.tied = nn.Linear(4, 4, bias=False)
    model.tied.weight = model.linear.weight
    groups = parameter_groups(model, 0.1, None)
    assert sum(p is model.linear.weight for g in groups for p in g["params"]) == 1


def test_groups_drive_a_torch_optimizer() -> None:
    model = Tiny()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1, projector_lr=2e-5), lr=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1, 0.0]
    # A scheduler scales every group by the same factor, so the projector keeps its 10x smaller LR.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    del scheduler
