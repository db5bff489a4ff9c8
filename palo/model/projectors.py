"""The projector registry: ``mm_projector_type`` -> the module that maps vision features to LLM embeddings.

Every projector maps image features [B, N, mm_hidden_size] to LLM inputs [B, N', hidden_size]. The type
names, and the parameter names of the modules they build, are those of the original PALO / LLaVA /
MobileVLM checkpoints, so projector weights load without remapping:

- ``linear``: one ``nn.Linear``; keys ``weight``, ``bias``.
- ``mlp{N}x_gelu`` (N >= 1): ``nn.Sequential`` of Linear, then (GELU, Linear) N - 1 times; Linear layers sit
  at even indices (``mlp2x_gelu``: ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``).
- ``identity``: no parameters; needs mm_hidden_size == hidden_size.
- ``ldpnet``: MobileVLM's LDP v1 (see :mod:`palo.model.ldp`), 4x fewer tokens.

All types live in one table, :data:`_REGISTRY`; both :func:`build_projector` and :func:`projector_num_tokens`
resolve names through it, so the module built and the token count reported cannot disagree.

Names are matched exactly: ``ldpnetv2`` or any other unknown name is an error (see docs/compat.md#loading).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from palo.model.ldp import LDPNetProjector, ldp_num_tokens

__all__ = ["SUPPORTED_PROJECTORS", "build_projector", "check_projector_type", "projector_num_tokens"]


@dataclass(frozen=True)
class _ProjectorSpec:
    """One registry entry.

    Attributes:
        display_name: How the type is shown to users (a pattern such as ``mlp{N}x_gelu`` for families).
        pattern: Regex that must match the whole type name; its groups are passed to ``build``.
        build: ``(match, mm_hidden_size, hidden_size) -> module``.
        num_tokens: ``(match, num_patches) -> LLM positions per image``.
    """

    display_name: str
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str], int, int], nn.Module]
    num_tokens: Callable[[re.Match[str], int], int]


def _build_linear(match: re.Match[str], mm_hidden_size: int, hidden_size: int) -> nn.Module:
    return nn.Linear(mm_hidden_size, hidden_size)


def _mlp_depth(match: re.Match[str]) -> int:
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"mlp{{N}}x_gelu needs N >= 1, got {match.group(0)!r}")
    return depth


def _build_mlp_gelu(match: re.Match[str], mm_hidden_size: int, hidden_size: int) -> nn.Module:
    depth = _mlp_depth(match)
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(depth - 1):
        # Exact (erf) GELU, as in the original; the tanh approximation would change outputs.
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


def _build_identity(match: re.Match[str], mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if mm_hidden_size != hidden_size:
        raise ValueError(
            "The identity projector needs mm_hidden_size == hidden_size, got "
            f"mm_hidden_size={mm_hidden_size} and hidden_size={hidden_size}; use 'linear' or 'mlp2x_gelu' instead."
        )
    return nn.Identity()


def _build_ldpnet(match: re.Match[str], mm_hidden_size: int, hidden_size: int) -> nn.Module:
    return LDPNetProjector(mm_hidden_size, hidden_size)


def _same_count(match: re.Match[str], num_patches: int) -> int:
    return num_patches


def _mlp_count(match: re.Match[str], num_patches: int) -> int:
    _mlp_depth(match)  # reject mlp0x_gelu here too, so counting and building agree on what is valid
    return num_patches


def _ldp_count(match: re.Match[str], num_patches: int) -> int:
    return ldp_num_tokens(num_patches)


# re.ASCII keeps \d to 0-9, so exotic Unicode digits do not make valid-looking names.
_REGISTRY: tuple[_ProjectorSpec, ...] = (
    _ProjectorSpec("linear", re.compile(r"linear"), _build_linear, _same_count),
    _ProjectorSpec("mlp{N}x_gelu", re.compile(r"mlp(\d+)x_gelu", re.ASCII), _build_mlp_gelu, _mlp_count),
    _ProjectorSpec("identity", re.compile(r"identity"), _build_identity, _same_count),
    _ProjectorSpec("ldpnet", re.compile(r"ldpnet"), _build_ldpnet, _ldp_count),
)

#: The supported ``mm_projector_type`` values; ``mlp{N}x_gelu`` stands for any N >= 1.
SUPPORTED_PROJECTORS: tuple[str, ...] = tuple(spec.display_name for spec in _REGISTRY)


def _resolve(projector_type: str) -> tuple[_ProjectorSpec, re.Match[str]]:
    if isinstance(projector_type, str):
        for spec in _REGISTRY:
            # fullmatch, not match/search: prefixes and suffixes (``ldpnetv2``, ``linearx``) are rejected.
            match = spec.pattern.fullmatch(projector_type)
            if match is not None:
                return spec, match
    raise ValueError(
        f"Unknown mm_projector_type {projector_type!r}; supported types are: {', '.join(SUPPORTED_PROJECTORS)} "
        "(mlp{N}x_gelu for any N >= 1, e.g. mlp2x_gelu)."
    )


def check_projector_type(projector_type: str) -> None:
    """Refuse a ``mm_projector_type`` that names no projector (before anything is built or loaded).

    Raises:
        ValueError: Naming the supported types.
    """
    _resolve(projector_type)


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Builds the projector named by a config's ``mm_projector_type``.

    Args:
        projector_type: One of :data:`SUPPORTED_PROJECTORS`, e.g. ``"mlp2x_gelu"`` or ``"ldpnet"``.
        mm_hidden_size: Width of the vision features (1024 for CLIP ViT-L/14).
        hidden_size: Width of the LLM embeddings.

    Returns:
        A module mapping [B, N, mm_hidden_size] to [B, N', hidden_size], where N' is
        ``projector_num_tokens(projector_type, N)``.

    Raises:
        ValueError: If the type is unknown, or ``identity`` is asked for with different widths.
    """
    spec, match = _resolve(projector_type)
    return spec.build(match, mm_hidden_size, hidden_size)


def projector_num_tokens(projector_type: str, num_patches: int) -> int:
    """Returns how many LLM positions one image occupies after the projector.

    Args:
        projector_type: One of :data:`SUPPORTED_PROJECTORS`.
        num_patches: N, the number of vision tokens fed to the projector (576 for CLIP-L/336 patches,
            577 with ``cls_patch``).

    Returns:
        N for ``linear``, ``mlp{N}x_gelu`` and ``identity``; ceil(sqrt(N) / 2) ** 2 for ``ldpnet``
        (576 -> 144).

    Raises:
        ValueError: If the type is unknown, ``num_patches`` is not positive, or ``ldpnet`` gets a
            non-square count.
    """
    spec, match = _resolve(projector_type)
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    return spec.num_tokens(match, num_patches)
