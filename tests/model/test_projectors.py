"""Unit tests for the projector registry and the LDP v1 projector (CPU, float32, tiny widths)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from palo.model.ldp import LayerNorm2d, LDPNetProjector, ldp_num_tokens, make_divisible
from palo.model.projectors import SUPPORTED_PROJECTORS, build_projector, projector_num_tokens


def _ldp_expected_shapes(inc: int, ouc: int) -> dict[str, list[int]]:
    """The key -> shape table of docs/formats.md §1.4, in order."""
    sq = make_divisible(ouc // 4, 8)
    shapes = {
        "model.mlp.1.weight": [ouc, inc],
        "model.mlp.1.bias": [ouc],
        "model.mlp.3.weight": [ouc, ouc],
        "model.mlp.3.bias": [ouc],
    }
    for i in (1, 2):
        p = f"model.mb_block.{i}.block"
        shapes |= {
            f"{p}.0.0.weight": [ouc, 1, 3, 3],
            f"{p}.0.1.weight": [ouc],
            f"{p}.0.1.bias": [ouc],
            f"{p}.1.fc1.weight": [sq, ouc, 1, 1],
            f"{p}.1.fc1.bias": [sq],
            f"{p}.1.fc2.weight": [ouc, sq, 1, 1],
            f"{p}.1.fc2.bias": [ouc],
            f"{p}.2.0.weight": [ouc, ouc, 1, 1],
            f"{p}.2.1.weight": [ouc],
            f"{p}.2.1.bias": [ouc],
        }
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# LDP: names, shapes, counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldp_full_size() -> nn.Module:
    # The meta device gives real names and shapes without allocating the ~76 MB of weights.
    with torch.device("meta"):
        return build_projector("ldpnet", 1024, 2048)


def test_ldp_parameter_names_and_shapes_match_spec(ldp_full_size: nn.Module) -> None:
    params = {name: list(p.shape) for name, p in ldp_full_size.named_parameters()}
    expected = _ldp_expected_shapes(1024, 2048)
    assert len(params) == 24
    assert list(params) == list(expected)
    assert params == expected
    assert expected["model.mb_block.1.block.1.fc1.weight"] == [512, 2048, 1, 1]


def test_ldp_state_dict_has_no_buffers(ldp_full_size: nn.Module) -> None:
    assert list(ldp_full_size.buffers()) == []
    assert set(ldp_full_size.state_dict()) == set(_ldp_expected_shapes(1024, 2048))


def test_ldp_total_parameter_count(ldp_full_size: nn.Module) -> None:
    assert sum(p.numel() for p in ldp_full_size.parameters()) == 18_936_832


def test_ldp_small_state_dict_shapes() -> None:
    model = build_projector("ldpnet", 16, 32)
    assert isinstance(model, LDPNetProjector)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == _ldp_expected_shapes(16, 32)


@pytest.mark.parametrize(("ouc", "sq"), [(2048, 512), (4096, 1024), (5120, 1280), (2560, 640)])
def test_squeeze_width(ouc: int, sq: int) -> None:
    assert make_divisible(ouc // 4, 8) == sq
    with torch.device("meta"):
        model = LDPNetProjector(8, ouc)
    assert model.model.mb_block[1].block[1].fc1.out_channels == sq


def test_make_divisible_rounding_rule() -> None:
    assert make_divisible(3, 8) == 8  # floor at the divisor
    assert make_divisible(12, 8) == 16  # rounds half up
    assert make_divisible(20, 8) == 24  # nearest multiple
    assert make_divisible(100, 8) == 104
    assert make_divisible(11, 8) == 16  # 8 would lose more than 10% of 11, so one step up
    # 0.9 rule: rounding 44 to the nearest multiple of 32 (32) would drop over 10%, so go one step up.
    assert make_divisible(44, 32) == 64


# ---------------------------------------------------------------------------------------------------------------
# LDP: forward
# ---------------------------------------------------------------------------------------------------------------


def test_ldp_576_tokens_become_144() -> None:
    torch.manual_seed(0)
    model = build_projector("ldpnet", 16, 32)
    out = model(torch.randn(2, 576, 16))
    assert out.shape == (2, 144, 32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(("n", "n_out"), [(576, 144), (25, 9), (16, 4), (1, 1)])
def test_ldp_token_count_matches_forward(n: int, n_out: int) -> None:
    model = build_projector("ldpnet", 8, 16)
    assert model(torch.randn(1, n, 8)).shape == (1, n_out, 16)
    assert ldp_num_tokens(n) == n_out
    assert projector_num_tokens("ldpnet", n) == n_out


def test_ldp_non_square_tokens_raise() -> None:
    model = build_projector("ldpnet", 16, 32)
    with pytest.raises(ValueError, match="mm_vision_select_feature='patch'"):
        model(torch.randn(1, 577, 16))
    with pytest.raises(ValueError, match="577"):
        projector_num_tokens("ldpnet", 577)


def test_layernorm2d_normalises_channels_per_pixel() -> None:
    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    x = torch.randn(2, 6, 3, 5)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)
    assert norm.eps == 1e-5


def _reference_ldp(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """LDP v1 written from the spec with functional ops only, reading weights by their checkpoint names."""
    b, n, _ = x.shape
    h = math.isqrt(n)
    y = F.linear(x, sd["model.mlp.1.weight"], sd["model.mlp.1.bias"])
    y = F.gelu(y)
    y = F.linear(y, sd["model.mlp.3.weight"], sd["model.mlp.3.bias"])
    c = y.shape[-1]
    # Token t sits at row t // h, column t % h.
    grid = torch.empty(b, c, h, h)
    for t in range(n):
        grid[:, :, t // h, t % h] = y[:, t, :]

    def ln(z: torch.Tensor, prefix: str) -> torch.Tensor:
        z = F.layer_norm(z.permute(0, 2, 3, 1), (c,), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)
        return z.permute(0, 3, 1, 2)

    for i, stride in ((1, 1), (2, 2)):
        p = f"model.mb_block.{i}.block"
        z = F.conv2d(grid, sd[f"{p}.0.0.weight"], stride=stride, padding=1, groups=c)
        z = F.hardswish(ln(z, f"{p}.0.1"))
        s = F.adaptive_avg_pool2d(z, 1)
        s = F.relu(F.conv2d(s, sd[f"{p}.1.fc1.weight"], sd[f"{p}.1.fc1.bias"]))
        s = F.hardsigmoid(F.conv2d(s, sd[f"{p}.1.fc2.weight"], sd[f"{p}.1.fc2.bias"]))
        z = z * s
        z = ln(F.conv2d(z, sd[f"{p}.2.0.weight"]), f"{p}.2.1")
        grid = z + grid if stride == 1 else z

    side = grid.shape[-1]
    out = torch.empty(b, side * side, c)
    for r in range(side):
        for col in range(side):
            out[:, r * side + col, :] = grid[:, :, r, col]
    return out


@pytest.mark.parametrize("n", [576, 49])
def test_ldp_matches_functional_reference(n: int) -> None:
    torch.manual_seed(0)
    model = build_projector("ldpnet", 16, 32).eval()
    # Default LayerNorm init is weight 1 / bias 0; randomise so the affine parameters are exercised too.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerNorm2d):
                module.weight.copy_(1.0 + 0.5 * torch.randn_like(module.weight))
                module.bias.copy_(torch.randn_like(module.bias))
    x = torch.randn(2, n, 16)
    sd = model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_ldp(x, sd))


def test_ldp_reference_is_sensitive_to_layout() -> None:
    # Guard that the parity test can fail: a transposed grid gives a different answer.
    torch.manual_seed(0)
    model = build_projector("ldpnet", 4, 8).eval()
    x = torch.randn(1, 16, 4)
    x_t = x.view(1, 4, 4, 4).transpose(1, 2).reshape(1, 16, 4)
    with torch.no_grad():
        assert not torch.allclose(model(x), _reference_ldp(x_t, model.state_dict()))


# ---------------------------------------------------------------------------------------------------------------
# Registry: linear / mlp / identity
# ---------------------------------------------------------------------------------------------------------------


def test_linear_keys_and_shapes() -> None:
    model = build_projector("linear", 12, 20)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {"weight": (20, 12), "bias": (20,)}
    assert model(torch.randn(2, 5, 12)).shape == (2, 5, 20)


def test_mlp2x_gelu_keys_and_shapes() -> None:
    model = build_projector("mlp2x_gelu", 12, 20)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        "0.weight": (20, 12),
        "0.bias": (20,),
        "2.weight": (20, 20),
        "2.bias": (20,),
    }
    assert isinstance(model[1], nn.GELU) and model[1].approximate == "none"
    assert model(torch.randn(2, 5, 12)).shape == (2, 5, 20)


def test_mlp2x_gelu_forward_matches_functional() -> None:
    torch.manual_seed(0)
    model = build_projector("mlp2x_gelu", 12, 20)
    x = torch.randn(2, 5, 12)
    expected = F.linear(F.gelu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
    torch.testing.assert_close(model(x), expected)


def test_mlp3x_gelu_linear_at_even_indices() -> None:
    model = build_projector("mlp3x_gelu", 12, 20)
    assert len(model) == 5
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert sorted(model.state_dict()) == sorted(f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))


def test_mlp1x_gelu_is_a_single_linear_in_a_sequential() -> None:
    model = build_projector("mlp1x_gelu", 12, 20)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]


def test_identity_returns_input() -> None:
    model = build_projector("identity", 16, 16)
    x = torch.randn(2, 5, 16)
    assert model(x) is x
    assert list(model.parameters()) == []


def test_identity_with_mismatched_widths_raises() -> None:
    with pytest.raises(ValueError, match="mm_hidden_size == hidden_size"):
        build_projector("identity", 16, 32)


@pytest.mark.parametrize("name", ["ldpnetv2", "mlp_gelu", "linearx", "", "mlp0x_gelu", "mlp2x_gelu\n", "LINEAR"])
def test_unknown_types_raise_and_name_supported(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_projector(name, 16, 16)
    if name != "mlp0x_gelu":
        for supported in SUPPORTED_PROJECTORS:
            assert supported in str(info.value)
    with pytest.raises(ValueError):
        projector_num_tokens(name, 576)


def test_supported_projectors_listed() -> None:
    assert set(SUPPORTED_PROJECTORS) == {"linear", "mlp{N}x_gelu", "identity", "ldpnet"}


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
@pytest.mark.parametrize("n", [576, 577])
def test_token_counts_preserving_types(name: str, n: int) -> None:
    assert projector_num_tokens(name, n) == n
    model = build_projector(name, 16, 16)
    assert model(torch.randn(1, n, 16)).shape == (1, projector_num_tokens(name, n), 16)


def test_token_count_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        projector_num_tokens("linear", 0)
