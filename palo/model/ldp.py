"""MobileVLM's Lightweight Downsample Projector (LDP, v1) in plain torch.

The projector used by MobilePALO (``mm_projector_type = "ldpnet"``). It maps CLIP patch features to the LLM's
width with an MLP, lays the tokens out on their square grid and runs two MobileNetV3 inverted-residual blocks;
the second one has stride 2, so 24x24 = 576 patch tokens become 12x12 = 144 LLM positions.

Written in plain torch (no timm / torchvision; see docs/compat.md#loading), with attribute names chosen so that the
state dict has the checkpoint key names of docs/formats.md §1.4 (``model.mlp.1.weight``,
``model.mb_block.1.block.0.0.weight``, ...): MobileVLM-1.x and MobilePALO projector weights load without remapping.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "InvertedResidual",
    "LDPNet",
    "LDPNetProjector",
    "LayerNorm2d",
    "SqueezeExcitation",
    "ldp_num_tokens",
    "make_divisible",
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds ``value`` to the nearest multiple of ``divisor`` without going more than 10% below it.

    This is the MobileNet channel-rounding rule; it fixes the squeeze-excitation width, so it must match the
    original bit for bit or the checkpoint shapes differ.

    Args:
        value: The width to round.
        divisor: The multiple to round to.
        min_value: The smallest result allowed; defaults to ``divisor``.

    Returns:
        The rounded width, e.g. 512 for ``make_divisible(2048 // 4)``.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    # Rounding down must not remove more than 10% of the channels.
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor.

    Equivalent to timm's ``LayerNormAct2d`` with no activation. Subclassing ``nn.LayerNorm`` keeps the
    parameter names ``weight`` and ``bias`` of the original.

    Args:
        num_channels: C, the normalised dimension.
        eps: Added to the variance for numerical stability.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises each pixel's channel vector.

        Args:
            x: [B, C, H, W].

        Returns:
            [B, C, H, W].
        """
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): LayerNorm works on the last dimension
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool, squeeze to ``squeeze_channels``, excite back, gate the input.

    Attribute names ``fc1`` and ``fc2`` are those of torchvision's ``SqueezeExcitation`` and appear in the
    checkpoint keys.

    Args:
        channels: C, the input and output width.
        squeeze_channels: The bottleneck width.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scales each channel of ``x`` by a gate in [0, 1] computed from the whole feature map.

        Args:
            x: [B, C, H, W].

        Returns:
            [B, C, H, W].
        """
        scale = self.avgpool(x)  # (B, C, 1, 1)
        scale = self.fc2(self.activation(self.fc1(scale)))
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    """A MobileNetV3 inverted-residual block whose expanded width equals its input width.

    Because the expansion is 1, there is no expand conv, and ``block`` holds exactly three stages:
    ``block.0`` = (depthwise 3x3 conv, LayerNorm2d, Hardswish), ``block.1`` = squeeze-excitation,
    ``block.2`` = (pointwise 1x1 conv, LayerNorm2d). This nesting mirrors torchvision's
    ``InvertedResidual`` so that keys read ``block.0.0.weight``, ``block.1.fc1.weight``, ``block.2.1.bias``.

    Args:
        channels: C, the width in and out.
        stride: Stride of the depthwise conv (1 or 2).
        squeeze_channels: Width of the squeeze-excitation bottleneck.
    """

    def __init__(self, channels: int, stride: int, squeeze_channels: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        # The residual only exists where shapes agree: stride 1 and equal widths (always equal here).
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(
                # Depthwise: one 3x3 filter per channel; the norm makes a bias redundant.
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                LayerNorm2d(channels),
                nn.Hardswish(),
            ),
            SqueezeExcitation(channels, squeeze_channels),
            nn.Sequential(
                nn.Conv2d(channels, channels, 1, bias=False),
                LayerNorm2d(channels),
                # No activation: the projection stage of an inverted residual is linear.
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block.

        Args:
            x: [B, C, H, W].

        Returns:
            [B, C, H, W] for stride 1, [B, C, ceil(H/2), ceil(W/2)] for stride 2.
        """
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


def ldp_num_tokens(num_patches: int) -> int:
    """Returns how many tokens LDP v1 produces from ``num_patches`` input tokens.

    The stride-2 3x3 conv with padding 1 maps a side of h to floor((h - 1) / 2) + 1 = ceil(h / 2).

    Args:
        num_patches: N, the number of input tokens; must be a positive perfect square.

    Returns:
        ceil(h / 2) ** 2 where h = sqrt(N), e.g. 144 for 576.

    Raises:
        ValueError: If ``num_patches`` is not a positive perfect square.
    """
    side = _grid_side(num_patches)
    return ((side + 1) // 2) ** 2


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    if side == 0 or side * side != num_tokens:
        raise ValueError(
            f"The ldpnet projector needs a square grid of image tokens, got {num_tokens}, which is not a "
            "perfect square. Use mm_vision_select_feature='patch': 'cls_patch' adds the CLS token "
            "(e.g. 577 = 24*24 + 1 positions)."
        )
    return side


class LDPNet(nn.Module):
    """The LDP v1 network: token MLP followed by two inverted-residual blocks on the token grid.

    ``mlp`` and ``mb_block`` start with an ``nn.Identity`` because the original does; it shifts the
    parameterised layers to indices 1 and 3 (``mlp``) and 1 and 2 (``mb_block``), which the checkpoint keys record.

    Args:
        mm_hidden_size: inc, the vision feature width.
        hidden_size: ouc, the LLM width.
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        # The original also rounds ouc with make_divisible(ouc, 8); that only changes widths that are not
        # multiples of 8, where the original's MLP and blocks would disagree and fail. Using ouc as is
        # agrees with it wherever it works.
        squeeze = make_divisible(hidden_size // 4, 8)
        self.mlp = nn.Sequential(
            nn.Identity(),
            nn.Linear(mm_hidden_size, hidden_size),
            nn.GELU(),  # exact (erf) GELU
            nn.Linear(hidden_size, hidden_size),
        )
        self.mb_block = nn.Sequential(
            nn.Identity(),
            InvertedResidual(hidden_size, stride=1, squeeze_channels=squeeze),
            InvertedResidual(hidden_size, stride=2, squeeze_channels=squeeze),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projects and downsamples image tokens.

        Args:
            x: [B, N, inc] with N = h * h, tokens in row-major grid order.

        Returns:
            [B, ceil(h/2) ** 2, ouc], tokens in row-major grid order.

        Raises:
            ValueError: If ``x`` is not 3-D or N is not a perfect square.
        """
        if x.dim() != 3:
            raise ValueError(f"ldpnet expects image features of shape [B, N, C], got {tuple(x.shape)}")
        batch, num_tokens, _ = x.shape
        side = _grid_side(num_tokens)
        x = self.mlp(x)  # (B, N, ouc)
        # Channels first, then tokens fill the h x h grid row by row.
        x = x.transpose(1, 2).reshape(batch, -1, side, side)  # (B, ouc, h, h)
        x = self.mb_block(x)  # (B, ouc, ceil(h/2), ceil(h/2))
        return x.flatten(2).transpose(1, 2)  # (B, ceil(h/2)^2, ouc), row-major


class LDPNetProjector(nn.Module):
    """The ``ldpnet`` projector: a thin wrapper whose only child is ``model``.

    The wrapper exists for checkpoint compatibility: the original stores the network under an attribute
    ``model``, so every key starts with ``model.`` (``model.mm_projector.model.mlp.1.weight`` in a full
    checkpoint). The module has 24 parameters and no buffers.

    Args:
        mm_hidden_size: inc, the vision feature width (1024 for CLIP ViT-L/14).
        hidden_size: ouc, the LLM width (2048 for MobileLLaMA-1.4B).
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.model = LDPNet(mm_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps image features to LLM embeddings, quartering the token count.

        Args:
            x: [B, N, inc] with N a perfect square (576 for CLIP-L/336 patch features).

        Returns:
            [B, ceil(sqrt(N)/2) ** 2, ouc] (144 for N = 576).

        Raises:
            ValueError: If N is not a perfect square (e.g. 577 with the CLS token).
        """
        return self.model(x)
